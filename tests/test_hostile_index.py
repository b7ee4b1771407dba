"""An index whose ``metadata`` is not a JSON object (null, a list, a string): `verify` ended in an
unexpected AttributeError reported as a bug; transformers cannot load such a folder either. Every
reader of an index (io.checkpoint.read_index) now refuses it in one line."""

from __future__ import annotations

import json

import pytest

from hostile_util import make_llama_files
from test_hostile_runtime import refused


@pytest.fixture(scope="module")
def sharded_4bit(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-index")
    quantize_checkpoint(str(make_llama_files(d / "src", layers=2)), d / "q", max_shard_size="4KB")
    assert (d / "q" / "model.safetensors.index.json").is_file()
    return d / "q"


def with_metadata(folder, tmp_path, metadata):
    import shutil

    q = shutil.copytree(folder, tmp_path / "q")
    p = q / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["metadata"] = metadata
    p.write_text(json.dumps(index))
    return q


@pytest.mark.parametrize("metadata", [None, [], "x", 3])
@pytest.mark.parametrize("command", ["verify", "inspect", "quantize"])
def test_index_metadata_that_is_not_an_object_is_one_line(sharded_4bit, tmp_path, capsys, metadata, command):
    q = with_metadata(sharded_4bit, tmp_path, metadata)
    if metadata is None:  # "metadata": null is taken as absent
        from runtime_helpers import cli

        rc, out, err = cli(capsys, command, q, *([tmp_path / "out"] if command == "quantize" else []))
        assert rc in (0, 1) and "unexpected" not in err, err
        return
    refused(capsys, command, q, *([tmp_path / "out"] if command == "quantize" else []),
            match=f"'metadata' must be a JSON object, not {type(metadata).__name__}")


def test_a_wrong_total_size_is_still_named(sharded_4bit, tmp_path, capsys):
    q = with_metadata(sharded_4bit, tmp_path, {"total_size": 12})
    refused(capsys, "verify", q, match="metadata.total_size is 12, the tensors hold")
