"""Checks on `qconvert train`'s options, made before anything is loaded: each bad value is one line
that names the option, the value and the range it must be in."""

from __future__ import annotations

import math
from typing import Any

from ..errors import OptionError
from .settings import SPECS

# Declared once, in qconvert.train.settings (each TrainConfig field's Spec); these views keep their old names.
#: option -> how the CLI spells it, for the messages
FLAG: dict[str, str] = {name: spec.flag for name, spec in SPECS.items() if spec.range is not None}
#: option -> (lowest, lowest included, highest, highest included); None: no bound on that side
RANGES: dict[str, tuple] = {name: spec.range for name, spec in SPECS.items() if spec.range is not None}
INTEGERS = {name for name in RANGES if SPECS[name].kind == "int"}


def _range_text(lo, lo_in, hi, hi_in) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_in else '>'} {lo}")
    if hi is not None:
        parts.append(f"{'<=' if hi_in else '<'} {hi}")
    return " and ".join(parts)


def check_options(values: dict[str, Any]) -> None:
    """Raise OptionError for the first value out of its range (None means "not set" and passes)."""
    for name, (lo, lo_in, hi, hi_in) in RANGES.items():
        v = values.get(name)
        if v is None:
            continue
        flag = FLAG[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (name in INTEGERS and not float(v).is_integer()):
            raise OptionError(f"{flag} {v!r}: expected {'an integer' if name in INTEGERS else 'a number'}",
                              hint=f"give {flag} {'an integer' if name in INTEGERS else 'a number'} {_range_text(lo, lo_in, hi, hi_in)}")
        bad = not math.isfinite(v)
        bad |= lo is not None and (v < lo or (v == lo and not lo_in))
        bad |= hi is not None and (v > hi or (v == hi and not hi_in))
        if bad:
            raise OptionError(f"{flag} {v}: must be {_range_text(lo, lo_in, hi, hi_in)}",
                              hint=f"give {flag} a value {_range_text(lo, lo_in, hi, hi_in)} (qconvert train --help lists every option)")


def split_modules(names) -> list[str] | None:
    """--target-modules as PEFT users write it: repeated, or comma/space separated (q_proj,v_proj);
    ``all-linear`` is the default (None)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    out = [n for item in names for n in str(item).replace(",", " ").split() if n]
    if out == ["all-linear"]:  # PEFT's and TRL's name for the default: every linear layer but the head
        return None
    return out or None


def check_target_modules(model, targets: list[str] | None) -> None:
    """Each name must match a linear layer (PEFT's rule: the full name, or its last dotted parts)."""
    if not targets:
        return
    linear = linear_module_names(model)
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linear):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            shown = ", ".join(leaves[:20]) + (" ..." if len(leaves) > 20 else "")
            raise OptionError(f"--target-modules {t!r}: no linear layer of this model has that name", hint=f"available: {shown}")


def default_targets(model) -> list[str]:
    """LoRA's default targets: every linear layer but the head, as the sorted set of their last name
    parts (``q_proj``, ``down_proj``...: what PEFT's "all-linear" expands to, and what PEFT matches
    as a suffix), or by full name when one of those parts also names a module that is not a linear
    layer (PEFT would then try to wrap that one too)."""
    names = linear_module_names(model)
    leaves = {n.rpartition(".")[2] for n in names}
    chosen = set(names)
    if all(name in chosen for name, _ in model.named_modules() if name and name.rpartition(".")[2] in leaves):
        return sorted(leaves)
    return names


def linear_module_names(model) -> list[str]:
    """Names of the layers LoRA can wrap: torch Linear and qconvert's 4-bit Linear, not the output head."""
    import torch

    out = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):  # qconvert's Linear4bit is one
            out.append(name)
    return out
