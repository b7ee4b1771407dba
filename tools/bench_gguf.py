"""GGUF export benchmark: `qconvert export-gguf` against llama.cpp's convert_hf_to_gguf.py, same folder,
same output type, each in its own subprocess (wall time and peak RSS).

    .venv/bin/python tools/bench_gguf.py [--type f16] [--convert-script PATH/convert_hf_to_gguf.py]

Model: the 542M-parameter bf16 Llama of tools/bench_quantize.py (hidden 1024, 28 layers, vocab 32000,
written into .bench/ if missing), given a small byte-level BPE tokenizer here (its 290 tokens padded to
the 32000 rows, as both converters pad). convert_hf_to_gguf.py is not on PyPI: pass the script of a
llama.cpp checkout whose gguf-py matches the installed gguf package; without it only qconvert is run.
The check after export is skipped (--no-check): this times the export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

CHILD = r"""
import resource, subprocess, sys, time, json
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if r.returncode:
    sys.stderr.write(r.stderr[-3000:]); sys.exit(1)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def add_tokenizer(folder: Path) -> None:
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under a child Python that reports its wall time and the peak RSS of ``cmd``."""
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"])
    ap.add_argument("--convert-script", help="llama.cpp's convert_hf_to_gguf.py (run with this Python; 16-bit source only)")
    ap.add_argument("--four-bit", action="store_true", help="Export the model's qconvert 4-bit checkpoint instead (made once, untimed).")
    args = ap.parse_args()
    from bench_quantize import make_checkpoint

    src = make_checkpoint(28)
    add_tokenizer(src)
    if args.four_bit:
        q = ROOT / ".bench" / "gguf-src-4bit"
        if not q.exists():
            subprocess.run([sys.executable, "-m", "qconvert", "quantize", str(src), str(q)], check=True, capture_output=True)
        src = q
    out = ROOT / ".bench" / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    rows = {"qconvert": timed([sys.executable, "-m", "qconvert", "export-gguf", str(src), str(out / "qconvert.gguf"),
                               "--type", args.type, "--overwrite", "--no-check"])}
    if args.convert_script and not args.four_bit:
        rows["convert_hf_to_gguf"] = timed([sys.executable, args.convert_script, str(src), "--outfile", str(out / "llamacpp.gguf"),
                                            "--outtype", args.type])
    for name, r in rows.items():
        print(f"{name:20s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(json.dumps({"type": args.type, "model": str(src), **rows}))


if __name__ == "__main__":
    main()
