"""`qconvert merge`: merged weights equal dequant(W4) + scaling * B @ A, so the merged model computes
what the unmerged model (4-bit base dequantized + adapter through PEFT) computes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli_here as run, bnb_float32_oracle, bnb_quantize_save, float32_reference, make_tiny_llama
from tolerances import FLOAT32_REL

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64]])



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("merge")
    src = make_tiny_llama(d / "src", hidden=64, intermediate=128, dtype=torch.float32)
    quantize_checkpoint(str(src), d / "q")
    torch.manual_seed(0)
    peft_model = get_peft_model(float32_reference(d / "q"), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(d / "adapter")
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    return d, unmerged


def test_float32_merge_equals_unmerged_model(setup):
    from transformers import AutoModelForCausalLM

    d, unmerged = setup
    r = run("merge", d / "q", d / "adapter", d / "m32", "--dtype", "float32")
    assert "6 LoRA modules merged" in r.stdout
    cfg = json.loads((d / "m32" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(d / "m32").eval()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        merged = model(IDS).logits
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < FLOAT32_REL
    card = (d / "m32" / "README.md").read_text()
    assert 'base_model_relation: "merge"' in card


def test_bf16_merge_and_weights_by_value(setup):
    from safetensors.torch import load_file

    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.format.layout import QuantizedTensor, companion_keys
    from qconvert.quant.reference import dequantize_4bit_ref

    d, unmerged = setup
    run("merge", d / "q", d / "adapter", d / "m16", "--dtype", "bfloat16")
    merged = load_file(str(d / "m16" / "model.safetensors"))
    base = load_file(str(d / "q" / "model.safetensors"))
    k = "model.layers.1.self_attn.v_proj.weight"
    qt = QuantizedTensor.from_state_dict(k, {c: base[c] for c in companion_keys(k, base.keys())})
    a = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    A = a["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    B = a["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    want = (dequantize_4bit_ref(qt, torch.float32) + (16 / 4) * (B.float() @ A.float())).to(torch.bfloat16)
    assert LoraAdapter(d / "adapter").scaling("model.layers.1.self_attn.v_proj") == 4.0
    assert merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], want)
    # a module without adapter is just dequantized
    k2 = "model.layers.0.mlp.up_proj.weight"
    qt2 = QuantizedTensor.from_state_dict(k2, {c: base[c] for c in companion_keys(k2, base.keys())})
    assert torch.equal(merged[k2], dequantize_4bit_ref(qt2, torch.bfloat16))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(d / "m16").eval()(IDS).logits.float()
    assert ((out - unmerged).norm() / unmerged.norm()).item() < 2e-2


def test_quantize_reports_measured_cost(setup):
    d, _ = setup
    r = run("merge", d / "q", d / "adapter", d / "m4", "--quantize", "--json")
    s = json.loads(r.stdout)
    cost = s["requantization_cost"]
    assert cost["layers"] == 6 and 0 < cost["output_error_mean"] < 1 and cost["adapter_change_lost_mean"] > 0
    cfg = json.loads((d / "m4" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"]
    # recompute one layer's "adapter change lost" by hand from the files
    from safetensors.torch import load_file

    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.format.layout import QuantizedTensor, companion_keys
    from qconvert.quant.reference import dequantize_4bit_ref

    base, new = load_file(str(d / "q" / "model.safetensors")), load_file(str(d / "m4" / "model.safetensors"))
    lora = LoraAdapter(d / "adapter")
    lost = []
    for m in sorted(lora.modules):
        k = m + ".weight"
        w = dequantize_4bit_ref(QuantizedTensor.from_state_dict(k, {c: base[c] for c in companion_keys(k, base.keys())}), torch.float32)
        merged = w + lora.delta(m)
        back = dequantize_4bit_ref(QuantizedTensor.from_state_dict(k, {c: new[c] for c in companion_keys(k, new.keys())}), torch.float32)
        lost.append(((back - merged).norm() / lora.delta(m).norm()).item())
    assert abs(sum(lost) / len(lost) - cost["adapter_change_lost_mean"]) < 1e-6
    # layers the adapter does not touch keep their 4-bit bytes exactly; the result passes the spec check and push's validation
    k = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(new[c], base[c]) for c in companion_keys(k, base.keys()))
    from qconvert.hub.push import validate_folder

    assert validate_folder(d / "m4")["kind"] == "quantized"
    r = run("merge", d / "q", d / "adapter", d / "m4b", "--quantize")
    assert "re-quantizing cost: relative output error" in r.stdout and "of the adapter's change lost" in r.stdout


def test_merge_errors(setup, tmp_path, tiny_models):
    d, _ = setup
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((d / "adapter" / "adapter_model.safetensors").read_bytes())
    r = run("merge", d / "q", dora, tmp_path / "o", ok=False)
    assert r.returncode == 1 and "DoRA" in r.stderr
    r = run("merge", tiny_models.llama(), d / "adapter", tmp_path / "o", ok=False)
    assert r.returncode == 1 and "not a 4-bit checkpoint" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    r = run("merge", d / "q", d / "adapter", tmp_path / "full", ok=False)
    assert r.returncode == 1 and "--overwrite" in r.stderr and (tmp_path / "full" / "x").read_text() == "mine"


def test_scaling_follows_peft_rank_alpha_patterns_and_rslora(setup, tmp_path):
    """rank_pattern / alpha_pattern / use_rslora give each module the scaling PEFT itself uses."""
    from peft import LoraConfig, get_peft_model

    from qconvert.export.lora_merge import LoraAdapter

    d, _ = setup
    for rslora in (False, True):
        cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                         rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 8}, alpha_pattern={"down_proj": 3})
        m = get_peft_model(float32_reference(d / "q"), cfg)
        m.save_pretrained(tmp_path / f"a{rslora}")
        lora = LoraAdapter(tmp_path / f"a{rslora}")
        seen = set()
        for name, mod in m.named_modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
                key = name.removeprefix("base_model.model.")
                assert lora.scaling(key) == mod.scaling["default"], (key, rslora)
                seen.add(mod.scaling["default"])
        assert len(seen) >= 3  # the patterns did produce different scalings


def test_base_original_merges_into_original_weights_with_warning(setup, tmp_path):
    from safetensors.torch import load_file

    from qconvert.export.lora_merge import LoraAdapter

    d, _ = setup
    r = run("merge", d / "q", d / "adapter", tmp_path / "mo", "--dtype", "float32", "--base-original", d / "src")
    assert "adapter was trained against the dequantized 4-bit weights" in r.stderr
    src, out = load_file(str(d / "src" / "model.safetensors")), load_file(str(tmp_path / "mo" / "model.safetensors"))
    lora = LoraAdapter(d / "adapter")
    k = "model.layers.0.self_attn.q_proj"
    assert torch.equal(out[k + ".weight"], src[k + ".weight"].float() + lora.delta(k))
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"].float())


@pytest.mark.slow
def test_float32_merge_of_peft_adapter_on_bitsandbytes_base_equals_peft_unmerged(tmp_path):
    """Spec 1.1: the merged weight is widen(dequant_logical(W4)) + scaling * B @ A. A bf16 model
    quantized by transformers + bitsandbytes, an adapter made by PEFT on that 4-bit model, merged at
    float32 and loaded by plain transformers, equals PEFT's unmerged model on bitsandbytes' dequantized
    base widened to float32 (built without bitsandbytes' CPU matmul, which may compute in bfloat16)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "src", hidden=100, intermediate=70, heads=5, kv_heads=5, dtype=torch.bfloat16)
    base = bnb_quantize_save(src, tmp_path / "bnb")
    torch.manual_seed(0)
    peft_bnb = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                              LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_bnb.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_bnb.save_pretrained(tmp_path / "adapter")
    unmerged = PeftModel.from_pretrained(bnb_float32_oracle(base), tmp_path / "adapter").eval()
    run("merge", base, tmp_path / "adapter", tmp_path / "m32", "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m32").eval()
    assert merged.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    with torch.no_grad():
        a, b = merged(IDS).logits, unmerged(IDS).logits
    assert ((a - b).norm() / b.norm()).item() < FLOAT32_REL, ((a - b).norm() / b.norm()).item()
