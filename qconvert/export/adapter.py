"""`qconvert export-adapter`: a clean PEFT adapter folder from a training run or checkpoint.

A ``qconvert train`` checkpoint (OUTPUT/checkpoint-N) holds the adapter next to optimizer, scheduler
and RNG state. This writes only what PEFT needs to load the adapter, validated, plus a model card,
into a new folder, so it can be shared or pushed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..model.adapters import read_adapter_config, read_lora_weights


def export_adapter(source: str | os.PathLike, output: str | os.PathLike, *, base_model: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    from ..io.cards import checked_base_model, exported_adapter_card
    from ..io.staging import check_output, publish, staged, write_json
    from ..io.writes import write_file

    from ..io.source import resolve_adapter_path

    src, out = resolve_adapter_path(source)[0], Path(output)  # a folder, or an adapter's Hub id (its two files fetched)
    if not (src / "adapter_config.json").is_file():
        from ..training.outdir import run_checkpoints

        ckpts = run_checkpoints(src)  # the run's own (its manifest), never another tool's checkpoint-N
        if not ckpts:
            raise FormatError(f"{src}: no adapter_config.json and no checkpoint-N folder", hint="pass a qconvert train output or checkpoint")
        src = ckpts[-1]
    from ..training.data import PROMPT_FORMAT_FILE, prompt_format, prompt_format_text, read_prompt_format

    cfg = read_adapter_config(src)
    weights = src / "adapter_model.safetensors"
    modules = read_lora_weights(src, cfg)
    check_output(out, overwrite, inputs=[source, src])
    if checked_base_model(base_model) is not None:
        cfg["base_model_name_or_path"] = base_model
    with staged(out) as stage:
        with open(weights, "rb") as f:  # copied through the one writer (a unique temporary name, fsync, a rename)
            write_file(stage / "adapter_model.safetensors", lambda out_file: shutil.copyfileobj(f, out_file))
        write_json(stage / "adapter_config.json", cfg, sort_keys=True)
        fmt = read_prompt_format(src) or read_prompt_format(source)  # a checkpoint's: its run's
        if fmt:  # written anew from the counts: only what train would write
            fmt = prompt_format(fmt["formats"])
            write_json(stage / PROMPT_FORMAT_FILE, fmt)
        card = exported_adapter_card(src, cfg, out.name, _trained_format(src))
        write_file(stage / "README.md", card + (prompt_format_text(fmt) if fmt else ""))
        publish(stage, out)
    base = cfg.get("base_model_name_or_path")
    return {"source": str(src), "output": str(out), "tensors": 2 * len(modules), "base_model": base}


def _trained_format(src: Path) -> str | None:
    """The data format the run trained on: config.yaml's data_format, or with auto the format the
    run's own card names (train writes the format it detected there); None when neither says.
    Read from ``src`` and, for a checkpoint-N that a train run's manifest lists, from that run's
    folder; never from the folder around a plain adapter (another tool's config.yaml there named
    a format the adapter was not trained on, and the card said so). Read within bounds (io.readers)."""
    import re

    from ..errors import OptionError
    from ..io.readers import MAX_RUN_CONFIG_BYTES, read_limited, read_yaml
    from ..training.data import FORMATS
    from ..training.outdir import read_manifest

    try:
        run = src.parent if src.name in (read_manifest(src.parent) or []) else None
    except (OSError, ValueError):
        run = None
    for folder in (src, run) if run is not None else (src,):  # a train output, or one of its checkpoint-N folders
        try:
            fmt = (read_yaml(folder / "config.yaml", "a run config", OptionError, limit=MAX_RUN_CONFIG_BYTES) or {}).get("data_format")
            card = read_limited(folder / "README.md", 1 << 20, "a card", OptionError).decode("utf-8") if fmt == "auto" else ""
        except (OptionError, UnicodeDecodeError, AttributeError):
            continue
        m = re.search(r"^Prompt format: (\w+)", card, re.M)
        fmt = m.group(1) if m else fmt
        if fmt in FORMATS and fmt != "auto":
            return fmt
    return None
