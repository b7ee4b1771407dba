"""Merge benchmark: `qconvert merge` against PEFT's merge into the 16-bit original, same adapter, bf16 out.

    .venv/bin/python tools/bench_merge.py [--layers 8] [--reps 1]

The model: the random Llama of tools/bench_quantize.py (hidden 1024, intermediate 4096, vocab 32000)
cut to --layers 8 = 200M parameters, 0.40 GB in bf16, written to .bench/ once; its 4-bit checkpoint
quantized by qconvert (NF4, block size 64, double quant). The adapter: a random LoRA, r=16, alpha 32,
on q_proj, v_proj and down_proj of every layer, written in PEFT's format.

Each side runs in its own process, in turn, --reps times (the median is printed):
- PEFT: load the 16-bit original (bf16), ``PeftModel.from_pretrained``, ``merge_and_unload``,
  ``save_pretrained``: the in-memory merge most users run, output bf16;
- ``qconvert merge BASE ADAPTER OUT --dtype bfloat16`` as a CLI process (interpreter start included);
- ``merge_adapter`` in a process, timed after the imports: with the read/merge/write overlap
  (export/overlap.py) and one step after another (``OVERLAP = False``), to show what the overlap buys.
Wall time and the peak RSS of each process (``wait4``'s ru_maxrss, through a light launcher: see LAUNCH) and the time of the
work inside it are printed with the ratios (anchor / qconvert: above 1 means qconvert is faster or smaller).
The three qconvert outputs are checked byte-identical, and their tensor names and dtypes equal PEFT's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
MODULES = ("q_proj", "v_proj", "down_proj")

CHILD = r"""
import json, sys, time
mode, base, adapter, out = sys.argv[1:5]
if mode == "peft":
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    m.save_pretrained(out)
else:
    from qconvert.export import merge
    merge.OVERLAP = mode == "overlap"
    t = time.perf_counter()
    merge.merge_adapter(base, adapter, out, dtype="bfloat16")
print(json.dumps({"work_s": time.perf_counter() - t}))
"""


def conditions() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {load}"


def make_adapter(q: Path, out: Path, r: int = 16) -> Path:
    """A random PEFT LoRA adapter on q/v/down of every layer of ``q`` (A and B random: every update counts)."""
    from safetensors.torch import save_file

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.model.checks import quant_shapes

    if (out / "adapter_config.json").exists():
        return out
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, (o, i) in sorted(quant_shapes(Checkpoint(q)).items()):
        if k.split(".")[-2] in MODULES:
            p = "base_model.model." + k.removesuffix(".weight")
            sd[p + ".lora_A.weight"] = torch.randn(r, i, generator=g) * 0.01
            sd[p + ".lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(MODULES), "base_model_name_or_path": "bench/base",
        "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False}))
    return out


def inputs(layers: int) -> tuple[Path, Path, Path]:
    """(16-bit original, its 4-bit checkpoint, the adapter), built once under .bench/."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quantize import make_checkpoint

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_checkpoint(layers)
    q = src.with_name(src.name + "-q")
    if not (q / "config.json").exists():
        quantize_checkpoint(str(src), q)
    return src, q, make_adapter(q, src.with_name(src.name + "-adapter-qvdown-r16"))


# Linux copies the parent's peak RSS into a child at fork and keeps it across exec, so a child of this
# process (which built the model) would report at least this process's peak: each side is started by a
# small launcher that imports nothing heavy and reports its child's wait4 figures.
LAUNCH = r"""
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": p.returncode}), flush=True)
"""


def run(argv: list[str], out: Path) -> dict:
    """Run a child process; its wall time and peak RSS (wait4's ru_maxrss, through LAUNCH) and the JSON it printed."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", LAUNCH, *argv], capture_output=True, text=True, env=env)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines or lines[-1]["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, argv[:5]))} failed:\n{r.stderr[-3000:]}")
    return {k: v for d in lines for k, v in d.items()}


def digest(folder: Path) -> dict[str, str]:
    """sha256 of each weight file and the index (the card names the output folder, so it differs)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model*"))}


