"""Helpers for the hostile-input tests (tests/test_hostile_*.py): hand-made safetensors files, and a
child process run under a memory limit and a time limit.

A denial-of-service test must show that bad input is refused within bounded memory and time, and
must not take the test run down with it when it is not: so the work runs in a child process whose
address space is capped with ``RLIMIT_AS`` and which is killed at a deadline.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Address space of a child that has imported torch and qconvert is about 0.6 GB here; this leaves
#: room for real work on tiny models and nothing like what a hostile size would ask for.
DEFAULT_LIMIT_MB = 2048


def pack_quant_state(d: dict) -> bytes:
    return json.dumps(d).encode("utf-8")


def write_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> Path:
    """A safetensors file written by hand: ``entries`` maps a name to (dtype string, shape, raw bytes),
    laid out in the order given. Lets a test build headers no library would write."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in entries.values():
            f.write(data)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run_limited(code: str, *args: str, mem_mb: int = DEFAULT_LIMIT_MB, timeout_s: float = 60, cwd: Path | None = None):
    """Run ``python -c code args...`` with its address space capped at ``mem_mb`` MiB and killed after
    ``timeout_s``. Returns (CompletedProcess, seconds). A child past its deadline fails the test."""
    limit = mem_mb * 2**20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                           timeout=timeout_s, preexec_fn=cap, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still running after {timeout_s} s (unbounded time on hostile input): {e.stderr!r}") from None
    return r, time.perf_counter() - t0
