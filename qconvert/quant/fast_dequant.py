"""A fast CPU path for 4-bit dequantization, bit-identical to :mod:`qconvert.quant.reference`.

The reference unpacks every nibble into an int64 index, gathers each code's value, repeats every
block scale ``blocksize`` times and multiplies: five full-size temporaries. Here the work is the
same arithmetic in fewer passes over cache-sized chunks:

- one gather per *byte*: a 256-entry table maps a byte to its two codes' float32 values, stored
  as one int64 (the high nibble's value first, element 2i), so ``index_select`` writes both
  values at once and the result, viewed as float32, is the codes' values in element order;
- the block scales multiply a ``(blocks, blocksize)`` view of those values through a broadcast
  ``(blocks, 1)`` view, never a repeated copy;
- the product is written straight into the output: ``torch.mul`` into an output of another
  dtype computes in float32 (its inputs' type) and rounds each product once on the store, which
  is the reference's ``(code * absmax).to(logical_dtype)``. Where the asked dtype is neither the
  logical dtype nor a widening of a float32 weight, the logical value is rounded in a scratch
  buffer first and then converted, as the reference does;
- double quantization's 8-bit scales are decoded once per call, with the arithmetic of
  :func:`qconvert.format.layout.decoded_scales` (each step rounded to float32) over broadcast
  views (:func:`block_scales`; tested bit-identical to it).

Every product is the same float32 multiplication of the same two float32 numbers as in the
reference, rounded the same way, so the output is the reference's bit for bit; tests/
test_fast_dequant.py compares both on every block size, quant type, dtype pair, with and without
double quantization, and on ragged and odd element counts.

Chunks are whole blocks (the ragged last block is done on its own) and go to the workers of
:func:`qconvert.quant.fast_cpu.run_chunks`, for the reasons given there: torch at one intra-op
thread, coarse chunks taken from a shared queue. A tensor of a single chunk (a small model's
weights) runs inline, at the caller's torch thread count, without touching it.
"""

from __future__ import annotations

import sys
import threading

import torch

from ..format.layout import QuantizedTensor, decoded_scales
from .fast_cpu import default_workers, run_chunks

#: Bytes of packed codes per chunk (twice as many values). Each chunk costs a handful of torch ops
#: whose fixed cost (about 3 us each from Python) outweighed cache residency: on a 4096x4096 bf16
#: weight, one thread, CPU time fell from 23 ms at 2**14 to 12 ms at 2**17 and no further at 2**18
#: (2-core AMD EPYC VM, 2026-12-06, shared).
CHUNK_BYTES = 1 << 17

