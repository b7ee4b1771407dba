"""The compiled CPU kernels (qconvert/ops/native) against the reference: the dequantizer bit for bit on
every block size, quant type, dtype pair, double quant on and off, ragged and odd shapes and hostile
stored bytes; the fused small-batch matmul within GEMV_REL; every code path of nf4.c (AVX-512, AVX2,
plain C) built and checked where this CPU runs it; hostile shapes refused before any C call; the
build's cache, trust checks and fallback to the torch path."""

from __future__ import annotations

import itertools
import logging
import os
import platform
import shutil

import pytest
import torch

from qconvert.errors import OptionError
from qconvert.format.constants import FLOAT_DTYPES
from qconvert.names import BLOCKSIZES, QUANT_TYPES
from qconvert.ops.args import weight_args
from qconvert.ops.cpu import kernels as cpu_kernels
from qconvert.ops.native import build, calls
from qconvert.quant import fast_dequant
from qconvert.quant.fast_cpu import quantize_4bit_fast
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref
from test_fast_dequant import SIZES, hostile, same, sample
from tolerances import GEMV_REL

needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler: the torch path runs (tested elsewhere)")


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv(build.ENV, raising=False)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A private cache folder and no library loaded yet in this process (restored after)."""
    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_STATE", {})
    return tmp_path / "cache" / "kernels"


def matches(got: torch.Tensor, want: torch.Tensor, logical: torch.dtype) -> bool:
    """Bit for bit; the one exception: a float16 NaN widened to float32, whose bits torch itself
    writes two ways (its vector loop keeps the payload, its scalar tail for the last n % 8 elements
    writes 0x7FFFFFFF; torch 2.13), so there any NaN must be a NaN at the same place."""
    if same(got, want):
        return True
    if not (logical == torch.float16 and want.dtype == torch.float32 and got.shape == want.shape):
        return False
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and same(got[~nan], want[~nan])


def dequant(qt, dtype):
    got = calls.dequantize(*weight_args(qt), dtype)
    assert got is not None, "the compiled kernel did not take a plain weight"
    return got


@needs_cc
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bit_identical_to_the_reference(blocksize, quant_type, monkeypatch):
    """Every logical dtype asked as every dtype, double quant on and off, sizes odd, ragged and over
    several OpenMP chunks."""
    monkeypatch.setattr(calls, "CHUNK", 64)
    monkeypatch.setattr(calls, "PARALLEL_DEQUANT", 0)
    for n, logical, dq in itertools.product((*SIZES, 3 * blocksize + 5, 40 * blocksize + 18), FLOAT_DTYPES, (False, True)):
        qt = quantize_4bit_ref(sample(n, logical, n), quant_type, blocksize, dq)
        for dtype in FLOAT_DTYPES:
            assert same(dequant(qt, dtype), dequantize_4bit_ref(qt, dtype)), (n, logical, dq, dtype)


@needs_cc
@pytest.mark.parametrize("dq", [False, True])
def test_bit_identical_on_hostile_bytes(dq):
    """NaN, Inf, -0.0, subnormal and overflowing scales, random code tables, every byte value: the
    rounding and NaN rules of torch's casts, to the bit."""
    for n, blocksize in ((4097, 32), (8 * 256 * 32 + 33, 32), (9, 4096)):
        qt = hostile(n, blocksize, dq, seed=n)
        for logical, dtype in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES):
            qt.dtype = logical
            assert matches(dequant(qt, dtype), dequantize_4bit_ref(qt, dtype), logical), (n, logical, dtype)


@needs_cc
def test_rounding_edges_to_the_bit():
    """Products on every rounding edge of float16 and bfloat16: ties to even, the largest finite
    values and the overflow to infinity, float16's subnormals down to zero, NaN payloads."""
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                          2.0 ** -25 * 1.0001, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 3.3895e38, 1e-40])
    table = torch.cat([edges, torch.tensor([float("nan"), -float("inf")])])
    payload = torch.tensor([0x7FA12345, -0x12345], dtype=torch.int32).view(torch.float32)
    table[14:] = payload
    packed = torch.arange(256, dtype=torch.uint8).reshape(-1, 1)
    for scale in (1.0, -1.0, 0.5, 2.0 ** -10):
        for logical, dtype in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES):
            from qconvert.format.layout import QuantizedTensor

            qt = QuantizedTensor(packed=packed, absmax=torch.tensor([scale]), shape=(512,), dtype=logical,
                                 quant_type="nf4", blocksize=512, quant_map=table.clone())
            assert matches(dequant(qt, dtype), dequantize_4bit_ref(qt, dtype), logical), (scale, logical, dtype)


