"""CPU dequantization throughput: torch.ops.qconvert.dequantize_4bit vs bitsandbytes' dequantize_4bit,
and a plain copy of the output bytes, same weight, one run.

    .venv/bin/python tools/bench_dequant.py [--size 4096] [--reps 9] [--blocksize 64] [--no-double-quant]
                                            [--dtype bfloat16] [--threads N]

The weight: a --size x --size matrix of --dtype (default 4096x4096 bfloat16, random, seed 0), NF4,
block size 64, double quantization; bitsandbytes quantizes it (its bytes equal qconvert's, checked).
Before timing, qconvert's output is checked bit-identical to the reference (qconvert.quant.reference)
and to bitsandbytes' output. bitsandbytes 0.50's CPU dequantize is wrong on some shapes
(REFERENCE.md section 9: rows of 16 or 32 values); at the default square shape it agrees, and a
disagreement is printed, not hidden.

Timed, interleaved, median of --reps (each returns a new tensor, as a dequantize does):
- bitsandbytes ``dequantize_4bit`` (torch's intra-op threads; --threads sets them);
- qconvert's op on CPU tensors: the compiled kernel (qconvert/ops/native, OpenMP threads, one per
  available CPU) where it builds, else the torch path;
- qconvert's torch path (quant/fast_dequant.py; its own workers, one per available CPU), which the
  op runs where no C compiler works (or with QCONVERT_CPU_KERNEL=torch);
- ``clone()`` of a tensor of the output's dtype and size: allocating and writing the output bytes,
  the memory-bound floor (the goal: qconvert within 3x of it);
- ``copy_`` into a preallocated tensor: the same bytes without the page faults of fresh memory;
- qconvert into a preallocated output (``qconvert.ops.dequantize_into``): the decoding alone
  (bitsandbytes 0.50 has no CPU kernel for ``dequantize_4bit(out=)``: NotImplementedError).
qconvert asks for huge pages for a fresh output of 32 MiB or more (qconvert/ops/native/calls.py
``fresh``), which is most of its lead over an allocating dequantize; ``QCONVERT_HUGEPAGES=0`` measures
it without.
Prints Mparam/s (wall), the CPU time per call (all threads; less sensitive to a busy machine), the
ratios, the load average and the time, so a figure carries its conditions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_quantize_kernel import cpu_name  # noqa: E402  (tools/ is the script's folder)


def conditions() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {load}"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread): the work done, which a busy
    machine inflates far less than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def describe_huge() -> str:
    """Whether qconvert's fresh outputs of this size get huge pages here: its threshold, the
    QCONVERT_HUGEPAGES switch and the system's transparent huge page mode."""
    from qconvert.ops.native import calls

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    off = os.environ.get(calls.HUGE_ENV, "").strip() == "0"
    return f"from {calls.HUGE_BYTES >> 20} MiB, {calls.HUGE_ENV}={'0: off' if off else 'unset: on'}, system THP mode {mode}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", dest="dq", action="store_false")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads, for bitsandbytes (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes.functional as F

    from qconvert.ops.args import weight_args
    from qconvert.ops.native.build import describe
    from qconvert.quant.fast_cpu import default_workers, quantize_4bit_fast
    from qconvert.quant.fast_dequant import dequantize_4bit_fast
    from qconvert.quant.reference import dequantize_4bit_ref

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dtype)
    n = x.numel()
    qt = quantize_4bit_fast(x, "nf4", args.blocksize, args.dq)
    packed, state = F.quantize_4bit(x, blocksize=args.blocksize, quant_type="nf4", compress_statistics=args.dq)
    assert torch.equal(packed.reshape(-1), qt.packed.reshape(-1)), "bitsandbytes' codes differ from qconvert's"
    wargs = weight_args(qt)

    def qconvert_dq():
        return torch.ops.qconvert.dequantize_4bit(*wargs, dtype)

    def bnb_dq():
        return F.dequantize_4bit(packed, state)

    def torch_path_dq():
        return dequantize_4bit_fast(qt, dtype)

    ours = qconvert_dq()
    assert torch.equal(bits(ours), bits(dequantize_4bit_ref(qt, dtype))), "qconvert differs from the reference"
    assert torch.equal(bits(torch_path_dq()), bits(ours)), "the torch path differs from the op"
    theirs = bnb_dq()
    agree = bool(torch.equal(bits(ours), bits(theirs.to(dtype))))
    src, dst = torch.empty_like(ours), torch.empty_like(ours)
    src.fill_(1.0)
    dst.copy_(src)
    our_out = torch.zeros_like(ours)  # (its pages faulted once, before timing)
    from qconvert.ops import dequantize_into

    runs = {"bitsandbytes dequantize_4bit": bnb_dq, "qconvert dequantize_4bit": qconvert_dq, "qconvert torch path": torch_path_dq,
            "clone (allocate + write the output)": src.clone, "copy_ into a preallocated tensor": lambda: dst.copy_(src),
            "qconvert into a preallocated tensor": lambda: dequantize_into(qt, our_out)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    start = conditions()
    for _ in range(args.reps):
        for name, fn in runs.items():
            c, t = cpu_seconds(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(cpu_seconds() - c)
    rate = {k: n / statistics.median(v) / 1e6 for k, v in times.items()}
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"bitsandbytes {__import__('bitsandbytes').__version__}; qconvert {default_workers()} workers; op's CPU kernel: {describe()}")
    print(f"weight: {args.size}x{args.size} {args.dtype}, nf4, blocksize {args.blocksize}, double quant {'on' if args.dq else 'off'}; "
          f"median of {args.reps} interleaved runs")
    print(f"start: {start}\nend:   {conditions()}")
    print(f"outputs: qconvert = reference (bit for bit); qconvert = bitsandbytes: {'yes' if agree else 'NO (see REFERENCE.md section 9)'}\n")
    print(f"{'':<36} {'wall':>15}  {'':>10}  {'CPU time, all threads':>21}")
    for name, r in rate.items():
        print(f"{name:<36} {r:9.1f} Mparam/s  ({statistics.median(times[name]) * 1e3:7.2f} ms)  "
              f"{statistics.median(cpu[name]) * 1e3:8.2f} ms")
    q = rate["qconvert dequantize_4bit"]
    print(f"\nqconvert / bitsandbytes: {q / rate['bitsandbytes dequantize_4bit']:.2f}x (goal >= 2x); "
          f"torch path / bitsandbytes: {rate['qconvert torch path'] / rate['bitsandbytes dequantize_4bit']:.2f}x")
    print(f"qconvert time / clone time: {rate['clone (allocate + write the output)'] / q:.2f}x (goal <= 3x)")
    print(f"qconvert time / copy_ time: {rate['copy_ into a preallocated tensor'] / q:.2f}x")
    pre = rate["copy_ into a preallocated tensor"] / rate["qconvert into a preallocated tensor"]
    print(f"qconvert into a preallocated tensor (the decoding alone, no page faults) / copy_ time: {pre:.2f}x; "
          f"qconvert's fresh output asked for as huge pages: {describe_huge()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
