"""Linear4bit's no-gradient path (ops.matmul_no_grad): without the dispatcher and autograd, the same
result as the op, on the compiled kernels and on the torch path; the checked C arguments it keeps per
layer follow every change of the layer's tensors; it steps aside wherever the op must run."""

from __future__ import annotations

import copy

import pytest
import torch

from qconvert import ops
from qconvert.format.layout import QuantizedTensor
from qconvert.nn import linear4bit
from qconvert.nn.linear4bit import Linear4bit
from qconvert.ops.args import weight_args
from qconvert.ops.native import build
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref
from tolerances import GEMV_REL


def qweight(shape=(40, 96), seed=0, dq=True, blocksize=32) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    return quantize_4bit_ref(torch.randn(shape, generator=g).to(torch.bfloat16), "nf4", blocksize, dq)


def make(qt=None, backend="auto", compute=torch.float32) -> Linear4bit:
    qt = qt or qweight()
    bias = torch.randn(qt.shape[0], generator=torch.Generator().manual_seed(9))
    return Linear4bit(qt, bias, backend, compute)


def want(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """The reference: the reference weight in x's dtype, F.linear (float64 for the comparison)."""
    w = dequantize_4bit_ref(layer.quantized(), torch.float32).double()
    return x.double() @ w.T + layer.bias.double()


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def op(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """The layer's product through the op (dispatcher, autograd registration) itself."""
    offset = float(layer.nested_offset) if layer.nested_absmax is not None else 0.0
    return torch.ops.qconvert.matmul_4bit(x, layer.weight, layer.absmax, layer.quant_map, layer.nested_absmax,
                                          layer.nested_quant_map, offset, layer.blocksize,
                                          [layer.out_features, layer.in_features], layer.weight_dtype, layer.bias, "auto")


@pytest.fixture(params=["compiled", "torch"])
def kernels(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(build.ENV, "torch")
    else:
        monkeypatch.delenv(build.ENV, raising=False)
        if build.library() is None:
            pytest.skip("no compiled kernels here")
    return request.param


def spy(monkeypatch) -> list:
    """Counts the no-gradient path's calls into the CPU kernels."""
    seen, real = [], ops.cpu.matmul_cpu_kept
    monkeypatch.setattr(ops.cpu, "matmul_cpu_kept", lambda *a: seen.append(1) or real(*a))
    return seen


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_no_grad_equals_the_op(rows, kernels, monkeypatch):
    """Under no_grad the layer takes the path (C arguments kept where the kernels are built) and
    gives the op's bits: the same kernel on the same weight; within GEMV_REL of the reference."""
    layer, seen = make(), spy(monkeypatch)
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y = layer(x)
        expected = op(layer, x)
    assert seen == [1] and (linear4bit._KEPT.get(layer) is not None) == (kernels == "compiled")
    assert torch.equal(y, expected)
    assert rel(y, want(layer, x)) < GEMV_REL[torch.float32]


def test_grad_wanted_takes_the_op_and_its_backward(monkeypatch):
    """An input that requires a gradient goes through the op: the output has the op's grad_fn and the
    input gradient is x's gradient through the reference weight."""
    layer, seen = make(), spy(monkeypatch)
    x = torch.randn(4, 96, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None and not seen
    y.sum().backward()
    w = dequantize_4bit_ref(layer.quantized(), torch.float32)
    assert rel(x.grad, torch.ones(4, 40).double() @ w.double()) < GEMV_REL[torch.float32]
    with torch.no_grad():  # the same input under no_grad: the path, the same forward bits
        assert torch.equal(layer(x), y.detach())


@pytest.mark.parametrize("change", ["in place", "replaced", "load_state_dict", "moved scales"])
def test_a_changed_weight_is_read_again(change, kernels):
    """After each way of changing a layer's 4-bit weight, the next no_grad call computes with the new
    one (never with C arguments kept from the old)."""
    layer, other = make(qweight(seed=1)), make(qweight(seed=2))
    x = torch.randn(5, 96)
    with torch.no_grad():
        before = layer(x)
        if change == "in place":
            layer.weight.data.copy_(other.weight)  # through .data: the version counter does not move
            layer.absmax.copy_(other.absmax)
            layer.nested_absmax.copy_(other.nested_absmax)
            layer.nested_offset = other.nested_offset
        elif change == "replaced":
            layer.weight = torch.nn.Parameter(other.weight.clone(), requires_grad=False)
            layer.absmax, layer.nested_absmax = other.absmax.clone(), other.nested_absmax.clone()
            layer.nested_offset = other.nested_offset
        elif change == "load_state_dict":
            layer.load_state_dict(other.state_dict())
        else:  # the same codes, scales stored as a float32 copy elsewhere
            layer.nested_absmax = layer.nested_absmax.clone() * 2
        after = layer(x)
    if change == "moved scales":
        assert rel(after, want(layer, x)) < GEMV_REL[torch.float32] and not torch.equal(after, before)
    else:
        assert torch.equal(after, other(x).detach()) and not torch.equal(after, before)


def test_converted_tensors_are_never_kept(kernels):
    """Where the kernels need a converted copy (scales stored in float16), the copy is not reused: a
    scale changed in place is seen by the next call."""
    qt = qweight(dq=False)
    qt.absmax = qt.absmax.to(torch.float16)
    layer = make(qt)
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)
        layer.absmax.mul_(2)
        got = layer(x)
    assert rel(got, want(layer, x)) < GEMV_REL[torch.float32]


def test_copies_carry_nothing_kept():
    """A deep copy of a layer computes with its own tensors; the state dict holds no kept arguments."""
    layer = make()
    x = torch.randn(2, 96)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        twin.weight.data.copy_(make(qweight(seed=3)).weight)
        assert not torch.equal(twin(x), layer(x))
        assert rel(twin(x), want(twin, x)) < GEMV_REL[torch.float32]
    assert set(layer.state_dict()) == {"weight", "bias", "absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                       "_extra_state"}


def test_steps_aside_for_forced_kernels_and_stand_ins(monkeypatch):
    """A forced family (here the reference) and a swapped CPU kernel run through the op."""
    seen = []
    layer = make(backend="reference")
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert ops.matmul_no_grad(x, (layer.weight,), None, "reference") is None
        real = ops.FAMILIES["cpu"]["matmul_4bit"]
        monkeypatch.setitem(ops.FAMILIES["cpu"], "matmul_4bit", lambda *a: seen.append(1) or real(*a))
        auto = make()
        y = auto(x)
    assert seen == [1] and rel(y, want(auto, x)) < GEMV_REL[torch.float32]


def test_layer_without_bias(kernels):
    """A layer built without a bias (bias a plain None attribute, not a registered parameter) takes the
    path and gives the op's bits."""
    qt = qweight()
    layer = Linear4bit(qt, None, "auto", torch.float32)
    x = torch.randn(2, 96)
    with torch.no_grad():
        y = layer(x)
    w = dequantize_4bit_ref(qt, torch.float32).double()
    assert torch.equal(y, torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), None))
    assert rel(y, x.double() @ w.T) < GEMV_REL[torch.float32]


def test_kept_arguments_hold_no_tensor():
    """A weight replaced after a no_grad call is freed at once: what the layer keeps holds no tensor."""
    import gc
    import weakref

    layer = make()
    with torch.no_grad():
        layer(torch.randn(1, 96))
    assert linear4bit._KEPT.get(layer) is not None or build.library() is None
    old = weakref.ref(layer.weight)
    layer.weight = torch.nn.Parameter(make(qweight(seed=5)).weight.detach().clone(), requires_grad=False)
    gc.collect()
    assert old() is None


def test_block_scales_turned_into_parameters_as_fsdp_does_are_read_alike():
    """FSDP training turns the block scales from buffers into frozen parameters
    (training.fsdp.scales_to_parameters); the layer reads them from there, with and without
    gradients, and computes what it computed before (a KeyError under --fsdp once)."""
    from qconvert.training.fsdp import scales_to_parameters

    layer = make()
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = layer(x)
    assert scales_to_parameters(torch.nn.Sequential(layer)) == 2 and "absmax" in layer._parameters and "absmax" not in layer._buffers
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    assert torch.equal(layer(x.requires_grad_()).detach(), before)
