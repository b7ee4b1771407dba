"""A Linear layer over a frozen 4-bit weight, for inference and LoRA training.

``Linear4bit`` subclasses ``nn.Linear`` (with ``in_features``/``out_features``), so PEFT wraps it with
its standard LoRA layer and ``target_modules="all-linear"`` finds it. ``weight`` holds the packed
uint8 codes (frozen); the block scales and tables are buffers. Inputs are cast to the compute dtype,
as bitsandbytes' Linear4bit does, and the output is cast back to the input dtype. The weight the
matmul uses is the 4-bit weight's value in its logical dtype (``weight_dtype``), converted to the
compute dtype (spec section 8): at float32 compute, a bfloat16 weight's value widened.

It also takes the place of a GPT-2 style ``Conv1D`` (weight stored [in, out]): the 4-bit tensor
holds that weight's transpose, [out, in] (spec section 10), so ``x @ W.T + b`` is what the Conv1D
computed. ``from_conv1d`` records it, for the adapters and merges written for the 16-bit model.

With the ``auto`` backend the forward is one call of the custom op ``torch.ops.qconvert.matmul_4bit``
(qconvert.ops) over the module's current tensors: the dispatcher picks the kernels from their device,
so a moved module computes with its new device's kernels, and torch.compile sees one opaque op with a
fake implementation. A forced backend object (``--backend reference``, ``triton``, ``bitsandbytes``)
is called directly instead.

Backward reaches the input (that is what LoRA needs below the adapter) and saves nothing but the
module's own tensors (the op's registered autograd) or a reference to the module (the autograd
function below, for forced backends): the input gradient dequantizes the weight again instead of
keeping a dequantized copy alive between forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.layout import QuantizedTensor, dtype_name


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module = module
        ctx.has_bias_grad = bias is not None and bias.requires_grad
        return module.backend.matmul(x, module.quantized(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        m = ctx.module
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = m.backend.dequantize(m.quantized(), grad_out.dtype)
            grad_x = grad_out @ w
            del w
        if ctx.has_bias_grad:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class Linear4bit(nn.Linear):
    """y = x @ dequant(W4).T + b, with W4 frozen in the packed 4-bit format."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, backend, compute_dtype: torch.dtype, *,
                 from_conv1d: bool = False):
        nn.Module.__init__(self)
        if len(qt.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D, got shape {list(qt.shape)}")
        self.out_features, self.in_features = qt.shape
        self.weight = nn.Parameter(qt.packed, requires_grad=False)
        self.register_buffer("absmax", qt.absmax)
        self.register_buffer("quant_map", qt.quant_map)
        self.register_buffer("nested_absmax", qt.nested_absmax)
        self.register_buffer("nested_quant_map", qt.nested_quant_map)
        self.nested_offset = qt.nested_offset
        self.quant_type = qt.quant_type
        self.blocksize = qt.blocksize
        self.weight_dtype = qt.dtype
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.backend = backend
        self.compute_dtype = compute_dtype
        #: this layer stands in for a GPT-2 style Conv1D of the 16-bit model (weight stored [in, out] there):
        #: a LoRA adapter trained on it is saved with PEFT's fan_in_fan_out=True, merged weights transposed back
        self.from_conv1d = from_conv1d

    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over this module's current (possibly moved) tensors."""
        return QuantizedTensor(
            packed=self.weight.data,
            absmax=self.absmax,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            quant_map=self.quant_map,
            nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map,
            nested_offset=self.nested_offset,
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.backend.dequantize(self.quantized(), dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        xc = x.to(self.compute_dtype)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        if getattr(self.backend, "dispatches", False):
            offset = float(self.nested_offset) if self.nested_absmax is not None else 0.0
            y = torch.ops.qconvert.matmul_4bit(
                xc, self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, offset,
                self.blocksize, [self.out_features, self.in_features], self.weight_dtype, bias,
            )
        elif torch.is_grad_enabled() and (xc.requires_grad or (bias is not None and bias.requires_grad)):
            y = _Matmul4bit.apply(xc, bias, self)
        else:
            y = self.backend.matmul(xc, self.quantized(), bias)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
            f"compute_dtype={dtype_name(self.compute_dtype)}, backend={self.backend.name}"
        )
