"""Checkpoints whose packed codes use another bitsandbytes ``quant_storage`` than uint8 (issue 22):
FSDP-QLoRA set-ups save the codes as a bfloat16 tensor of half the element count, and config.json
says ``bnb_4bit_quant_storage: "bfloat16"``. Readers take the bytes (spec 1.4): load_model, verify
and merge read such a checkpoint, written here by transformers + bitsandbytes themselves, as the
uint8 one of the same model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import bnb_quantize_save, make_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.errors import FormatError
from qconvert.format.layout import QuantizedTensor
from qconvert.quant.reference import quantize_4bit_ref

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64]])
DOWN = "model.layers.0.mlp.down_proj.weight"


def test_bfloat16_storage_reads_as_its_bytes():
    qt = quantize_4bit_ref(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)), "nf4", 64, True)
    state = qt.state_dict("w")
    as_bf16 = dict(state, w=state["w"].reshape(-1).view(torch.bfloat16).reshape(-1, 1))
    got = QuantizedTensor.from_state_dict("w", as_bf16, storage=torch.bfloat16)
    assert got.packed.dtype == torch.uint8 and torch.equal(got.packed, qt.packed)
    with pytest.raises(FormatError, match="expected uint8"):  # config.json names no other storage
        QuantizedTensor.from_state_dict("w", as_bf16)
    with pytest.raises(FormatError, match="stored as uint8, but config.json's bnb_4bit_quant_storage is 'bfloat16'"):
        QuantizedTensor.from_state_dict("w", state, storage=torch.bfloat16)
    short = dict(as_bf16, w=as_bf16["w"][:-1])  # codes dropped
    with pytest.raises(FormatError, match="480 bytes of codes, stored as bfloat16 \\[239, 1\\]"):
        QuantizedTensor.from_state_dict("w", short, storage=torch.bfloat16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("storage")
    src = make_tiny_llama(d / "src", dtype=torch.bfloat16)
    u8 = bnb_quantize_save(src, d / "u8")
    bf16 = bnb_quantize_save(src, d / "bf16", quant_storage=torch.bfloat16)
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:  # what transformers + bitsandbytes wrote
        assert f.get_slice(DOWN).get_dtype() == "BF16"
    assert json.loads((bf16 / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    return d, u8, bf16


def logits(path):
    import qconvert

    model = qconvert.load_model(str(path))
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.slow
def test_load_model_and_verify_read_bfloat16_storage(pair):
    from qconvert.convert.verify import verify_checkpoint

    _, u8, bf16 = pair
    assert torch.equal(logits(bf16), logits(u8))
    assert verify_checkpoint(bf16)["quantized"] == 14


@pytest.mark.slow
def test_merge_reads_bfloat16_storage_and_requantizes_to_uint8(pair, tmp_path):
    from peft import LoraConfig, get_peft_model

    import qconvert
    from qconvert.export.merge import merge_adapter

    d, u8, bf16 = pair
    torch.manual_seed(0)
    peft = get_peft_model(qconvert.load_model(str(u8)), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merge_adapter(str(u8), str(tmp_path / "adapter"), tmp_path / "m_u8", dtype="float32")
    merge_adapter(str(bf16), str(tmp_path / "adapter"), tmp_path / "m_bf16", dtype="float32")
    a, b = load_file(str(tmp_path / "m_u8" / "model.safetensors")), load_file(str(tmp_path / "m_bf16" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merge_adapter(str(bf16), str(tmp_path / "adapter"), tmp_path / "q", quantize=True)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"] == "uint8"
    assert load_file(str(tmp_path / "q" / "model.safetensors"))[DOWN].dtype == torch.uint8
    logits(tmp_path / "q")  # loads as written


@pytest.mark.slow
def test_storage_that_disagrees_with_the_weights_is_refused(pair, tmp_path):
    _, u8, _ = pair
    bad = shutil.copytree(u8, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    for storage, match in (("bfloat16", "stored as uint8, but config.json's bnb_4bit_quant_storage is 'bfloat16'"),
                           ("int4", "'int4', not one of")):
        cfg["quantization_config"]["bnb_4bit_quant_storage"] = storage
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(FormatError, match=match):
            logits(bad)
