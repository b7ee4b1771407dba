"""The compiled kernels' Python side: every size, dtype, device and contiguity checked, then one C call.

nf4.c trusts its arguments, so this module is where memory safety is decided: a buffer's length
is only ever what the checks below proved (a contiguous CPU tensor of the right dtype and element
count, kept alive for the call). Anything else (another device, an odd block size, a table of the
wrong size, a dtype the kernels do not write) returns ``None`` and the caller runs the torch path,
which computes the same result or raises what the reference raises: these functions never raise
for bad input themselves.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from ...names import NESTED_BLOCKSIZE
from ...quant.fast_cpu import default_workers
from .build import library

#: nf4.c's dtype codes
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: elements per chunk of the dequantizer's OpenMP loop (rounded down to whole blocks): 32 KiB of
#: codes and 128 KiB of float32 output, a few hundred chunks on a 4096x4096 weight
CHUNK = 1 << 16
#: the most rows of input one call of the fused kernel takes (nf4.c's MAXROWS)
MAX_ROWS = 8
#: the most rows :func:`gemv` takes, in calls of MAX_ROWS rows (each row's result does not depend on
#: the rows beside it, so the chunks give the bits one call would)
MAX_FUSED_ROWS = 16


def _threads() -> int:
    """OpenMP threads: the CPUs available (qconvert._cpus), at most torch's intra-op count (which
    honours OMP_NUM_THREADS and a caller that holds torch to one thread)."""
    return max(1, min(default_workers(), torch.get_num_threads()))


def _f32(t: torch.Tensor | None, numel: int) -> torch.Tensor | None:
    """``t`` as a contiguous float32 CPU tensor of ``numel`` elements (converted as the reference's
    ``.to(torch.float32)`` converts), or None."""
    if t is None or t.device.type != "cpu" or t.numel() != numel or not t.dtype.is_floating_point:
        return None
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def weight_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                logical_dtype) -> tuple[tuple, tuple] | None:
    """(C arguments, tensors that back them) for a weight the kernels can read, else None."""
    n = math.prod(shape) if all(isinstance(s, int) and s > 0 for s in shape) else 0
    if (n == 0 or logical_dtype not in CODES or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2
            or packed.device.type != "cpu" or packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2):
        return None
    nblocks = -(-n // blocksize)
    qmap = _f32(quant_map, 16)
    codes8 = nested = nqm = None
    if nested_absmax is None:
        scales = _f32(absmax, nblocks)
        if qmap is None or scales is None:
            return None
    else:
        scales = None
        nested, nqm = _f32(nested_absmax, -(-nblocks // NESTED_BLOCKSIZE)), _f32(nested_quant_map, 256)
        if (qmap is None or nested is None or nqm is None or absmax.device.type != "cpu" or absmax.dtype != torch.uint8
                or absmax.numel() != nblocks):
            return None
        codes8 = absmax.contiguous()
    packed = packed.contiguous()
    keep = (packed, qmap, scales, codes8, nested, nqm)
    args = (packed.data_ptr(), qmap.data_ptr(), _ptr(scales), _ptr(codes8), _ptr(nested), _ptr(nqm),
            float(nested_offset) if nested_absmax is not None else 0.0, NESTED_BLOCKSIZE, blocksize, n, CODES[logical_dtype])
    return args, keep


class Prepared:
    """One weight's C arguments (:func:`weight_args`), for a caller that calls the kernels on the same
    weight again and again (a layer in generation: the checks cost as much as a small product).
    :func:`prepare` reuses it only where the C arguments are the addresses of the caller's own tensors
    (no contiguous or float32 copy was made) and only while the tensors passed now have those
    addresses, on the CPU, with the same dtypes, sizes and contiguity, and the scalars are the same:
    then the pointers are the memory of the tensors passed now, as :func:`weight_args` would check
    it, and whatever was written there (a weight changed in place, through ``.data`` or not) is what
    the kernel reads. A tensor replaced, moved, converted or re-gathered elsewhere changes the key,
    and the weight is checked again. It holds no tensor (a replaced weight is not kept alive by it),
    except the copies of one that is never reused (``key`` None), for its own call."""

    __slots__ = ("key", "args", "keep", "lib", "shape", "by32")

    def __init__(self, key: tuple | None, args: tuple, keep: tuple, lib=None, shape: tuple = ()):
        self.key, self.args, self.keep, self.lib, self.shape = key, args, keep, lib, shape
        #: whether qc_gemv takes its runs-of-32 path for this weight (:func:`runs_of_32`)
        self.by32 = len(shape) == 2 and runs_of_32(shape[1], args[8], lib)  # (args[8]: the block size, weight_args)


def _key(tensors: tuple, scalars: tuple) -> tuple:
    return (*[None if t is None else (t.data_ptr(), t.is_cpu, t.dtype, t.numel(), t.is_contiguous()) for t in tensors],
            *scalars)


def prepare(prev: Prepared | None, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
            shape, logical_dtype) -> Prepared | None:
    """``prev`` if it still holds for these weight arguments, else a new :class:`Prepared` (whose key
    is None, so that it is never reused, where :func:`weight_args` had to copy a tensor); None where
    the kernels cannot take the weight or are not built."""
    lib = library()
    if lib is None:
        return None
    tensors = (packed, absmax, quant_map, nested_absmax, nested_quant_map)
    key = _key(tensors, (nested_offset, blocksize, tuple(shape), logical_dtype))
    if prev is not None and prev.key is not None and prev.key == key and prev.lib is lib:
        return prev
    got = weight_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                      logical_dtype)
    if got is None:
        return None
    own = {t.data_ptr() for t in tensors if t is not None}
    if any(t is not None and t.data_ptr() not in own for t in got[1]):
        return Prepared(None, *got)
    return Prepared(key, got[0], (), lib, tuple(shape))


def _prepared(prepared: Prepared | None, weight: tuple) -> tuple[tuple, tuple] | None:
    return (prepared.args, prepared.keep) if prepared is not None else weight_args(*weight)


def dequantize(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype,
               dtype, out: torch.Tensor | None = None, prepared: Prepared | None = None) -> torch.Tensor | None:
    """The weight's value in ``dtype`` by the compiled kernel (the reference's bits), shaped ``shape``;
    into ``out`` (a contiguous CPU tensor of that dtype and size) when given; ``prepared``: the
    weight's :func:`prepare` for these arguments, if the caller has one. None: use the torch path."""
    lib = library()
    if lib is None or dtype not in CODES:
        return None
    prepared = _prepared(prepared, (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                    shape, logical_dtype))
    if prepared is None:
        return None
    args, keep = prepared
    n = args[9]
    if out is None:
        out = fresh(lib, n, dtype)
    elif not (out.dtype == dtype and out.numel() == n and out.is_contiguous() and out.device.type == "cpu"):
        return None
    chunk = max(blocksize, CHUNK - CHUNK % blocksize)
    lib.qc_dequantize(*args, CODES[dtype], out.data_ptr(), chunk, _threads() if n > chunk and n >= PARALLEL_DEQUANT else 1)
    del keep
    return out.view(tuple(shape))


