"""The kernels behind qconvert's ops (qconvert/ops/__init__.py), over the ops' plain arguments.

One function per (op, kernel family); the ops register them per device, and the forced backends of
qconvert.backends call the same math. Nothing here imports Triton at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..format.layout import QuantizedTensor


def as_quantized(
    packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None, nested_offset: float, blocksize: int, shape: Sequence[int], logical_dtype: torch.dtype,
) -> QuantizedTensor:
    """A QuantizedTensor over the ops' arguments (quant_type is not needed: quant_map is the table)."""
    dq = nested_absmax is not None
    return QuantizedTensor(
        packed=packed, absmax=absmax, shape=tuple(shape), dtype=logical_dtype, quant_type="nf4", blocksize=blocksize,
        quant_map=quant_map, nested_absmax=nested_absmax, nested_quant_map=nested_quant_map if dq else None,
        nested_offset=nested_offset if dq else None,
    )


def dequantize_reference(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                         logical_dtype, dtype) -> torch.Tensor:
    from ..quant.reference import dequantize_4bit_ref

    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    return dequantize_4bit_ref(qt, dtype)


def matmul_reference(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                     logical_dtype, bias) -> torch.Tensor:
    w = dequantize_reference(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                             logical_dtype, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def dequantize_cpu(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype, dtype) -> torch.Tensor:
    """The fast CPU dequantizer (quant/fast_dequant.py): the reference's values, bit for bit."""
    from ..quant.fast_dequant import dequantize_4bit_fast

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
    from ..quant.fast_dequant import dequantize_4bit_fast

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


def grad_input_dispatched(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                          shape, logical_dtype) -> torch.Tensor:
    """``grad_out @ W`` with the weight from the dequantize_4bit op (the device's kernel)."""
    w = torch.ops.qconvert.dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                                           blocksize, shape, logical_dtype, grad_out.dtype)
    return grad_out @ w


_TRITON = None


def _triton():
    """The Triton launcher (imports triton: on the first CUDA call, never at import)."""
    global _TRITON
    if _TRITON is None:
        from ..backends.triton_backend import TritonBackend

        _TRITON = TritonBackend()
    return _TRITON


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def dequantize_triton(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                      logical_dtype, dtype) -> torch.Tensor:
    if not _triton_available():
        return dequantize_reference(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                    shape, logical_dtype, dtype)
    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    return _triton().dequantize(qt, dtype)


def matmul_triton(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                  logical_dtype, bias) -> torch.Tensor:
    if not _triton_available():
        return matmul_reference(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                shape, logical_dtype, bias)
    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    return _triton().matmul(x, qt, bias)


def _unpack(qt: QuantizedTensor, device: torch.device) -> tuple:
    """quantize_4bit's outputs from a QuantizedTensor (empty nested tensors without double quant)."""
    if qt.double_quant:
        nested = (qt.nested_absmax, qt.nested_quant_map, torch.tensor(qt.nested_offset, dtype=torch.float32))
    else:
        nested = (torch.empty(0), torch.empty(0), torch.zeros((), dtype=torch.float32))
    # the tables may be shared, cached tensors: an op's outputs must be its own
    return tuple(t.to(device) for t in (qt.packed, qt.absmax, qt.quant_map.clone(), nested[0], nested[1].clone(), nested[2]))


def quantize_reference(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    from ..quant.reference import quantize_4bit_ref

    return _unpack(quantize_4bit_ref(x, quant_type, blocksize, double_quant, name), x.device)


def quantize_cpu(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    from ..quant.fast_cpu import quantize_4bit_fast

    return _unpack(quantize_4bit_fast(x, quant_type, blocksize, double_quant, name, workers=workers or None), x.device)


def quantize_triton(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    """The Triton quantize kernel on x's device for the codes and float32 scales (bit-identical to
    the reference), then the scales' double quantization on the CPU with the fast path's fixed
    summation order (n / blocksize floats: the bytes do not depend on where the weight was)."""
    if not _triton_available():
        return quantize_via_cpu(x, quant_type, blocksize, double_quant, name, workers)
    from ..quant.fast_cpu import MEAN_THREADS, mean_in_torch_order
    from ..quant.reference import assemble, check_quantizable

    check_quantizable(x, name, quant_type, blocksize)
    packed, absmax = _triton().quantize_blocks(x, quant_type, blocksize)
    absmax = absmax.cpu()
    offset = mean_in_torch_order(absmax, MEAN_THREADS) if double_quant else None
    return _unpack(assemble(x, packed, absmax, quant_type, blocksize, double_quant, name, offset), x.device)


def quantize_via_cpu(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    """The fast CPU quantizer for a tensor on another device, results copied back: bit-identical to
    the reference, and far faster than the reference's bucketize on a GPU."""
    from ..quant.fast_cpu import quantize_4bit_fast

    return _unpack(quantize_4bit_fast(x.cpu(), quant_type, blocksize, double_quant, name, workers=workers or None), x.device)