def gemv_case(rows: int, out_f: int, in_f: int, logical, dtype, dq: bool, bias: bool, seed: int):
    qt = quantize_4bit_ref(sample(out_f * in_f, logical, seed).reshape(out_f, in_f) * 0.01, "nf4", 64, dq)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    w = dequantize_4bit_ref(qt, dtype).double()
    want = x.double() @ w.T + (b.double() if bias else 0)
    return qt, x, b, want


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 where both are exactly zero: a weight of one zero block)."""
    diff = (a.double() - b).norm().item()
    return 0.0 if diff == 0 else diff / b.norm().item()


@needs_cc
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_matmul_within_tolerance(dtype):
    """Rows 1..MAX_ROWS, rows of W that start mid-byte and mid-block (in_features odd), blocks that
    span rows, bias or none, double quant or not, every logical dtype: within GEMV_REL[dtype] of the
    float64 product with the reference weight."""
    for rows, (out_f, in_f), logical, dq, bias in itertools.product(
            (1, 3, calls.MAX_ROWS), ((1, 1), (7, 33), (5, 97), (40, 130), (3, 1000)), FLOAT_DTYPES, (False, True), (False, True)):
        qt, x, b, want = gemv_case(rows, out_f, in_f, logical, dtype, dq, bias, seed=out_f * in_f + rows)
        got = calls.gemv(x, *weight_args(qt), b)
        assert got is not None and got.dtype == dtype and got.shape == (rows, out_f)
        assert rel(got, want) < GEMV_REL[dtype], (rows, out_f, in_f, logical, dq, bias)


@needs_cc
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_matmul_by_runs_of_32_within_tolerance(dtype):
    """The AVX-512 kernel's path for in_features and block size multiples of 32 (a table per block, x
    reordered in runs of 32): row counts up to MAX_ROWS, block sizes 32 to 256, blocks that span rows
    (in_features 32 under block size 64) or hold several runs, rows of more than one group of 16
    blocks, double quant or not, every logical dtype."""
    for rows, (out_f, in_f), blocksize, logical, dq in itertools.product(
            (1, 2, 5, calls.MAX_ROWS, 11, calls.MAX_FUSED_ROWS), ((1, 32), (9, 96), (40, 256), (3, 704), (40, 704)), (32, 64, 256),
            FLOAT_DTYPES, (False, True)):
        if in_f % blocksize and blocksize % in_f:
            continue
        qt = quantize_4bit_ref(sample(out_f * in_f, logical, rows).reshape(out_f, in_f) * 0.01, "nf4", blocksize, dq)
        g = torch.Generator().manual_seed(rows)
        x, b = torch.randn(rows, in_f, generator=g).to(dtype), torch.randn(out_f, generator=g).to(dtype)
        want = x.double() @ dequantize_4bit_ref(qt, dtype).double().T + b.double()
        got = calls.gemv(x, *weight_args(qt), b)
        assert got is not None and rel(got, want) < GEMV_REL[dtype], (rows, out_f, in_f, blocksize, logical, dq)


@needs_cc
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_matmul_one_row_is_the_same_bits_as_in_a_batch(dtype):
    """One row of x (the kernel's two-rows-of-W-at-a-time path where in_features is a multiple of
    the block size, the single-row path for an odd last row) gives each output the same bits as
    that row does inside a batch of rows (one row of W at a time): the same sums in the same order.
    (40, 704): 22 or 11 blocks a row, the two-row path's groups of 16 blocks (nf4.c GROUP) crossing
    double-quant blocks of 256 scales."""
    for (out_f, in_f), blocksize, dq in itertools.product(((7, 64), (40, 256), (3, 704), (40, 704)), (32, 64), (False, True)):
        qt = quantize_4bit_ref(sample(out_f * in_f, torch.bfloat16, in_f).reshape(out_f, in_f) * 0.01, "nf4", blocksize, dq)
        x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(out_f)).to(dtype)
        b = torch.randn(out_f).to(dtype)
        alone, batch = calls.gemv(x[:1], *weight_args(qt), b), calls.gemv(x, *weight_args(qt), b)
        assert same(alone, batch[:1]), (out_f, in_f, blocksize, dq)


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else None


def _huge_bytes_at(ptr: int) -> int:
    """AnonHugePages of the mapping holding address ``ptr`` (/proc/self/smaps), in bytes."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            inside = lo <= ptr < hi
        elif inside and head[0] == "AnonHugePages:":
            return int(head[1]) * 1024
    return 0


