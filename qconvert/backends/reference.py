"""The reference backend: the format's reference math, in plain torch, on any device."""

from __future__ import annotations

import torch

from ..format.layout import QuantizedTensor
from ..quant.reference import dequantize_4bit_ref
from . import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_4bit_ref(qt, dtype)
