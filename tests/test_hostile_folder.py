"""Hostile and careless source folders: links out of the folder, files that are not companions of the
model, special files, hostile index and config files. Nothing outside the model folder may reach the
output (which `push` publishes), nothing is walked, and each refusal is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hostile_util import all_bytes, cache_snapshot, make_llama_files, write_safetensors
from qconvert.convert.quantize import quantize_checkpoint
from qconvert.errors import FormatError, SourceError
from qconvert.io.checkpoint import Checkpoint

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for publishing"


def quantize(src, out, **kw):
    lines: list[str] = []
    s = quantize_checkpoint(str(src), str(out), log=lines.append, **kw)
    return s, lines


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "home" / ".ssh" / "id_ed25519"
    p.parent.mkdir(parents=True)
    p.write_bytes(SECRET)
    return p


def test_links_to_files_outside_the_folder_are_not_copied(tmp_path, secret):
    src = make_llama_files(tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "notes.txt").symlink_to(secret)  # not a companion file at all
    (src / "tokenizer_config.json").symlink_to(secret)  # a companion's name, but a link out of the folder
    (src / "sub").mkdir()
    (src / "sub" / "template.jinja").write_text("{{ messages }}")
    (src / "chat_template.jinja").symlink_to("sub/template.jinja")  # a link that stays inside: fine
    s, log = quantize(src, tmp_path / "out")
    out = tmp_path / "out"
    assert SECRET not in all_bytes(out)
    assert s["copied_files"] == ["chat_template.jinja", "tokenizer.json"]
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}" and not (out / "chat_template.jinja").is_symlink()
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (out / "tokenizer_config.json").exists() and not (out / "notes.txt").exists() and not (out / "sub").exists()
    assert "warning: tokenizer_config.json not copied: it is a link to a file outside the model folder" in log
    assert any(line.startswith("not copied (") and "notes.txt" in line and "sub/" in line for line in log), log
    assert secret.read_bytes() == SECRET and (src / "notes.txt").is_symlink()  # the input is left as it was


def test_single_file_source_copies_only_the_companions_beside_it(tmp_path):
    folder = make_llama_files(tmp_path / "Downloads")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "taxes" / "2025").mkdir(parents=True)
    (folder / "taxes" / "2025" / "return.pdf").write_bytes(SECRET)
    (folder / "id_rsa").write_bytes(SECRET)
    (folder / "modeling_evil.py").write_text("import os")
    s, log = quantize(folder / "model.safetensors", tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert s["copied_files"] == ["tokenizer.json"] and SECRET not in all_bytes(out)
    assert any("id_rsa" in line and "modeling_evil.py" in line and "taxes/" in line for line in log), log


def test_special_files_with_companion_names_are_skipped(tmp_path):
    """A FIFO named tokenizer.json would block a copy forever (or raise from shutil); a folder named
    vocab.txt and a dangling link are not files either; a 5 GB tokenizer.model would fill the disk."""
    src = make_llama_files(tmp_path / "src")
    os.mkfifo(src / "tokenizer.json")
    (src / "vocab.txt").mkdir()
    (src / "merges.txt").symlink_to(tmp_path / "nowhere")
    with open(src / "tokenizer.model", "wb") as f:  # 5 GB that would fill the disk (sparse here)
        f.truncate(5 * 10**9)
    s, log = quantize(src, tmp_path / "out")
    assert s["copied_files"] == []
    for name in ("tokenizer.json", "vocab.txt", "merges.txt"):
        assert f"warning: {name} not copied: not a regular file" in log
        assert not (tmp_path / "out" / name).exists()
    assert "warning: tokenizer.model not copied: 5.0 GB is not the size of a tokenizer or config file" in log
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_sentence_transformers_modules_are_copied_but_not_walked(tmp_path):
    src = make_llama_files(tmp_path / "src")
    (src / "modules.json").write_text("[]")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "1_Pooling" / "deeper").mkdir()
    (src / "1_Pooling" / "deeper" / "config.json").write_text("{}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    s, _ = quantize(src, tmp_path / "out")
    assert s["copied_files"] == ["1_Pooling/config.json", "additional_chat_templates/tool_use.jinja", "modules.json"]
    assert not (tmp_path / "out" / "1_Pooling" / "deeper").exists()


def test_hugging_face_cache_snapshot_links_into_blobs_keep_working(tmp_path, secret):
    """The cache's real layout: snapshots/<sha>/<file> -> ../../blobs/<hash>. Those links leave the
    snapshot folder on purpose and are followed; a link elsewhere still is not."""
    model = make_llama_files(tmp_path / "plain")
    (model / "tokenizer.json").write_text('{"from": "the cache"}')
    snap = cache_snapshot(model, tmp_path / "hub", "ab" * 20)
    (snap / "special_tokens_map.json").symlink_to(secret)
    s, log = quantize(snap, tmp_path / "out")
    out = tmp_path / "out"
    assert s["copied_files"] == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == '{"from": "the cache"}'
    assert s["quantized"] == 7 and SECRET not in all_bytes(out)
    assert "warning: special_tokens_map.json not copied: it is a link to a file outside the model folder" in log


def test_source_that_is_not_a_file_or_folder_is_refused(tmp_path):
    """A FIFO as SOURCE used to fall through to its parent folder's checkpoint."""
    folder = make_llama_files(tmp_path / "src")
    os.mkfifo(folder / "pipe")
    with pytest.raises(SourceError, match="not a regular file or folder"):
        Checkpoint(folder / "pipe")


