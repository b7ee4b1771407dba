"""CLI command `qconvert push`."""

from __future__ import annotations

import json

import click

from . import options


@click.command(short_help="Validate a folder, then publish it to the Hub.")
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@options.revision("Branch to push to (created if missing).")
@click.option("--commit-message")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Also publish files matching PATTERN (a name or glob; repeatable). Only the files qconvert writes are published otherwise.")
@options.json_output()
def push(folder, repo_id, private, revision, commit_message, create_pr, include, as_json):
    """Validate FOLDER (spec check, adapter config, model card) and publish it to the Hub as REPO_ID.

    Only what qconvert wrote is published (the model or adapter files, the card, tokenizer and other
    companion files); another file refuses the push unless --include names it. Hidden files,
    temporary leftovers and a train run's own files are never sent; a file that looks like a secret
    is named in a warning. Uses HF_TOKEN and HF_ENDPOINT. An interrupted upload resumes when the
    command is run again."""
    from ..errors import printable
    from ..hub.push import push_folder

    r = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message, create_pr=create_pr,
                    include=include, log=lambda m: click.echo(printable(m), err=True))
    text = f"pushed {r['kind']} model {folder} to {repo_id}: {r['pr_url'] or r['commit_url']}"
    click.echo(json.dumps(r) if as_json else printable(text))  # a folder name or a Hub's URL may hold escape sequences


COMMANDS = [push]
