"""Merge benchmark: qconvert merge vs PEFT merge_and_unload + save_pretrained, same base and adapter.

    .venv/bin/python tools/bench_merge.py      # needs .bench/ from tools/bench_quantize.py

Base: the 542M-parameter 4-bit Llama that tools/bench_quantize.py writes (.bench/out-qconvert). Adapter:
a random LoRA (r=16, q_proj and v_proj of all 28 layers), written directly in PEFT's format. The anchor
loads the 4-bit base with transformers + bitsandbytes, attaches the adapter with PEFT, merge_and_unload()s
(PEFT merges into the 4-bit layers, re-quantizing them) and save_pretrained()s. (transformers 5.23's
save_pretrained raises NotImplementedError in its reverse weight conversion after this merge, and
after model.dequantize(); save_original_format=False avoids it.) qconvert merges shard by shard into bf16. Each runs in its own subprocess;
wall time and peak RSS are printed with the ratios, and both merged weights are compared with the
exact merge dequant(W4) + scaling * B @ A computed here in float64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"

CHILD = r"""
import resource, sys, time, json, torch
t = time.perf_counter()
mode, base, adapter, out = sys.argv[1:5]
if mode == "qconvert":
    from qconvert.export.merge import merge_adapter
    merge_adapter(base, adapter, out, dtype="bfloat16")
else:
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    m = AutoModelForCausalLM.from_pretrained(base)
    m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    m.save_pretrained(out, save_original_format=False)  # the default raises NotImplementedError after a merge
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_adapter(base: Path, out: Path, r: int = 16) -> Path:
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        for mod in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            sd[f"{p}.lora_A.weight"] = torch.randn(r, h, generator=g) * 0.01
            sd[f"{p}.lora_B.weight"] = torch.randn(h, r, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                                                         "base_model_name_or_path": "bench/base", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                                                         "bias": "none", "fan_in_fan_out": False, "use_dora": False}))
    return out


def run(mode: str, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(out)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(BENCH / "out-qconvert"),
                    help="4-bit base (default .bench/out-qconvert; .bench/out-qconvert-half is the 14-layer one, to check flat memory)")
    args = ap.parse_args()
    base = Path(args.base)
    if not (base / "config.json").exists():
        print(f"{base}: missing; run tools/bench_quantize.py first (it writes .bench/out-qconvert)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quantize_kernel import cpu_name

    tag = base.name.removeprefix("out-qconvert")
    adapter = make_adapter(base, BENCH / f"adapter{tag}")
    anchor = run("anchor", base, adapter, BENCH / f"merged-anchor{tag}")
    ours = run("qconvert", base, adapter, BENCH / f"merged-qconvert{tag}")
    from qconvert.export.merge import LoraAdapter
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import QuantizedTensor, companion_keys
    from qconvert.quant.reference import dequantize_4bit_ref

    lora = LoraAdapter(adapter)
    errs = {"anchor": [], "qconvert": []}
    last = json.loads((base / "config.json").read_text())["num_hidden_layers"] - 1
    for k in ("model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.self_attn.v_proj.weight"):
        def weight(ck, k=k):
            if f"{k}.absmax" in ck:
                return dequantize_4bit_ref(QuantizedTensor.from_state_dict(k, {c: ck.get(c) for c in companion_keys(k, ck.keys())}), torch.float32)
            return ck.get(k).float()
        b = Checkpoint(base)
        exact = weight(b).double() + lora.delta(k.removesuffix(".weight")).double()
        change = lora.delta(k.removesuffix(".weight")).double().norm()
        for name, d in (("anchor", BENCH / f"merged-anchor{tag}"), ("qconvert", BENCH / f"merged-qconvert{tag}")):
            errs[name].append(((weight(Checkpoint(d)).double() - exact).norm() / change).item())
    print(f"base {base}; machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'':40}{'wall s':>9}{'peak RSS MB':>14}")
    print(f"{'PEFT merge_and_unload + save_pretrained':40}{anchor['wall_s']:9.1f}{anchor['peak_rss_mb']:14.0f}")
    print(f"{'qconvert merge':40}{ours['wall_s']:9.1f}{ours['peak_rss_mb']:14.0f}")
    print(f"\nspeed-up {anchor['wall_s'] / ours['wall_s']:.1f}x; peak RSS {ours['peak_rss_mb'] / anchor['peak_rss_mb']:.2f} of the anchor's")
    print(f"distance from the exact merge, as a share of the adapter's change: PEFT 4-bit merge {max(errs['anchor']):.0%}, "
          f"qconvert bf16 merge {max(errs['qconvert']):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