def test_source_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"notes.txt: not a \.safetensors"):
        quantize(tmp_path / "notes.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _sharded(tmp_path) -> Path:
    src = make_llama_files(tmp_path / "src")
    ck = Checkpoint(src)
    wm = {k: "model.safetensors" for k in ck.keys()}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return src


def test_index_naming_a_tensor_twice_is_refused(tmp_path):
    src = _sharded(tmp_path)
    idx = src / "model.safetensors.index.json"
    text = idx.read_text()
    idx.write_text(text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "other.safetensors", ', 1))
    with pytest.raises(FormatError, match="names 'lm_head.weight' twice"):
        Checkpoint(src)


@pytest.mark.parametrize("name", ["/etc/passwd", "../src2/model.safetensors", "sub/model.safetensors"])
def test_index_paths_outside_the_folder_are_refused(tmp_path, name):
    src = _sharded(tmp_path)
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["lm_head.weight"] = name
    idx.write_text(json.dumps(d))
    with pytest.raises(FormatError, match="outside the checkpoint folder"):
        Checkpoint(src)


def test_index_shard_that_is_a_folder_or_fifo_is_refused(tmp_path):
    src = _sharded(tmp_path)
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["lm_head.weight"] = "dir.safetensors"
    d["weight_map"]["model.norm.weight"] = "pipe.safetensors"
    idx.write_text(json.dumps(d))
    (src / "dir.safetensors").mkdir()
    os.mkfifo(src / "pipe.safetensors")
    with pytest.raises(SourceError, match="dir.safetensors: shard named in the index is not a regular file"):
        Checkpoint(src)
    d["weight_map"]["lm_head.weight"] = "model.safetensors"
    idx.write_text(json.dumps(d))
    with pytest.raises(SourceError, match="pipe.safetensors: shard named in the index is not a regular file"):
        Checkpoint(src)


def test_huge_index_is_not_read(tmp_path):
    src = _sharded(tmp_path)
    with open(src / "model.safetensors.index.json", "r+b") as f:
        f.truncate(200 * 10**6)
    with pytest.raises(FormatError, match=r"the index is 200 MB, over the 64 MiB that qconvert reads"):
        Checkpoint(src)


def test_huge_config_is_not_read(tmp_path):
    """A 1 GB config.json (sparse here) is refused from its size, before anything reads it."""
    src = make_llama_files(tmp_path / "src")
    with open(src / "config.json", "r+b") as f:
        f.truncate(10**9)
    with pytest.raises(FormatError, match=r"config.json: config.json is 1000 MB, over the 64 MiB"):
        quantize(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, what", [("[1, 2]", "must hold a JSON object, not list"), ('"llama"', "must hold a JSON object, not str"),
                                        ("\xff\xfe{}", "config.json: not valid JSON"), ("[" * 100000, "config.json: not valid JSON")])
def test_config_that_is_not_an_object_is_refused(tmp_path, text, what):
    src = make_llama_files(tmp_path / "src")
    (src / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(FormatError, match=what):
        quantize(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_tensor_across_shards_is_read_from_the_indexed_shard(tmp_path):
    """Two shards holding one name: the index decides, and only the indexed copy is read."""
    import torch

    src = _sharded(tmp_path)
    write_safetensors(src / "decoy.safetensors", {"model.norm.weight": ("BF16", [16], torch.full((16,), 7.0, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())})
    ck = Checkpoint(src)
    assert ck.file_of("model.norm.weight") == "model.safetensors" and float(ck.get("model.norm.weight")[0]) == 1.0


def test_a_listing_with_dotdot_names_writes_nothing_outside(tmp_path):
    """A Hub server's file list is not trusted either: a companion listed as ``../../.bashrc`` (or
    any name off the allow-list) is never joined onto the output folder."""
    from qconvert.io.staging import copy_companions as _copy_extra_files

    real = tmp_path / "snap"
    real.mkdir()
    (real / "tokenizer.json").write_text("{}")

    class Listing:
        def extra_files(self):
            for rel in ("../../.bashrc", "../tokenizer.json", "1_Pooling/../../x/config.json", "tokenizer.json"):
                yield rel, real / "tokenizer.json"

    stage = tmp_path / "a" / "b" / "stage"
    stage.mkdir(parents=True)
    log: list[str] = []
    assert _copy_extra_files(Listing(), stage, log.append) == ["tokenizer.json"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/b/stage/tokenizer.json", "snap/tokenizer.json"]
    assert "../../.bashrc" in log[-1]
