"""`qconvert merge`: a LoRA adapter folded into its 4-bit base, written as a standard checkpoint.

The values are qconvert.export.lora_merge's (W = float32(dequant(W4)) + scaling * B @ A, then cast;
a Conv1D weight back as [in, out], so transformers loads the output as it loads the original; with
``quantize=True`` re-quantized to 4 bits and the cost reported). The output has no
quantization_config.

Streaming: the base is read one tensor at a time and output shards are written as they fill
(qconvert.io.shards). Everything goes to a staging folder that is renamed into place at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import FormatError, OptionError
from ..format.layout import LOGICAL_DTYPES as DTYPES
from ..format.layout import is_4bit_config
from ..io.cards import checked_base_model, merged_card
from ..io.checkpoint import Checkpoint
from ..io.shards import SizeShards
from ..io.source import resolve_model_path
from .lora_merge import Inputs, LoraAdapter, Merge, all_finite, output_tensors, prepare, read_inputs


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
    base_model: str | None = None,
    log: Callable[[str], None] | None = None,
    check: bool = False,
    check_tolerance: float | None = None,
) -> dict[str, Any]:
    """Merge ``adapter`` into the 4-bit ``base`` (module docstring); ``base_model``: the Hub id the
    card names when qconvert cannot tell it from the base (--base-model). ``check``: compare the
    merge against the unmerged model before publishing it (:func:`_publish_checked`)."""
    from ..convert.plan import parse_size
    from ..io.staging import check_output, copy_companions, publish, staged
    from ..io.writes import write_file

    say = log or (lambda m: None)
    out = Path(output)
    if dtype not in DTYPES:
        raise OptionError(f"unknown --dtype {dtype!r}", hint="use bfloat16, float16 or float32")
    checked_base_model(base_model)
    check_output(out, overwrite, inputs=[base, adapter, base_original])
    if check:
        check_output(unverified_dir(out), overwrite, inputs=[base, adapter, base_original])
    root, repo_id = resolve_model_path(base, revision)
    check_output(out, overwrite, inputs=[root])  # a Hub base, now a local folder
    ckpt, cfg = _open_base(root)
    if check:  # its float32 merged model: refused now rather than after the merge
        from .check import check_fits

        check_fits(root, "merge", ckpt=ckpt)
    job = prepare(ckpt, root, adapter, base_original, quantize, dtype, say)
    limit = parse_size(max_shard_size)
    with staged(out) as stage:
        shards = _write_merged(job, stage, limit)
        copy_companions(ckpt, stage, say)
        _write_merged_config(cfg, stage, quantize, dtype)
        summary = _summary(base, adapter, out, job, shards)
        source = base_model or _card_source(cfg, repo_id, job.lora)
        write_file(stage / "README.md", merged_card(summary, source, __version__, stage))
        shards.write_index()
        if check:
            _publish_checked(stage, out, root, adapter, _check_mode(quantize, base_original, dtype), check_tolerance, summary)
        else:
            publish(stage, out)
    return summary


def unverified_dir(out: Path) -> Path:
    """Where a merge that failed its check is kept: beside OUT, never at OUT."""
    return out.parent / f"{out.name}.unverified"


def _check_mode(quantize: bool, base_original: str | None, dtype: str) -> str:
    """What the check's default bound is chosen by (check.TOLERANCE): a plain merge's output dtype."""
    return "quantize" if quantize else "base_original" if base_original else dtype


def _publish_checked(stage: Path, out: Path, root: Path, adapter: str, mode: str, tolerance: float | None, summary: dict[str, Any]) -> None:
    """Compare the staged merge with the unmerged model (qconvert.export.check) and publish it at OUT
    when it passes. When it fails, OUT is left as it was (nothing there looks verified) and the merge
    goes to OUT.unverified with CHECK_FAILED.json beside its weights, for inspection."""
    from ..io.staging import publish, write_json
    from .check import check_merge

    summary["check"] = verdict = check_merge(root, adapter, stage, mode, tolerance)
    if verdict["passed"]:
        publish(stage, out)
        return
    dest = unverified_dir(out)
    write_json(stage / "CHECK_FAILED.json", {"output": str(out), **verdict})
    publish(stage, dest)
    summary["output"] = str(dest)


def _open_base(root: Path) -> tuple[Checkpoint, dict[str, Any]]:
    """The 4-bit base checkpoint and its config; refused when it is not 4-bit."""
    ckpt = Checkpoint(root, streaming=True)
    cfg = ckpt.config() or {}
    qc = cfg.get("quantization_config") or {}
    if not is_4bit_config(qc):
        raise FormatError(f"{root}: not a 4-bit checkpoint",
                          hint=f"BASE must be the 4-bit checkpoint the adapter was trained on; for an adapter trained on this 16-bit "
                               f"model, run `qconvert quantize {root} DIR` (the copy train made on the way in) and merge into DIR")
    return ckpt, cfg


#: merge overlaps reading, computing and writing (export/overlap.py); False: one step after another
#: (the reference the tests compare the overlapped output with, byte for byte)
OVERLAP = True


def _write_merged(job: Merge, stage: Path, limit: int) -> SizeShards:
    """Every output tensor, in the base's order, into shards of at most ``limit`` bytes; the next
    tensor read and the previous one written while this one is merged (export/overlap.py)."""
    from .overlap import run_overlapped, run_sequential

    def finite(name: str, t: torch.Tensor) -> None:  # nothing complete-looking gets written
        if t.is_floating_point() and not all_finite(t):
            raise FormatError(f"{name}: the merged weight holds NaN or Inf as {job.dtype}",
                              hint="a value is out of the dtype's range (try --dtype float32) or an input is damaged; nothing was written")

    def compute(k: str, inputs: Inputs | None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in output_tensors(job, k, inputs):
            finite(name, t)  # in the computing thread: refused in the sequential order
            yield name, t

    keys = [k for k in job.ckpt.keys() if not (k in job.owned and k not in job.quantized)]
    shards = SizeShards(stage, limit, {"format": "pt"}, plan=_plan(job, keys))
    job.ckpt.quant_storage()  # read once here, not by two threads at once
    try:
        (run_overlapped if OVERLAP else run_sequential)(keys, lambda k: read_inputs(job, k), compute, lambda nt: shards.add(*nt))
        shards.finish()
    except BaseException:
        shards.abort()
        raise
    return shards


def _plan(job: Merge, keys: list[str]) -> list[tuple[str, torch.dtype, tuple[int, ...]]] | None:
    """The output tensors (name, dtype, shape), in order, as :func:`output_tensors` makes them: SizeShards
    reserves each header at its exact size and writes the data once. None where a key's outputs are
    not one tensor of a known shape (re-quantizing, LoRA on parameters); a wrong entry costs a copy."""
    if job.quantize or job.params is not None:
        return None
    from ..model.checks import quant_shapes

    logical = quant_shapes(job.ckpt)
    plan = []
    for k in keys:
        if k in job.quantized:  # a Conv1D weight goes back to [in, out]
            shape = tuple(logical[k])
            plan.append((k, job.out_dtype, shape[::-1] if k in job.conv1d and len(shape) == 2 else shape))
        else:
            dtype, shape = job.ckpt.info(k)
            plan.append((k, job.out_dtype if dtype.is_floating_point else dtype, tuple(shape)))
    return plan


def _write_merged_config(cfg: dict[str, Any], stage: Path, quantize: bool, dtype: str) -> None:
    """The base's config.json without qconvert's provenance, and without quantization_config unless re-quantized."""
    from ..io.staging import write_json

    new_cfg = dict(cfg)
    new_cfg.pop("qconvert", None)
    if not quantize:
        new_cfg.pop("quantization_config", None)
    elif isinstance(new_cfg.get("quantization_config"), dict):  # re-quantized codes are written as uint8
        new_cfg["quantization_config"] = {**new_cfg["quantization_config"], "bnb_4bit_quant_storage": "uint8"}
    new_cfg["dtype"] = dtype
    write_json(stage / "config.json", new_cfg, sort_keys=True)


def _card_source(cfg: dict[str, Any], repo_id: str | None, lora: LoraAdapter) -> str | None:
    """The Hub id the card names as base_model: the 4-bit base's own source, else its Hub id, else the adapter's."""
    prov = cfg.get("qconvert") or {}
    return prov.get("source") if "/" in str(prov.get("source") or "") else (repo_id or lora.base_model_id)


def _summary(base: str, adapter: str, out: Path, job: Merge, shards: SizeShards) -> dict[str, Any]:
    summary = {
        "base": str(base), "adapter": str(adapter), "output": str(out), "dtype": job.dtype, "quantized": job.quantize,
        "merged_modules": len(job.targets), "merged_parameters": len(job.params.loras) if job.params else 0,
        "shards": shards.files, "bytes": shards.total,
    }
    costs = job.costs
    if costs:
        summary["requantization_cost"] = {
            "layers": len(costs),
            "output_error_mean": sum(c["output_error"] for c in costs) / len(costs),
            "output_error_max": max(c["output_error"] for c in costs),
            "adapter_change_lost_mean": sum(c["adapter_change_lost"] for c in costs) / len(costs),
        }
    return summary
