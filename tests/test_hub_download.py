"""`qconvert quantize org/name` through the real huggingface_hub client against a real Hub-compatible
server (olah) on loopback, serving a local git repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import olah_server
from helpers import QCONVERT, make_tiny_llama

if not olah_server.available():
    if os.environ.get("QCONVERT_REQUIRE_OLAH"):
        pytest.fail("olah is required (QCONVERT_REQUIRE_OLAH=1) but .venv-olah is missing: run tools/setup_olah.sh", pytrace=False)
    pytest.skip("olah not installed (tools/setup_olah.sh)", allow_module_level=True)



@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    src = make_tiny_llama(d / "model", max_shard_size="40KB")
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    h = olah_server.OlahHub(d / "olah")
    h.sha = h.add_repo("acme/tiny-llama", src)
    h.src = src
    h.start()
    yield h
    h.stop()


def env_for(hub, tmp_path, offline=False):
    return dict(
        os.environ,
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="30",
        HF_HUB_DOWNLOAD_TIMEOUT="30",
    )


def quantize(hub, tmp_path, *args, offline=False):
    return subprocess.run([*QCONVERT, "quantize", *map(str, args)], capture_output=True, text=True, env=env_for(hub, tmp_path, offline))


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.slow
def test_quantize_from_hub_equals_local(hub, tmp_path):
    r = quantize(hub, tmp_path, "acme/tiny-llama", tmp_path / "from-hub", "--max-shard-size", "30KB")
    assert r.returncode == 0, r.stderr + (hub.dir / "olah.log").read_text()[-2000:]
    r2 = subprocess.run([*QCONVERT, "quantize", str(hub.src), str(tmp_path / "local"), "--max-shard-size", "30KB"], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    a, b = tensors(tmp_path / "from-hub"), tensors(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "from-hub" / "config.json").read_text())
    assert cfg["qconvert"]["source"] == "acme/tiny-llama" and cfg["qconvert"]["source_revision"] == hub.sha
    assert json.loads((tmp_path / "from-hub" / "tokenizer_config.json").read_text()) == {"model_max_length": 128}
    card = (tmp_path / "from-hub" / "README.md").read_text()
    assert 'base_model: "acme/tiny-llama"' in card and hub.sha in card
    # the shards were fetched for this run and deleted after use: no weights left in the HF cache
    assert not list((tmp_path / "hf-home").rglob("*.safetensors"))
    assert not (tmp_path / ".from-hub.qconvert-partial").exists()


@pytest.mark.slow
def test_revision_pin_and_keep_source_then_offline(hub, tmp_path):
    r = quantize(hub, tmp_path, "acme/tiny-llama", tmp_path / "a", "--revision", hub.sha, "--keep-source")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "hf-home").rglob("model-*.safetensors"))) >= 2  # kept in the HF cache
    r = quantize(hub, tmp_path, "acme/tiny-llama", tmp_path / "b", "--revision", hub.sha, offline=True)
    assert r.returncode == 0, r.stderr  # offline, from the cache alone
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_hub_errors(hub, tmp_path):
    r = quantize(hub, tmp_path, "acme/no-such-model", tmp_path / "x")
    assert r.returncode == 1 and "acme/no-such-model" in r.stderr and "not found" in r.stderr
    r = quantize(hub, tmp_path, "acme/tiny-llama", tmp_path / "x", "--revision", "no-such-branch")
    assert r.returncode == 1 and "no-such-branch" in r.stderr
    r = quantize(hub, tmp_path / "empty", "acme/tiny-llama", tmp_path / "x", offline=True)
    assert r.returncode == 1 and "acme/tiny-llama" in r.stderr and ("cache" in r.stderr or "offline" in r.stderr)
    first, *rest = r.stderr.splitlines()  # one error: its first line, then only detail and hint lines
    assert first.startswith("qconvert: error: ") and all(ln.startswith(("  ", "hint: ")) for ln in rest)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_from_hub_id_names_the_hub_base(hub, tmp_path):
    """A 4-bit model trained from its Hub id: the adapter names that id, never the local cache path."""
    from qconvert.convert.quantize import quantize_checkpoint
    from test_train import make_tokenizer, memorize_set

    src = make_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, dtype=torch.float32)
    make_tokenizer(src)
    quantize_checkpoint(str(src), tmp_path / "q4")
    hub.add_repo("acme/tiny-q4", tmp_path / "q4")
    env = env_for(hub, tmp_path)
    r = subprocess.run([*QCONVERT, "train", "acme/tiny-q4", "--data", str(memorize_set(tmp_path)), "--output", str(tmp_path / "ad"),
                        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--backend", "reference"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "acme/tiny-q4"
    assert 'base_model: "acme/tiny-q4"' in (tmp_path / "ad" / "README.md").read_text()


def test_plan_reads_headers_only(hub, tmp_path):
    """--dry-run plans from the safetensors headers the Hub serves: no weight shard is downloaded."""
    r = quantize(hub, tmp_path, "acme/tiny-llama", tmp_path / "out", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantized"] == 14
    assert not [p for p in tmp_path.rglob("*.safetensors")], "a shard was downloaded to plan"


# ---------------------------------------------------------------- a hostile Hub endpoint (issue 21)

DS_FILES = {"data/train.jsonl": b'{"text": "w1 w2"}\n{"text": "w3"}\n', "README.md": b"---\nlicense: mit\n---\n# tiny\n"}
HOSTILE = [
    ("etag", {"etag": "PLANT"}, "the ETag '../"),
    ("sha", {"sha": "../../../../" + "a" * 28}, "which is not 40 hex digits"),
    ("commit-header", {"commit": "../" + "b" * 37}, "from commit '../"),
    ("file-name", {"siblings": ["data/../../../escape.jsonl"]}, "the Hub lists a file named 'data/../../../escape.jsonl'"),
    ("trickle", {"trickle": 1.0}, "the download ran past 3 s"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, answers, needle", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_hub_dataset_download_is_refused_and_writes_nothing_outside(tmp_path, case, answers, needle):
    """huggingface_hub 2.4 made cache paths of the server's ETag and sha: the old `train --data
    org/ds` wrote a file outside the cache (etag), or waited for the trickle without end. Now each is
    refused before it becomes a path, in a child under a memory and time limit
    (QCONVERT_DOWNLOAD_SECONDS=3)."""
    from hostile_util import run_limited
    from hub_server import LoopbackHub

    home, marker = tmp_path / "hf-home", tmp_path / "pwned"
    storage = home / "hub" / "datasets--acme--ds"
    if answers.get("etag") == "PLANT":
        answers = {"etag": os.path.relpath(marker, storage / "blobs")}
    code = ("import os, sys; os.environ.update(HF_ENDPOINT=sys.argv[1], HF_HOME=sys.argv[2], HF_HUB_DISABLE_XET='1',"
            " HF_HUB_OFFLINE='0', QCONVERT_DOWNLOAD_SECONDS='3')\n"
            "from qconvert.training.data import load_records\n"
            "try:\n    print(load_records('acme/ds'))\nexcept Exception as e:\n    print(type(e).__name__, e)")
    with LoopbackHub({}) as hub:
        hub.state.datasets["acme/ds"] = dict({"files": DS_FILES, "sha": "c" * 40}, **answers)
        r, seconds = run_limited(code, hub.endpoint, home, mem_mb=1536, timeout_s=40)
    assert not marker.exists() and not (tmp_path / "escape.jsonl").exists(), r.stdout
    assert r.stdout.startswith("SourceError acme/ds") and needle in r.stdout, (r.stdout, r.stderr[-2000:])
    assert all(Path(p).resolve().is_relative_to(home.resolve()) for p in home.rglob("*"))


@pytest.mark.slow
def test_hub_dataset_download_lands_in_the_cache_layout_and_is_read_offline(tmp_path):
    """The checked path writes the Hugging Face cache's own layout: huggingface_hub finds it offline."""
    from hub_server import LoopbackHub

    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    code = ("import os, sys; os.environ.update(HF_ENDPOINT=sys.argv[1], HF_HUB_OFFLINE=sys.argv[2])\n"
            "from qconvert.training.data import load_records; print(load_records('acme/ds'))")
    with LoopbackHub({}) as hub:
        hub.state.datasets["acme/ds"] = {"files": DS_FILES, "sha": "c" * 40}
        for offline in ("0", "1"):
            r = subprocess.run([sys.executable, "-c", code, hub.endpoint, offline], capture_output=True, text=True,
                               env=dict(os.environ, **env))
            assert r.stdout.strip() == "[(1, {'text': 'w1 w2'}), (2, {'text': 'w3'})]", r.stderr[-2000:]
    snap = tmp_path / "hf-home" / "hub" / "datasets--acme--ds" / "snapshots" / ("c" * 40)
    assert (snap / "data" / "train.jsonl").is_symlink() and (snap / "data" / "train.jsonl").read_bytes() == DS_FILES["data/train.jsonl"]


@pytest.mark.slow
def test_hub_dataset_card_naming_a_local_file_is_refused(tmp_path):
    """A Hub dataset's card whose data_files names an absolute local path: the old `train --data
    org/ds` read that file (and echoed its keys under --strict-data)."""
    from hub_server import LoopbackHub

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "w1", "api_key": "SECRET-VALUE"}\n')
    card = f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {secret}\n---\n".encode()
    code = ("import os, sys; os.environ.update(HF_ENDPOINT=sys.argv[1], HF_HOME=sys.argv[2], HF_HUB_DISABLE_XET='1', HF_HUB_OFFLINE='0')\n"
            "from qconvert.training.data import load_records\n"
            "try:\n    print(load_records('acme/ds'))\nexcept Exception as e:\n    print(type(e).__name__, e)")
    with LoopbackHub({}) as hub:
        hub.state.datasets["acme/ds"] = {"files": dict(DS_FILES, **{"README.md": card}), "sha": "c" * 40}
        r = subprocess.run([sys.executable, "-c", code, hub.endpoint, tmp_path / "hf-home"], capture_output=True, text=True)
    assert "SECRET-VALUE" not in r.stdout and "api_key" not in r.stdout, r.stdout
    assert r.stdout.startswith("DataError acme/ds: split 'train' names the file") and "outside the dataset" in r.stdout, r.stdout
