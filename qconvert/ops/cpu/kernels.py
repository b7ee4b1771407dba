"""The CPU kernels of qconvert's ops: the fast CPU quantizer and dequantizer (quant/fast_cpu.py,
quant/fast_dequant.py), bit-identical to the reference, and the products built on them.

:data:`KERNELS` at the end is the one place where the CPU implementation of each op is chosen
(qconvert/ops/__init__.py registers it for the CPU dispatch key). Nothing here imports Triton.
"""

from __future__ import annotations

import math
import threading

import torch

from ..args import as_quantized, quantize_outputs


def _decode(args: tuple, dtype: torch.dtype, out: torch.Tensor | None, prepared=None) -> torch.Tensor:
    """The weight of the op's weight arguments ``args`` in ``dtype``, shaped as it is: the compiled
    CPU kernel (ops/native), else the torch fast path (quant/fast_dequant.py), the reference's bits
    either way; written into ``out`` (contiguous, the weight's size, ``dtype``) when given.
    ``prepared``: the compiled kernels' checked arguments for ``args`` (calls.prepare), if any."""
    from ...quant.fast_dequant import dequantize_4bit_fast
    from ..native import calls

    w = calls.dequantize(*args, dtype, out=out, prepared=prepared)
    if w is not None:
        return w
    qt = as_quantized(*args)
    return dequantize_4bit_fast(qt, dtype, out=out).view(qt.shape)


def dequantize_cpu(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype, dtype) -> torch.Tensor:
    """The CPU kernels' dequantize (:func:`_decode`) into a new tensor."""
    return _decode((packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype),
                   dtype, None)


def dequantize_cpu_into(out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                        logical_dtype) -> torch.Tensor:
    """:func:`dequantize_cpu` written into ``out`` (a contiguous CPU tensor of the weight's size, in
    the dtype wanted), the same bits; returned shaped ``shape``."""
    return _decode((packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype),
                   out.dtype, out)


#: Bytes of the per-thread buffer that matmul_cpu decodes a weight into: a weight up to this size
#: reuses it (grown to the largest such weight seen), a larger one gets a new tensor each call.
SCRATCH_LIMIT = 64 << 20

