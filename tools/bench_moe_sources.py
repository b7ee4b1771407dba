"""Source-side MoE figures: an FP8 DeepSeek-V3-shaped source and an MXFP4 gpt-oss-20b-shaped source,
converted by `qconvert quantize` and by transformers + bitsandbytes (dequantize on load, then
quantize-on-load), in one run.

    .venv/bin/python tools/bench_moe_sources.py [--layers 2] [--deepseek-experts 16] [--only deepseek|gptoss]

Generates (once, cached under .bench/) each source with random weights at the real widths and a few
layers, stored as the releases store them: DeepSeek-V3 (hidden 7168, 128 heads, MLA ranks 1536/512,
dense intermediate 18432, expert intermediate 2048, vocab 129280; layer 0 dense, the others MoE with
--deepseek-experts routed experts + 1 shared; every layer weight but the router float8_e4m3fn with
128x128 weight_scale_inv blocks) and gpt-oss-20b (hidden 2880, 64 heads of 64, 8 KV heads, 32 experts
of intermediate 2880, vocab 201088; experts as *_blocks / *_scales, the rest bf16). One shard per layer.

Each conversion runs in its own subprocess (wall time, peak RSS = its VmHWM). The anchor is two
processes, as a user runs it: from_pretrained(FineGrainedFP8Config / Mxfp4Config(dequantize=True))
and the dequantized state dict saved (save_pretrained would quantize it back), then
from_pretrained(BitsAndBytesConfig) + save_pretrained. Sizes come from the output headers: output
bytes, bits/param over the whole model and over the routed experts, and the whole model extrapolated
to the real depth (61 layers, 3 dense, 256 experts; 24 layers): per-layer bytes x layers, the routed
experts scaled to the real count, plus embeddings, head and norms as written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"

DEEPSEEK = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, q_lora_rank=1536, kv_lora_rank=512,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=128, num_key_value_heads=128,
                vocab_size=129280, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, topk_group=1, n_group=1)
DEEPSEEK_REAL = {"layers": 61, "dense": 3, "experts": 256}
GPTOSS = dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_attention_heads=64, num_key_value_heads=8,
              head_dim=64, vocab_size=201088, num_experts_per_tok=4)
GPTOSS_REAL = {"layers": 24, "dense": 0, "experts": 32}

CHILD = r"""
import json, sys, time
t = time.perf_counter()
mode, src, out = sys.argv[1:4]
err = None
try:
    if mode == "qconvert":
        from qconvert.convert.quantize import quantize_checkpoint
        quantize_checkpoint(src, out, max_shard_size="5GB")
    elif mode == "dequantize":
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config
        cfg = json.load(open(src + "/config.json"))
        qc = FineGrainedFP8Config(dequantize=True) if cfg["quantization_config"]["quant_method"] == "fp8" else Mxfp4Config(dequantize=True)
        m = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, device_map="cpu")
        # saved as a plain model, under the names on disk (save_pretrained reverts transformers' merges) and
        # without the quantizer, which would quantize the weights back
        import os, torch
        from huggingface_hub import save_torch_state_dict
        from transformers.core_model_loading import revert_weight_conversion
        with torch.device("meta"):
            plain = type(m)(m.config)  # unquantized: its revert is the model type's default one
        os.makedirs(out)
        sd = revert_weight_conversion(plain, {k: v.detach() for k, v in m.state_dict().items()})
        del m
        save_torch_state_dict({k: sd.pop(k).clone() for k in list(sd)}, out, max_shard_size="5GB")  # own storage each
        del cfg["quantization_config"]
        json.dump(cfg, open(out + "/config.json", "w"))
    else:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        AutoModelForCausalLM.from_pretrained(src, quantization_config=q).save_pretrained(out)
