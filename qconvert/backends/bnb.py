"""bitsandbytes' own kernels behind the backend interface (for comparison and benchmarks).

Note: bitsandbytes 0.50's CPU dequantize kernel mis-reads block scales when a weight's row length is
a multiple of 16 but not of the block size, and its native CPU path returns -0.0 for FP4 nibble 0x8
(spec section 11); on CPU this backend inherits both.

``dequantize_4bit`` returns the logical dtype's value (bf16(code * scale) for a bfloat16 weight);
another dtype is that value converted, which is the normative reading (spec section 8).
"""

from __future__ import annotations

import torch

from ..format.layout import QuantizedTensor
from . import Backend


class BitsandbytesBackend(Backend):
    name = "bitsandbytes"

    def state(self, qt: QuantizedTensor):
        import bitsandbytes.functional as F

        st = getattr(qt, "_bnb_state", None)
        if st is None:
            kw = {}
            if qt.double_quant:
                state2 = F.QuantState(absmax=qt.nested_absmax, code=qt.nested_quant_map, blocksize=qt.nested_blocksize, dtype=torch.float32)
                kw = dict(offset=torch.tensor(qt.nested_offset, dtype=torch.float32, device=qt.absmax.device), state2=state2)
            st = F.QuantState(
                absmax=qt.absmax, shape=torch.Size(qt.shape), code=qt.quant_map, blocksize=qt.blocksize,
                quant_type=qt.quant_type, dtype=qt.dtype, **kw,
            )
            qt._bnb_state = st
        return st

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as F

        w = F.dequantize_4bit(qt.packed, self.state(qt)).reshape(qt.shape)
        return w.to(dtype)
