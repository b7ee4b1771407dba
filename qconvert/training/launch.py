"""`qconvert train --nproc-per-node N`: N training processes on this machine, started as torchrun
starts them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT in their
environment), but stopped the way a training run needs.

Why not torchrun itself: when torchrun receives SIGTERM or SIGINT it forwards the signal, gives its
processes 30 seconds (then SIGKILL, possibly in the middle of writing a checkpoint), and exits 1 with
its own traceback (``SignalException``), whatever the processes did. Here a signal is passed on to
every process, the launcher waits for all of them to save the checkpoint and exit (a second signal
kills them at once), and then exits as one process would: 130 after Ctrl-C, 143 after SIGTERM, with
rank 0's one line saying where the checkpoint is. A process that fails ends the others (they would
wait for it forever in the next collective: after GRACE_S they are killed) and the launcher exits 1.
Rank 0's output is passed through as it comes; another rank's (warnings and errors only: the other
ranks log nothing) is shown when that rank failed first and rank 0 did not fail alike, so an error
every process meets (a missing file) is one line, not one per process.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

#: exit codes of a process that saved a checkpoint and stopped on a signal (qconvert.cli.main)
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
#: after one process fails, how long the others may take to end by themselves before they are killed
GRACE_S = 10.0
#: a rank that fails this much before rank 0 is the cause: its stderr is shown (rank 0's error is a consequence)
ECHO_AFTER_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, n: int, port: int) -> dict[str, str]:
    """The environment of process ``rank`` of ``n``: torchrun's variables, one thread per process
    unless OMP_NUM_THREADS says otherwise (torchrun's default too)."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(n: int, args: list[str]) -> int:
    """Run ``qconvert ARGS`` as ``n`` processes; returns the exit code (see the module docstring)."""
    port = _free_port()
    logs = [tempfile.TemporaryFile() for _ in range(n - 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "qconvert", *args], env=worker_env(r, n, port),
                              stderr=None if r == 0 else logs[r - 1]) for r in range(n)]
    got: list[int] = []

    def on_signal(signum, frame) -> None:
        got.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if len(got) > 1 else signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = _wait(procs)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed and len(got) < 2:  # (after a second signal, the processes were killed on purpose)
        first = min(failed, key=failed.get)
        code = procs[first].returncode
        if code < 0:  # killed from outside (the kernel's out-of-memory killer...): it could say nothing
            from ..errors import cli_lines

            print("\n".join(cli_lines(f"training process {first} of {n} was killed by {signal.Signals(-code).name}",
                                       "out of memory? lower --batch-size or --max-length, or use fewer processes")), file=sys.stderr)
        elif first != 0 and failed.get(0, math.inf) - failed[first] > ECHO_AFTER_S:  # rank 0 did not fail first, or not alike
            logs[first - 1].seek(0)
            sys.stderr.write(logs[first - 1].read().decode("utf-8", "replace"))
        return 1
    if got:
        return 128 + got[0]
    return procs[0].returncode


def _wait(procs: list[subprocess.Popen]) -> dict[int, float]:
    """Wait for every process. Once one fails, the others get GRACE_S to end by themselves (they
    usually fail alike, or at their next collective), then are killed. Returns {rank: when it failed}
    for the ranks that failed by themselves (empty when none did)."""
    failed: dict[int, float] = {}
    deadline = math.inf
    while True:
        now = time.monotonic()
        for r, p in enumerate(procs):
            c = p.poll()
            if c is not None and c != 0 and c not in INTERRUPTED and r not in failed:
                failed[r] = now
                deadline = min(deadline, now + GRACE_S)
        if all(p.poll() is not None for p in procs):
            return failed
        if now > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return failed
        time.sleep(0.1)