def names_and_dtypes(folder: Path) -> dict[str, str]:
    from qconvert.io.checkpoint import Checkpoint

    ck = Checkpoint(folder)
    return {k: ck.dtype_name(k) for k in ck.keys()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="8: 200M parameters")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    src, q, adapter = inputs(args.layers)
    before = conditions()
    py = sys.executable
    sides = {
        "peft": ([py, "-c", CHILD, "peft", str(src), str(adapter)], BENCH / "merged-peft"),
        # the merge alone (PEFT checks nothing), then as a user runs it: with its default check against
        # the unmerged model (export/check.py: two float32 models in memory, their logits compared)
        "cli": ([py, "-m", "qconvert", "merge", "--no-check", str(q), str(adapter)], BENCH / "merged-cli"),
        "cli-checked": ([py, "-m", "qconvert", "merge", str(q), str(adapter)], BENCH / "merged-cli-checked"),
        "overlap": ([py, "-c", CHILD, "overlap", str(q), str(adapter)], BENCH / "merged-overlap"),
        "sequential": ([py, "-c", CHILD, "sequential", str(q), str(adapter)], BENCH / "merged-sequential"),
    }
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(args.reps):
        for name, (argv, out) in sides.items():
            tail = [str(out), "--dtype", "bfloat16"] if name.startswith("cli") else [str(out)]
            runs[name].append(run(argv + tail, out))
    after = conditions()
    ours = {n: digest(sides[n][1]) for n in ("cli", "cli-checked", "overlap", "sequential")}
    assert ours["cli"] == ours["cli-checked"] == ours["overlap"] == ours["sequential"], "the qconvert outputs differ"
    assert names_and_dtypes(sides["cli"][1]) == names_and_dtypes(sides["peft"][1]), "tensor names or dtypes differ from PEFT's"
    report(runs, src, args, before, after)
    return 0


def report(runs: dict[str, list[dict]], src: Path, args, before: str, after: str) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quantize_kernel import cpu_name

    def med(name: str, key: str) -> float:
        vals = [r[key] for r in runs[name] if key in r]
        return statistics.median(vals) if vals else float("nan")

    cfg = json.loads((src / "config.json").read_text())
    h, i, v, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    n = 2 * v * h + n_layers * (4 * h * h + 3 * h * i + 2 * h) + h
    print(f"merge: random Llama {n / 1e6:.0f}M parameters ({n_layers} layers, hidden {h}), LoRA r=16 on {', '.join(MODULES)}, bf16 out")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; median of {args.reps}")
    print(f"start {before}; end {after}")
    print(f"{'':58}{'wall s':>8}{'work s':>8}{'peak RSS MB':>13}")
    rows = [("PEFT: 16-bit load + from_pretrained + merge_and_unload + save", "peft"), ("qconvert merge --no-check (CLI process)", "cli"),
            ("qconvert merge, its default check included (CLI)", "cli-checked"),
            ("qconvert merge_adapter in process, overlapped", "overlap"), ("qconvert merge_adapter in process, sequential", "sequential")]
    for label, name in rows:
        print(f"{label:58}{med(name, 'wall_s'):8.2f}{med(name, 'work_s'):8.2f}{med(name, 'peak_rss_mb'):13.0f}")
    print("\nratios (PEFT / qconvert; above 1: qconvert faster or smaller):")
    print(f"  wall, CLI process vs PEFT process:             {med('peft', 'wall_s') / med('cli', 'wall_s'):.2f}x")
    print(f"  work, in process vs PEFT in process:           {med('peft', 'work_s') / med('overlap', 'work_s'):.2f}x")
    print(f"  peak RSS, CLI process vs PEFT process:         {med('peft', 'peak_rss_mb') / med('cli', 'peak_rss_mb'):.2f}x "
          f"(qconvert at {med('cli', 'peak_rss_mb') / med('peft', 'peak_rss_mb'):.2f} of PEFT's; goal < 0.5)")
    print(f"  overlap: sequential / overlapped work time:    {med('sequential', 'work_s') / med('overlap', 'work_s'):.2f}x")
    print(f"  the default check: wall {med('cli-checked', 'wall_s') / med('cli', 'wall_s'):.2f}x, "
          f"peak RSS {med('cli-checked', 'peak_rss_mb') / med('cli', 'peak_rss_mb'):.2f}x the merge alone")
    print("outputs: the CLI, overlapped and sequential qconvert outputs are byte-identical; tensor names and dtypes equal PEFT's")


if __name__ == "__main__":
    sys.exit(main())
