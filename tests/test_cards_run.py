"""Issue 24 item 2: every card's usage snippet runs as written for a stranger, after `qconvert push`.

Each kind of folder qconvert writes (quantize of a causal LM and of the MiniLM encoder, a train run
on a Hub base, its merge, its export-adapter) is pushed to the loopback Hub; the card the Hub holds
then has its Python executed in a fresh process that knows nothing but HF_ENDPOINT, from an empty
folder (no local folder of that name to fall back on). What it prints must equal what the local
card's snippet prints beside the local folder: the pushed repo loads as the same model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QCONVERT, make_tiny_llama, minilm_dir
from hub_server import LoopbackHub
from test_experts4bit import fused_source
from test_train import WORDS, make_tokenizer

RUN_ALL = r"""
import contextlib, io, json, sys
out = {}
for name, code in json.load(open(sys.argv[1])).items():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {"__name__": "__main__"})  # a namespace of its own: nothing carried from another snippet
    out[name] = buf.getvalue()
print(json.dumps(out))
"""


def snippets(card: str) -> str:
    """The card's ```python blocks, joined."""
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert blocks, card
    return "\n".join(blocks)


def hub_env(hub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "PYTHONPATH")}
    # a stranger's process: HF_ENDPOINT and a cache of its own (HF_HUB_DISABLE_XET=1: this server speaks LFS, see hub_server.py)
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_TOKEN="tok-alice",
               OMP_NUM_THREADS="1")
    return env


def push_all(hub, tmp: Path, pairs: dict[str, Path]) -> None:
    script = "import sys, json\nfrom qconvert.hub.push import push_folder\nfor repo, f in json.loads(sys.argv[1]).items(): push_folder(f, repo)\n"
    env = dict(hub_env(hub, tmp / "push-home"), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in pairs.items()})],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def run_local(card: str, where: Path) -> str:
    """What the local card's snippet prints when run beside the folder it names."""
    old = Path.cwd()
    buf = io.StringIO()
    try:
        os.chdir(where)
        with contextlib.redirect_stdout(buf):
            exec(snippets(card), {"__name__": "__main__"})
    finally:
        os.chdir(old)
    return buf.getvalue()


