"""CPU QLoRA training step and greedy generation: qconvert.load_model + PEFT vs transformers +
bitsandbytes + PEFT, same 4-bit checkpoint, same data, one run.

    .venv/bin/python tools/bench_cpu_qlora.py [--steps 6] [--reps 3] [--dtypes float32 bfloat16]
                                              [--hidden 256] [--layers 4] [--vocab 8000] [--threads N]

The model: a random Llama (hidden 256, intermediate 704, 4 layers, 4 heads, vocab 8000), bf16,
quantized by qconvert (NF4, block size 64, double quant); transformers loads the same folder with
bitsandbytes. For each compute dtype (float32, bfloat16): both models in that dtype (bitsandbytes'
Linear4bit compute_dtype set to it), LoRA r=16 alpha=32 on all linear layers, AdamW, batch 2 x 128;
two warm-up steps, then --steps steps of each side taken in turn (so both see the same machine), and
the median step time. Then greedy generation of 32 new tokens from a 16-token prompt on the base
models (no LoRA), in each compute dtype, --reps times each in turn: the median tokens per second
(the line names the dtype of each side's unquantized tensors: the anchor keeps them in bf16). The first step's losses
of the two sides are printed beside each other (the same weights: they agree to float rounding).

Prints the ratios (anchor time / qconvert time: above 1 means qconvert is faster), the load average
and the time, so the figures carry their conditions. With --threads 1 --steps 4 --reps 2 it took 64 s
on the project's shared 2-core VM at load average 13.6 (2026-12-06); with torch's two threads at that
load a step took 19 s (its threads wait on each other), so give --threads 1 on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def conditions() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {load}"


def build(tmp: Path, args) -> Path:
    from helpers import make_tiny_llama

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_tiny_llama(tmp / "src", hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                          heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 64), vocab=args.vocab,
                          dtype=torch.bfloat16)
    quantize_checkpoint(str(src), tmp / "q")
    return tmp / "q"


def load_pair(qdir: Path, dtype: torch.dtype):
    """(transformers + bitsandbytes model, qconvert model), both computing in ``dtype``."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    import qconvert

    anchor = AutoModelForCausalLM.from_pretrained(qdir, dtype=dtype)
    for m in anchor.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype
    return anchor, qconvert.load_model(qdir, dtype=dtype)


