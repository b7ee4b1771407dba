"""The CPU kernels of qconvert's ops: the fast CPU quantizer and dequantizer (quant/fast_cpu.py,
quant/fast_dequant.py), bit-identical to the reference, and the products built on them.

:data:`KERNELS` at the end is the one place where the CPU implementation of each op is chosen
(qconvert/ops/__init__.py registers it for the CPU dispatch key). Nothing here imports Triton.
"""

from __future__ import annotations

import threading

import torch

from ..args import as_quantized, quantize_outputs


def dequantize_cpu(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype, dtype) -> torch.Tensor:
    """The fast CPU dequantizer (quant/fast_dequant.py): the reference's values, bit for bit."""
    from ...quant.fast_dequant import dequantize_4bit_fast

    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    return dequantize_4bit_fast(qt, dtype)


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
                      blocksize, shape, logical_dtype) -> torch.Tensor:
    """The weight in ``dtype`` by the fast CPU dequantizer, for a product that only reads it: in this
    thread's reused buffer when it fits :data:`SCRATCH_LIMIT` (fresh memory costs a page fault per
    4 KiB, measured as much as the decoding itself on a 4096x4096 weight, and most of the input
    gradient's time in a small model's training step), else in a new tensor."""
    from ...quant.fast_dequant import dequantize_4bit_fast

    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    reuse = packed.device.type == "cpu" and qt.numel * dtype.itemsize <= SCRATCH_LIMIT
    return dequantize_4bit_fast(qt, dtype, out=_scratch(qt.numel, dtype) if reuse else None).view(qt.shape)


def matmul_cpu(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
               logical_dtype, bias) -> torch.Tensor:
    """The fast CPU dequantizer, then ``F.linear``: the reference's result, bit for bit. The weight
    is a temporary here (autograd saves only the packed tensors)."""
    w = _temporary_weight(x.dtype, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                          shape, logical_dtype)
    return torch.nn.functional.linear(x, w, bias)


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