@needs_cc
def test_large_outputs_on_huge_pages_same_bits(monkeypatch):
    """A dequantized output of HUGE_BYTES or more is asked for as huge pages (once, over its own
    memory) and holds the reference's bits; QCONVERT_HUGEPAGES=0 asks nothing; where the system
    grants madvised huge pages the output's memory is made of them."""
    qt = quantize_4bit_fast(torch.randn(4096, 4096) * 0.02, "nf4", 64, True)  # 32 MiB in bfloat16
    qt.dtype = torch.bfloat16
    lib = build.library()
    asked = []

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def qc_hugepages(self, ptr, nbytes):
            asked.append((ptr, nbytes))
            return lib.qc_hugepages(ptr, nbytes)

    monkeypatch.setattr(calls, "library", lambda: Spy())
    for dtype in (torch.bfloat16, torch.float32):
        got = calls.dequantize(*weight_args(qt), dtype)
        assert asked[-1] == (got.data_ptr(), got.numel() * got.element_size()) and asked[-1][1] >= calls.HUGE_BYTES
        assert matches(got, dequantize_4bit_ref(qt, dtype), torch.bfloat16)
        if _thp_mode() in ("always", "madvise") and platform.system() == "Linux":
            assert _huge_bytes_at(got.data_ptr() + (4 << 20)) > 0
    n = len(asked)
    monkeypatch.setenv(calls.HUGE_ENV, "0")
    assert matches(calls.dequantize(*weight_args(qt), torch.bfloat16), dequantize_4bit_ref(qt, torch.bfloat16), torch.bfloat16)
    assert len(asked) == n
    small = torch.full((1 << 20,), 7, dtype=torch.uint8)  # under one whole huge page: nothing asked, nothing written
    assert lib.qc_hugepages(small.data_ptr(), small.numel()) == -1 and bool((small == 7).all())


needs_dot = pytest.mark.skipif(build.library() is None or not build.library().bf16_dot,
                               reason="this build has no bfloat16 dot-product path (nf4.c gemv_row_dp)")


def dot_case(rows: int, out_f: int, in_f: int, logical, blocksize: int = 64, seed: int = 0, size: float = 0.01,
             row_scale: bool = False):
    """A weight (``size`` times a sample; row i times 2^i with ``row_scale``, so that its double-quant
    blocks of 256 scales differ) and bfloat16 rows of x that the dot-product path takes (in_features
    and block size multiples of 64)."""
    w = sample(out_f * in_f, logical, seed).reshape(out_f, in_f) * size
    if row_scale:
        w = w * (2.0 ** torch.arange(out_f)).to(w.dtype)[:, None]
    qt = quantize_4bit_ref(w, "nf4", blocksize, True)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return qt, x


