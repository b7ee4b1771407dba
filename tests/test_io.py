"""The I/O layer's own contracts (qconvert/io/): an output appears whole or not at all, an existing
one is refused unless --overwrite, a sharded output's index names the file each tensor is in, and a
model card reads back as the Hub reads it (quoted values, lists and comments included) all the way
through push's validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import make_tiny_llama
from qconvert.errors import FormatError, OptionError, OutputExistsError, cli_lines
from qconvert.io.cards import adapter_card, merged_card, quantized_card, read_card, read_card_meta, render_card
from qconvert.io.checkpoint import SAFE_INDEX
from qconvert.io.shards import SizeShards, shard_names, write_index
from qconvert.io.staging import check_output, copy_companions, publish, staged, staging_dir, trash_dir


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ staging
def test_staged_block_that_fails_leaves_neither_output_nor_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged(out) as stage:
        (stage / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not out.exists() and not staging_dir(out).exists()


def test_publish_replaces_an_old_output_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged(out) as stage:
        (stage / "new.txt").write_text("new")
        publish(stage, out)
    assert files_under(out) == {"new.txt": b"new"}
    assert not staging_dir(out).exists() and not trash_dir(out).exists()


def test_a_failed_quantize_leaves_the_previous_output_untouched(tmp_path, monkeypatch):
    """A conversion that fails after writing its first shard (sharded output) publishes nothing: the
    old OUT is still there byte for byte, and nothing complete-looking is in the staging folder."""
    from qconvert.convert import quantize as Q

    src = make_tiny_llama(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("previous run")  # (a name qconvert writes: --overwrite replaces only its own outputs)
    calls = []
    real = Q._quantize

    def fail_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(Q, "_quantize", fail_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        Q.quantize_checkpoint(str(src), out, overwrite=True, max_shard_size="40KB", log=lambda m: None)
    assert files_under(out) == {"config.json": b"previous run"}
    left = {p.name for p in staging_dir(out).iterdir()} if staging_dir(out).exists() else set()
    assert not left & {"config.json", "README.md", SAFE_INDEX}


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output(out, overwrite=False)  # empty: fine
    (out / "x").write_text("x")
    with pytest.raises(OutputExistsError, match=r"already exists and is not empty") as e:
        check_output(out, overwrite=False)
    lines = cli_lines(str(e.value), e.value.hint)
    assert lines[0].startswith("qconvert: error: ") and lines[-1].startswith("hint: ")
    with pytest.raises(OutputExistsError, match=r"holds what qconvert does not write \(x\)"):
        check_output(out, overwrite=True)  # a user's file: --overwrite replaces only qconvert's outputs
    (out / "x").rename(out / "config.json")
    check_output(out, overwrite=True)
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "CHECK_FAILED.json", "tokenizer.json",
                 "generation_config.json", ".model.safetensors.qconvert-tmp", "adapter_model.safetensors"):
        (out / name).write_text("{}")  # what quantize, merge (and a failed merge check) and export-adapter write
    check_output(out, overwrite=True)
    (tmp_path / "file").write_text("f")
    with pytest.raises(OutputExistsError):
        check_output(tmp_path / "file", overwrite=False)


@pytest.mark.parametrize("where,message", [
    ("in", "is inside the input"), ("same", "is the input"), ("holds", "holds the input"), ("link", "is a symbolic link"),
])
def test_output_overlapping_an_input_or_a_link_is_refused_even_with_overwrite(tmp_path, where, message):
    src = tmp_path / "src"
    src.mkdir()
    out = {"in": src / "out", "same": src, "holds": tmp_path, "link": tmp_path / "ln"}[where]
    if where == "link":
        out.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OptionError, match=message):
        check_output(out, overwrite=True, inputs=[src])


def test_companions_are_copied_from_inside_the_folder_only(tmp_path):
    from qconvert.io.checkpoint import Checkpoint

    src = make_tiny_llama(tmp_path / "src")
    (src / "tokenizer_config.json").write_text("{}")
    (tmp_path / "secret").write_text("key")
    os.symlink(tmp_path / "secret", src / "tokenizer.json")
    (src / "notes.txt").write_text("n")
    stage = tmp_path / "stage"
    stage.mkdir()
    log: list[str] = []
    copied = copy_companions(Checkpoint(src), stage, log.append)
    assert "tokenizer_config.json" in copied and "tokenizer.json" not in copied and "notes.txt" not in copied
    assert sorted(files_under(stage)) == sorted(copied)
    assert any("tokenizer.json not copied" in m and "outside the model folder" in m for m in log)
    assert any("notes.txt" in m for m in log)


# ------------------------------------------------------------------------------------------- shards
def test_shard_names():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_size_limited_shards_and_their_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(8, 16 + i, generator=g) for i in range(7)}
    tensors["big"] = torch.randn(64, 64, generator=g)  # larger than the limit: a shard of its own
    limit = 3 * 8 * 20 * 4
    shards = SizeShards(tmp_path, limit)
    for k, t in tensors.items():
        shards.add(k, t)
    names = shards.finish()
    shards.write_index()
    assert names == shard_names(len(names)) and len(names) > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, SAFE_INDEX])
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    assert list(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    for name in names:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            held = list(f.keys())
            data = sum(f.get_tensor(k).numel() * 4 for k in held)
            assert len(held) == 1 or data <= limit
            for k in held:
                assert index["weight_map"][k] == name and torch.equal(f.get_tensor(k), tensors[k])
    assert sorted(k for n in names for k in safe_open(str(tmp_path / n), framework="pt").keys()) == sorted(tensors)


def test_one_shard_has_no_index_and_a_refused_tensor_leaves_no_partial_file(tmp_path):
    shards = SizeShards(tmp_path, 1 << 20)
    shards.add("a", torch.ones(4))
    assert shards.finish() == ["model.safetensors"]
    shards.write_index()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    def finite(name, t):
        if not torch.isfinite(t).all():
            raise FormatError(f"{name}: NaN")

    d = tmp_path / "bad"
    d.mkdir()
    shards = SizeShards(d, 1 << 20, check=finite)
    shards.add("a", torch.ones(4))
    with pytest.raises(FormatError):
        shards.add("b", torch.tensor([float("nan")]))
    shards.abort()
    assert list(d.iterdir()) == []


def test_write_index_is_sorted_and_complete(tmp_path):
    write_index(tmp_path, {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}, 12)
    assert json.loads((tmp_path / SAFE_INDEX).read_text()) == {
        "metadata": {"total_size": 12},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }


# -------------------------------------------------------------------------------------------- cards
HAND_EDITED = """---
# edited by hand after qconvert wrote it
base_model: 'acme/tiny-llama'  # a quoted value
base_model_relation: "quantized"
tags:
  - qconvert
  - 'nf4'
