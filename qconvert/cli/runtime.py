"""CLI commands that run a model: `qconvert generate` and `qconvert eval` (library: qconvert.run.inference,
qconvert.run.generate, qconvert.run.evaluate)."""

from __future__ import annotations

import contextlib
import json

import click

# light (no torch)
from ..run.generate import PROMPT_FORMATS
from . import options


@click.command(short_help="Complete a prompt, with an optional LoRA adapter.")
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue (with --chat: the user's message).")
@click.option("--adapter", help="A PEFT LoRA adapter folder (a `qconvert train` output), or its Hub id, to run on top of MODEL.")
@click.option("--chat", is_flag=True, help="Render the prompt as a user turn with the tokenizer's chat template (= --format chat).")
@click.option("--format", "fmt", type=click.Choice(PROMPT_FORMATS),
              help="raw: the prompt as given; alpaca: an instruction rendered as train renders alpaca records; chat: as --chat "
                   "[default: the --adapter's recorded training format, else raw].")
@click.option("--system", help="With --chat: a system message before the prompt.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; above 0: sample.")
@click.option("--top-p", type=float, help="Nucleus sampling (needs --temperature > 0).")
@click.option("--top-k", type=int, help="Sample among the K likeliest tokens (needs --temperature > 0).")
@click.option("--repetition-penalty", type=float, help="Above 1 discourages repeats (greedy or sampled).")
@click.option("--seed", type=int, help="Seed for sampling: the same seed gives the same text.")
@click.option("--echo", is_flag=True, help="Print the prompt too, not only the completion.")
@options.json_output("Print one JSON object (completion, token counts, ids, settings).")
@options.dtype(auto=True)
@options.backend()
@options.revision()
@options.load_in_4bit()
def generate(model, prompt, adapter, chat, fmt, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, echo,
             as_json, dtype, backend, revision, load_in_4bit, keep_quantized):
    """Continue PROMPT with MODEL (folder or Hub id; 4-bit or 16-bit), optionally with a LoRA adapter."""
    from .._cpus import cap_torch_threads
    from ..convert.on_load import inference_base
    from ..run.generate import check_settings, generate_text, recorded_format, render_prompt
    from ..io.source import resolve_adapter_path
    from ..run.inference import attach_adapter, load_for_inference

    if chat and fmt not in (None, "chat"):
        raise click.UsageError(f"--chat and --format {fmt}: give one of them")
    folder = resolve_adapter_path(adapter)[0] if adapter else None  # a folder or a Hub id, before minutes of loading
    if fmt is None and not chat and folder:
        fmt = recorded_format(folder)
        if fmt:
            click.echo(f"prompt format: {fmt}, the adapter's training format (--format raw sends the prompt as given)", err=True)
    chat = chat or fmt == "chat"
    shown, prompt = prompt, render_prompt(prompt, fmt or "raw")

    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, chat=chat, system=system)  # before minutes of loading
    cap_torch_threads()
    with contextlib.ExitStack() as held:  # a 16-bit MODEL's temporary 4-bit copy lives as long as the run
        base, rev = inference_base(model, revision, load_in_4bit, keep_quantized, held, lambda m: click.echo(m, err=True))
        lm = load_for_inference(base, backend=backend, revision=rev, dtype=dtype)
        if folder:
            attach_adapter(lm, folder)
        r = generate_text(lm.model, lm.tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, chat=chat, system=system)
    if as_json:
        click.echo(json.dumps({"model": model, "adapter": adapter, **r, "prompt": shown, "rendered_prompt": r["prompt"],
                               "format": "chat" if chat else fmt or "raw"}))
    else:
        click.echo(r["text"] if echo else r["completion"])


@click.command(name="eval", short_help="Loss and perplexity, with and without LoRA adapters.")
@click.argument("model")
@options.train_data_options(  # train's own declarations (qconvert.training.settings), worded for scoring
    extra_choices={"fmt": ("raw",)},
    fmt="Record format (auto: per record). auto also renders prompt/completion records in an --adapter's recorded "
        "training format (alpaca, chat), as generate does; raw scores them as written.",
    data="Records in any format `qconvert train` reads (text, alpaca, prompt/completion, chat).",
    max_length="Tokens per example, as in train.",
    truncation="Records over --max-length: scored on their first tokens, or left out (counted either way).",
    train_on_inputs="Score prompts too (as train does with this flag), not only completions.")
@click.option("--adapter", "adapters", multiple=True, help="A PEFT LoRA adapter folder or Hub id to score MODEL with (repeatable: one row each).")
@click.option("--compare", is_flag=True, help="Also score MODEL without the adapters: one table, base vs base+adapter.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@options.dtype(auto=True)
@options.backend()
@options.revision()
@options.json_output("One JSON object per scored model, one per line.")
@options.load_in_4bit()
def eval_cmd(model, data, adapters, compare, data_split, data_config, fmt, max_length, truncation, train_on_inputs, batch_size, dtype,
             backend, revision, as_json, load_in_4bit, keep_quantized):
    """Loss and perplexity of MODEL (4-bit or 16-bit, with or without LoRA adapters) on the tokens train would learn."""
    from .._cpus import cap_torch_threads
    from ..run.evaluate import EvalOptions, evaluate, format_table

    cap_torch_threads()
    o = EvalOptions(compare=compare, fmt=fmt, max_length=max_length, train_on_inputs=train_on_inputs, truncation=truncation,
                    data_split=data_split, data_config=data_config, batch_size=batch_size, backend=backend, revision=revision,
                    dtype=dtype, load_in_4bit=load_in_4bit, keep_quantized=keep_quantized)
    rows = evaluate(model, data, o, adapters=list(adapters), log=lambda m: click.echo(m, err=True))
    r0 = rows[0]
    if (r0["truncated"] or r0["dropped"]) and not as_json:
        click.echo(f"{data}: {r0['records']} records, {r0['truncated']} truncated to --max-length {max_length}, "
                   f"{r0['dropped']} left out", err=True)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
    else:
        click.echo(format_table(rows))


COMMANDS = [generate, eval_cmd]
