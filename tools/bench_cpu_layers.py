"""A generated token's 4-bit layer calls on CPU: transformers + bitsandbytes' Linear4bit against
qconvert's, same checkpoint, one run, on a quiet CPU and beside busy processes.

    .venv/bin/python tools/bench_cpu_layers.py [--hidden 1024] [--intermediate 2816] [--layers 8]
                                               [--vocab 32000] [--dtypes bfloat16 float32]
                                               [--tokens 100] [--busy 0 1] [--threads N]

The model: bench_cpu_qlora.py's random Llama at the given shape (default hidden 1024, 8 layers: 50 MB
of 4-bit codes), quantized by qconvert, loaded by transformers + bitsandbytes and by
qconvert.load_model in each compute dtype. One "token" calls every 4-bit layer of a side once, in
model order, on one row of x (random, of each layer's input width), under no_grad, as greedy
generation does after the prompt; the codes come from memory, not cache (the model is larger than
the caches). Before timing, every layer's output of the two sides is compared (each side's product is
within float summation order of the exact one, so they agree to about the output dtype's precision).
For each level of --busy (a number of processes that spin one CPU each in pure Python, started
before and stopped after the level), both sides take --tokens tokens in turn; prints best, median and
mean ms a token and the ratio of the means (anchor / qconvert: above 1, qconvert is faster). The mean
is what generation pays: on a shared CPU a few calls wait a whole time slice for a thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_qlora import conditions, load_pair, on_model  # noqa: E402  (tools/ is the script's folder)


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    from qconvert.nn.linear4bit import Linear4bit

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, Linear4bit))]


def token(layers: list, xs: dict) -> None:
    with torch.no_grad():
        for m in layers:
            m(xs[m.in_features])


def busy(n: int) -> list[subprocess.Popen]:
    """n processes spinning one CPU each (they stop by themselves after 10 minutes)."""
    code = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def compare(anchor: list, ours: list, xs: dict, dtype: torch.dtype) -> float:
    """The largest relative difference of the two sides' outputs over all layers (norm-relative)."""
    worst = 0.0
    with torch.no_grad():
        for a, q in zip(anchor, ours, strict=True):
            ya, yq = a(xs[a.in_features]).double(), q(xs[q.in_features]).double()
            worst = max(worst, float((ya - yq).norm() / ya.norm().clamp_min(1e-30)))
    return worst


def figures(qdir: Path, dtype: torch.dtype, args) -> None:
    anchor_model, our_model = load_pair(qdir, dtype)
    anchor, ours = four_bit_layers(anchor_model), four_bit_layers(our_model)
    assert len(anchor) == len(ours) and [m.in_features for m in anchor] == [m.in_features for m in ours]
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1, 1, k, generator=g).to(dtype) for k in sorted({m.in_features for m in ours})}
    diff = compare(anchor, ours, xs, dtype)
    codes = sum(m.weight.numel() * m.weight.element_size() for m in ours)
    name = str(dtype).replace("torch.", "")
    print(f"\n{name}: {len(ours)} layer calls a token, {codes / 1e6:.0f} MB of codes; outputs of the two sides "
          f"within {diff:.1e} of each other (norm-relative)")
    sides = {"transformers + bitsandbytes": anchor, "qconvert.load_model": ours}
    for level in args.busy:
        procs = busy(level)
        try:
            time.sleep(0.5 if level else 0)
            for layers in sides.values():
                token(layers, xs)
            times: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(args.tokens):
                for k, layers in sides.items():
                    t = time.perf_counter()
                    token(layers, xs)
                    times[k].append(time.perf_counter() - t)
            when = conditions()
        finally:
            for p in procs:
                p.kill()
                p.wait()
        print(f"  {level} busy process{'es' if level != 1 else ''} beside ({when}):")
        for k, v in times.items():
            print(f"    {k:<30} best {min(v) * 1e3:6.2f}  median {statistics.median(v) * 1e3:6.2f}  "
                  f"mean {statistics.mean(v) * 1e3:6.2f} ms a token")
        a, q = (statistics.mean(v) for v in times.values())
        print(f"    anchor / qconvert (means): {a / q:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=("float32", "bfloat16"))
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both sides (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes

    from qconvert.ops.native.build import describe

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), bitsandbytes {bitsandbytes.__version__}; "
          f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; NF4, block 64, double quant")
    print(f"qconvert's CPU kernel: {describe()}")
    on_model(args, [lambda q, name=name: figures(q, getattr(torch, name), args) for name in args.dtypes])
    return 0


if __name__ == "__main__":
    sys.exit(main())
