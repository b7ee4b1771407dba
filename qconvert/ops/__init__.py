"""qconvert's 4-bit ops as PyTorch custom operators: ``torch.ops.qconvert.*``, dispatched by device.

=====================================  ===========================================================
op                                     kernels
=====================================  ===========================================================
``qconvert::dequantize_4bit``          default: the reference (qconvert.quant.reference), any
                                       device; CPU: the compiled kernel (ops/native), else the
                                       fast dequantizer (quant/fast_dequant.py), both
                                       bit-identical; CUDA: the Triton kernel (triton_backend.py)
``qconvert::matmul_4bit``              default: reference dequantize, then ``F.linear``; CPU: the
                                       compiled fused kernel up to impl.GEMV_ROWS rows (within
                                       GEMV_REL), else the CPU dequantizer into a reused buffer,
                                       then ``F.linear`` (the same result); CUDA: the fused Triton kernel up to
                                       SMALL_BATCH rows, else Triton dequantize, then ``F.linear``.
                                       Autograd: input and bias gradients, the weight dequantized
                                       again in backward (by grad_input_4bit).
``qconvert::grad_input_4bit``          ``grad_out @ W``, matmul_4bit's input gradient. default:
                                       the dispatched dequantize_4bit, then the product; CPU: as
                                       matmul_4bit, the weight in the reused buffer.
``qconvert::quantize_4bit``            default: the reference; CPU: the fast quantizer
                                       (quant/fast_cpu.py), bit-identical; CUDA: the Triton
                                       kernel (kernels_quant.py) for codes and scales, the scales'
                                       double quantization on the CPU path (bit-identical); the
                                       fast CPU quantizer when Triton is not installed
=====================================  ===========================================================

Every argument is a plain tensor or scalar (packed codes, absmax as uint8 or float32, nested
absmax, code tables, offset, blocksize, shape, dtypes), so the schemas are simple and each op has a
fake (meta) implementation for torch.compile and FSDP's meta-device paths. The dispatcher picks the
kernel from the tensors' device, so a module moved with ``.to(...)`` computes with its new device's
kernels. A forced choice (``--backend reference`` / QCONVERT_BACKEND) bypasses the dispatcher: see
qconvert.backends.

Importing this module registers the ops; it is imported on first use (by the ``auto`` backend of
qconvert.backends and by conversion), never by ``import qconvert``. It imports no Triton and
initializes no CUDA: the CUDA kernels import their launcher when first called. :func:`stand_in`
lets tests run the CUDA kernels on CPU tensors under TRITON_INTERPRET=1.

Where things go: a new kernel for an existing op is one ``_LIB.impl(op, fn, dispatch_key)`` below
over a function in :mod:`qconvert.ops.impl` (Triton code in ``qconvert/backends/kernels_*.py``,
its launch code beside it); a new quant type changes the tables and the reference
(qconvert.format.constants, qconvert.quant.reference) and the kernels that cannot read it, not
these schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..format.layout import entries
from . import impl

__all__ = ["dequantize_4bit", "matmul_4bit", "quantize", "quantize_4bit", "stand_in", "weight_args"]


#: qconvert's op library. Defined with torch.library.Library rather than torch.library.custom_op:
#: custom_op wraps each kernel in torch._disable_dynamo, whose first call imports torch._dynamo and,
#: through it, Triton (seconds, and a conversion must not load Triton: tests/test_import_light.py).
_LIB = torch.library.Library("qconvert", "DEF")

_WEIGHT = ("Tensor packed, Tensor absmax, Tensor quant_map, Tensor? nested_absmax, Tensor? nested_quant_map, "
           "float nested_offset, int blocksize, int[] shape, ScalarType logical_dtype")
_LIB.define(f"dequantize_4bit({_WEIGHT}, ScalarType dtype) -> Tensor")
_LIB.define(f"matmul_4bit(Tensor x, {_WEIGHT}, Tensor? bias) -> Tensor")
_LIB.define(f"grad_input_4bit(Tensor grad_out, {_WEIGHT}) -> Tensor")
_LIB.define("quantize_4bit(Tensor x, str quant_type, int blocksize, bool double_quant, str name, int workers=0) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
#: dequantize_4bit: the weight's logical value (spec section 8) converted to ``dtype``.
#: matmul_4bit: ``x @ W.T + bias`` in x's dtype, W the 4-bit weight's logical value.
#: grad_input_4bit: ``grad_out @ W`` in grad_out's dtype (matmul_4bit's input gradient; not differentiable).
#: quantize_4bit: (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset) of x;
#: without double quantization the nested tensors are empty and the offset 0. ``name`` labels
#: errors; ``workers``: CPU threads for a kernel that uses them (0: the CPUs available; the bytes
#: never depend on it).

# the default kernels (any device): the reference
_LIB.impl("dequantize_4bit", impl.dequantize_reference, "CompositeExplicitAutograd")
_LIB.impl("matmul_4bit", impl.matmul_reference, "CompositeExplicitAutograd")
_LIB.impl("quantize_4bit", impl.quantize_reference, "CompositeExplicitAutograd")
_LIB.impl("grad_input_4bit", impl.grad_input_dispatched, "CompositeExplicitAutograd")
# device kernels: each registers only what it speeds up over the default
_LIB.impl("dequantize_4bit", impl.dequantize_cpu, "CPU")
_LIB.impl("dequantize_4bit", impl.dequantize_triton, "CUDA")
_LIB.impl("matmul_4bit", impl.matmul_cpu, "CPU")
_LIB.impl("grad_input_4bit", impl.grad_input_cpu, "CPU")
_LIB.impl("matmul_4bit", impl.matmul_triton, "CUDA")
_LIB.impl("quantize_4bit", impl.quantize_cpu, "CPU")
_LIB.impl("quantize_4bit", impl.quantize_triton, "CUDA")


@torch.library.register_fake("qconvert::dequantize_4bit", lib=_LIB)
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("qconvert::matmul_4bit", lib=_LIB)
def _(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("qconvert::quantize_4bit", lib=_LIB)
def _(x, quant_type, blocksize, double_quant, name, workers=0):
    spec = entries(x.numel(), blocksize, double_quant)  # the layout's table; nested entries are empty without double quant
    none = (torch.float32, (0,))

    def empty(suffix: str) -> torch.Tensor:
        dtype, shape = spec.get(suffix, none)
        return x.new_empty(shape, dtype=dtype)

    return (*(empty(s) for s in ("", "absmax", "quant_map", "nested_absmax", "nested_quant_map")), x.new_empty((), dtype=torch.float32))


@torch.library.register_fake("qconvert::grad_input_4bit", lib=_LIB)
def _(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype):
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))


def _matmul_setup_context(ctx, inputs, output):
    _, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, _ = inputs
    # the module's own tensors, not a dequantized copy: backward dequantizes again
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_quant_map)
    ctx.scalars = (nested_offset, blocksize, list(shape), logical_dtype)


def _matmul_backward(ctx, grad_out):
    packed, absmax, quant_map, nested_absmax, nested_quant_map = ctx.saved_tensors
    nested_offset, blocksize, shape, logical_dtype = ctx.scalars
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0] and not torch.is_grad_enabled():  # the usual backward: one op, per-device kernels
        grad_x = torch.ops.qconvert.grad_input_4bit(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map,
                                                    nested_offset, blocksize, shape, logical_dtype)
    elif ctx.needs_input_grad[0]:  # create_graph: differentiable ops, so the gradient has a gradient
        w = torch.ops.qconvert.dequantize_4bit(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                                               blocksize, shape, logical_dtype, grad_out.dtype)
        grad_x = grad_out @ w
    if ctx.needs_input_grad[10]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("qconvert::matmul_4bit", _matmul_backward, setup_context=_matmul_setup_context, lib=_LIB)

dequantize_4bit = torch.ops.qconvert.dequantize_4bit
matmul_4bit = torch.ops.qconvert.matmul_4bit
quantize_4bit = torch.ops.qconvert.quantize_4bit


def quantize(x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, name: str = "tensor",
             workers: int | None = None):
    """:func:`quantize_4bit` on ``x``'s device, as a :class:`qconvert.format.layout.QuantizedTensor`."""
    from ..format.layout import QuantizedTensor

    packed, absmax, quant_map, nested_absmax, nested_map, offset = torch.ops.qconvert.quantize_4bit(
        x, quant_type, blocksize, double_quant, name, workers or 0
    )
    return QuantizedTensor(
        packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, quant_type=quant_type, blocksize=blocksize,
        quant_map=quant_map, nested_absmax=nested_absmax if double_quant else None,
        nested_quant_map=nested_map if double_quant else None, nested_offset=offset.item() if double_quant else None,
    )


