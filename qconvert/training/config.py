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
from .settings import NOT_SAVED, RUN_OPTIONS, RunOptions, TrainConfig, all_specs

#: option -> (key written to config.yaml, other keys accepted when reading); declared with each
#: option in qconvert.training.settings (RUN_OPTIONS, then the TrainConfig fields)
KEYS: dict[str, tuple[str, tuple[str, ...]]] = {name: (spec.key, spec.aliases) for name, spec in all_specs().items()}
#: accepted and checked, but nothing to set: qconvert trains LoRA (not DoRA) on 4-bit NF4 bases;
#: null (a key left empty, as axolotl's examples do) passes too
FIXED = {"quant_bits": 4, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_peft": True, "adapter": "qlora",
         "load_in_8bit": False, "peft_use_dora": False, "use_dora": False, "lora_fan_in_fan_out": False, "weight_decay": 0.0,
         "lora_task_type": "CAUSAL_LM", "lora_modules_to_save": None}
#: keys of TRL / transformers, axolotl and FinLoRA files that change nothing a qconvert run computes
#: (logging, reporting, precision flags: the compute dtype is the 4-bit model's, evaluation and save
#: schedules of other tools): accepted, and named in one line
IGNORED = frozenset({
    "bf16", "fp16", "tf32", "torch_dtype", "dtype", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
    "use_bnb_nested_quant", "per_device_eval_batch_size",
    "report_to", "run_name", "logging_dir", "logging_strategy", "logging_first_step", "log_level", "disable_tqdm",
    "eval_strategy", "evaluation_strategy", "save_strategy", "do_train", "do_eval", "push_to_hub_model_id",
    "attn_implementation", "flash_attention", "xformers_attention", "sdp_attention", "gradient_checkpointing_kwargs",
    "dataloader_num_workers", "remove_unused_columns", "dataset_num_proc", "model_type", "tokenizer_type", "strict",
    "dataset_prepared_path", "lora_model_dir", "pad_to_sequence_len", "group_by_length", "early_stopping_patience",
    "local_rank", "debug", "deepspeed", "fsdp_config", "special_tokens", "evals_per_epoch", "saves_per_epoch",
    "wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model",
})
#: axolotl's datasets[].type -> train's --format (the same record keys, read the same way)
AXOLOTL_TYPES = {"alpaca": "alpaca", "completion": "text", "chat_template": "chat", "sharegpt": "sharegpt"}
#: axolotl's datasets[] keys -> train options (path and type are read apart)
AXOLOTL_ENTRY = {"split": "data_split", "name": "data_config"}
#: transformers' / axolotl's optimizer names for the ones train has
OPTIM_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_bnb_8bit": "adamw_8bit"}
LOOKUP = {alias: opt for opt, (key, aliases) in KEYS.items() for alias in (key, *aliases)}
SPECIAL = ("datasets", "lora_target_linear")


def _split_name(path: str | Path, name: str | None) -> tuple[str | Path, str | None]:
    """``FILE:NAME`` as (FILE, NAME) when FILE is a file and the whole is not."""
    text = str(path)
    if ":" in text and not Path(text).is_file():
        file, _, entry = text.rpartition(":")
        if Path(file).is_file() and entry:
            if name is not None and name != entry:
                raise OptionError(f"--config {text} and --config-name {name}: two names for one run", hint="give one of them")
            return file, entry
    return path, name


def _entry(raw: dict, name: str | None, where: str) -> dict:
    """The run ``name`` of a file of named runs ({NAME: {key: value}}, as FinLoRA's
    finetune_configs.json); the file itself when it is one run and no name is given."""
    known = set(LOOKUP) | set(FIXED) | IGNORED | set(SPECIAL)
    named = bool(raw) and all(isinstance(v, dict) for v in raw.values()) and not (set(map(str, raw)) & known)
    shown = ", ".join(map(str, list(raw)[:8])) + (" ..." if len(raw) > 8 else "")
    if name is None:
        if named:
            raise OptionError(f"{where}: holds {len(raw)} named runs; pick one", hint=f"--config-name NAME or --config FILE:NAME ({shown})")
        return raw
    if not named:
        raise OptionError(f"{where}: --config-name {name}: the file is one run, not a file of named runs")
    if not isinstance(raw.get(name), dict):
        raise OptionError(f"{where}: no run named {name!r}", hint=f"its runs: {shown}")
    return raw[name]


