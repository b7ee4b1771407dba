"""QLoRA training step: qconvert train's model vs transformers + PEFT + bitsandbytes, same model, data, batch.

    python tools/bench_train.py                  # GPU: a Llama-shaped model (hidden 2048, 8 layers), batch 4 x 512
    python tools/bench_train.py --tiny           # CPU smoke check that both sides run (not a performance claim)
    python tools/bench_train.py --paged-demo     # GPU: paged AdamW completes under a memory cap where plain AdamW runs out

Both sides: the same 4-bit checkpoint (written by qconvert quantize), LoRA r=64 alpha=16 on all linear
layers, gradient checkpointing, AdamW (paged 32-bit on GPU), bf16 compute on GPU. Reports the median
step time over the timed steps, peak GPU memory, and the ratios. Goal on GPU: >= 1.5x faster at no
more peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build(tmp: Path, hidden: int, layers: int, inter: int, vocab: int) -> Path:
    from helpers import make_tiny_llama

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_tiny_llama(tmp / "src", hidden=hidden, intermediate=inter, layers=layers, heads=max(1, hidden // 64),
                          kv_heads=max(1, hidden // 64), vocab=vocab, dtype=torch.bfloat16)
    quantize_checkpoint(str(src), tmp / "q")
    return tmp / "q"


def step_times(model, batch, steps: int, device) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    m = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in m.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
        torch.cuda.reset_peak_memory_stats()
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    m.train()
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--paged-demo", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if (args.paged_demo or not args.tiny) and not cuda:
        print("bench_train: this mode needs a CUDA device (use --tiny for a CPU smoke check)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    hidden, layers, inter, vocab, bs, seq = (64, 2, 128, 128, 2, 32) if args.tiny else (2048, 8, 5632, 32000, 4, 512)
    from transformers import AutoModelForCausalLM

    import qconvert

    with tempfile.TemporaryDirectory() as d:
        qdir = build(Path(d), hidden, layers, inter, vocab)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (bs, seq), generator=g).to(device)
        batch = {"input_ids": ids, "labels": ids}
        if args.paged_demo:
            return paged_demo(qdir, batch, device)
        anchor = AutoModelForCausalLM.from_pretrained(qdir, device_map={"": device}, dtype=torch.bfloat16 if cuda else None)
        ta, pa = step_times(anchor, batch, args.steps, device)
        del anchor
        if cuda:
            torch.cuda.empty_cache()
        ours = qconvert.load_model(qdir, device=device, backend="auto" if cuda else "reference")
        tq, pq = step_times(ours, batch, args.steps, device)
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
                      "shape": {"hidden": hidden, "layers": layers, "batch": bs, "seq": seq},
                      "anchor_step_s": ta, "qconvert_step_s": tq, "speedup": ta / tq,
                      "anchor_peak_mib": pa, "qconvert_peak_mib": pq}, indent=1))
    return 0


def paged_demo(qdir: Path, batch, device) -> int:
    """Cap the process's GPU memory just above what the model needs; plain AdamW's states then do
    not fit, the paged optimizer's (managed memory, paged on demand) do."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    import qconvert

    results = {}
    for name in ("adamw", "paged_adamw_32bit"):
        torch.cuda.empty_cache()
        m = get_peft_model(qconvert.load_model(qdir, device=device), LoraConfig(r=256, lora_alpha=16, target_modules="all-linear"))
        params = [p for p in m.parameters() if p.requires_grad]
        need = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (need * 1.6) / total))
        opt = torch.optim.AdamW(params) if name == "adamw" else bnb.optim.PagedAdamW32bit(params)
        try:
            for _ in range(3):
                m(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
            results[name] = "completed"
        except torch.cuda.OutOfMemoryError:
            results[name] = "out of memory"
        del m, opt
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
