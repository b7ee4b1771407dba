"""Readers refuse malformed quant-states and tensors (spec section 9), with messages that say where."""

from __future__ import annotations


import pytest
import torch

from qconvert.errors import FormatError
from qconvert.format.layout import QuantizedTensor, pack_quant_state, unpack_quant_state
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref


def good(dq=True):
    qt = quantize_4bit_ref(torch.randn(33, 17), "nf4", 64, dq)
    return qt, qt.state_dict("layer.weight")


def test_round_trip_through_state_dict():
    for dq in (True, False):
        qt, sd = good(dq)
        back = QuantizedTensor.from_state_dict("layer.weight", sd, where="x.safetensors")
        assert torch.equal(dequantize_4bit_ref(back), dequantize_4bit_ref(qt))


def test_quant_state_json_matches_bitsandbytes_bytes():
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(40, 24).bfloat16()
    _, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_4bit_ref(x, "nf4", 64, True).state_dict("w")["w.quant_state.bitsandbytes__nf4"]
    assert bytes(ours.tolist()) == bytes(st.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"blocksize": 100}, "blocksize 100"),
        ({"blocksize": True}, "blocksize True"),
        ({"quant_type": "int4"}, "quant_type 'int4'"),
        ({"dtype": "float64"}, "dtype 'float64'"),
        ({"shape": [-1, 3]}, "shape"),
        ({"shape": "33x17"}, "shape"),
        ({"shape": [2**41]}, "shape"),
        ({"nested_blocksize": 128}, "nested_blocksize must be 256"),
        ({"nested_offset": float("nan")}, "nested_offset must be a finite number"),
        ({"nested_dtype": "float16"}, "nested_dtype"),
        ({"extra": 1}, "unknown quant-state fields"),
    ],
)
def test_bad_quant_state_fields(change, message):
    qt, _ = good()
    d = qt.quant_state_dict() | change
    with pytest.raises(FormatError, match=message):
        unpack_quant_state(pack_quant_state(d), "f.safetensors: w")


def test_bad_quant_state_bytes():
    with pytest.raises(FormatError, match="not UTF-8 JSON"):
        unpack_quant_state(torch.tensor([0xFF, 0xFE], dtype=torch.uint8))
    with pytest.raises(FormatError, match="JSON object"):
        unpack_quant_state(torch.tensor(list(b"[1, 2]"), dtype=torch.uint8))
    with pytest.raises(FormatError, match="limit"):
        unpack_quant_state(torch.zeros(70000, dtype=torch.uint8))
    with pytest.raises(FormatError, match="1-D uint8"):
        unpack_quant_state(torch.zeros(3, dtype=torch.int32))
    qt, _ = good()
    partial = {k: v for k, v in qt.quant_state_dict().items() if k != "nested_dtype"}
    with pytest.raises(FormatError, match="double quantization needs all"):
        unpack_quant_state(pack_quant_state(partial))


def test_inconsistent_tensors_refused():
    def refused(sd, pattern):
        with pytest.raises(FormatError, match=pattern):
            QuantizedTensor.from_state_dict("layer.weight", sd, where="model.safetensors")

    _, sd = good()
    refused({**sd, "layer.weight": sd["layer.weight"][:-1]}, r"model\.safetensors: 'layer\.weight': expected uint8 \[281, 1\]")
    refused({**sd, "layer.weight.absmax": sd["layer.weight.absmax"].float()}, r"layer\.weight\.absmax.*expected uint8")
    refused({k: v for k, v in sd.items() if k != "layer.weight.nested_absmax"}, "missing entry 'layer.weight.nested_absmax'")
    bad_map = sd["layer.weight.quant_map"].clone()
    bad_map[3] += 0.01
    refused({**sd, "layer.weight.quant_map": bad_map}, "not the standard nf4 codebook")
    bad_dyn = sd["layer.weight.nested_quant_map"].clone()
    bad_dyn[0] = -1.0
    refused({**sd, "layer.weight.nested_quant_map": bad_dyn}, "not the standard 8-bit dynamic map")
    refused({**sd, "layer.weight.nested_absmax": torch.full_like(sd["layer.weight.nested_absmax"], float("inf"))}, "NaN or Inf")
    refused({k: v for k, v in sd.items() if "quant_state" not in k}, "exactly one")
    wrong_key = {k.replace("__nf4", "__fp4"): v for k, v in sd.items()}
    refused(wrong_key, "disagrees with quant_type")
    _, sd1 = good(dq=False)
    refused({**sd1, "layer.weight.absmax": torch.full_like(sd1["layer.weight.absmax"], float("nan"))}, "NaN or Inf")


def test_float_blocksizes_and_duplicate_fields_refused():
    qt, _ = good()
    for change in ({"blocksize": 64.0}, {"nested_blocksize": 256.0}):
        with pytest.raises(FormatError, match="blocksize"):
            unpack_quant_state(pack_quant_state(qt.quant_state_dict() | change))
    dup = b'{"quant_type": "nf4", "blocksize": 64, "blocksize": 128, "dtype": "float32", "shape": [3]}'
    with pytest.raises(FormatError, match=r"repeats the field\(s\) \['blocksize'\]"):
        unpack_quant_state(torch.tensor(list(dup), dtype=torch.uint8))
