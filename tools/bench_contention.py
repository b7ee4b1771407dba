"""Speed on a shared CPU: qconvert (default workers, and --workers 1) against the anchors while N
competing busy processes run, all in one run.

    .venv/bin/python tools/bench_contention.py [--busy 1 2] [--layers 8] [--reps 3] [--kernel-reps 5]
                                               [--no-convert] [--no-kernel] [--baseline-src DIR]

For each competition level in --busy, it starts that many busy processes (each spins one CPU in
pure Python and exits by itself after --busy-seconds; they are also stopped as soon as the level is
done), then measures, interleaved and repeated:

- kernel: bitsandbytes ``quantize_4bit`` against qconvert's fast CPU quantizer at its default
  worker count and at one worker, on a 4096x4096 bf16 matrix, NF4 block 64, with and without double
  quantization (median Mparam/s; outputs checked byte-identical first);
- conversion: transformers + bitsandbytes quantize-on-load + save_pretrained against
  ``quantize_checkpoint`` at its default worker count and at one worker, each in its own process,
  on the Llama-shaped bf16 checkpoint of tools/bench_quantize.py with --layers layers (8 layers:
  200M parameters, 0.40 GB; median wall seconds). Every output tensor is compared with the anchor's.

It prints the ratios the issue sets goals for: qconvert default against the anchor (goal >= 3x) and
default against --workers 1 (goal: never more than 1.5x slower). --baseline-src DIR also times, in
the conversion, the qconvert package found in DIR at its defaults (e.g. an older commit unpacked
with ``git archive``), for a before/after in the same conditions.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_quantize import BENCH, CHILD, make_checkpoint, same_tensors  # noqa: E402
from bench_quantize_kernel import cpu_name  # noqa: E402

KERNEL_CHILD = r"""
import json, statistics, sys, time, torch
from qconvert.quant.fast_cpu import quantize_4bit_fast
x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
out = {}
for dq in (False, True):
    quantize_4bit_fast(x, "nf4", 64, dq)
    ts = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        quantize_4bit_fast(x, "nf4", 64, dq)
        ts.append(time.perf_counter() - t)
    out[str(dq)] = x.numel() / statistics.median(ts) / 1e6
print(json.dumps(out))
"""

SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


class Busy:
    """``n`` processes that each keep one CPU busy until ``seconds`` pass or the block ends."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds, self.procs = n, seconds, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(self.seconds)]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)  # let them get going
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def convert(label: str, mode: str, src: Path, out: Path, workers: str = "", pythonpath: str = "") -> float:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), workers], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{label} failed:\n{r.stderr[-3000:]}")
    return wall


def same_files(a: Path, b: Path) -> bool:
    fa, fb = sorted(p.name for p in a.glob("*.safetensors")), sorted(p.name for p in b.glob("*.safetensors"))
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def baseline_kernel(reps: int, pythonpath: str) -> dict:
    """Mparam/s of the qconvert package in ``pythonpath`` at its defaults (its own process, so not
    interleaved with the others: run right after them, under the same competition)."""
    env = dict(os.environ, PYTHONPATH=pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", KERNEL_CHILD, str(reps)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"baseline kernel failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kernel_level(reps: int) -> list[dict]:
    import bitsandbytes.functional as F
    import torch

    from qconvert.quant.fast_cpu import default_workers, quantize_4bit_fast

    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    n, rows = x.numel(), []
    for dq in (False, True):
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        for w in (None, 1):
            qt = quantize_4bit_fast(x, "nf4", 64, dq, workers=w)
            assert torch.equal(packed, qt.packed) and torch.equal(st.absmax, qt.absmax), "outputs differ"
            if dq:
                assert torch.equal(st.state2.absmax, qt.nested_absmax) and st.offset.item() == qt.nested_offset, "outputs differ"
        times: dict[str, list[float]] = {"bnb": [], "default": [], "w1": []}
        for _ in range(reps):
            for key, fn in (
                ("bnb", lambda: F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)),
                ("default", lambda: quantize_4bit_fast(x, "nf4", 64, dq)),
                ("w1", lambda: quantize_4bit_fast(x, "nf4", 64, dq, workers=1)),
            ):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        rate = {k: n / statistics.median(v) / 1e6 for k, v in times.items()}
        rows.append({"double_quant": dq, "workers": default_workers(), "torch_threads": torch.get_num_threads(), **rate})
    return rows