except Exception as e:
    err = f"{type(e).__name__}: {e}".splitlines()
    err = next((l for l in err if "not divisible" in l), err[0])[:200]
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's at fork (the parent that built the sources)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": hwm / 1024, "error": err}))
"""


# ------------------------------------------------------------------------------ sources
def _write_source(out: Path, config: dict, shards: list) -> Path:
    """Shards (each a callable returning {name: tensor}) into ``out`` with an index; cached."""
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, make in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    os.replace(tmp, out)
    return out


def _fp8(shape, g):
    """A random float8 weight and its float32 block scales (128x128, partial at the edges)."""
    import torch

    w = torch.randn(shape, generator=g, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    return w, torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=g) * 1e-3


def deepseek_source(layers: int, experts: int, tiny: bool) -> Path:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**DEEPSEEK, n_routed_experts=experts, num_hidden_layers=layers)
    with torch.device("meta"):
        meta = DeepseekV3ForCausalLM(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    inter = cfg.moe_intermediate_size

    def layer(i):
        out = {}
        for k, v in meta.items():
            if not k.startswith(f"model.layers.{i}."):
                continue
            if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):  # stored per expert
                base = k.rsplit(".", 1)[0]
                for j in range(experts):
                    names = ("gate_proj", "up_proj") if k.endswith("gate_up_proj") else ("down_proj",)
                    shape = (inter, cfg.hidden_size) if k.endswith("gate_up_proj") else (cfg.hidden_size, inter)
                    for n in names:
                        out[f"{base}.{j}.{n}.weight"], out[f"{base}.{j}.{n}.weight_scale_inv"] = _fp8(shape, g)
            elif v.dim() == 2 and not k.endswith("mlp.gate.weight"):
                out[k], out[k + "_scale_inv"] = _fp8(tuple(v.shape), g)
            elif k.endswith("e_score_correction_bias"):
                out[k] = torch.zeros(v.shape)
            else:
                out[k] = (torch.ones(v.shape) if v.dim() == 1 else torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
        return out

    def plain(keys):
        return lambda: {k: (torch.ones(meta[k].shape) if meta[k].dim() == 1 else torch.randn(meta[k].shape, generator=g) * 0.02)
                        .to(torch.bfloat16) for k in keys}

    config = cfg.to_dict() | {"architectures": ["DeepseekV3ForCausalLM"], "dtype": "bfloat16", "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    shards = [plain(["model.embed_tokens.weight"])] + [lambda i=i: layer(i) for i in range(layers)]
    shards.append(plain(["model.norm.weight", "lm_head.weight"]))
    return _write_source(BENCH / ("tiny" if tiny else "") / f"deepseek-v3-fp8-{layers}L-{experts}e", config, shards)


def gptoss_source(layers: int, tiny: bool) -> Path:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(**GPTOSS, num_hidden_layers=layers, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                       + ["sliding_attention"] * (layers % 2))
    with torch.device("meta"):
        meta = GptOssForCausalLM(cfg).state_dict()
    g = torch.Generator().manual_seed(0)

    def tensors(keys):
        out = {}
        for k in keys:
            shape = tuple(meta[k].shape)
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # held [E, in, out], stored [E, out, in/32, 16]
                e, i, o = shape
                out[k + "_blocks"] = torch.randint(0, 256, (e, o, i // 32, 16), generator=g, dtype=torch.uint8)
                out[k + "_scales"] = torch.randint(118, 123, (e, o, i // 32), generator=g, dtype=torch.uint8)
            else:
                out[k] = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        return out

    groups = [["model.embed_tokens.weight"]] + [[k for k in meta if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append(["model.norm.weight", "lm_head.weight"])
    config = cfg.to_dict() | {"architectures": ["GptOssForCausalLM"], "dtype": "bfloat16", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}
    return _write_source(BENCH / ("tiny" if tiny else "") / f"gpt-oss-20b-mxfp4-{layers}L", config, [lambda ks=ks: tensors(ks) for ks in groups])


# ------------------------------------------------------------------------------ runs and sizes
def run(mode: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    # the dequantize step at warning level: transformers' load report (why a weight was refused) is a warning
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT),
               TRANSFORMERS_VERBOSITY="warning" if mode == "dequantize" else "error")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        return {"error": (r.stderr.strip().splitlines() or ["killed"])[-1][:200], "wall_s": time.perf_counter() - t, "peak_rss_mb": 0}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    why = [line.strip() for line in r.stderr.splitlines() if "not divisible" in line]  # transformers' load report
    if res.get("error") and why:
        res["error"] = why[0][:200]
    return res


def header_sizes(folder: Path) -> dict[str, int]:
    """Data bytes of every tensor in the folder's safetensors files, from their headers."""
    sizes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as h:
            n = struct.unpack("<Q", h.read(8))[0]
            head = json.loads(h.read(n))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__"})
    return sizes