def ref_product(qt, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ dequantize_4bit_ref(qt, x.dtype).double().T


@needs_cc
def test_fused_matmul_over_a_sweep_of_shapes_block_sizes_and_dtypes():
    """A fixed sample of 160 cases over in_features (odd, multiples of 32 and 64 that are and are not
    multiples of the block size), every block size, NF4 and FP4, double quant or not, every logical and
    input dtype, 1 to 16 rows: each output within GEMV_REL[dtype] of sum |x| |w| of the float64 product
    (a bound no cancellation can break), and the first row alone the same bits as in the batch. (The
    fixed cases above missed the bfloat16 path taking rows that start inside a block.)"""
    import random

    pick = random.Random(0)
    cases = list(itertools.product((33, 96, 192, 320, 704, 1000), BLOCKSIZES, (1, 3), FLOAT_DTYPES, FLOAT_DTYPES))
    for in_f, blocksize, out_f, logical, dtype in pick.sample(cases, 160):
        g = torch.Generator().manual_seed(in_f * blocksize + out_f)
        qt = quantize_4bit_ref((torch.randn(out_f, in_f, generator=g) * 0.02).to(logical), pick.choice(QUANT_TYPES),
                               blocksize, pick.random() < 0.5)
        x = torch.randn(pick.randint(1, calls.MAX_FUSED_ROWS), in_f, generator=g).to(dtype)
        got = calls.gemv(x, *weight_args(qt), None)
        if got is None:  # (a build without vector code: the torch path, tested elsewhere)
            continue
        w = dequantize_4bit_ref(qt, dtype).double()
        err = (got.double() - x.double() @ w.T).abs()
        assert (err <= GEMV_REL[dtype] * (x.double().abs() @ w.abs().T) + 1e-30).all(), (in_f, blocksize, out_f, logical, dtype)
        assert same(calls.gemv(x[:1], *weight_args(qt), None), got[:1]), (in_f, blocksize, out_f, logical, dtype)


@needs_dot
def test_dot_product_path_within_tolerance_and_batch_invariant():
    """bfloat16 x on an AVX512-BF16 build: every row count, logical dtype and block size 64-256, within
    GEMV_REL of the float64 product, and each row alone the same bits as inside the batch. In features
    2368 = 37 blocks of 64: rows of W over several of the kernel's groups of 16 blocks (nf4.c GROUP),
    an odd last group, groups that cross a double-quant block of 256 scales. In features 320 under
    blocks of 128 and 256: rows of W that start inside a block, which take the float32 way (the dot
    products read whole blocks a row; until 2026-12-07 they took such rows and summed the wrong values)."""
    for rows, logical, blocksize, in_f in itertools.product((1, 2, 3, 8), FLOAT_DTYPES, (64, 128, 256), (256, 2368, 320)):
        if in_f == 2368 and blocksize > 64:
            continue
        qt, x = dot_case(rows, 37 if in_f != 2368 else 9, in_f, logical, blocksize, seed=rows + blocksize,
                         row_scale=in_f == 2368)
        got = calls.gemv(x, *weight_args(qt), None)
        assert got is not None and rel(got, ref_product(qt, x)) < GEMV_REL[torch.bfloat16], (rows, logical, blocksize)
        for r in range(rows):
            assert same(calls.gemv(x[r:r + 1], *weight_args(qt), None), got[r:r + 1]), (rows, logical, blocksize, r)


def rows_within(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Every row of ``got`` within ``tol`` of ``want``'s (relative), where ``want``'s row is finite;
    NaN where ``want`` has NaN, infinities equal."""
    for g, w in zip(got, want):
        if w.isfinite().all():
            if rel(g, w) >= tol:
                return False
        elif not (torch.equal(g.isnan(), w.isnan()) and torch.equal(g[w.isinf()].double(), w[w.isinf()])):
            return False
    return True


@needs_dot
@pytest.mark.parametrize("value", [1e-39, -5e-39, 1e-20, 2.0 ** -51, float("inf"), float("nan")], ids=str)
@pytest.mark.parametrize("pos", [5, 36, 63, 101])
def test_dot_product_path_steps_aside_for_x_it_cannot_take_exactly(value, pos):
    """A row of x whose one nonzero value is subnormal (the bfloat16 instructions would read it as
    zero: a relative error of 1 on that row), below 2^-50, infinite or NaN: that row goes the float32
    way, the other rows stay on the dot products; each row within GEMV_REL of the float64 product
    and the same bits alone as in the batch. ``pos``: in either half of either run of 64 values
    (the check reads 32 at a time)."""
    qt, x = dot_case(4, 40, 128, torch.bfloat16, seed=3, size=100.0)
    x[2] = 0
    x[2, pos] = value
    got = calls.gemv(x, *weight_args(qt), None)
    assert rows_within(got, ref_product(qt, x), GEMV_REL[torch.bfloat16])
    assert (got[2] != 0).any()
    for r in range(4):
        assert same(calls.gemv(x[r:r + 1], *weight_args(qt), None), got[r:r + 1]), r


@needs_dot
@pytest.mark.parametrize("scale", [1e-39, 1e-30, 0.0], ids=str)
@pytest.mark.parametrize("in_f", [128, 1280])
def test_dot_product_path_steps_aside_for_blocks_it_cannot_take_exactly(scale, in_f):
    """A row of W whose blocks' values are subnormal (scale 1e-39: the instructions would read them as
    zero) or below 2^-50 (1e-30) goes the float32 way; zero blocks stay. Each row within GEMV_REL of
    the float64 product, the same bits alone as in the batch. in_f 1280: 20 blocks a row, the bad ones
    in the second of the kernel's groups of 16 blocks."""
    qt, x = dot_case(3, 6, in_f, torch.bfloat16, seed=5)
    qt = quantize_4bit_ref(dequantize_4bit_ref(qt, torch.float32), "nf4", 64, False)  # plain float32 scales
    absmax = qt.absmax.clone()
    nb = in_f // 64
    absmax[nb:nb + nb - 2] = 0.0  # row 1: zero blocks (the dot products take them), then the two bad ones
    absmax[nb + nb - 2:nb + nb] = scale
    qt.absmax = absmax
    x = x.abs() + 1  # no cancellation: each row's sum is as large as its products
    if in_f > 128:  # row 1's sum all from the bad blocks: x large there, so that it is a normal number
        x[:, -128:] *= 1e20
    got = calls.gemv(x, *weight_args(qt), None)
    want = ref_product(qt, x)
    assert rows_within(got.T, want.T, GEMV_REL[torch.bfloat16]) and rows_within(got, want, GEMV_REL[torch.bfloat16])
    if scale:
        assert got[:, 1].abs().min() > 0
    for r in range(3):
        assert same(calls.gemv(x[r:r + 1], *weight_args(qt), None), got[r:r + 1]), r


@needs_cc
def test_matmul_op_takes_the_fused_kernel_for_few_rows(monkeypatch):
    """matmul_4bit on CPU: up to GEMV_ROWS[dtype] rows the fused kernel (within tolerance, batch
    dimensions kept); more rows the dequantized weight and F.linear (the reference's bits)."""
    used = []
    real = calls.gemv
    monkeypatch.setattr(calls, "gemv", lambda *a: used.append(1) or real(*a))
    for dtype in FLOAT_DTYPES:
        limit = cpu_kernels.GEMV_ROWS[dtype]
        qt, x, b, want = gemv_case(limit, 48, 130, torch.bfloat16, dtype, True, True, seed=11)
        y = torch.ops.qconvert.matmul_4bit(x.reshape(1, limit, 130), *weight_args(qt), b)
        assert used and y.shape == (1, limit, 48) and rel(y.reshape(limit, 48), want) < GEMV_REL[dtype]
        used.clear()
        x = torch.randn(limit + 1, 130, dtype=dtype)
        y = torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), b)
        assert not used and same(y, torch.nn.functional.linear(x, dequantize_4bit_ref(qt, dtype), b))


