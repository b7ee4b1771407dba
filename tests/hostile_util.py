"""Helpers for the hostile-input tests (tests/test_hostile_*.py): hand-made safetensors files, and a
child process run under a memory limit and a time limit.

A denial-of-service test must show that bad input is refused within bounded memory and time, and
must not take the test run down with it when it is not: so the work runs in a child process whose
address space is capped with ``RLIMIT_AS`` and which is killed at a deadline.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Address space of a child that has imported torch and qconvert is about 0.6 GB here; this leaves
#: room for real work on tiny models and nothing like what a hostile size would ask for.
DEFAULT_LIMIT_MB = 2048


def pack_quant_state(d: dict) -> bytes:
    return json.dumps(d).encode("utf-8")


def write_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> Path:
    """A safetensors file written by hand: ``entries`` maps a name to (dtype string, shape, raw bytes),
    laid out in the order given. Lets a test build headers no library would write."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in entries.values():
            f.write(data)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run_limited(code: str, *args: str, mem_mb: int = DEFAULT_LIMIT_MB, timeout_s: float = 60, cwd: Path | None = None):
    """Run ``python -c code args...`` with its address space capped at ``mem_mb`` MiB and killed after
    ``timeout_s``. Returns (CompletedProcess, seconds). A child past its deadline fails the test."""
    limit = mem_mb * 2**20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                           timeout=timeout_s, preexec_fn=cap, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still running after {timeout_s} s (unbounded time on hostile input): {e.stderr!r}") from None
    return r, time.perf_counter() - t0


def make_llama_files(folder: Path, *, layers: int = 1, hidden: int = 16, intermediate: int = 24, vocab: int = 32,
                     seed: int = 0, config: dict | None = None) -> Path:
    """A tiny bf16 Llama checkpoint written directly (config.json + model.safetensors), without
    importing transformers: qconvert plans Llama from config.json, so quantizing it takes well under
    a second."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    sd = {"model.embed_tokens.weight": t(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
          "lm_head.weight": t(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{m}.weight"] = t(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = t(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = t(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = t(hidden, intermediate)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
           "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def make_lora(folder: Path, base: Path, *, r: int = 2, modules=("q_proj", "v_proj"), seed: int = 1, hidden: int = 16) -> Path:
    """A PEFT LoRA adapter for :func:`make_llama_files` models (every layer's ``modules``)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    sd = {}
    for i in range(layers):
        for m in modules:
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[p + ".lora_A.weight"] = torch.randn(r, hidden, generator=g)
            sd[p + ".lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.01
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "base_model_name_or_path": "org/base",
        "task_type": "CAUSAL_LM"}))
    return folder


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their target) with its bytes: to show inputs unchanged."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def all_bytes(folder: Path) -> bytes:
    """Everything stored under ``folder``, concatenated (to look for leaked content)."""
    return b"".join(p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file())


def cache_snapshot(model: Path, hub: Path, sha: str) -> Path:
    """``model``'s files laid out as the Hugging Face cache holds a download: copies in
    ``hub/models--org--tiny/blobs/`` and ``snapshots/<sha>/<name>`` linking to them (``../../blobs/...``,
    links that leave the snapshot folder on purpose); returns the snapshot folder."""
    repo = hub / "models--org--tiny"
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap
