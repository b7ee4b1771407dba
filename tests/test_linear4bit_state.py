"""qconvert.nn.Linear4bit's state dict carries its whole quant state (issue 22): a load between two
double-quantized layers takes the source's nested offset, and a state from a layer of another shape or
quant setting is refused instead of being copied (and cast) into this one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.errors import FormatError
from qconvert.nn.linear4bit import Linear4bit
from qconvert.quant.reference import quantize_4bit_ref


def layer(seed: int, shape=(64, 128), quant_type="nf4", blocksize=64, double_quant=True, scale=1.0) -> Linear4bit:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    qt = quantize_4bit_ref(w, quant_type, blocksize, double_quant)
    return Linear4bit(qt, torch.randn(shape[0], generator=g), "auto", torch.float32)


def test_round_trip_takes_the_nested_offset(tmp_path):
    src, dst = layer(0), layer(1, scale=3.0)
    assert src.nested_offset != dst.nested_offset
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    save_file(src.state_dict(), str(tmp_path / "l.safetensors"))  # the state dict is all tensors
    dst.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    assert dst.nested_offset == src.nested_offset
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("other", [
    dict(shape=(128, 64)), dict(quant_type="fp4"), dict(blocksize=128), dict(double_quant=False),
])
def test_state_of_another_layer_is_refused(other):
    src, dst = layer(0, **other), layer(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(FormatError, match=f"with {next(iter(other))} "):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing copied


def test_codes_without_their_quant_state_are_refused():
    src, dst = layer(0), layer(1)
    state = src.state_dict()
    del state["_extra_state"]
    with pytest.raises(FormatError, match="no '_extra_state'"):
        dst.load_state_dict(state, strict=False)


def test_tensor_of_another_dtype_is_refused():
    src, dst = layer(0), layer(1)
    state = src.state_dict()
    state["absmax"] = state["absmax"].float()  # torch's copy_ would cast it silently
    with pytest.raises(FormatError, match="'absmax' is float32"):
        dst.load_state_dict(state)