@needs_cc
def test_cpu_ops_take_the_compiled_kernel(monkeypatch):
    """dequantize_4bit, matmul_4bit's many-row forward and its input gradient dequantize in C, never
    by the torch path, and give the reference's results."""
    monkeypatch.setattr(fast_dequant, "dequantize_4bit_fast", lambda *a, **k: pytest.fail("torch path used"))
    qt = quantize_4bit_ref(sample(20 * 70, torch.bfloat16, 1).reshape(20, 70), "nf4", 64, True)
    args = weight_args(qt)
    assert same(torch.ops.qconvert.dequantize_4bit(*args, torch.float32), dequantize_4bit_ref(qt, torch.float32))
    x = torch.randn(9, 70, requires_grad=True)
    y = torch.ops.qconvert.matmul_4bit(x, *args, None)
    y.backward(torch.ones_like(y))
    w = dequantize_4bit_ref(qt, torch.float32)
    assert same(y.detach(), torch.nn.functional.linear(x.detach(), w))
    assert same(x.grad, torch.ones(9, 20) @ w)


@pytest.mark.parametrize("value", ["tourch", "off", "1", "native"])
def test_env_switch_refuses_values_it_does_not_take(monkeypatch, value):
    """A mistyped QCONVERT_CPU_KERNEL is one error naming the variable, not read as "use the
    kernels" (a user meaning ``torch`` would have run, and measured, the compiled ones)."""
    monkeypatch.setenv(build.ENV, value)
    with pytest.raises(OptionError, match=f"QCONVERT_CPU_KERNEL={value!r}") as e:
        build.library()
    assert "torch" in e.value.hint
    for ok, off in (("torch", True), (" Torch ", True), ("auto", False), ("", False)):
        monkeypatch.setenv(build.ENV, ok)
        assert build.disabled() is off


@pytest.mark.parametrize("value, on", [("", True), ("1", True), ("yes", True), ("0", False), ("off", False), (" False ", False),
                                       ("2", None), ("of", None)])
def test_huge_pages_switch_values(monkeypatch, value, on):
    """QCONVERT_HUGEPAGES takes 0/off/false/no and 1/on/true/yes (or unset); anything else is one error."""
    monkeypatch.setenv(calls.HUGE_ENV, value)
    if on is None:
        with pytest.raises(OptionError, match="QCONVERT_HUGEPAGES"):
            calls.huge_pages_on()
    else:
        assert calls.huge_pages_on() is on


def test_env_switch_forces_the_torch_path(monkeypatch):
    """QCONVERT_CPU_KERNEL=torch: no compiled call; the ops run the torch path (same bits)."""
    monkeypatch.setenv(build.ENV, "torch")
    assert build.library() is None and calls.dequantize(*weight_args(quantize_4bit_ref(torch.ones(64), "nf4")),
                                                        torch.float32) is None
    taken = []
    real = fast_dequant.dequantize_4bit_fast
    monkeypatch.setattr(fast_dequant, "dequantize_4bit_fast", lambda *a, **k: taken.append(1) or real(*a, **k))
    qt = quantize_4bit_ref(sample(300, torch.float16, 2), "fp4", 32, True)
    assert same(torch.ops.qconvert.dequantize_4bit(*weight_args(qt), torch.bfloat16), dequantize_4bit_ref(qt, torch.bfloat16))
    assert taken


