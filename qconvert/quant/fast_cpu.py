"""A fast CPU path for 4-bit quantization, bit-identical to :mod:`qconvert.quant.reference`.

The reference bins every scaled value with ``torch.bucketize`` (a binary search per element). Here a
value is binned from its float32 bit pattern instead. Map the bits to an order-preserving integer
key (flip the magnitude bits of negative numbers); the top 16 bits of the key then name a cell, an
exact range of float32 values, and the low 16 bits the position inside it. Cells are far narrower
than the gaps between the 15 midpoints, so a cell holds at most one of them, and one int32 table
entry per cell says everything: ``bin = (entry + low16) >> 16``, with ``entry = base << 16 |
(0xFFFF - split)``, where ``base`` is the bin at the bottom of the cell and ``split`` the last
position still in that bin (0xFFFF when the whole cell is). That is one table lookup per value
and a handful of vectorized integer operations, with no rounding anywhere, so the result is the
bucketize bin exactly; the table itself is built by calling bucketize on the cells' end points and
on every value of the few cells that hold a midpoint. Tests compare both on every float32 around
every midpoint and at every cell edge.

Work goes through the tensor in cache-sized chunks, and non-finite input is detected from the block
maxima instead of a separate pass. Block scales, the ragged tail and double quantization reuse the
reference's own functions, so there is one definition of the math and this module only changes how
fast the codes are found.

Parallelism is coarse on purpose. torch's own intra-op threads split every small op and meet at a
barrier after each; on a shared machine a descheduled thread stalls every op (measured 10-20x
slower with one competing process on 2 cores). So the chunk loop runs with torch at one thread, and
``workers`` threads (the caller's included) take whole chunks, about 1 MB of work each, from a
shared queue: a worker that loses its CPU delays only its own chunk. torch releases the GIL inside
each op. Chunks write disjoint slices of the output, so the bytes cannot depend on the worker count.

The one reduction over a whole tensor, the mean of the block scales that double quantization stores
as ``nested_offset`` (spec section 7.1), is summed in a fixed order: the one torch uses at
:data:`MEAN_THREADS` threads, its thread count when this module was first imported (its default,
unless the program changed it earlier). The output therefore does not depend on ``workers``, and it
equals what transformers + bitsandbytes write in a process with torch's default threads.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..names import ceil_div
from ..format.constants import quantize_midpoints
from ..format.layout import QuantizedTensor
from .reference import _TINY, absmax_blocks, assemble, check_quantizable, pack_nibbles, pack_scaled

#: Elements per chunk: 1 MB of float32 working set, the fastest size measured on a 2-core VM.
CHUNK = 1 << 18

#: torch's intra-op thread count at import: the summation order of ``nested_offset`` (see above).
MEAN_THREADS = torch.get_num_threads()

#: torch's grain for parallel reductions (at::internal::GRAIN_SIZE): shorter inputs are summed serially.
_REDUCE_GRAIN = 32768

_SIGN_OFF = 0x7FFFFFFF


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 values that sort as the values do (-0.0 just below +0.0)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & _SIGN_OFF)


def floats_of_keys(keys: torch.Tensor) -> torch.Tensor:
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & _SIGN_OFF)).view(torch.float32)


class _Binner:
    """The cell table of one quant type, and the bin -> nibble order."""

    def __init__(self, quant_type: str):
        mids, order = quantize_midpoints(quant_type)
        self.mids = mids.float()
        self.order = order.to(torch.uint8)
        self.identity = bool(torch.equal(order, torch.arange(16)))
        finite = float_keys(torch.tensor([-float("inf"), float("inf")]))
        cell = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64)
        first, last = cell << 16, (cell << 16) + 0xFFFF

        def bins(keys: torch.Tensor) -> torch.Tensor:  # NaN bit patterns count as +-inf
            return torch.bucketize(floats_of_keys(keys.clamp(finite[0].item(), finite[1].item())), self.mids)

        base, top = bins(first), bins(last)
        if int((top - base).max()) > 1:
            raise AssertionError(f"{quant_type}: two midpoints share a cell")
        split = torch.full_like(cell, 0xFFFF)
        for c in torch.nonzero(top > base).flatten().tolist():
            inside = bins(first[c] + torch.arange(1 << 16))
            split[c] = int((inside == base[c]).sum()) - 1  # the values still in bin base: a prefix of the cell
        table = torch.empty(1 << 16, dtype=torch.int32)
        table[cell & 0xFFFF] = ((base << 16) + (0xFFFF - split)).to(torch.int32)
        self.table = table

    def bins(self, scaled: torch.Tensor, work: "_Work | None" = None) -> torch.Tensor:
        """Number of midpoints strictly below each float32 value (= torch.bucketize, right=False), as
        int32. With ``work``, the result and the temporaries live in its buffers."""
        if scaled.dtype != torch.float32:
            raise TypeError(f"bins() takes float32 values, not {scaled.dtype}")
        m = scaled.numel()
        w = work or _Work(m)
        bits = scaled.contiguous().view(torch.int32)
        key, cell, e = w.key[:m], w.cell[:m], w.e[:m]
        torch.bitwise_right_shift(bits, 31, out=key)  # the sort key: flip the magnitude of negatives
        key &= _SIGN_OFF
        key ^= bits
        torch.bitwise_right_shift(key, 16, out=cell)
        cell &= 0xFFFF
        torch.index_select(self.table, 0, cell, out=e)
        key &= 0xFFFF
        e += key
        e >>= 16
        return e

    def codes(self, scaled: torch.Tensor, work: "_Work | None" = None) -> torch.Tensor:
        """The 4-bit code of each value, as uint8."""
        w = work or _Work(scaled.numel())
        b = self.bins(scaled, w)
        out = w.codes[: b.numel()]
        if self.identity:
            return out.copy_(b)
        return torch.index_select(self.order, 0, b, out=out)


class _Work:
    """Scratch buffers for one chunk. Reusing them instead of allocating each temporary keeps the
    chunk loop out of the allocator, which measured both faster and far steadier here."""

    def __init__(self, n: int):
        self.size = n
        self.body = torch.empty(n, dtype=torch.float32)
        self.absval = torch.empty(n, dtype=torch.float32)
        self.key = torch.empty(n, dtype=torch.int32)
        self.cell = torch.empty(n, dtype=torch.int32)
        self.e = torch.empty(n, dtype=torch.int32)
        self.codes = torch.empty(n + n % 2, dtype=torch.uint8)
        self.hi = torch.empty((n + 1) // 2, dtype=torch.int16)
        self.lo = torch.empty((n + 1) // 2, dtype=torch.int16)


_BINNERS: dict[str, _Binner] = {}


def binner(quant_type: str) -> _Binner:
    if quant_type not in _BINNERS:
        _BINNERS[quant_type] = _Binner(quant_type)
    return _BINNERS[quant_type]


def pack_pairs(codes: torch.Tensor, out: torch.Tensor, work: _Work) -> None:
    """:func:`pack_nibbles` of an even count of uint8 codes into ``out``, through 16-bit lanes."""
    if sys.byteorder != "little":
        out.copy_(pack_nibbles(codes).reshape(-1))
        return
    v = codes.view(torch.int16)  # element 2i in the low byte, 2i + 1 in the high byte
    hi, lo = work.hi[: v.numel()], work.lo[: v.numel()]
    torch.bitwise_left_shift(v, 4, out=hi)
    torch.bitwise_right_shift(v, 8, out=lo)
    hi |= lo
    hi &= 0xFF  # the low byte, codes[2i] << 4 | codes[2i + 1]: in range, so the cast cannot saturate
    out.copy_(hi)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``n``, then restore it."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def mean_in_torch_order(x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x.mean()`` of a 1-D float32 CPU tensor with the very bits torch gives at ``threads`` intra-op
    threads, computed at any thread count. torch splits a reduction of at least its grain into
    min(threads, ceil(n / grain)) equal contiguous parts, sums each serially, adds the partial sums
    in order and divides by n. tests/test_threads.py checks this against torch at 1 to 4 threads."""
    n = x.numel()
    parts = 1 if n < _REDUCE_GRAIN else min(threads, ceil_div(n, _REDUCE_GRAIN))
    size = max(1, ceil_div(n, parts))
    with torch_threads(1):
        total = x[:size].sum()
        for start in range(size, n, size):
            total = total + x[start : start + size].sum()
        return total / n


