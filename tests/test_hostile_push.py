"""`push` of a folder holding a FIFO (or a socket, or a device) under a name it publishes
(tokenizer.model, a shard): the old validation let it through, and the upload then read it to hash
it, blocking forever (a FIFO) or without end (/dev/zero linked in). Refused before anything is sent."""

from __future__ import annotations

import os
import shutil

import pytest

from hostile_util import make_llama_files

from qconvert.errors import FormatError


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-push")
    quantize_checkpoint(str(make_llama_files(d / "src")), d / "q")
    return d / "q"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["tokenizer.model", "sub/notes.txt"])
def test_a_fifo_in_the_folder_is_refused_before_any_upload(quantized, tmp_path, monkeypatch, name):
    from qconvert.hub.push import push_folder

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = shutil.copytree(quantized, tmp_path / "q")
    (folder / name).parent.mkdir(exist_ok=True)
    os.mkfifo(folder / name)
    with pytest.raises(FormatError, match=f"{name}: not a regular file"):
        push_folder(folder, "org/model", token="hf_dummy")


def test_a_link_inside_the_folder_to_a_device_is_refused(quantized, tmp_path):
    from qconvert.hub.push import push_folder

    folder = shutil.copytree(quantized, tmp_path / "q")
    os.symlink("/dev/zero", folder / "tokenizer.model")  # a link out of the folder: refused as such
    with pytest.raises(FormatError, match="tokenizer.model: a symbolic link out of the folder"):
        push_folder(folder, "org/model", token="hf_dummy")
