"""Triton kernel for 4-bit quantization (the first level: codes and float32 block scales). Launch
and validation live in triton_backend.py; double quantization of the scales (n / blocksize floats)
stays on the CPU path shared with every other quantizer (quant/reference.py ``assemble``), so its
summation order, and the bytes, are the same wherever the weights were quantized.

The math is the reference's (quant/reference.py), step for step in float32:

* a block's scale is max |x| over its elements (exact in any order);
* a full block is scaled by multiplying with the float32 reciprocal of max(scale, 1e-38); the
  ragged last block (n % blocksize != 0) is divided by max(scale, 1e-38), which is also the scale it
  stores; both divisions are correctly rounded (``div_rn``: a GPU's default float32 division is not);
* each scaled value, clamped to [-1, 1], takes the bin of the 15 float32 midpoints it lies above (a
  value on a midpoint takes the lower bin, as ``torch.bucketize``), and the bin's nibble from ORDER;
* element 2i goes to the high nibble of byte i, 2i + 1 to the low one; an odd count is padded with
  the code of 0.0.

One program quantizes ROWS blocks; each block is read as its even and its odd elements, so the two
nibbles of a byte sit side by side without a reshape.
"""

import triton
import triton.language as tl


@triton.jit
def _bins(s, mid_ptr, order_ptr):
    """The nibble of each scaled value: ORDER[number of midpoints strictly below it]."""
    b = tl.zeros(s.shape, dtype=tl.int32)
    for k in tl.static_range(15):
        b += (s > tl.load(mid_ptr + k)).to(tl.int32)
    return tl.load(order_ptr + b)


@triton.jit
def quantize_kernel(
    x_ptr, mid_ptr, order_ptr, packed_ptr, absmax_ptr, n, n_full, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    half = tl.arange(0, BLOCKSIZE // 2)
    even = rows[:, None] * BLOCKSIZE + 2 * half[None, :]
    row_ok = rows < nblocks
    m_even = (even < n) & row_ok[:, None]
    m_odd = (even + 1 < n) & row_ok[:, None]
    xe = tl.load(x_ptr + even, mask=m_even, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=m_odd, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    floor = tl.maximum(amax, 1e-38)
    full = rows < n_full
    inv = tl.math.div_rn(tl.full(floor.shape, 1.0, tl.float32), floor)
    # an all-zero block: its values are 0 whatever the divisor (and no 1 / subnormal is formed)
    inv = tl.where(amax > 0, inv, 0.0)
    se = tl.where(full[:, None], xe * inv[:, None], tl.math.div_rn(xe, floor[:, None]))
    so = tl.where(full[:, None], xo * inv[:, None], tl.math.div_rn(xo, floor[:, None]))
    se = tl.minimum(tl.maximum(se, -1.0), 1.0)
    so = tl.minimum(tl.maximum(so, -1.0), 1.0)
    byte = (_bins(se, mid_ptr, order_ptr) << 4) | _bins(so, mid_ptr, order_ptr)
    tl.store(packed_ptr + rows[:, None] * (BLOCKSIZE // 2) + half[None, :], byte.to(tl.uint8), mask=m_even)
    tl.store(absmax_ptr + rows, tl.where(full, amax, floor), mask=row_ok)
