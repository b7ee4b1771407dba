"""qconvert's own Triton kernels (kernels_nf4.py, kernels_quant.py), launched and validated here.

Small batches (up to SMALL_BATCH rows) use the fused kernel that never writes the dequantized weight.
Larger batches, and the input gradient in backward, dequantize in one pass and call the vendor
matmul (cuBLAS on GPU): without a GPU to measure on, that choice for the training path is pending a
measurement (tools/bench_kernels.py runs both).
"""

from __future__ import annotations

import torch

from ...errors import BackendError
from ...format.constants import FLOAT_DTYPES
from ...format.layout import QuantizedTensor
from ...names import ceil_div

SMALL_BATCH = 16
BLOCK = 1024
#: blocks per program of the quantize kernel
QUANT_ROWS = 16
#: the kernels' LOGICAL constexpr: which dtype the float32 product is rounded to (spec section 8)
LOGICAL = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}  # float32 0, float16 1, bfloat16 2


def _launch_opts(device: torch.device) -> dict:
    # the interpreter takes no compiler options; on a GPU, forbid fusing the scale's multiply-add
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


class Launcher:
    """The kernels' launches over a QuantizedTensor whose tensors are on the kernels' device."""

    def __init__(self):
        from . import kernels_nf4

        self.k = kernels_nf4

    def _tables(self, qt: QuantizedTensor):
        nested = qt.nested_absmax if qt.double_quant else qt.absmax
        dmap = qt.nested_quant_map if qt.double_quant else qt.quant_map
        offset = float(qt.nested_offset) if qt.double_quant else 0.0
        return nested, dmap, offset

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in FLOAT_DTYPES:
            raise BackendError(f"cannot dequantize to {dtype}")
        n = qt.numel
        bf16 = dtype == torch.bfloat16
        out = torch.empty(n, dtype=torch.int16 if bf16 else dtype, device=qt.packed.device)
        nested, dmap, offset = self._tables(qt)
        grid = (ceil_div(n, BLOCK),)
        self.k.dequantize_kernel[grid](
            qt.packed, qt.absmax, nested, qt.quant_map, dmap, out, n, offset,
            BLOCKSIZE=qt.blocksize, DOUBLE=qt.double_quant, LOGICAL=LOGICAL[qt.dtype], BF16_BITS=bf16, BLOCK=BLOCK, **_launch_opts(out.device),
        )
        return (out.view(torch.bfloat16) if bf16 else out).reshape(qt.shape)

    def matmul(self, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= SMALL_BATCH and len(qt.shape) == 2:
            return self.gemv(x, qt, bias)
        return torch.nn.functional.linear(x, self.dequantize(qt, x.dtype), bias)

    def gemv(self, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = qt.shape
        x2 = x.reshape(-1, K).contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        nested, dmap, offset = self._tables(qt)
        BLOCK_N, BLOCK_K = 32, 64
        grid = (ceil_div(N, BLOCK_N), M)
        self.k.gemv_kernel[grid](
            x2, qt.packed, qt.absmax, nested, qt.quant_map, dmap, bias if bias is not None else y, y,
            N, K, offset, x2.stride(0), y.stride(0),
            BLOCKSIZE=qt.blocksize, DOUBLE=qt.double_quant, LOGICAL=LOGICAL[qt.dtype], HAS_BIAS=bias is not None, X_BF16=x.dtype == torch.bfloat16,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **_launch_opts(x.device),
        )
        return y.reshape(*x.shape[:-1], N)

    def quantize_blocks(self, x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed codes [(n + 1) // 2, 1] uint8, float32 block scales) of ``x`` on its device: the
        first level of the reference's quantize_4bit_ref, bit for bit (kernels_quant.py). The caller
        checks the input (quant.reference.check_quantizable) and double-quantizes the scales."""
        from ...format.constants import quantize_midpoints
        from . import kernels_quant

        flat = x.detach().reshape(-1).contiguous()
        n = flat.numel()
        nblocks = ceil_div(n, blocksize)
        mid, order = quantize_midpoints(quant_type)
        mid = mid.to(device=flat.device, dtype=torch.float32)
        order = order.to(device=flat.device, dtype=torch.int32)
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
        absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
        grid = (ceil_div(nblocks, QUANT_ROWS),)
        kernels_quant.quantize_kernel[grid](
            flat, mid, order, packed, absmax, n, n // blocksize, nblocks,
            BLOCKSIZE=blocksize, ROWS=QUANT_ROWS, **_launch_opts(flat.device),
        )
        return packed, absmax