"""Training checkpoints and the output folder: saved so that loading them runs no code, resumed only
into the run that wrote them, and never mixed with another run's files.

``trainer_state.pt`` is read with ``torch.load(weights_only=True)``: it holds only tensors, numbers,
strings, lists and dicts. The RNG states that Python and numpy return as tuples with a numpy array
are stored as tensors and plain values (:func:`rng_state`) and rebuilt on load. A pickle that asks
for anything else (a crafted file whose ``__reduce__`` would run code) is refused before any object
is built. Each checkpoint also records the run it belongs to (:func:`run_signature`): the base
model and the LoRA shape. ``--resume`` into a run with another signature is refused, because its
adapter and optimizer state would not fit, or would silently train something else.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from ..model.adapters import stable_adapter_config
from ..io.writes import TMP_SUFFIX, building, check_room, fresh_dir
from ..errors import DataError, OutputExistsError
from .outdir import STATE, read_manifest, record_checkpoint, run_checkpoints

#: Bumped when trainer_state.pt changes shape; an older checkpoint is refused with a clear line.
STATE_VERSION = 2


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
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


def load_state(ckpt: Path) -> dict:
    """Read trainer_state.pt without running any code; refuse what is not ours."""
    path = ckpt / STATE
    check_state_archive(path)
    try:
        st = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise DataError(f"{path}: refused: it asks to run code or build objects a checkpoint never holds",
                        hint="only resume from checkpoints qconvert wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable training state ({type(e).__name__})",
                        hint="the checkpoint is damaged; resume from an earlier checkpoint-N") from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise DataError(f"{path}: not a training state of this qconvert version",
                        hint="start the run again without --resume (or with --overwrite)")
    return st


#: entries a trainer_state.pt may hold (torch.save writes one per tensor storage, plus a handful)
MAX_STATE_ENTRIES = 1_000_000


def check_state_archive(path: Path) -> None:
    """Refuse a trainer_state.pt whose zip entries would inflate beyond the file before torch reads
    it: torch.save stores every entry uncompressed, but torch.load also inflates deflated ones (a 2 MB
    file can hold 2 GB of zeros). Checked from the zip's directory, before any entry is read."""
    import zipfile

    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path}: not a readable training state ({type(e).__name__})",
                        hint="the checkpoint is damaged; resume from an earlier checkpoint-N") from None
    bad = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size), None)
    if bad is not None or len(infos) > MAX_STATE_ENTRIES or sum(i.file_size for i in infos) > size:
        what = f"entry {bad.filename!r} is compressed" if bad is not None else "its entries claim more bytes than the file holds"
        raise DataError(f"{path}: refused: {what} (torch.save writes every entry stored, uncompressed)",
                        hint="only resume from checkpoints qconvert wrote")


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
    """Write trainer_state.pt into the finished ``tmp`` folder, record checkpoint-N in the run's
    manifest, rename the folder to it in one step, and keep only the newest ``limit`` of the run's
    checkpoints (never a checkpoint-N the run did not write: a foreign one in the way is refused)."""
    from ..io.writes import remove, replace_dir, write_file

    final = out / f"checkpoint-{step}"
    if os.path.lexists(final) and final.name not in (read_manifest(out) or []):
        raise OutputExistsError(f"{final}: in the way, and not written by this run", hint="move it out of --output, then resume with --resume")
    write_file(tmp / STATE, lambda f: torch.save(state, f))
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
    and trainer_state.pt without the optimizer (rank 0). Published by one rename when complete."""
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
