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

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .. import LAYOUT_VERSION, QUANTIZER_VERSION, __version__
from .._cpus import resolve_workers
from ..errors import DiskSpaceError, FormatError, OptionError, OutputExistsError, QuantizationError
from ..format.checkpoint import is_companion_file
from ..format.constants import BLOCKSIZES, FLOAT_DTYPE_NAMES, QUANT_TYPES
from .plan import Plan, make_plan, parse_size
from .writer import ShardWriter, header_bound, shard_digest

JOURNAL = "journal.json"
#: A companion file larger than this is not copied (the largest tokenizer.json seen is about 35 MB).
MAX_COMPANION_BYTES = 2**30
COMPUTE_DTYPES = tuple(sorted(FLOAT_DTYPE_NAMES))


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.qconvert-partial"


def check_output(out: Path, overwrite: bool, inputs: "list[str | os.PathLike | None]" = ()) -> None:
    """Refuse an output location that cannot be written, or whose writing would destroy something:

    - OUT overlapping an input (the same folder, inside it, or holding it): a run never writes
      inside its inputs, and --overwrite never replaces them (``inputs`` that are not local paths,
      such as Hub ids, are ignored);
    - OUT that is the current folder, holds it, or is the home folder or ``/`` (with --overwrite
      those would be deleted wholesale);
    - OUT that is a symbolic link (replacing it would swap the link, not write where it points), or
      whose nearest existing parent is a file or not writable;
    - a staging or trash folder beside OUT that is not a plain folder (it is emptied or deleted);
    - an existing, non-empty OUT (or a file there) without ``overwrite``.
    """
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise OptionError(f"{out}: the output is a symbolic link (to {os.readlink(out)})",
                          hint="name the folder it points to, or another folder")
    real = out.resolve()
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        src = Path(given).resolve()
        if real == src or src in real.parents or real in src.parents:
            how = "is" if real == src else "is inside" if src in real.parents else "holds"
            raise OptionError(f"{out}: the output {how} the input {given}", hint="write the output to a folder outside the inputs")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve():
        what = "the current folder" if real == cwd else "your home folder" if real == Path.home().resolve() else "a parent of the current folder"
        raise OptionError(f"{out}: the output is {what}", hint="write the output to a new folder, e.g. OUT/model-nf4")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{out}: cannot create the output under {parent}, which is a file", hint="choose a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{out}: {parent} is not writable", hint="choose a folder you can write to")
    for aside in (staging_dir(out), trash_dir(out)):
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            raise OptionError(f"{aside}: in the way of the output (not a plain folder)", hint="remove it, then re-run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty", hint="choose another folder or pass --overwrite")


def trash_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.qconvert-old"


