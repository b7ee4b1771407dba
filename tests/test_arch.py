"""Architecture coverage: one family per rule through both tools, byte for byte (tools/arch_sweep.py
runs every causal-LM family; this is its CI subset), plus the "never lose a tensor" guarantees.

The families below are the ones whose tensors transformers renames, merges, keeps in float32 or
transposes: before the plan followed transformers' conversion mapping, qconvert dropped the MoE
experts and routers of the eight MoE families and gpt_neox's ``embed_out.weight`` without a word,
wrote deepseek_v3's ``e_score_correction_bias`` in bf16, and refused gpt2 and openai-gpt.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli_here as run_cli

_spec = importlib.util.spec_from_file_location("arch_sweep", Path(__file__).parent.parent / "tools" / "arch_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

RULES = {  # family -> the rule it stands for (and whether the CI also runs a forward on the output)
    "llama": ("plain decoder", True),
    "gemma": ("tied head", False),
    "qwen2": ("biases", False),
    "phi3": ("fused projections", False),
    "bert": ("encoder (BertLMHeadModel)", False),
    "gpt2": ("Conv1D, quantized transposed", True),
    "openai-gpt": ("Conv1D", False),
    "gpt_neox": ("embed_out renamed to lm_head on load", True),
    "mixtral": ("MoE experts merged on load (mixtral mapping)", True),
    "phimoe": ("MoE experts merged on load", False),
    "qwen2_moe": ("MoE experts merged on load (qwen2_moe mapping), shared expert", False),
    "qwen3_moe": ("MoE experts merged on load", False),
    "olmoe": ("MoE experts merged on load", False),
    "granitemoe": ("MoE experts merged on load (granitemoe mapping)", False),
    "deepseek_v2": ("MoE experts merged on load, MLA", False),
    "deepseek_v3": ("MoE experts merged on load, fp32-kept e_score_correction_bias", True),
    "hy_v4": ("a quantized weight in _keep_in_fp32_modules_strict: quantized from float32", False),
    "xlnet": ("config.json dtype is model.dtype: a float32-declared parameter comes first", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RULES))
def test_family_byte_identical_with_anchor(tmp_path, family):
    row = sweep.sweep_one(family, tmp_path, forward=RULES[family][1])
    assert row["status"] == "identical", row
    assert row["identical"] == row["total"] > 0 and row["quantized"] > 0
    if RULES[family][1]:
        assert row["loads"] == "yes", row


def test_fp32_kept_module_stays_float32(tmp_path):
    """deepseek_v3's _keep_in_fp32_modules_strict: the bf16 source's e_score_correction_bias comes out
    float32 (as transformers saves it), and the summary says why its dtype changed."""
    from qconvert.convert.quantize import quantize_checkpoint

    src = sweep.build_source("deepseek_v3", tmp_path / "src")
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert load_file(str(src / "model.safetensors"))[key].dtype == torch.bfloat16
    summary = quantize_checkpoint(str(src), tmp_path / "out")  # the summary --json prints
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[key]
    assert got.dtype == torch.float32
    assert torch.equal(got, load_file(str(src / "model.safetensors"))[key].float())
    assert summary["cast"] == [{"tensor": key, "reason": "kept in float32 by transformers (_keep_in_fp32_modules_strict): bfloat16 -> float32"}]


def test_no_source_tensor_lost_in_moe(tmp_path):
    """Every expert weight and router of the source is in the output, quantized or as it was
    (``--experts 16bit``: the anchor's choice; tests/test_experts4bit.py covers the 4-bit default)."""
    from qconvert.convert.quantize import quantize_checkpoint

    src = sweep.build_source("qwen3_moe", tmp_path / "src")
    summary = quantize_checkpoint(str(src), tmp_path / "out", experts="16bit")
    assert summary["dropped"] == [] and summary["cast"] == []
    source, out = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    experts = [k for k in source if ".experts." in k]
    assert len(experts) == 2 * 4 * 3  # 2 layers x 4 experts x gate/up/down
    for k in source:
        assert k in out, k
        if f"{k}.absmax" not in out:  # not quantized: the source bytes
            assert torch.equal(out[k], source[k]), k
    assert not any(f"{k}.absmax" in out for k in experts)  # 3-D parameters after transformers' merge: not nn.Linear
    assert "model.layers.0.mlp.gate.weight" in out


@pytest.mark.slow
def test_falcon_refused_because_anchor_quantizes_nothing(tmp_path):
    """transformers 5.23's Falcon uses FalconLinear (an nn.Linear subclass), which bitsandbytes'
    integration does not replace: the anchor writes no 4-bit tensor, and qconvert says so."""
    src = sweep.build_source("falcon", tmp_path / "src")
    anchor = sweep.anchor(src, tmp_path / "anchor")
    assert not any(".quant_state." in k for k in sweep.tensors(anchor))
    r = run_cli("quantize", src, tmp_path / "out", ok=False)
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith("qconvert: error: ") and "Traceback" not in r.stderr
    assert "no tensor would be quantized: transformers + bitsandbytes quantizes no layer of FalconForCausalLM" in r.stderr
    assert "its linear layers are FalconLinear, subclasses it leaves alone" in r.stderr


def test_unplaceable_tensor_is_an_error_naming_it(tmp_path):
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import QuantizationError

    src = sweep.build_source("mixtral", tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.block_sparse_moe.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"1 tensor\(s\) have no place in MixtralForCausalLM .*: model\.layers\.0\.block_sparse_moe\.extra_proj\.weight"):
        quantize_checkpoint(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite(folder: Path, change) -> None:
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("family, victim, cli", [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", True),  # what the old plan dropped
    ("llama", "model.layers.0.post_attention_layernorm.weight", False),
])
@pytest.mark.slow
def test_verify_against_fails_on_a_missing_tensor(tmp_path, family, victim, cli):
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.errors import FormatError

    src = sweep.build_source(family, tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "out", experts="16bit")  # 4-bit experts: tests/test_experts4bit.py
    assert verify_checkpoint(tmp_path / "out", against=str(src))["error"]["unquantized_identical"] is True
    _rewrite(tmp_path / "out", lambda sd: sd.pop(victim))
    structural = re.escape(f"needs, e.g. '{victim}'")
    if family == "llama":  # verify's structure check (the model config.json builds) sees it without --against
        with pytest.raises(FormatError, match=structural):
            verify_checkpoint(tmp_path / "out")
    else:  # a family whose tensors transformers renames on load: only the source can tell
        verify_checkpoint(tmp_path / "out")
    with pytest.raises(FormatError, match=f"source tensor '{victim}' of .* is missing from the output|{structural}"):
        verify_checkpoint(tmp_path / "out", against=str(src))
    if cli:
        r = run_cli("verify", tmp_path / "out", "--against", src, ok=False)
        assert r.returncode == 1 and r.stderr.startswith("qconvert: error: ") and victim in r.stderr


def test_verify_against_fails_on_a_wrong_dtype(tmp_path):
    """The fp32-kept bias written in bf16 (what the old plan wrote) fails verification."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.errors import FormatError

    src = sweep.build_source("deepseek_v3", tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "out")
    verify_checkpoint(tmp_path / "out", against=str(src))
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    _rewrite(tmp_path / "out", lambda sd: sd.__setitem__(key, sd[key].to(torch.bfloat16)))
    with pytest.raises(FormatError, match=f"tensor '{key}' has dtype bfloat16, transformers would save float32"):
        verify_checkpoint(tmp_path / "out", against=str(src))


@pytest.mark.slow
def test_verify_against_allows_only_stated_drops(tmp_path):
    """A tied head saved anyway is dropped (as transformers does); the summary prints it with its
    reason, and verify accepts its absence and lists it."""
    from helpers import make_tiny_decoder

    from qconvert.convert.verify import verify_checkpoint

    src = make_tiny_decoder(tmp_path / "src", "GemmaForCausalLM", True, {}, keep_tied_head=True)
    r = run_cli("quantize", src, tmp_path / "out")
    assert "not written: lm_head.weight (tied to model.embed_tokens.weight: transformers saves the pair once)" in r.stdout
    v = verify_checkpoint(tmp_path / "out", against=str(src))
    assert v["error"]["dropped"] == [{"tensor": "lm_head.weight", "reason": "tied to model.embed_tokens.weight: transformers saves the pair once"}]


def test_uses_conv1d_matches_the_built_models():
    """The cheap source-file check that merge uses agrees with the module types of built models."""
    from transformers.pytorch_utils import Conv1D

    from qconvert.convert.meta import uses_conv1d

    for family in ("gpt2", "openai-gpt", "llama", "gpt_neox", "bert", "mixtral"):
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(sweep.tiny_config(family))
        has = any(isinstance(m, Conv1D) for m in model.modules())
        assert uses_conv1d({"model_type": family}) == has, family


def test_modeling_source_found_without_transformers_is_transformers_own():
    """merge finds a model type's modeling file without importing transformers when the type names its
    own folder; for every model type this transformers knows, that is the file its mapping names."""
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    from qconvert.convert.meta import _modeling_source

    for mt in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(mt)
        assert _modeling_source(mt) == Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py", mt


def test_conv1d_checkpoint_loads_and_merges(tmp_path):
    """qconvert's own runtime takes the transposed Conv1D weights (it refused them before): load_model
    runs the bf16 gpt2 of the sweep as the dequantize-then-run reference does, and a merge writes each
    Conv1D weight back as [in, out]. tests/test_conv1d.py covers the family end to end."""
    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.merge import merge_adapter
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.quant.reference import dequantize_4bit_ref

    from helpers import float32_reference
    from tolerances import FLOAT32_REL

    src = sweep.build_source("gpt2", tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    model = qconvert.load_model(tmp_path / "q", backend="reference", dtype=torch.float32)
    x = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        ours, ref = model(x).logits, float32_reference(tmp_path / "q")(x).logits
    assert ((ours - ref).norm() / ref.norm()).item() < FLOAT32_REL
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"],
                                                              "fan_in_fan_out": True}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(192, 2)}, str(adapter / "adapter_model.safetensors"))
    merge_adapter(str(tmp_path / "q"), str(adapter), tmp_path / "merged", dtype="float32")
    key = "transformer.h.0.attn.c_attn.weight"
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))[key]
    assert torch.equal(merged, dequantize_4bit_ref(Checkpoint(tmp_path / "q").quantized(key), torch.float32).T)
    assert merged.shape == load_file(str(src / "model.safetensors"))[key].shape == (64, 192)


def test_keys_transformers_ignores_are_dropped_with_the_reason(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer (model.layers.61) that the model
    class tells transformers to ignore: the plan drops it and says why, in --dry-run --json too."""
    from qconvert.convert.plan import make_plan
    from qconvert.io.checkpoint import Checkpoint

    src = sweep.build_source("deepseek_v3", tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.61.eh_proj.weight"] = torch.ones(8, 8, dtype=torch.bfloat16)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    plan = make_plan(Checkpoint(src))
    assert plan.dropped == {"model.layers.61.eh_proj.weight": "transformers ignores it on load (the model's _keys_to_ignore_on_load_unexpected)"}
    assert len(plan.items) + len(plan.dropped) == len(sd)  # every source tensor accounted for
    from qconvert.convert.quantize import quantize_checkpoint

    dry = quantize_checkpoint(str(src), tmp_path / "out", dry_run=True)  # what --dry-run --json prints
    assert dry["dropped"] == [{"tensor": "model.layers.61.eh_proj.weight", "reason": plan.dropped["model.layers.61.eh_proj.weight"]}]


def test_a_change_in_transformers_conversions_is_an_error(tmp_path, monkeypatch):
    """The plan's output names are checked against transformers' own save-time revert: if transformers
    ever wrote other names than the plan (a changed conversion mapping), quantize stops, naming them."""
    import transformers.core_model_loading as cml

    from qconvert.convert.plan import make_plan
    from qconvert.errors import QuantizationError
    from qconvert.io.checkpoint import Checkpoint

    src = sweep.build_source("mixtral", tmp_path / "src")
    assert any(".experts.0.w1.weight" in i.out_key for i in make_plan(Checkpoint(src)).items)
    real = cml.revert_weight_conversion

    def renamed(model, state_dict):
        return {k.replace(".experts.0.w1.", ".experts.0.gate."): v for k, v in real(model, state_dict).items()}

    monkeypatch.setattr(cml, "revert_weight_conversion", renamed)
    with pytest.raises(QuantizationError, match=r"output names differ from what transformers saves .*experts\.0\.(gate|w1)\.weight"):
        make_plan(Checkpoint(src))
