"""The one way qconvert writes a file: never through a link, never half a file, never over
something it was not asked to replace.

Output folders hold names chosen by qconvert (``config.yaml``, ``loss.png``, ``metrics.jsonl``,
``checkpoint-N/``, the lock beside OUT). A fixed temporary name (``config.yaml.tmp``) opened with a
plain ``open(..., "w")`` follows a symbolic link planted at that name, so a run could be made to
overwrite, append to, create or delete a file anywhere its user can write. Here:

- a new file is created under a fresh unique hidden name (``.NAME.<random>.qconvert-tmp``) with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing name, link or not, is never opened), written,
  ``fsync``-ed and renamed onto its name: ``rename`` replaces a link at the destination, it does not
  write through it, so a reader sees the old file or the whole new one;
- a folder under construction is made by ``mkdir`` under a fresh unique hidden name (``mkdir``
  never follows a link either) and renamed into place whole (:func:`replace_dir`);
- a log appended to is opened with ``O_APPEND | O_NOFOLLOW`` and must be a regular file;
- a removal never follows a link: a link is unlinked, a folder is removed with ``shutil.rmtree``,
  which does not descend into links.
A write that the operating system refuses (a full disk, a quota, ``ulimit -f``) surfaces as an
``OSError`` naming the file, even when the bytes were written by a library that turns it into a
``RuntimeError`` (torch.save does): :func:`write_file` watches the file object it lends.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputExistsError

#: Every temporary name qconvert creates ends so (nothing else does: a leftover is recognisably ours).
TMP_SUFFIX = ".qconvert-tmp"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


@contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """An OSError from a write (a full disk, a quota, a file-size limit) names the file being
    written: the write's own error does not, and the user would read only "No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def temp_name(folder: Path, name: str) -> Path:
    """A fresh hidden name in ``folder`` for building ``name`` (unique: nobody can have planted it)."""
    return Path(folder) / f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def _create(folder: Path, name: str) -> tuple[int, Path]:
    for _ in range(100):
        tmp = temp_name(folder, name)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o644), tmp
        except FileExistsError:
            continue
    raise OutputExistsError(f"{folder}: could not create a temporary file for {name}", hint="re-run")


