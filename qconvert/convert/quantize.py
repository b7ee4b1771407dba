"""`qconvert quantize`: stream a Hugging Face checkpoint into the 4-bit format.

One source shard is open at a time and one tensor is in memory at a time; output shards are written
as they fill (see writer.py). Everything goes to a staging folder beside the output,
``.<name>.qconvert-partial``, with a journal of the finished output shards and their sha256. A run
that stops for any reason, kill -9 included, is resumed by running the same command: finished shards
are checked against the journal and kept, the rest are redone, and the result is byte-identical to an
uninterrupted run. The output folder appears only at the very end, by one rename; the index (for
sharded output) is the last file written into the staging folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import LAYOUT_VERSION, QUANTIZER_VERSION, __version__
from .._cpus import resolve_workers
from ..errors import DiskSpaceError, FormatError, OptionError
from ..names import BLOCKSIZES, FLOAT_DTYPE_NAMES, QUANT_TYPES
from ..io.cards import checked_base_model, quantized_card
from ..io.reader import CheckpointReader, cleanup
from ..io.shards import ShardWriter, header_bound, shard_digest, write_index

from ..io.staging import check_output, free_bytes, output_lock, staging_dir
from ..io.staging import copy_companions as _copy_extra_files
from ..io.staging import publish as _publish
from ..io.writes import remove as _remove
from ..io.staging import write_json as _write_json
from ..io.writes import write_file
from .options import QuantizeOptions
from .plan import Plan, make_plan, parse_size
from .sources import read_source, reading_view

JOURNAL = "journal.json"
COMPUTE_DTYPES = tuple(sorted(FLOAT_DTYPE_NAMES))


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")


@dataclass
class _Totals:
    """What the finished shards add up to (from the journal for kept ones, as written for new ones)."""

    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0  # tensor data bytes, for the index
    out_bytes: int = 0  # file bytes
    q_core: int = 0  # codes + scales bytes of the quantized weights
    q_params: int = 0  # their element count

    def add(self, name: str, rec: dict[str, Any]) -> None:
        self.weight_map.update({k: name for k in rec["keys"]})
        self.total_size += rec["data_bytes"]
        self.out_bytes += rec["file_bytes"]
        self.q_core += rec["q_core_bytes"]
        self.q_params += rec["q_params"]


def quantize_checkpoint(
    source: str,
    output: str | os.PathLike,
    options: QuantizeOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Convert ``source`` (folder or Hub id) into a 4-bit checkpoint at ``output``; returns a summary.
    The run's settings are ``options`` (a :class:`qconvert.convert.options.QuantizeOptions`; default:
    its defaults) with ``keywords`` over it, the same names as keywords (``blocksize=128``).
    ``experts``: "4bit" (default) also quantizes routed MoE experts (spec section 14; such a folder
    loads in qconvert, and plain transformers refuses it); "16bit" keeps them as transformers +
    bitsandbytes does, byte-identical to its output. ``base_model``: the Hub id the card names as
    base_model when ``source`` is a local folder."""
    from ..io.source import open_checkpoint

    o = QuantizeOptions.of(options, keywords)
    say = log or (lambda m: None)
    out = Path(output)
    _check_options(o.quant_type, o.blocksize, o.compute_dtype)
    checked_base_model(o.base_model)
    shard_limit = parse_size(o.max_shard_size)
    with contextlib.ExitStack() as hold:
        if not o.dry_run:
            check_output(out, o.overwrite, inputs=[source])
            hold.enter_context(output_lock(out))  # one run at a time writes OUT (and its staging folder)
            check_output(out, o.overwrite, inputs=[source])  # again: another run may have finished meanwhile
        workers = resolve_workers(o.workers)  # None, 0 or "auto": the CPUs available to this process
        stage = staging_dir(out)
        t0 = time.perf_counter()
        src = reading_view(open_checkpoint(source, o.revision, stage / "source", keep=o.keep_source))  # FP8/MXFP4: dequantized
        plan = make_plan(src, o)
        settings = _settings(src, source, plan, o, shard_limit)
        plan.settings = settings
        if o.dry_run:
            return {"dry_run": True, "source": source, "output": str(out), **plan.summary()}
        _check_space(src, plan, out)
        journal = _open_journal(stage, settings, plan)
        try:
            totals = _write_shards(src, plan, stage, journal, settings, workers, say)
        finally:
            cleanup(src)
        _write_config(src, stage, plan, settings)
        copied = _copy_extra_files(src, stage, log)
        summary = _summary(source, out, plan, settings, totals, copied, t0)
        _finish(stage, out, plan, totals, summary, o.base_model)
    return summary


