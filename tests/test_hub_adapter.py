"""Hub ids for adapters (issue 24, item 9): `generate --adapter org/name`, `eval --adapter org/name`
and ``load_model(adapter="org/name")`` fetch the adapter's files, and only those, through the checked
Hub download path, then read it as the local folder it came from: the same logits and losses.
Served by a real Hub-compatible server (olah) on loopback, through the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import olah_server
from helpers import QCONVERT
from runtime_helpers import make_word_llama, random_texts, write_jsonl

PROMPT = "w1 w2 w3 w4"


def test_adapter_folder_or_hub_id_else_refused(tmp_path):
    from qconvert.errors import SourceError
    from qconvert.io.source import resolve_adapter_path

    (tmp_path / "run").mkdir()
    assert resolve_adapter_path(tmp_path / "run") == (tmp_path / "run", None)  # a local folder is read where it is
    for bad in (tmp_path / "missing" / "adapter", "not-an-id", "a/b/c"):
        with pytest.raises(SourceError, match="no such adapter folder, and not a Hub repo id"):
            resolve_adapter_path(bad)


LOAD = """
import json, sys, torch, qconvert
from qconvert.errors import SourceError
q, local = sys.argv[1], sys.argv[2]
ids = torch.tensor([[5, 9, 12, 7, 30]])
with torch.no_grad():
    hub = qconvert.load_model(q, backend="reference", adapter="acme/tiny-lora")(ids).logits
    loc = qconvert.load_model(q, backend="reference", adapter=local)(ids).logits
    base = qconvert.load_model(q, backend="reference")(ids).logits
try:
    qconvert.load_model(q, adapter="acme/tiny-llama-src")
    refused = None
except SourceError as e:
    refused = str(e)
print(json.dumps({"equal": torch.equal(hub, loc), "changed": not torch.equal(hub, base), "refused": refused}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not olah_server.available(), reason="olah not installed (tools/setup_olah.sh)")
def test_hub_adapter_reads_as_its_local_folder(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_word_llama(tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q", compute_dtype="float32")
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(src), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    peft.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "notes.bin").write_bytes(b"not fetched")  # only the adapter's own files are downloaded
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_texts(4, 10)])
    hub = olah_server.OlahHub(tmp_path / "olah")
    hub.add_repo("acme/tiny-lora", tmp_path / "adapter")
    hub.add_repo("acme/tiny-llama-src", src)
    hub.start()
    try:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        r = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "q"), str(tmp_path / "adapter")],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["equal"] and got["changed"], got
        assert "acme/tiny-llama-src: the Hub repository holds no adapter_config.json" in got["refused"]
        fetched = {p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() and "snapshots" in p.parts}
        assert fetched == {"adapter_config.json", "adapter_model.safetensors"}, fetched
        for command in (["generate", tmp_path / "q", "--prompt", PROMPT, "--max-new-tokens", 6],
                        ["eval", tmp_path / "q", "--data", data]):
            outs = []
            for adapter in ("acme/tiny-lora", tmp_path / "adapter"):
                r = subprocess.run([*QCONVERT, *map(str, command), "--adapter", str(adapter), "--backend", "reference", "--json"],
                                   capture_output=True, text=True, env=env)
                assert r.returncode == 0, r.stderr[-3000:]
                row = json.loads(r.stdout.strip().splitlines()[-1])
                row.pop("adapter")
                outs.append(row)
            assert outs[0] == outs[1]
    finally:
        hub.stop()