_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of ``dtype`` in this thread's reused buffer (overwritten by its next use)."""
    need = n * dtype.itemsize
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _SCRATCH.buf = torch.empty(-(-need // 8) * 8, dtype=torch.uint8)
    return buf[: -(-need // 8) * 8].view(dtype)[:n]


def _temporary_weight(dtype: torch.dtype, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                      blocksize, shape, logical_dtype, prepared=None) -> torch.Tensor:
    """The weight in ``dtype`` by the fast CPU dequantizer, for a product that only reads it: in this
    thread's reused buffer when it fits :data:`SCRATCH_LIMIT` (fresh memory costs a page fault per
    4 KiB, measured as much as the decoding itself on a 4096x4096 weight, and most of the input
    gradient's time in a small model's training step), else in a new tensor."""
    args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    numel = math.prod(int(d) for d in shape)
    reuse = packed.device.type == "cpu" and numel * dtype.itemsize <= SCRATCH_LIMIT
    return _decode(args, dtype, _scratch(numel, dtype) if reuse else None, prepared)


#: matmul_cpu takes the fused kernel up to this many rows of input, by dtype (generation's one token
#: per sequence); more rows dequantize once and run torch's product. Measured on the 2-core AMD EPYC
#: (Zen 4), one thread, 2026-12-06: in float32 the fused kernel is faster up to 4 rows on every
#: shape from 256x256 to 4096x4096 (1.2-2.1x); in bfloat16 torch's product (oneDNN's bf16 GEMM)
#: overtakes it from 2 rows on 2048x2048 and larger, so bfloat16 fuses only a single row.
GEMV_ROWS = {torch.float32: 4, torch.float16: 4, torch.bfloat16: 1}
#: The same where the kernel takes its runs-of-32 path (an AVX-512 build, in_features and the block
#: size multiples of 32: calls.runs_of_32): up to 16 rows (calls.MAX_FUSED_ROWS, two calls of 8) in
#: every dtype, a short prompt's prefill included. Measured on the same machine, 2026-12-06/07: at 8
#: rows, one thread, the fused kernel against dequantize + F.linear: 256x256 36 vs 55 us (float32), 38
#: vs 73 (bf16); 704x256 74 vs 123, 79 vs 116; 2048x2048 1586 vs 3482, 1527 vs 1692. At 16 rows (after
#: the bfloat16 dot-product path), fused against this function's dequantize-into-scratch + F.linear,
#: one thread / two: 1024x1024 bf16 404 vs 444 / 257 vs 409 us, float32 608 vs 748 / 360 vs 1375;
#: 2816x1024 bf16 970 vs 1184 / 554 vs 1018; 4096x4096 bf16 6772 vs 8863 / 3117 vs 5374, float32
#: 11566 vs 16100 / 5572 vs 15918; 256x256 even (74 vs 83 bf16, 77 vs 67 float32, one thread). At 32
#: rows the product overtakes it on most shapes.
GEMV_ROWS_BY32 = 16


def _fused_rows(by32: bool, dtype: torch.dtype) -> int:
    """How many rows of x go to the fused kernel: GEMV_ROWS_BY32 on its runs-of-32 path, else GEMV_ROWS."""
    return GEMV_ROWS_BY32 if by32 else GEMV_ROWS.get(dtype, 0)


def matmul_cpu(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
               logical_dtype, bias, prepared=None) -> torch.Tensor:
    """Up to :data:`GEMV_ROWS` rows of x: the compiled fused kernel (ops/native), the weight never
    written out, within float32 summation order of the reference. Otherwise (or where it cannot
    run) the fast CPU dequantizer, then ``F.linear``: the reference's result, bit for bit. The
    weight is a temporary here (autograd saves only the packed tensors). ``prepared``: the compiled
    kernels' checked arguments for this weight (calls.prepare), if the caller keeps them."""
    if x.dim() and x.numel() <= GEMV_ROWS_BY32 * x.shape[-1]:
        from ..native import calls

        if x.numel() <= _fused_rows(calls.runs_of_32(x.shape[-1], blocksize), x.dtype) * x.shape[-1]:
            y = calls.gemv(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                           logical_dtype, bias, prepared)
            if y is not None:
                return y
    w = _temporary_weight(x.dtype, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                          shape, logical_dtype, prepared)
    return torch.nn.functional.linear(x, w, bias)


def matmul_cpu_kept(prev, x, weight: tuple, bias) -> tuple[torch.Tensor, object]:
    """:func:`matmul_cpu` for a caller that keeps the weight's checked C arguments between calls:
    (the product, the arguments to pass as ``prev`` next time; None where the kernels are not built
    or the arguments cannot be reused)."""
    from ..native import calls

    prepared = calls.prepare(prev, *weight)
    if prepared is not None and prepared.key is not None and x.dim() and x.numel() <= _fused_rows(prepared.by32, x.dtype) * x.shape[-1]:
        y = calls.gemv_prepared(prepared, x, bias)  # matmul_cpu's first branch, the weight's checks done
        if y is not None:
            return y, prepared
    y = matmul_cpu(x, *weight, bias, prepared=prepared)
    return y, prepared if prepared is not None and prepared.key is not None else None


def grad_input_cpu(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype) -> torch.Tensor:
    """``grad_out @ W`` with the weight decoded as in :func:`matmul_cpu`."""
    w = _temporary_weight(grad_out.dtype, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                          blocksize, shape, logical_dtype)
    return grad_out @ w


def quantize_cpu(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    from ...quant.fast_cpu import quantize_4bit_fast

    return quantize_outputs(quantize_4bit_fast(x, quant_type, blocksize, double_quant, name, workers=workers or None), x.device)


#: What the CPU dispatch key runs for each op (quantize, dequantize, the product and its input gradient).
KERNELS = {
    "dequantize_4bit": dequantize_cpu,
    "matmul_4bit": matmul_cpu,
    "grad_input_4bit": grad_input_cpu,
    "quantize_4bit": quantize_cpu,
}