def free_bytes(path: Path) -> int:
    """Free disk space where ``path`` (or its nearest existing parent) lives."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")


def quantize_checkpoint(
    source: str,
    output: str | os.PathLike,
    *,
    revision: str | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: list[str] | tuple[str, ...] = (),
    max_shard_size: str | int = "2GB",
    workers: int | str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    keep_source: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert ``source`` (folder or Hub id) into a 4-bit checkpoint at ``output``; returns a summary."""
    from ..hub.download import open_source

    say = log or (lambda m: None)
    out = Path(output)
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"unknown quant type {quant_type!r}", hint="use nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"block size {blocksize} is not supported", hint=f"use one of {', '.join(map(str, BLOCKSIZES))}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(f"compute dtype {compute_dtype!r} is not supported", hint=f"use one of {', '.join(COMPUTE_DTYPES)}")
    shard_limit = parse_size(max_shard_size)
    if not dry_run:
        check_output(out, overwrite, inputs=[source])
    workers = resolve_workers(workers)  # None, 0 or "auto": the CPUs available to this process
    stage = staging_dir(out)
    t0 = time.perf_counter()
    src = open_source(source, revision, stage / "source", keep=keep_source)
    plan = make_plan(src, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, skip_modules=list(skip_modules), max_shard_size=shard_limit)
    provenance = {
        "layout_version": LAYOUT_VERSION,
        "quantizer_version": QUANTIZER_VERSION,
        "version": __version__,
        "source": getattr(src, "repo_id", None) or Path(source).resolve().name,
        "source_revision": getattr(src, "sha", None),
    }
    settings = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "skip_modules": plan.skip_patterns,
        "user_skip_modules": sorted(skip_modules),
        "max_shard_size": shard_limit,
        "provenance": provenance,
    }
    plan.settings = settings
    if dry_run:
        return {"dry_run": True, "source": source, "output": str(out), **plan.summary()}
    need = sum(i.out_bytes for i in plan.items) + (0 if getattr(src, "repo_id", None) is None else max(i.out_bytes for i in plan.items))
    free = free_bytes(out.parent)
    if free < need * 1.05 + 16 * 2**20:
        raise DiskSpaceError(
            f"{out.parent}: {free / 1e9:.2f} GB free, the output needs about {need / 1e9:.2f} GB",
            hint="free some space or write the output elsewhere",
        )
    journal = _open_journal(stage, settings, plan)
    names = plan.shard_names()
    meta = {
        "format": "pt",
        "qconvert.layout_version": LAYOUT_VERSION,
        "qconvert.quantizer_version": QUANTIZER_VERSION,
        "qconvert.version": __version__,
        "qconvert.source": provenance["source"],
        "qconvert.source_revision": provenance["source_revision"] or "",
    }
    bar = _bar(plan.source_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    out_bytes = 0
    q_core = q_params = 0  # codes + scales bytes and element count of the quantized weights
    remaining_uses: dict[str, int] = {}
    pending = [s for s in range(len(plan.shards)) if not _shard_done(stage, journal, names[s])]
    for s in pending:
        for i in plan.shards[s]:
            remaining_uses[plan.items[i].source_file] = remaining_uses.get(plan.items[i].source_file, 0) + 1
    next_file = next_source_files(plan, pending)
    try:
        for s, idx in enumerate(plan.shards):
            name = names[s]
            if s not in pending:
                rec = journal["done"][name]
                weight_map.update({k: name for k in rec["keys"]})
                total_size += rec["data_bytes"]
                out_bytes += rec["file_bytes"]
                q_core += rec["q_core_bytes"]
                q_params += rec["q_params"]
                if bar:
                    bar.update(sum(plan.items[i].src_bytes for i in idx))
                say(f"kept {name} from the interrupted run (sha256 verified)")
                continue
            entries = []
            for i in idx:
                it = plan.items[i]
                # a quantized weight: its 6 entries (spec 4.1) under names at most 40 characters longer
                entries += [(it.out_key + "x" * 40, 2)] * 6 if it.quantize else [(it.out_key, len(it.shape))]
            writer = ShardWriter(stage / name, meta, reserve=header_bound(entries, meta))
            keys: list[str] = []
            shard_core = shard_params = 0
            try:
                for i in idx:
                    it = plan.items[i]
                    nxt = next_file[i]
                    if nxt:
                        src.prefetch(nxt)
                    t = _as_saved(src.get(it.source_key), it)
                    if it.quantize:
                        qt = _quantize(t, quant_type, blocksize, double_quant, it.source_key, workers)
                        shard_core += qt.core_nbytes
                        shard_params += qt.numel
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
            file_bytes = (stage / name).stat().st_size
            journal["done"][name] = {
                "sha256": digest, "file_bytes": file_bytes, "data_bytes": data_bytes, "keys": keys,
                "q_core_bytes": shard_core, "q_params": shard_params,
            }
            _write_json(stage / JOURNAL, journal)
            weight_map.update({k: name for k in keys})
            total_size += data_bytes
            out_bytes += file_bytes
            q_core += shard_core
            q_params += shard_params
    finally:
        if bar:
            bar.close()
        if hasattr(src, "cleanup"):
            src.cleanup()
    _write_config(src, stage, plan, settings)
    extra = _copy_extra_files(src, stage, log)
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
        "output_bytes": out_bytes,
        "shards": names,
        "copied_files": extra,
        "seconds": round(time.perf_counter() - t0, 3),
        **{k: v for k, v in settings.items() if k != "max_shard_size"},
    }
    summary["bits_per_param"] = 8 * q_core / q_params
    summary["quantized_params"] = q_params
    (stage / "README.md").write_text(_card(summary, plan), encoding="utf-8")
    if len(names) > 1:  # the index is the last file written
        _write_json(stage / "model.safetensors.index.json", {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    (stage / JOURNAL).unlink()
    shutil.rmtree(stage / "source", ignore_errors=True)
    _publish(stage, out)
    return summary


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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
                shutil.rmtree(p) if p.is_dir() else p.unlink()
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


def _write_config(src, stage: Path, plan: Plan, settings: dict) -> None:
    """The source's config.json plus quantization_config, dtype (the weights' source dtype, which
    transformers gives the tensors that stay unquantized) and qconvert's provenance."""
    config = src.config()
    if config is None:
        raise FormatError(f"{src.config_dir() / 'config.json'}: missing", hint="a checkpoint folder needs its config.json")
    config.pop("torch_dtype", None)  # the old name of dtype; transformers 5 writes dtype only
    config["dtype"] = plan.source_dtype
    config["quantization_config"] = bnb_quantization_config(settings)
    config["qconvert"] = settings["provenance"]
    _write_json(stage / "config.json", dict(sorted(config.items())))


def _copy_extra_files(src, stage: Path, say: Callable[[str], None] | None = None) -> list[str]:
    """Copy the source's companion files (tokenizer, chat template, generation and processor configs,
    licence, sentence-transformers module configs: ``format.checkpoint.COMPANION_FILES``) into the
    output; returns their names. Never copied: any other file (named in one notice line), and a
    companion that is not a regular file or that resolves outside the model folder, such as a link
    to a private key (a warning names each). Hugging Face cache snapshots link every file into the
    cache's ``blobs/`` folder: such a link is followed."""
    say = say or (lambda m: warnings.warn(m, stacklevel=3))
    copied: list[str] = []
    others: list[str] = []
    for rel, path in src.extra_files():
        if rel in ("config.json", "README.md"):
            continue
        if not is_companion_file(rel):
            others.append(rel + "/" if path.is_dir() else rel)
            continue
        why = _not_copyable(path, rel)
        if why:
            say(f"warning: {rel} not copied: {why}")
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        copied.append(rel)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        say(f"not copied (not a tokenizer, template, config or licence file): {shown}")
    return copied


def _not_copyable(path: Path, rel: str) -> str | None:
    """Why the companion file at ``path`` must not be copied, or None."""
    folder = path
    for _ in rel.split("/"):
        folder = folder.parent
    folder = folder.resolve()
    real = path.resolve()
    if not real.is_file():
        return "not a regular file"
    if real.stat().st_size > MAX_COMPANION_BYTES:
        return f"{real.stat().st_size / 1e9:.1f} GB is not the size of a tokenizer or config file"
    allowed = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        allowed.append(folder.parent.parent / "blobs")  # a Hugging Face cache snapshot
    if not any(a in real.parents for a in allowed):
        return "it is a link to a file outside the model folder"
    return None


def _card(summary: dict, plan: Plan) -> str:
    from ..hub.card import render_card

    prov = summary["provenance"]
    src = prov["source"]
    meta = {
        "base_model": src if "/" in (src or "") else None,
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "tags": ["qconvert", "4-bit", summary["quant_type"], "bitsandbytes", "qlora"],
    }
    gb = lambda b: f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"  # noqa: E731
    body = f"""# {Path(summary['output']).name}

A 4-bit {summary['quant_type'].upper()} quantization of `{src}`{f" (revision `{prov['source_revision']}`)" if prov['source_revision'] else ''}, written by
[qconvert](https://pypi.org/project/qconvert/) {prov['version']} in the bitsandbytes 4-bit layout.

| | |
|---|---|
| quant type | {summary['quant_type']} |
| block size | {summary['blocksize']} |
| double quantization | {'yes (8-bit absmax, nested block 256)' if summary['double_quant'] else 'no'} |
| compute dtype | {summary['compute_dtype']} |
| quantized tensors | {summary['quantized']} of {summary['tensors']} |
| bits per parameter (quantized weights) | {summary['bits_per_param']:.3f} |
| size before | {gb(summary['source_bytes'])} |
| size after | {gb(summary['output_bytes'])} |
| left unquantized | {', '.join(plan.skip_patterns) or 'none'} (and embeddings, norms, biases) |

## Loading

With transformers and bitsandbytes, no qconvert needed:

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("{Path(summary['output']).name}")
```

With qconvert's own kernels: `qconvert.load_model("{Path(summary['output']).name}")`.
"""
    return render_card(meta, body)


def _publish(stage: Path, out: Path) -> None:
    """Move the finished staging folder into place (replacing ``out`` only when asked to)."""
    if out.exists() or out.is_symlink():
        trash = trash_dir(out)
        _remove(trash)
        os.replace(out, trash)
        os.replace(stage, out)
        _remove(trash)
    else:
        os.replace(stage, out)


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or link (never what a link points to), if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
