"""A safetensors shard written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a streaming converter must not.
Tensor bytes go to a spill file as they are produced; closing the shard writes the standard header
(8-byte little-endian length, JSON with dtype/shape/data_offsets and ``__metadata__``, space-padded
to a multiple of 8) and then the data, into ``<name>.tmp``, which is renamed into place only when
complete. The result is an ordinary safetensors file (tests read it back with the safetensors library).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from ..format.checkpoint import DTYPE_NAMES


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class ShardWriter:
    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path = Path(path)
        self.metadata = dict(metadata)
        self.spill_path = self.path.with_name(self.path.name + ".data")
        self.spill = open(self.spill_path, "wb")
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> int:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice to {self.path.name}")
        data = tensor_bytes(t)
        self.spill.write(data)
        self.entries[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + len(data)],
        }
        self.offset += len(data)
        return len(data)

    def close(self) -> tuple[int, str]:
        """Finish the file; returns (data bytes, sha256 of the whole file)."""
        self.spill.close()
        header = {"__metadata__": self.metadata, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        tmp = self.path.with_name(self.path.name + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as out, open(self.spill_path, "rb") as src:
            head = struct.pack("<Q", len(raw)) + raw
            out.write(head)
            h.update(head)
            while chunk := src.read(1 << 22):
                out.write(chunk)
                h.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        os.unlink(self.spill_path)
        return self.offset, h.hexdigest()

    def abort(self) -> None:
        self.spill.close()
        for p in (self.spill_path, self.path.with_name(self.path.name + ".tmp")):
            p.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