def convert_level(src: Path, reps: int, baseline: str | None) -> dict:
    runs = [("anchor", "anchor", ""), ("default", "qconvert", ""), ("w1", "qconvert", "1")]
    if baseline:
        runs.append(("baseline", "qconvert", ""))
    times: dict[str, list[float]] = {k: [] for k, _, _ in runs}
    for _ in range(reps):
        for key, mode, workers in runs:
            path = baseline if key == "baseline" else ""
            times[key].append(convert(key, mode, src, BENCH / f"out-contention-{key}", workers, path))
    checks = {
        "default_vs_anchor": same_tensors(BENCH / "out-contention-default", BENCH / "out-contention-anchor"),
        "w1_vs_default_files": same_files(BENCH / "out-contention-w1", BENCH / "out-contention-default"),
    }
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "all": times, **checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, nargs="+", default=[1, 2], help="competing busy processes, one level each (default: 1 2)")
    ap.add_argument("--busy-seconds", type=float, default=900, help="lifetime cap of each busy process (they are stopped earlier)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="conversions per tool and level (median)")
    ap.add_argument("--kernel-reps", type=int, default=5)
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--no-kernel", action="store_true")
    ap.add_argument("--baseline-src", help="a folder holding another qconvert package, timed at its defaults")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each level's lines as soon as they are measured
    from qconvert._cpus import affinity_cpus, available_cpus, cgroup_cpu_limit

    t0 = time.perf_counter()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, affinity {affinity_cpus()}, cgroup quota {cgroup_cpu_limit() or 'none'}, "
          f"qconvert default workers {available_cpus()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (other work on the machine counts too)")
    src = None
    if not args.no_convert:
        src = make_checkpoint(args.layers)
        gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
        print(f"conversion model: {src.name}, {gb:.2f} GB bf16; median of {args.reps}, tools interleaved")
    results = []
    for level in args.busy:
        with Busy(level, args.busy_seconds):
            load = os.getloadavg()[0]
            k = [] if args.no_kernel else kernel_level(args.kernel_reps)
            if k and args.baseline_src:
                for r, (dq, rate) in zip(k, baseline_kernel(args.kernel_reps, args.baseline_src).items()):
                    r["baseline"] = rate
            c = None if args.no_convert else convert_level(src, args.reps, args.baseline_src)
        results.append({"busy": level, "kernel": k, "convert": c})
        print(f"\n== {level} competing busy process(es); load average at start {load:.2f}")
        for r in k:
            print(f"kernel 4096x4096 bf16, double quant {'yes' if r['double_quant'] else 'no '}: bitsandbytes {r['bnb']:6.1f} Mp/s, "
                  f"qconvert default ({r['workers']} workers) {r['default']:6.1f}, --workers 1 {r['w1']:6.1f}; "
                  f"default/bitsandbytes {r['default'] / r['bnb']:.1f}x, default/--workers 1 {r['default'] / r['w1']:.2f}x"
                  + (f"; baseline {r['baseline']:.1f} Mp/s" if "baseline" in r else ""))
        if c:
            s = c["seconds"]
            line = (f"conversion: transformers+bitsandbytes {s['anchor']:.1f} s, qconvert default {s['default']:.1f} s, "
                    f"--workers 1 {s['w1']:.1f} s")
            if "baseline" in s:
                line += f", baseline ({args.baseline_src}) {s['baseline']:.1f} s"
            print(line)
            print(f"  speed-up over the anchor {s['anchor'] / s['default']:.1f}x (goal >= 3x); default takes "
                  f"{s['default'] / s['w1']:.2f}x the time of --workers 1 (goal <= 1.5x)")
            print(f"  every tensor identical to the anchor: {c['default_vs_anchor']}; --workers 1 files identical to default: "
                  f"{c['w1_vs_default_files']}; runs: " + json.dumps({k: [round(x, 1) for x in v] for k, v in c["all"].items()}))
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