license: apache-2.0
---

# My model
"""


def test_a_hand_edited_card_round_trips_through_read_and_push_validation(tmp_path):
    """Quoted values, a list and comments: read as the Hub reads them, accepted by push, and written
    back by render_card to the same metadata."""
    from huggingface_hub import ModelCard

    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.hub.push import validate_folder

    meta = read_card_meta(HAND_EDITED)
    assert meta == {"base_model": "acme/tiny-llama", "base_model_relation": "quantized", "tags": ["qconvert", "nf4"],
                    "license": "apache-2.0"}
    assert meta == ModelCard(HAND_EDITED).data.to_dict()
    q = tmp_path / "q"
    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src")), q)
    (q / "README.md").write_text(HAND_EDITED)
    assert read_card(q) == meta
    info = validate_folder(q)
    assert info["kind"] == "quantized" and info["card"] == meta
    again = render_card(info["card"], "# My model")
    assert read_card_meta(again) == meta
    (q / "README.md").write_text(again)
    assert validate_folder(q)["card"] == meta


def test_one_template_per_relation():
    summary = {
        "output": "/x/tiny-nf4", "quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16",
        "quantized": 14, "tensors": 23, "bits_per_param": 4.127, "bits_per_param_model": 5.2, "source_bytes": 2_000_000,
        "output_bytes": 600_000, "size_ratio": 0.3,
        "provenance": {"source": "acme/tiny", "source_revision": "abc", "version": "0.1.0"},
    }
    q = read_card_meta(quantized_card(summary, ["lm_head"]))
    assert q["base_model_relation"] == "quantized" and q["base_model"] == "acme/tiny" and q["library_name"] == "transformers"
    a = read_card_meta(adapter_card("acme/tiny", "# LoRA adapter"))
    assert a["base_model_relation"] == "adapter" and a["library_name"] == "peft"
    merge = {"output": "/x/m", "adapter": "ad", "base": "b", "dtype": "bfloat16", "quantized": False}
    assert read_card_meta(merged_card(merge, "acme/tiny", "0.1.0"))["base_model_relation"] == "merge"
    requant = dict(merge, quantized=True, requantization_cost={"layers": 2, "output_error_mean": 0.01, "adapter_change_lost_mean": 0.5})
    text = merged_card(requant, None, "0.1.0")
    assert read_card_meta(text)["base_model_relation"] == "quantized" and "base_model" not in read_card_meta(text)
    assert "50% of the adapter's change lost" in text


def test_reader_protocol_is_met_by_local_and_hub_checkpoints(tmp_path):
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.io.hub import HubCheckpoint
    from qconvert.io.reader import CheckpointReader

    assert isinstance(Checkpoint(make_tiny_llama(tmp_path / "src")), CheckpointReader)
    assert issubclass(HubCheckpoint, Checkpoint)
