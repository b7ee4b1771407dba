"""spec/robustness.md names the owner of each refusal rule in the code (issue 22: one owner per rule):
every `qconvert....` name it gives must exist, so a rule's owner cannot be renamed or moved away
without the spec following."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

SPEC = Path(__file__).resolve().parent.parent / "spec" / "robustness.md"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_owner_the_spec_names_exists():
    names = sorted(set(re.findall(r"`(qconvert(?:\.\w+)+)`", SPEC.read_text(encoding="utf-8"))))
    assert "qconvert.model.adapters.lora_shapes" in names and "qconvert.io.links.outside_folder" in names
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, missing
