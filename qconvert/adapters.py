"""A PEFT LoRA adapter folder, read and checked before anything uses it: adapter_config.json and
adapter_model.safetensors (spec/robustness.md sections 5.1 to 5.4). Loading (``load_model(...,
adapter=)``), merging, exporting and pushing all read adapters through here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import FormatError

#: A PEFT LoRA weight key: base_model.model.<module>.lora_A|lora_B[.<adapter name>].weight
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_FIX = "the adapter is damaged or was edited; export it again from its training run"


def module_value(table: Mapping | None, module: str, default):
    """The value of a PEFT rank_pattern/alpha_pattern for ``module`` (a full name, a dotted suffix or
    a regular expression over the name), else ``default``."""
    for key, val in (table or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return val
    return default


def _positive_int(v: Any) -> bool:
    return type(v) is int and v > 0


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, validated: a JSON object with peft_type LORA, a
    positive integer r, a finite lora_alpha, and rank/alpha patterns of the same kinds."""
    p = folder / "adapter_config.json"
    if not p.is_file():
        raise FormatError(f"{folder}: no adapter_config.json", hint="pass a PEFT LoRA adapter folder")
    from .format.checkpoint import read_json_object
    from .validate import check_config_size

    check_config_size(p)
    cfg = read_json_object(p, "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise FormatError(f"{p}: peft_type {cfg.get('peft_type')!r} is not LORA", hint="qconvert handles PEFT LoRA adapters only")
    if not _positive_int(cfg.get("r")):
        raise FormatError(f"{p}: r must be a positive integer, got {cfg.get('r')!r}", hint=_FIX)
    if "lora_alpha" in cfg and not _finite_number(cfg["lora_alpha"]):
        raise FormatError(f"{p}: lora_alpha must be a finite number, got {cfg['lora_alpha']!r}", hint=_FIX)
    for table, ok, what in (("rank_pattern", _positive_int, "positive integers"), ("alpha_pattern", _finite_number, "finite numbers")):
        t = cfg.get(table)
        if t is not None and not (isinstance(t, dict) and all(isinstance(k, str) and ok(v) for k, v in t.items())):
            raise FormatError(f"{p}: {table} must map module names to {what}", hint=_FIX)
        for k in t or {}:  # keys are regular expressions over module names (as PEFT reads them)
            try:
                re.compile(k)
            except re.error as e:
                raise FormatError(f"{p}: {table} key {k[:60]!r} is not a valid regular expression ({e})", hint=_FIX) from None
    return cfg


#: adapter_config.json keys PEFT keeps as sets (their order then follows the process's string hashing)
SET_KEYS = ("target_modules", "exclude_modules")


def stable_adapter_config(folder: Path, **updates: Any) -> dict[str, Any]:
    """Rewrite the adapter_config.json that PEFT's ``save_pretrained`` wrote into ``folder`` so that
    the same adapter always gives the same bytes: keys sorted, and the lists of :data:`SET_KEYS`
    (sets in PEFT, written in an order that changes from one process to the next) sorted. PEFT reads
    a list where it wrote a set. ``updates`` set keys first (``base_model_name_or_path``). Written
    beside and renamed onto the file."""
    import json

    p = folder / "adapter_config.json"
    cfg = {**json.loads(p.read_text(encoding="utf-8")), **updates}
    for key in SET_KEYS:
        if isinstance(cfg.get(key), list) and all(isinstance(v, str) for v in cfg[key]):
            cfg[key] = sorted(cfg[key])
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return cfg


def read_lora_weights(folder: Path, cfg: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{module: (lora_A, lora_B)} from adapter_model.safetensors, validated against ``cfg``: every
    tensor a LoRA A/B weight, each A with its B, A [r, in] and B [out, r] in a float dtype, r the
    module's rank (rank_pattern, else r)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FormatError(f"{folder}: no adapter_model.safetensors", hint="pass a PEFT LoRA adapter folder")
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises SafetensorError and OSError for damaged files
        raise FormatError(f"{weights}: not a readable safetensors file", detail=str(e),
                          hint="the file is truncated or corrupt; copy or export it again") from None
    pairs: dict[str, dict[str, Any]] = {}
    for k, v in sd.items():
        m = LORA_KEY.fullmatch(k)
        if not m:
            raise FormatError(f"{weights}: tensor {k!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)",
                              hint="only plain LoRA layers can be used (no DoRA magnitudes, embeddings or modules_to_save)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    if not pairs:
        raise FormatError(f"{weights}: no LoRA weights (keys like base_model.model.<module>.lora_A.weight)", hint=_FIX)
    out = {}
    for module, ab in sorted(pairs.items()):
        for have, lack in (("A", "B"), ("B", "A")):
            if have in ab and lack not in ab:
                raise FormatError(f"{weights}: {module}.lora_{have} has no matching lora_{lack}", hint=_FIX)
        a, b = ab["A"], ab["B"]
        r = module_value(cfg.get("rank_pattern"), module, cfg["r"])
        if not (a.is_floating_point() and b.is_floating_point()):
            raise FormatError(f"{weights}: {module}: lora_A/lora_B must be floating point, got {a.dtype}/{b.dtype}", hint=_FIX)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise FormatError(f"{weights}: {module}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, rank {r} needs [{r}, in] and [out, {r}]",
                              hint=_FIX)
        out[module] = (a, b)
    return out


def check_against_base(weights: Path, modules: Mapping[str, tuple[Any, Any]], base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each adapted module's B @ A has the [out, in] shape of its base weight (``base_shapes``,
    keyed by module name)."""
    for module, (a, b) in modules.items():
        want = tuple(base_shapes[module])
        if (b.shape[0], a.shape[1]) != want:
            raise FormatError(f"{weights}: {module}: lora_B @ lora_A is [{b.shape[0]}, {a.shape[1]}], the base weight is {list(want)}",
                              hint="is this adapter for this base?")


def check_adapter_for_model(folder: str | os.PathLike, model) -> None:
    """A PEFT LoRA folder about to be attached to ``model`` (load_model's ``adapter=``): sections 5.1
    to 5.4 of spec/robustness.md, with the model's Linear layers as the base."""
    from .validate import linear_shape

    folder = Path(folder)
    modules = read_lora_weights(folder, read_adapter_config(folder))
    shapes = {}
    for m in modules:
        try:
            shape = linear_shape(model.get_submodule(m))
        except AttributeError:
            shape = None
        if shape is None:
            raise FormatError(f"{folder}: adapts {m!r}, which is not a Linear layer of the {type(model).__name__}",
                              hint="is this adapter for this base?")
        shapes[m] = shape
    check_against_base(folder / "adapter_model.safetensors", modules, shapes)
