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

# the adapter reader lives in qconvert.adapters (one layer down: load_model reads adapters too);
# these names stay importable from here
from ..adapters import (  # noqa: F401
    LORA_KEY, check_adapter_for_model, check_against_base, module_value, read_adapter_config, read_lora_weights,
)
from ..errors import FormatError, OptionError


def export_adapter(source: str | os.PathLike, output: str | os.PathLike, *, base_model: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    from ..io.cards import exported_adapter_card
    from ..io.staging import check_output, publish, staged, write_json
    from ..io.writes import write_file

    src, out = Path(source), Path(output)
    if not (src / "adapter_config.json").is_file():
        from ..train.loop import checkpoints

        ckpts = checkpoints(src)
        if not ckpts:
            raise FormatError(f"{src}: no adapter_config.json and no checkpoint-N folder", hint="pass a qconvert train output or checkpoint")
        src = ckpts[-1]
    from ..train.data import PROMPT_FORMAT_FILE, prompt_format, prompt_format_text, read_prompt_format

    cfg = read_adapter_config(src)
    weights = src / "adapter_model.safetensors"
    modules = read_lora_weights(src, cfg)
    check_output(out, overwrite, inputs=[source, src])
    if base_model is not None:
        from ..io.hub import REPO_ID

        if not REPO_ID.match(base_model) or os.path.exists(base_model):
            raise OptionError(f"--base-model {base_model!r} is not a Hub repo id (namespace/name)",
                              hint="name the base model as others will load it from the Hub")
        cfg["base_model_name_or_path"] = base_model
    with staged(out) as stage:
        shutil.copyfile(weights, stage / "adapter_model.safetensors")
        write_json(stage / "adapter_config.json", cfg, sort_keys=True)
        fmt = read_prompt_format(src) or read_prompt_format(source)  # a checkpoint's: its run's
        if fmt:  # written anew from the counts: only what train would write
            fmt = prompt_format(fmt["formats"])
            write_json(stage / PROMPT_FORMAT_FILE, fmt)
        write_file(stage / "README.md", exported_adapter_card(src, cfg) + (prompt_format_text(fmt) if fmt else ""))
        publish(stage, out)
    base = cfg.get("base_model_name_or_path")
    return {"source": str(src), "output": str(out), "tensors": 2 * len(modules), "base_model": base}
