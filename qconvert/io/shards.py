"""Safetensors shards: written one tensor at a time, named, cut at a size limit, and indexed.

A shard written one tensor at a time (:class:`ShardWriter`):

``safetensors.torch.save_file`` needs every tensor in memory at once; a streaming converter must not.
A safetensors file starts with its header (8-byte little-endian length, then JSON with
dtype/shape/data_offsets and ``__metadata__``, space-padded to a multiple of 8), and the header is only
known once every tensor has been written. Two ways around that:

- ``reserve`` given (the converter knows every tensor name of a shard in advance and passes an
  upper bound from :func:`header_bound`): tensor bytes go straight to their final place after a
  reserved header slot, and closing the shard writes the header into the slot, padded with spaces
  (which safetensors readers skip). Each byte is written once.
- no ``reserve`` (merge, which finds its names as it goes), or a header that outgrew the slot: tensor
  bytes go to a spill file first and are copied behind the header on close.

Either way the file is built as ``<name>.tmp`` and renamed into place only when complete, and the
result is an ordinary safetensors file (tests read it back with the safetensors library).

Shard names are transformers' (:func:`shard_names`): ``model.safetensors`` alone, else
``model-00001-of-0000N.safetensors``. :class:`SizeShards` cuts a stream of tensors into shards of at
most a given size when the names come one at a time (merge); :func:`write_index` writes
``model.safetensors.index.json``, the last file of a sharded output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, SAFE_INDEX
from .writes import named_write_errors as _named
from .writes import create_new


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach().cpu().reshape(-1).contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())  # any dtype, numpy's or not (bfloat16, float8)


def header_bound(entries: list[tuple[str, int]], metadata: dict[str, str]) -> int:
    """An upper bound on the JSON header size for tensors with these (name, ndim): every number
    (shape entries, offsets) counted at 20 digits."""
    size = len(json.dumps({"__metadata__": metadata}, separators=(",", ":")))
    for name, ndim in entries:
        size += len(json.dumps(name)) + len(':{"dtype":"","shape":[],"data_offsets":[,]},') + 8 + 21 * (ndim + 2)
    return size + 8


def _digest(head: bytes, data_sha256: bytes) -> str:
    return hashlib.sha256(head + data_sha256).hexdigest()


def shard_digest(path: Path) -> str:
    """What :meth:`ShardWriter.close` returns for the file at ``path``: sha256 over the header block
    and the sha256 of the data area (so a resumed run can check a finished shard)."""
    with open(path, "rb") as f:
        first = f.read(8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 else -1
        if not 0 <= n <= os.fstat(f.fileno()).st_size - 8:
            return "not a shard: its header length is out of bounds"  # matches no sha256
        head = struct.pack("<Q", n) + f.read(n)
        h = hashlib.sha256()
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return _digest(head, h.digest())


def header_bytes(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    """A shard's JSON header as :class:`ShardWriter` writes it: compact, space-padded to a multiple of 8."""
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def entry(dtype: torch.dtype, shape, start: int, nbytes: int) -> dict:
    return {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, start + nbytes]}


class ShardWriter:
    """One safetensors file written a tensor at a time (module docstring). ``exact``: ``reserve`` is
    the header's predicted exact size; a header of any other size is moved, not padded, so the file's
    bytes are the no-``reserve`` file's whether or not the prediction held."""

    def __init__(self, path: Path, metadata: dict[str, str], reserve: int | None = None, exact: bool = False):
        self.exact = exact
        self.path = Path(path)
        self.metadata = dict(metadata)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.spill_path = self.path.with_name(self.path.name + ".data")
        self.reserve = None if reserve is None else reserve + (-reserve % 8)
        self.out_path = self.spill_path if self.reserve is None else self.tmp
        self.out = create_new(self.out_path)  # never through a link left at that name
        if self.reserve is not None:
            self.out.seek(8 + self.reserve)
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.data_hash = hashlib.sha256()

    def add(self, name: str, t: torch.Tensor) -> int:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice to {self.path.name}")
        data = tensor_view(t)
        with _named(self.out_path):
            self.out.write(data)
        self.data_hash.update(data)
        self.entries[name] = entry(t.dtype, t.shape, self.offset, len(data))
        self.offset += len(data)
        return len(data)

    def close(self) -> tuple[int, str]:
        """Finish the file; returns (data bytes, :func:`shard_digest` of it)."""
        with _named(self.tmp):
            return self._close()

    def _close(self) -> tuple[int, str]:
        raw = header_bytes(self.metadata, self.entries)
        if self.reserve is not None and (len(raw) == self.reserve if self.exact else len(raw) <= self.reserve):
            raw += b" " * (self.reserve - len(raw))
            head = struct.pack("<Q", len(raw)) + raw
            self.out.seek(0)
            self.out.write(head)
            self.out.flush()
            os.fsync(self.out.fileno())
            self.out.close()
        else:
            self.out.close()
            if self.reserve is not None:  # the slot was too small: move the data behind a new header
                os.replace(self.tmp, self.spill_path)
            head = struct.pack("<Q", len(raw)) + raw
            with create_new(self.tmp) as out, open(self.spill_path, "rb") as src:
                if self.reserve is not None:
                    src.seek(8 + self.reserve)
                out.write(head)
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.unlink(self.spill_path)
        os.replace(self.tmp, self.path)
        return self.offset, _digest(head, self.data_hash.digest())

    def abort(self) -> None:
        try:
            self.out.close()  # flushes what is buffered: fails again when the disk is full
        except OSError:
            pass  # the error being handled is the one to report; the file goes anyway
        for p in (self.spill_path, self.tmp):
            p.unlink(missing_ok=True)



