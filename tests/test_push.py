"""`qconvert push` through the real huggingface_hub client against a loopback Hub server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import QCONVERT, make_tiny_llama
from hub_server import LoopbackHub



@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("push")
    quantize_checkpoint(str(make_tiny_llama(d / "src", max_shard_size="40KB")), d / "q", max_shard_size="30KB")
    return d / "q"


def push(hub, *args, token="tok-alice", extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN",)}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(Path(hub.home)))
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run([*QCONVERT, "push", *map(str, args)], capture_output=True, text=True, env=env)


def as_pushed(folder: Path, repo_id: str) -> dict[str, bytes]:
    """The folder's files as push publishes them: byte for byte, the card's snippet naming the repo id."""
    from qconvert.io.cards import with_repo_id

    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["README.md"] = with_repo_id(files["README.md"].decode(), repo_id).encode()
    return files


@pytest.fixture
def hub(tmp_path):
    with LoopbackHub({"tok-alice": "alice", "tok-bob": "bob"}) as h:
        h.home = tmp_path / "hf-home"
        yield h


@pytest.mark.slow
def test_push_quantized_checkpoint_arrives_intact(hub, quantized):
    r = push(hub, quantized, "alice/tiny-nf4", "--private", "--commit-message", "first upload")
    assert r.returncode == 0, r.stderr
    repo = hub.state.repos["alice/tiny-nf4"]
    assert repo["private"] and repo["commits"][0]["summary"] == "first upload"
    arrived = repo["branches"]["main"]
    local = as_pushed(quantized, "alice/tiny-nf4")
    assert arrived == local  # every file, byte for byte (shards went through LFS), the card naming the repo
    assert any(k.endswith(".safetensors") for k in arrived) and len(hub.state.lfs) >= 2
    card = arrived["README.md"].decode()
    assert 'base_model_relation: "quantized"' in card
    # pushing again to an existing repo is fine (create_repo exist_ok), and to a new branch
    r = push(hub, quantized, "alice/tiny-nf4", "--revision", "v2")
    assert r.returncode == 0, r.stderr
    assert hub.state.repos["alice/tiny-nf4"]["branches"]["v2"] == local
    r = push(hub, quantized, "alice/tiny-nf4", "--create-pr")
    assert r.returncode == 0 and "discussions/1" in r.stdout


@pytest.mark.slow
def test_push_refuses_invalid_folders_before_uploading(hub, quantized, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    card = (bad / "README.md").read_text().replace('base_model_relation: "quantized"', 'base_model_relation: "merge"')
    (bad / "README.md").write_text(card)
    r = push(hub, bad, "alice/x")
    assert r.returncode == 1 and "base_model_relation is 'merge'" in r.stderr
    (bad / "README.md").write_text(card.replace('"merge"', '"quantized"'))
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    from safetensors.torch import load_file, save_file

    t = load_file(str(shard))
    k = next(k for k in t if k.endswith(".absmax"))
    t[k] = t[k][:-1]
    save_file(t, str(shard), metadata={"format": "pt"})
    r = push(hub, bad, "alice/x")
    assert r.returncode == 1 and "absmax" in r.stderr and "expected uint8" in r.stderr
    assert "alice/x" not in hub.state.repos  # nothing was created


@pytest.mark.slow
def test_push_errors_are_friendly(hub, quantized, tmp_path):
    r = push(hub, quantized, "alice/y", token=None)
    assert r.returncode == 1 and "no Hugging Face token" in r.stderr and "HF_TOKEN" in r.stderr
    r = push(hub, quantized, "alice/y", token="tok-wrong")
    assert r.returncode == 1 and "HTTP 401" in r.stderr
    r = push(hub, quantized, "alice/y", token="tok-bob")
    assert r.returncode == 1 and "HTTP 403" in r.stderr and "belongs to someone else" in r.stderr
    dead = push(hub, quantized, "alice/y", extra_env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert dead.returncode == 1 and "re-running the same command resumes" in dead.stderr


@pytest.mark.slow
def test_push_cut_off_before_its_commit_resumes_on_rerun(hub, quantized):
    hub.state.fail_commits = 1
    r = push(hub, quantized, "alice/resume")
    assert r.returncode == 1 and "HTTP 500" not in r.stdout and "re-running the same command resumes" in r.stderr
    assert hub.state.repos["alice/resume"]["branches"]["main"] == {}  # nothing committed
    uploaded = list(hub.state.lfs_puts)
    assert len(uploaded) >= 2  # the shards' bytes did arrive before the commit failed
    r = push(hub, quantized, "alice/resume")
    assert r.returncode == 0, r.stderr
    assert hub.state.lfs_puts == uploaded  # the re-run sent no LFS object again
    assert hub.state.repos["alice/resume"]["branches"]["main"] == as_pushed(quantized, "alice/resume")


def test_push_of_a_train_output_publishes_the_adapter_not_the_run(hub, tmp_path):
    """A `qconvert train` output also holds resumable checkpoints, logs and config.yaml (local paths):
    push publishes the adapter, its card and picture, and leaves the run's own files behind."""
    from test_hostile_adapter import _adapter_folder

    a = _adapter_folder(tmp_path)
    (a / "checkpoint-2").mkdir()
    (a / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (a / "runs").mkdir()
    (a / "runs" / "events").write_bytes(b"tb")
    (a / "config.yaml").write_text(f"data: {tmp_path}/private/data.jsonl\n")
    (a / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = push(hub, a, "alice/tiny-lora")
    assert r.returncode == 0, r.stderr
    arrived = hub.state.repos["alice/tiny-lora"]["branches"]["main"]
    assert set(arrived) - {".gitattributes"} == {"README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png"}
    assert arrived["adapter_model.safetensors"] == (a / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_push_refuses_a_link_out_of_the_folder(hub, quantized, tmp_path):
    import shutil

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    (q / "notes.txt").symlink_to(secret)
    r = push(hub, q, "alice/tiny-nf4")
    assert r.returncode == 1 and "notes.txt: a symbolic link out of the folder, nothing was uploaded" in r.stderr, r.stderr
    assert "alice/tiny-nf4" not in hub.state.repos
    (q / "notes.txt").unlink()
    (q / "notes.txt").symlink_to(q / "README.md")  # a link inside the folder is fine (published when named)
    r = push(hub, q, "alice/tiny-nf4", "--include", "notes.txt")
    assert r.returncode == 0, r.stderr
    assert hub.state.repos["alice/tiny-nf4"]["branches"]["main"]["notes.txt"] == (q / "README.md").read_bytes()


# ---------------------------------------------------------------- what is published: only what qconvert wrote


def test_push_sends_no_leftover_hidden_file_or_secret_and_refuses_unknown_files(hub, tmp_path):
    """A killed run's `.checkpoint-N.tmp/trainer_state.pt` and `config.yaml.tmp` (local paths), a
    `.env` and an `id_rsa` that sat in the folder were all published."""
    from test_hostile_adapter import _adapter_folder

    a = _adapter_folder(tmp_path)
    (a / ".checkpoint-3.tmp").mkdir()
    (a / ".checkpoint-3.tmp" / "trainer_state.pt").write_bytes(b"optimizer state")
    (a / ".checkpoint-4.qconvert-tmp").mkdir()
    (a / ".checkpoint-4.qconvert-tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (a / "config.yaml.tmp").write_text(f"data: {tmp_path}/private.jsonl\n")
    (a / ".qconvert-run.json").write_text("{}")
    (a / ".env").write_text("HF_TOKEN=hf_secret\n")
    (a / "id_rsa").write_text("PRIVATE KEY\n")
    (a / "notes.txt").write_text("mine\n")
    r = push(hub, a, "alice/leftovers")
    assert r.returncode == 1 and "qconvert: error: notes.txt: not a file qconvert writes; nothing was uploaded" in r.stderr, r.stderr
    assert "hint: publish it with --include NAME" in r.stderr
    assert "warning: .env, id_rsa: looks like a secret (credentials, keys, tokens); not uploaded" in r.stderr
    assert "alice/leftovers" not in hub.state.repos
    r = push(hub, a, "alice/leftovers", "--include", "notes.txt")
    assert r.returncode == 0, r.stderr
    arrived = hub.state.repos["alice/leftovers"]["branches"]["main"]
    assert set(arrived) - {".gitattributes"} == {"README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt"}
    # a secret goes only when named, and the warning says so
    r = push(hub, a, "alice/leftovers", "--include", "notes.txt", "--include", "id_rsa")
    assert r.returncode == 0 and "warning: id_rsa: looks like a secret, uploaded because --include names it" in r.stderr
    assert "id_rsa" in hub.state.repos["alice/leftovers"]["branches"]["main"]
    # a wildcard sends neither a temporary leftover nor a hidden file nor a secret
    r = push(hub, a, "alice/leftovers2", "--include", "*")
    assert r.returncode == 0, r.stderr
    arrived = hub.state.repos["alice/leftovers2"]["branches"]["main"]
    assert set(arrived) - {".gitattributes"} == {"README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt"}


@pytest.mark.slow
def test_push_prints_a_folder_name_with_escape_sequences_escaped(hub, quantized, tmp_path):
    import shutil

    q = tmp_path / "q\x1b]0;owned\x07\x1b[2J"
    shutil.copytree(quantized, q)
    r = push(hub, q, "alice/esc")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\\x1b]0;owned\\x07" in r.stdout


def test_upload_plan_keeps_run_files_hidden_files_and_secrets_from_wildcards(tmp_path):
    from qconvert.hub.push import upload_plan

    for rel in ("README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.yaml", "runs/ev",
                "checkpoint-2/trainer_state.pt", ".cache/x", "server.pem", "sub/id_rsa.pub", "a[1].txt", ".checkpoint-3.tmp/s.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    plan = upload_plan(tmp_path, "adapter", ["*"])
    assert plan["upload"] == ["README.md", "a[1].txt", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"]
    assert plan["secrets"] == ["server.pem", "sub/id_rsa.pub"] and plan["unknown"] == []
    plan = upload_plan(tmp_path, "adapter", ["config.yaml", "server.pem", ".checkpoint-3.tmp/s.pt"])
    assert "config.yaml" in plan["upload"] and "server.pem" in plan["upload"] and ".checkpoint-3.tmp/s.pt" not in plan["upload"]
    assert plan["unknown"] == ["a[1].txt"]


def test_upload_plan_publishes_the_tokenizer_files_of_a_model(tmp_path):
    """A quantized (or merged) model's tokenizer files are companions quantize copied, published with it:
    "*token*" in the secret patterns must not hold back tokenizer.json and its siblings (a stranger
    could not use the model without them); a real token file still is held back."""
    from qconvert.hub.push import upload_plan

    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "hf_token")
    for rel in names:
        (tmp_path / rel).write_text("x")
    plan = upload_plan(tmp_path, "quantized")
    assert sorted(plan["upload"]) == sorted(set(names) - {"hf_token"})
    assert plan["secrets"] == ["hf_token"] and plan["unknown"] == []

