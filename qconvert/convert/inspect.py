"""`qconvert inspect`: what a checkpoint holds, tensor by tensor, without loading weights."""

from __future__ import annotations

import math
import os
from typing import Any

from ..io.checkpoint import Checkpoint
from ..format.layout import (CORE_SUFFIXES, QUANT_STATE_PREFIX, core_nbytes, dtype_name, entry_key, find_quantized, has_4bit_experts,
                            unpack_quant_state)


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A report of every logical tensor: name, shape, dtype, quant type, block size, double quant,
    stored bytes; plus totals and bits per parameter over the quantized tensors.

    ``bits_per_param`` counts codes and block scales (packed codes, absmax, nested absmax and the
    4-byte offset): 4.5 for blocksize 64 without double quantization, about 4.127 with it.
    ``bits_per_param_stored`` counts every stored byte of the quantized weights, including the
    per-tensor 16- and 256-entry tables and the quant-state JSON, which matter on small tensors.
    """
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    quantized = find_quantized(keys)
    owned: set[str] = set()
    tensors: list[dict[str, Any]] = []
    q_params = q_core_bytes = q_bytes = 0
    for name in quantized:
        comp = ckpt.companions(name)
        owned.update(comp)
        qs_key = next(k for k in comp if QUANT_STATE_PREFIX in k)
        qs = unpack_quant_state(ckpt.get(qs_key), f"{ckpt.file_of(qs_key)}: {qs_key}")
        stored = sum(ckpt.nbytes(k) for k in comp)
        numel = math.prod(qs["shape"])
        dq = "nested_offset" in qs
        core = core_nbytes({s: ckpt.nbytes(entry_key(name, s)) for s in CORE_SUFFIXES if s != "nested_absmax" or dq}, dq)
        q_params += numel
        q_core_bytes += core
        q_bytes += stored
        tensors.append(
            {
                "name": name,
                "shape": list(qs["shape"]),
                "dtype": qs["dtype"],
                "quant_type": qs["quant_type"],
                "blocksize": qs["blocksize"],
                "double_quant": "nested_offset" in qs,
                "bytes": stored,
                "file": ckpt.file_of(name),
            }
        )
    for name in keys:
        if name in owned:
            continue
        dt, shape = ckpt.info(name)
        tensors.append(
            {
                "name": name,
                "shape": list(shape),
                "dtype": dtype_name(dt),
                "quant_type": None,
                "blocksize": None,
                "double_quant": False,
                "bytes": ckpt.nbytes(name),
                "file": ckpt.file_of(name),
            }
        )
    tensors.sort(key=lambda t: t["name"])
    total = sum(t["bytes"] for t in tensors)
    params = sum(math.prod(t["shape"]) for t in tensors)
    cfg = ckpt.config() or {}
    qc = cfg.get("quantization_config")
    prov = cfg.get("qconvert") if isinstance(cfg.get("qconvert"), dict) else {}
    source_bytes = prov.get("source_bytes") if type(prov.get("source_bytes")) is int and prov.get("source_bytes") > 0 else None
    file_bytes = sum((ckpt.root / f).stat().st_size for f in ckpt.files)
    return {
        "path": str(path),
        "files": ckpt.files,
        "tensors": tensors,
        "num_tensors": len(tensors),
        "num_quantized": len(quantized),
        "total_bytes": total,
        "total_params": params,
        "quantized_params": q_params,
        "bits_per_param": (8 * q_core_bytes / q_params) if q_params else None,
        "bits_per_param_stored": (8 * q_bytes / q_params) if q_params else None,
        # every byte of the files over every parameter (the 16-bit embeddings, head and norms, the headers'
        # quant-state JSON included): the figure quantize's summary and the card give for "whole model"
        "bits_per_param_model": (8 * file_bytes / params) if params else None,
        "file_bytes": file_bytes,
        # output / source bytes, when config.json records the source's size (qconvert quantize does)
        "size_ratio": file_bytes / source_bytes if source_bytes else None,
        "experts_4bit": has_4bit_experts(qc),
        "experts_4bit_tensors": sum(1 for t in tensors if t["quant_type"] and ".experts." in t["name"]),
    }


def format_report(r: dict[str, Any]) -> str:
    """Human-readable table of an inspect report."""
    rows = [("tensor", "shape", "dtype", "quant", "block", "dq", "bytes")]
    for t in r["tensors"]:
        rows.append(
            (
                t["name"],
                "x".join(map(str, t["shape"])) or "scalar",
                t["dtype"],
                t["quant_type"] or "-",
                str(t["blocksize"] or "-"),
                "yes" if t["double_quant"] else "-",
                f"{t['bytes']:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 6 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bpp = r["bits_per_param"]
    lines.append("")
    lines.append(
        f"{r['num_tensors']} tensors ({r['num_quantized']} quantized) in {len(r['files'])} file(s); "
        f"{r['total_bytes']:,} bytes; {r['total_params']:,} parameters"
    )
    if bpp is not None:
        lines.append(
            f"quantized weights: {r['quantized_params']:,} parameters at {bpp:.3f} bits/param "
            f"({r['bits_per_param_stored']:.3f} counting per-tensor tables); whole model {r['bits_per_param_model']:.3f} bits/param"
        )
    if r["size_ratio"] is not None:
        lines.append(f"size: {r['size_ratio']:.3f} of the source checkpoint's tensor files")
    if r["experts_4bit"]:
        lines.append(f"routed experts in 4 bits (spec section 14): {r['experts_4bit_tensors']} tensor(s); loads with qconvert.load_model")
    return "\n".join(lines)


__all__ = ["inspect_checkpoint", "format_report"]
