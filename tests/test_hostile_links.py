"""A model folder whose weights, index or config.json are links to files outside it (spec/robustness.md
section 2: nothing outside the input is read). The old code read them: `quantize` of a folder whose
model.safetensors linked to another model's weights (a private one, say) converted that model under
the folder's config, ready to push. Companion files and an adapter's files already had the rule;
weights and the JSON files read beside them now have it too. Links that stay inside the folder, and
the Hugging Face cache's links into its blobs/, still work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hostile_util import cache_snapshot, make_llama_files, make_lora
from runtime_helpers import make_word_tokenizer
from test_hostile_runtime import refused

OUTSIDE = "outside the model folder"


@pytest.fixture
def dirs(tmp_path):
    """``src``: a tiny Llama; ``elsewhere/``: files outside any folder qconvert is given."""
    src = make_llama_files(tmp_path / "src")
    (tmp_path / "elsewhere").mkdir()
    return tmp_path, src, tmp_path / "elsewhere"


def move_out(folder: Path, name: str, elsewhere: Path) -> Path:
    """Move ``folder/name`` to ``elsewhere`` and leave a link to it in its place."""
    target = elsewhere / name
    shutil.move(folder / name, target)
    (folder / name).symlink_to(target)
    return target


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_a_weights_or_config_link_out_of_the_folder_is_refused(dirs, capsys, name, command):
    tmp, src, elsewhere = dirs
    target = move_out(src, name, elsewhere)
    args = [command, src] + ([tmp / "out"] if command == "quantize" else [])
    err = refused(capsys, *args, match=OUTSIDE)
    assert str(target) in err.replace("\n  ", " ") or name in err
    assert not (tmp / "out").exists()


def sharded(src: Path) -> Path:
    """``src`` as two shards and an index."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(sd)
    half = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for f, ks in half.items():
        save_file({k: sd[k] for k in ks}, str(src / f), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in half.items() for k in ks}}))
    return src


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "model.safetensors.index.json"])
def test_a_shard_or_index_link_out_of_the_folder_is_refused(dirs, capsys, name):
    tmp, src, elsewhere = dirs
    move_out(sharded(src), name, elsewhere)
    refused(capsys, "quantize", src, tmp / "out", match=OUTSIDE)
    refused(capsys, "verify", src, match=OUTSIDE)
    assert not (tmp / "out").exists()


def test_a_4bit_shard_link_out_of_the_folder_is_refused_by_load_model_merge_and_generate(dirs, capsys):
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import SourceError

    import qconvert

    tmp, src, elsewhere = dirs
    make_word_tokenizer(src)
    q = quantize_checkpoint(str(src), tmp / "q") and tmp / "q"
    adapter = make_lora(tmp / "adapter", q)
    move_out(q, "model.safetensors", elsewhere)
    with pytest.raises(SourceError, match=OUTSIDE):
        qconvert.load_model(q)
    refused(capsys, "generate", q, "--prompt", "a", match=OUTSIDE)
    refused(capsys, "merge", q, adapter, tmp / "merged", match=OUTSIDE)
    assert not (tmp / "merged").exists()


def test_generate_on_a_plain_model_whose_weights_link_out_is_refused(dirs, capsys):
    tmp, src, elsewhere = dirs
    make_word_tokenizer(src)
    move_out(src, "model.safetensors", elsewhere)
    refused(capsys, "generate", src, "--prompt", "a", match=OUTSIDE)


def test_links_that_stay_inside_the_folder_still_work(dirs, capsys):
    from runtime_helpers import cli

    tmp, src, _ = dirs
    (src / "weights").mkdir()
    shutil.move(src / "model.safetensors", src / "weights" / "real.safetensors")
    (src / "model.safetensors").symlink_to(Path("weights", "real.safetensors"))
    rc, out, err = cli(capsys, "quantize", src, tmp / "out")
    assert rc == 0, err


def test_a_hugging_face_cache_snapshot_still_works(dirs, capsys):
    """snapshots/SHA/NAME are links into the repository's blobs/: inside the input, as for companions."""
    from runtime_helpers import cli

    tmp, src, _ = dirs
    snap = cache_snapshot(src, tmp / "hub", "a" * 40)
    rc, out, err = cli(capsys, "quantize", snap, tmp / "out")
    assert rc == 0, err
    rc, out, err = cli(capsys, "inspect", snap)
    assert rc == 0, err
