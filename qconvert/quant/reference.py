"""The reference implementation of the format's math, in plain torch (spec/format.md section 6).

This module is the definition every fast path is tested against. It favours clarity over speed and
runs on any device torch does. It reproduces, bit for bit, what bitsandbytes 0.50 writes on CPU
(which is what ``transformers`` saves), including two details of that path:

* full blocks are scaled by multiplying with the float32 reciprocal of their absmax, while the
  ragged last block (when ``n % blocksize != 0``) is scaled by dividing by its absmax;
* the ragged last block's stored absmax is clamped to at least 1e-38 (a full block's is not).

Dequantization is exact and normative (spec section 8): ``W[j] = quant_map[q[j]] * absmax[j // blocksize]``
in float32, rounded to the weight's logical dtype. That logical value is the weight: asked for another
dtype (float32 from a bfloat16 weight, say), :func:`dequantize_4bit_ref` converts the logical value, as
bitsandbytes' ``dequantize_4bit(...).to(dtype)`` does. The float32 product before that rounding is
available as :func:`float32_product_ref`, for measurements only; it is not what any consumer computes with.
"""

from __future__ import annotations

import torch

from ..errors import OptionError, QuantizationError
from ..names import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES
from ..format.constants import FLOAT_DTYPES, codebook, dynamic_map, quantize_midpoints
from ..format.layout import QuantizedTensor, decoded_scales, nblocks as count_blocks

_TINY = 1e-38  # divisor floor, as a float32


def check_quantizable(
    x: torch.Tensor, name: str = "tensor", quant_type: str = "nf4", blocksize: int = 64, check_finite: bool = True
) -> None:
    """Raise QuantizationError for anything the format cannot hold (OptionError for a quant type or
    block size outside the vocabulary)."""
    if quant_type not in QUANT_TYPES:
        raise OptionError(f"{name}: unknown quant type {quant_type!r}", hint="use nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise OptionError(
            f"{name}: block size {blocksize} is not supported", hint=f"use one of {', '.join(map(str, BLOCKSIZES))}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"{name}: dtype {x.dtype} cannot be quantized",
            hint="only float32, float16 and bfloat16 weights are quantized; cast the checkpoint or skip this module",
        )
    if x.numel() == 0:
        raise QuantizationError(f"{name}: tensor of shape {list(x.shape)} is empty")
    if not check_finite:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise QuantizationError(
            f"{name}: holds NaN or Inf (first at index {bad})",
            hint="the source weights are corrupt; fix or re-download them",
        )


def absmax_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax, scaled) of a flat float32 tensor: per-block max |x|, and x scaled into [-1, 1]."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])
    return absmax, scaled