@needs_cc
def test_hostile_shapes_never_reach_c():
    """Sizes that disagree with the layout, odd block sizes, wrong dtypes, other devices, an input
    of the wrong width, too many rows, a bias of the wrong size: None (the torch path judges), so no
    C call can read or write past a buffer."""
    qt = quantize_4bit_ref(sample(40 * 64, torch.float32, 3).reshape(40, 64), "nf4", 64, True)
    good = list(weight_args(qt))
    assert calls.dequantize(*good, torch.float32) is not None
    P, A, Q, NA, NQ, OFF, BS, SHAPE, LOG = range(9)  # noqa: N806
    bad = {
        "packed short": (P, qt.packed[:-1]), "packed long": (P, torch.cat([qt.packed, qt.packed[:1]])),
        "packed int8": (P, qt.packed.view(torch.int8)), "packed on meta": (P, qt.packed.to("meta")),
        "absmax short": (A, qt.absmax[:-1]), "absmax float": (A, qt.absmax.float()),
        "quant_map 15": (Q, qt.quant_map[:15]), "nested short": (NA, qt.nested_absmax[:0]),
        "nested map 255": (NQ, qt.nested_quant_map[:255]), "nested map missing": (NQ, None),
        "odd blocksize": (BS, 63), "zero blocksize": (BS, 0), "negative blocksize": (BS, -64),
        "shape larger": (SHAPE, [41, 64]), "shape with zero": (SHAPE, [0, 64]), "shape negative": (SHAPE, [-40, -64]),
        "logical int": (LOG, torch.int32),
    }
    for name, (i, value) in bad.items():
        args = list(good)
        args[i] = value
        assert calls.dequantize(*args, torch.float32) is None, name
        assert calls.gemv(torch.randn(1, 64), *args, None) is None, name
    assert calls.dequantize(*good, torch.int8) is None
    assert calls.dequantize(*good, torch.float32, out=torch.empty(40 * 64 - 1)) is None
    assert calls.dequantize(*good, torch.float32, out=torch.empty(40 * 64 * 2)[::2]) is None
    for x, b in ((torch.randn(1, 63), None), (torch.randn(calls.MAX_FUSED_ROWS + 1, 64), None), (torch.randn(1, 64), torch.randn(39)),
                 (torch.randn(1, 64), torch.randn(40, dtype=torch.float64)), (torch.randn(1, 64, dtype=torch.float64), None),
                 (torch.randn(()), None)):
        assert calls.gemv(x, *good, b) is None, (x.shape, None if b is None else b.shape)
    xt = torch.randn(64, 2).T  # not contiguous: copied, not read with the wrong strides
    assert rel(calls.gemv(xt, *good, None), xt.double() @ dequantize_4bit_ref(qt, torch.float32).double().T) < GEMV_REL[torch.float32]


@needs_cc
@pytest.mark.slow
def test_build_caches_once_per_key_and_trusts_only_its_own(fresh_state):
    """The first call builds into the private cache (no temporary left, not writable by others);
    the next process state loads it without building; a folder others can write to (or whose
    parent they can), or a link in place of the library, is never loaded."""
    assert build.library() is not None
    libs = sorted(p.name for p in fresh_state.iterdir())
    assert len(libs) == 1 and libs[0].startswith("nf4-") and libs[0].endswith(".so")
    assert oct(fresh_state.stat().st_mode & 0o777) == "0o700" and not (fresh_state / libs[0]).stat().st_mode & 0o022
    build._STATE.clear()
    built = []
    real = build.compile_library
    build.compile_library = lambda *a: built.append(1) or real(*a)
    try:
        assert build.library() is not None and not built
        build._STATE.clear()
        os.chmod(fresh_state, 0o777)
        assert build.library() is None and "only this user" in build.describe()
        os.chmod(fresh_state, 0o700)
        os.chmod(fresh_state.parent, 0o777)  # others could rename the folder away and put theirs
        build._STATE.clear()
        assert build.library() is None and "only this user" in build.describe()
        os.chmod(fresh_state.parent, 0o700)
        lib = fresh_state / libs[0]
        lib.rename(fresh_state / "elsewhere.so")
        lib.symlink_to(fresh_state / "elsewhere.so")
        build._STATE.clear()
        assert build.library() is None and "only this user" in build.describe() and not built
    finally:
        build.compile_library = real


