"""`qconvert export-gguf --lora-only`: a PEFT LoRA adapter as a GGUF LoRA adapter, which llama.cpp
applies at run time to the base model's GGUF (``--lora FILE``; llama_cpp.Llama(lora_path=...)).

The conventions are llama.cpp's (its convert_lora_to_gguf.py and llama-adapter.cpp): general.type
"adapter", adapter.type "lora", adapter.lora.alpha; for each adapted base tensor ``T`` (its GGUF name)
two tensors ``T.lora_a`` ([r, in], PEFT's lora_A) and ``T.lora_b`` ([out, r], PEFT's lora_B), which
llama.cpp multiplies into ``scale * B @ (A @ x)`` with scale = alpha / r (r read from the tensors).
Where PEFT's scaling is not alpha / r for a module (rank_pattern, alpha_pattern, rsLoRA) the ratio is
folded into that module's lora_b, so llama.cpp's alpha / r times B gives PEFT's scaling times B.
lora_b of q_proj / k_proj gets the same per-head row permutation as the base weights (its rows are
the weight's rows). The tensors are written in float32: an adapter is small, and the base GGUF's type
is the user's choice. The base GGUF must come from the same base the adapter was trained on (for a
4-bit base: `qconvert export-gguf BASE`), since llama.cpp adds the update to whatever weights it has.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError
from .gguf import _gguf, _Planned, _Source, _stream, model_arch, rope_heads


def export_gguf_lora(model: str, adapter: str, out: Path, say) -> dict[str, Any]:
    """Write ``adapter`` (checked against ``model``, its base) to ``out`` as a GGUF LoRA adapter."""
    from ..io.writes import write_file

    src = _Source.open(model, adapter, say)
    if src.job.params is not None:
        raise OptionError(f"{adapter}: LoRA on parameters (target_parameters) has no GGUF adapter form", hint="export the merged model instead (drop --lora-only)")
    lora = src.job.lora
    alpha = float(lora.config.get("lora_alpha", lora.config["r"]))
    if not alpha > 0:  # llama.cpp reads alpha 0 as "no scaling"
        raise OptionError(f"{adapter}: lora_alpha {alpha} cannot be written as a GGUF adapter", hint="export the merged model instead (drop --lora-only)")
    plan = _plan(src)
    write_file(out, lambda f: _stream(src.arch, lambda gw, gguf: _metadata(gw, gguf, src, alpha), plan,
                                      lambda name: _tensor(src, alpha, name), f, say))
    return {"model": str(model), "adapter": adapter, "output": str(out), "type": "lora", "architecture": src.arch,
            "tensors": len(plan), "bytes": os.stat(out).st_size, "merged_modules": 0, "lora_alpha": alpha}


def _plan(src: _Source) -> list[_Planned]:
    from .gguf_families import split

    gguf = _gguf()
    cfg = src.cfg
    tmap = gguf.get_tensor_name_map(model_arch(gguf, src.arch), cfg["num_hidden_layers"])
    F32 = gguf.GGMLQuantizationType.F32
    plan = []
    for k, m in src.job.targets.items():
        base = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        if split(src.family, cfg, k, src.shape(k)):
            raise OptionError(f"{src.job.adapter}: adapts {k!r}, which llama.cpp reads split in two ({src.arch}): a LoRA pair cannot be "
                              "written for it", hint="export the merged model instead (drop --lora-only)")
        if base is None:
            raise OptionError(f"{src.job.adapter}: adapts {k!r}, which has no GGUF name for {src.arch}", hint="export the merged model instead (drop --lora-only)")
        a, b = src.job.lora.modules[m]
        perm = rope_heads(src, k)
        plan.append(_Planned(base + ".lora_a", m + "\0a", tuple(a.shape), F32))
        plan.append(_Planned(base + ".lora_b", m + "\0b", tuple(b.shape), F32, perm))
    return plan


def _tensor(src: _Source, alpha: float, source: str) -> torch.Tensor:
    """lora_A as it is; lora_B times PEFT's scaling over llama.cpp's alpha / r (1 for a plain LoRA)."""
    m, which = source.split("\0")
    a, b = src.job.lora.modules[m]
    if which == "a":
        return a.float()
    ratio = src.job.lora.scaling(m) * a.shape[0] / alpha
    return b.float() if ratio == 1.0 else b.float() * ratio


def _metadata(gw, gguf, src: _Source, alpha: float) -> None:
    gw.add_type(gguf.GGUFType.ADAPTER)
    gw.add_string(gguf.Keys.Adapter.TYPE, "lora")
    gw.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    gw.add_name(Path(src.job.adapter).name)
