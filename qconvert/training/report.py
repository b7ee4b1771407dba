"""What `qconvert train` tells the user: the start summary, one plain line per logged step when
stderr is not a terminal (nohup, Slurm, ``| tee``, CI), and the final summary with where everything is.
Pure text functions of numbers the loop computed, so tests can check them against the data."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass


@dataclass
class Plan:
    """The shape of a run, computed before its first step."""

    examples: int
    eval_examples: int
    tokens: int  # input tokens over the training examples
    label_tokens: int  # tokens that carry loss
    batch_size: int
    grad_accum: int
    world: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    save_steps: int
    eval_steps: int

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def memory_text(device) -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    text = f"peak RSS {peak:,.0f} MiB"
    if getattr(device, "type", None) == "cuda":
        import torch

        text += f", GPU {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB allocated"
    return text


def data_lines(name: str, report, max_length: int, truncation: str, show_split: bool = False) -> list[str]:
    """The summary of one data source; ``show_split`` names the split read (evaluation shows it)."""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.formats.items())) or "none"
    split = f" split {report.split}" if show_split and report.split else ""
    line = f"{name}: {report.records} records from {report.source}{split} ({kinds}); "
    line += f"{report.n_dropped} dropped, {report.truncated} truncated at --max-length {max_length}"
    out = [line]
    if report.n_dropped:
        reasons = ", ".join(f"{v} {k}" for k, v in report.dropped.most_common())
        out.append(f"  dropped: {reasons}; first: {report.first_problem(150)}")
    if report.truncated and truncation == "truncate":
        out.append("  truncated records lose their tail and EOS (the model is not taught to stop there); --truncation drop leaves them out")
    return out


def start_lines(plan: Plan, *, trainable: int, total_params: int, lora: str, optim: str, lr: float, scheduler: str,
                device, save_text: str) -> list[str]:
    share = 100.0 * trainable / max(1, total_params)
    rest = plan.examples - plan.steps_per_epoch * plan.effective_batch
    lines = [
        f"examples: {plan.examples} for training, {plan.eval_examples} for evaluation; "
        f"{plan.tokens} tokens, {plan.label_tokens} with loss",
        f"steps: {plan.total_steps} = {plan.epochs:.2f} epochs x {plan.steps_per_epoch} steps; effective batch {plan.effective_batch} "
        f"= {plan.batch_size} per device x {plan.grad_accum} accumulation x {plan.world} process(es)",
        f"LoRA: {lora}; {trainable:,} trainable parameters ({share:.2f}% of {total_params:,})",
        f"optimizer {optim}, lr {lr:g} {scheduler}, {plan.warmup_steps} warmup steps; device {device}; memory {memory_text(device)}",
        save_text,
    ]
    if plan.effective_batch > plan.examples:
        lines.insert(2, f"note: the effective batch ({plan.effective_batch}) is larger than the {plan.examples} examples: "
                        f"each step sees all of them; lower --grad-accum or --batch-size for more steps")
    elif rest:
        lines.insert(2, f"note: {rest} examples do not fill a last batch and wait for the next epoch's shuffle")
    return lines


def step_line(step: int, total: int, row: dict, elapsed: float) -> str:
    return (f"step {step}/{total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  epoch {row['epoch']:.2f}  "
            f"{row['tokens_per_s']:.0f} tok/s  {_clock(elapsed)}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def on_terminal(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return os.isatty(2) and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
