"""Training checkpoints and the output folder: saved so that loading them runs no code, resumed only
into the run that wrote them, and never mixed with another run's files.

The trainer state (optimizer, scheduler, step, RNG states, the run's settings) is written without
pickle: ``trainer_state.safetensors`` holds its tensors, and its header's metadata the rest as JSON
(:func:`pack_state`): dicts (keys kept as ints or strings), lists, tuples, numbers (floats by their
exact repr, nan and inf included), strings, booleans and None, each tensor named by its key. Loading
is safetensors' reader and the bounded JSON reader: nothing is unpickled, so nothing can run. A
``trainer_state.pt`` (the pickle format earlier versions wrote) is not read. Each checkpoint also
records the run it belongs to (:func:`run_signature`): the base model and the LoRA shape. ``--resume``
into a run with another signature is refused, because its adapter and optimizer state would not fit,
or would silently train something else.
"""
from __future__ import annotations

import json
import numbers
import os
import random
from pathlib import Path
from typing import Any

import torch

from ..model.adapters import stable_adapter_config
from ..io.writes import TMP_SUFFIX, building, check_room, fresh_dir
from ..errors import DataError, OutputExistsError
from .outdir import STATE, read_manifest, record_checkpoint, run_checkpoints

#: Bumped when the trainer state changes shape; an older checkpoint is refused with a clear line.
STATE_VERSION = 3
#: The metadata key of trainer_state.safetensors that holds the state's JSON skeleton.
SKELETON = "qconvert_trainer_state"
#: What earlier versions wrote (pickle): named in the refusal, never read.
OLD_STATE = "trainer_state.pt"


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (what :func:`pack_state` writes)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    key, mt, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": str(key), "state": torch.from_numpy(np.asarray(mt, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict) -> None:
    import numpy as np

    torch.set_rng_state(s["torch"])
    py = s["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def run_signature(base_id: str, lora) -> dict:
    """What a checkpoint must share with the run that resumes it: the base model and the LoRA shape."""
    targets = lora.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"base_model": str(base_id), "r": int(lora.r), "lora_alpha": float(lora.lora_alpha), "target_modules": targets}


def pack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, copies of its tensors put in ``tensors`` (named ``t0``, ``t1``, ...): each node a
    one-key object saying its kind, so that tuples, int keys and special floats come back as they were.
    (The copies, and safetensors' serialisation in memory, hold the optimizer state up to three times
    while a checkpoint is written: small for LoRA's states, where torch.save streamed it.)"""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # (safetensors refuses storage shared between entries)
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[_plain(k), pack_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [pack_state(v, tensors) for v in obj]}
    return {"value": _plain(obj)} if not isinstance(obj, float) else {"float": repr(float(obj))}


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, float):
        return v
    raise TypeError(f"a training state value of type {type(v).__name__} cannot be saved without pickle")


