"""The fast CPU quantizer is bit-identical to the reference on every input, including the hard ones."""

from __future__ import annotations

import itertools

import pytest
import torch

from qconvert.errors import QuantizationError
from qconvert.format.constants import quantize_midpoints
from qconvert.quant.fast_cpu import binner, float_keys, floats_of_keys, quantize_4bit_fast
from qconvert.quant.reference import quantize_4bit_ref


def ulp_neighbourhood(values: torch.Tensor, k: int) -> torch.Tensor:
    """Every float32 within k ulps of each value (walking the bit patterns), clamped to [-1, 1]."""
    out = [values]
    up = values.clone()
    down = values.clone()
    for _ in range(k):
        up = torch.nextafter(up, torch.full_like(up, 2.0))
        down = torch.nextafter(down, torch.full_like(down, -2.0))
        out += [up, down]
    return torch.cat(out).clamp(-1, 1)


def test_float_keys_sort_like_the_floats():
    v = torch.cat([torch.randn(1 << 16) * 10.0 ** torch.randint(-40, 38, (1 << 16,)), torch.tensor([0.0, 1e-45, -1e-45, 1.0, -1.0])])
    v = v[torch.isfinite(v)]
    k = float_keys(v)
    assert torch.equal(floats_of_keys(k), v)
    order = torch.argsort(k.long(), stable=True)
    assert bool((v[order][1:] >= v[order][:-1]).all())


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_bins_exact_around_every_midpoint_and_cell_edge(qtype):
    mids, _ = quantize_midpoints(qtype)
    b = binner(qtype)
    around_mids = ulp_neighbourhood(mids, 2000)
    # both ends of every cell (16-bit key prefix) that holds values in [-1.01, 1.01], and their neighbours
    lo, hi = (int(float_keys(torch.tensor([e]))) >> 16 for e in (-1.01, 1.01))
    starts = torch.arange(lo, hi + 1, dtype=torch.int64) << 16
    edges = floats_of_keys(torch.cat([starts, starts - 1, starts + 1, starts + 0xFFFF]).clamp(-(2**31), 2**31 - 1))
    edges = edges[edges.abs() <= 1.01]
    special = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 1.0000001, -1.0000001])
    for v in (around_mids, edges, special, torch.rand(1 << 20) * 2 - 1):
        assert torch.equal(b.bins(v).long(), torch.bucketize(v, mids)), qtype


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_same_bytes_as_reference(qtype, monkeypatch):
    import qconvert.quant.fast_cpu as fc

    monkeypatch.setattr(fc, "CHUNK", 4096)  # several chunks even on small tensors
    g = torch.Generator().manual_seed(3)
    shapes = ((1,), (7,), (65,), (129, 65), (300, 257), (64, 64), (3, 4097))
    for shape, dtype, bs, dq in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16), (32, 64, 256, 4096), (True, False)):
        x = (torch.randn(shape, generator=g) * 5).to(dtype)
        a, r = quantize_4bit_fast(x, qtype, bs, dq), quantize_4bit_ref(x, qtype, bs, dq)
        assert torch.equal(a.packed, r.packed) and torch.equal(a.absmax, r.absmax), (shape, dtype, bs, dq)
        assert a.quant_state_dict() == r.quant_state_dict()
        if dq:
            assert torch.equal(a.nested_absmax, r.nested_absmax)


def test_adversarial_inputs_match_reference():
    mids, _ = quantize_midpoints("nf4")
    cases = [
        torch.zeros(4096),
        torch.cat([mids, -mids, torch.ones(2)]).repeat(64),
        torch.cat([torch.randn(4000) * 1e-3, torch.tensor([3e4]), torch.randn(95)]),
        torch.full((333,), 1e-40),
        torch.tensor([-0.0, 0.0] * 100),
    ]
    for x, qtype, dq in itertools.product(cases, ("nf4", "fp4"), (True, False)):
        a, r = quantize_4bit_fast(x, qtype, 64, dq), quantize_4bit_ref(x, qtype, 64, dq)
        assert torch.equal(a.packed, r.packed) and torch.equal(a.absmax, r.absmax)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(bad):
    x = torch.randn(70000)
    x[66000] = bad
    with pytest.raises(QuantizationError, match=r"lm\.weight: holds NaN or Inf \(first at index \[66000\]\)"):
        quantize_4bit_fast(x, name="lm.weight")
