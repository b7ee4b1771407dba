"""The ops' plain arguments and a :class:`QuantizedTensor`, converted both ways.

Every kernel family (reference, cpu, triton, bitsandbytes) takes the weight as the ops' schema
gives it (packed ... logical_dtype) and computes on a QuantizedTensor; quantize kernels return
their result as the op's six tensors. One converter each way, here, so the families cannot
disagree on the order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..format.layout import QuantizedTensor


def weight_args(qt: QuantizedTensor) -> tuple:
    """The weight arguments of dequantize_4bit/matmul_4bit/grad_input_4bit for a QuantizedTensor,
    in schema order (packed ... logical_dtype)."""
    return (qt.packed, qt.absmax, qt.quant_map, qt.nested_absmax, qt.nested_quant_map,
            float(qt.nested_offset) if qt.double_quant else 0.0, qt.blocksize, list(qt.shape), qt.dtype)


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


def quantize_outputs(qt: QuantizedTensor, device: torch.device) -> tuple:
    """quantize_4bit's outputs from a QuantizedTensor (empty nested tensors without double quant)."""
    if qt.double_quant:
        nested = (qt.nested_absmax, qt.nested_quant_map, torch.tensor(qt.nested_offset, dtype=torch.float32))
    else:
        nested = (torch.empty(0), torch.empty(0), torch.zeros((), dtype=torch.float32))
    # the tables may be shared, cached tensors: an op's outputs must be its own
    return tuple(t.to(device) for t in (qt.packed, qt.absmax, qt.quant_map.clone(), nested[0], nested[1].clone(), nested[2]))
