"""`qconvert export-adapter`: a clean PEFT adapter folder from a training run or checkpoint.

A ``qconvert train`` checkpoint (OUTPUT/checkpoint-N) holds the adapter next to optimizer, scheduler
and RNG state. This writes only what PEFT needs to load the adapter, validated, plus a model card,
into a new folder, so it can be shared or pushed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import FormatError


def export_adapter(source: str | os.PathLike, output: str | os.PathLike, *, base_model: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    from safetensors import safe_open

    from ..convert.quantize import _publish, check_output, staging_dir
    from ..hub.card import render_card

    src, out = Path(source), Path(output)
    if not (src / "adapter_config.json").is_file():
        from ..train.loop import checkpoints

        ckpts = checkpoints(src)
        if not ckpts:
            raise FormatError(f"{src}: no adapter_config.json and no checkpoint-N folder", hint="pass a qconvert train output or checkpoint")
        src = ckpts[-1]
    cfg = json.loads((src / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise FormatError(f"{src}/adapter_config.json: peft_type {cfg.get('peft_type')!r} is not LORA")
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise FormatError(f"{src}: no adapter_model.safetensors")
    with safe_open(str(weights), "pt") as h:
        keys = list(h.keys())
    if not keys or not all(".lora_A." in k or ".lora_B." in k for k in keys):
        raise FormatError(f"{weights}: holds tensors that are not LoRA A/B weights")
    check_output(out, overwrite, inputs=[source, src])
    if base_model:
        cfg["base_model_name_or_path"] = base_model
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copyfile(weights, stage / "adapter_model.safetensors")
    (stage / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    base = cfg.get("base_model_name_or_path")
    body = (f"# LoRA adapter\n\nExported by qconvert from `{src}`: r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
            f"target modules {cfg.get('target_modules')}. Base model: `{base}`.\n")
    (stage / "README.md").write_text(render_card({"base_model": base, "base_model_relation": "adapter", "library_name": "peft",
                                                   "tags": ["qconvert", "lora"]}, body))
    _publish(stage, out)
    return {"source": str(src), "output": str(out), "tensors": len(keys), "base_model": base}
