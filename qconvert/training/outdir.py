"""`qconvert train`'s output folder: what a run may write there, and what ``--overwrite`` may remove.

``train`` writes into OUT as it goes (checkpoints, a log, a plot), so it cannot build OUT aside and
rename it into place as quantize and merge do; it keeps their other rules (``io.staging``): OUT is
never an input or inside or around one (the model, the data, the evaluation data, the --config
file), never the current or home folder, never a link, and one run at a time writes it (the lock
beside OUT). What a run writes is recorded in OUT's manifest, ``.qconvert-run.json``, written before
anything else: the names of :data:`RUN_FILES` and each ``checkpoint-N`` it publishes. So:

- ``--overwrite`` removes exactly the manifest's entries (and qconvert's own ``*.qconvert-tmp``
  leftovers), never a user's ``runs/`` or ``config.yaml`` or another tool's ``checkpoint-7/``; a
  manifest entry that is not one of those names is ignored, so a crafted manifest cannot name
  ``../x``;
- a non-empty OUT without a manifest is refused with ``--overwrite`` too, naming what is there:
  qconvert cannot know that those files are its own; one that holds only a manifest (a run refused
  for its input, or killed, before it wrote anything) is taken as an empty one;
- ``--resume`` of a run written before manifests existed adopts the run's files it finds under
  train's names (and the checkpoints holding a trainer_state.safetensors);
- the checkpoint rotation (``--save-total-limit``) and ``--resume`` pick only listed checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from pathlib import Path

from ..errors import DataError, OptionError, OutputExistsError
from ..io.staging import refuse_link
from ..io.writes import TMP_SUFFIX, make_dir, remove, write_file

MANIFEST = ".qconvert-run.json"
#: Everything ``qconvert train`` writes into OUT besides its checkpoint-N folders.
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.jsonl", "loss.png", "config.yaml",
             "runs", "qconvert_prompt_format.json")
_CHECKPOINT = re.compile(r"checkpoint-[0-9]{1,12}")
#: What makes a checkpoint-N folder a training checkpoint (checkpoint.py writes and reads it).
STATE = "trainer_state.safetensors"
MAX_MANIFEST_BYTES = 1 << 20


def _ours(name: object) -> bool:
    return isinstance(name, str) and (name in RUN_FILES or bool(_CHECKPOINT.fullmatch(name)))


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def read_manifest(out: Path) -> list[str] | None:
    """The names the manifest of ``out`` lists (only train's own names), or None without one."""
    path = Path(out) / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
        raise DataError(f"{path}: not a qconvert run manifest (a link, not a file, or over 1 MiB)",
                        hint="remove it, or choose another --output")
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise DataError(f"{path}: not a qconvert run manifest (not JSON)", hint="remove it, or choose another --output") from None
    if not isinstance(doc, dict) or doc.get("qconvert") != "train" or not isinstance(doc.get("files"), list):
        raise DataError(f"{path}: not a qconvert train run manifest", hint="remove it, or choose another --output")
    return [n for n in doc["files"] if _ours(n)]


def write_manifest(out: Path, names) -> None:
    files = list(RUN_FILES) + sorted({n for n in names if _CHECKPOINT.fullmatch(n)}, key=lambda n: int(n.split("-")[1]))
    write_file(Path(out) / MANIFEST, json.dumps({"qconvert": "train", "version": 1, "files": files}, indent=1) + "\n")


def record_checkpoint(out: Path, name: str, *, present: bool = True) -> None:
    """Add (or, ``present=False``, drop) a checkpoint in the manifest: before it is published, after it is removed."""
    listed = read_manifest(out) or []
    names = (set(listed) | {name}) if present else (set(listed) - {name})
    write_manifest(out, names)


def run_checkpoints(out: Path) -> list[Path]:
    """The checkpoint-N folders of this run, by step: those the manifest lists, or, without a
    manifest, every one (a run written before manifests existed)."""
    listed = read_manifest(out)
    found = sorted((p for p in Path(out).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                   key=lambda p: int(p.name.split("-", 1)[1]))
    return found if listed is None else [p for p in found if p.name in listed]


def claim_output(out: Path, resume, overwrite: bool, inputs, rank: int, world: int, held: contextlib.ExitStack) -> None:
    """The output policy of every command that writes (io.staging): OUT is not an input, the current
    or home folder or a link; rank 0 holds the lock beside OUT for the whole run (a second run into
    the same OUT is refused at once) and prepares OUT (:func:`prepare_output`). Every process checks
    first, and all of them learn whether rank 0 got the lock, so none waits for a rank that left."""
    from ..io.staging import check_location, output_lock

    check_flags(resume, overwrite)
    check_location(out, [i for i in inputs if i is not None and os.path.exists(i) and not _own_config(out, i)])
    prepare_output(out, resume=resume, overwrite=overwrite, clear=False)
    locked = True
    if rank == 0:
        try:
            held.enter_context(output_lock(out))
        except OutputExistsError:
            locked = False
            if world == 1:
                raise
    if world > 1:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if locked else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank has looked at --output before rank 0 changes it
        if not flag.item():
            raise OutputExistsError(f"{out}: another qconvert run is writing it", hint="wait for that run to finish, or write to another folder")
    if rank == 0:
        prepare_output(out, resume=resume, overwrite=overwrite)
    if world > 1:
        dist.barrier()


def _own_config(out: Path, given) -> bool:
    """``given`` is OUT/config.yaml that a previous run wrote (its manifest lists it): the run's own
    resolved options, which `--config OUT/config.yaml --resume` (or --overwrite) may read back."""
    own = Path(out) / "config.yaml"
    return own.is_file() and Path(given).resolve() == own.resolve() and "config.yaml" in (read_manifest(out) or [])


def check_flags(resume, overwrite: bool) -> None:
    if resume and overwrite:
        raise OptionError("--resume and --overwrite contradict each other", hint="--resume continues the run in --output; --overwrite starts it anew")


def prepare_output(out: Path, *, resume, overwrite: bool, clear: bool = True) -> None:
    """Refuse to write over anything but this run's own files: an existing non-empty folder needs
    --resume or --overwrite, and --overwrite removes only what the manifest lists. Then (``clear``)
    write the manifest. ``clear=False`` only checks (the other processes of a torchrun job)."""
    check_flags(resume, overwrite)
    refuse_link(out, OutputExistsError)  # (the CLI refused one; one planted since is refused too, never written through)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder", hint="give --output a folder path")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    listed = read_manifest(out) if present else None
    if present and not resume and not _only_a_claim(present, listed):
        _check_replaceable(out, present, listed, overwrite)
    if not clear or (resume and not present):  # (nothing to resume: find_resume says so)
        return
    make_dir(out, exist_ok=True)  # a plain folder: a link or file planted since the checks is refused
    for name in present:
        if _is_leftover(name) or (overwrite and listed is not None and name in listed):
            remove(out / name)
    if resume and listed is None and present:  # a run from before manifests: adopt its files
        listed = [n for n in present if n in RUN_FILES or (_CHECKPOINT.fullmatch(n) and (out / n / STATE).is_file())]
    write_manifest(out, listed if resume and listed else [])


def _only_a_claim(present: list[str], listed: list[str] | None) -> bool:
    """OUT holds a run's manifest and nothing else of anyone's (at most qconvert's temporary
    leftovers): a run that was refused, or killed, before it wrote a file. The next run may take
    it as it takes an empty folder, instead of asking for --overwrite over nothing."""
    return listed is not None and all(n == MANIFEST or _is_leftover(n) for n in present)


def _check_replaceable(out: Path, present: list[str], listed: list[str] | None, overwrite: bool) -> None:
    if not overwrite:
        raise OutputExistsError(f"{out}: already holds files (a previous run?)",
                                hint="--resume to continue it, --overwrite to replace it, or another --output")
    if listed is None:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise OutputExistsError(f"{out}: holds files no qconvert train run recorded ({shown})",
                                hint=f"--overwrite removes only what a previous run listed in its {MANIFEST}; choose another --output, "
                                     "or remove those files yourself")


def truncate_metrics(path: Path, step: int) -> str | None:
    """Keep the rows of metrics.jsonl up to ``step`` (the checkpoint resumed from): a run killed
    after its last checkpoint logged steps that the resumed run logs again, and they would appear
    twice (and draw the loss backwards). Rewritten whole, atomically; lines that are not JSON rows
    are dropped too. Returns a notice, or None when nothing changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise OutputExistsError(f"{path}: not a regular file (a link?); qconvert does not write through links",
                                hint="remove it, then re-run")
    from ..errors import DataError
    from .plot import metrics_lines, metrics_row

    kept, later, bad = [], 0, 0
    for where, line in metrics_lines(path):  # line by line, each line bounded
        try:
            row = metrics_row(line, where)
        except DataError:
            bad += 1
            continue
        if row["step"] > step:
            later += 1
        else:
            kept.append(json.dumps(row) + "\n")
    if not later and not bad:
        return None
    write_file(path, "".join(kept))
    parts = [f"{later} rows after step {step} (logged after that checkpoint)"] * bool(later) + [f"{bad} unreadable lines"] * bool(bad)
    return f"{path.name}: removed {' and '.join(parts)}"