@pytest.mark.slow
def test_every_card_snippet_runs_after_push_from_the_repo_id(tmp_path):
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.adapter import export_adapter
    from qconvert.export.merge import merge_adapter
    from qconvert.io.cards import read_card_meta

    src = make_tiny_llama(tmp_path / "src", intermediate=128, dtype=torch.float32)  # bnb's CPU inference wants N % 64 == 0
    make_tokenizer(src)
    q, mini = tmp_path / "tiny-nf4", tmp_path / "mini-nf4"
    quantize_checkpoint(str(src), q, compute_dtype="float32", base_model="acme/tiny-llama")
    quantize_checkpoint(str(minilm_dir()), mini, base_model="sentence-transformers/all-MiniLM-L6-v2")
    moe = tmp_path / "moe-nf4"  # 4-bit routed experts: loaded with qconvert.load_model
    quantize_checkpoint(str(fused_source("qwen3_moe", tmp_path / "moe-src")), moe)
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": " ".join(WORDS[i:i + 4]), "input": "", "output": " ".join(WORDS[i + 4:i + 9])})
                              for i in range(0, 40, 5)) + "\n")
    with LoopbackHub({"tok-alice": "alice"}) as hub:
        push_all(hub, tmp_path, {"alice/tiny-nf4": q, "alice/mini-nf4": mini, "alice/moe-nf4": moe})
        run = tmp_path / "run-lora"  # trained on the Hub base, by its id, as a stranger would
        r = subprocess.run([*QCONVERT, "train", "alice/tiny-nf4", "--data", str(data), "--output", str(run), "--max-steps", "2",
                            "--lr", "1e-2", "--backend", "reference"], capture_output=True, text=True, env=hub_env(hub, tmp_path / "train-home"))
        assert r.returncode == 0, r.stderr[-3000:]
        merged, exported = tmp_path / "tiny-merged", tmp_path / "exported-lora"
        merge_adapter(str(q), str(run), merged, dtype="float32", base_model="alice/tiny-nf4")
        export_adapter(run, exported)
        folders = {"alice/tiny-nf4": q, "alice/mini-nf4": mini, "alice/run-lora": run, "alice/tiny-merged": merged,
                   "alice/exported-lora": exported, "alice/moe-nf4": moe}
        push_all(hub, tmp_path, {k: v for k, v in folders.items() if k not in ("alice/tiny-nf4", "alice/mini-nf4", "alice/moe-nf4")})
        pushed = {repo: hub.state.repos[repo]["branches"]["main"]["README.md"].decode() for repo in folders}
        codes = {repo: snippets(card) for repo, card in pushed.items()}
        (tmp_path / "codes.json").write_text(json.dumps(codes))
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        env = dict(hub_env(hub, tmp_path / "stranger-home"), PYTHONPATH=str(Path(__file__).resolve().parent.parent))  # qconvert installed
        r = subprocess.run([sys.executable, "-c", RUN_ALL, str(tmp_path / "codes.json")], capture_output=True, text=True, cwd=stranger,
                           env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    for repo, folder in folders.items():
        card, local = pushed[repo], (folder / "README.md").read_text()
        assert f'"{repo}"' in codes[repo] and f'"{folder.name}"' not in codes[repo]  # the repo id, never the local folder
        assert card.replace(f'"{repo}"', f'"{folder.name}"') == local  # only the snippet's marked line changed; the folder did not
        here = local.replace('base = "alice/tiny-nf4"', f'base = "{q}"')  # the adapters' Hub base, as its local folder
        assert printed[repo].strip() and printed[repo] == run_local(here, folder.parent), repo
    metas = {repo: read_card_meta(card) for repo, card in pushed.items()}
    assert {repo: m.get("pipeline_tag") for repo, m in metas.items()} == {
        "alice/tiny-nf4": "text-generation", "alice/mini-nf4": "feature-extraction", "alice/run-lora": "text-generation",
        "alice/tiny-merged": "text-generation", "alice/exported-lora": "text-generation", "alice/moe-nf4": "text-generation"}
    assert "model = qconvert.load_model(repo)" in codes["alice/moe-nf4"] and metas["alice/moe-nf4"]["library_name"] == "qconvert"
    assert metas["alice/tiny-nf4"]["base_model"] == "acme/tiny-llama"
    assert metas["alice/mini-nf4"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metas["alice/tiny-merged"]["base_model"] == "alice/tiny-nf4" == metas["alice/run-lora"]["base_model"]
    assert "AutoModelForCausalLM" in codes["alice/tiny-nf4"] and "AutoModel.from_pretrained" in codes["alice/mini-nf4"]
    for repo in ("alice/run-lora", "alice/exported-lora"):  # the prompt format the adapter learned (auto-detected: alpaca)
        assert "### Instruction:" in codes[repo] and "Prompt format: alpaca" in pushed[repo]
        assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)' in codes[repo]


def test_base_model_option_takes_hub_ids_only(tmp_path, monkeypatch):
    """--base-model on quantize and merge names a Hub id; a local path (even one shaped like an id)
    or a bare name is refused before anything is read or written."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import OptionError
    from qconvert.export.merge import merge_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "llama").mkdir(parents=True)
    for bad in ("llama", "acme/llama", "a/b/c", str(tmp_path)):
        with pytest.raises(OptionError, match="is not a Hub repo id"):
            quantize_checkpoint("no-such-source", tmp_path / "q", base_model=bad)
        with pytest.raises(OptionError, match="is not a Hub repo id"):
            merge_adapter("no-such-base", "no-such-adapter", tmp_path / "m", base_model=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme"]
