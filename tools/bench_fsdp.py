"""`qconvert train` under torchrun: DDP vs FSDP vs FSDP + CPU offload, memory per process and step time.

    python tools/bench_fsdp.py                      # GPU: every visible GPU, a Llama-3-8B-shaped block stack
    python tools/bench_fsdp.py --layers 32          # ... the full 8B depth (writes a ~16 GB bf16 model first)
    python tools/bench_fsdp.py --nproc 2 --device cpu --tiny   # CPU smoke check (gloo; not a performance claim)
    python tools/bench_fsdp.py --nproc 2 --device cpu --hidden 1024 --inter 2816 --layers 8 --vocab 32000

A random bf16 Llama of the given shape is written and quantized (NF4, double quantization) once; then
for each mode the same `qconvert train` run is launched with `torchrun --nproc-per-node N`: LoRA r=64
on all linear layers, gradient checkpointing, batch --batch per process of --seq-len tokens, AdamW
(paged 32-bit on CUDA). Reported per mode, from rank 0 (the ranks are symmetric): the median step
time over the steps after the first, peak host RSS, peak GPU memory allocated (CUDA), and the start
line's memory estimate. Writes a JSON file with every figure and the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
MODES = {"ddp": [], "fsdp": ["--fsdp"], "fsdp_offload": ["--fsdp", "--fsdp-offload"]}


def build(tmp: Path, a) -> tuple[Path, Path]:
    """A random 4-bit model with the word tokenizer of the tests, and records of exactly --seq-len words."""
    import torch

    from helpers import make_tiny_llama
    from test_train import WORDS, make_tokenizer, write_jsonl

    from qconvert.convert.quantize import quantize_checkpoint

    heads = max(1, a.hidden // 128)
    src = make_tiny_llama(tmp / "src", hidden=a.hidden, intermediate=a.inter, layers=a.layers, heads=heads,
                          kv_heads=max(1, heads // 4), vocab=a.vocab, dtype=torch.bfloat16, max_shard_size="2GB")
    make_tokenizer(src)
    quantize_checkpoint(str(src), tmp / "q", compute_dtype="bfloat16" if a.device == "cuda" else "float32")
    g = torch.Generator().manual_seed(0)
    n = a.batch * a.nproc * (a.steps + 1)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (a.seq_len - 1,), generator=g).tolist())} for _ in range(n)]
    return tmp / "q", write_jsonl(tmp / "data.jsonl", rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, model: Path, data: Path, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), f"--master-port={free_port()}",
           "-m", "qconvert", "train", str(model), "--data", str(data), "--output", str(out), "--max-steps", str(a.steps),
           "--batch-size", str(a.batch), "--grad-accum", "1", "--max-length", str(a.seq_len), "--lora-r", "64",
           "--save-steps", "0", "--optim", a.optim or ("paged_adamw_32bit" if a.device == "cuda" else "adamw"), *MODES[mode]]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"mode": mode, "error": r.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = a.batch * a.seq_len * a.nproc
    times = [tokens / row["tokens_per_s"] for row in rows[1:] if "tokens_per_s" in row]
    done = next(line for line in r.stderr.splitlines() if line.startswith("done:"))
    rss = re.search(r"peak RSS ([\d,]+) MiB", done)
    gpu = re.search(r"GPU ([\d,]+) MiB allocated", done)
    estimate = next((line for line in r.stderr.splitlines() if line.startswith("memory estimate")), None)
    return {"mode": mode, "step_s": statistics.median(times) if times else None,
            "peak_rss_mib": int(rss.group(1).replace(",", "")) if rss else None,
            "gpu_mib": int(gpu.group(1).replace(",", "")) if gpu else None, "estimate": estimate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: the visible GPUs, or 2 on CPU)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--optim", default=None, help="qconvert train's --optim (default: paged_adamw_32bit on CUDA, adamw on CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps: checks that every mode runs")
    p.add_argument("--json", default="bench_fsdp.json")
    p.add_argument("--keep", metavar="DIR", help="build the model and data in DIR (reused when already there) instead of a temporary folder")
    a = p.parse_args()
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.nproc = a.nproc or (torch.cuda.device_count() if a.device == "cuda" else 2)
    if a.tiny:
        a.hidden, a.inter, a.layers, a.vocab, a.seq_len, a.steps = 64, 128, 2, 128, 32, 3
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {a.nproc} x {name}; model hidden {a.hidden}, intermediate {a.inter}, {a.layers} layers, vocab {a.vocab}; "
          f"batch {a.batch} x {a.seq_len} tokens per process", flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(a.keep or t)
        if a.keep and (tmp / "q" / "config.json").is_file() and (tmp / "data.jsonl").is_file():
            model, data = tmp / "q", tmp / "data.jsonl"
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            model, data = build(tmp, a)
        results = []
        for mode in a.modes.split(","):
            import shutil

            shutil.rmtree(tmp / mode, ignore_errors=True)
            res = run_mode(mode, model, data, tmp / mode, a)
            results.append(res)
            if "error" in res:
                print(f"{mode:13s} failed:\n{res['error']}", flush=True)
                continue
            gpu = f", GPU {res['gpu_mib']:,} MiB allocated" if res["gpu_mib"] is not None else ""
            print(f"{mode:13s} step {res['step_s']:.3f} s, peak RSS {res['peak_rss_mib']:,} MiB{gpu}", flush=True)
            if res["estimate"]:
                print(f"{'':13s} {res['estimate']}", flush=True)
    Path(a.json).write_text(json.dumps({"device": name, "nproc": a.nproc, "args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