_TABLES: dict[tuple, torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """int64[256]: entry b holds ``quant_map[b >> 4]`` then ``quant_map[b & 15]`` as two float32 in
    memory order, so a gathered entry viewed as float32 is the byte's two values in element order."""
    qm = quant_map.detach().to(torch.float32).reshape(-1)
    key = tuple(qm.view(torch.int32).tolist())  # the bits: -0.0 and NaN payloads kept apart
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            pairs = torch.stack([qm.repeat_interleave(16), qm.repeat(16)], dim=1).contiguous()
            table = _TABLES[key] = pairs.view(torch.int64).reshape(256)
            if len(_TABLES) > 64:  # code tables are a handful per model; bound a stream of odd ones
                _TABLES.pop(next(iter(_TABLES)))
    return table


def block_scales(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 scale of each block: stored, or decoded from double quantization (once per call).

    Decoding is :func:`qconvert.format.layout.decoded_scales`' arithmetic, ``nested_quant_map[code]
    * nested_absmax[i // 256]`` rounded to float32, then ``+ nested_offset`` rounded again, with
    the nested scales broadcast over a view instead of repeated."""
    if not qt.double_quant:
        return qt.absmax.to(torch.float32)
    codes, nested = qt.absmax.reshape(-1), qt.nested_absmax.reshape(-1).to(torch.float32)
    nbs = qt.nested_blocksize
    if codes.dtype != torch.uint8 or nested.numel() != -(-codes.numel() // nbs):
        return decoded_scales(qt)  # not the layout's sizes: the layout's own code raises what it raises
    s = torch.index_select(qt.nested_quant_map.to(torch.float32).reshape(-1), 0, codes.to(torch.int32))
    full = s.numel() - s.numel() % nbs
    s[:full].view(-1, nbs).mul_(nested[: full // nbs].unsqueeze(1))
    s[full:].mul_(nested[full // nbs :])
    return s.add_(torch.tensor(qt.nested_offset, dtype=torch.float32))


class _Work:
    """One thread's scratch buffers for one chunk (reused: the allocator stays off the hot loop)."""

    def __init__(self, nbytes: int):
        self.size = nbytes
        self.index = torch.empty(nbytes, dtype=torch.int32)
        self.pairs = torch.empty(nbytes, dtype=torch.int64)
        self.rounded: dict[torch.dtype, torch.Tensor] = {}

    def rounding(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self.rounded.get(dtype)
        if buf is None:
            buf = self.rounded[dtype] = torch.empty(2 * self.size, dtype=dtype)
        return buf[:n]


_LOCAL = threading.local()


def _thread_work(nbytes: int) -> _Work:
    w = getattr(_LOCAL, "work", None)
    if w is None or w.size < nbytes:
        w = _LOCAL.work = _Work(nbytes)
    return w


def values_of(packed: torch.Tensor, table: torch.Tensor, work: _Work) -> torch.Tensor:
    """The float32 code values of a run of packed bytes (two per byte, element order)."""
    m = packed.numel()
    index, pairs = work.index[:m], work.pairs[:m]
    index.copy_(packed)
    torch.index_select(table, 0, index, out=pairs)
    return pairs.view(torch.float32)


def scale_into(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, logical: torch.dtype, work: _Work) -> None:
    """``out = (values * scales).to(logical).to(out.dtype)``, ``values`` and ``out`` viewed as
    ``(len(scales), -1)``, each product rounded as the reference rounds it."""
    rows = scales.numel()
    v, s = values.view(rows, -1), scales.unsqueeze(1)
    if out.dtype == logical or logical == torch.float32:
        torch.mul(v, s, out=out.view(rows, -1))  # one rounding, float32 -> out.dtype
        return
    rounded = work.rounding(logical, out.numel())
    torch.mul(v, s, out=rounded.view(rows, -1))
    out.copy_(rounded)  # the logical value converted, as dequantize_4bit_ref's .to(dtype)


class Decoder:
    """One weight's packed bytes, pair table and float32 block scales, ready to decode any run of
    whole blocks (the scales decoded once, for every run)."""

    def __init__(self, qt: QuantizedTensor):
        self.packed = qt.packed.reshape(-1)
        self.table = pair_table(qt.quant_map)
        self.scales = block_scales(qt)
        self.n, self.bs, self.logical = qt.numel, qt.blocksize, qt.dtype
        self.full = self.n - self.n % self.bs  # where the ragged last block starts

    def into(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements [start, stop) into ``out`` (1-D, stop - start long): ``start`` a multiple of the
        block size, ``stop`` one too or the element count."""
        bs, full = self.bs, self.full
        body = min(stop, full)
        if body > start:
            work = _thread_work((body - start) // 2)
            values = values_of(self.packed[start // 2 : body // 2], self.table, work)
            scale_into(values, self.scales[start // bs : body // bs], out[: body - start], self.logical, work)
        if stop > full:  # the ragged last block; an odd count ends in half a byte
            m = self.n - full
            work = _thread_work((m + 1) // 2)
            values = values_of(self.packed[full // 2 :], self.table, work)[:m]
            scale_into(values, self.scales[-1:], out[full - start :], self.logical, work)


def usable(qt: QuantizedTensor) -> bool:
    """Whether the fast path can read ``qt`` (CPU, little-endian, the layout's sizes); elsewhere the
    reference computes, and raises what it raises."""
    packed = qt.packed
    return (sys.byteorder == "little" and packed.device.type == "cpu" and packed.dtype == torch.uint8
            and packed.numel() == (qt.numel + 1) // 2 and qt.absmax.numel() == qt.nblocks and qt.quant_map.numel() == 16
            and (not qt.double_quant or qt.nested_quant_map.numel() == 256))


def dequantize_4bit_fast(qt: QuantizedTensor, dtype: torch.dtype | None = None, workers: int | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as :func:`qconvert.quant.reference.dequantize_4bit_ref`, faster on CPU.

    ``workers``: threads for the chunk loop (default: the CPUs available to this process). The
    values do not depend on it. ``out``: a contiguous CPU tensor of ``dtype`` and ``qt.numel``
    elements to write into (a caller's reused buffer) instead of a new one."""
    dtype = dtype or qt.dtype
    if not usable(qt):
        from .reference import dequantize_4bit_ref

        return dequantize_4bit_ref(qt, dtype)
    n = qt.numel
    if out is None:
        out = torch.empty(n, dtype=dtype)
    elif not (out.dtype == dtype and out.numel() == n and out.is_contiguous() and out.device.type == "cpu"):
        raise ValueError(f"out: need a contiguous CPU {dtype} tensor of {n} elements, got {out.dtype} {tuple(out.shape)}")
    out = out.view(-1)
    dec = Decoder(qt)
    step = max(dec.bs, 2 * CHUNK_BYTES - 2 * CHUNK_BYTES % dec.bs)  # elements: whole blocks
    if step >= n:  # one chunk (most weights of a small model): no pool, torch's threads left as they are
        dec.into(0, n, out)
    else:
        run_chunks(lambda start: dec.into(start, min(start + step, n), out[start : start + step]),
                   list(range(0, n, step)), workers or default_workers())
    return out.reshape(qt.shape)
