"""FSDP checkpoints without pickle: safetensors shards and a JSON manifest that any number of processes reads.

torch.distributed.checkpoint, which wrote these checkpoints before, unpickles its ``.metadata`` and
every non-tensor record of its ``.distcp`` files (torch's loader with its weights-only guard turned
off): a crafted checkpoint ran code on ``train --fsdp --resume``. So
qconvert writes its own format into ``checkpoint-N/sharded/`` and never calls that reader:

- ``shards-rank{r}-of-{W}.safetensors``: process r's rows of every sharded tensor (the LoRA weights
  and their optimizer moments, FSDP2 DTensors sharded along dim 0), under ``model/<name>`` and
  ``optim/<name>/<key>``; process 0's file also holds the small replicated tensors (``step``).
- ``manifest.json``: the format and its version, W, each tensor's global shape, dtype and each
  rank's (offset, rows) along dim 0, the optimizer's param groups (numbers, booleans, strings,
  lists of them) with their parameters by name, and which state each parameter has.

Reading (every process, whatever W): the manifest (at most :data:`MAX_MANIFEST` bytes and
:data:`MAX_VALUES` values, counted before it is parsed) is checked
field by field, then against the model (the same trainable tensors, shapes and dtypes; the same
optimizer groups and setting types), and every shard file's size and header against the manifest,
before any tensor data is read; each process then reads only the byte ranges of its own new rows
(``safe_open`` + ``get_slice``). Anything that does not fit is a DataError naming the file and the
tensor, raised alike on every process. A folder in the former format (``.metadata``, ``*.distcp``)
is refused without being opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

FORMAT = "qconvert-fsdp-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
#: The manifest's bounds, checked before it is parsed: its bytes, and its ``,``, ``:``, ``[`` and ``{``
#: (at least one for each JSON value), which bound the memory parsing takes (measured: 4 million
#: integers, empty objects or 36-character strings took at most 210 MiB more and 6 s on a loaded CPU;
#: 64 MiB of ``{},`` unbounded took 1.5 GiB and 16 s). A real one: some 4 + 4 x N values
#: per sharded tensor over N processes: a Llama-70B LoRA of every linear layer (4,480 tensors) over 64
#: processes is about 1.2 million values in 10 MB.
MAX_MANIFEST = 32 * 2**20
MAX_VALUES = 4_000_000
#: The largest safetensors header read (safetensors' own limit is 100 MB)
MAX_HEADER = 100 * 10**6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
              "uint8": "U8", "int8": "I8", "bool": "BOOL"}
_SCALARS = (bool, int, float, str, type(None))
_DAMAGED = "the checkpoint is damaged or was not written by qconvert; resume from an earlier checkpoint-N"


def shard_name(rank: int, world: int) -> str:
    return f"shards-rank{rank}-of-{world}.safetensors"


def rows_of(n: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, rows) of ``rank``'s part of ``n`` rows split as FSDP2 (torch.chunk) splits dim 0:
    ceil(n / world) rows each, the last ranks fewer or none."""
    per = math.ceil(n / world) if n else 0
    lo = min(rank * per, n)
    return lo, min(lo + per, n) - lo


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise RuntimeError(f"FSDP checkpoint: tensors of dtype {name} are not supported")
    return name


# ---------------------------------------------------------------- writing


def _sharded_local(t: torch.Tensor, world: int, rank: int) -> torch.Tensor | None:
    """This process's rows of a DTensor sharded along dim 0 (None for a plain tensor), checked to be
    the rows :func:`rows_of` says it holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return None
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise RuntimeError(f"FSDP checkpoint: a tensor placed as {t.placements} (only dim-0 shards over one mesh dimension)")
    local = t.to_local()
    if local.shape[0] != rows_of(t.shape[0], world, rank)[1] or tuple(local.shape[1:]) != tuple(t.shape[1:]):
        raise RuntimeError(f"FSDP checkpoint: rank {rank}'s shard {tuple(local.shape)} of {tuple(t.shape)} is not torch.chunk's")
    return local


class _Writer:
    """Collects one process's tensors and the manifest entries that describe them."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        local = _sharded_local(t, self.world, self.rank)
        entry = {"shape": list(t.shape), "dtype": _dtype_name(t)}
        if local is None:  # replicated: process 0 writes it whole
            entry["whole"] = True
            if self.rank == 0:
                self.tensors[key] = t.cpu().contiguous().clone()
        else:
            entry["shards"] = [[r, *rows_of(t.shape[0], self.world, r)] for r in range(self.world) if rows_of(t.shape[0], self.world, r)[1]]
            if local.shape[0]:
                self.tensors[key] = local.cpu().contiguous().clone()
        self.entries[key] = entry


