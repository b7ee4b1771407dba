"""`qconvert merge`: a LoRA adapter folded into its 4-bit base, written as a standard checkpoint.

Each adapted weight becomes W = float32(dequant(W4)) + scaling * B @ A, computed in float32 and then
cast. dequant(W4) is the weight's normative value (spec section 8): the float32 product code * scale
rounded to the weight's logical dtype (bfloat16 for most LLMs), here widened exactly to float32. That
is the weight the model computed with during training (bitsandbytes' dequantize_4bit returns it), so
a float32 merge reproduces the unmerged model to float32 rounding. Other quantized weights are dequantized, and everything else is copied. The output has no
quantization_config. With ``quantize=True`` the merged weights are re-quantized to 4 bits instead,
and the cost is measured and reported: re-quantizing loses much of a LoRA update.

Streaming: the base is read one tensor at a time and output shards are written as they fill
(convert.writer). Everything goes to a staging folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..format.checkpoint import Checkpoint
from ..format.conformance import check_checkpoint
from ..format.layout import LOGICAL_DTYPES as DTYPES, is_4bit_config


class LoraAdapter:
    """A PEFT LoRA adapter folder: per-module A, B and scaling."""

    def __init__(self, folder: str | os.PathLike):
        from .adapter import read_adapter_config, read_lora_weights

        self.folder = Path(folder)
        cfg_path = self.folder / "adapter_config.json"
        self.config = cfg = read_adapter_config(self.folder)  # validated: see export/adapter.py
        for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
            if cfg.get(flag):
                raise FormatError(f"{cfg_path}: {what} is not supported by qconvert merge", hint="merge it with PEFT itself")
        self.weights = self.folder / "adapter_model.safetensors"
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = read_lora_weights(self.folder, cfg)

    @property
    def base_model_id(self) -> str | None:
        """base_model_name_or_path when it is a Hub repo id (a local path must not reach a card)."""
        from ..hub.download import REPO_ID

        base = self.config.get("base_model_name_or_path")
        return base if isinstance(base, str) and REPO_ID.match(base) and not os.path.exists(base) else None

    def check_base(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Each module's lora_B @ lora_A has its base weight's [out, in] shape."""
        from .adapter import check_against_base

        check_against_base(self.weights, self.modules, base_shapes)

    def _pattern(self, table: dict, module: str, default):
        from .adapter import module_value

        return module_value(table, module, default)

    def scaling(self, module: str) -> float:
        r = self._pattern(self.config.get("rank_pattern"), module, self.config["r"])
        alpha = self._pattern(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.modules[module]
        return self.scaling(module) * (b.float() @ a.float())


def _base_shapes(ckpt: Checkpoint, targets: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """[out, in] of each adapted base weight (a 4-bit one's from its quant state), by module name."""
    from ..validate import quant_shapes

    q = quant_shapes(ckpt)
    return {m: tuple(q[k]) if k in q else ckpt.info(k)[1] for k, m in targets.items()}


def merge_adapter(
    base: str,
    adapter: str,
    output: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    quantize: bool = False,
    max_shard_size: str | int = "2GB",
    base_original: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from .. import __version__
    from ..convert.plan import parse_size
    from ..convert.quantize import _copy_extra_files, _publish, check_output, staging_dir
    from ..convert.writer import ShardWriter
    from ..loader import resolve_model_path
    from ..quant.fast_cpu import quantize_4bit_fast
    from ..quant.reference import dequantize_4bit_ref

    say = log or (lambda m: None)
    out = Path(output)
    if dtype not in DTYPES:
        raise FormatError(f"unknown --dtype {dtype!r}", hint="use bfloat16, float16 or float32")
    check_output(out, overwrite, inputs=[base, adapter, base_original])
    root, repo_id = resolve_model_path(base, revision)
    check_output(out, overwrite, inputs=[root])  # a Hub base, now a local folder
    ckpt = Checkpoint(root, streaming=True)
    cfg = ckpt.config() or {}
    qc = cfg.get("quantization_config") or {}
    if not is_4bit_config(qc):
        raise FormatError(f"{root}: not a 4-bit checkpoint", hint="BASE must be the 4-bit checkpoint the adapter was trained on")
    from ..convert.meta import uses_conv1d

    if uses_conv1d(cfg):  # its 4-bit weights hold the transpose of what the 16-bit model stores
        raise FormatError(
            f"{root}: a model with GPT-2 style Conv1D layers ({cfg.get('model_type')}), which qconvert merge does not support",
            hint="merge it with PEFT on transformers + bitsandbytes",
        )
    lora = LoraAdapter(adapter)
    orig = Checkpoint(base_original, streaming=True) if base_original else None
    if orig is not None:
        warnings.warn("--base-original: merging into the original weights, but the adapter was trained against the dequantized 4-bit weights")
        say("warning: merging into the original full-precision weights; the adapter was trained against the dequantized 4-bit weights")
    keys = ckpt.keys()
    quantized = set(check_checkpoint(ckpt))
    owned = {k for q in quantized for k in ckpt.companions(q)}
    targets = {m + ".weight": m for m in lora.modules}
    missing = sorted(t for t in targets if t not in keys)
    if missing:
        raise FormatError(f"{adapter}: adapts {missing[0]!r}, which {root} does not have", hint="is this adapter for this base?")
    lora.check_base(_base_shapes(ckpt, targets))
    out_dtype = DTYPES[dtype]
    limit = parse_size(max_shard_size)
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    costs: list[dict[str, float]] = []
    weight_map: dict[str, str] = {}
    shard_files: list[str] = []
    writer = None
    size = total = 0
    g = torch.Generator().manual_seed(0)

    def emit(name: str, t: torch.Tensor) -> None:
        nonlocal writer, size, total
        if t.is_floating_point() and not torch.isfinite(t).all():  # nothing complete-looking gets written
            raise FormatError(f"{name}: the merged weight holds NaN or Inf as {dtype}",
                              hint="a value is out of the dtype's range (try --dtype float32) or an input is damaged; nothing was written")
        nb = t.numel() * t.element_size()
        if writer is None or (size and size + nb > limit):
            if writer is not None:
                writer.close()
            shard_files.append(f"part-{len(shard_files) + 1:05d}.safetensors")
            writer = ShardWriter(stage / shard_files[-1], {"format": "pt"})
            size = 0
        writer.add(name, t)
        weight_map[name] = shard_files[-1]
        size += nb
        total += nb

    try:
        for k in keys:
            if k in owned and k not in quantized:
                continue
            if k in quantized:
                qt = ckpt.quantized(k)  # re-quantizing keeps the base's quant type, block size and double quant
                qtype, bs, dq = qt.quant_type, qt.blocksize, qt.double_quant
                # the logical value widened (spec 8), not the float32 product before rounding
                w = orig.get(k).float() if orig is not None else dequantize_4bit_ref(qt, torch.float32)
            else:
                w = ckpt.get(k)
            if k in targets:
                delta = lora.delta(targets[k])
                if not torch.isfinite(delta).all():
                    raise FormatError(f"{adapter}: the LoRA update of {k!r} holds NaN or Inf",
                                      hint="the adapter is damaged (a diverged training run?); nothing was written")
                merged = w.float() + delta
                if quantize and k in quantized:
                    rq = quantize_4bit_fast(merged.to(out_dtype), qtype, bs, dq, name=k)
                    back = dequantize_4bit_ref(rq, torch.float32)
                    probe = torch.randn(64, merged.shape[1], generator=g)
                    ref = probe @ merged.T
                    costs.append({
                        "output_error": ((probe @ back.T - ref).norm() / ref.norm()).item(),
                        "adapter_change_lost": ((back - merged).norm() / delta.norm()).item() if delta.norm() > 0 else 0.0,
                    })
                    for name, t in rq.state_dict(k).items():
                        emit(name, t)
                    continue
                w = merged
            if k in quantized and quantize and orig is None:  # not adapted: keep the stored 4-bit bytes as they are
                for c in ckpt.companions(k):
                    emit(c, ckpt.get(c))
                continue
            if k in quantized and quantize:
                rq = quantize_4bit_fast(w.to(out_dtype), qtype, bs, dq, name=k)
                for name, t in rq.state_dict(k).items():
                    emit(name, t)
                continue
            emit(k, w.to(out_dtype) if w.is_floating_point() else w)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    n = len(shard_files)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for a, b in zip(shard_files, final):
        os.replace(stage / a, stage / b)
    rename = dict(zip(shard_files, final))
    _copy_extra_files(ckpt, stage, say)
    prov = cfg.get("qconvert") or {}
    source = prov.get("source") if "/" in str(prov.get("source") or "") else (repo_id or lora.base_model_id)
    new_cfg = dict(cfg)
    new_cfg.pop("qconvert", None)
    if not quantize:
        new_cfg.pop("quantization_config", None)
    new_cfg["dtype"] = dtype
    (stage / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
    summary = {
        "base": str(base), "adapter": str(adapter), "output": str(out), "dtype": dtype, "quantized": quantize,
        "merged_modules": len(targets), "shards": final, "bytes": total,
    }
    if costs:
        summary["requantization_cost"] = {
            "layers": len(costs),
            "output_error_mean": sum(c["output_error"] for c in costs) / len(costs),
            "output_error_max": max(c["output_error"] for c in costs),
            "adapter_change_lost_mean": sum(c["adapter_change_lost"] for c in costs) / len(costs),
        }
    from ..hub.card import render_card

    body = (
        f"# {out.name}\n\nThe LoRA adapter `{adapter}` merged into `{source or base}` by qconvert {__version__}: each adapted "
        f"weight is dequant(W4) + scaling * B @ A computed in float32, then {'re-quantized to 4 bits' if quantize else f'stored as {dtype}'}.\n"
    )
    if costs:
        c = summary["requantization_cost"]
        body += (f"\nRe-quantizing cost: relative output error {c['output_error_mean']:.4f} (mean over {c['layers']} merged layers) "
                 f"against the 16-bit merge; {c['adapter_change_lost_mean']:.0%} of the adapter's change lost.\n")
    meta = {"base_model": source, "base_model_relation": "quantized" if quantize else "merge", "library_name": "transformers",
            "tags": ["qconvert", "lora", "merge"]}
    (stage / "README.md").write_text(render_card(meta, body))
    if n > 1:
        (stage / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())}}, indent=2) + "\n")
    _publish(stage, out)
    return summary
