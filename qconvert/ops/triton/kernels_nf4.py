"""Triton kernels for 4-bit weights. Launch and validation live in triton_backend.py.

The codebook (16 float32) and the dynamic map (256 float32) arrive as tensors, never as literals.
Element j of a weight reads its code from byte j // 2 (high nibble first) and its scale from block
j // BLOCKSIZE; with double quantization the scale is decoded in the same kernel:
scale = float32(dmap[absmax_u8] * nested_absmax[block // 256]) + offset, each step rounded to float32
(launches pass enable_fp_fusion=False so the GPU compiler does not fuse the multiply and the add).
The float32 product code * scale is then rounded to the weight's LOGICAL dtype (constexpr LOGICAL:
0 float32, 1 float16, 2 bfloat16), which is the weight's value (spec section 8), and only then
converted to the output or input dtype: a float32 output of a bfloat16 weight is the bfloat16 value
widened, as bitsandbytes' dequantize_4bit(...).to(float32) gives. Rounding to bfloat16 is done with integer operations (round to nearest, ties to even), because
Triton's CPU interpreter truncates on a float32 -> bfloat16 cast while GPUs round: this way the same
bits come out everywhere.
"""

import triton
import triton.language as tl


@triton.jit
def _scale(absmax_ptr, nested_ptr, dmap_ptr, blk, mask, offset, DOUBLE: tl.constexpr):
    if DOUBLE:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(dmap_ptr + q8, mask=mask, other=0.0) * tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        return s + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _rne_bf16(x):
    """float32 -> the float32 value of its bfloat16 rounding (nearest, ties to even)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _logical(w, LOGICAL: tl.constexpr):
    """The float32 product -> the float32 value of its rounding to the logical dtype."""
    if LOGICAL == 2:
        return _rne_bf16(w)
    elif LOGICAL == 1:
        return w.to(tl.float16).to(tl.float32)
    else:
        return w


@triton.jit
def _codes(packed_ptr, code_ptr, idx, mask):
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where((idx % 2) == 0, byte >> 4, byte & 15)
    return tl.load(code_ptr + nib, mask=mask, other=0.0)


@triton.jit
def dequantize_kernel(
    packed_ptr, absmax_ptr, nested_ptr, code_ptr, dmap_ptr, out_ptr, n, offset,
    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, LOGICAL: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass: 4-bit codes + (8-bit absmax + nested scales, or float32 absmax) -> the logical
    value -> out dtype. With BF16_BITS the output buffer is int16 and receives bfloat16 bit patterns."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    v = _codes(packed_ptr, code_ptr, idx, mask)
    a = _scale(absmax_ptr, nested_ptr, dmap_ptr, idx // BLOCKSIZE, mask, offset, DOUBLE)
    w = _logical(v * a, LOGICAL)
    if BF16_BITS:
        bits = (_rne_bf16(w).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(out_ptr + idx, bits, mask=mask)
    else:
        tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, code_ptr, dmap_ptr, bias_ptr, y_ptr,
    N, K, offset, stride_xm, stride_ym,
    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, LOGICAL: tl.constexpr, HAS_BIAS: tl.constexpr, X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, :] = x[m, :] @ W.T (+ bias) for one row m per program column; W is never written out.
    Each weight is rounded to its logical dtype, then to the input dtype, before the product, as the
    dequantize-then-matmul path does; products accumulate in float32."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        xv = tl.load(x_ptr + m * stride_xm + rk, mask=mask_k, other=0.0)
        idx = rn[:, None] * K + rk[None, :]
        mask = mask_n[:, None] & mask_k[None, :]
        v = _codes(packed_ptr, code_ptr, idx, mask)
        a = _scale(absmax_ptr, nested_ptr, dmap_ptr, idx // BLOCKSIZE, mask, offset, DOUBLE)
        w = _logical(v * a, LOGICAL)
        if X_BF16:
            w = _rne_bf16(w)
        else:
            w = w.to(xv.dtype).to(tl.float32)
        acc += tl.sum(w * xv.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
