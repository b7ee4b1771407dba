"""`qconvert inspect` on checkpoints written by transformers + bitsandbytes, and on bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from helpers import run_cli_here as run, bnb_quantize_save, minilm_dir




@pytest.fixture(scope="module")
def minilm_bnb(tmp_path_factory):
    return bnb_quantize_save(minilm_dir(), tmp_path_factory.mktemp("minilm") / "bnb", auto_class="AutoModel")


@pytest.mark.slow
def test_inspect_json_on_transformers_bitsandbytes_checkpoint(minilm_bnb):
    report = json.loads(run("inspect", minilm_bnb, "--json").stdout)
    q = [t for t in report["tensors"] if t["quant_type"]]
    # transformers quantizes the 36 encoder linears and the pooler of all-MiniLM-L6-v2
    assert len(q) == 37
    assert {(t["quant_type"], t["blocksize"], t["double_quant"], t["dtype"]) for t in q} == {("nf4", 64, True, "float32")}
    assert 4.12 < report["bits_per_param"] < 4.135  # 4 + 8/64 + 32/(64*256) = 4.1270
    assert report["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)
    by_name = {t["name"]: t for t in report["tensors"]}
    w = by_name["encoder.layer.0.attention.self.query.weight"]
    assert w["shape"] == [384, 384]
    # codes + uint8 absmax + nested absmax + the two tables + the quant-state JSON
    n = 384 * 384
    core = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256)
    assert core + 64 + 1024 < w["bytes"] < core + 64 + 1024 + 400
    emb = by_name["embeddings.word_embeddings.weight"]
    assert emb["quant_type"] is None and emb["dtype"] == "float32" and emb["bytes"] == 30522 * 384 * 4
    # every stored byte is accounted for, once
    on_disk = (minilm_bnb / "model.safetensors").stat().st_size
    assert report["total_bytes"] < on_disk < report["total_bytes"] + 64 * 1024


def test_inspect_table_and_single_file(minilm_bnb):
    out = run("inspect", minilm_bnb / "model.safetensors").stdout
    assert "encoder.layer.5.output.dense.weight" in out and "nf4" in out
    assert "37 quantized" in out and "4.127 bits/param" in out


def test_inspect_sharded_unquantized(tiny_models):
    src = tiny_models.llama(max_shard_size="20KB")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    report = json.loads(run("inspect", src, "--json").stdout)
    assert report["bits_per_param"] is None and len(report["files"]) > 1
    assert all(t["quant_type"] is None and t["dtype"] == "bfloat16" for t in report["tensors"])


def test_inspect_errors(tmp_path):
    r = run("inspect", tmp_path / "nope", ok=False)
    first, *rest = r.stderr.splitlines()  # one error: its first line, then only detail and hint lines
    assert r.returncode == 1 and first.startswith("qconvert: error: ") and "no such file or folder" in first
    assert rest and all(ln.startswith(("  ", "hint: ")) for ln in rest)
    (tmp_path / "empty").mkdir()
    r = run("inspect", tmp_path / "empty", ok=False)
    assert r.returncode == 1 and "no model.safetensors" in r.stderr
    bad = tmp_path / "escape"
    bad.mkdir()
    save_file({"a": torch.zeros(2)}, str(bad / "model-00001-of-00001.safetensors"))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    r = run("inspect", bad, ok=False)
    assert r.returncode == 1 and "outside the checkpoint folder" in r.stderr
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    save_file({"a": torch.zeros(1000)}, str(trunc / "model.safetensors"))
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run("inspect", trunc, ok=False)
    assert r.returncode == 1 and "model.safetensors" in r.stderr and "corrupt" in r.stderr
