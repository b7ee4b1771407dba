"""ShardWriter: the file it writes is an ordinary safetensors file, whichever way the header is placed."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open

from qconvert.io.shards import ShardWriter, header_bound, shard_digest


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "a.weight.absmax": torch.rand(5, generator=g),
        "b": torch.randint(0, 255, (13,), dtype=torch.uint8),
        "c.half": torch.randn(2, 3, 4, generator=g).half(),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }


@pytest.mark.parametrize("how", ["reserved", "slot too small", "spill"])
def test_written_file_reads_back(tmp_path, how):
    ts = tensors()
    meta = {"format": "pt", "k": "v"}
    reserve = {"reserved": header_bound([(k, t.dim()) for k, t in ts.items()], meta), "slot too small": 16, "spill": None}[how]
    w = ShardWriter(tmp_path / "s.safetensors", meta, reserve=reserve)
    for k, t in ts.items():
        w.add(k, t)
    nbytes, digest = w.close()
    p = tmp_path / "s.safetensors"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.safetensors"]  # no .tmp or spill left
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == meta
        for k, t in ts.items():
            assert torch.equal(f.get_tensor(k), t) and f.get_tensor(k).dtype == t.dtype, k
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert p.stat().st_size == 8 + n + nbytes and n % 8 == 0
    assert digest == shard_digest(p)
    if how == "reserved":
        assert n == reserve + (-reserve % 8)  # the header filled the slot; the data was not moved
    # a changed data byte changes the digest
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    assert shard_digest(p) != digest


def test_abort_removes_everything(tmp_path):
    for reserve in (None, 1024):
        w = ShardWriter(tmp_path / "s.safetensors", {"format": "pt"}, reserve=reserve)
        w.add("x", torch.ones(10))
        w.abort()
        assert list(tmp_path.iterdir()) == []


def test_same_name_twice_refused(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", {"format": "pt"}, reserve=512)
    w.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        w.add("x", torch.ones(2))
    w.abort()
