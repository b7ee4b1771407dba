"""Size figures of 4-bit MoE experts (issue 20 item 6): a Qwen3-30B-A3B-shaped model, side by side.

    .venv/bin/python tools/bench_moe.py [--layers 2] [--work DIR] [--no-anchor]

Builds a random bfloat16 checkpoint with Qwen3-30B-A3B's full widths (hidden 2048, 32 query and 4
key/value heads of 128, 128 routed experts of intermediate 768, vocabulary 151936, untied head) and
``--layers`` decoder layers, written per expert as ``save_pretrained`` writes Qwen3-MoE (one shard per
layer, streamed: no model is built). Then converts it three ways, each in a child process whose peak
RSS is measured: ``qconvert quantize`` (4-bit experts, the default), ``qconvert quantize --experts
16bit``, and the anchor, transformers + bitsandbytes quantize-on-load + ``save_pretrained``.

For each output it reports the bytes written and bits per parameter over the whole model, measured
and extrapolated to the real depth of 48 layers: (bytes of the tensors outside the layers) + 48 x
(mean bytes of one layer), over the same count of parameters; plus bits per parameter over the
routed-expert tensors alone. Nothing is estimated from formulas: every byte is read off the written
safetensors headers. The random weights do not change sizes (the layout has no entropy coding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REAL_LAYERS = 48
SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936)


def build_source(out: Path, layers: int) -> None:
    """The random checkpoint: config.json from transformers' Qwen3MoeConfig, tensors streamed to shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096, **SHAPE)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    h, d, e, i = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_experts"], SHAPE["moe_intermediate_size"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    files = [f"model-{n:05d}-of-{layers + 1:05d}.safetensors" for n in range(1, layers + 2)]
    for n in range(layers):
        p = f"model.layers.{n}."
        sd = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "self_attn.q_proj.weight": rnd(32 * d, h), p + "self_attn.k_proj.weight": rnd(4 * d, h),
              p + "self_attn.v_proj.weight": rnd(4 * d, h), p + "self_attn.o_proj.weight": rnd(h, 32 * d),
              p + "self_attn.q_norm.weight": torch.ones(d, dtype=torch.bfloat16),
              p + "self_attn.k_norm.weight": torch.ones(d, dtype=torch.bfloat16), p + "mlp.gate.weight": rnd(e, h)}
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            sd |= {q + "gate_proj.weight": rnd(i, h), q + "up_proj.weight": rnd(i, h), q + "down_proj.weight": rnd(h, i)}
        save_file(sd, str(out / files[n]), metadata={"format": "pt"})
        weight_map |= {k: files[n] for k in sd}
        del sd
    sd = {"model.embed_tokens.weight": rnd(SHAPE["vocab_size"], h), "lm_head.weight": rnd(SHAPE["vocab_size"], h),
          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(sd, str(out / files[-1]), metadata={"format": "pt"})
    weight_map |= {k: files[-1] for k in sd}
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def anchor(src: str, out: str) -> None:
    """transformers + bitsandbytes: quantize on load, save_pretrained (run in a child process)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)


def child(cmd: list[str]) -> dict:
    """Run ``cmd`` under a fresh measuring process (so each peak is its own): wall time, peak RSS."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--measure", *cmd], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = int(r.stderr.strip().splitlines()[-1].removeprefix("PEAK_RSS_KB "))
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": rss // 1024}


def measure(cmd: list[str]) -> int:
    """Run ``cmd``; print its peak RSS (ru_maxrss of this process's only child) as the last stderr line."""
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
    return r.returncode


def sizes(folder: Path) -> dict:
    """Bytes and parameters read off the written safetensors headers: outside the layers, per layer,
    and of the routed experts; a 4-bit weight counts every stored entry, its parameters from its
    quant-state shape."""
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import find_quantized

    ck = Checkpoint(folder)
    keys = ck.keys()
    q = set(find_quantized(keys))
    owner = {c: n for n in q for c in ck.companions(n)}
    acc: dict[str, list[int]] = {}
    for k in keys:
        name = owner.get(k, k)
        params = math.prod(ck.quantized(name).shape) if k == name and name in q else (0 if k in owner else math.prod(ck.info(k)[1]))
        m = re.match(r"model\.layers\.(\d+)\.", name)
        for group in (f"layer{m.group(1)}" if m else "outside", *(["experts"] if ".experts." in name else [])):
            b, p = acc.setdefault(group, [0, 0])
            acc[group] = [b + ck.nbytes(k), p + params]
    return acc


def figures(folder: Path, layers: int, files_bytes: int) -> dict:
    acc = sizes(folder)
    per = [acc[f"layer{n}"] for n in range(layers)]
    layer_bytes, layer_params = sum(b for b, _ in per) / layers, sum(p for _, p in per) / layers
    ob, op = acc["outside"]
    eb, ep = acc.get("experts", [0, 0])
    real_bytes = ob + REAL_LAYERS * layer_bytes
    return {"output_bytes": files_bytes, "bits_per_param_model": round(8 * (ob + sum(b for b, _ in per)) / (op + sum(p for _, p in per)), 3),
            "bits_per_param_experts": round(8 * eb / ep, 3) if ep else None,
            "extrapolated_48_layers_gb": round(real_bytes / 1e9, 2),
            "bits_per_param_48_layers": round(8 * real_bytes / (op + REAL_LAYERS * layer_params), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_moe")
    ap.add_argument("--no-anchor", action="store_true", help="skip transformers + bitsandbytes")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    t = time.perf_counter()
    build_source(src, args.layers)
    print(f"source built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    py = sys.executable
    runs = {"qconvert (experts 4-bit)": [py, "-m", "qconvert", "quantize", str(src), str(work / "q4"), "--json"],
            "qconvert --experts 16bit": [py, "-m", "qconvert", "quantize", str(src), str(work / "q16"), "--experts", "16bit", "--json"]}
    if not args.no_anchor:
        runs["transformers + bitsandbytes"] = [py, __file__, "--anchor", str(src), str(work / "anchor")]
    rows = {"source (bf16)": {"output_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")), **figures(src, args.layers, 0)}}
    rows["source (bf16)"].pop("output_bytes")
    for label, cmd in runs.items():
        out = Path(cmd[5] if "quantize" in cmd else cmd[-1])
        run = child(cmd)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows[label] = {**figures(out, args.layers, size), **run}
        shutil.rmtree(out)  # disk: each output is gone before the next is written
    import platform

    print(json.dumps({"layers": args.layers, "shape": SHAPE, "cpu": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--anchor":
        anchor(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        sys.exit(measure(sys.argv[2:]))
    sys.exit(main())
