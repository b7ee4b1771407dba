"""Build, cache and load the compiled CPU kernels (``nf4.c``), or say why not and let the torch path run.

Why a C file built with the system compiler, not a torch C++ extension or torch.compile: the kernels
need no torch headers, so ``cc`` builds them in about a second (a torch extension takes a minute and
needs ninja and the C++ headers); they are called through ctypes with the tensors' data pointers, so
nothing is bound to torch's ABI; and where no compiler works the package still runs on the torch
path (qconvert.quant.fast_dequant), which computes the same bits.

- Where: ``<cache>/kernels/nf4-<key>.so``; ``<cache>`` is ``$QCONVERT_CACHE``, else
  ``$XDG_CACHE_HOME/qconvert``, else ``~/.cache/qconvert``. ``<key>`` hashes the source, the
  compiler (resolved path, size, modification time), the flags and this CPU's model and feature
  flags: ``-march=native`` code can fault on another CPU, and a home folder can be shared by
  machines of several kinds.
- When: ``tools/setup.sh`` builds ahead of time (``python -m qconvert.ops.native``); otherwise the
  first call that needs the kernels builds them, once per machine and compiler.
- Writes: the compiler writes into a fresh private folder (:func:`qconvert.io.writes.temp_dir`),
  whose library is renamed onto its final name: another process sees no library or the whole
  one, and two processes building at once both end with a good one.
- Trust: a library is loaded only from a real folder owned by this user that no one else can write
  to, and only if it is a regular file (not a link) owned by this user: code loaded into the
  process must be code this user built.
- Flags: ``-O3 -march=native -fopenmp``, then the same without the AVX512-BF16 instructions (a
  compiler that cannot build their part keeps the other vector code), then without ``-march=native``,
  then without OpenMP (the kernels then run on one thread); ``-ffp-contract=off`` always, so no
  multiply-add is fused and every product is rounded as torch rounds it.
- Fallback: no compiler, a failed build, an untrusted folder or a library that will not load: one
  debug note (logger ``qconvert``) and ``None``; the callers then run the torch path. The
  environment variable ``QCONVERT_CPU_KERNEL=torch`` skips the kernels altogether (tests compare
  both paths).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import threading
from pathlib import Path

ENV = "QCONVERT_CPU_KERNEL"
SOURCE = Path(__file__).with_name("nf4.c")
#: the flag sets tried in order; the first that builds is used
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-march=native", "-mno-avx512bf16", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-ffp-contract=off"),
)
#: the ABI of nf4.c this module binds (nf4.c's qc_abi())
ABI = 4
BUILD_SECONDS = 300

_LOG = logging.getLogger("qconvert")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def disabled() -> bool:
    """Whether ``QCONVERT_CPU_KERNEL=torch`` asks for the torch path (unset, empty or ``auto``: the
    compiled kernels where they build). Any other value is refused (OptionError), not read as
    ``auto``: a mistyped ``torch`` would otherwise run, and measure, the kernels it meant to avoid."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return False
    if value == "torch":
        return True
    from ...errors import OptionError

    raise OptionError(f"{ENV}={os.environ[ENV]!r}: not a value it takes",
                      hint=f"set {ENV}=torch for the torch path, or auto (or unset it) for the compiled kernels")


def cache_dir() -> Path:
    """The folder the built libraries live in (not created here)."""
    root = os.environ.get("QCONVERT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "qconvert") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "qconvert")
    return Path(root) / "kernels"


def compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc``, if it is on PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


def _cpu_identity() -> str:
    """This CPU's model and feature flags (Linux), or what platform says elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def library_path(cc: str, flags: tuple[str, ...]) -> Path:
    """Where the library built by ``cc`` with ``flags`` from today's source lives."""
    st = os.stat(cc)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), os.path.realpath(cc).encode(), f"{st.st_size} {st.st_mtime_ns}".encode(),
                 " ".join(flags).encode(), _cpu_identity().encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return cache_dir() / f"nf4-{h.hexdigest()[:24]}.so"


def _trusted_dir(folder: Path) -> bool:
    """A real folder of this user's that no one else can write to, in a folder where no one else can
    rename it away (not writable by others, or sticky as /tmp is)."""
    st, up = os.lstat(folder), os.stat(folder.parent)
    others = stat.S_IWGRP | stat.S_IWOTH
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & others
            and (not up.st_mode & others or bool(up.st_mode & stat.S_ISVTX)))


