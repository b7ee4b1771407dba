"""GGUF export benchmark: `qconvert export-gguf` against llama.cpp's convert_hf_to_gguf.py on the same
merged folder, same output type, each in its own subprocess: wall time (process start and imports
included), peak RSS, and the ratio qconvert / llama.cpp.

    .venv/bin/python tools/bench_gguf.py [--types f16 q8_0] [--layers 28] [--convert-script PATH]

Model: the bf16 Llama of tools/bench_quantize.py (hidden 1024, vocab 32000; 28 layers = 542M
parameters, written into .bench/ if missing) with a small SentencePiece tokenizer.model (its 60 tokens
padded to the 32000 rows, as both converters pad; sentencepiece is installed into .bench/anchor-deps
with `pip install --target` when this Python lacks it, since convert_hf_to_gguf.py needs it). It is quantized to 4 bits by `qconvert quantize`, given a
LoRA adapter (r 16 on q/k/v/o, random non-zero B) and merged by `qconvert merge --no-check` (all
untimed): the timed exports run on that merged 16-bit folder, which is what a user hands llama.cpp.

convert_hf_to_gguf.py is not on PyPI, but the llama-cpp-python sdist vendors llama.cpp: without
--convert-script this tool looks in .bench/llama.cpp-<version>/ and, if the script is not there, RUNS
`pip download llama-cpp-python==<installed version> --no-deps --no-binary :all:` (a package registry
download, about 60 MB) and extracts convert_hf_to_gguf.py with the conversion/ and gguf-py/ it imports
into that folder. The script runs with this Python and its own vendored gguf-py. The check after
export is skipped (--no-check): this times the export. --layers 2 makes a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(ROOT / "tools"))

CHILD = r"""
import resource, subprocess, sys, time, json
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if r.returncode:
    sys.stderr.write(r.stderr[-3000:]); sys.exit(1)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
#: what convert_hf_to_gguf.py imports from its llama.cpp checkout
_VENDORED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def anchor_deps() -> Path:
    """A folder holding sentencepiece, put on both exporters' PYTHONPATH: convert_hf_to_gguf.py's llama
    path imports it unconditionally (and its byte-level BPE path refuses a tokenizer whose
    pre-tokenizer hash it does not know, as a made-up one is). Installed there by pip when this
    Python lacks it."""
    deps = BENCH / "anchor-deps"
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        if not (deps / "sentencepiece").is_dir():
            print("installing sentencepiece into .bench/anchor-deps (pip install --target) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(deps), "sentencepiece", "-q"], check=True)
    return deps


def add_sentencepiece(folder: Path) -> None:
    """A small SentencePiece tokenizer.model (both exporters read it, padding its 300 tokens to the 32000 rows)."""
    if (folder / "tokenizer.model").exists():
        return
    import io

    sys.path.insert(0, str(anchor_deps()))
    import sentencepiece as spm

    buf = io.BytesIO()
    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=60, model_type="bpe", minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


def convert_script(given: str | None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: ``given``, else the cached copy, else extracted from the
    llama-cpp-python sdist of the installed version (downloaded with pip; see the module docstring)."""
    if given:
        return Path(given)
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    cache = BENCH / f"llama.cpp-{ver}"
    script = cache / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = BENCH / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    print(f"fetching llama-cpp-python=={ver}'s sdist (pip download) for convert_hf_to_gguf.py ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps", "--no-binary", ":all:",
                    "-d", str(dl), "-q"], check=True)
    (sdist,) = dl.glob(f"llama_cpp_python-{ver}.tar.gz")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    tmp = cache.with_name(cache.name + ".tmp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(_VENDORED)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(cache)
    return script


def merged_folder(layers: int) -> Path:
    """The bench Llama quantized, given a LoRA adapter and merged (each step once, cached in .bench/)."""
    from bench_quantize import make_checkpoint

    src = make_checkpoint(layers)
    q, adapter, merged = (BENCH / f"gguf-{layers}L-{n}" for n in ("4bit", "adapter", "merged"))
    if not q.exists():
        subprocess.run([sys.executable, "-m", "qconvert", "quantize", str(src), str(q)], check=True, capture_output=True)
    add_sentencepiece(q)  # before the merge, which copies it
    if not adapter.exists():
        write_adapter(src, adapter)
    if not merged.exists():
        subprocess.run([sys.executable, "-m", "qconvert", "merge", str(q), str(adapter), str(merged), "--no-check"], check=True, capture_output=True)
    return merged


def write_adapter(src: Path, out: Path, r: int = 16) -> None:
    """A PEFT LoRA adapter for every attention projection: A and B random (B non-zero, so the merge changes weights)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    h, g = cfg["hidden_size"], torch.Generator().manual_seed(0)
    sd = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[p + ".lora_A.weight"] = (torch.randn(r, h, generator=g) * h**-0.5).to(torch.bfloat16)
            sd[p + ".lora_B.weight"] = (torch.randn(h, r, generator=g) * 0.01).to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "task_type": "CAUSAL_LM",
                                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))


def same_tensors(a: Path, b: Path) -> str:
    """How many tensors the two files hold with the same name, type and bytes (the two did the same work)."""
    import gguf
    import numpy as np

    ta, tb = ({t.name: t for t in gguf.GGUFReader(f).tensors} for f in (a, b))
    same = sum(1 for n, t in ta.items() if n in tb and t.tensor_type == tb[n].tensor_type and np.array_equal(t.data, tb[n].data))
    return f"{same}/{len(ta.keys() | tb.keys())}"


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under a child Python that reports its wall time and the peak RSS of ``cmd``."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(anchor_deps())) if p)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f16", "bf16", "q8_0"])
    ap.add_argument("--layers", type=int, default=28, help="Layers of the bench Llama (28: 542M parameters; 2 for a smoke run).")
    ap.add_argument("--convert-script", help="llama.cpp's convert_hf_to_gguf.py; default: fetched by `pip download` (module docstring).")
    args = ap.parse_args()
    script = convert_script(args.convert_script)
    merged = merged_folder(args.layers)
    out = BENCH / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for t in args.types:
        ours = timed([sys.executable, "-m", "qconvert", "export-gguf", str(merged), str(out / f"qconvert-{t}.gguf"), "--type", t,
                      "--overwrite", "--no-check"])
        theirs = timed([sys.executable, str(script), str(merged), "--outfile", str(out / f"llamacpp-{t}.gguf"), "--outtype", t])
        row = {"type": t, "qconvert": ours, "convert_hf_to_gguf": theirs, "time_ratio": ours["seconds"] / theirs["seconds"],
               "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
               "identical_tensors": same_tensors(out / f"qconvert-{t}.gguf", out / f"llamacpp-{t}.gguf")}
        results.append(row)
        print(f"{t:5s} qconvert {ours['seconds']:7.1f} s {ours['peak_rss_mb']:7.0f} MB | convert_hf_to_gguf.py {theirs['seconds']:7.1f} s "
              f"{theirs['peak_rss_mb']:7.0f} MB | ratio time {row['time_ratio']:.2f}, peak RSS {row['rss_ratio']:.2f} | "
              f"identical tensors {row['identical_tensors']}")
    print(json.dumps({"model": str(merged), "layers": args.layers, "convert_script": str(script), "results": results}))


if __name__ == "__main__":
    main()
