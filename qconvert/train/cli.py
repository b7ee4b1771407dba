"""CLI command `qconvert train`."""

from __future__ import annotations


import click

from ..cli import register
from ..runtime_cli import BACKENDS


@register
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="JSONL (or JSON array): text, alpaca, prompt/completion or chat records.")
@click.option("--output", required=True, help="Folder for the adapter, checkpoints and metrics.jsonl.")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "alpaca", "prompt", "chat"]), default="auto", show_default=True)
@click.option("--eval-data", help="Evaluation records (same formats).")
@click.option("--eval-split", type=float, default=0.0, help="Fraction of --data held out for evaluation (if no --eval-data).")
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--packing", is_flag=True, help="Concatenate examples into --max-length pieces.")
@click.option("--train-on-inputs", is_flag=True, help="Put the loss on prompts too, not only on completions / assistant turns.")
@click.option("--lora-r", type=int, default=64, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", multiple=True, help="Module names for LoRA (repeatable; default: all linear layers but the output head).")
@click.option("--optim", type=click.Choice(["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw"]), default="paged_adamw_32bit", show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--lr-scheduler", type=click.Choice(["constant", "cosine", "linear"]), default="constant", show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--max-grad-norm", type=float, default=0.3, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True, help="Per process.")
@click.option("--grad-accum", type=int, default=16, show_default=True)
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Overrides --epochs.")
@click.option("--no-gradient-checkpointing", is_flag=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--save-steps", type=int, default=0, help="Checkpoint every N steps into OUTPUT/checkpoint-N (0: only on interrupt).")
@click.option("--save-total-limit", type=int, help="Keep only the newest N checkpoints.")
@click.option("--logging-steps", type=int, default=1, show_default=True)
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, help="Resume from the latest checkpoint, or from PATH.")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
@click.option("--revision", help="Branch, tag or commit when MODEL is a Hub id.")
@click.option("--stop-after", type=int, hidden=True, help="Save a checkpoint and stop after N steps of this run (as Ctrl-C does).")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Publish the adapter when training finishes (see `qconvert push`).")
def train(model, data, output, fmt, eval_data, eval_split, max_length, packing, train_on_inputs, lora_r, lora_alpha, lora_dropout,
          target_modules, optim, lr, lr_scheduler, warmup_ratio, max_grad_norm, batch_size, grad_accum, epochs, max_steps,
          no_gradient_checkpointing, seed, save_steps, save_total_limit, logging_steps, resume, backend, revision, stop_after, push_to):
    """QLoRA: train a LoRA adapter on the frozen 4-bit MODEL (folder or Hub id). Ctrl-C saves a checkpoint.

    Data-parallel: torchrun --nproc-per-node N qconvert train ... (NCCL on GPU, gloo on CPU)."""
    from .loop import train as run

    r = run(model, data, output, fmt=fmt, eval_data=eval_data, eval_split=eval_split, max_length=max_length, packing=packing,
            train_on_inputs=train_on_inputs, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=list(target_modules) or None, optim=optim, lr=lr, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
            stop_after=stop_after, gradient_checkpointing=not no_gradient_checkpointing, seed=seed, save_steps=save_steps,
            save_total_limit=save_total_limit, logging_steps=logging_steps, resume=resume, backend=backend, revision=revision,
            log=lambda m: click.echo(m, err=True))
    if r.get("interrupted"):
        raise SystemExit(130 if r.get("signal") else 0)
    if push_to and int(__import__("os").environ.get("RANK", "0")) == 0:
        from ..hub.push import push_folder

        p = push_folder(output, push_to)
        click.echo(f"pushed adapter to {push_to}: {p['commit_url']}")
