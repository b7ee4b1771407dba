"""`qconvert export-adapter`: only the PEFT adapter leaves a training checkpoint, unchanged, loadable by
PEFT, with an adapter card that `qconvert push` accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import QCONVERT, float32_reference, make_tiny_llama, run_cli_here
from hub_server import LoopbackHub
from qconvert.training.checkpoint import save_state
from qconvert.training.outdir import STATE

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def run(*args, env=None):
    """The command in process; with ``env`` (the push to a local Hub, read at import time) in a process."""
    if env is None:
        return run_cli_here(*args, ok=False)
    return subprocess.run([*QCONVERT, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A `qconvert train`-shaped output: checkpoint-N folders with a PEFT adapter and trainer state."""
    from peft import LoraConfig, get_peft_model

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("export")
    quantize_checkpoint(str(make_tiny_llama(d / "src", hidden=64, intermediate=128, dtype=torch.float32)), d / "q")
    out = d / "run"
    for step, seed in ((2, 1), (10, 2)):  # the later checkpoint must win (numeric order, not 10 < 2)
        torch.manual_seed(0)
        m = get_peft_model(float32_reference(d / "q"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m.save_pretrained(out / f"checkpoint-{step}")
        save_state({"optimizer": {}, "step": step}, out / f"checkpoint-{step}" / STATE)
        if step == 10:
            with torch.no_grad():
                want = m(IDS).logits
    return d, out, want


@pytest.mark.slow
def test_export_adapter_is_clean_and_loads_in_peft(train_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from qconvert.io.cards import read_card_meta

    d, out, want = train_dir
    r = run("export-adapter", out, tmp_path / "a", "--base-model", "alice/tiny-nf4")
    assert r.returncode == 0, r.stderr
    assert "checkpoint-10" in r.stdout and "8 LoRA tensors" in r.stdout
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    got, src = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(out / "checkpoint-10" / "adapter_model.safetensors"))
    assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "alice/tiny-nf4" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    meta = read_card_meta((tmp_path / "a" / "README.md").read_text())
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft" and meta["base_model"] == "alice/tiny-nf4"
    with torch.no_grad():
        logits = PeftModel.from_pretrained(float32_reference(d / "q"), tmp_path / "a").eval()(IDS).logits
    assert torch.allclose(logits, want, rtol=0, atol=1e-6)
    # an explicit checkpoint works too, and the export pushes as an adapter
    r = run("export-adapter", out / "checkpoint-2", tmp_path / "a2", "--base-model", "alice/tiny-nf4")
    assert r.returncode == 0, r.stderr
    with LoopbackHub({"tok": "alice"}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN="tok", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        r = run("push", tmp_path / "a2", "alice/tiny-lora", env=env)
        assert r.returncode == 0, r.stderr
        arrived = hub.state.repos["alice/tiny-lora"]["branches"]["main"]
    assert arrived["adapter_model.safetensors"] == (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert set(arrived) - {".gitattributes"} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.slow
def test_export_adapter_errors(train_dir, tmp_path):
    _, out, _ = train_dir
    r = run("export-adapter", tmp_path, tmp_path / "o")
    assert r.returncode == 1 and "no checkpoint-N folder" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(out / "checkpoint-2", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    r = run("export-adapter", bad, tmp_path / "o")
    assert r.returncode == 1 and "is not LORA" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    r = run("export-adapter", out, tmp_path / "full")
    assert r.returncode == 1 and "--overwrite" in r.stderr and (tmp_path / "full" / "x").read_text() == "mine"


@pytest.mark.slow
def test_export_adapter_picks_the_runs_own_latest_checkpoint_not_another_tools(train_dir, tmp_path):
    """A run folder whose manifest (train/outdir.py) lists checkpoint-2 only: the checkpoint-10 beside it
    belongs to another tool, so export-adapter takes checkpoint-2's adapter (it took the newest by name)."""
    from safetensors.torch import load_file

    from qconvert.training.outdir import write_manifest

    _, out, _ = train_dir
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    write_manifest(run_dir, ["checkpoint-2"])
    r = run("export-adapter", run_dir, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert "checkpoint-2" in r.stdout and "checkpoint-10" not in r.stdout
    got, want = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
