"""qconvert's 4-bit ops as PyTorch custom operators: ``torch.ops.qconvert.*``, dispatched by device.

=====================================  ===========================================================
op                                     kernels
=====================================  ===========================================================
``qconvert::dequantize_4bit``          default: the reference (qconvert.quant.reference), any
                                       device; CUDA: the Triton kernel (triton_backend.py)
``qconvert::matmul_4bit``              default: reference dequantize, then ``F.linear``; CUDA: the
                                       fused Triton kernel up to SMALL_BATCH rows, else Triton
                                       dequantize, then ``F.linear``. Autograd: input and bias
                                       gradients, the weight dequantized again in backward.
``qconvert::quantize_4bit``            default: the reference; CPU: the fast quantizer
                                       (quant/fast_cpu.py), bit-identical; CUDA: the same fast
                                       CPU quantizer, results copied back (there is no Triton
                                       quantize kernel yet, and the reference is slow on a GPU)
=====================================  ===========================================================

Every argument is a plain tensor or scalar (packed codes, absmax as uint8 or float32, nested
absmax, code tables, offset, blocksize, shape, dtypes), so the schemas are simple and each op has a
fake (meta) implementation for torch.compile and FSDP's meta-device paths. The dispatcher picks the
kernel from the tensors' device, so a module moved with ``.to(...)`` computes with its new device's
kernels. A forced choice (``--backend reference`` / QCONVERT_BACKEND) bypasses the dispatcher: see
qconvert.backends.

Importing this module registers the ops (it is imported on first use, by qconvert.backends'
device backend); it imports no Triton and initializes no CUDA: the CUDA kernels import their
launcher when first called. :func:`stand_in` lets tests run the CUDA kernels on CPU tensors under
TRITON_INTERPRET=1.

Where things go: a new kernel for an existing op is one ``register_kernel(device)`` below over a
function in :mod:`qconvert.ops.impl` (launch code beside its ``kernels_*.py``); a new quant type
changes the tables and the reference (qconvert.format.constants, qconvert.quant.reference) and the
kernels that cannot read it, not these schemas.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from . import impl

__all__ = ["dequantize_4bit", "matmul_4bit", "quantize_4bit", "stand_in", "weight_args"]


@torch.library.custom_op("qconvert::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, nested_absmax: Optional[torch.Tensor],
    nested_quant_map: Optional[torch.Tensor], nested_offset: float, blocksize: int, shape: Sequence[int],
    logical_dtype: torch.dtype, dtype: torch.dtype,
) -> torch.Tensor:
    """The weight's logical value (spec section 8) converted to ``dtype``. Default: the reference."""
    return impl.dequantize_reference(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                     shape, logical_dtype, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("qconvert::matmul_4bit", mutates_args=())
def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, nested_absmax: Optional[torch.Tensor],
    nested_quant_map: Optional[torch.Tensor], nested_offset: float, blocksize: int, shape: Sequence[int],
    logical_dtype: torch.dtype, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x @ W.T + bias`` in x's dtype, W the 4-bit weight's logical value. Default: the reference."""
    return impl.matmul_reference(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                                 shape, logical_dtype, bias)


@matmul_4bit.register_fake
def _(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _matmul_setup_context(ctx, inputs, output):
    x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, bias = inputs
    # the module's own tensors, not a dequantized copy: backward dequantizes again
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_quant_map)
    ctx.scalars = (nested_offset, blocksize, tuple(shape), logical_dtype)


def _matmul_backward(ctx, grad_out):
    packed, absmax, quant_map, nested_absmax, nested_quant_map = ctx.saved_tensors
    nested_offset, blocksize, shape, logical_dtype = ctx.scalars
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.qconvert.dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                                               blocksize, shape, logical_dtype, grad_out.dtype)
        grad_x = grad_out @ w
    if ctx.needs_input_grad[10]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias


matmul_4bit.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


@torch.library.custom_op("qconvert::quantize_4bit", mutates_args=())
def quantize_4bit(
    x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset) of ``x``; without
    double quantization the nested tensors are empty and the offset 0. Default: the reference."""
    return impl.quantize_reference(x, quant_type, blocksize, double_quant, name)


@quantize_4bit.register_fake
def _(x, quant_type, blocksize, double_quant, name):
    n = x.numel()
    nblocks = -(-n // blocksize)
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        x.new_empty((nblocks,), dtype=torch.uint8 if double_quant else torch.float32),
        x.new_empty((16,), **f32),
        x.new_empty((-(-nblocks // impl.NESTED_BLOCKSIZE) if double_quant else 0,), **f32),
        x.new_empty((256 if double_quant else 0,), **f32),
        x.new_empty((), **f32),
    )


# device kernels: each registers only what it speeds up over the default
dequantize_4bit.register_kernel("cuda")(impl.dequantize_triton)
matmul_4bit.register_kernel("cuda")(impl.matmul_triton)
quantize_4bit.register_kernel("cpu")(impl.quantize_cpu)
quantize_4bit.register_kernel("cuda")(impl.quantize_via_cpu)


def weight_args(qt) -> tuple:
    """The weight arguments of dequantize_4bit/matmul_4bit for a QuantizedTensor, in schema order
    (packed ... logical_dtype)."""
    return (qt.packed, qt.absmax, qt.quant_map, qt.nested_absmax, qt.nested_quant_map,
            float(qt.nested_offset) if qt.double_quant else 0.0, qt.blocksize, list(qt.shape), qt.dtype)


@contextmanager
def stand_in(device_type: str = "cpu", kernels: str = "triton") -> Iterator[None]:
    """Within the block, tensors on ``device_type`` take the ``kernels`` ("triton": what CUDA
    tensors get) for dequantize_4bit and matmul_4bit. For tests without a GPU: with
    TRITON_INTERPRET=1, CPU tensors run the CUDA path's Triton kernels in the interpreter."""
    if kernels != "triton":
        raise ValueError(f"unknown kernels {kernels!r}: only 'triton' can stand in")
    ops = ((dequantize_4bit, impl.dequantize_triton), (matmul_4bit, impl.matmul_triton))
    for op, fn in ops:
        op.register_kernel(device_type)(fn)
        op._disabled_kernel.discard(device_type)  # a kernel disabled before stays disabled when re-registered
    try:
        yield
    finally:
        for op, _ in ops:
            op._disabled_kernel.add(device_type)  # back to the default kernel (torch: set_kernel_enabled(False))
