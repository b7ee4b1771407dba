"""A short single-process train at several torch thread counts, alone and beside busy processes.

    .venv/bin/python tools/bench_train_threads.py [--busy 0 1] [--reps 2] [--steps 4] [--baseline-src DIR]

Issue 24 item 6: torch's intra-op threads meet at the end of every op, so on a CPU that other work
keeps busy a thread count above the CPUs really free makes every op wait for a descheduled thread.
For each level in --busy it starts that many busy processes (each spins one CPU in pure Python; they
are stopped when the level is done), then times, each in a fresh process, ``train`` on a tiny 4-bit
Llama (hidden 256, 2 layers, 32 text records, batch 4, --max-steps) at torch threads 1 and 2 and at
qconvert's own choice (``cap_torch_threads``, as the CLI makes it; --baseline-src DIR also times the
choice of the qconvert package in DIR, e.g. an older commit unpacked with ``git archive``). One JSON
line per run: the threads used, the seconds of the train call (model load to adapter written), the
final loss (the same at every thread count) and the one-minute load average before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
code, work, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, code)
import torch
import qconvert
assert qconvert.__file__.startswith(code), qconvert.__file__
if mode.startswith("auto"):
    from qconvert._cpus import cap_torch_threads
    n = cap_torch_threads()
else:
    n = int(mode)
    torch.set_num_threads(n)
from qconvert.training.loop import train
t = time.perf_counter()
r = train(work + "/q", work + "/data.jsonl", work + "/out-" + mode, max_steps=steps, batch_size=4, grad_accum=1, lr=1e-3,
          lora_r=8, backend="reference", max_length=64, progress=False, overwrite=True)
print(json.dumps({"threads": n, "seconds": round(time.perf_counter() - t, 2), "loss": r["loss"]}))
"""


def build(work: Path) -> None:
    """A tiny bf16 Llama quantized by qconvert, and 32 text records of 40 words."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_tiny_llama
    from test_train import WORDS, make_tokenizer

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_tiny_llama(work / "src", hidden=256, intermediate=512, layers=2, dtype=torch.bfloat16)
    make_tokenizer(src)
    quantize_checkpoint(str(src), work / "q")
    rng = random.Random(0)
    (work / "data.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                                             for _ in range(32)))


def timed(mode: str, code: str, work: Path, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "QCONVERT_THREADS")}
    env["PYTHONPATH"] = code
    r = subprocess.run([sys.executable, "-c", CHILD, code, str(work), mode, str(steps)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="competing busy processes, one level each")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--baseline-src", help="a folder holding another qconvert package: its thread choice is timed too")
    a = ap.parse_args()
    modes = [("1", str(ROOT)), ("2", str(ROOT)), ("auto", str(ROOT))]
    if a.baseline_src:
        modes.append(("auto-baseline", str(Path(a.baseline_src).resolve())))
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        build(work)
        for busy in a.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for rep in range(a.reps):
                    for mode, code in modes:
                        load = os.getloadavg()[0]
                        r = timed(mode, code, work, a.steps)
                        print(json.dumps({"busy": busy, "rep": rep, "mode": mode, **r, "loadavg1_before": round(load, 2)}), flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
