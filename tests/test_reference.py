"""The reference math against bitsandbytes 0.50 itself: codes, scales and dequantized values, bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from qconvert.errors import OptionError, QuantizationError
from qconvert.names import BLOCKSIZES
from qconvert.format.constants import codebook, quantize_midpoints
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1,), (7,), (63,), (65,), (4097,), (3, 5, 7), (64, 64), (33, 96), (300, 257))


def bnb_quantize(x, qtype, bs, dq):
    return bnbF.quantize_4bit(x, blocksize=bs, quant_type=qtype, compress_statistics=dq)


def assert_same_as_bnb(x: torch.Tensor, qtype: str, bs: int, dq: bool) -> None:
    packed, st = bnb_quantize(x, qtype, bs, dq)
    qt = quantize_4bit_ref(x, qtype, bs, dq)
    ctx = f"shape={tuple(x.shape)} dtype={x.dtype} {qtype} bs={bs} dq={dq}"
    assert torch.equal(qt.packed, packed), f"codes differ: {ctx}"
    assert torch.equal(qt.absmax, st.absmax), f"absmax differs: {ctx}"
    assert torch.equal(qt.quant_map, st.code), ctx
    if dq:
        assert torch.equal(qt.nested_absmax, st.state2.absmax), f"nested absmax differs: {ctx}"
        assert torch.equal(qt.nested_quant_map, st.state2.code), ctx
        assert qt.nested_offset == st.offset.item(), ctx
    # the serialized quant-state equals bitsandbytes' own packing, byte for byte
    sd = st.as_dict(packed=True)
    assert torch.equal(qt.state_dict("w")[f"w.quant_state.bitsandbytes__{qtype}"], sd[f"quant_state.bitsandbytes__{qtype}"])
    # dequantization: bitsandbytes' CPU AVX-512 kernel mis-indexes block scales when the row length
    # is a multiple of 16 but not of the block size (spec section 11); compare only where it is right
    # and check the remaining shapes against an independent float64 evaluation of the formula.
    ours = dequantize_4bit_ref(qt)
    row = x.shape[-1]
    if row % 2 or row % bs == 0 or row % 16 or bs < 16:
        theirs = bnbF.dequantize_4bit(packed, st).reshape(ours.shape)  # 1-D comes back as [1, n]
        assert torch.equal(ours, theirs), f"dequant differs: {ctx}"
    codes = torch.stack([qt.packed.reshape(-1) >> 4, qt.packed.reshape(-1) & 15], 1).reshape(-1)[: x.numel()].long()
    absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset if dq else st.absmax
    expect = (codebook(qtype).double()[codes] * absmax.double().repeat_interleave(bs)[: x.numel()]).float()
    assert torch.equal(ours.float().reshape(-1), expect.to(x.dtype).float()), f"dequant formula: {ctx}"


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_tensors_every_blocksize(qtype, dtype):
    g = torch.Generator().manual_seed(hash((qtype, str(dtype))) % 2**31)
    for shape, bs, dq in itertools.product(SHAPES, BLOCKSIZES, (True, False)):
        if math.prod(shape) > 5000 and bs not in (32, 64, 4096):
            continue  # the large shapes only at the extremes, to keep the suite quick
        x = (torch.randn(shape, generator=g) * torch.rand(1, generator=g) * 10).to(dtype)
        assert_same_as_bnb(x, qtype, bs, dq)


def test_many_nested_blocks():
    """More than 256 blocks: double quantization uses several nested blocks, the last one ragged."""
    g = torch.Generator().manual_seed(7)
    for n, bs in ((257 * 64 + 5, 64), (513 * 32, 32), (300 * 128 + 1, 128)):
        assert_same_as_bnb(torch.randn(n, generator=g).to(torch.bfloat16), "nf4", bs, True)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_adversarial(qtype):
    mids, _ = quantize_midpoints(qtype)
    tiny = torch.tensor([1.0e-45, 2.8e-45, 1.1754942e-38, 5e-39]).float()
    cases = {
        "zeros": torch.zeros(130),
        "zeros_ragged": torch.zeros(67),
        "outlier": torch.cat([torch.randn(200) * 1e-3, torch.tensor([6.0e4]), torch.randn(55)]),
        "midpoints": torch.cat([mids, -mids, torch.ones(1)]).repeat(9),
        "midpoints_scaled": torch.cat([mids * 3.0, torch.tensor([3.0])]).repeat(5),
        "subnormals": torch.cat([tiny, -tiny, torch.zeros(3)]).repeat(13),
        "max_float": torch.cat([torch.tensor([3.4e38, -3.4e38]), torch.randn(160)]),
        "neg_zero": torch.tensor([-0.0, 0.0] * 70),
    }
    for name, x in cases.items():
        for dtype, bs, dq in itertools.product((torch.float32, torch.bfloat16), (32, 64), (True, False)):
            xx = x.to(dtype)
            if not torch.isfinite(xx).all():
                continue  # 3.4e38 overflows float16/bfloat16 casts: non-finite input is refused (below)
            assert_same_as_bnb(xx, qtype, bs, dq)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_with_tensor_name(bad):
    x = torch.randn(10, 10)
    x[3, 4] = bad
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*NaN or Inf.*\[3, 4\]"):
        quantize_4bit_ref(x, name="model.layers.0.mlp.up_proj.weight")


def test_double_quant_overflow_refused():
    """The mean of the block scales overflows float32: the file could not be read back, so refuse."""
    x = torch.tensor([3.4e38, -3.4e38, 1.0, -1.0] * 40)
    with pytest.raises(QuantizationError, match=r"big\.weight.*overflows float32") as e:
        quantize_4bit_ref(x, blocksize=32, double_quant=True, name="big.weight")
    assert "--no-double-quant" in e.value.hint
    quantize_4bit_ref(x, blocksize=32, double_quant=False, name="big.weight")  # single-level is fine


def test_bad_arguments():
    with pytest.raises(OptionError, match="block size 100"):
        quantize_4bit_ref(torch.randn(10), blocksize=100, name="w")
    with pytest.raises(QuantizationError, match="dtype torch.int32"):
        quantize_4bit_ref(torch.ones(10, dtype=torch.int32), name="w")
    with pytest.raises(OptionError, match="unknown quant type"):
        quantize_4bit_ref(torch.randn(10), quant_type="int4", name="w")
    with pytest.raises(QuantizationError, match="empty"):
        quantize_4bit_ref(torch.randn(0, 4), name="w")


def test_codebook_probe_reference_and_bitsandbytes():
    """Bytes 0x01, 0x23, ..., 0xEF with absmax 1.0 dequantize to exactly the table, in nibble order."""
    from qconvert.format.layout import QuantizedTensor

    packed = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8).reshape(-1, 1)
    for qtype in ("nf4", "fp4"):
        table = codebook(qtype)
        qt = QuantizedTensor(packed, torch.ones(1), (16,), torch.float32, qtype, 64, table)
        assert torch.equal(dequantize_4bit_ref(qt), table)
        st = bnbF.QuantState(absmax=torch.ones(1), shape=torch.Size([16]), code=table, blocksize=64, quant_type=qtype, dtype=torch.float32)
        assert torch.equal(bnbF.dequantize_4bit(packed, st).reshape(16), table)


def test_uninvertible_nested_scale_refused_not_crashed():
    """Block scales that differ from their mean by less than float32 can invert (~3e-39)."""
    from qconvert.quant.fast_cpu import quantize_4bit_fast

    x = torch.zeros(128)
    x[0], x[64] = 1e-39, 2e-39
    for f in (quantize_4bit_ref, quantize_4bit_fast):
        with pytest.raises(QuantizationError, match=r"tiny\.weight: .*cannot code them") as e:
            f(x, blocksize=64, double_quant=True, name="tiny.weight")
        assert "--no-double-quant" in e.value.hint
        f(x, blocksize=64, double_quant=False, name="tiny.weight")
