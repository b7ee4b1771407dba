"""Output folders: refusing a destructive location, the staging folder beside the output, copying
companion files from inside the model folder only, and the one-rename publish.

Every writer (quantize, merge, export-adapter) builds its output in ``.<name>.qconvert-partial``
beside OUT and moves it into place with :func:`publish` at the very end, so OUT is either absent,
the previous OUT, or complete: never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OptionError, OutputExistsError, QConvertError
from .checkpoint import is_companion_file
from .writes import make_dir, open_lock_file, remove, write_file

#: A companion file larger than this is not copied (the largest tokenizer.json seen is about 35 MB).
MAX_COMPANION_BYTES = 2**30


#: The files qconvert writes into an output folder, by its kind, besides the model card (README.md) and
#: the companion files that quantize and merge copy (``checkpoint.is_companion_file``): ``push``
#: publishes only these, and ``--overwrite`` replaces only a folder that holds nothing else
#: (:func:`foreign_files`).
WRITTEN = {
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "loss.png", "metrics.jsonl", "qconvert_prompt_format.json"),
    "quantized": ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    "merge": ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
}
#: qconvert's temporary names (a killed run's leftovers): never published, not even with --include.
TEMPORARY = ("*.tmp", "*.qconvert-tmp", "*.qconvert-partial", "*.qconvert-old", "*.qconvert-lock")
#: Files qconvert writes that push does not publish: merge's verdict beside a merge whose check
#: failed (``OUT.unverified``), which a rerun with --overwrite replaces.
REPORTS = ("CHECK_FAILED.json",)


def matches(rel: str, patterns) -> bool:
    """Whether ``rel`` (a path with ``/``) or its last part matches one of the glob ``patterns``."""
    from fnmatch import fnmatchcase

    name = rel.rsplit("/", 1)[-1]
    return any(fnmatchcase(name, p) or fnmatchcase(rel, p) for p in patterns)


def foreign_files(folder: Path) -> list[str]:
    """The files under ``folder`` (relative paths; an empty folder with a trailing ``/``) that no
    output of qconvert holds: not the card, a :data:`WRITTEN` name, a companion file or a temporary
    leftover. A link counts by its own name (removing it never touches what it points to)."""
    def ours(rel: str) -> bool:
        return (rel in ("README.md", *REPORTS) or is_companion_file(rel) or matches(rel, TEMPORARY)
                or ("/" not in rel and any(matches(rel, names) for names in WRITTEN.values())))

    found: list[str] = []
    for top, dirs, files in os.walk(folder):  # (links to folders are listed in dirs, not entered)
        rel_top = Path(top).relative_to(folder).as_posix()
        prefix = "" if rel_top == "." else rel_top + "/"
        if any(matches(part, TEMPORARY) for part in prefix.split("/") if part):
            dirs[:] = []  # a leftover staging or trash folder: qconvert's own
            continue
        entered = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
        found += [prefix + d for d in sorted(dirs) if d not in entered and not ours(prefix + d)]
        found += [prefix + f for f in sorted(files) if not ours(prefix + f)]
        if not dirs and not files and prefix:
            found.append(prefix)
        dirs[:] = sorted(entered)
    return found


def staging_dir(out: Path) -> Path:
    """The folder an output is built in before :func:`publish` renames it to ``out``."""
    return out.parent / f".{out.name}.qconvert-partial"


def trash_dir(out: Path) -> Path:
    """Where a replaced output goes for the moment between the two renames of :func:`publish`."""
    return out.parent / f".{out.name}.qconvert-old"


def check_output(out: Path, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = (), *, one_file: bool = False) -> None:
    """Refuse an output location that cannot be written, or whose writing would destroy something:

    - OUT overlapping an input (the same folder, inside it, or holding it): a run never writes
      inside its inputs, and --overwrite never replaces them (``inputs`` that are not local paths,
      such as Hub ids, are ignored);
    - OUT that is the current folder, holds it, or is the home folder or ``/`` (with --overwrite
      those would be deleted wholesale);
    - OUT that is a symbolic link (replacing it would swap the link, not write where it points), or
      whose nearest existing parent is a file or not writable;
    - a staging or trash folder beside OUT that is not a plain folder (it is emptied or deleted);
    - an existing, non-empty OUT (or a file there) without ``overwrite``; with it, a folder holding
      anything an output of qconvert does not hold (:func:`foreign_files`: the user's notes, a
      ``.git`` folder), or a file where a folder output goes: ``--overwrite`` replaces what qconvert
      wrote, never a user's files (``one_file``: the command writes one file, and OUT is that file).
    """
    out = check_location(out, inputs)
    for aside in (staging_dir(out), trash_dir(out)):
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            raise OptionError(f"{aside}: in the way of the output (not a plain folder)", hint="remove it, then re-run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty", hint="choose another folder or pass --overwrite")
    if overwrite and out.exists() and not one_file:
        foreign = foreign_files(out) if out.is_dir() else [out.name]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExistsError(f"{out}: holds what qconvert does not write ({shown}); --overwrite replaces only qconvert's outputs"
                                    if out.is_dir() else f"{out}: a file, where this output is a folder; --overwrite replaces only qconvert's outputs",
                                    hint="move those files out of the way, or choose another folder")


def check_file_output(out: Path, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """:func:`check_output` for a command that writes one file (export-gguf, verify --plot): the same
    rules (not an input or inside one, not a link, not over an existing file without ``overwrite``),
    and no folder at its name, which the final rename could not replace (found before the work, not
    after it); returns OUT as an absolute path."""
    check_output(out, overwrite, inputs, one_file=True)
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise OptionError(f"{out}: is a folder; this output is one file", hint="name a file: one inside that folder, or another name")
    return out


def check_location(out: Path, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The checks of :func:`check_output` about where OUT is (not a link, not an input, not the
    current or home folder, under a writable folder), without the ones about what it holds; returns
    OUT as an absolute path. ``train`` uses this: its OUT may hold the run it resumes."""
    out = Path(os.path.abspath(out))
    refuse_link(out)
    real = out.resolve()
    _check_not_an_input(out, real, inputs)
    _check_not_a_home(out, real)
    _check_parent_writable(out, real)
    return out


