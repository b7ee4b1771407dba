"""`qconvert verify`: check a 4-bit checkpoint against the spec; with ``--against SOURCE``, check that
every source tensor made it into the output (only the drops that `qconvert quantize` states may be
absent) in the dtype transformers would save it in, and measure the quantization error."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import FormatError
from ..io.checkpoint import Checkpoint
from ..format.conformance import check_checkpoint
from ..format.layout import dtype_name, is_4bit_config
from ..model.checks import read_config
from .sources import read_source, reading_view


def verify_checkpoint(path: str | os.PathLike, against: str | None = None) -> dict[str, Any]:
    """Raise FormatError at the first violation; return a report (with error figures for ``against``)."""
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    quantized = check_checkpoint(ckpt, strict=True)  # container, metadata, key-set and config rules (spec 9)
    if not quantized:
        raise FormatError(f"{path}: holds no 4-bit weight", hint="verify checks 4-bit checkpoints; run `qconvert quantize` first")
    owned: set[str] = set()
    for name in quantized:
        owned.update(ckpt.companions(name))
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
        from ..io.checkpoint import read_json_object

        total = (read_json_object(idx, "the index").get("metadata") or {}).get("total_size")  # an object: read_index checked it
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
        report["error"] = quantization_error(ckpt, quantized, owned, reading_view(Checkpoint(against)))  # FP8/MXFP4: dequantized
    return report


def check_model_structure(ckpt: Checkpoint) -> str:
    """The structural rule of verify: config.json builds (on the meta device) a model in which every
    4-bit weight is the weight of a Linear whose [out, in] equals its quant-state shape, and every
    other tensor that model knows has its shape and a usable dtype (qconvert.model.checks, lenient form:
    names transformers renames on load are not required). A config that needs remote code cannot
    be built here: then each quant-state shape must at least be 2-D. Returns what was checked."""
    from ..model.checks import check_structure, model_class, quant_shapes

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



def source_plan(ckpt: Checkpoint, src: Checkpoint):
    """The plan ``qconvert quantize`` makes for ``src`` with the skip list recorded in ``ckpt``: where
    each source tensor must be in the output, in which dtype, and which ones may be absent."""
    from .options import QuantizeOptions
    from .plan import make_plan

    from ..format.layout import find_quantized, has_4bit_experts

    qc = (ckpt.config() or {}).get("quantization_config") or {}
    skips = qc.get("llm_int8_skip_modules") or []
    quantized = find_quantized(ckpt.keys())
    blocksize = ckpt.quantized(quantized[0]).blocksize if quantized else 64  # decides which experts fit (spec 14.2)
    return make_plan(src, QuantizeOptions(skip_modules=skips, blocksize=blocksize, experts="4bit" if has_4bit_experts(qc) else "16bit"))


def check_against(ckpt: Checkpoint, quantized: list[str], src: Checkpoint):
    """Every source tensor is in the output (bar the plan's stated drops) in the dtype transformers
    would save it in; nothing in the output comes from elsewhere. Raises FormatError."""
    plan = source_plan(ckpt, src)
    qset = set(quantized)
    plain = set(ckpt.keys())
    for it in plan.items:
        if it.out_key in qset:
            got = ckpt.quantized(it.out_key).dtype
        elif it.out_key in plain:
            got = ckpt.info(it.out_key)[0]
        else:
            raise FormatError(
                f"{ckpt.root}: source tensor {it.source_key!r} of {src.root} is missing from the output (expected as {it.out_key!r})",
                hint="re-run qconvert quantize; only the drops its summary lists (tied copies, keys transformers ignores) may be absent",
            )
        if got != it.out_dtype:
            what = "quant-state dtype" if it.out_key in qset else "dtype"
            raise FormatError(
                f"{ckpt.root}: tensor {it.out_key!r} has {what} {dtype_name(got)}, transformers would save {dtype_name(it.out_dtype)}",
                hint="re-run qconvert quantize with this version",
            )
    expected = {it.out_key for it in plan.items}
    owned = {k for q in quantized for k in ckpt.companions(q)}
    extra = sorted(k for k in ckpt.keys() if k not in expected and k not in owned)
    if extra:
        raise FormatError(f"{ckpt.root}: tensor {extra[0]!r} is not made from any tensor of {src.root}", hint="--against must be the checkpoint this one was made from")
    return plan


def quantization_error(ckpt: Checkpoint, quantized: list[str], owned: set[str], src: Checkpoint) -> dict[str, Any]:
    """Checks the output against its source (check_against), then measures each quantized weight's
    relative error and SQNR against the original, and whether the other tensors are the source's
    values in the dtype transformers saves them in."""
    from ..ops import dequantize_4bit  # dispatched: on CPU the fast dequantizer, the reference's bits
    from ..ops.args import weight_args

    plan = check_against(ckpt, quantized, src)
    qset = set(quantized)
    per: list[dict[str, Any]] = []
    identical = True
    for it in plan.items:
        w = read_source(src, it.source_key, it.out_dtype)
        if it.transpose:
            w = w.T
        if it.out_key not in qset:
            identical = identical and same_values(ckpt.get(it.out_key), w.to(it.out_dtype))
            continue
        w = w.double()
        # the normative value (spec 8): rounded to the logical dtype, then widened
        d = dequantize_4bit(*weight_args(ckpt.quantized(it.out_key)), torch.float32).double().reshape(w.shape)
        err = (w - d).pow(2).sum().item()
        sig = w.pow(2).sum().item()
        per.append({
            "name": it.out_key,
            "rel_error": math.sqrt(err / sig) if sig else 0.0,
            "sqnr_db": 10 * math.log10(sig / err) if err else float("inf"),
        })
    if not per:
        raise FormatError(f"{ckpt.root}: none of its 4-bit tensors is quantized from {src.root}", hint="--against must be the checkpoint this one was made from")
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
        "dropped": [{"tensor": k, "reason": r} for k, r in plan.dropped.items()],
    }


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, NaN equal to NaN (torch.equal says a tensor holding NaN differs from itself,
    so a NaN copied byte for byte made ``unquantized tensors identical`` False)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return torch.allclose(a.float(), b.float(), rtol=0, atol=0, equal_nan=True)