class _Watched:
    """The file object lent to a library's writer: remembers the OSError a write raised, which the
    library may turn into an exception of its own that says nothing about a full disk."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_file(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function given the open binary file) to ``path``:
    a new file under a unique temporary name, fsync-ed, renamed onto ``path`` (whatever is at
    ``path``, a link included, is replaced, never written through). On failure nothing is left."""
    path = Path(path)
    fd, tmp = _create(path.parent, path.name)
    watched = None
    try:
        with named_write_errors(path), os.fdopen(fd, "wb") as f:  # (closing flushes: its error is named too)
            if callable(data):
                watched = _Watched(f)
                try:
                    data(watched)
                except OSError:
                    raise
                except Exception:
                    if watched.error is not None:
                        raise watched.error from None
                    raise
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished file ``tmp`` (written by another program into a name of ours: llama.cpp's
    quantizer, the C compiler) onto ``path`` and sync the folder; whatever is at ``path``, a link
    included, is replaced, never written through."""
    os.replace(tmp, path)
    sync_dir(Path(path).parent)


def create_new(path: str | os.PathLike) -> BinaryIO:
    """A new file at ``path`` open for writing (binary), for writers that build a file in place
    under a name of their own (a shard's ``.tmp``): a leftover file or link at that name is removed
    first (the link itself), and the new file is created exclusively, so a link planted between the
    two is refused, never written through."""
    path = Path(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        path.unlink()
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o644), "w+b")


def sync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a crash (not possible everywhere: skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to the log at ``path`` (created if missing). A link or anything but a
    regular file at ``path`` is refused, never appended through."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _BINARY, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputExistsError(f"{path}: is a symbolic link; qconvert does not write through links",
                                    hint="remove the link, then re-run") from None
        raise
    with os.fdopen(fd, "ab") as f, named_write_errors(path):
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OutputExistsError(f"{path}: is not a regular file", hint="remove it, then re-run")
        f.write(text.encode("utf-8"))


def make_dir(path: str | os.PathLike, *, exist_ok: bool = False) -> Path:
    """Create the folder ``path`` (its parents too); an existing plain folder is fine with
    ``exist_ok``, a link or a file there never is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise OutputExistsError(f"{path}: in the way (not a plain folder: a link or a file)", hint="remove it, then re-run")
    return path


def fresh_dir(folder: str | os.PathLike, name: str) -> Path:
    """A new empty folder ``folder/.NAME.qconvert-tmp`` (a name every process of a distributed run
    can compute): a leftover at that name is removed first (a link: the link itself), then the
    folder is made with ``mkdir``, which fails rather than follow anything planted in between."""
    tmp = Path(folder) / f".{name}{TMP_SUFFIX}"
    remove(tmp)
    os.mkdir(tmp)
    return tmp


def temp_dir(folder: str | os.PathLike, name: str) -> Path:
    """A new empty folder in ``folder`` under a unique hidden name, for building ``name`` (the
    compiled CPU kernel's build folder, ops/native/build.py)."""
    for _ in range(100):
        tmp = temp_name(Path(folder), name)
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
    raise OutputExistsError(f"{folder}: could not create a temporary folder for {name}", hint="re-run")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``final``; what was at ``final`` (a folder, a file or
    a link: the link itself) is moved aside first and removed after."""
    if os.path.lexists(final):
        aside = temp_name(final.parent, final.name + ".old")
        os.replace(final, aside)
        os.replace(tmp, final)
        remove(aside)
    else:
        os.replace(tmp, final)
    sync_dir(final.parent)


@contextmanager
def building(tmp: Path, final: Path) -> Iterator[Path]:
    """A folder ``tmp`` under construction for ``final``: removed if the block raises, so nothing
    half-written is left, least of all something that looks complete. A library's write that failed
    on a full disk or a file-size limit without an OSError (safetensors, torch.save by path) is
    reported as the OSError it was (:func:`write_limit_error`); errors name ``final``, not ``tmp``."""
    try:
        yield tmp
    except BaseException as e:
        cause = e if isinstance(e, OSError) else write_limit_error(tmp) if isinstance(e, Exception) else None
        remove(tmp)
        if cause is None:
            raise
        name = cause.filename
        if name is not None and Path(name).is_relative_to(tmp):
            name = final / Path(name).relative_to(tmp)
        raise OSError(cause.errno, cause.strerror, str(name or final)) from None


def check_room(folder: Path, nbytes: int, name: Path) -> None:
    """Refuse, before a library writes it, a file of at least ``nbytes`` that cannot fit: less free
    space in ``folder``, or a smaller file-size limit (``ulimit -f``). Libraries that write by path
    (safetensors) report the OSError of a failed write in their own exception type, and delete the
    partial file; this names the file (``name``) and the cause instead."""
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
    except AttributeError:  # no statvfs (Windows)
        pass
    try:
        import resource
    except ImportError:
        return
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and soft < nbytes:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(name))


#: Less free space than this after a failed write: the disk was full.
LOW_SPACE_BYTES = 1 << 20


def write_limit_error(folder: Path) -> OSError | None:
    """The OSError a failed write in ``folder`` met, found from what the system says now: the file
    system is (all but) full, or a file there reached the file-size limit (``ulimit -f``); None when
    neither (the failure was something else)."""
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < LOW_SPACE_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None)
    except (OSError, AttributeError):
        pass
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    for p in sorted(Path(folder).rglob("*")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode) and st.st_size >= soft:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(p))
    return None


def remove(path: str | os.PathLike) -> None:
    """Delete a file, a link (never what it points to) or a folder tree, if it is there."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def open_lock_file(path: Path) -> int:
    """Open (or create) a lock file for flock, never through a link; it must be a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputExistsError(f"{path}: the lock file is a symbolic link; qconvert does not write through links",
                                    hint="remove the link, then re-run") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputExistsError(f"{path}: the lock file is not a regular file", hint="remove it, then re-run")
    return fd
