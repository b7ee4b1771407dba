"""Dequantize the weights of FP8 and MXFP4 releases, the values transformers loads from them.

`qconvert quantize` reads a DeepSeek-V3-style FP8 checkpoint or a gpt-oss MXFP4 one by turning each
stored weight back into the 16-bit tensor that ``from_pretrained(..., quantization_config=
FineGrainedFP8Config(dequantize=True))`` / ``Mxfp4Config(dequantize=True)`` builds, then quantizing
that to NF4 like any other weight. So the values here must be those transformers computes, bit for
bit, in the same order of operations (transformers 5.23, ``integrations/finegrained_fp8.py``
``Fp8Dequantize._dequantize_one`` and ``integrations/mxfp4.py`` ``_convert_moe_packed_tensors``):

* FP8: the float8 weight and its block scale (``weight_scale_inv``) both widened to float32, one
  float32 product per element, rounded once to the target dtype.
* MXFP4: each 4-bit code looked up in the E2M1 table held in the target dtype, the low nibble
  first, then ``torch.ldexp`` by the block's E8M0 exponent minus 127; the result is transposed to
  [experts, in, out], as transformers' gpt-oss experts hold it.

Every result element depends only on its own code and scale, so both work through the tensor in
slices (a block row of an FP8 weight, one expert of an MXFP4 stack) to keep memory near the size
of the output; the values do not depend on the slicing.

One deliberate difference: transformers 5.23 derives the FP8 block from the scale grid
(``rows // scale_rows``) instead of reading ``weight_block_size``, so a weight whose sides are not
multiples of the block (ragged edge blocks, e.g. DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``) is
refused there, or silently misread when the sides happen to divide evenly by the grid. Here the
block is the declared one, the edge blocks are partial, as DeepSeek's own ``weight_dequant`` and
transformers' ``_dequantize_fp8_weight`` (its backward pass) read them. Pure torch: no transformers.
"""

from __future__ import annotations

import torch

from ..errors import FormatError

#: E2M1 values by 4-bit code (sign in bit 3), as the MXFP4 format and transformers' FP4_VALUES order them.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: Bytes of 4-bit codes per MXFP4 block (32 values).
MXFP4_BLOCK_BYTES = 16
E8M0_BIAS = 127
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape ``weight_scale_inv`` must have: one scale per (possibly partial) block."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _scales_float32(scale: torch.Tensor, name: str) -> torch.Tensor:
    """The block scales as float32: a float scale widened, a uint8 one read as an E8M0 exponent
    (``2 ** (byte - 127)``, the MXFP8 'ue8m0' checkpoints), as transformers reads both."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - float(E8M0_BIAS)).exp2()
    if not scale.dtype.is_floating_point:
        raise FormatError(f"tensor {name!r}: FP8 block scales of dtype {scale.dtype} cannot be read",
                          hint="qconvert reads float or E8M0 (uint8) weight_scale_inv tensors")
    return scale.to(torch.float32)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype,
                   name: str = "weight") -> torch.Tensor:
    """``weight`` (float8, [..., rows, cols]) times its per-block ``scale_inv``, in ``dtype``.

    ``block`` is [block_rows, block_cols] (``weight_block_size``); None means one scale for the
    whole tensor. Edge blocks may be partial."""
    if weight.dtype not in FP8_DTYPES:
        raise FormatError(f"tensor {name!r} has dtype {weight.dtype}, not float8_e4m3fn or float8_e5m2")
    rows, cols = weight.shape[-2:] if weight.dim() >= 2 else (1, weight.numel())
    block = block or (rows, cols)
    want = fp8_scale_grid((*weight.shape[:-2], rows, cols), block)
    if scale_inv.numel() == 1 and want[-2:] == (1, 1):
        scale_inv = scale_inv.reshape(want)
    if tuple(scale_inv.shape) != want:
        raise FormatError(f"tensor {name!r}: scale shape {tuple(scale_inv.shape)} does not match weight shape "
                          f"{tuple(weight.shape)} in blocks of {block[0]}x{block[1]} (expected {want})",
                          hint="check quantization_config.weight_block_size against the checkpoint")
    scales = _scales_float32(scale_inv, name).reshape(-1, want[-2], want[-1])
    w = weight.reshape(-1, rows, cols)
    out = torch.empty(w.shape, dtype=dtype)
    for e in range(w.shape[0]):
        for r in range(want[-2]):
            sl = slice(r * block[0], (r + 1) * block[0])
            s = scales[e, r].repeat_interleave(block[1])[:cols]
            out[e, sl] = (w[e, sl].to(torch.float32) * s).to(dtype)
    return out.reshape(weight.shape)


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized shape of MXFP4 ``blocks`` [experts, out, groups, 16]: [experts, in, out]."""
    experts, rows, groups, _ = blocks_shape
    return (experts, groups * 2 * MXFP4_BLOCK_BYTES, rows)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str = "blocks") -> torch.Tensor:
    """MXFP4 ``blocks`` (uint8 [E, out, G, 16], two E2M1 codes a byte, low nibble first) with their
    E8M0 ``scales`` (uint8 [E, out, G]) as a ``dtype`` tensor [E, G * 32, out]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise FormatError(f"tensor {name!r}: MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != MXFP4_BLOCK_BYTES or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise FormatError(f"tensor {name!r}: MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                          f"are not [experts, out, groups, {MXFP4_BLOCK_BYTES}] and [experts, out, groups]")
    lut = torch.tensor(E2M1_VALUES, dtype=dtype)
    experts, rows, groups, nbytes = blocks.shape
    out = torch.empty(mxfp4_shape(tuple(blocks.shape)), dtype=dtype)
    for e in range(experts):
        codes = blocks[e].reshape(rows * groups, nbytes)
        values = torch.empty(rows * groups, 2 * nbytes, dtype=dtype)
        values[:, 0::2] = lut[(codes & 0x0F).to(torch.int)]
        values[:, 1::2] = lut[(codes >> 4).to(torch.int)]
        exponent = scales[e].reshape(rows * groups, 1).to(torch.int32) - E8M0_BIAS
        torch.ldexp(values, exponent, out=values)
        out[e] = values.reshape(rows, groups * 2 * nbytes).T
    return out