def source_params(src: Path) -> dict[str, int]:
    """Parameters of every tensor of the model as transformers holds it (qconvert's reader dequantizes the pairs)."""
    import math

    from qconvert.convert.sources import reading_view
    from qconvert.io.checkpoint import Checkpoint

    ck = reading_view(Checkpoint(src))
    return {k: math.prod(ck.info(k)[1]) for k in ck.keys()}


def differing(a: Path, b: Path) -> list[str]:
    """Names of the tensors whose bytes differ between two outputs (or that only one has)."""
    import torch
    from safetensors import safe_open

    def where(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    wa, wb = where(a), where(b)
    bad = sorted(wa.keys() ^ wb.keys())
    for k in sorted(wa.keys() & wb.keys()):
        with safe_open(str(wa[k]), "pt") as ha, safe_open(str(wb[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if ".quant_state." in k:
                same = json.loads(bytes(x.tolist())) == json.loads(bytes(y.tolist()))
            else:
                same = x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            if not same:
                bad.append(k)
    return bad


def _group(name: str) -> tuple[str, int | None]:
    """('expert' | 'layer' | 'other', layer index) of a tensor or quant-state entry."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m is None:
        return "other", None
    return ("expert" if re.search(r"\.experts\.", name) else "layer"), int(m.group(1))


def figures(out: Path, params: dict[str, int], real: dict, bench_experts: int, bench_dense: int) -> dict:
    """Sizes of an output, and the whole model extrapolated to the real depth and expert count."""
    sizes = header_sizes(out)
    b, p = {}, {}  # (group, layer) -> bytes / params
    for k, n in sizes.items():
        b[_group(k)] = b.get(_group(k), 0) + n
    for k, n in params.items():
        p[_group(k)] = p.get(_group(k), 0) + n
    layers = sorted({i for _, i in b if i is not None})

    def layer_total(d, i, scale):
        return d.get(("layer", i), 0) + d.get(("expert", i), 0) * scale

    scale = real["experts"] / bench_experts
    dense, moe = [i for i in layers if i < bench_dense], [i for i in layers if i >= bench_dense]

    def extrapolate(d):
        per_dense = sum(layer_total(d, i, scale) for i in dense) / max(len(dense), 1)
        per_moe = sum(layer_total(d, i, scale) for i in moe) / len(moe)
        return d.get(("other", None), 0) + per_dense * real["dense"] + per_moe * (real["layers"] - real["dense"])

    expert_b = sum(v for (g, _), v in b.items() if g == "expert")
    expert_p = sum(v for (g, _), v in p.items() if g == "expert")
    return {"output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "bits_per_param": 8 * sum(sizes.values()) / sum(params.values()),
            "expert_bits_per_param": 8 * expert_b / expert_p if expert_p else None,
            "extrapolated_bits_per_param": 8 * extrapolate(b) / extrapolate(p),
            "extrapolated_output_gb": extrapolate(b) / 1e9}


def bench(name: str, src: Path, real: dict, experts: int, bench_dense: int) -> None:
    gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    print(f"\n== {name}: {src.name}, {gb:.2f} GB source")
    params = source_params(src)
    ours = run("qconvert", src, BENCH / f"out-{src.name}-qconvert")
    step1 = run("dequantize", src, BENCH / f"out-{src.name}-dequantized")
    step2 = run("bnb", BENCH / f"out-{src.name}-dequantized", BENCH / f"out-{src.name}-anchor") if not step1.get("error") else None
    rows = [("qconvert quantize", ours, BENCH / f"out-{src.name}-qconvert")]
    if step2 is not None:
        both = {"wall_s": step1["wall_s"] + step2["wall_s"], "peak_rss_mb": max(step1["peak_rss_mb"], step2["peak_rss_mb"]),
                "error": step2.get("error")}
        rows.append(("transformers+bnb (2 steps)", both, BENCH / f"out-{src.name}-anchor"))
    print(f"{'':28}{'wall s':>8}{'peak RSS MB':>13}{'output GB':>11}{'bits/param':>11}{'experts':>9}{'at real depth':>22}")
    for label, r, out in rows:
        if r.get("error"):
            print(f"{label:28}{r['wall_s']:8.1f}{r['peak_rss_mb']:13.0f}  failed: {r['error']}")
            continue
        f = figures(out, params, real, experts, bench_dense)
        eb = f"{f['expert_bits_per_param']:.3f}" if f["expert_bits_per_param"] else "-"
        print(f"{label:28}{r['wall_s']:8.1f}{r['peak_rss_mb']:13.0f}{f['output_bytes'] / 1e9:11.3f}{f['bits_per_param']:11.3f}{eb:>9}"
              f"{f['extrapolated_bits_per_param']:9.3f} b/p {f['extrapolated_output_gb']:6.1f} GB")
    if step2 is not None and not step2.get("error"):
        bad = differing(BENCH / f"out-{src.name}-qconvert", BENCH / f"out-{src.name}-anchor")
        print(f"  output tensors that differ from the anchor's: {len(bad)}" + (f" (e.g. {', '.join(bad[:3])})" if bad else ""))
    if step1.get("error"):
        print(f"{'transformers dequantize':28}{step1['wall_s']:8.1f}{step1['peak_rss_mb']:13.0f}  failed: {step1['error']}")
    else:
        print(f"  (anchor step 1, dequantize + save: {step1['wall_s']:.1f} s, {step1['peak_rss_mb']:.0f} MB; "
              f"step 2, bitsandbytes: {step2['wall_s']:.1f} s, {step2['peak_rss_mb']:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--deepseek-experts", type=int, default=16)
    ap.add_argument("--only", choices=["deepseek", "gptoss"])
    ap.add_argument("--tiny", action="store_true", help="Narrow widths: a smoke test of this tool, not a figure.")
    args = ap.parse_args()
    if args.tiny:
        DEEPSEEK.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, num_attention_heads=4, num_key_value_heads=4,
                        vocab_size=512, num_experts_per_tok=2)
        GPTOSS.update(hidden_size=128, intermediate_size=128, num_local_experts=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, vocab_size=512, num_experts_per_tok=2)
        GPTOSS_REAL["experts"] = 4
        BENCH.joinpath("tiny").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from bench_quantize_kernel import cpu_name

    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs; {time.strftime('%Y-%m-%d')}")
    if args.only != "gptoss":
        bench("DeepSeek-V3-shaped FP8", deepseek_source(args.layers, args.deepseek_experts, args.tiny), DEEPSEEK_REAL,
              args.deepseek_experts, DEEPSEEK["first_k_dense_replace"])
    if args.only != "deepseek":
        bench("gpt-oss-20b-shaped MXFP4", gptoss_source(args.layers, args.tiny), GPTOSS_REAL, GPTOSS["num_local_experts"], 0)


if __name__ == "__main__":
    main()