_LOCAL = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _thread_work(m: int) -> _Work:
    """This thread's scratch buffers, at least ``m`` elements long (kept for the next tensor)."""
    w = getattr(_LOCAL, "work", None)
    if w is None or w.size < m:
        w = _LOCAL.work = _Work(m)
    return w


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``threads`` threads (kept between tensors)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="qconvert-quantize"), threads
        return _POOL


def run_chunks(task: Callable[[int], None], starts: list[int], workers: int) -> None:
    """``task(start)`` for every start, on ``workers`` threads: the caller's and ``workers - 1`` pool
    threads, each taking the next start when it finishes one, all with torch at one intra-op thread.
    The first error is raised once every thread has stopped."""
    workers = min(workers, len(starts))
    if workers <= 1:
        with torch_threads(1):
            for start in starts:
                task(start)
        return
    queue = iter(starts)
    lock = threading.Lock()
    failed = threading.Event()

    def drain() -> None:
        torch.set_num_threads(1)  # in a pool thread too (OpenMP keeps the setting per thread)
        while not failed.is_set():
            with lock:
                start = next(queue, None)
            if start is None:
                return
            try:
                task(start)
            except BaseException:
                failed.set()
                raise

    with torch_threads(1):
        futures = [_pool(workers - 1).submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        finally:
            errors = [f.exception() for f in futures]  # waits for each
    for e in errors:
        if e is not None:
            raise e


_DEFAULT_WORKERS: int | None = None


def default_workers() -> int:
    """The CPUs available to this process (:func:`qconvert._cpus.available_cpus`), read once."""
    global _DEFAULT_WORKERS
    if _DEFAULT_WORKERS is None:
        from .._cpus import available_cpus

        _DEFAULT_WORKERS = available_cpus()
    return _DEFAULT_WORKERS


def quantize_4bit_fast(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "tensor",
    workers: int | None = None,
) -> QuantizedTensor:
    """Same result as :func:`qconvert.quant.reference.quantize_4bit_ref`, faster on CPU.

    ``workers``: threads for the chunk loop (default: the CPUs available to this process, see
    :mod:`qconvert._cpus`). The bytes are the same for every value. While it runs, torch's intra-op
    thread count is 1 (restored after), so do not run other torch work beside it in the same process."""
    if x.device.type != "cpu":
        from .reference import quantize_4bit_ref

        return quantize_4bit_ref(x, quant_type, blocksize, double_quant, name)
    check_quantizable(x, name, quant_type, blocksize, check_finite=False)  # finiteness: from absmax below
    flat = x.detach().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    search = binner(quant_type)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(ceil_div(n, blocksize), dtype=torch.float32)
    # whole blocks, chunk by chunk (a chunk is a whole number of blocks, so an even count)
    step = max(blocksize, CHUNK - CHUNK % blocksize)

    def chunk(start: int) -> None:
        stop = min(start + step, full)
        m = stop - start
        work = _thread_work(m)
        body = work.body[:m]
        body.copy_(flat[start:stop])
        am = absmax[start // blocksize : stop // blocksize]
        torch.amax(torch.abs(body, out=work.absval[:m]).view(-1, blocksize), dim=1, out=am)
        # Non-finite input gives NaN or Inf in am (amax propagates both): harmless codes here, and
        # refused below, once every chunk is done. The reference clamps the scaled values to [-1, 1];
        # they can only pass it by a rounding step, and such a value lands in the outermost bin
        # either way, so the clamp is left out.
        body.view(-1, blocksize).mul_((1.0 / am.clamp(min=_TINY)).unsqueeze(1))
        pack_pairs(search.codes(body, work), packed[start // 2 : stop // 2], work)

    with torch_threads(1):
        run_chunks(chunk, list(range(0, full, step)), workers or default_workers())
        if full < n:  # the ragged last block: the reference's own code, on a handful of values
            tail_absmax, tail_scaled = absmax_blocks(flat[full:].to(torch.float32), blocksize)
            absmax[-1] = tail_absmax[0]
            packed[full // 2 :] = pack_scaled(tail_scaled, quant_type).reshape(-1)
        if not bool(torch.isfinite(absmax).all()):
            check_quantizable(x, name, quant_type, blocksize)  # raises, naming the first bad element
        offset = mean_in_torch_order(absmax, MEAN_THREADS) if double_quant else None
        return assemble(x, packed, absmax, quant_type, blocksize, double_quant, name, offset)
