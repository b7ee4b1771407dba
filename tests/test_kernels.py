"""qconvert's Triton kernels against the reference: dequantization bit-exact, the fused small-batch
matmul within a named tolerance. Without a GPU they run in Triton's interpreter (conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from qconvert import ops
from qconvert.format.constants import codebook
from qconvert.format.layout import QuantizedTensor
from qconvert.quant.reference import dequantize_4bit_ref, float32_product_ref, quantize_4bit_ref
from tolerances import GEMV_REL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: fused matmul tolerance: the output is rounded to the input dtype once; accumulation order differs
GEMV_TOL = GEMV_REL


@pytest.fixture(scope="module")
def triton_backend():
    from qconvert.ops.triton.launch import Launcher

    return Launcher()


def on_device(qt: QuantizedTensor) -> QuantizedTensor:
    for f in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        if getattr(qt, f) is not None:
            setattr(qt, f, getattr(qt, f).to(DEVICE))
    return qt


@pytest.mark.slow
def test_dequantize_bit_exact(triton_backend):
    g = torch.Generator().manual_seed(0)
    shapes = ((1,), (7,), (63,), (65,), (33, 65), (5, 257), (3, 4097))
    for shape, dt, qtype, bs, dq in itertools.product(shapes, (torch.float32, torch.float16, torch.bfloat16), ("nf4", "fp4"), (32, 64, 256), (True, False)):
        x = (torch.randn(shape, generator=g) * 3).to(dt)
        qt = quantize_4bit_ref(x, qtype, bs, dq)
        ref = dequantize_4bit_ref(qt)
        out = triton_backend.dequantize(on_device(qt), dt).cpu()
        assert out.dtype == dt and torch.equal(out, ref), (shape, dt, qtype, bs, dq)
        for other in (torch.float32, torch.bfloat16):  # to another dtype than the logical one
            assert torch.equal(triton_backend.dequantize(qt, other).cpu(), dequantize_4bit_ref(on_device(qt), other).cpu())


@pytest.mark.slow
@pytest.mark.parametrize("logical", [torch.float16, torch.bfloat16], ids=str)
def test_other_output_dtype_is_the_logical_value_converted(triton_backend, logical):
    """Spec 1.1 section 8: a float32 (or other) output of a 16-bit weight is its logical value
    converted, not the float32 product; the fused matmul computes with the same values."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 70, generator=g) * 2).to(logical)
    for dq in (True, False):
        qt = on_device(quantize_4bit_ref(x, "nf4", 64, dq))
        logical_value = dequantize_4bit_ref(qt)
        assert logical_value.dtype == logical
        for out in (torch.float32, torch.float16, torch.bfloat16):
            got = triton_backend.dequantize(qt, out)
            assert got.dtype == out and torch.equal(got.cpu(), logical_value.to(out).cpu()), (out, dq)
        product = float32_product_ref(qt)
        assert not torch.equal(product, logical_value.float())  # the reading matters for this weight
        xin = torch.randn(3, 70, generator=g).to(DEVICE)
        y = triton_backend.gemv(xin, qt)
        want = xin.double() @ logical_value.double().T
        assert (y.double() - want).norm() / want.norm() < 1e-6
        assert (y.double() - xin.double() @ product.double().T).norm() / want.norm() > 1e-4


def test_dequantize_many_nested_blocks(triton_backend):
    x = torch.randn(300 * 64 + 17).bfloat16()  # 301 blocks: two nested blocks, the second ragged
    qt = quantize_4bit_ref(x, "nf4", 64, True)
    assert torch.equal(triton_backend.dequantize(on_device(qt), torch.bfloat16).cpu(), dequantize_4bit_ref(qt))


@pytest.mark.slow
@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_small_batch_matmul(triton_backend, dt):
    g = torch.Generator().manual_seed(1)
    for (n, k), rows, bias, dq in itertools.product(((100, 70), (32, 64), (65, 129)), (1, 3, 16), (False, True), (True, False)):
        w = torch.randn(n, k, generator=g).to(dt)
        qt = on_device(quantize_4bit_ref(w, "nf4", 64, dq))
        x = torch.randn(rows, k, generator=g).to(dt).to(DEVICE)
        b = torch.randn(n, generator=g).to(dt).to(DEVICE) if bias else None
        y = triton_backend.gemv(x, qt, b)
        ref = torch.nn.functional.linear(x.double(), dequantize_4bit_ref(qt, dt).double().to(DEVICE), None if b is None else b.double())
        assert y.shape == (rows, n) and y.dtype == dt
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < GEMV_TOL[dt], (n, k, rows, bias, dq, err)