def unpack_state(node: Any, tensors, where: Path) -> Any:
    """The inverse of :func:`pack_state`; ``tensors``: the file's (an open safe_open). DataError for
    anything :func:`pack_state` never writes."""
    kind, value = next(iter(node.items())) if isinstance(node, dict) and len(node) == 1 else (None, None)
    if kind == "tensor" and isinstance(value, str) and value in tensors.keys():
        return tensors.get_tensor(value)
    if kind == "dict" and isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        return {_key(k, where): unpack_state(v, tensors, where) for k, v in value}
    if kind in ("list", "tuple") and isinstance(value, list):
        items = [unpack_state(v, tensors, where) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind == "value" and (value is None or isinstance(value, (bool, int, str))):
        return value
    raise DataError(f"{where}: not a training state qconvert writes (a node {str(node)[:60]!r})", hint="only resume from checkpoints qconvert wrote")


def _key(k: Any, where: Path) -> Any:
    if isinstance(k, (int, str)) and not isinstance(k, bool):
        return k
    raise DataError(f"{where}: not a training state qconvert writes (a key {k!r})", hint="only resume from checkpoints qconvert wrote")


def save_state(state: dict, path: Path) -> None:
    """``state`` as trainer_state.safetensors (:func:`pack_state`), written through io.writes."""
    from safetensors.torch import save

    from ..io.writes import write_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(pack_state(state, tensors))
    blob = save(tensors, metadata={SKELETON: skeleton})
    write_file(path, lambda f: f.write(blob))


def load_state(ckpt: Path) -> dict:
    """Read the trainer state without running any code (safetensors and the bounded JSON reader);
    refuse what is not ours."""
    from safetensors import SafetensorError, safe_open

    from ..io.readers import parse_json

    path = ckpt / STATE
    if not path.is_file() and (ckpt / OLD_STATE).exists():
        raise DataError(f"{ckpt / OLD_STATE}: an earlier qconvert's state, a pickle (never read)",
                        hint="start the run again without --resume (or with --overwrite)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if SKELETON not in meta:
                raise DataError(f"{path}: not a training state of this qconvert version",
                                hint="start the run again without --resume (or with --overwrite)")
            st = unpack_state(parse_json(meta[SKELETON], str(path), DataError), f, path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable training state ({type(e).__name__})",
                        hint="the checkpoint is damaged; resume from an earlier checkpoint-N") from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise DataError(f"{path}: not a training state of this qconvert version",
                        hint="start the run again without --resume (or with --overwrite)")
    return st


def check_compatible(ckpt: Path, st: dict, signature: dict) -> None:
    saved = st.get("run") or {}
    for key, now in signature.items():
        if saved.get(key) != now:
            raise DataError(f"{ckpt}: checkpoint from another run ({key} {saved.get(key)!r}, this run {now!r})",
                            hint="resume with the same model and LoRA options, or start a new --output")


def find_resume(out: Path, resume) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        ckpts = run_checkpoints(out)  # never another tool's checkpoint-N
        if not ckpts:
            finished = (out / "adapter_config.json").is_file()  # a run that ended before its first checkpoint
            raise DataError(f"{out}: no checkpoint-N folder to resume from" + (" (the run there ended without one)" if finished else ""),
                            hint="--overwrite starts that run again (--save-steps N saves checkpoints), or use another --output"
                            if finished else "run without --resume to start")
        return ckpts[-1]
    p = Path(resume)
    if not (p / STATE).is_file() and (p / OLD_STATE).exists():
        load_state(p)  # (refuses it, naming the old format)
    if not (p / STATE).is_file():
        raise DataError(f"{p}: not a training checkpoint (no {STATE})", hint="give --resume OUTPUT/checkpoint-N, or --resume alone for the latest")
    return p


def save_checkpoint(model, optimizer, sched, step: int, out: Path, limit: int | None, rank: int, world: int,
                    signature: dict, extra: dict[str, Any] | None = None) -> Path | None:
    rng = _gather_rng(world)
    if rank != 0:
        return None
    tmp = fresh_dir(out, f"checkpoint-{step}")
    with building(tmp, out / f"checkpoint-{step}"):
        check_room(tmp, sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                   out / f"checkpoint-{step}" / "adapter_model.safetensors")
        model.save_pretrained(tmp)
        stable_adapter_config(tmp)
        state = {"version": STATE_VERSION, "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "step": step,
                 "rng": rng, "run": signature, **(extra or {})}
        return _publish(tmp, state, out, step, limit)


def _publish(tmp: Path, state: dict, out: Path, step: int, limit: int | None) -> Path:
    """Write the trainer state into the finished ``tmp`` folder, record checkpoint-N in the run's
    manifest, rename the folder to it in one step, and keep only the newest ``limit`` of the run's
    checkpoints (never a checkpoint-N the run did not write: a foreign one in the way is refused)."""
    from ..io.writes import remove, replace_dir

    final = out / f"checkpoint-{step}"
    if os.path.lexists(final) and final.name not in (read_manifest(out) or []):
        raise OutputExistsError(f"{final}: in the way, and not written by this run", hint="move it out of --output, then resume with --resume")
    save_state(state, tmp / STATE)
    record_checkpoint(out, final.name)
    replace_dir(tmp, final)
    if limit:
        for old in run_checkpoints(out)[:-limit]:
            remove(old)
            record_checkpoint(out, old.name, present=False)
    return final


def _gather_rng(world: int):
    """This process's RNG state (one process), or every process's, gathered (a collective).

    Gathered as bytes in tensors, never with ``all_gather_object``: that pickles each state and
    unpickles what the other processes send, and qconvert runs no pickle, its own included."""
    rng = rng_state()
    if world > 1:
        import torch.distributed as dist

        blob = _rng_to_bytes(rng)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: blob.numel()] = blob.to(device)
        blobs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(blobs, padded)
        rng = [_rng_from_bytes(b[: int(n)].cpu()) for b, n in zip(blobs, sizes)]
    return rng


def _rng_to_bytes(state: dict) -> torch.Tensor:
    """One RNG state (:func:`rng_state`) as safetensors bytes: tensors as tensors, the rest as JSON."""
    import json

    from safetensors.torch import save

    cuda = state.get("cuda") or []
    tensors = {"torch": state["torch"], "python": state["python"]["state"], "numpy": state["numpy"]["state"],
               **{f"cuda.{i}": t for i, t in enumerate(cuda)}}
    plain = {"python": {k: v for k, v in state["python"].items() if k != "state"},
             "numpy": {k: v for k, v in state["numpy"].items() if k != "state"}, "cuda": len(cuda) if state.get("cuda") is not None else None}
    tensors["plain"] = torch.frombuffer(bytearray(json.dumps(plain).encode()), dtype=torch.uint8)
    return torch.frombuffer(bytearray(save({k: t.contiguous().cpu() for k, t in tensors.items()})), dtype=torch.uint8)


def _rng_from_bytes(blob: torch.Tensor) -> dict:
    """The inverse of :func:`_rng_to_bytes` (no pickle: safetensors and JSON)."""
    import json

    from safetensors.torch import load

    tensors = load(blob.numpy().tobytes())
    plain = json.loads(tensors.pop("plain").numpy().tobytes())
    cuda = None if plain["cuda"] is None else [tensors[f"cuda.{i}"] for i in range(plain["cuda"])]
    return {"torch": tensors["torch"], "python": {**plain["python"], "state": tensors["python"]},
            "numpy": {**plain["numpy"], "state": tensors["numpy"]}, "cuda": cuda}


def save_fsdp_checkpoint(model, optimizer, sched, step: int, out: Path, limit: int | None, rank: int, world: int,
                         signature: dict, extra: dict[str, Any] | None = None) -> Path | None:
    """checkpoint-N of an FSDP run (every process calls it): the LoRA and optimizer shards in
    ``sharded/`` (safetensors and a JSON manifest, see fsdp_checkpoint.py), the gathered adapter in PEFT format
    and the trainer state without the optimizer (rank 0). Published by one rename when complete."""
    import torch.distributed as dist

    from . import fsdp

    rng = [rng_state()] if world == 1 else _gather_rng(world)
    adapter = fsdp.full_adapter(model)
    tmp = out / f".checkpoint-{step}{TMP_SUFFIX}"
    if rank == 0:
        fresh_dir(out, f"checkpoint-{step}")
    dist.barrier()
    fsdp.save_sharded(model, optimizer, tmp)
    dist.barrier()
    if rank != 0:
        return None
    with building(tmp, out / f"checkpoint-{step}"):
        model.save_pretrained(tmp, state_dict=adapter)
        stable_adapter_config(tmp)
        state = {"version": STATE_VERSION, "scheduler": sched.state_dict(), "step": step, "rng": rng, "run": signature,
                 "fsdp_world": world, **(extra or {})}
        return _publish(tmp, state, out, step, limit)
