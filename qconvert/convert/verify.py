"""`qconvert verify`: check a 4-bit checkpoint against the spec, and measure its quantization error."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import FormatError
from ..format.checkpoint import Checkpoint
from ..format.layout import companion_keys, find_quantized, is_4bit_config
from ..validate import read_config


def verify_checkpoint(path: str | os.PathLike, against: str | None = None) -> dict[str, Any]:
    """Raise FormatError at the first violation; return a report (with error figures for ``against``)."""
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    quantized = find_quantized(keys)
    if not quantized:
        raise FormatError(f"{path}: holds no 4-bit weight", hint="verify checks 4-bit checkpoints; run `qconvert quantize` first")
    owned: set[str] = set()
    for name in quantized:
        owned.update(companion_keys(name, keys))
        ckpt.quantized(name)  # validates
    structure = check_model_structure(ckpt)
    cfg = read_config(ckpt.root)
    qc = cfg.get("quantization_config")
    if quantized:
        if not is_4bit_config(qc):
            raise FormatError(f"{ckpt.root}/config.json: no bitsandbytes 4-bit quantization_config", hint="the checkpoint will not load as 4-bit")
        qs_types = {k.rsplit("__", 1)[1] for k in keys if ".quant_state.bitsandbytes__" in k}
        if qc.get("bnb_4bit_quant_type", "fp4") not in qs_types or len(qs_types) != 1:
            raise FormatError(f"{ckpt.root}/config.json: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type')!r} disagrees with the tensors ({sorted(qs_types)})")
    idx = ckpt.root / "model.safetensors.index.json"
    if idx.is_file():
        import json

        total = json.loads(idx.read_text()).get("metadata", {}).get("total_size")
        actual = sum(ckpt.nbytes(k) for k in keys)
        if total is not None and total != actual:
            raise FormatError(f"{idx}: metadata.total_size is {total}, the tensors hold {actual} bytes")
    report: dict[str, Any] = {
        "ok": True,
        "path": str(path),
        "files": ckpt.files,
        "quantized": len(quantized),
        "unquantized": len([k for k in keys if k not in owned]),
        "structure": structure,
    }
    if against:
        report["error"] = quantization_error(ckpt, quantized, owned, Checkpoint(against))
    return report


def check_model_structure(ckpt: Checkpoint) -> str:
    """The structural rule of verify: config.json builds (on the meta device) a model in which every
    4-bit weight is the weight of a Linear whose [out, in] equals its quant-state shape, and every
    other tensor that model knows has its shape and a usable dtype (qconvert.validate, lenient form:
    names transformers renames on load are not required). A config that needs remote code cannot
    be built here: then each quant-state shape must at least be 2-D. Returns what was checked."""
    from ..validate import check_structure, model_class, quant_shapes

    cfg = read_config(ckpt.root)
    if cfg.get("auto_map"):
        try:
            model_class(cfg, str(ckpt.root / "config.json"))
        except FormatError:
            bad = {n: s for n, s in quant_shapes(ckpt).items() if len(s) != 2}
            if bad:
                name, shape = next(iter(bad.items()))
                raise FormatError(f"{ckpt.root}: 4-bit weight {name!r} has quant-state shape {list(shape)}; a Linear weight is 2-D") from None
            return "not checked against config.json: the model needs remote code"
    model = check_structure(ckpt.root, ckpt, cfg, strict=False)
    return f"matches the {type(model).__name__} config.json builds"


def _match(name: str, src: Checkpoint) -> str | None:
    if name in src:
        return name
    for k in src.keys():
        if name.endswith("." + k) or k.endswith("." + name):
            return k
    return None


def quantization_error(ckpt: Checkpoint, quantized: list[str], owned: set[str], src: Checkpoint) -> dict[str, Any]:
    from ..quant.reference import dequantize_4bit_ref

    per: list[dict[str, Any]] = []
    for name in quantized:
        sk = _match(name, src)
        if sk is None:
            raise FormatError(f"{src.root}: has no tensor matching {name!r}", hint="--against must be the checkpoint this one was made from")
        qt = ckpt.quantized(name)
        w = src.get(sk).double()
        d = dequantize_4bit_ref(qt, torch.float32).double().reshape(w.shape)
        err = (w - d).pow(2).sum().item()
        sig = w.pow(2).sum().item()
        per.append({
            "name": name,
            "rel_error": math.sqrt(err / sig) if sig else 0.0,
            "sqnr_db": 10 * math.log10(sig / err) if err else float("inf"),
        })
    identical = True
    for k in ckpt.keys():
        if k in owned:
            continue
        sk = _match(k, src)
        if sk is None or not torch.equal(ckpt.get(k), src.get(sk)):
            identical = False
    worst = max(per, key=lambda p: p["rel_error"])
    finite = [p["sqnr_db"] for p in per if math.isfinite(p["sqnr_db"])]
    return {
        "tensors": per,
        "rel_error_mean": sum(p["rel_error"] for p in per) / len(per),
        "rel_error_max": worst["rel_error"],
        "worst_tensor": worst["name"],
        "sqnr_db_mean": sum(finite) / len(finite) if finite else float("inf"),
        "sqnr_db_min": min(finite) if finite else float("inf"),
        "unquantized_identical": identical,
    }
