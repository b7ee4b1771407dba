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

The single-process commands that run torch ops (train, generate, eval, merge) set torch's intra-op
thread count from the same figure (:func:`cap_torch_threads`), and there the present load does
count: torch's threads meet at the end of every op, so one descheduled thread stalls the others
(the quantizer's independent chunks do not). torch's default counts the machine's cores; qconvert
gives one thread per available CPU that is mostly idle over a tenth of a second at start
(:func:`idle_cpus`, /proc/stat), or ``QCONVERT_THREADS``.
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


#: the environment variable that sets torch's threads for train, generate, eval and merge (a count, or auto)
THREADS_ENV = "QCONVERT_THREADS"
#: how long :func:`idle_cpus` watches /proc/stat (10 jiffies per CPU at the usual USER_HZ of 100)
IDLE_SAMPLE_S = 0.1
#: a CPU counts for a thread when at least this much of one is idle (:func:`torch_thread_choice`)
THREAD_IDLE_SHARE = 0.75


def _cpu_idle_total(root: Path, cpus: set[int] | None) -> tuple[int, int] | None:
    """(idle, total) jiffies summed over the ``cpuN`` lines of /proc/stat for N in ``cpus`` (all
    when None); idle counts iowait too. None when the file cannot be read."""
    text = _read(root / "proc/stat")
    if text is None:
        return None
    idle = total = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        try:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is inside user)
        except ValueError:
            return None
        if len(values) < 5:
            return None
        idle += values[3] + values[4]
        total += sum(values)
    return (idle, total) if total else None


def idle_cpus(root: str | os.PathLike = "/", seconds: float = IDLE_SAMPLE_S) -> float | None:
    """How many of this process's CPUs (its affinity) were idle over the next ``seconds``, from
    /proc/stat: 1.0 for a CPU idle the whole time. Unlike the load average this is the present, not
    the past minute, and counts only the CPUs this process may run on. None where /proc/stat is
    unreadable (not Linux) or did not advance."""
    import time

    try:
        mine = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = None
    root = Path(root)
    before = _cpu_idle_total(root, mine)
    if before is None:
        return None
    time.sleep(seconds)
    after = _cpu_idle_total(root, mine)
    if after is None or after[1] <= before[1]:
        return None
    n = len(mine) if mine else max(1, os.cpu_count() or 1)
    return n * (after[0] - before[0]) / (after[1] - before[1])


def torch_thread_choice(available: int, idle: float | None, setting: str | None) -> tuple[int, str]:
    """(torch threads, why) for a single-process command; the decision only, measured values given.
    ``setting``: the QCONVERT_THREADS value (a count wins; "auto" or unset: decide). Otherwise one
    thread per available CPU that is at least THREAD_IDLE_SHARE idle (``idle``: :func:`idle_cpus`),
    at least one: torch's threads meet at the end of every op, so a thread without a CPU of its own
    stalls all the others (a 4-step train measured 1.7-3.1x slower at 2 threads than at 1 beside other
    work on 2 CPUs; docs/quantize.md)."""
    if setting is not None and setting.strip().lower() not in ("", "auto"):
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if not 1 <= n <= 4096:
            raise OptionError(f"{THREADS_ENV}={setting}: not a thread count", hint="give a whole number from 1 to 4096, or auto")
        return n, f"{THREADS_ENV}={n}"
    if idle is None:
        return available, f"{available} available CPU{'s' * (available != 1)} (their load unknown)"
    n = max(1, min(available, math.floor(idle + (1 - THREAD_IDLE_SHARE))))
    return n, f"{idle:.1f} of {available} available CPUs idle; {THREADS_ENV}=N sets it"


_chosen: list[str] = []  # the last choice cap_torch_threads made in this process, for thread_line


def cap_torch_threads() -> int:
    """Set torch's intra-op threads for a single-process command (train, generate, eval, merge) by
    :func:`torch_thread_choice`, never above torch's own default (it counts the machine's cores, not
    a container's quota, the affinity or the other processes' load), and return the count in force.
    ``OMP_NUM_THREADS``, when set, is the user's choice, left alone (``QCONVERT_THREADS`` wins over
    it). The choice is kept for :func:`thread_line`."""
    import torch

    now = torch.get_num_threads()
    setting = os.environ.get(THREADS_ENV, "").strip() or None
    setting = None if setting and setting.lower() == "auto" else setting  # auto: as if unset
    if os.environ.get("OMP_NUM_THREADS") and setting is None:
        n, why = now, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        available = available_cpus()
        n, why = torch_thread_choice(available, idle_cpus() if available > 1 and setting is None else None, setting)
        if setting is None:
            n = min(n, now)
        if n != now:
            torch.set_num_threads(n)
    _chosen[:] = [f"threads: {n} ({why})"]
    return n


def thread_line() -> str:
    """``threads: N (why)`` for a start summary: the choice :func:`cap_torch_threads` made, or
    torch's own setting where it was not called (the library, not the CLI)."""
    import torch

    n = torch.get_num_threads()
    return _chosen[0] if _chosen and _chosen[0].startswith(f"threads: {n} ") else f"threads: {n} (torch's setting)"