def _trusted_file(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _make_cache_dir() -> Path:
    folder = cache_dir()
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    if not _trusted_dir(folder):
        raise OSError(f"{folder}: not a folder of this user's that only this user can write to")
    return folder


def compile_library(cc: str, flags: tuple[str, ...], final: Path) -> None:
    """Compile nf4.c with ``flags`` into ``final`` (temporary folder, then a rename). Raises OSError
    or subprocess.CalledProcessError / TimeoutExpired when the compiler fails."""
    from ...io.writes import remove, replace_file, temp_dir

    folder = _make_cache_dir()
    tmp = temp_dir(folder, final.name)
    try:
        out = tmp / final.name
        subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE)], check=True,
                       capture_output=True, timeout=BUILD_SECONDS, stdin=subprocess.DEVNULL)
        os.chmod(out, 0o755)  # whatever the umask: a library others can rewrite is never loaded (_trusted_file)
        replace_file(out, final)
    finally:
        remove(tmp)


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.qc_abi() != ABI:
        raise OSError(f"{path}: ABI {lib.qc_abi()}, expected {ABI}")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    weight = [p, p, p, p, p, p, f32, i64, i64, i64, i32]  # packed qmap absmax codes8 nested nqm offset nbs bs n logical
    lib.qc_dequantize.argtypes = [*weight, i32, p, i64, i32]
    lib.qc_gemv.argtypes = [*weight, p, i32, i64, i64, i32, p, p, p, i32]
    lib.qc_dequantize.restype = lib.qc_gemv.restype = i32
    lib.qc_hugepages.argtypes, lib.qc_hugepages.restype = [p, i64], i32
    lib.qc_alone.argtypes, lib.qc_alone.restype = [i64], i32
    lib.qc_last_team.argtypes, lib.qc_last_team.restype = [], i32
    lib.qc_late.argtypes, lib.qc_late.restype = [i64], i64
    lib.simd = lib.qc_simd()
    lib.bf16_dot = bool(lib.qc_bf16_dot())
    return lib


def _find_or_build() -> tuple[ctypes.CDLL, tuple[str, ...]]:
    """A loaded library, and the flags it was built with: one already built for this source,
    compiler and CPU, else the first flag set that builds."""
    cc = compiler()
    if cc is None:
        raise OSError(f"no C compiler ({os.environ.get('CC') or 'cc'} is not on PATH)")
    for flags in FLAG_SETS:
        path = library_path(cc, flags)
        if os.path.lexists(path):
            if not (_trusted_dir(path.parent) and _trusted_file(path)):
                raise OSError(f"{path}: not a file of this user's in a folder only this user can write to")
            return _bind(path), flags
    errors = []
    for flags in FLAG_SETS:
        path = library_path(cc, flags)
        try:
            compile_library(cc, flags, path)
        except (OSError, subprocess.SubprocessError) as e:
            stderr = getattr(e, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {e} {stderr.decode(errors='replace')[-300:]}")
            continue
        return _bind(path), flags
    raise OSError("the build failed: " + " | ".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built if need be; None where they cannot be had (the reason logged once,
    at debug level) or where QCONVERT_CPU_KERNEL=torch asks for the torch path."""
    if disabled():
        return None
    lib = _STATE.get("lib", False)
    if lib is not False:
        return lib  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"], _STATE["flags"] = _find_or_build()
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                _STATE["lib"] = None
                _STATE["why"] = str(e)
                _LOG.debug("qconvert: compiled CPU kernels unavailable, using the torch path: %s", e)
    return _STATE["lib"]  # type: ignore[return-value]


def describe() -> str:
    """One line on what :func:`library` found: the flags, or why the torch path runs."""
    if disabled():
        return f"torch path ({ENV}=torch)"
    if library() is None:
        return f"torch path: {_STATE.get('why')}"
    simd = _STATE["lib"].simd  # type: ignore[union-attr]
    dot = ", bfloat16 dot products" if _STATE["lib"].bf16_dot else ""  # type: ignore[union-attr]
    return f"compiled ({f'{simd}-bit vectors' if simd else 'plain C'}{dot}): " + " ".join(_STATE["flags"])  # type: ignore[arg-type]
