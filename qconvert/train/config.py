"""`qconvert train --config run.yaml`: a run's options in a YAML or JSON file, keyed as transformers,
PEFT and TRL name them (learning_rate, per_device_train_batch_size, gradient_accumulation_steps,
num_train_epochs, lora_r / r, lora_alpha, ...), with the spellings of axolotl and FinLoRA recipes
accepted as aliases. Flags given on the command line override the file. Every run writes its
resolved options to OUTPUT/config.yaml in the same keys, so ``--config OUTPUT/config.yaml`` repeats it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .settings import NOT_SAVED, all_specs

#: option -> (key written to config.yaml, other keys accepted when reading); declared with each
#: option in qconvert.train.settings (RUN_OPTIONS, then the TrainConfig fields)
KEYS: dict[str, tuple[str, tuple[str, ...]]] = {name: (spec.key, spec.aliases) for name, spec in all_specs().items()}
#: accepted and checked, but nothing to set: qconvert trains on 4-bit bases only
FIXED = {"quant_bits": 4, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
LOOKUP = {alias: opt for opt, (key, aliases) in KEYS.items() for alias in (key, *aliases)}


def read_config(path: str | Path) -> dict[str, Any]:
    """The file's settings as {train() option: value}; unknown keys are refused with a suggestion."""
    from ..io.readers import MAX_RUN_CONFIG_BYTES, read_json, read_yaml

    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--config {p}: no such file")
    reader = read_json if p.suffix.lower() == ".json" else read_yaml
    raw = reader(p, "a run config", OptionError, limit=MAX_RUN_CONFIG_BYTES, shown=f"--config {p}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OptionError(f"--config {p}: expected a mapping of option: value, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in FIXED:
            if value != FIXED[key]:
                raise OptionError(f"--config {p}: {key}: {value!r} is not supported", hint=f"qconvert trains on 4-bit NF4 bases ({key}: {FIXED[key]!r})")
            continue
        opt = LOOKUP.get(key)
        if opt is None:
            close = difflib.get_close_matches(key, list(LOOKUP) + list(FIXED), n=1)
            raise OptionError(f"--config {p}: unknown key {key!r}", hint=f"did you mean {close[0]!r}?" if close else "see `qconvert train --help`")
        if opt in out:
            raise OptionError(f"--config {p}: {key!r} sets {KEYS[opt][0]} a second time")
        out[opt] = value
    return out


def resolved_config(model, data, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of a run under its config key, with local paths made absolute."""
    values = dict(options, model=model, data=data, output=out)
    cfg = {}
    for opt, (key, _) in KEYS.items():
        if opt in NOT_SAVED or opt not in values:
            continue
        v = values[opt]
        if opt in ("model", "data", "eval_data", "output") and v is not None and (Path(v).exists() or opt == "output"):
            v = str(Path(v).resolve())
        elif isinstance(v, tuple):
            v = list(v)
        cfg[key] = v
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> None:
    import yaml

    head = "# qconvert train: the resolved options of this run; repeat it with `qconvert train --config THIS_FILE --output NEW`\n"
    from ..io.writes import write_file

    write_file(path, head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))