def _check_options(quant_type: str, blocksize: int, compute_dtype: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise OptionError(f"unknown quant type {quant_type!r}", hint="use nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise OptionError(f"block size {blocksize} is not supported", hint=f"use one of {', '.join(map(str, BLOCKSIZES))}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise OptionError(f"compute dtype {compute_dtype!r} is not supported", hint=f"use one of {', '.join(COMPUTE_DTYPES)}")


def _settings(src: CheckpointReader, source: str, plan: Plan, o: QuantizeOptions, max_shard_size: int) -> dict[str, Any]:
    """The conversion's settings and provenance (written to config.json, hashed into the journal)."""
    provenance = {
        "layout_version": LAYOUT_VERSION,
        "quantizer_version": QUANTIZER_VERSION,
        "version": __version__,
        "source": getattr(src, "repo_id", None) or Path(source).resolve().name,
        "source_revision": getattr(src, "sha", None),
        "source_bytes": plan.source_bytes,  # so that inspect can give the output/source size ratio
    }
    experts_4bit = any(i.expert and i.quantize for i in plan.items)
    if experts_4bit:
        from ..format.layout import EXPERTS_EXTENSION

        provenance["layout_extensions"] = [EXPERTS_EXTENSION]
    return {
        "quant_type": o.quant_type,
        "blocksize": o.blocksize,
        "double_quant": o.double_quant,
        "compute_dtype": o.compute_dtype,
        "skip_modules": plan.skip_patterns,
        "user_skip_modules": sorted(o.skip_modules),
        "max_shard_size": max_shard_size,
        "experts_4bit": experts_4bit,
        "provenance": provenance,
    }


def _check_space(src: CheckpointReader, plan: Plan, out: Path) -> None:
    """The output (and, for a Hub source, its largest shard being downloaded) must fit on the disk."""
    need = sum(i.out_bytes for i in plan.items) + (0 if getattr(src, "repo_id", None) is None else max(i.out_bytes for i in plan.items))
    free = free_bytes(out.parent)
    if free < need * 1.05 + 16 * 2**20:
        raise DiskSpaceError(
            f"{out.parent}: {free / 1e9:.2f} GB free, the output needs about {need / 1e9:.2f} GB",
            hint="free some space or write the output elsewhere",
        )


def _shard_metadata(provenance: dict[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` of every output shard."""
    return {
        "format": "pt",
        "qconvert.layout_version": LAYOUT_VERSION,
        "qconvert.quantizer_version": QUANTIZER_VERSION,
        "qconvert.version": __version__,
        "qconvert.source": provenance["source"],
        "qconvert.source_revision": provenance["source_revision"] or "",
    }


def _write_shards(src: CheckpointReader, plan: Plan, stage: Path, journal: dict, settings: dict, workers: int,
                  say: Callable[[str], None]) -> _Totals:
    """Every output shard into ``stage``: the journal's finished ones kept, the others written, each
    recorded in the journal as it is finished."""
    names = plan.shard_names()
    meta = _shard_metadata(settings["provenance"])
    totals = _Totals()
    pending = [s for s in range(len(plan.shards)) if not _shard_done(stage, journal, names[s])]
    remaining_uses: dict[str, int] = {}  # items left to read from each source file
    for s in pending:
        for i in plan.shards[s]:
            remaining_uses[plan.items[i].source_file] = remaining_uses.get(plan.items[i].source_file, 0) + 1
    next_file = next_source_files(plan, pending)
    bar = _bar(plan.source_bytes)
    try:
        for s, idx in enumerate(plan.shards):
            name = names[s]
            if s not in pending:
                totals.add(name, journal["done"][name])
                if bar:
                    bar.update(sum(plan.items[i].src_bytes for i in idx))
                say(f"kept {name} from the interrupted run (sha256 verified)")
                continue
            rec = _write_shard(src, plan, idx, stage / name, meta, settings, workers, next_file, remaining_uses, bar)
            journal["done"][name] = rec
            _write_json(stage / JOURNAL, journal)
            totals.add(name, rec)
    finally:
        if bar:
            bar.close()
    return totals


def _write_shard(src: CheckpointReader, plan: Plan, idx: list[int], path: Path, meta: dict[str, str], settings: dict,
                 workers: int, next_file: dict[int, str | None], remaining_uses: dict[str, int], bar) -> dict[str, Any]:
    """One output shard: its items read, quantized where the plan says so, and written; returns its
    journal record."""
    entries = []
    for i in idx:
        it = plan.items[i]
        # a quantized weight: its 6 entries (spec 4.1) under names at most 40 characters longer
        entries += [(it.out_key + "x" * 40, 2)] * 6 if it.quantize else [(it.out_key, len(it.shape))]
    writer = ShardWriter(path, meta, reserve=header_bound(entries, meta))
    keys: list[str] = []
    core = params = 0
    try:
        for i in idx:
            it = plan.items[i]
            if next_file[i]:
                src.prefetch(next_file[i])
            t = _as_saved(read_source(src, it.source_key, it.out_dtype), it)
            if it.quantize:
                qt = _quantize(t, settings["quant_type"], settings["blocksize"], settings["double_quant"], it.source_key, workers)
                core += qt.core_nbytes
                params += qt.numel
                for k, v in qt.state_dict(it.out_key).items():
                    writer.add(k, v)
                    keys.append(k)
            else:
                writer.add(it.out_key, t)
                keys.append(it.out_key)
            del t
            _maybe_die(i)
            remaining_uses[it.source_file] -= 1
            if remaining_uses[it.source_file] == 0:
                src.release(it.source_file)
            if bar:
                bar.update(it.src_bytes)
        data_bytes, digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"sha256": digest, "file_bytes": path.stat().st_size, "data_bytes": data_bytes, "keys": keys,
            "q_core_bytes": core, "q_params": params}


def _summary(source: str, out: Path, plan: Plan, settings: dict, totals: _Totals, copied: list[str], t0: float) -> dict[str, Any]:
    plan_summary = plan.summary()
    summary = {
        "source": source,
        "output": str(out),
        "architecture": plan.architecture,
        "tensors": len(plan.items),
        "quantized": sum(i.quantize for i in plan.items),
        "dropped": plan_summary["dropped"],
        "cast": plan_summary["cast"],
        "source_bytes": plan.source_bytes,
        "output_bytes": totals.out_bytes,
        "shards": plan.shard_names(),
        "copied_files": copied,
        "seconds": round(time.perf_counter() - t0, 3),
        **{k: v for k, v in settings.items() if k != "max_shard_size"},
        "source_scheme": plan.source_scheme,
    }
    summary.update(size_figures(totals.q_core, totals.q_params, totals.out_bytes, sum(math.prod(i.shape) for i in plan.items), plan.source_bytes))
    summary["experts"] = plan_summary["experts"]
    return summary


def size_figures(q_core: int, q_params: int, out_bytes: int, params: int, source_bytes: int) -> dict[str, Any]:
    """The honest size figures (issue 20): bits per parameter over the 4-bit weights alone (codes and
    block scales, spec section 3.6) and over the whole model (every output byte over every parameter,
    the 16-bit embeddings, head, norms and any 16-bit experts included), and output / source bytes."""
    return {
        "bits_per_param": 8 * q_core / q_params if q_params else None,
        "quantized_params": q_params,
        "params": params,
        "bits_per_param_model": 8 * out_bytes / params if params else None,
        "size_ratio": out_bytes / source_bytes if source_bytes else None,
    }


def _finish(stage: Path, out: Path, plan: Plan, totals: _Totals, summary: dict[str, Any], base_model: str | None = None) -> None:
    """The card and (sharded) the index into ``stage``, the journal and downloads out, then publish."""
    write_file(stage / "README.md", quantized_card(summary, plan.skip_patterns, stage, base_model))
    if len(plan.shards) > 1:  # the index is the last file written
        write_index(stage, totals.weight_map, totals.total_size)
    _remove(stage / JOURNAL)
    _remove(stage / "source")
    _publish(stage, out)


# ---------------------------------------------------------------------------------------------
def next_source_files(plan: Plan, pending: list[int]) -> dict[int, str | None]:
    """For each item of the pending shards, the first source file after it (in processing order)
    that is not its own: the one to prefetch. One backward pass; looking ahead from every item
    instead was quadratic in the number of tensors (hours for a checkpoint of 100,000 tensors)."""
    out: dict[int, str | None] = {}
    after_file = after_other = None
    for i in reversed([i for s in pending for i in plan.shards[s]]):
        f = plan.items[i].source_file
        out[i] = after_file if after_file != f else after_other
        after_file, after_other = f, out[i]
    return out


def _as_saved(t: torch.Tensor, it) -> torch.Tensor:
    """The tensor as transformers holds it before quantizing or saving: a Conv1D weight transposed
    to [out, in] (contiguous, so the codes follow the transposed order), cast to the plan's dtype."""
    if it.transpose:
        t = t.T.contiguous()
    return t.to(it.out_dtype) if t.dtype != it.out_dtype else t


def _quantize(t: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, name: str, workers: int):
    from .. import ops
    from ..quant.fast_cpu import torch_threads

    # Through the quantize op, on the host: its CPU kernel is the fast quantizer, bit-identical to the
    # reference. There is no GPU quantize kernel (the op's CUDA kernel is that same CPU path), so the
    # tensor is not moved to a GPU; register one in qconvert.ops and move it here. t is usually a view
    # of a memory-mapped shard: copying it first faults its pages in with one sequential read; the
    # quantizer's threads faulting them chunk by chunk measured 1.8x slower. One torch thread for the
    # copy: on a busy machine two measured 5x slower.
    with torch_threads(1):
        t = t.clone()
    return ops.quantize(t, quant_type, blocksize, double_quant, name, workers=workers)


def _maybe_die(i: int) -> None:
    """Test hook: QCONVERT_TEST_KILL_AFTER=N makes the process SIGKILL itself after N tensors."""
    n = os.environ.get("QCONVERT_TEST_KILL_AFTER")
    if n is not None and i + 1 >= int(n):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _bar(total: int):
    if not progress_enabled():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="quantize", dynamic_ncols=True)


def _settings_hash(settings: dict, plan: Plan) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in plan.items:
        h.update(f"{it.source_key}|{it.out_key}|{it.dtype}|{it.shape}|{it.quantize}|{it.out_dtype}|{it.transpose}\n".encode())
    h.update(json.dumps(plan.shards).encode())
    return h.hexdigest()


def _open_journal(stage: Path, settings: dict, plan: Plan) -> dict:
    key = _settings_hash(settings, plan)
    path = stage / JOURNAL
    if path.is_file():
        try:
            j = json.loads(path.read_text())
            if _journal_ok(j, key, plan):
                return j
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            pass
    if stage.exists():  # another run's leftovers, with other settings: start over
        keep_src = stage / "source"
        for p in stage.iterdir():
            if p != keep_src:
                _remove(p)  # a link: the link itself
    stage.mkdir(parents=True, exist_ok=True)
    j = {"settings_hash": key, "done": {}}
    _write_json(path, j)
    return j


JOURNAL_FIELDS = {"sha256": str, "file_bytes": int, "data_bytes": int, "keys": list, "q_core_bytes": int, "q_params": int}


def _journal_ok(j: Any, key: str, plan: Plan) -> bool:
    """A journal is trusted only in the exact shape this module writes, for these settings, naming
    only this plan's shards (a damaged or edited one means starting over)."""
    if not isinstance(j, dict) or j.get("settings_hash") != key or not isinstance(j.get("done"), dict):
        return False
    names = set(plan.shard_names())
    for name, rec in j["done"].items():
        if name not in names or not isinstance(rec, dict):
            return False
        if any(type(rec.get(f)) is not t for f, t in JOURNAL_FIELDS.items()):
            return False
        if not all(isinstance(k, str) for k in rec["keys"]):
            return False
    return True


def _shard_done(stage: Path, journal: dict, name: str) -> bool:
    rec = journal["done"].get(name)
    p = stage / name
    if not rec or not p.is_file() or p.stat().st_size != rec["file_bytes"]:
        return False
    if shard_digest(p) != rec["sha256"] or _header_keys(p) != set(rec["keys"]):
        del journal["done"][name]
        return False
    return True


def _header_keys(path: Path) -> set[str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as h:
            return set(h.keys())
    except Exception:
        return None


def bnb_quantization_config(settings: dict) -> dict[str, Any]:
    """``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for these settings, written out here so
    that a conversion never imports transformers (tests compare the two)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": settings["compute_dtype"],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": settings["quant_type"],
        "bnb_4bit_use_double_quant": settings["double_quant"],
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        # transformers replaces its default skips with this list when it is set, so a user's list is
        # written together with the defaults; without one, null, as transformers itself writes
        "llm_int8_skip_modules": settings["skip_modules"] if settings["user_skip_modules"] else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantization_config(settings: dict) -> dict[str, Any]:
    """config.json's ``quantization_config``: the bitsandbytes one, or, when routed experts are 4-bit,
    the same fields under ``quant_method: qconvert`` without the ``load_in_*`` flags (spec 14.4):
    transformers picks bitsandbytes whenever ``load_in_4bit`` is set, and bitsandbytes cannot hold a
    4-bit expert, so such a folder must not claim to be a bitsandbytes checkpoint."""
    from ..format.layout import EXPERTS_QUANT_METHOD

    qc = bnb_quantization_config(settings)
    if not settings.get("experts_4bit"):
        return qc
    qc = {k: v for k, v in qc.items() if "load_in_" not in k}
    return dict(sorted({**qc, "quant_method": EXPERTS_QUANT_METHOD, "experts_4bit": True}.items()))


def _write_config(src, stage: Path, plan: Plan, settings: dict) -> None:
    """The source's config.json plus quantization_config, dtype (the weights' source dtype, which
    transformers gives the tensors that stay unquantized) and qconvert's provenance."""
    config = src.config()
    if config is None:
        raise FormatError(f"{src.config_dir() / 'config.json'}: missing", hint="a checkpoint folder needs its config.json")
    config.pop("torch_dtype", None)  # the old name of dtype; transformers 5 writes dtype only
    config["dtype"] = plan.source_dtype
    config["quantization_config"] = quantization_config(settings)
    config["qconvert"] = settings["provenance"]
    _write_json(stage / "config.json", dict(sorted(config.items())))
