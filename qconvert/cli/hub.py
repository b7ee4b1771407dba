"""CLI command `qconvert push`."""

from __future__ import annotations

import json

import click

from . import options


@click.command()
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@options.revision("Branch to push to (created if missing).")
@click.option("--commit-message")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@options.json_output()
def push(folder, repo_id, private, revision, commit_message, create_pr, as_json):
    """Validate FOLDER (spec check, adapter config, model card) and publish it to the Hub as REPO_ID.

    Uses HF_TOKEN and HF_ENDPOINT. An interrupted upload resumes when the command is run again."""
    from ..hub.push import push_folder

    r = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message, create_pr=create_pr)
    click.echo(json.dumps(r) if as_json else f"pushed {r['kind']} model {folder} to {repo_id}: {r['pr_url'] or r['commit_url']}")


COMMANDS = [push]
