"""The Triton kernels of qconvert's ops, over the ops' plain arguments: the CUDA dispatch key's
kernels, and what ``--backend triton`` forces on any device (on CPU under TRITON_INTERPRET=1).

Triton is imported on the first call, never at import. Without Triton installed each kernel falls
back: dequantize and the product to the reference, quantize to the fast CPU quantizer.
"""

from __future__ import annotations

import torch

from ..args import as_quantized, quantize_outputs
from ..reference import dequantize_reference, matmul_reference

_LAUNCHER = None


def _triton():
    """The Triton launcher (imports triton: on the first call, never at import)."""
    global _LAUNCHER
    if _LAUNCHER is None:
        from .launch import Launcher

        _LAUNCHER = Launcher()
    return _LAUNCHER


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


def grad_input_triton(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize,
                      shape, logical_dtype) -> torch.Tensor:
    """``grad_out @ W``, the weight from the one-pass dequantize kernel, the product by the vendor
    matmul (cuBLAS on a GPU)."""
    w = dequantize_triton(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                          logical_dtype, grad_out.dtype)
    return grad_out @ w


def quantize_triton(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    """The Triton quantize kernel on x's device for the codes and float32 scales (bit-identical to
    the reference), then the scales' double quantization on the CPU with the fast path's fixed
    summation order (n / blocksize floats: the bytes do not depend on where the weight was)."""
    if not _triton_available():
        return quantize_via_cpu(x, quant_type, blocksize, double_quant, name, workers)
    from ...quant.fast_cpu import MEAN_THREADS, mean_in_torch_order
    from ...quant.reference import assemble, check_quantizable

    check_quantizable(x, name, quant_type, blocksize)
    packed, absmax = _triton().quantize_blocks(x, quant_type, blocksize)
    absmax = absmax.cpu()
    offset = mean_in_torch_order(absmax, MEAN_THREADS) if double_quant else None
    return quantize_outputs(assemble(x, packed, absmax, quant_type, blocksize, double_quant, name, offset), x.device)


def quantize_via_cpu(x, quant_type, blocksize, double_quant, name, workers=0) -> tuple:
    """The fast CPU quantizer for a tensor on another device, results copied back: bit-identical to
    the reference, and far faster than the reference's bucketize on a GPU."""
    from ...quant.fast_cpu import quantize_4bit_fast

    return quantize_outputs(quantize_4bit_fast(x.cpu(), quant_type, blocksize, double_quant, name, workers=workers or None), x.device)


#: What the CUDA dispatch key runs (and ``--backend triton`` forces) for each op.
KERNELS = {
    "dequantize_4bit": dequantize_triton,
    "matmul_4bit": matmul_triton,
    "grad_input_4bit": grad_input_triton,
    "quantize_4bit": quantize_triton,
}
