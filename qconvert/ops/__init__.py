"""qconvert's 4-bit ops as PyTorch custom operators: ``torch.ops.qconvert.*``, dispatched by device.

=====================================  ===========================================================
op                                     kernels
=====================================  ===========================================================
``qconvert::dequantize_4bit``          default: the reference (ops/reference.py), any device;
                                       CPU: the compiled kernel (ops/native), else the fast
                                       dequantizer (ops/cpu/), both bit-identical;
                                       CUDA: the Triton kernel (ops/triton/)
``qconvert::matmul_4bit``              default: reference dequantize, then ``F.linear``; CPU: the
                                       compiled fused kernel up to ops.cpu.kernels.GEMV_ROWS (or _BY32) rows (within
                                       GEMV_REL), else the CPU dequantizer into a reused buffer,
                                       then ``F.linear`` (the same result); CUDA: the fused Triton kernel up to
                                       SMALL_BATCH rows, else Triton dequantize, then ``F.linear``.
                                       Autograd (the one backward, below): input and bias
                                       gradients, the weight dequantized again by grad_input_4bit.
``qconvert::grad_input_4bit``          ``grad_out @ W``, matmul_4bit's input gradient, by the same
                                       family's dequantize (CPU: into the reused buffer).
``qconvert::quantize_4bit``            default: the reference; CPU: the fast quantizer
                                       (quant/fast_cpu.py), bit-identical; CUDA: the Triton
                                       kernel (ops/triton/kernels_quant.py) for codes and scales,
                                       the scales' double quantization on the CPU path
                                       (bit-identical); the fast CPU quantizer without Triton
=====================================  ===========================================================

Every argument is a plain tensor, scalar or string (packed codes, absmax as uint8 or float32,
nested absmax, code tables, offset, blocksize, shape, dtypes), so the schemas are simple and each op
has a fake (meta) implementation for torch.compile and FSDP's meta-device paths. The dispatcher picks
the kernel family from the tensors' device, so a module moved with ``.to(...)`` computes with its
new device's kernels. The ``kernels`` argument (default "auto") forces one family on every device
(``--backend reference`` / QCONVERT_BACKEND, checked by :mod:`.choice`): one op, one autograd and
one backward whichever kernels compute.

Kernel families, each beside its table of kernels (``KERNELS``): :mod:`.reference`, ``cpu/``
(:mod:`.cpu.kernels`), ``triton/`` (:mod:`.triton.kernels`; the ``@triton.jit`` code in
``kernels_*.py``, its launch in ``launch.py``) and :mod:`.bnb` (bitsandbytes, forced only).
:data:`FAMILIES` and :data:`DEVICES` below are the one registration of them all.

Importing this module registers the ops; it is imported on first use (by qconvert.nn's modules and
by conversion), never by ``import qconvert``. It imports no Triton and initializes no CUDA: the
CUDA kernels import their launcher when first called. :func:`stand_in` lets tests run the CUDA
kernels on CPU tensors under TRITON_INTERPRET=1.

Where things go: a new kernel for an existing op is one entry in its family's ``KERNELS`` (a new
family, or a new device, is one more row of FAMILIES / DEVICES); a new quant type changes the
tables and the reference (qconvert.format.constants, qconvert.quant.reference) and the kernels that
cannot read it, not these schemas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..errors import OptionError
from ..format.layout import entries
from . import bnb, reference
from .args import weight_args
from .cpu import kernels as cpu
from .triton import kernels as triton

__all__ = ["dequantize", "dequantize_into", "dequantize_4bit", "matmul", "matmul_4bit", "quantize", "quantize_4bit", "stand_in"]


#: qconvert's op library. Defined with torch.library.Library rather than torch.library.custom_op:
#: custom_op wraps each kernel in torch._disable_dynamo, whose first call imports torch._dynamo and,
#: through it, Triton (seconds, and a conversion must not load Triton: tests/test_import_light.py).
_LIB = torch.library.Library("qconvert", "DEF")

_WEIGHT = ("Tensor packed, Tensor absmax, Tensor quant_map, Tensor? nested_absmax, Tensor? nested_quant_map, "
           "float nested_offset, int blocksize, int[] shape, ScalarType logical_dtype")
_LIB.define(f"dequantize_4bit({_WEIGHT}, ScalarType dtype, str kernels='auto') -> Tensor")
_LIB.define(f"matmul_4bit(Tensor x, {_WEIGHT}, Tensor? bias, str kernels='auto') -> Tensor")
_LIB.define(f"grad_input_4bit(Tensor grad_out, {_WEIGHT}, str kernels='auto') -> Tensor")
_LIB.define("quantize_4bit(Tensor x, str quant_type, int blocksize, bool double_quant, str name, int workers=0) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
#: dequantize_4bit: the weight's logical value (spec section 8) converted to ``dtype``.
#: matmul_4bit: ``x @ W.T + bias`` in x's dtype, W the 4-bit weight's logical value.
#: grad_input_4bit: ``grad_out @ W`` in grad_out's dtype (matmul_4bit's input gradient; not differentiable).
#: quantize_4bit: (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset) of x;
#: without double quantization the nested tensors are empty and the offset 0. ``name`` labels
#: errors; ``workers``: CPU threads for a kernel that uses them (0: the CPUs available; the bytes
#: never depend on it). ``kernels``: "auto" (the device's family) or a family of FAMILIES forced.

#: The kernel families by name: the name a forced choice gives (qconvert.names.BACKEND_NAMES), and "cpu".
FAMILIES: dict[str, dict[str, Callable]] = {
    "reference": reference.KERNELS, "cpu": cpu.KERNELS, "triton": triton.KERNELS, "bitsandbytes": bnb.KERNELS,
}
#: The family each dispatch key runs when no family is forced: the reference is every op's default.
DEVICES = {"CompositeExplicitAutograd": "reference", "CPU": "cpu", "CUDA": "triton"}
#: Arguments of each op's schema, its trailing ``kernels`` included (quantize_4bit has none).
_ARITY = {"dequantize_4bit": 11, "matmul_4bit": 12, "grad_input_4bit": 11}


def _kernel(op: str, family: str) -> Callable:
    """The kernel registered for ``op`` on a dispatch key whose own family is ``family``: that
    family's, or the one the call's ``kernels`` argument forces. Looked up at each call (a test can
    swap an entry); a family without the op computes it with the reference."""
    arity = _ARITY.get(op)

    def run(*args):
        kernels = "auto"
        if arity is not None and len(args) == arity:
            *args, kernels = args
        if kernels != "auto" and kernels not in FAMILIES:
            raise OptionError(f"unknown kernels {kernels!r}", hint=f"use auto or one of {', '.join(FAMILIES)}")
        return FAMILIES[family if kernels == "auto" else kernels].get(op, reference.KERNELS[op])(*args)

    return run


def _register(lib: torch.library.Library, key: str, family: str) -> None:
    for op in reference.KERNELS:
        lib.impl(op, _kernel(op, family), key)


for _key, _family in DEVICES.items():
    _register(_LIB, _key, _family)


@torch.library.register_fake("qconvert::dequantize_4bit", lib=_LIB)
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, dtype,
      kernels="auto"):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("qconvert::matmul_4bit", lib=_LIB)
def _(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, bias,
      kernels="auto"):
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
def _(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype,
      kernels="auto"):
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))


def _matmul_setup_context(ctx, inputs, output):
    _, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype, _ = inputs[:11]
    # the module's own tensors, not a dequantized copy: backward dequantizes again
    ctx.save_for_backward(packed, absmax, quant_map, nested_absmax, nested_quant_map)
    ctx.scalars = (nested_offset, blocksize, list(shape), logical_dtype, inputs[11] if len(inputs) > 11 else "auto")


def _matmul_backward(ctx, grad_out):
    """matmul_4bit's one backward, for every kernel family: the input gradient by grad_input_4bit
    (the family's kernels), the bias gradient a sum; the weight is frozen."""
    packed, absmax, quant_map, nested_absmax, nested_quant_map = ctx.saved_tensors
    nested_offset, blocksize, shape, logical_dtype, kernels = ctx.scalars
    weight = (packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0] and not torch.is_grad_enabled():  # the usual backward: one op, per-device kernels
        grad_x = torch.ops.qconvert.grad_input_4bit(grad_out, *weight, kernels)
    elif ctx.needs_input_grad[0]:  # create_graph: differentiable ops, so the gradient has a gradient
        grad_x = grad_out @ torch.ops.qconvert.dequantize_4bit(*weight, grad_out.dtype, kernels)
    if ctx.needs_input_grad[10]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias, None


torch.library.register_autograd("qconvert::matmul_4bit", _matmul_backward, setup_context=_matmul_setup_context, lib=_LIB)

_STANDING_IN = [0]  # stand_in blocks open: the CPU dispatch key runs other kernels, so matmul_no_grad steps aside


def matmul_no_grad(x: torch.Tensor, weight: tuple, bias: torch.Tensor | None, kernels: str, kept=None):
    """:func:`matmul_4bit` of ``x`` and the weight arguments ``weight`` (packed ... logical_dtype)
    computed by the CPU kernels without the dispatcher and autograd, where that gives what the op
    would: CPU tensors, the CPU kernels chosen ("auto" or "cpu", no :func:`stand_in`, the table not
    swapped), plain tensors under no tracing or dispatch mode (torch.compile, FakeTensor, vmap see
    the op), and no gradient wanted (grad mode off, or neither x nor bias requires one). Generation
    and eval call a 4-bit layer hundreds of times a second on small inputs, where the dispatcher
    and autograd cost as much as the product. ``kept``: what the last call returned for this
    weight (the compiled kernels' checked arguments). Returns (result, what to keep), or None:
    call the op."""
    if (kernels not in ("auto", "cpu") or not x.is_cpu or not weight[0].is_cpu or _STANDING_IN[0]
            or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            or type(x) is not torch.Tensor or type(weight[0]) not in (torch.Tensor, torch.nn.Parameter)
            or FAMILIES["cpu"].get("matmul_4bit") is not cpu.matmul_cpu or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()):
        return None
    return cpu.matmul_cpu_kept(kept, x, weight, bias)


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


def dequantize(qt, dtype: torch.dtype, kernels: str = "auto") -> torch.Tensor:
    """:func:`dequantize_4bit` of a :class:`qconvert.format.layout.QuantizedTensor`."""
    return torch.ops.qconvert.dequantize_4bit(*weight_args(qt), dtype, kernels)


def dequantize_into(qt, out: torch.Tensor, kernels: str = "auto") -> torch.Tensor | None:
    """:func:`dequantize` written into ``out`` (contiguous, the weight's size, the dtype wanted), for
    a caller that reuses one buffer across weights; only where the CPU kernels would compute it (CPU
    tensors, ``kernels`` "auto" or "cpu"), else None: call :func:`dequantize`."""
    if kernels not in ("auto", "cpu") or qt.packed.device.type != "cpu" or out.device.type != "cpu":
        return None
    return cpu.dequantize_cpu_into(out, *weight_args(qt))


def matmul(x: torch.Tensor, qt, bias: torch.Tensor | None = None, kernels: str = "auto") -> torch.Tensor:
    """:func:`matmul_4bit`: ``x @ W.T + bias`` for a QuantizedTensor ``W`` (differentiable in x and bias)."""
    return torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), bias, kernels)


@contextmanager
def stand_in(device_type: str = "cpu", kernels: str = "triton") -> Iterator[None]:
    """Within the block, tensors on ``device_type`` take the ``kernels`` ("triton": what CUDA
    tensors get) for dequantize_4bit, matmul_4bit, grad_input_4bit and quantize_4bit. For tests without a GPU: with
    TRITON_INTERPRET=1, CPU tensors run the CUDA path's Triton kernels in the interpreter."""
    if kernels != "triton":
        raise ValueError(f"unknown kernels {kernels!r}: only 'triton' can stand in")
    lib = torch.library.Library("qconvert", "IMPL")  # a fragment, removed on exit
    _register(lib, torch._C._dispatch_key_for_device(device_type), kernels)
    _STANDING_IN[0] += 1
    try:
        yield
    finally:
        _STANDING_IN[0] -= 1
        lib._destroy()
