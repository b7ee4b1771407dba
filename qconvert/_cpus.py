"""How many CPUs this process may really use, and the ``--workers`` option built on it.

``os.cpu_count()`` counts the machine's CPUs. A process can be held to fewer in two ways, and
both are common where qconvert runs (containers, CI runners, ``taskset``, batch schedulers):

- its CPU affinity (``os.sched_getaffinity``): the CPUs it may be scheduled on;
- a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``): a time
  budget of ``quota / period`` CPUs, enforced by pausing the whole group once it is spent. A quota
  set on any cgroup above the process's own limits it too, so the tightest along the path counts.

The default worker count is the smaller of the two, a fractional quota rounded up (1.5 CPUs of
budget keep two workers busy 75% of the time, more than one worker can use). The current load
(``os.getloadavg``) is deliberately not used: it is a one-minute average of the past, counts the
whole host inside a container, and the quantizer's work is split into independent chunks that
workers take as they become free, so a worker that the kernel descheduled delays only its own
chunk. tools/bench_contention.py measures that default against one worker under competing load.

Every reader takes ``root`` (default ``/``) so tests can feed a fake /proc and /sys tree.

The single-process commands that run torch ops (train, generate, eval, merge) cap torch's intra-op
thread count at the same figure (:func:`cap_torch_threads`): torch's default counts the machine's
cores, and more threads than the process can run make every small op wait for a descheduled one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import OptionError


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (all online CPUs where affinity is not supported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(root: Path) -> list[tuple[str, Path]]:
    """(version, folder) of this process's own cgroup in each mounted hierarchy that limits CPU time:
    ("v2", ...) for the unified hierarchy, ("v1", ...) for the v1 ``cpu`` controller."""
    mounts = _read(root / "proc/self/mountinfo") or ""
    membership = _read(root / "proc/self/cgroup") or ""
    paths: dict[str, str] = {}  # "v2" or "v1" -> the process's cgroup path in that hierarchy
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    found = []
    for line in mounts.splitlines():
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mount_point, fstype, options = fields[3], fields[4], tail[0], tail[2]
        if fstype == "cgroup2" and "v2" in paths:
            version = "v2"
        elif fstype == "cgroup" and "cpu" in options.split(",") and "v1" in paths:
            version = "v1"
        else:
            continue
        # the path is relative to the hierarchy's root; a mount may show only a subtree of it (a
        # container's own cgroup): then the part below that subtree, or the mount itself
        path, top = paths[version].strip("/"), mount_root.strip("/")
        if top and path != top and not path.startswith(top + "/"):
            path = ""
        rel = path[len(top):].strip("/")
        base = root / mount_point.lstrip("/")
        found += [(version, d) for d in _up_to(base / rel if rel else base, base)]
    return found


def _up_to(d: Path, top: Path) -> list[Path]:
    """``d`` and each of its parents up to ``top`` (inclusive)."""
    out = [d]
    while d != top and top in d.parents:
        d = d.parent
        out.append(d)
    return out


def _quota(version: str, d: Path) -> float | None:
    """CPUs granted by the quota set on one cgroup folder, or None when it sets none."""
    if version == "v2":
        text = _read(d / "cpu.max")
        parts = text.split() if text else []
        if len(parts) != 2 or parts[0] == "max":
            return None
        quota, period = parts
    else:
        quota, period = (_read(d / f"cpu.cfs_{k}_us") for k in ("quota", "period"))
        if quota is None or period is None:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: str | os.PathLike = "/") -> float | None:
    """The tightest cgroup CPU quota on this process, in CPUs (1.5 = 150 ms per 100 ms), or None."""
    limits = [q for v, d in _cgroup_dirs(Path(root)) if (q := _quota(v, d)) is not None]
    return min(limits) if limits else None


def available_cpus(root: str | os.PathLike = "/", affinity: int | None = None) -> int:
    """The CPUs this process can really use: its affinity, capped by any cgroup quota (rounded up)."""
    n = affinity if affinity is not None else affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


def parse_workers(value: str | int | None) -> int | None:
    """The ``--workers`` value: a positive count, or None for the automatic choice (``0``, ``auto``
    or not given). Anything else is an :class:`OptionError`."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("0", "auto"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1 or n > 4096:
        raise OptionError(
            f"--workers {value}: not a worker count",
            hint="give a whole number from 1 to 4096, or 0 / auto for one per available CPU",
        )
    return n


def resolve_workers(value: str | int | None) -> int:
    """``parse_workers`` with the automatic choice filled in: :func:`available_cpus`."""
    n = parse_workers(value)
    return n if n is not None else available_cpus()


def cap_torch_threads() -> int:
    """Cap torch's intra-op threads at :func:`available_cpus` for a single-process command, and
    return the count in force. torch's default counts the machine's cores, not a container's quota
    or the affinity: beyond what the process can run, each op waits for a descheduled thread (10-20x
    slower on a loaded machine). ``OMP_NUM_THREADS``, when set, is the user's choice, left alone.
    The load of other processes is not looked at (see the module docstring)."""
    import torch

    now = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return now
    n = min(now, available_cpus())
    if n != now:
        torch.set_num_threads(n)
    return n