def test_no_compiler_falls_back_with_one_debug_note(fresh_state, monkeypatch, caplog):
    """No compiler: None, one debug line, nothing written; the op still gives the reference's bits."""
    monkeypatch.setenv("CC", "qconvert-no-such-compiler")
    with caplog.at_level(logging.DEBUG, logger="qconvert"):
        assert build.library() is None and build.library() is None
    notes = [r for r in caplog.records if "torch path" in r.getMessage()]
    assert len(notes) == 1 and "qconvert-no-such-compiler" in notes[0].getMessage()
    assert not fresh_state.exists()
    qt = quantize_4bit_ref(sample(200, torch.bfloat16, 9), "nf4", 64, True)
    assert same(torch.ops.qconvert.dequantize_4bit(*weight_args(qt), torch.float16), dequantize_4bit_ref(qt, torch.float16))


@needs_cc
def test_failed_build_falls_back(fresh_state, monkeypatch, tmp_path):
    """A compiler that fails every flag set: None, the reason kept, no library or temporary left."""
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'cc: error: broken on purpose' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert build.library() is None and "broken on purpose" in build.describe()
    assert list(fresh_state.iterdir()) == []


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"), reason="x86-64 flags, gcc")
def test_compiler_without_the_bf16_part_keeps_the_other_vector_code(fresh_state, monkeypatch, tmp_path):
    """A compiler that builds everything but the AVX512-BF16 part (an older or another compiler): the
    next flag set leaves that part out and keeps -march=native's vector code, not plain C."""
    fake = tmp_path / "oldcc"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-mno-avx512bf16" ] && exec gcc "$@"; done\n'
                    'echo "error: unknown type name __m512bh" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    lib = build.library()
    assert lib is not None and "-mno-avx512bf16" in build.describe() and not lib.bf16_dot
    assert lib.simd == (512 if _cpu_has("avx512f") else 256 if _cpu_has("avx2") else 0)


#: the code paths of nf4.c and flags that select each on an x86-64 CPU (the widest first)
VARIANTS = {"avx512": ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
            "avx512-no-bf16": ("-O3", "-march=native", "-mno-avx512bf16", "-fopenmp", "-ffp-contract=off"),
            "avx2": ("-O3", "-mavx2", "-mfma", "-mf16c", "-mno-avx512f", "-fopenmp", "-ffp-contract=off"),
            "plain": ("-O3", "-ffp-contract=off", *(("-mno-avx2", "-mno-avx512f") if platform.machine() in ("x86_64", "AMD64") else ()))}


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@needs_cc
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_code_path_is_bit_identical(variant, fresh_state, monkeypatch):
    """Build the AVX-512, AVX2 and plain C paths (where this CPU runs them) and check each against
    the reference: a machine without AVX-512 runs the same bits (and its fused kernel, within
    GEMV_REL); a plain C build leaves the few-row product to torch."""
    need = {"avx512": "avx512f", "avx512-no-bf16": "avx512f", "avx2": "avx2", "plain": None}[variant]
    if need and not _cpu_has(need):
        pytest.skip(f"this CPU has no {need}")
    cc = build.compiler()
    path = build.library_path(cc, VARIANTS[variant])
    build.compile_library(cc, VARIANTS[variant], path)
    lib = build._bind(path)
    assert lib.simd == {"avx512": 512, "avx512-no-bf16": 512, "avx2": 256, "plain": 0}[variant]
    assert lib.bf16_dot == (variant == "avx512" and _cpu_has("avx512_bf16"))
    monkeypatch.setattr(calls, "library", lambda: lib)
    monkeypatch.setattr(calls, "CHUNK", 256)
    for n, blocksize, dq in ((4097, 64, True), (8 * 256 * 32 + 33, 32, False), (3 * 4096 + 7, 4096, True)):
        qt = hostile(n, blocksize, dq, seed=n)
        for logical, dtype in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES):
            qt.dtype = logical
            assert matches(dequant(qt, dtype), dequantize_4bit_ref(qt, dtype), logical), (variant, n, logical, dtype)
    for dtype, in_f in itertools.product(FLOAT_DTYPES, (130, 256)):  # 256: the dot-product path in bfloat16
        qt, x, b, want = gemv_case(3, 40, in_f, torch.bfloat16, dtype, True, True, seed=5)
        got = calls.gemv(x, *weight_args(qt), b)
        if variant == "plain":  # slower than dequantize + torch's product: not used
            assert got is None
        else:
            assert rel(got, want) < GEMV_REL[dtype], (variant, dtype)


