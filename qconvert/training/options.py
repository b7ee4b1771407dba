"""Checks on `qconvert train`'s options, made before anything is loaded: each bad value is one line
that names the option, the value and the range it must be in."""

from __future__ import annotations

import math
from typing import Any

from ..errors import OptionError
from .settings import SPECS

# Declared once, in qconvert.training.settings (each TrainConfig field's Spec); these views keep their old names.
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