#: outputs of at least this many bytes get huge pages (:func:`fresh`): glibc's malloc serves every
#: request this large by a mapping of its own (its largest mmap threshold), so the advice never
#: reaches memory of the heap that other allocations share
HUGE_BYTES = 32 << 20
#: ``QCONVERT_HUGEPAGES=0`` keeps every output on the system's default pages
HUGE_ENV = "QCONVERT_HUGEPAGES"


def fresh(lib, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``n`` elements for a kernel to write in whole. From :data:`HUGE_BYTES` up its
    memory is asked for as huge pages, whose faults are taken before the kernel writes (nf4.c
    qc_hugepages: with 4 KiB pages the faults cost more than decoding the weight). The cost of the
    advice: where the kernel compacts memory for madvised huge pages (``defrag`` set to ``madvise``,
    a common default) a machine short of free memory can stall the first write; ``QCONVERT_HUGEPAGES=0``
    turns it off."""
    out = torch.empty(n, dtype=dtype)
    if n * out.element_size() >= HUGE_BYTES and huge_pages_on():
        lib.qc_hugepages(out.data_ptr(), n * out.element_size())
    return out


def huge_pages_on() -> bool:
    """:data:`HUGE_ENV`: unset, empty, ``1``, ``on``, ``true`` or ``yes`` leave huge pages on; ``0``,
    ``off``, ``false`` or ``no`` turn them off; anything else is refused (OptionError) rather than
    guessed at."""
    value = os.environ.get(HUGE_ENV, "").strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    from ...errors import OptionError

    raise OptionError(f"{HUGE_ENV}={os.environ[HUGE_ENV]!r}: not a value it takes",
                      hint=f"set {HUGE_ENV}=0 to keep outputs on the system's default pages, or unset it")


def runs_of_32(in_features: int, blocksize: int, lib=...) -> bool:
    """Whether qc_gemv takes its runs-of-32 path for such a weight: an AVX-512 build, in_features and
    the block size multiples of 32 (nf4.c's gemv_row32). ``lib``: the :func:`library` the caller has
    just had, if it has."""
    if lib is ...:
        lib = library()
    return lib is not None and lib.simd == 512 and in_features % 32 == 0 and blocksize % 32 == 0


def gemv(x: torch.Tensor, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
         logical_dtype, bias: torch.Tensor | None, prepared: Prepared | None = None) -> torch.Tensor | None:
    """``x @ W.T + bias`` in x's dtype by the fused kernel, for at most :data:`MAX_FUSED_ROWS` rows of
    x (calls of :data:`MAX_ROWS` rows), the weight never written out; None: use the torch path (also
    on a build without vector code).
    Within float32 summation order of the reference (tests/tolerances.py GEMV_REL). ``prepared``:
    as for :func:`dequantize`."""
    lib = library()
    if lib is None or not lib.simd or len(shape) != 2:
        return None  # (a plain-C build: dequantize + torch's product is faster)
    O, K = shape  # noqa: N806 (the matrix's sides)
    if not _fits(x, bias, O, K):
        return None
    prepared = _prepared(prepared, (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                    shape, logical_dtype))
    if prepared is None:
        return None
    return _gemv(lib, *prepared, x, bias, O, K)


def gemv_prepared(prepared: Prepared, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`gemv` on the weight :func:`prepare` has just checked and returned (with a key: the
    arguments are the weight's own tensors' addresses), for the hundreds of calls a second of
    generation: only x and the bias are checked here. The caller holds those tensors through the
    call (kernels.matmul_cpu_kept's ``weight``)."""
    lib = prepared.lib
    if prepared.key is None or lib is None or not lib.simd or len(prepared.shape) != 2:
        return None
    O, K = prepared.shape  # noqa: N806 (the matrix's sides)
    if not _fits(x, bias, O, K):
        return None
    return _gemv(lib, prepared.args, (), x, bias, O, K)


def _fits(x: torch.Tensor, bias: torch.Tensor | None, O: int, K: int) -> bool:  # noqa: N803
    """Whether qc_gemv takes x (1 to MAX_FUSED_ROWS rows of K, on the CPU, a dtype it reads) and the bias."""
    if x.device.type != "cpu" or x.dtype not in CODES or x.dim() == 0 or x.shape[-1] != K or K <= 0:
        return False
    if not 1 <= x.numel() // K <= MAX_FUSED_ROWS:
        return False
    return bias is None or (bias.device.type == "cpu" and bias.dtype == x.dtype and bias.numel() == O)


def _gemv(lib, args: tuple, keep: tuple, x: torch.Tensor, bias: torch.Tensor | None, O: int, K: int) -> torch.Tensor:  # noqa: N803
    """qc_gemv over x's rows in calls of MAX_ROWS (x and bias as :func:`_fits` says)."""
    rows = x.numel() // K
    xc = x.contiguous()
    b = bias.contiguous() if bias is not None else None
    y = torch.empty((*x.shape[:-1], O), dtype=x.dtype)
    chunk = min(rows, MAX_ROWS)
    scratch = _scratch(2 * chunk * K)
    threads = _threads() if O * K >= PARALLEL_GEMV else 1
    size, code = x.element_size(), CODES[x.dtype]
    for r in range(0, rows, chunk):
        lib.qc_gemv(*args, xc.data_ptr() + r * K * size, min(chunk, rows - r), O, K, code, _ptr(b),
                    y.data_ptr() + r * O * size, scratch.data_ptr(), threads)
    del keep, xc, b, scratch
    return y


_SCRATCH = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """``n`` float32 elements of this thread's reused buffer for qc_gemv's copies of x (float32 and
    bfloat16, MAX_ROWS rows of the widest weight seen so far): a fresh one each call costs as much as
    a small product's checks."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    return buf


#: Weights with fewer elements than these are decoded (PARALLEL_DEQUANT) or multiplied (PARALLEL_GEMV)
#: on the calling thread alone: an OpenMP team ends in a barrier that waits for every thread of the
#: team, so a thread the kernel has not scheduled (another process busy on its CPU) stalls the call
#: for a time slice, far more than the work. Measured on the 2-core AMD EPYC while other jobs ran (load
#: average 4.8), 2026-12-06, decoding to float32, wall time over 300 (40) calls, 1 thread against 2:
#: 704x256 mean 120 vs 4022 us (medians 45 vs 42); 2048x2048 mean 4.6 vs 13.1 ms. Above them (about
#: 0.2 ms of work on one thread) a second thread's saving on a quiet machine is worth that risk, and
#: nf4.c bounds it: a call whose team had a thread start or finish late makes the calls of the next
#: 0.1 s run alone (qc_alone, qc_last_team).
PARALLEL_DEQUANT = 1 << 20
PARALLEL_GEMV = 1 << 20