@pytest.mark.slow
def test_codebook_probe_every_backend():
    """Bytes 0x01, 0x23, ..., 0xEF with absmax 1.0 dequantize to exactly the table, in nibble order."""
    packed = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8).reshape(-1, 1)
    for qtype, name in itertools.product(("nf4", "fp4"), ("reference", "triton", "bitsandbytes")):
        table = codebook(qtype)
        qt = on_device(QuantizedTensor(packed, torch.ones(1), (16,), torch.float32, qtype, 64, table))
        if name == "bitsandbytes" and DEVICE == "cpu":
            qt = QuantizedTensor(packed, torch.ones(1), (16,), torch.float32, qtype, 64, table)
        out = ops.dequantize(qt, torch.float32, name)
        assert torch.equal(out.cpu().reshape(16), table), (qtype, name)


def test_golden_vectors_bit_exact(triton_backend):
    """Every golden vector, from its stored bytes, through the Triton dequantize kernel: the logical
    output and the float32 output (the logical value widened, spec 1.1 section 8), bit for bit,
    including the signs of zeros (fp4_signed_zero)."""
    from test_golden import VECTORS, stored, to_hex

    for v in VECTORS:
        qt = on_device(stored(v))
        assert to_hex(triton_backend.dequantize(qt, qt.dtype).cpu()) == v["dequantized"], v["name"]
        assert to_hex(triton_backend.dequantize(qt, torch.float32).cpu()) == v["dequantized_float32"], v["name"]


def _midpoint_block(quant_type: str, blocksize: int) -> torch.Tensor:
    """A block whose scaled values sit exactly on every decision midpoint (and on -1, 0, 1): the
    ties, which take the lower bin."""
    from qconvert.format.constants import quantize_midpoints

    mid, _ = quantize_midpoints(quant_type)
    vals = torch.cat([torch.tensor([1.0, -1.0, 0.0]), mid, -mid])
    return torch.cat([vals, torch.zeros(blocksize - vals.numel())]) if vals.numel() < blocksize else vals[:blocksize]


@pytest.mark.slow
def test_quantize_kernel_bit_exact(triton_backend):
    """The Triton quantizer's codes and float32 block scales equal the reference's, byte for byte:
    full and ragged blocks, odd counts, every dtype, both code tables, every block size, and the
    edge cases (all-zero blocks, subnormal scales, values on the midpoints)."""
    from qconvert.names import BLOCKSIZES

    g = torch.Generator().manual_seed(11)
    shapes = ((1,), (7,), (63,), (64,), (65,), (33, 65), (5, 257), (2, 4097))
    for shape, dt, qtype, bs in itertools.product(shapes, (torch.float32, torch.float16, torch.bfloat16), ("nf4", "fp4"), BLOCKSIZES):
        x = (torch.randn(shape, generator=g) * 3).to(dt)
        ref = quantize_4bit_ref(x, qtype, bs, double_quant=False)
        packed, absmax = triton_backend.quantize_blocks(x.to(DEVICE), qtype, bs)
        assert torch.equal(packed.cpu(), ref.packed) and torch.equal(absmax.cpu(), ref.absmax), (shape, dt, qtype, bs)
    for qtype in ("nf4", "fp4"):
        specials = torch.cat([
            torch.zeros(64),  # an all-zero full block: scale 0, every code the code of 0.0
            torch.full((64,), 1e-40),  # a subnormal scale (the reference clamps only its divisor)
            _midpoint_block(qtype, 64),
            _midpoint_block(qtype, 64) * 3.5,  # ties after a reciprocal that is not exact
            torch.zeros(5),  # an all-zero ragged last block: its stored scale is the 1e-38 floor
        ])
        ref = quantize_4bit_ref(specials, qtype, 64, double_quant=False)
        packed, absmax = triton_backend.quantize_blocks(specials.to(DEVICE), qtype, 64)
        assert torch.equal(packed.cpu(), ref.packed) and torch.equal(absmax.cpu(), ref.absmax), qtype