def refuse_link(out: Path, error: type[QConvertError] = OptionError) -> None:
    """Raise ``error`` where OUT is a symbolic link: replacing it would swap the link, writing into it
    would write where it points."""
    if out.is_symlink():
        raise error(f"{out}: the output is a symbolic link (to {os.readlink(out)})",
                    hint="name the folder it points to, or another folder")


def _check_not_an_input(out: Path, real: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        src = Path(given).resolve()
        if real == src or src in real.parents or real in src.parents:
            how = "is" if real == src else "is inside" if src in real.parents else "holds"
            raise OptionError(f"{out}: the output {how} the input {given}", hint="write the output to a folder outside the inputs")


def _check_not_a_home(out: Path, real: Path) -> None:
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if real == cwd or real in cwd.parents or real == home:
        what = "the current folder" if real == cwd else "your home folder" if real == home else "a parent of the current folder"
        raise OptionError(f"{out}: the output is {what}", hint="write the output to a new folder, e.g. OUT/model-nf4")


def _check_parent_writable(out: Path, real: Path) -> None:
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{out}: cannot create the output under {parent}, which is a file", hint="choose a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{out}: {parent} is not writable", hint="choose a folder you can write to")


def free_bytes(path: Path) -> int:
    """Free disk space where ``path`` (or its nearest existing parent) lives."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def fresh_stage(out: Path) -> Path:
    """An empty staging folder for ``out`` (another run's leftovers there are deleted)."""
    stage = staging_dir(out)
    remove(stage)
    return make_dir(stage)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """An empty staging folder for ``out``, deleted again when the block raises, with ``out`` locked
    (:func:`output_lock`) throughout. The block ends by calling :func:`publish` itself (after which
    there is no staging folder left to delete)."""
    with output_lock(out):
        stage = fresh_stage(out)
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def lock_path(out: Path) -> Path:
    """The lock file of :func:`output_lock`, beside ``out``."""
    return out.parent / f".{out.name}.qconvert-lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing ``out`` (``flock`` on :func:`lock_path`), or refuse at once.

    Two runs writing one OUT (the same command started twice, or a second one with other options)
    shared its staging folder: one deleted or renamed the other's files mid-run, and the one that
    finished last could report success over an output of mixed or missing shards. The lock is the
    kernel's, so a killed run leaves no stale lock (only the empty file, reused next time); the file
    is removed when the run ends. Where ``fcntl`` does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)  # as the staging folder's would be
    for _ in range(10):  # the holder may remove the file between our open and our flock: open it again
        f = os.fdopen(open_lock_file(path), "r+b")  # never through a link planted at its name
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutputExistsError(
                f"{out}: another qconvert run is writing it (the lock {path.name} beside it is held)",
                hint="wait for that run to finish, or write to another folder",
            ) from None
        try:
            same = os.lstat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    else:
        raise OutputExistsError(f"{out}: could not take the lock {path.name}", hint="re-run; if it persists, remove that file")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """``obj`` as indented JSON, written beside ``path`` and renamed onto it (never half a file;
    :func:`qconvert.io.writes.write_file`)."""
    write_file(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def publish(stage: Path, out: Path) -> None:
    """Move the finished staging folder into place (replacing ``out`` only when asked to)."""
    if out.exists() or out.is_symlink():
        trash = trash_dir(out)
        remove(trash)
        os.replace(out, trash)
        os.replace(stage, out)
        remove(trash)
    else:
        os.replace(stage, out)


def copy_companions(src, stage: Path, say: Callable[[str], None] | None = None) -> list[str]:
    """Copy the source's companion files (tokenizer, chat template, generation and processor configs,
    licence, sentence-transformers module configs: ``format.checkpoint.COMPANION_FILES``) into the
    output; returns their names. ``src`` is anything with ``extra_files()`` (a checkpoint reader).
    Never copied: any other file (named in one notice line), and a companion that is not a regular
    file or that resolves outside the model folder, such as a link to a private key (a warning names
    each). Hugging Face cache snapshots link every file into the cache's ``blobs/`` folder: such a
    link is followed."""
    say = say or (lambda m: warnings.warn(m, stacklevel=3))
    copied: list[str] = []
    others: list[str] = []
    for rel, path in src.extra_files():
        if rel in ("config.json", "README.md"):
            continue
        if not is_companion_file(rel):
            others.append(rel + "/" if path.is_dir() else rel)
            continue
        why = not_copyable(path, rel)
        if why:
            say(f"warning: {rel} not copied: {why}")
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src_file:
            write_file(dst, lambda f, src_file=src_file: shutil.copyfileobj(src_file, f))
        copied.append(rel)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        say(f"not copied (not a tokenizer, template, config or licence file): {shown}")
    return copied


def not_copyable(path: Path, rel: str) -> str | None:
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
    from .links import outside_folder

    if outside_folder(path, folder):  # the Hugging Face cache's links into blobs/ are inside
        return "it is a link to a file outside the model folder"
    return None
