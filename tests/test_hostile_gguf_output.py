"""export-gguf's OUTPUT under folders that do not exist yet: quantize, merge and export-adapter make
them; export-gguf failed with "No such file or directory" naming its hidden temporary file
(.x.gguf.<random>.qconvert-tmp), a name the user never gave."""

from __future__ import annotations

import pytest
import torch

from helpers import make_bpe_tokenizer, make_tiny_llama
from runtime_helpers import cli

pytest.importorskip("gguf")


def test_export_gguf_makes_the_output_folders(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src", dtype=torch.float32, hidden=64, intermediate=128, vocab=300, layers=1)
    make_bpe_tokenizer(src)
    out = tmp_path / "new" / "deeper" / "m.gguf"
    rc, _, err = cli(capsys, "export-gguf", src, out)
    assert rc == 0, err
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    from safetensors.torch import load_file

    want = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].to(torch.float16)
    assert torch.equal(torch.from_numpy(emb.data.copy()).view(torch.float16).reshape(want.shape), want)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # no temporary left


def test_export_gguf_under_a_file_is_refused(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src", dtype=torch.float32, hidden=64, intermediate=128, vocab=300, layers=1)
    make_bpe_tokenizer(src)
    (tmp_path / "file").write_text("mine")
    rc, _, err = cli(capsys, "export-gguf", src, tmp_path / "file" / "m.gguf")
    assert rc == 1 and "which is a file" in err, err
    assert (tmp_path / "file").read_text() == "mine"
