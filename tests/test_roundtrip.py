"""The whole loop from the CLI alone: quantize -> train -> merge -> push, checked by value at the end."""

from __future__ import annotations

import json
import os

import pytest

import torch
from helpers import run_cli as q, make_tiny_llama
from hub_server import LoopbackHub
from test_train import make_tokenizer, memorize_set
from tolerances import FLOAT32_REL




@pytest.mark.slow
def test_quantize_train_merge_push(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, vocab=128, dtype=torch.float32)
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 25  # a trained-looking head (see test_train.py)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    make_tokenizer(src)
    q("quantize", src, tmp_path / "q", "--compute-dtype", "float32")
    data = memorize_set(tmp_path)
    q("train", tmp_path / "q", "--data", data, "--output", tmp_path / "adapter", "--max-steps", 20, "--batch-size", 4,
      "--grad-accum", 2, "--lr", "1e-2", "--lora-r", 8, "--lora-alpha", 16, "--lora-dropout", 0.0, "--backend", "reference")
    q("merge", tmp_path / "q", tmp_path / "adapter", tmp_path / "merged", "--dtype", "float32")
    with LoopbackHub({"tok": "me"}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN="tok", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        q("push", tmp_path / "merged", "me/tiny-merged", env=env)
        arrived = hub.state.repos["me/tiny-merged"]["branches"]["main"]
    assert 'base_model_relation: "merge"' in arrived["README.md"].decode()
    assert "quantization_config" not in json.loads(arrived["config.json"])
    # what arrived computes what the 4-bit model + adapter computes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qconvert
    from qconvert.training.data import build_examples, collate, load_records

    (tmp_path / "dl").mkdir()
    for name, blob in arrived.items():
        (tmp_path / "dl" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dl" / name).write_bytes(blob)
    tok = AutoTokenizer.from_pretrained(tmp_path / "dl")
    batch = collate(build_examples(load_records(data), tok), tok.pad_token_id)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dl").eval()(**batch).logits
        unmerged = qconvert.load_model(tmp_path / "q", backend="reference", device="cpu", adapter=tmp_path / "adapter")(**batch).logits
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < FLOAT32_REL
