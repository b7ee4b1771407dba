"""GPU kernel benchmark: qconvert's Triton kernels vs bitsandbytes, in one run (needs CUDA).

    python tools/bench_kernels.py            # Llama-7B and Llama-70B layer shapes

First checks, on the GPU: qconvert's dequant is bit-identical to the reference (run on the GPU) and
to bitsandbytes' dequantize_4bit. Then times, with CUDA events (median of 50 after 10 warm-ups):
- dequantize to bf16: qconvert triton vs bitsandbytes dequantize_4bit vs a device-to-device copy of
  the same bytes, in GB/s counting bytes read + written (goals: >= 1.3x bitsandbytes, >= 85% of copy);
- batch-1 matmul: qconvert's fused kernel vs bitsandbytes' gemv_4bit (via matmul_4bit);
- forward + input-gradient backward of a 4-bit linear at training batch (4096 tokens): qconvert's
  Linear4bit (one-pass dequant + cuBLAS, re-dequantized in backward) vs bitsandbytes' matmul_4bit;
- at 16 rows, the fused kernel vs dequant + cuBLAS (to place SMALL_BATCH).
Prints a table and the ratios. Nothing here has been run on a GPU by this project yet.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

SHAPES = {
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}


def timed(fn, reps=50, warm=10) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; run it on a GPU machine (see tools/run_gpu_checks.sh)", file=sys.stderr)
        return 2
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qconvert.nn.linear4bit import Linear4bit
    from qconvert.ops.bnb import bnb_state
    from qconvert.ops.triton.launch import Launcher
    from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref

    tb = Launcher()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}, {time.strftime('%Y-%m-%d')}")
    crossover = []
    print(f"{'shape':14} {'dq GB/s':>8} {'bnb GB/s':>9} {'copy GB/s':>10} {'vs bnb':>7} {'of copy':>8} {'gemv us':>8} {'bnb us':>7} {'ratio':>6} {'fwd+bwd ms':>11} {'bnb ms':>7} {'ratio':>6}")
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        qt = quantize_4bit_ref(w, "nf4", 64, True)
        ours = tb.dequantize(qt, torch.bfloat16)
        assert torch.equal(ours, dequantize_4bit_ref(qt)), f"{name}: triton != reference on GPU"
        st = bnb_state(qt)
        theirs = F.dequantize_4bit(qt.packed, st).reshape(qt.shape)
        same = torch.equal(ours, theirs)
        moved = qt.packed.numel() + qt.absmax.numel() + qt.nested_absmax.numel() * 4 + n * k * 2
        t_ours = timed(lambda: tb.dequantize(qt, torch.bfloat16))
        t_bnb = timed(lambda: F.dequantize_4bit(qt.packed, st))
        src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_copy = timed(lambda: dst.copy_(src))
        gbs = lambda t: moved / t / 1e9  # noqa: E731
        x1 = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        t_gemv = timed(lambda: tb.gemv(x1, qt))
        t_bgemv = timed(lambda: bnb.matmul_4bit(x1, qt.packed.t(), quant_state=st))
        # the small-batch crossover: fused kernel vs one-pass dequant + cuBLAS at 16 rows
        x16 = torch.randn(16, k, device=dev, dtype=torch.bfloat16)
        t_f16 = timed(lambda: tb.gemv(x16, qt))
        t_d16 = timed(lambda: torch.nn.functional.linear(x16, tb.dequantize(qt, torch.bfloat16)))
        crossover.append((name, t_f16, t_d16))
        # training: the Linear4bit module itself (the op's backward re-dequantizes the weight)
        lin = Linear4bit(qt, None, "triton", torch.bfloat16)
        xb = torch.randn(4096, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(4096, n, device=dev, dtype=torch.bfloat16)

        def ours_fb():
            y = lin(xb)
            y.backward(gy)

        def bnb_fb():
            y = bnb.matmul_4bit(xb, qt.packed.t(), quant_state=st)
            y.backward(gy)

        t_fb, t_bfb = timed(ours_fb, 10, 3), timed(bnb_fb, 10, 3)
        print(f"{name:14} {gbs(t_ours):8.0f} {gbs(t_bnb):9.0f} {gbs(t_copy):10.0f} {t_bnb / t_ours:7.2f} {t_copy / t_ours:8.0%} "
              f"{t_gemv * 1e6:8.1f} {t_bgemv * 1e6:7.1f} {t_bgemv / t_gemv:6.2f} {t_fb * 1e3:11.2f} {t_bfb * 1e3:7.2f} {t_bfb / t_fb:6.2f}"
              + ("" if same else "  (bitsandbytes' dequant differs in some elements)"))
    print("\n16 rows: fused kernel vs dequantize + cuBLAS (SMALL_BATCH in triton_backend.py is 16)")
    for name, t_f16, t_d16 in crossover:
        print(f"{name:14} fused {t_f16 * 1e6:8.1f} us  dequant+matmul {t_d16 * 1e6:8.1f} us  -> {'fused' if t_f16 < t_d16 else 'dequant+matmul'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