def shard_names(n: int) -> list[str]:
    """The file names of an output of ``n`` shards, as transformers names them."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` for a sharded output: the tensors' byte total and each
    tensor's file, sorted by name; written beside and renamed into place."""
    from .staging import write_json

    write_json(Path(folder) / SAFE_INDEX, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def planned_headers(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], limit: int, metadata: dict[str, str]) -> list[int]:
    """The exact header size of each shard :class:`SizeShards` will write for tensors (name, dtype,
    shape) coming in this order, cut by its rule."""
    shards: list[dict[str, dict]] = []
    size = 0
    for name, dtype, shape in plan:
        nb = math.prod(shape) * dtype.itemsize
        if not shards or (size and size + nb > limit):
            shards.append({})
            size = 0
        shards[-1][name] = entry(dtype, shape, size, nb)
        size += nb
    return [len(header_bytes(metadata, entries)) for entries in shards]


class SizeShards:
    """Tensors streamed into shards of at most ``limit`` bytes of data each (a tensor larger than the
    limit gets a shard of its own), for a writer that learns the names as it goes. The shards are
    written under temporary names (``part-00001.safetensors``: the count is known only at the end);
    :meth:`finish` renames them to :func:`shard_names` and returns those. :meth:`abort` deletes the
    open one. ``check`` sees each tensor before it is written (to refuse one). ``plan``: the tensors
    expected (name, dtype, shape, in order), so that each header's slot is reserved at its exact size
    and the data is written once, not spilled and copied behind the header (a third of a merge's
    writing); a tensor off the plan costs that copy again, never a different byte."""

    def __init__(self, folder: Path, limit: int, metadata: dict[str, str] | None = None, check=None,
                 plan: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None):
        self.folder = Path(folder)
        self.limit = limit
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        self.check = check
        self.reserves = planned_headers(plan, limit, self.metadata) if plan else []
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.writer: ShardWriter | None = None
        self.size = 0
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.check is not None:
            self.check(name, t)
        nb = t.numel() * t.element_size()
        if self.writer is None or (self.size and self.size + nb > self.limit):
            if self.writer is not None:
                self.writer.close()
            self.files.append(f"part-{len(self.files) + 1:05d}.safetensors")
            i = len(self.files) - 1
            self.writer = ShardWriter(self.folder / self.files[-1], self.metadata,
                                      reserve=self.reserves[i] if i < len(self.reserves) else None, exact=True)
            self.size = 0
        self.writer.add(name, t)
        self.weight_map[name] = self.files[-1]
        self.size += nb
        self.total += nb

    def close(self) -> None:
        """Finish the open shard (the tensors are all written)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def finish(self) -> list[str]:
        """Close, rename the shards to their final names, fix the weight map; returns the names."""
        self.close()
        final = shard_names(len(self.files)) if self.files else []
        rename = dict(zip(self.files, final))
        for a, b in rename.items():
            os.replace(self.folder / a, self.folder / b)
        self.weight_map = {k: rename[v] for k, v in self.weight_map.items()}
        self.files = final
        return final

    def write_index(self) -> None:
        """The index, for more than one shard (after :meth:`finish`)."""
        if len(self.files) > 1:
            write_index(self.folder, self.weight_map, self.total)