@needs_cc
def test_concurrent_calls_from_python_threads(monkeypatch):
    """Several Python threads calling the kernels at once (the GIL released, OpenMP teams side by
    side, as an overlapped merge dequantizes): each gets its own weight's exact result."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(calls, "CHUNK", 1024)  # many chunks: each call opens an OpenMP team
    monkeypatch.setattr(calls, "PARALLEL_DEQUANT", 0)
    monkeypatch.setattr(calls, "_threads", lambda: 2)
    qts = [quantize_4bit_ref(sample(64 * 300 + 2 * i, torch.bfloat16, i), "nf4", 64, i % 2 == 0) for i in range(6)]
    wants = [dequantize_4bit_ref(qt, torch.float32) for qt in qts]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            gots = list(pool.map(lambda qt: dequant(qt, torch.float32), qts))
            assert all(same(g, w) for g, w in zip(gots, wants))


@needs_cc
def test_small_weights_run_on_the_calling_thread(monkeypatch):
    """Below PARALLEL_DEQUANT / PARALLEL_GEMV elements the kernels get one thread (no OpenMP team, whose
    closing barrier waits for a thread another process may be holding off its CPU); above, the
    CPUs available. The results are the same bits either way."""
    lib, seen = calls.library(), []

    class Spy:
        simd = lib.simd

        def qc_dequantize(self, *a):
            seen.append(a[-1])
            return lib.qc_dequantize(*a)

        def qc_gemv(self, *a):
            seen.append(a[-1])
            return lib.qc_gemv(*a)

    monkeypatch.setattr(calls, "library", Spy)
    monkeypatch.setattr(calls, "_threads", lambda: 2)
    qt = quantize_4bit_ref(sample(704 * 256, torch.bfloat16, 7).reshape(704, 256), "nf4", 64, True)
    x = torch.randn(1, 256)
    small = (dequant(qt, torch.float32), calls.gemv(x, *weight_args(qt), None))
    assert seen == [1, 1]
    monkeypatch.setattr(calls, "PARALLEL_DEQUANT", 1 << 16)
    monkeypatch.setattr(calls, "PARALLEL_GEMV", 1 << 16)
    assert same(dequant(qt, torch.float32), small[0]) and same(calls.gemv(x, *weight_args(qt), None), small[1])
    assert seen == [1, 1, 2, 2]


@needs_cc
def test_a_shared_cpu_makes_calls_work_alone_with_the_same_bits(monkeypatch):
    """nf4.c's answer to a shared CPU: where a thread of a call's team started or finished late (another
    process on its CPU), the next calls run on the calling thread alone for a while (qc_alone forces
    that state here, with the detection itself turned off: it needs a busy machine, which a test cannot
    count on, and may see one where tests run side by side). A call alone gives the same bits as a team
    of two, for the fused product and the dequantizer; the state ends."""
    lib = calls.library()
    if lib is None or "-fopenmp" not in build.describe():
        pytest.skip("no OpenMP build: every call runs on the calling thread")
    monkeypatch.setattr(calls, "_threads", lambda: 2)
    monkeypatch.setattr(calls, "PARALLEL_GEMV", 0)
    monkeypatch.setattr(calls, "PARALLEL_DEQUANT", 0)
    monkeypatch.setattr(calls, "CHUNK", 1024)  # several chunks: the dequantizer's team has work to share
    qt = quantize_4bit_ref(sample(96 * 256, torch.bfloat16, 9).reshape(96, 256) * 0.01, "nf4", 64, True)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    late = lib.qc_late(1 << 62)
    try:
        lib.qc_alone(0)
        team_y, team_w = calls.gemv(x, *weight_args(qt), None), calls.dequantize(*weight_args(qt), torch.float32)
        assert lib.qc_last_team() == 2 and lib.qc_alone(-1) == 0
        assert lib.qc_alone(10 ** 10) == 1  # ten seconds alone
        alone_y = calls.gemv(x, *weight_args(qt), None)
        assert lib.qc_last_team() == 1
        alone_w = calls.dequantize(*weight_args(qt), torch.float32)
        assert lib.qc_last_team() == 1
        assert same(alone_y, team_y) and same(alone_w, team_w)
        assert same(alone_w.reshape(96, 256), dequantize_4bit_ref(qt, torch.float32))
        lib.qc_alone(0)
        calls.gemv(x, *weight_args(qt), None)
        assert lib.qc_last_team() == 2
    finally:
        lib.qc_alone(0)
        lib.qc_late(late)
    assert late == 1_000_000  # (nf4.c's LATE_NS, restored)