def map_keys(raw: dict, where: str, log=None) -> dict[str, Any]:
    """{train() option: value} of a parsed file; every problem (unknown key, unsupported value) is
    gathered into one OptionError."""
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []  # (key, what is wrong)
    unused: list[str] = []
    linear = False

    def put(opt: str, value: Any, key: str) -> None:
        if value is None:  # an empty key: the default, as load_run reads null
            return
        if opt in out:
            problems.append((key, f"{key!r} sets {KEYS[opt][0]} a second time"))
        out[opt] = value

    for key, value in raw.items():
        key = str(key)
        if key in FIXED:
            if value is not None and value != FIXED[key]:
                problems.append((key, f"{key}: {value!r} is not supported (qconvert trains LoRA on 4-bit NF4 bases: {key}: {FIXED[key]!r})"))
            else:
                unused.append(key)
        elif key in IGNORED:
            unused.append(key)
        elif key == "lora_target_linear":
            linear = bool(value)
        elif key == "datasets":
            for opt, v in _axolotl_datasets(value, problems).items():
                put(opt, v, key)
        elif key in LOOKUP:
            opt = LOOKUP[key]
            put(opt, OPTIM_ALIASES.get(value, value) if opt == "optim" and isinstance(value, str) else value, key)
        else:
            close = difflib.get_close_matches(key, list(LOOKUP) + list(FIXED), n=1)
            problems.append((key, f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")))
    if linear:  # every linear layer but the head (axolotl adds named modules to them: all of them already)
        out.pop("target_modules", None)
    if problems:
        keys = ", ".join(dict.fromkeys(k for k, _ in problems))
        first = problems[0][1] if len(problems) == 1 else f"{len(problems)} problems, keys {keys}"
        raise OptionError(f"{where}: {first}", detail="\n".join(f"  {p}" for _, p in problems) if len(problems) > 1 else None,
                          hint="see `qconvert train --help` for the options a config file may set (README: Config files)")
    if unused and log is not None:
        log(f"{where}: no effect here, accepted: {', '.join(unused)}")
    return out


def _axolotl_datasets(value: Any, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """axolotl's ``datasets: [{path, type, split?, name?}]``, one entry: the data and its format."""
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        problems.append(("datasets", "datasets: expected a list of one {path, type} entry (train reads one dataset)"))
        return {}
    entry, out = value[0], {}
    if not isinstance(entry.get("path"), str):
        problems.append(("datasets[0].path", "datasets[0].path: missing"))
    else:
        out["data"] = entry["path"]
    kind = entry.get("type")
    if kind is not None:
        if isinstance(kind, str) and kind in AXOLOTL_TYPES:
            out["fmt"] = AXOLOTL_TYPES[kind]
        else:
            problems.append(("datasets[0].type", f"datasets[0].type: {kind!r} is not a format train reads (it reads {', '.join(AXOLOTL_TYPES)})"[:180]))
    for k, v in entry.items():
        if k in AXOLOTL_ENTRY:
            out[AXOLOTL_ENTRY[k]] = v
        elif k not in ("path", "type", "ds_type"):
            problems.append((f"datasets[0].{k}", f"unknown key 'datasets[0].{k}'"))
    return out


def read_config(path: str | Path, name: str | None = None, log=None) -> dict[str, Any]:
    """The file's settings as {train() option: value}. ``name`` (or ``FILE:NAME``) picks one run
    of a file of named runs (FinLoRA's). Every unknown key is refused in one message, before
    anything loads; the keys that change nothing here are accepted and listed in one line to
    ``log``."""
    from ..io.readers import MAX_RUN_CONFIG_BYTES, read_json, read_yaml

    path, name = _split_name(path, name)
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--config {p}: no such file", hint="check the path of the YAML or JSON file")
    reader = read_json if p.suffix.lower() == ".json" else read_yaml
    raw = reader(p, "a run config", OptionError, limit=MAX_RUN_CONFIG_BYTES, shown=f"--config {p}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OptionError(f"--config {p}: expected a mapping of option: value, got {type(raw).__name__}")
    return map_keys(_entry(raw, name, f"--config {p}"), f"--config {p}", log)


def resolved_config(model, data, out: Path, run: TrainConfig) -> dict[str, Any]:
    """Every option of a run (``run`` and the run options) under its config key, with local paths made absolute."""
    values = dict(run.as_options(), model=model, data=data, output=out)
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


_TRUE, _FALSE = ("true", "yes", "y", "on", "t", "1"), ("false", "no", "n", "off", "f", "0")


def coerce(name: str, value: Any, where: str) -> Any:
    """A config-file value converted to what the option's flag would give (None stays None);
    OptionError ``WHERE: KEY: ...`` when it cannot be."""
    spec = all_specs()[name]

    def bad(what: str):
        return OptionError(f"{where}: {spec.key}: {value!r} {what}"[:190])

    if value is None:
        return None
    kind = spec.kind
    if name == "push_to" and isinstance(value, bool):
        if value:
            raise OptionError(f"{where}: push_to_hub: true needs hub_model_id: REPO_ID")
        return None
    if kind == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad("is not a valid boolean")
    if kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise bad("is not a list of module names")
        return list(items)
    if isinstance(value, (dict, list, tuple)):
        raise bad(f"is not a valid {'integer' if kind == 'int' else 'float' if kind == 'float' else 'string'}")
    if kind == "int":
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise bad("is not a valid integer") from None
    if kind == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise bad("is not a valid float") from None
    value = str(value)
    if kind == "choice" and value not in spec.choices:
        raise bad(f"is not one of {', '.join(spec.choices)}")
    return value


def load_run(file: str | Path | None, given: dict[str, Any] | None = None, *, name: str | None = None,
             log=None) -> tuple[RunOptions, TrainConfig]:
    """The run options (MODEL, --data, --output, ...; None where unset) and the TrainConfig of a
    run: ``given`` (flags or keywords) over the config ``file`` (its run ``name`` in a file of
    named runs) over the defaults. A file value that a given option overrides is not looked at;
    null in the file means the default. ``log`` is told the file's keys that change nothing."""
    given = dict(given or {})
    values: dict[str, Any] = {}
    if file:
        for opt, raw in read_config(file, name, log).items():
            if opt in given:
                continue
            value = coerce(opt, raw, f"--config {file}")
            if value is not None:
                values[opt] = value
    values.update(given)
    run = RunOptions(**{opt: values.pop(opt, None) for opt in RUN_OPTIONS})
    return run, TrainConfig.of(None, values)


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a config file (run keys such as output_dir are read and left out), with
    ``overrides`` (train() keywords) over them: what ``qconvert train --config FILE`` runs with."""
    return load_run(path, overrides)[1]
