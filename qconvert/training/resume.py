"""`qconvert train --resume`: a resumed run is the run it resumes.

Each checkpoint records its run's settings (trainer_state.safetensors ``settings``: the options of
:func:`run_settings` and the number of processes). A resume takes them back, and refuses, by name,
a given option (a flag, a --config key, a ``train()`` keyword) that contradicts one of them, before
anything is loaded, as transformers' Trainer compares a resumed run's arguments with the checkpoint's.
Without this, ``--resume`` with the defaults of the options left out trained held-out records, at
another batch and learning rate, and config.yaml and the card described that other run.

Three kinds of option:

- the run's definition (data and its split, LoRA shape, optimizer and schedule, seed, ...): taken
  from the checkpoint; given with another value, refused;
- :data:`MAY_CHANGE`, how long the run goes and how often it logs, evaluates and saves: taken from
  the checkpoint unless given (``--max-steps 20`` extends a 10-step run);
- :data:`PER_INVOCATION`, how this process runs rather than what it trains (kernels, gradient
  checkpointing, FSDP and offload, the process count): this invocation's own, never taken back
  (a checkpoint's FSDP-ness is checked when it is read).

The batch is compared as the global batch, ``batch_size x grad_accum x processes``: a checkpoint
resumes on another number of processes with a ``--grad-accum`` that keeps it (the data order of a
step depends only on it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..errors import OptionError
from .settings import NOT_SAVED, SPECS, TrainConfig

#: options a resume may change; left out, they keep the run's values
MAY_CHANGE = ("epochs", "max_steps", "logging_steps", "save_steps", "save_total_limit", "eval_steps")
#: options of this invocation only: neither recorded in a checkpoint nor compared on resume
PER_INVOCATION = ("backend", "gradient_checkpointing", "fsdp", "fsdp_offload", *NOT_SAVED)
#: compared together, as the global batch
BATCH = ("batch_size", "grad_accum")


def _norm(name: str, value: Any) -> Any:
    """A value as compared: module lists as sorted lists, a local evaluation file as its absolute path."""
    if name == "target_modules" and value is not None:
        return sorted(value)
    if name == "eval_data" and value is not None and Path(value).exists():
        return str(Path(value).resolve())
    return value


def run_settings(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What a checkpoint records of its run, from the run's TrainConfig (plain values:
    the trainer state is written as safetensors and JSON, without pickle)."""
    options = {name: _norm(name, getattr(cfg, name)) for name in SPECS if name not in PER_INVOCATION}
    return {"options": options, "world": world}


def _shown(name: str, value: Any) -> str:
    return f"{SPECS[name].flag} {', '.join(value) if isinstance(value, list) else value}"


def resumed_config(cfg: TrainConfig, settings: dict[str, Any] | None, world: int, where: Path,
                   say: Callable[[str], None]) -> TrainConfig:
    """``cfg`` with the run's own settings from the checkpoint at ``where``; OptionError for a given
    option that contradicts them."""
    if not isinstance(settings, dict) or not isinstance(settings.get("options"), dict):
        say(f"note: {where} records no run settings (an older qconvert wrote it): the options given are used as they are")
        return cfg
    saved = {k: v for k, v in settings["options"].items() if k in SPECS and k not in PER_INVOCATION}
    given = cfg.given()
    for name, was in saved.items():
        now = _norm(name, getattr(cfg, name))
        if name in given and now != was and name not in MAY_CHANGE and name not in BATCH:
            raise OptionError(f"--resume: {_shown(name, now)} contradicts the run being resumed: its {name} is {was!r} ({where})",
                              hint="leave the option out (a resume takes the run's own settings), or start a new --output")
        if name in given and now != was and name in MAY_CHANGE:
            say(f"resume: {_shown(name, now)} (the run had {'none' if was is None else was})")
    kept = {name: was for name, was in saved.items() if name not in given}
    new = dataclasses.replace(cfg, **kept).with_given(given)
    _check_batch(new, saved, int(settings.get("world") or 1), world, given, where)
    return new


def _check_batch(cfg: TrainConfig, saved: dict, was_world: int, world: int, given, where: Path) -> None:
    """The global batch (batch_size x grad_accum x processes) is the run's."""
    if not all(k in saved for k in BATCH):
        return
    was = saved["batch_size"] * saved["grad_accum"] * was_world
    now = cfg.batch_size * cfg.grad_accum * world
    if now == was:
        return
    named = [_shown(k, getattr(cfg, k)) for k in BATCH if k in given] or [f"{world} process(es)"]
    fits = was % (cfg.batch_size * world) == 0
    verb = "gives" if len(named) == 1 and not named[0].endswith("process(es)") else "give"
    raise OptionError(f"--resume: {' and '.join(named)} {verb} a global batch of {now}, the run being resumed has {was} "
                      f"({saved['batch_size']} x {saved['grad_accum']} accumulation x {was_world} process(es); {where})",
                      hint=f"give --grad-accum {was // (cfg.batch_size * world)}" if fits
                      else "resume with the run's --batch-size and --grad-accum, on as many processes")
