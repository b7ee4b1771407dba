"""The reference kernels: :mod:`qconvert.quant.reference`'s math over the ops' arguments.

The default kernel of every op (any device without a kernel family of its own), and what
``--backend reference`` forces on every device (CI and numerics debugging). The quant module's
functions are looked up at each call, so a test can count their calls.
"""

from __future__ import annotations

import torch

from .args import as_quantized, quantize_outputs


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


def grad_input_reference(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                         shape, logical_dtype) -> torch.Tensor:
    w = dequantize_reference(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                             logical_dtype, grad_out.dtype)
    return grad_out @ w


def quantize_reference(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    from ..quant.reference import quantize_4bit_ref

    return quantize_outputs(quantize_4bit_ref(x, quant_type, blocksize, double_quant, name), x.device)


#: What this family registers (qconvert/ops/__init__.py): every op, as the default kernel.
KERNELS = {
    "dequantize_4bit": dequantize_reference,
    "matmul_4bit": matmul_reference,
    "grad_input_4bit": grad_input_reference,
    "quantize_4bit": quantize_reference,
}
