"""Eval benchmark: `qconvert eval`'s scoring with an adapter against transformers + bitsandbytes + PEFT,
same 4-bit checkpoint, same adapter, same examples, one run.

    .venv/bin/python tools/bench_eval.py [--reps 3] [--dtypes float32 bfloat16] [--examples 32]
                                         [--batch-size 8] [--hidden 256] [--layers 4] [--vocab 8000] [--threads N]

The model is tools/bench_cpu_qlora.py's (a random Llama, hidden 256, intermediate 704, 4 layers,
vocab 8000, bf16, quantized by qconvert: NF4, block size 64, double quant); the adapter a random LoRA
(r=16, alpha 32, on every linear layer, B nonzero so that it changes the loss). The data: --examples
records of 64 to 128 random tokens, the first quarter of each unlabelled (a prompt), as
``qconvert eval`` scores a completion.

What each side runs is what ``qconvert eval MODEL DATA --adapter DIR`` runs once the data is
tokenized: qconvert: ``qconvert.load_model`` (the 4-bit model on qconvert's kernels, all in the compute
dtype) with the adapter attached by ``PeftModel.from_pretrained`` (as runtime.attach_adapter does);
anchor: transformers + bitsandbytes' Linear4bit (compute_dtype set to the same dtype) with the same
adapter attached the same way. Both are scored by the same function, ``qconvert.run.evaluate.score``
(batched forward, token-weighted next-token cross-entropy over the labelled tokens), so the loop
around the model is identical and only the model differs. One warm-up pass each, then --reps passes
taken in turn; the median scored tokens per second, the ratio, and both losses (they agree to
rounding: same weights, same adapter) are printed with the load average and the time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_cpu_qlora import alternate, build, conditions, dense_dtypes, load_pair, parse_model_options  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(qdir: Path, out: Path, r: int = 16) -> Path:
    """A random PEFT LoRA adapter on every linear layer of ``qdir`` (B nonzero: it changes the loss)."""
    from safetensors.torch import save_file

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.model.checks import quant_shapes

    g = torch.Generator().manual_seed(2)
    sd = {}
    for k, (o, i) in sorted(quant_shapes(Checkpoint(qdir)).items()):
        if k.split(".")[-2] in LINEAR:
            p = "base_model.model." + k.removesuffix(".weight")
            sd[p + ".lora_A.weight"] = torch.randn(r, i, generator=g) / i ** 0.5
            sd[p + ".lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(LINEAR), "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False}))
    return out


def examples(n: int, vocab: int) -> list:
    """``n`` records of 64-128 random tokens; the first quarter unlabelled (the prompt), as eval scores targets."""
    from qconvert.training.data import IGNORE, Example

    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        length = int(torch.randint(64, 129, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (length // 4) + ids[length // 4:]))
    return out


def eval_figures(qdir: Path, adapter: Path, dtype: torch.dtype, data: list, args) -> None:
    from peft import PeftModel

    from qconvert.run.evaluate import score

    anchor, ours = load_pair(qdir, dtype)
    dense = dense_dtypes(anchor, ours)
    models = {"transformers + bitsandbytes + PEFT": PeftModel.from_pretrained(anchor, str(adapter)).eval(),
              "qconvert.load_model + PEFT": PeftModel.from_pretrained(ours, str(adapter)).eval()}
    rows = {}

    def scorer(name, m):
        def run():
            rows[name] = score(m, data, 0, batch_size=args.batch_size)
        return run

    fns = {k: scorer(k, m) for k, m in models.items()}
    for fn in fns.values():
        fn()
    t = alternate(fns, args.reps)
    tokens = next(iter(rows.values()))["tokens"]
    name = str(dtype).replace("torch.", "")
    print(f"\neval scoring with the adapter, {name} compute, {len(data)} examples, batch {args.batch_size}, {tokens} scored tokens "
          "(losses: " + ", ".join(f"{r['loss']:.6f}" for r in rows.values()) + f"; {dense})")
    for k, v in t.items():
        print(f"  {k:<36} {tokens / v:9.0f} scored tok/s  ({v:.3f} s a pass)")
    a, q = t.values()
    print(f"  speed-up (anchor time / qconvert time): {a / q:.2f}x (goal >= 1.5x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = parse_model_options(ap)
    import bitsandbytes
    import peft
    import transformers

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}, {os.cpu_count()} CPUs")
    print(f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}; "
          "NF4, block size 64, double quant; LoRA r=16 on every linear layer")
    print(f"start: {conditions()}")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        qdir = build(Path(d), args)
        adapter = make_adapter(qdir, Path(d) / "adapter")
        data = examples(args.examples, args.vocab)
        for name in args.dtypes:
            eval_figures(qdir, adapter, getattr(torch, name), data, args)
    print(f"\nend:   {conditions()} ({time.perf_counter() - t:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
