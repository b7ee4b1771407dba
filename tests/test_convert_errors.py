"""Bad input to `qconvert quantize`: one clear line naming the file or tensor, a non-zero exit, and no
output that looks complete."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli_here


def fails(*args) -> str:
    r = run_cli_here(*args, ok=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    first, *rest = r.stderr.splitlines()  # one error: its first line, then only detail and hint lines
    assert first.startswith("qconvert: error: ") and len(first) <= 200, r.stderr
    assert all(ln.startswith(("  ", "hint: ")) for ln in rest), r.stderr
    return r.stderr


def no_output(tmp_path: Path, name: str = "out") -> None:
    out = tmp_path / name
    assert not out.exists() or not any(out.iterdir())
    assert not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()


@pytest.fixture
def src(tmp_path, tiny_models) -> Path:
    """A sharded tiny Llama of this test's own, to damage."""
    return tiny_models.copy(tiny_models.llama(max_shard_size="40KB"), tmp_path / "src")


def test_missing_source(tmp_path):
    assert "no such folder, and not a Hub repo id" in fails("quantize", tmp_path / "nope" / "x", tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    err = fails("quantize", src, out)
    assert "already exists and is not empty" in err and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "precious"
    err = fails("quantize", src, out, "--overwrite")  # --overwrite replaces only what qconvert wrote
    assert "holds what qconvert does not write (mine.txt)" in err and (out / "mine.txt").read_text() == "precious"
    (out / "mine.txt").unlink()
    assert run_cli_here("quantize", src, out).returncode == 0
    r = run_cli_here("quantize", src, out, "--overwrite")
    assert r.returncode == 0 and (out / "config.json").exists()


def test_truncated_shard(tmp_path, src):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    err = fails("quantize", src, tmp_path / "out")
    assert shard.name in err and ("corrupt" in err or "truncated" in err)
    no_output(tmp_path)


def test_index_names_file_outside_folder(tmp_path, src):
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    k = next(iter(d["weight_map"]))
    d["weight_map"][k] = "../../etc/passwd"
    idx.write_text(json.dumps(d))
    err = fails("quantize", src, tmp_path / "out")
    assert "outside the checkpoint folder" in err and "../../etc/passwd" in err
    no_output(tmp_path)


def test_tensor_in_index_missing_from_shard(tmp_path, src):
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    victim, shard = next((k, f) for k, f in d["weight_map"].items() if "mlp.up_proj" in k)
    tensors = load_file(str(src / shard))
    del tensors[victim]
    save_file(tensors, str(src / shard), metadata={"format": "pt"})
    err = fails("quantize", src, tmp_path / "out")
    assert victim in err and shard in err and "missing from this shard" in err
    no_output(tmp_path)


def tiny_llama_with(tmp_path: Path, tiny_models, name: str, change) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny one-file Llama whose tensor ``name`` is replaced by ``change(tensor)``."""
    src = tiny_models.copy(tiny_models.llama(), tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src, tensors


def test_nan_weight_named(tmp_path, tiny_models):
    def nan_at_5_7(t):
        t[5, 7] = float("nan")
        return t

    src, _ = tiny_llama_with(tmp_path, tiny_models, "model.layers.1.self_attn.o_proj.weight", nan_at_5_7)
    err = fails("quantize", src, tmp_path / "out")
    assert "model.layers.1.self_attn.o_proj.weight: holds NaN or Inf (first at index [5, 7])" in err
    no_output(tmp_path)


def test_unsupported_dtype(tmp_path, tiny_models):
    src, _ = tiny_llama_with(tmp_path, tiny_models, "model.layers.0.mlp.gate_proj.weight", lambda t: t.to(torch.int8))
    err = fails("quantize", src, tmp_path / "out")
    assert "model.layers.0.mlp.gate_proj.weight" in err and "torch.int8" in err and "cannot be quantized" in err


def test_dtype_torch_cannot_hold(tmp_path, tiny_models):
    """A dtype safetensors knows but torch does not (here F8_E8M0, set in the header by hand)."""
    src = tiny_models.copy(tiny_models.llama(), tmp_path / "src")
    p = src / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E8M0"
    start, stop = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["shape"] = [stop - start]  # one byte per element: same data area
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    err = fails("quantize", src, tmp_path / "out")
    assert "model.norm.weight" in err and "F8_E8M0" in err and "cannot read or copy" in err
    no_output(tmp_path)


def test_float8_tensor_written_as_transformers_writes_it_and_reported(tmp_path, tiny_models):
    """transformers loads every tensor in the checkpoint's dtype (config.json): a float8 norm in a bf16
    model comes out bf16 from the anchor. qconvert writes the same (float8 -> bf16 is exact) and says
    so in the summary and in --json; it never changes a dtype silently."""
    src, tensors = tiny_llama_with(tmp_path, tiny_models, "model.norm.weight", lambda t: t.to(torch.float8_e4m3fn))
    r = run_cli_here("quantize", src, tmp_path / "out")
    assert "written in another dtype: model.norm.weight (config.json dtype: float8_e4m3fn -> bfloat16)" in r.stdout
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, tensors["model.norm.weight"].to(torch.bfloat16))
    summary = json.loads(run_cli_here("quantize", src, tmp_path / "out2", "--json").stdout)
    assert summary["cast"] == [{"tensor": "model.norm.weight", "reason": "config.json dtype: float8_e4m3fn -> bfloat16"}]
    assert summary["dropped"] == []


def test_bad_options(tmp_path, src):
    assert "block size 100" in fails("quantize", src, tmp_path / "out", "--blocksize", "100")
    assert "cannot read size" in fails("quantize", src, tmp_path / "out", "--max-shard-size", "lots")


def test_too_little_disk_checked_before_work(tmp_path, src, monkeypatch):
    from qconvert.convert import quantize as Q
    from qconvert.errors import DiskSpaceError

    monkeypatch.setattr(Q, "free_bytes", lambda p: 1000)
    with pytest.raises(DiskSpaceError, match=r"GB free, the output needs about"):
        Q.quantize_checkpoint(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconvert-partial").exists()


def test_pytorch_bin_source_weights_only(tmp_path, tiny_models):
    """pytorch_model.bin sources load with weights_only=True and give the same bytes as safetensors."""
    st = tiny_models.llama()
    binsrc = tmp_path / "bin"
    binsrc.mkdir()
    (binsrc / "config.json").write_bytes((st / "config.json").read_bytes())
    torch.save(load_file(str(st / "model.safetensors")), binsrc / "pytorch_model.bin")
    for s, o in ((st, "a"), (binsrc, "b")):
        run_cli_here("quantize", s, tmp_path / o)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((st / "config.json").read_bytes())

    class Boom:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Boom()}, evil / "pytorch_model.bin")
    err = fails("quantize", evil, tmp_path / "c")
    assert "weights-only" in err
