"""bitsandbytes' own kernels as a kernel family, for comparison and benchmarks (``--backend
bitsandbytes``; never chosen by device).

Note: bitsandbytes 0.50's CPU dequantize kernel mis-reads block scales when a weight's row length is
a multiple of 16 but not of the block size, and its native CPU path returns -0.0 for FP4 nibble 0x8
(spec section 11); on CPU this family inherits both.

``dequantize_4bit`` returns the logical dtype's value (bf16(code * scale) for a bfloat16 weight);
another dtype is that value converted, which is the normative reading (spec section 8).
"""

from __future__ import annotations

import torch

from ..format.layout import QuantizedTensor
from .args import as_quantized


def bnb_state(qt: QuantizedTensor):
    """bitsandbytes' QuantState over a QuantizedTensor's tensors (no copy)."""
    import bitsandbytes.functional as F

    kw = {}
    if qt.double_quant:
        state2 = F.QuantState(absmax=qt.nested_absmax, code=qt.nested_quant_map, blocksize=qt.nested_blocksize, dtype=torch.float32)
        kw = dict(offset=torch.tensor(qt.nested_offset, dtype=torch.float32, device=qt.absmax.device), state2=state2)
    return F.QuantState(
        absmax=qt.absmax, shape=torch.Size(qt.shape), code=qt.quant_map, blocksize=qt.blocksize,
        quant_type=qt.quant_type, dtype=qt.dtype, **kw,
    )


def _quant_type(quant_map: torch.Tensor) -> str:
    """The quant type whose codebook ``quant_map`` is: the ops carry the table, bitsandbytes wants the name."""
    from ..format.constants import codebook
    from ..names import QUANT_TYPES

    table = quant_map.detach().float().cpu()
    return next((t for t in QUANT_TYPES if torch.equal(table, codebook(t))), "nf4")


def dequantize_bnb(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype, dtype) -> torch.Tensor:
    import bitsandbytes.functional as F

    qt = as_quantized(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape, logical_dtype)
    qt.quant_type = _quant_type(quant_map)
    return F.dequantize_4bit(qt.packed, bnb_state(qt)).reshape(qt.shape).to(dtype)


def matmul_bnb(x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
               logical_dtype, bias) -> torch.Tensor:
    w = dequantize_bnb(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                       logical_dtype, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def grad_input_bnb(grad_out, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                   logical_dtype) -> torch.Tensor:
    w = dequantize_bnb(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, shape,
                       logical_dtype, grad_out.dtype)
    return grad_out @ w


#: What ``--backend bitsandbytes`` forces (quantization always runs on qconvert's own kernels).
KERNELS = {"dequantize_4bit": dequantize_bnb, "matmul_4bit": matmul_bnb, "grad_input_4bit": grad_input_bnb}