def weight_args(qt) -> tuple:
    """The weight arguments of dequantize_4bit/matmul_4bit for a QuantizedTensor, in schema order
    (packed ... logical_dtype)."""
    return (qt.packed, qt.absmax, qt.quant_map, qt.nested_absmax, qt.nested_quant_map,
            float(qt.nested_offset) if qt.double_quant else 0.0, qt.blocksize, list(qt.shape), qt.dtype)


@contextmanager
def stand_in(device_type: str = "cpu", kernels: str = "triton") -> Iterator[None]:
    """Within the block, tensors on ``device_type`` take the ``kernels`` ("triton": what CUDA
    tensors get) for dequantize_4bit, matmul_4bit, grad_input_4bit and quantize_4bit. For tests without a GPU: with
    TRITON_INTERPRET=1, CPU tensors run the CUDA path's Triton kernels in the interpreter
    (grad_input_4bit through the dispatched dequantize_4bit, as on CUDA)."""
    if kernels != "triton":
        raise ValueError(f"unknown kernels {kernels!r}: only 'triton' can stand in")
    lib = torch.library.Library("qconvert", "IMPL")  # a fragment, removed on exit
    key = torch._C._dispatch_key_for_device(device_type)
    lib.impl("dequantize_4bit", impl.dequantize_triton, key)
    lib.impl("matmul_4bit", impl.matmul_triton, key)
    lib.impl("grad_input_4bit", impl.grad_input_dispatched, key)
    lib.impl("quantize_4bit", impl.quantize_triton, key)
    try:
        yield
    finally:
        lib._destroy()