def _value(v: Any, where: str) -> Any:
    """A setting or state value as JSON: a number, boolean, string, None, or a list of those."""
    if isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS) for x in v):
        return list(v)
    if isinstance(v, _SCALARS) and not (isinstance(v, float) and not math.isfinite(v)):
        return v
    raise RuntimeError(f"FSDP checkpoint: {where} is a {type(v).__name__}, which the manifest cannot hold")


def param_names(model, optimizer) -> list[list[str]]:
    """The names of each optimizer group's parameters, in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise RuntimeError("FSDP checkpoint: the optimizer holds a parameter that is not the model's") from None


def _optimizer(w: _Writer, model, optimizer) -> dict:
    """The optimizer's manifest table (its tensors go to ``w``): each group's settings and parameters
    by name, and each parameter's state, a tensor named in the manifest or a plain value."""
    groups = param_names(model, optimizer)
    sd = optimizer.state_dict()
    state: dict[str, dict] = {}
    for i, name in enumerate(n for g in groups for n in g):
        entry = {}
        for key, v in (sd["state"].get(i) or {}).items():
            if isinstance(v, torch.Tensor):
                w.add(f"optim/{name}/{key}", v)
                entry[key] = {"tensor": f"optim/{name}/{key}"}
            else:
                entry[key] = {"value": _value(v, f"optimizer state {key!r} of {name}")}
        if entry:
            state[name] = entry
    settings = [{k: _value(v, f"optimizer setting {k!r}") for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"groups": [{"settings": s, "params": g} for s, g in zip(settings, groups)], "state": state}


def save(model, optimizer, folder: Path, rank: int, world: int) -> None:
    """Write this process's shard file, and (process 0) the manifest, into ``folder``."""
    from safetensors.torch import save

    from ..io.writes import write_file

    w = _Writer(rank, world)
    for name, p in model.named_parameters():
        if p.requires_grad:
            w.add(f"model/{name}", p)
    opt = _optimizer(w, model, optimizer)
    # through the one writer: a unique temporary name, fsync, a rename that replaces (never follows) a planted link
    write_file(folder / shard_name(rank, world), save(w.tensors, metadata={"format": FORMAT, "rank": str(rank), "world": str(world)}))
    if rank == 0:
        manifest = {"format": FORMAT, "version": VERSION, "world": world, "tensors": w.entries, "optimizer": opt}
        write_file(folder / MANIFEST, json.dumps(manifest, separators=(",", ":"), allow_nan=False))


# ---------------------------------------------------------------- reading: the manifest


def refuse_old_format(folder: Path) -> None:
    """A ``sharded/`` folder written by torch.distributed.checkpoint (qconvert before this format):
    refused without opening anything in it, since reading it would unpickle its contents."""
    if (folder / MANIFEST).exists() or not ((folder / ".metadata").exists() or any(folder.glob("*.distcp"))):
        return
    raise DataError(f"{folder}: an FSDP checkpoint in torch.distributed.checkpoint's format (an earlier qconvert wrote it), "
                    "which qconvert no longer reads: loading it unpickles its files",
                    hint="start the run again with --overwrite (or another --output); the checkpoint's "
                         "adapter_model.safetensors is a complete adapter if you only need the weights")


def _bad(where: Path, what: str) -> DataError:
    return DataError(f"{where}: {what}", hint=_DAMAGED)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest holds")


def _regular_size(path: Path, missing: str) -> int:
    """The size of ``path``, a regular file (a FIFO or a device would block or never end a read)."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _bad(path, missing) from None
    _require(stat.S_ISREG(st.st_mode), path, "not a regular file")
    return st.st_size


def read_manifest(folder: Path) -> dict:
    """The manifest, its size checked before it is read and every field's type after."""
    path = folder / MANIFEST
    size = _regular_size(path, "missing (the checkpoint is incomplete)")
    if size > MAX_MANIFEST:
        raise _bad(path, f"{size:,} bytes, more than a manifest holds ({MAX_MANIFEST:,})")
    with open(path, "rb") as f:
        text = f.read(MAX_MANIFEST + 1)
    values = sum(text.count(c) for c in (b",", b":", b"[", b"{"))
    if values > MAX_VALUES:
        raise _bad(path, f"{values:,} JSON separators and brackets, more than a manifest holds ({MAX_VALUES:,})")
    try:
        m = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(path, f"not a manifest ({type(e).__name__}: {str(e)[:80]})") from None
    _check_manifest(m, path)
    return m


def _require(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise _bad(path, what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_manifest(m: Any, path: Path) -> None:
    _require(isinstance(m, dict) and m.get("format") == FORMAT, path, f"not a {FORMAT} manifest")
    _require(m.get("version") == VERSION, path, f"format version {m.get('version')!r}; this qconvert reads {VERSION}")
    world = m.get("world")
    _require(_is_int(world) and 1 <= world <= 65536, path, f"world {world!r} is not a process count")
    tensors = m.get("tensors")
    _require(isinstance(tensors, dict), path, "no tensors table")
    for key, e in tensors.items():
        _check_entry(key, e, world, path)
    _check_optimizer_table(m.get("optimizer"), tensors, path)


def _check_optimizer_table(opt: Any, tensors: dict, path: Path) -> None:
    """Groups of settings (numbers, strings, lists of them) and parameter names; per parameter,
    state entries that each name a tensor of the manifest or hold a number."""
    _require(isinstance(opt, dict) and isinstance(opt.get("groups"), list) and isinstance(opt.get("state"), dict), path,
             "no optimizer table")
    for g in opt["groups"]:
        _require(isinstance(g, dict) and isinstance(g.get("settings"), dict) and isinstance(g.get("params"), list)
                 and all(isinstance(n, str) for n in g["params"]), path, "an optimizer group is not settings and parameter names")
        for k, v in g["settings"].items():
            _require(isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)), path,
                     f"optimizer setting {k!r} is not a number, string or list of them")
    for name, st in opt["state"].items():
        _require(isinstance(st, dict), path, f"optimizer state of {name} is not a table")
        for k, v in st.items():
            ok = isinstance(v, dict) and len(v) == 1 and ((isinstance(v.get("tensor"), str) and v["tensor"] in tensors) or "value" in v)
            _require(ok, path, f"optimizer state {k!r} of {name} names no tensor of the manifest and holds no value")
            if "value" in v:
                _require(isinstance(v["value"], _SCALARS), path, f"optimizer state {k!r} of {name} is not a number")


def _check_entry(key: str, e: Any, world: int, path: Path) -> None:
    """One tensor's entry: a shape, a dtype, and either ``whole`` or dim-0 shards that tile its rows."""
    _require(isinstance(e, dict) and isinstance(e.get("shape"), list) and all(_is_int(d) and 0 <= d < 2**40 for d in e["shape"])
             and len(e["shape"]) <= 8, path, f"tensor {key}: no valid shape")
    _require(e.get("dtype") in DTYPES, path, f"tensor {key}: dtype {e.get('dtype')!r} is not one a checkpoint holds")
    if e.get("whole") is True and "shards" not in e:
        return
    shards = e.get("shards")
    _require(isinstance(shards, list) and len(e["shape"]) >= 1, path, f"tensor {key}: neither whole nor sharded along dim 0")
    at = 0
    for s in shards:
        _require(isinstance(s, list) and len(s) == 3 and all(_is_int(x) for x in s) and 0 <= s[0] < world and s[1] == at and s[2] > 0,
                 path, f"tensor {key}: shard {s!r} does not follow the previous one (rank < {world}, offset {at}, rows > 0)")
        at += s[2]
    _require(at == e["shape"][0], path, f"tensor {key}: its shards cover {at} of {e['shape'][0]} rows")
    ranks = [s[0] for s in shards]
    _require(len(set(ranks)) == len(ranks), path, f"tensor {key}: a rank holds two shards")


# ---------------------------------------------------------------- reading: against the model


def _param_entry(key: str, e: dict, p: torch.Tensor, path: Path) -> None:
    want = {"shape": list(p.shape), "dtype": _dtype_name(p)}
    got = {"shape": e["shape"], "dtype": e["dtype"]}
    _require(got == want, path, f"tensor {key}: shape {got['shape']} {got['dtype']}, this model's is {want['shape']} {want['dtype']}")


def check_against(m: dict, model, optimizer, path: Path) -> dict[str, torch.Tensor]:
    """The manifest describes this model's trainable tensors and this optimizer: the same names,
    shapes and dtypes, the same groups of parameters, the same settings of the same types; a state
    tensor no larger than its parameter. Returns the trainable parameters by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = m["tensors"]
    saved = {k.removeprefix("model/") for k in tensors if k.startswith("model/")}
    for n in sorted(set(params) ^ saved):
        where = "this model has it, the checkpoint does not" if n in params else "the checkpoint has it, this model does not"
        raise _bad(path, f"tensor model/{n}: {where}")
    for n, p in params.items():
        _param_entry(f"model/{n}", tensors[f"model/{n}"], p, path)
    groups = m["optimizer"]["groups"]
    names = param_names(model, optimizer)
    _require(len(groups) == len(names), path, f"{len(groups)} optimizer groups, this optimizer has {len(names)}")
    for g, (saved_g, now, mine) in enumerate(zip(groups, names, optimizer.param_groups)):
        _require(saved_g["params"] == now, path, f"optimizer group {g}: other parameters than this run's")
        _check_settings(saved_g["settings"], mine, g, path)
    used = {f"model/{n}" for n in params}
    for n, st in m["optimizer"]["state"].items():
        _require(n in params, path, f"optimizer state of {n}, which is not a trainable tensor of this model")
        for k, v in st.items():
            _check_state(k, v, tensors, n, params[n], path)
            used.add(v.get("tensor"))
    for key in sorted(set(tensors) - used):
        raise _bad(path, f"tensor {key}: neither a trainable tensor of this model nor optimizer state")
    return params


def _check_state(key: str, v: dict, tensors: dict, name: str, p: torch.Tensor, path: Path) -> None:
    """AdamW's state, as every optimizer qconvert trains with shows it: ``step`` a number or a 0-dim
    tensor; any other entry (the moments) a floating tensor of the parameter's shape."""
    what = f"optimizer state {key!r} of {name}"
    if "value" in v:
        _require(key == "step" and isinstance(v["value"], (int, float)) and not isinstance(v["value"], bool), path, f"{what} is not a step count")
        return
    e = tensors[v["tensor"]]
    if key == "step":
        _require(e["shape"] == [] and e["dtype"] in ("float32", "float64", "int64"), path, f"tensor {v['tensor']}: not a step count")
        return
    _require(e["shape"] == list(p.shape) and DTYPES[e["dtype"]].is_floating_point, path,
             f"tensor {v['tensor']}: shape {e['shape']} {e['dtype']} does not fit its parameter's {list(p.shape)}")


def _check_settings(saved: dict, group: dict, g: int, path: Path) -> None:
    mine = {k: v for k, v in group.items() if k != "params"}
    for k in sorted(set(saved) ^ set(mine)):
        raise _bad(path, f"optimizer group {g}: setting {k!r} {'missing' if k in mine else 'unknown to this optimizer'}")
    for k, v in saved.items():
        now = mine[k]
        same = type(v) is type(now) or (isinstance(now, float) and _is_int(v)) or (isinstance(now, tuple) and isinstance(v, list))
        if isinstance(now, (list, tuple)):
            same = same and isinstance(v, list) and len(v) == len(now)
        _require(same, path, f"optimizer group {g}: setting {k!r} is {v!r}, a {type(v).__name__} where this optimizer has a {type(now).__name__}")


def setting(v: Any, now: Any) -> Any:
    """A saved setting in the type this optimizer keeps it in (betas: a tuple; lr: a float)."""
    if isinstance(now, tuple):
        return tuple(v)
    if isinstance(now, float):
        return float(v)
    return v


# ---------------------------------------------------------------- reading: the shard files


def _nbytes(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()


def expected_files(m: dict) -> list[dict[str, tuple[list[int], str]]]:
    """For each writing rank, the tensors its file holds: {key: (shape of its part, dtype)}."""
    files: list[dict[str, tuple[list[int], str]]] = [{} for _ in range(m["world"])]
    for key, e in m["tensors"].items():
        if e.get("whole"):
            files[0][key] = (e["shape"], e["dtype"])
        else:
            for r, _, rows in e["shards"]:
                files[r][key] = ([rows, *e["shape"][1:]], e["dtype"])
    return files


def open_shards(folder: Path, m: dict) -> list:
    """Every rank's shard file, opened after its size was checked against the manifest (8 bytes,
    the header, then exactly the bytes of the tensors the manifest gives it) and its header's
    tensors compared with the manifest's. Every process checks every file, so a damaged one is
    refused alike everywhere; each then reads only its own rows."""
    from safetensors import safe_open

    handles = []
    for r, want in enumerate(expected_files(m)):
        path = folder / shard_name(r, m["world"])
        data = sum(_nbytes(shape, dtype) for shape, dtype in want.values())
        size = _regular_size(path, f"missing (the manifest lists {len(want)} tensors in it)")
        with open(path, "rb") as f:
            head = int.from_bytes(f.read(8), "little")
        _require(head <= MAX_HEADER and size == 8 + head + data, path,
                 f"{size:,} bytes where the manifest's tensors take {data:,} bytes after a header ({head:,} bytes)")
        try:
            h = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
            raise _bad(path, f"not a safetensors file ({type(e).__name__}: {str(e)[:80]})") from None
        for key in sorted(set(h.keys()) ^ set(want)):
            raise _bad(path, f"tensor {key}: {'missing' if key in want else 'not in the manifest'}")
        for key, (shape, dtype) in want.items():
            s = h.get_slice(key)
            got = (list(s.get_shape()), s.get_dtype())
            _require(got == (shape, _ST_DTYPES[dtype]), path, f"tensor {key}: {got[0]} {got[1]}, the manifest says {shape} {_ST_DTYPES[dtype]}")
        handles.append(h)
    return handles


def read_rows(handles: list, m: dict, key: str, lo: int, rows: int) -> torch.Tensor:
    """Rows [lo, lo + rows) of tensor ``key`` (the whole tensor when it is stored whole), read from
    whichever files hold them, and only those byte ranges."""
    e = m["tensors"][key]
    if e.get("whole"):
        return handles[0].get_tensor(key)
    parts = []
    for r, off, n in e["shards"]:
        a, b = max(lo, off), min(lo + rows, off + n)
        if a < b:
            parts.append(handles[r].get_slice(key)[a - off:b - off])
    if not parts:
        return torch.empty([0, *e["shape"][1:]], dtype=DTYPES[e["dtype"]])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------- reading: into this run


def _mine(handles: list, m: dict, key: str, like: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """This process's part of ``key``, shaped and placed like ``like`` (a DTensor's rows, or whole)."""
    from torch.distributed.tensor import DTensor

    e = m["tensors"][key]
    if isinstance(like, DTensor):
        _sharded_local(like, world, rank)  # the rows this process holds are torch.chunk's
        lo, n = rows_of(like.shape[0], world, rank)
        if e.get("whole"):
            return handles[0].get_tensor(key)[lo:lo + n]
        return read_rows(handles, m, key, lo, n)
    return read_rows(handles, m, key, 0, e["shape"][0] if e["shape"] else 0)


def check(model, optimizer, folder: Path) -> tuple[dict, dict, list]:
    """Everything about ``folder`` that can be checked before a tensor is read: the format, the
    manifest, the manifest against this model and optimizer, every shard file's size and header.
    Returns (manifest, the trainable parameters by name, the opened shard files)."""
    refuse_old_format(folder)
    m = read_manifest(folder)
    params = check_against(m, model, optimizer, folder / MANIFEST)
    return m, params, open_shards(folder, m)


def apply(checked: tuple[dict, dict, list], optimizer, rank: int, world: int) -> None:
    """Read this process's rows into its parameters and build the optimizer's state (after :func:`check`)."""
    from torch.distributed.tensor import DTensor

    m, params, handles = checked
    with torch.no_grad():
        for n, p in params.items():
            target = p.to_local() if isinstance(p, DTensor) else p
            target.copy_(_mine(handles, m, f"model/{n}", p, world, rank).to(target.device))
    optimizer.load_state_dict(_optimizer_state(handles, m, params, optimizer, world, rank))


def load(model, optimizer, folder: Path, rank: int, world: int) -> None:
    """Read ``folder`` (written by any number of processes) into this process's shards and optimizer."""
    apply(check(model, optimizer, folder), optimizer, rank, world)


def _optimizer_state(handles: list, m: dict, params: dict, optimizer, world: int, rank: int) -> dict:
    """The optimizer's state_dict as its load_state_dict takes it: parameters by position, moments
    placed like their parameter (DTensors over the same mesh), settings in this optimizer's types."""
    from torch.distributed.tensor import DTensor

    state, groups, i = {}, [], 0
    for saved, mine in zip(m["optimizer"]["groups"], optimizer.param_groups):
        ids = []
        for n in saved["params"]:
            p = params[n]
            entry = {}
            for k, v in m["optimizer"]["state"].get(n, {}).items():
                if "value" in v:
                    entry[k] = v["value"]
                    continue
                if not m["tensors"][v["tensor"]]["shape"]:  # step: a 0-dim tensor, whole
                    entry[k] = read_rows(handles, m, v["tensor"], 0, 0)
                else:
                    local = _mine(handles, m, v["tensor"], p, world, rank).to(p.device if not isinstance(p, DTensor) else p.to_local().device)
                    entry[k] = (DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
                                if isinstance(p, DTensor) else local)
            if entry:
                state[i] = entry
            ids.append(i)
            i += 1
        groups.append({**{k: setting(v, mine[k]) for k, v in saved["settings"].items()}, "params": ids})
    return {"state": state, "param_groups": groups}
