"""Conversion benchmark: qconvert quantize vs transformers + bitsandbytes quantize-on-load + save_pretrained.

    .venv/bin/python tools/bench_quantize.py [--layers 28] [--flat-check]

Generates (once, cached under .bench/) a Llama-shaped bf16 checkpoint with random weights, written
shard by shard: hidden 1024, intermediate 4096, vocab 32000, 28 layers = 542M parameters, 1.08 GB in
about 300 MB shards. Then, in one run, converts it with each tool in its own subprocess and reports
wall-clock time and peak RSS (the child's ru_maxrss), and the ratios. Every tensor of the two outputs
is compared byte for byte before the numbers are printed. With --flat-check it also converts a model
of half the depth with qconvert, to show that peak RSS does not grow with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"

CHILD = r"""
import resource, sys, time, json
t = time.perf_counter()
mode, src, out = sys.argv[1:4]
workers = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
if mode == "qconvert":
    from qconvert.convert.quantize import quantize_checkpoint
    quantize_checkpoint(src, out, max_shard_size="2GB", **({"workers": int(workers)} if workers else {}))
else:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    m.save_pretrained(out)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_checkpoint(layers: int, hidden=1024, inter=4096, vocab=32000, shard_bytes=300 * 10**6) -> Path:
    import torch
    from safetensors.torch import save_file

    out = BENCH / f"llama-{layers}L-{hidden}h"
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    groups, cur, size = [], [], 0
    for k, s in shapes.items():
        nb = 2
        for d in s:
            nb *= d
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    groups.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            shape = shapes[k]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            tensors[k] = t.to(torch.bfloat16)
            total += tensors[k].numel() * 2
            weight_map[k] = name
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    os.replace(tmp, out)
    return out


def run(mode: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = (f, k)
        return out

    ta, tb = load(a), load(b)
    if ta.keys() != tb.keys():
        return False
    for k in ta:
        with safe_open(str(ta[k][0]), "pt") as ha, safe_open(str(tb[k][0]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if ".quant_state." in k:
                if json.loads(bytes(x.tolist())) != json.loads(bytes(y.tolist())):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--flat-check", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quantize_kernel import cpu_name

    src = make_checkpoint(args.layers)
    gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"model: {src.name}, {gb:.2f} GB bf16 in {len(list(src.glob('*.safetensors')))} shards\n")
    anchor = run("anchor", src, BENCH / "out-anchor")
    ours = run("qconvert", src, BENCH / "out-qconvert")
    identical = same_tensors(BENCH / "out-qconvert", BENCH / "out-anchor")
    print(f"{'':28}{'wall s':>9}{'peak RSS MB':>14}")
    print(f"{'transformers+bitsandbytes':28}{anchor['wall_s']:9.1f}{anchor['peak_rss_mb']:14.0f}")
    print(f"{'qconvert quantize':28}{ours['wall_s']:9.1f}{ours['peak_rss_mb']:14.0f}")
    print(f"\nspeed-up {anchor['wall_s'] / ours['wall_s']:.1f}x; peak RSS {ours['peak_rss_mb'] / anchor['peak_rss_mb']:.2f} of the anchor's")
    print(f"every output tensor identical: {identical}")
    if args.flat_check:
        half = make_checkpoint(args.layers // 2)
        small = run("qconvert", half, BENCH / "out-qconvert-half")
        print(f"\nflat memory: {half.name}: peak RSS {small['peak_rss_mb']:.0f} MB; {src.name}: {ours['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