def trainer(model, batch):
    """A closure running one QLoRA step of ``model`` (LoRA on every linear layer, AdamW); returns the loss."""
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    m.train()

    def step() -> float:
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def alternate(fns: dict, reps: int) -> dict[str, float]:
    """The median wall time of each function, calling them in turn ``reps`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def train_figures(qdir: Path, dtype: torch.dtype, args) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (2, 128), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    anchor, ours = load_pair(qdir, dtype)
    steps = {"transformers + bitsandbytes + PEFT": trainer(anchor, batch), "qconvert.load_model + PEFT": trainer(ours, batch)}
    first = {k: fn() for k, fn in steps.items()}
    for fn in steps.values():
        fn()
    t = alternate(steps, args.steps)
    name = str(dtype).replace("torch.", "")
    print(f"\ntraining step, {name} compute, batch 2 x 128 (first losses: "
          + ", ".join(f"{v:.6f}" for v in first.values()) + ")")
    for k, v in t.items():
        print(f"  {k:<36} {v:8.4f} s")
    a, q = t.values()
    print(f"  speed-up (anchor / qconvert): {a / q:.2f}x (goal >= 1.5x)")


def dense_dtypes(anchor, ours) -> str:
    """What each side's unquantized tensors (embedding, norms, head) are in: transformers + bitsandbytes
    keep the checkpoint's bf16 there whatever ``dtype`` asks (transformers 5.23), and bitsandbytes'
    CPU inference kernel multiplies in bf16 on an AVX512-BF16 CPU, so its "float32" generation and eval
    compute in bf16."""
    return f"unquantized tensors: anchor {anchor.lm_head.weight.dtype}, qconvert {ours.lm_head.weight.dtype}".replace("torch.", "")


def generation_figures(qdir: Path, dtype: torch.dtype, args) -> None:
    anchor, ours = load_pair(qdir, dtype)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    outs = {}

    def gen(name, m):
        def run():
            with torch.no_grad():
                outs[name] = m.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        return run

    fns = {"transformers + bitsandbytes": gen("anchor", anchor.eval()), "qconvert.load_model": gen("ours", ours.eval())}
    for fn in fns.values():
        fn()
    t = alternate(fns, args.reps)
    same = torch.equal(outs["anchor"], outs["ours"])
    print(f"\ngreedy generation, {str(dtype).replace('torch.', '')}, 32 new tokens after 16 (same tokens: {'yes' if same else 'no'}; "
          f"{dense_dtypes(anchor, ours)})")
    for k, v in t.items():
        print(f"  {k:<36} {32 / v:8.1f} tok/s")
    a, q = t.values()
    print(f"  speed-up (anchor time / qconvert time): {a / q:.2f}x (goal >= 1.5x)")
    (at, al, _), (qt, ql, qbytes) = layer_share(anchor, fns["transformers + bitsandbytes"]), layer_share(ours, fns["qconvert.load_model"])
    print(f"  in the 4-bit layers (forward hooks, best of 3 more calls): anchor {al * 1e3:.0f} of {at * 1e3:.0f} ms, "
          f"qconvert {ql * 1e3:.0f} of {qt * 1e3:.0f} ms ({qbytes * 32 / ql / 1e9:.1f} GB/s of codes: {qbytes / 1e6:.0f} MB a "
          f"forward, 32 forwards)")
    print(f"  the ratio if qconvert's 4-bit layers took no time: {at / (qt - ql):.2f}x (the rest is transformers' code on both sides)")


def layer_share(model, run, reps: int = 3) -> tuple[float, float, int]:
    """(seconds of one ``run``, seconds of it inside the model's 4-bit layers, bytes of their packed
    codes): the best of ``reps`` calls, each 4-bit layer timed by a forward pre-hook and hook."""
    import bitsandbytes as bnb

    from qconvert.nn.linear4bit import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, Linear4bit))]
    spent, began = [0.0], {}

    def pre(mod, args):
        began[mod] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - began.pop(mod)

    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    best = None
    try:
        for _ in range(reps):
            spent[0] = 0.0
            t = time.perf_counter()
            run()
            got = (time.perf_counter() - t, spent[0])
            best = got if best is None or got[0] < best[0] else best
    finally:
        for h in handles:
            h.remove()
    return (*best, sum(m.weight.numel() * m.weight.element_size() for m in layers))


def parse_model_options(ap: argparse.ArgumentParser):
    """The options this benchmark and bench_eval.py share (repetitions, dtypes, the model's shape,
    torch threads), parsed; the threads set."""
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both sides (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    args = parse_model_options(ap)
    import bitsandbytes
    import transformers

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, {os.cpu_count()} CPUs")
    print(f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}; "
          "NF4, block size 64, double quant")
    from qconvert.ops.native.build import describe

    print(f"qconvert's CPU kernel: {describe()} (QCONVERT_CPU_KERNEL=torch measures the torch path)")
    dtypes = [getattr(torch, name) for name in args.dtypes]
    on_model(args, [lambda q, dt=dt: train_figures(q, dt, args) for dt in dtypes]
             + [lambda q, dt=dt: generation_figures(q, dt, args) for dt in dtypes])
    return 0


def on_model(args, parts) -> None:
    """The start line, the benchmark model built in a temporary folder, each of ``parts`` called on
    its folder in turn, the end line (this script's and bench_cpu_layers.py's run)."""
    print(f"start: {conditions()}")
    with tempfile.TemporaryDirectory() as d:
        qdir = build(Path(d), args)
        for part in parts:
            part(qdir)
    print(f"\nend:   {conditions()}")


if __name__ == "__main__":
    sys.exit(main())
