"""CLI command `qconvert train`: options (with the transformers/TRL spellings as aliases), an optional
--config file under the flags, then one call to :func:`qconvert.train.loop.train`."""

from __future__ import annotations

import os

import click

from ..cli import register
from ..errors import OptionError
from ..runtime_cli import BACKENDS


@register
@click.command()
@click.argument("model", required=False)
@click.option("--config", "config_file", metavar="FILE", help="YAML or JSON file of options, keyed as transformers/PEFT name them; flags override it.")
@click.option("--data", help="JSONL/JSON/parquet/CSV/TSV/arrow/txt file, dataset folder, or Hub dataset id (org/name).")
@click.option("--data-split", help="Split of a Hub dataset or folder [default: train].")
@click.option("--data-config", help="Configuration (subset) of a Hub dataset or folder.")
@click.option("--output", "--output-dir", "output", help="Folder for the adapter, checkpoints, metrics.jsonl, loss.png and config.yaml.")
@click.option("--overwrite", is_flag=True, help="Replace the previous run in --output (its checkpoints and metrics are removed first).")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "alpaca", "prompt", "chat", "sharegpt"]), default="auto", show_default=True)
@click.option("--eval-data", help="Evaluation records (same formats and sources).")
@click.option("--eval-split", type=float, default=0.0, help="Fraction of --data held out for evaluation (if no --eval-data).")
@click.option("--max-length", "--max-seq-length", "max_length", type=int, default=512, show_default=True)
@click.option("--truncation", type=click.Choice(["truncate", "drop"]), default="truncate", show_default=True,
              help="Records over --max-length: cut (the tail and its EOS are lost, counted) or left out (counted).")
@click.option("--strict-data", is_flag=True, help="Stop at the first bad record instead of leaving it out and counting it.")
@click.option("--packing", is_flag=True, help="Concatenate examples into --max-length pieces.")
@click.option("--train-on-inputs", is_flag=True, help="Put the loss on prompts too, not only on completions / assistant turns.")
@click.option("--lora-r", "--r", "lora_r", type=int, default=64, show_default=True)
@click.option("--lora-alpha", type=float, default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", multiple=True, help="Module names for LoRA (repeatable or comma-separated; default: all linear layers but the output head).")
@click.option("--optim", type=click.Choice(["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw"]), default="paged_adamw_32bit", show_default=True)
@click.option("--lr", "--learning-rate", "lr", type=float, default=2e-4, show_default=True)
@click.option("--lr-scheduler", "--lr-scheduler-type", "lr_scheduler", type=click.Choice(["constant", "cosine", "linear"]), default="constant", show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--max-grad-norm", type=float, default=0.3, show_default=True)
@click.option("--batch-size", "--per-device-train-batch-size", "batch_size", type=int, default=1, show_default=True, help="Per process.")
@click.option("--grad-accum", "--gradient-accumulation-steps", "grad_accum", type=int, default=16, show_default=True)
@click.option("--epochs", "--num-train-epochs", "epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Overrides --epochs.")
@click.option("--no-gradient-checkpointing", is_flag=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--save-steps", type=int, help="Checkpoint every N steps into OUTPUT/checkpoint-N; 0: only on Ctrl-C/SIGTERM "
              "[default: at each epoch's end, but at least 50 steps and a tenth of the run apart].")
@click.option("--save-total-limit", type=int, default=2, show_default=True, help="Keep only the newest N checkpoints (0: all).")
@click.option("--logging-steps", type=int, default=1, show_default=True, help="Metrics row (and, off a terminal, a log line) every N steps.")
@click.option("--eval-steps", type=int, help="Evaluate every N steps (0: only at the end) [default: at each checkpoint and at the end].")
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, help="Resume from the latest checkpoint, or from PATH.")
@click.option("--fsdp", is_flag=True, help="Shard the 4-bit base, adapter, gradients and optimizer state across the torchrun processes (FSDP2).")
@click.option("--fsdp-offload", is_flag=True, help="With --fsdp: keep the shards in host memory, copying one block at a time to the device.")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
@click.option("--revision", help="Branch, tag or commit when MODEL is a Hub id.")
@click.option("--stop-after", type=int, hidden=True, help="Save a checkpoint and stop after N steps of this run (as Ctrl-C does).")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Publish the adapter when training finishes (see `qconvert push`).")
@click.pass_context
def train(ctx, config_file, **opts):
    """QLoRA: train a LoRA adapter on the frozen 4-bit MODEL (folder or Hub id). Ctrl-C or SIGTERM saves
    a checkpoint; --resume continues it.

    Data-parallel: torchrun --nproc-per-node N qconvert train ... (NCCL on GPU, gloo on CPU)."""
    from .loop import train as run

    opts = merge_config(ctx, config_file, opts)
    for name, how in (("model", "MODEL"), ("data", "--data"), ("output", "--output")):
        if not opts.get(name):
            raise OptionError(f"missing {how}", hint="give it on the command line or in the --config file")
    push_to = opts.pop("push_to")
    opts["gradient_checkpointing"] = not opts.pop("no_gradient_checkpointing")
    opts["target_modules"] = list(opts["target_modules"] or ()) or None
    model, data, output = opts.pop("model"), opts.pop("data"), opts.pop("output")
    r = run(model, data, output, log=lambda m: click.echo(m, err=True), **opts)
    if r.get("interrupted"):
        raise SystemExit(128 + r["signal"] if r.get("signal") else 0)
    if push_to and int(os.environ.get("RANK", "0")) == 0:
        from ..hub.push import push_folder

        p = push_folder(output, push_to)
        click.echo(f"pushed adapter to {push_to}: {p['commit_url']}")


def merge_config(ctx: click.Context, config_file: str | None, opts: dict) -> dict:
    """Options from the --config file for every option not given on the command line, each
    converted and checked as the flag would be."""
    if not config_file:
        return opts
    from click.core import ParameterSource

    from .config import KEYS, read_config

    params = {p.name: p for p in ctx.command.params}
    for opt, value in read_config(config_file).items():
        name = "no_gradient_checkpointing" if opt == "gradient_checkpointing" else opt
        if value is None or ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            continue  # null means "the default"; a flag on the command line wins
        if opt == "gradient_checkpointing":
            value = not _cast(ctx, params[name], value, KEYS[opt][0])
        elif opt == "push_to" and isinstance(value, bool):
            if value:
                raise OptionError(f"--config {config_file}: push_to_hub: true needs hub_model_id: REPO_ID")
            value = None
        elif opt == "resume" and isinstance(value, bool):
            value = "latest" if value else None
        elif opt == "target_modules" and isinstance(value, str):
            value = [value]
        else:
            value = _cast(ctx, params[name], value, KEYS[opt][0])
        opts[name] = value
    return opts


def _cast(ctx, param: click.Parameter, value, key: str):
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as e:
        raise OptionError(f"--config: {key}: {' '.join(e.format_message().split())[:150]}") from None
