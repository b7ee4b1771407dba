"""The ``auto`` backend: qconvert's custom ops (qconvert.ops), which pick their kernels from the
tensors' device at every call. Importing this module registers the ops."""

from __future__ import annotations

import torch

from .. import ops
from ..format.layout import QuantizedTensor
from . import Backend


class DeviceBackend(Backend):
    name = "auto"
    #: Linear4bit calls the op directly (its autograd is registered on the op), not _Matmul4bit
    dispatches = True

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.qconvert.dequantize_4bit(*ops.weight_args(qt), dtype)

    def matmul(self, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.qconvert.matmul_4bit(x, *ops.weight_args(qt), bias)
