"""Quantization throughput: qconvert vs bitsandbytes' quantize_4bit, same input, one run.

    .venv/bin/python tools/bench_quantize_kernel.py [--size 4096] [--reps 7] [--threads N] [--workers N]
    python3 tools/bench_quantize_kernel.py --device cuda      # on a GPU: the Triton kernel behind the op

On CPU: qconvert's fast path (quant/fast_cpu.py). On CUDA: ``torch.ops.qconvert.quantize_4bit`` (Triton
codes and scales, double quantization on the CPU path), checked byte-identical to the CPU reference;
bitsandbytes' CUDA kernel is timed beside it and its agreement with the reference is printed (its
rounding of ties is its own), not asserted.

Both quantize the same 4096x4096 bf16 matrix (NF4, blocksize 64) with and without double quantization;
runs are interleaved and the median is reported. Before timing, the outputs are checked to be
byte-identical (codes, absmax, nested absmax). --threads sets torch's thread count, which
bitsandbytes uses; qconvert runs --workers threads of its own (default: one per available CPU).
tools/bench_contention.py runs both with competing busy processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads, for bitsandbytes (0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="qconvert's worker threads (0: one per available CPU)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    if args.device == "cuda":
        return main_cuda(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes.functional as F

    from qconvert.quant.fast_cpu import default_workers, quantize_4bit_fast

    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    n = x.numel()
    workers = args.workers or default_workers()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"qconvert {workers} workers")
    print(f"input: {args.size}x{args.size} bfloat16, nf4, blocksize 64; median of {args.reps} interleaved runs\n")
    print(f"{'double quant':>12}  {'bitsandbytes':>14}  {'qconvert':>14}  {'ratio':>6}")
    for dq in (False, True):
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        qt = quantize_4bit_fast(x, "nf4", 64, dq, workers=workers)
        assert torch.equal(packed, qt.packed) and torch.equal(st.absmax, qt.absmax), "outputs differ"
        if dq:
            assert torch.equal(st.state2.absmax, qt.nested_absmax) and st.offset.item() == qt.nested_offset
        tb, tq = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
            tb.append(time.perf_counter() - t)
            t = time.perf_counter()
            quantize_4bit_fast(x, "nf4", 64, dq, workers=workers)
            tq.append(time.perf_counter() - t)
        b, q = n / statistics.median(tb) / 1e6, n / statistics.median(tq) / 1e6
        print(f"{'yes' if dq else 'no':>12}  {b:9.1f} Mp/s  {q:9.1f} Mp/s  {q / b:5.1f}x")


def main_cuda(args) -> None:
    import bitsandbytes.functional as F

    from qconvert import ops
    from qconvert.quant.fast_cpu import quantize_4bit_fast

    x_cpu = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = x_cpu.cuda()
    n = x.numel()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"input: {args.size}x{args.size} bfloat16, nf4, blocksize 64; median of {args.reps} interleaved runs\n")
    print(f"{'double quant':>12}  {'bitsandbytes':>14}  {'qconvert':>14}  {'ratio':>6}  bnb codes = reference")

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for dq in (False, True):
        ref = quantize_4bit_fast(x_cpu, "nf4", 64, dq)
        qt = ops.quantize(x, "nf4", 64, dq)
        assert torch.equal(qt.packed.cpu(), ref.packed) and torch.equal(qt.absmax.cpu(), ref.absmax), "qconvert differs from the reference"
        if dq:
            assert torch.equal(qt.nested_absmax.cpu(), ref.nested_absmax) and qt.nested_offset == ref.nested_offset
        packed, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        agree = (packed.cpu() == ref.packed).float().mean().item()
        tb, tq = [], []
        for _ in range(args.reps):
            tb.append(timed(lambda: F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)))
            tq.append(timed(lambda: ops.quantize(x, "nf4", 64, dq)))
        b, q = n / statistics.median(tb) / 1e6, n / statistics.median(tq) / 1e6
        print(f"{'yes' if dq else 'no':>12}  {b:9.1f} Mp/s  {q:9.1f} Mp/s  {q / b:5.1f}x  {agree:.6f} of bytes")


if __name__ == "__main__":
    main()