def codes_for(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code of each scaled value, by float32 midpoints; a tie takes the lower bin."""
    midpoints, order = quantize_midpoints(quant_type)
    bins = torch.bucketize(scaled, midpoints.to(scaled.device))
    return order.to(scaled.device)[bins].to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, element 2i in the high nibble (an even count of codes)."""
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def pack_scaled(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The packed codes of scaled values; an odd count is padded with the code of 0.0."""
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    return pack_nibbles(codes_for(scaled, quant_type))


def assemble(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, name: str,
    offset: torch.Tensor | None = None,
) -> QuantizedTensor:
    """The QuantizedTensor of ``x`` from its packed codes and float32 block scales, double-quantized
    when asked (shared by every quantizer, so they differ only in how they find the codes; ``offset``
    as in :func:`double_quantize`)."""
    qt = QuantizedTensor(
        packed=packed.reshape(-1, 1),
        absmax=absmax,
        shape=tuple(x.shape),
        dtype=x.dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        quant_map=codebook(quant_type, x.device),
    )
    if double_quant:
        double_quantize(qt, name, offset)
    return qt


LUT_SIZE = 65536


def dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table that maps a scaled value to its 8-bit code (spec section 7.2).

    Entry i stands for v_i = -1 + (2 i) / 65535 (float32) and holds the first code index k whose
    upper midpoint (code[k] + code[k+1]) / 2 is not below v_i: the nearest code, ties to the lower.
    """
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    v = -1.0 + (2.0 * i) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, v, side="left").to(torch.uint8)


def lut_index(scaled: torch.Tensor) -> torch.Tensor:
    """Row of the table for a value in [-1, 1]: trunc(fma((v + 1) * 0.5, 65535, 0.5)), the fused
    multiply-add rounded once to float32 (exact in float64, then rounded)."""
    t = (torch.clamp(scaled, -1, 1) + 1.0) * 0.5
    return (t.double() * (LUT_SIZE - 1) + 0.5).float().long()


def quantize_8bit_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of float32 ``x`` against a sorted 256-entry map, by the lookup
    table above (this is how double quantization's absmax codes are written; spec section 7.2).

    Every block, the ragged last one included, is scaled by the float32 reciprocal of its absmax; a
    block whose absmax is 0 stores absmax 0 and codes 0.
    """
    n = x.numel()
    nblocks = count_blocks(n, blocksize)
    padded = torch.cat([x, x.new_zeros(nblocks * blocksize - n)]).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    q = dynamic_lut(code.cpu()).to(x.device)[lut_index(padded * inv.unsqueeze(1))]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def quantize_4bit_ref(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "tensor",
) -> QuantizedTensor:
    """Quantize ``x`` (float32/float16/bfloat16, any shape) into the 4-bit format."""
    check_quantizable(x, name, quant_type, blocksize)
    flat = x.detach().reshape(-1).to(torch.float32)
    absmax, scaled = absmax_blocks(flat, blocksize)
    return assemble(x, pack_scaled(scaled, quant_type), absmax, quant_type, blocksize, double_quant, name)


def double_quantize(qt: QuantizedTensor, name: str = "tensor", offset: torch.Tensor | None = None) -> QuantizedTensor:
    """Replace float32 ``qt.absmax`` by its 8-bit double quantization (spec section 3.5), in place.

    ``offset`` is ``qt.absmax.mean()`` computed by the caller, for a caller that fixes its summation
    order (spec section 7.1); by default it is computed here, at torch's current thread count."""
    absmax = qt.absmax
    offset = absmax.mean() if offset is None else offset
    if not bool(torch.isfinite(offset)):
        raise QuantizationError(
            f"{name}: the mean of its block scales overflows float32, so double quantization cannot store it",
            hint="quantize this tensor with --no-double-quant, or skip it",
        )
    centred = absmax - offset
    n = centred.numel()
    nested_max = torch.cat([centred, centred.new_zeros(-n % NESTED_BLOCKSIZE)]).view(-1, NESTED_BLOCKSIZE).abs().amax(dim=1)
    if bool(((nested_max > 0) & torch.isinf(1.0 / nested_max)).any()):
        raise QuantizationError(
            f"{name}: its block scales vary by less than float32 can invert (below about 3e-39), so double quantization cannot code them",
            hint="quantize this tensor with --no-double-quant, or skip it",
        )
    dmap = dynamic_map(absmax.device)
    qt.absmax, qt.nested_absmax = quantize_8bit_blockwise(centred, dmap, NESTED_BLOCKSIZE)
    qt.nested_quant_map = dmap
    qt.nested_offset = offset.item()
    return qt


def dequantize_absmax_ref(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 block scales: stored directly, or decoded from 8 bits when double-quantized."""
    if not qt.double_quant:
        return qt.absmax.to(torch.float32)
    return decoded_scales(qt)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of a packed tensor, as int64 indices."""
    b = packed.reshape(-1)
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def float32_product_ref(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 products ``quant_map[q] * absmax``, NOT rounded to the logical dtype.

    For a float32 weight this is the dequantized weight. For a float16 or bfloat16 weight it is not
    (spec section 8): kept only to measure what the rounding to the logical dtype changes.
    """
    n = qt.numel
    absmax = dequantize_absmax_ref(qt)
    values = qt.quant_map.to(torch.float32)[unpack_codes(qt.packed, n)]
    scale = absmax.repeat_interleave(qt.blocksize)[:n]
    return (values * scale).reshape(qt.shape)


def dequantize_4bit_ref(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The normative dequantized weight: the float32 product rounded to the logical dtype, then
    converted to ``dtype`` when another one is asked for (float32: the logical value widened, exactly)."""
    w = float32_product_ref(qt).to(qt.dtype)
    return w if dtype is None or dtype == qt.dtype else w.to(dtype)
