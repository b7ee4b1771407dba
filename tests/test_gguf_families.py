"""`qconvert export-gguf` of the families beyond llama/qwen: gemma2, gemma3 (text), phi3 and the MoE
families llama.cpp runs (qwen2_moe, qwen3_moe, mixtral; their routed experts stacked into gguf's
``ffn_*_exps``), and rope scaling (linear, yarn, llama3). For each, llama.cpp itself (llama_cpp)
loads the F16 export of a tiny model and its logits are within GGUF_F16_LOGIT_REL of transformers'
on the same model, and greedy tokens agree. The MoE models are exported from qconvert's 4-bit
checkpoint with 4-bit experts (spec section 14), whose dequantized values the reference holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_bpe_tokenizer, run_cli
from tolerances import GGUF_F16_LOGIT_REL

from qconvert.export.gguf_families import FAMILIES

# test_gguf skips (or, with QCONVERT_REQUIRE_GGUF=1, fails) at import without llama.cpp: so does this module
from test_gguf import GREEDY, PROMPT, VOCAB, _gguf_greedy, _gguf_logits, _hf_greedy, _hf_logits, _rel

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: family -> (config class, config overrides): small, with every feature the family's graph has switched on
DENSE = {
    "gemma2": ("Gemma2", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3Text", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8, num_hidden_layers=3,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    "phi3": ("Phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # longrope (factors per frequency: 32 for head_dim 64): llama.cpp takes the short ones when its context (256 here) is
    # within the original one, the long ones beyond; transformers by the sequence's length (12+ tokens here)
    "phi3-longrope-short": ("Phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256,
                                         rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=256,
                                                              short_factor=[1.0 + 0.05 * i for i in range(32)],
                                                              long_factor=[1.0 + 0.5 * i for i in range(32)]))),
    "phi3-longrope-long": ("Phi3", dict(max_position_embeddings=128, original_max_position_embeddings=8,
                                        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                                                             short_factor=[1.0 + 0.05 * i for i in range(32)],
                                                             long_factor=[1.0 + 0.5 * i for i in range(32)]))),
    "llama-linear": ("Llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "llama-yarn": ("Llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 32})),
    "llama-llama3": ("Llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "olmo2": ("Olmo2", {}),
    "olmo2-olmo3": ("Olmo3", dict(num_hidden_layers=4, sliding_window=8)),  # 3 sliding layers, then a full one
    "granite": ("Granite", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0)),
    "olmo": ("Olmo", dict(clip_qkv=0.3)),  # clamps a good share of q/k/v
    "glm4": ("Glm4", {}),
    "gptneox": ("GPTNeoX", {}),  # fused per-head query_key_value, partial rotary 0.25, parallel residual
    "arcee": ("Arcee", {}),
    "ernie4_5": ("Ernie4_5", {}),
    "seed_oss": ("SeedOss", {}),
    "stablelm": ("StableLm", dict(use_qkv_bias=True)),  # partial rotary 0.25, LayerNorm
    "phi": ("Phi", {}),  # llama.cpp's phi2: parallel attention and MLP, LayerNorm, partial rotary 0.5
    "nemotron": ("Nemotron", {}),  # LayerNorm1P (weights + 1), ReLU² MLP
    "cohere": ("Cohere", dict(logit_scale=0.5)),
    "cohere2": ("Cohere2", dict(logit_scale=0.5, num_hidden_layers=4, sliding_window=8)),  # rope on the 3 sliding layers only  # llama.cpp's command-r: parallel attention and MLP, scaled logits
    "smollm3": ("SmolLM3", dict(num_hidden_layers=4)),  # no rope on layer 3
    "starcoder2": ("Starcoder2", dict(sliding_window=None)),
    "gemma": ("Gemma", dict(head_dim=64)),
    "bloom": ("Bloom", {}),  # ALiBi, embedding LayerNorm, fused per-head query_key_value
    "gpt2": ("GPT2", {}),  # Conv1D weights [in, out], learned position embeddings
    "gpt_bigcode": ("GPTBigCode", {}),  # multi-query attention, learned position embeddings
    # q/k norms after the rope; "dynamic" rope with a fixed NTK alpha (the base stretched)
    "hunyuan_v1_dense": ("HunYuanDenseV1", dict(head_dim=64, rope_parameters=dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0))),
    "qwen2-yarn": ("Qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 32})),
}
MOE = {
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=512)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True, head_dim=64)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # MLA without a q LoRA (q_proj); softmax routing, scaled
    "deepseek_v2": ("DeepseekV2", dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                       head_dim=32, v_head_dim=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                       n_shared_experts=1, routed_scaling_factor=1.5)),
    # MLA with a q LoRA; a leading dense layer; sigmoid routing with a choice bias, two groups of which one is used, renormalised
    "deepseek_v3": ("DeepseekV3", dict(num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                       head_dim=32, v_head_dim=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                       n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1,
                                       routed_scaling_factor=2.5, norm_topk_prob=True)),
    # deepseek_v3's MLA (llama.cpp runs it as deepseek2) with glm4_moe's routing
    "glm4_moe_lite": ("Glm4MoeLite", dict(num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                          head_dim=32, v_head_dim=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                          n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1,
                                          routed_scaling_factor=1.8, norm_topk_prob=True)),
    # qwen3-style attention (q/k norms), deepseek_v3's routing renormalised, a leading dense layer
    "dots1": ("Dots1", dict(head_dim=64, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, n_shared_experts=1,
                            first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                            norm_topk_prob=True, sliding_window=None)),
    # experts fused as input_linear [E, 2I, H] (gate and up) and output_linear; granite's multipliers
    "granitemoe": ("GraniteMoe", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=256, embedding_multiplier=2.0,
                                      residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0)),
    "granitemoeshared": ("GraniteMoeShared", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=256,
                                                  shared_intermediate_size=512, embedding_multiplier=2.0, logits_scaling=4.0)),
    "olmoe": ("Olmoe", dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, intermediate_size=256, norm_topk_prob=False)),
    # partial rotary, q/k norms, q/k/v biases, a leading dense layer, deepseek_v3's routing (here not renormalised)
    "glm4_moe": ("Glm4Moe", dict(head_dim=64, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, n_shared_experts=1,
                                 first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1, routed_scaling_factor=1.8,
                                 norm_topk_prob=False, use_qk_norm=True, attention_bias=True)),
    # attention sinks, biases everywhere, a sliding layer then a full one, yarn rope as gpt-oss releases set it
    # (truncate false), the clamped SwiGLU over interleaved gate/up experts held [E, in, out]
    "gpt_oss": ("GptOss", dict(head_dim=64, num_local_experts=4, num_experts_per_tok=2, intermediate_size=256, sliding_window=8,
                               rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                    original_max_position_embeddings=4096, rope_theta=150000.0))),
    # a leading dense layer, softmax routing with the moe_statics choice bias, renormalised; a shared expert
    "ernie4_5_moe": ("Ernie4_5_Moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=1,
                                          moe_layer_start_index=1, num_hidden_layers=3)),
    # q/k norms after the rope, an always-added shared MLP, softmax routing renormalised
    "hunyuan_v1_moe": ("HunYuanMoEV1", dict(head_dim=64, num_experts=4, moe_topk=2, intermediate_size=256)),
}
#: the architecture each MoE family is written as
MOE_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
            "glm4_moe": "glm4moe", "olmoe": "olmoe", "dots1": "dots1", "granitemoe": "granitemoe",
            "granitemoeshared": "granitemoe", "gpt_oss": "gpt-oss", "glm4_moe_lite": "deepseek2",
            "ernie4_5_moe": "ernie4_5-moe", "hunyuan_v1_moe": "hunyuan-moe"}


def _build(folder, family: str, table: dict):
    """A tiny float32 ``family`` model with sharp logits (its head x 25, as a trained model's) and a tokenizer."""
    import transformers

    cls, over = table[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls + "Config")(**{**COMMON, **over})
    model_cls = getattr(transformers, cls.removesuffix("Text") + "ForCausalLM", None) or getattr(transformers, cls + "LMHeadModel")
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25)
        for n, p in model.named_parameters():
            if family.startswith("phi3-longrope") and n.endswith("qkv_proj.weight"):
                p[: cfg.hidden_size].mul_(4)  # sharper attention: which rope factors are used shows in the logits
            if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "query_key_value.bias", "c_attn.bias")) or (family == "starcoder2" and n.endswith(".bias")):
                p.normal_(0, 0.5)  # zero at init: make the biases count
            if n.endswith("norm.weight"):
                p.normal_(0, 0.2)  # Gemma's norms start at zero (1 + w): make the +1 count
            if n.endswith("mlp.gate.weight") and p.abs().max() == 0:
                p.normal_(0, 0.5)  # deepseek's routers start at zero: make the routing count
            if n.endswith("moe_statics.e_score_correction_bias"):
                p.normal_(0, 0.3)  # ernie4_5_moe's expert choice bias (a parameter; deepseek's is a buffer)
            if family == "ernie4_5_moe" and ".experts." in n:
                p.mul_(10)  # experts whose output counts, so that which ones the choice bias picks shows in the logits
            if family == "gpt_oss" and n.endswith(("sinks", "_bias", "router.bias", "o_proj.bias")):
                p.normal_(0, 1.0 if n.endswith("sinks") else 0.5)  # sinks and biases (most start at zero) count
            if family == "gpt_oss" and n.endswith("gate_up_proj"):
                p.mul_(60)  # gate and up values past the SwiGLU's limit (7), so its clamps count
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)  # deepseek_v3's expert choice bias
    model.save_pretrained(folder)
    make_bpe_tokenizer(folder)
    return model


def _export(model, out):
    return json.loads(run_cli("export-gguf", model, out, "--json", "--no-check").stdout)


def _assert_same(out, reference):
    got, want = _gguf_logits(out, PROMPT), _hf_logits(reference, PROMPT)
    assert _rel(got, want) < GGUF_F16_LOGIT_REL["f16"], _rel(got, want)
    assert _gguf_greedy(out, PROMPT, GREEDY) == _hf_greedy(reference, PROMPT, GREEDY)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(DENSE))
def test_dense_families_and_rope_scaling_match_transformers(tmp_path, family):
    model = _build(tmp_path / "model", family, DENSE)  # (not named phi3: llama.cpp then looks for Phi-3's own special tokens)
    s = _export(tmp_path / "model", tmp_path / "m.gguf")
    assert s["architecture"] == {"phi": "phi2", "cohere": "command-r", "hunyuan_v1_dense": "hunyuan-dense",
                                 "gpt_bigcode": "starcoder"}.get(family, family.split("-")[0])
    _assert_same(tmp_path / "m.gguf", model)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_families_with_4bit_experts_match_transformers(tmp_path, family):
    """Exported from qconvert's 4-bit checkpoint (experts in 4 bits); the reference is transformers on
    its dequantized values (compare's float32 model of the checkpoint)."""
    import gguf

    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.compare import _HF

    model = _build(tmp_path / "src", family, MOE)
    quantize_checkpoint(str(tmp_path / "src"), tmp_path / "q", compute_dtype="float32", experts="4bit")
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.conformance import check_checkpoint

    dense = getattr(model.config, "first_k_dense_replace", 0) or getattr(model.config, "moe_layer_start_index", 0) or 0
    moe_layers = model.config.num_hidden_layers - dense
    in_4bit = [k for k in check_checkpoint(Checkpoint(tmp_path / "q")) if ".experts." in k or "_linear." in k]
    assert len(in_4bit) == moe_layers * {"granitemoe": 2, "granitemoeshared": 4, "gpt_oss": 2}.get(family, 3 * 4)  # every expert in 4 bits (granitemoe's and gpt_oss's fused in two)
    s = _export(tmp_path / "q", tmp_path / "m.gguf")
    names = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    exps = names[f"blk.{model.config.num_hidden_layers - 1}.ffn_gate_exps.weight"]
    assert list(exps.shape) == [256, 256 if family != "mixtral" else 512, 4]  # ggml order: in, out, experts
    assert s["architecture"] == MOE_ARCH[family]
    reference = _HF(str(tmp_path / "q"), None).model
    last = model.config.num_hidden_layers - 1
    router = names[f"blk.{last}.ffn_gate_inp.weight"]  # kept F32 (as llama.cpp's converter keeps it): an F16 router flips near ties
    assert router.tensor_type == gguf.GGMLQuantizationType.F32
    router_name = {"granitemoe": "block_sparse_moe.router.weight", "gpt_oss": "mlp.router.weight",
                   "hunyuan_v1_moe": "mlp.gate.wg.weight"}.get(family.removesuffix("shared"), "mlp.gate.weight")
    assert np.array_equal(router.data, reference.state_dict()[f"model.layers.{last}.{router_name}"].numpy())
    _assert_same(tmp_path / "m.gguf", reference)


@pytest.mark.slow
def test_moe_export_check_on_the_built_in_prompts_is_within_the_f16_bound(tmp_path):
    """export-gguf's own check (compare on the built-in prompts, tokenized) of the qwen3_moe of
    test_moe_families: with the router in F16 one position's near-tied expert choice flipped, giving a
    logit error of 1.1e-2 of the largest logit (docs/gguf.md); in F32 it is within the dense models' bound."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.compare import compare

    _build(tmp_path / "src", "qwen3_moe", MOE)
    quantize_checkpoint(str(tmp_path / "src"), tmp_path / "q", compute_dtype="float32", experts="4bit")
    _export(tmp_path / "q", tmp_path / "m.gguf")
    r = compare(str(tmp_path / "q"), str(tmp_path / "m.gguf"), tolerance=1e-2, new_tokens=0)
    assert r["max_rel_logit_error"] < GGUF_F16_LOGIT_REL["f16"] and r["top1_agreement"] == 1.0, r["max_rel_logit_error"]


@pytest.mark.slow
def test_fused_experts_are_split_into_gate_and_up(tmp_path):
    """A checkpoint holding the experts fused as the model holds them (gate_up_proj [E, 2I, H],
    down_proj [E, H, I]; spec 14's fused form) exports to the same stacked tensors."""
    from safetensors.torch import save_file

    model = _build(tmp_path / "m", "qwen3_moe", MOE)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    _export(tmp_path / "m", tmp_path / "m.gguf")
    _assert_same(tmp_path / "m.gguf", model)


@pytest.mark.slow  # (the first transformers import in the process)
@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": False}, "always renormalises the top-k"),
    ({"mlp_only_layers": [1]}, "dense layers between the MoE layers"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}}, "rope_type 'llama3' is not exported for qwen3moe"),
])
def test_configurations_llama_cpp_does_not_compute_are_refused_by_name(tmp_path, change, message):
    from qconvert.errors import FormatError
    from qconvert.export.gguf import export_gguf

    _build(tmp_path / "m", "qwen3_moe", MOE)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(FormatError, match=message):
        export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gemma_query_scaling_other_than_llama_cpps_is_refused(tmp_path):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "head_dim": 64, "num_hidden_layers": 2, "query_pre_attn_scalar": 64}
    assert check(FAMILIES["Gemma2ForCausalLM"], cfg, tmp_path) == []
    with pytest.raises(FormatError, match="query_pre_attn_scalar 32 is not the 64"):
        check(FAMILIES["Gemma2ForCausalLM"], {**cfg, "query_pre_attn_scalar": 32}, tmp_path)
    assert check(FAMILIES["Gemma2ForCausalLM"], {**cfg, "num_hidden_layers": 46, "query_pre_attn_scalar": 64, "head_dim": 32}, tmp_path) == []


def test_olmo3_sliding_rope_other_than_llama_cpps_is_refused(tmp_path):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    rope = {"rope_type": "default", "rope_theta": 5e5}
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 4, "rope_parameters": {"full_attention": rope, "sliding_attention": rope}}
    assert check(FAMILIES["Olmo3ForCausalLM"], cfg, tmp_path) == []
    other = {**cfg, "rope_parameters": {"full_attention": rope, "sliding_attention": {**rope, "rope_theta": 1e4}}}
    with pytest.raises(FormatError, match="not what llama.cpp's olmo2 graph runs them with"):
        check(FAMILIES["Olmo3ForCausalLM"], other, tmp_path)


def test_olmoe_with_grouped_query_attention_is_refused(tmp_path):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "norm_topk_prob": False}
    assert check(FAMILIES["OlmoeForCausalLM"], cfg, tmp_path) == []
    with pytest.raises(FormatError, match="num_key_value_heads 2 < num_attention_heads: llama.cpp's olmoe graph reads k and v"):
        check(FAMILIES["OlmoeForCausalLM"], {**cfg, "num_key_value_heads": 2}, tmp_path)


def test_a_phi3_sliding_window_gets_a_note(tmp_path):
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert check(FAMILIES["Phi3ForCausalLM"], cfg, tmp_path) == []
    (note,) = check(FAMILIES["Phi3ForCausalLM"], {**cfg, "sliding_window": 2047}, tmp_path)
    assert note.startswith("llama.cpp runs phi3 without its sliding window (2047 tokens)")


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "no attention biases"),
    ({"rope_interleave": False}, "rope_interleave false"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32}},
     "only the default rope is exported for deepseek2"),
    ({"model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "deepseek_v2 by its best one"),
    ({"model_type": "glm4_moe_lite", "rope_interleave": False}, "rope_interleave false"),
])
def test_deepseek_configurations_llama_cpp_computes_differently_are_refused(tmp_path, change, message):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"model_type": "deepseek_v3", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_interleave": True}
    assert check(FAMILIES["DeepseekV3ForCausalLM"], cfg, tmp_path) == []
    with pytest.raises(FormatError, match=message):
        check(FAMILIES["DeepseekV3ForCausalLM"], {**cfg, **change}, tmp_path)


@pytest.mark.slow
def test_a_deepseek_lora_on_kv_b_proj_is_refused_as_a_gguf_adapter(tmp_path):
    """llama.cpp reads kv_b_proj as two tensors (attn_k_b, attn_v_b): a LoRA pair for it has nothing to apply to."""
    from peft import LoraConfig, get_peft_model

    from qconvert.errors import OptionError
    from qconvert.export.gguf import export_gguf

    model = _build(tmp_path / "m", "deepseek_v2", MOE)
    get_peft_model(model, LoraConfig(r=4, target_modules=["kv_b_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(OptionError, match="llama.cpp reads split in two or reordered"):
        export_gguf(str(tmp_path / "m"), tmp_path / "a.gguf", adapter=str(tmp_path / "a"), lora_only=True)


@pytest.mark.slow
def test_deepseek_multi_token_prediction_layers_are_left_out_with_a_note(tmp_path):
    """A layer past num_hidden_layers (deepseek_v3's MTP layer, which transformers does not load) is
    not written, and the summary says so; the rest is written as without it."""
    import gguf
    from safetensors.torch import load_file, save_file

    _build(tmp_path / "m", "deepseek_v2", MOE)
    (f,) = (tmp_path / "m").glob("*.safetensors")
    sd = load_file(str(f))
    sd.update({k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in sd.items() if k.startswith("model.layers.1.")})
    save_file(sd, str(f), metadata={"format": "pt"})
    s = _export(tmp_path / "m", tmp_path / "m.gguf")
    (note,) = s["notes"]
    assert note.startswith(f"{sum(k.startswith('model.layers.2.') for k in sd)} tensors of layers past num_hidden_layers (2")
    assert not [t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name.startswith("blk.2.")]


def test_phi3_longrope_gets_a_note_on_how_llama_cpp_picks_the_factors(tmp_path):
    from qconvert.export.gguf_families import FAMILIES, check

    rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 4096, "short_factor": [1.0], "long_factor": [2.0]}
    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 131072, "rope_parameters": rope}
    (note,) = check(FAMILIES["Phi3ForCausalLM"], cfg, tmp_path)
    assert note.startswith("longrope: llama.cpp takes the long factors whenever its context size is above 4096 tokens")


@pytest.mark.parametrize("arch, change, message", [
    ("SmolLM3ForCausalLM", {"no_rope_layers": [1, 0, 1, 1]}, "leaves rope out of every fourth layer, no other"),
    ("Starcoder2ForCausalLM", {"sliding_window": 4096}, "starcoder2 graph has no sliding window"),
    ("Starcoder2ForCausalLM", {"hidden_act": "gelu"}, "computes the tanh GELU"),
])
def test_smollm3_and_starcoder2_configurations_llama_cpp_does_not_compute_are_refused(tmp_path, arch, change, message):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4}
    assert check(FAMILIES[arch], {**cfg, "no_rope_layers": [1, 1, 1, 0]}, tmp_path) == []
    with pytest.raises(FormatError, match=message):
        check(FAMILIES[arch], {**cfg, **change}, tmp_path)


@pytest.mark.parametrize("arch, key", [("StableLmForCausalLM", "qk_layernorm"), ("PhiForCausalLM", "qk_layernorm"), ("CohereForCausalLM", "use_qk_norm")])
def test_per_head_qk_layernorms_are_refused(tmp_path, arch, key):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert check(FAMILIES[arch], cfg, tmp_path) == []
    with pytest.raises(FormatError, match=f"{key} \\(per-head q/k LayerNorms\\) is not exported"):
        check(FAMILIES[arch], {**cfg, key: True}, tmp_path)


def test_exaone4_is_refused_with_the_reason(tmp_path):
    from qconvert.errors import FormatError
    from qconvert.export.gguf import _family

    with pytest.raises(FormatError, match="'Exaone4ForCausalLM' is not exported: llama.cpp applies exaone4's sliding window"):
        _family({"architectures": ["Exaone4ForCausalLM"]}, tmp_path)


#: the architecture sweep's classes (docs/architectures.md) that llama.cpp runs: those its vendored converter
#: (llama-cpp-python 0.3.36) has a model for, matched without case (its MPT and PhiMoE spellings differ), plus
#: Llama4ForCausalLM (the text model of its llama4 graph), read 2026-12-06
SWEEP_RUN_BY_LLAMA_CPP = """
    AfmoeForCausalLM ApertusForCausalLM ArceeForCausalLM BambaForCausalLM BitNetForCausalLM BloomForCausalLM CohereForCausalLM
    Cohere2ForCausalLM Cohere2MoeForCausalLM DeepseekV2ForCausalLM DeepseekV3ForCausalLM DeepseekV32ForCausalLM DeepseekV4ForCausalLM
    Dots1ForCausalLM Ernie4_5ForCausalLM Ernie4_5_MoeForCausalLM Exaone4ForCausalLM ExaoneMoeForCausalLM FalconForCausalLM
    FalconH1ForCausalLM FalconMambaForCausalLM GPT2LMHeadModel GPTBigCodeForCausalLM GPTNeoXForCausalLM Gemma2ForCausalLM
    Gemma3ForCausalLM Gemma3ForConditionalGeneration Gemma4ForCausalLM Gemma4ForConditionalGeneration
    Gemma4UnifiedForConditionalGeneration GemmaForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM Glm4MoeLiteForCausalLM GlmForCausalLM
    GlmMoeDsaForCausalLM GptOssForCausalLM GraniteForCausalLM GraniteMoeForCausalLM GraniteMoeHybridForCausalLM
    GraniteMoeSWAForCausalLM GraniteMoeSharedForCausalLM GraniteSWAForCausalLM HYV3ForCausalLM HYV4ForCausalLM HrmTextForCausalLM
    HunYuanDenseV1ForCausalLM HunYuanMoEV1ForCausalLM Jais2ForCausalLM JambaForCausalLM KimiLinearForCausalLM LagunaForCausalLM
    Lfm2ForCausalLM Lfm2MoeForCausalLM Llama4ForCausalLM LlamaForCausalLM Mamba2ForCausalLM MambaForCausalLM MellumForCausalLM
    MiMoV2FlashForCausalLM MiniCPM3ForCausalLM MiniMaxM2ForCausalLM MistralForCausalLM MixtralForCausalLM MptForCausalLM
    NemotronForCausalLM NemotronHForCausalLM Olmo2ForCausalLM Olmo3ForCausalLM OlmoForCausalLM OlmoeForCausalLM PhiForCausalLM
    Phi3ForCausalLM PhimoeForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM Qwen3NextForCausalLM
    Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM Qwen4ExpForCausalLM SeedOssForCausalLM SmolLM3ForCausalLM SolarOpenForCausalLM
    StableLmForCausalLM Starcoder2ForCausalLM
""".split()


@pytest.mark.parametrize("arch", [a for a in SWEEP_RUN_BY_LLAMA_CPP if a not in FAMILIES])
def test_every_swept_family_llama_cpp_runs_is_exported_or_refused_with_its_own_reason(tmp_path, arch):
    """Each one not exported (gguf_families.FAMILIES) is refused in one line naming the architecture and what
    llama.cpp computes differently or what qconvert does not write (REFUSED), never the generic message."""
    from qconvert.errors import FormatError
    from qconvert.export.gguf import _family
    from qconvert.export.gguf_families import REFUSED

    with pytest.raises(FormatError) as e:
        _family({"architectures": [arch]}, tmp_path)
    (line,) = str(e.value).splitlines()
    assert f"architecture {arch!r} is not exported: {REFUSED[arch]}" in line
    assert "not exported by qconvert yet" not in line and len(REFUSED[arch]) > 40


@pytest.mark.slow
def test_a_gpt_neox_lora_on_query_key_value_is_refused_as_a_gguf_adapter(tmp_path):
    """llama.cpp reads gpt_neox's query_key_value with its rows reordered: a LoRA pair written as PEFT
    holds it would apply to the wrong rows."""
    from peft import LoraConfig, get_peft_model

    from qconvert.errors import OptionError
    from qconvert.export.gguf import export_gguf

    model = _build(tmp_path / "m", "gptneox", DENSE)
    get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value"])).save_pretrained(tmp_path / "a")
    with pytest.raises(OptionError, match="llama.cpp reads split in two or reordered"):
        export_gguf(str(tmp_path / "m"), tmp_path / "a.gguf", adapter=str(tmp_path / "a"), lora_only=True)


@pytest.mark.parametrize("change, message", [
    ({"swiglu_limit": 8.0}, "swiglu_limit 8.0: llama.cpp's gpt-oss graph computes the clamped SwiGLU with limit 7.0, no other"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha 1.5: llama.cpp's gpt-oss graph computes the clamped SwiGLU with alpha 1.702"),
    ({"attention_bias": False}, "attention_bias false: llama.cpp's gpt-oss graph needs the attention output's bias"),
    ({"sliding_window": None}, "no sliding-window layer .* llama.cpp's gpt-oss graph needs one"),
    ({"layer_types": ["full_attention"] * 2}, "no sliding-window layer"),
])
def test_gpt_oss_configurations_llama_cpp_computes_differently_are_refused(tmp_path, change, message):
    from qconvert.errors import FormatError
    from qconvert.export.gguf_families import FAMILIES, check

    cfg = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "num_local_experts": 4, "swiglu_alpha": 1.702,
           "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
           "swiglu_limit": 7.0, "attention_bias": True, "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "rope_theta": 1.5e5}}
    assert check(FAMILIES["GptOssForCausalLM"], cfg, tmp_path) == []
    with pytest.raises(FormatError, match=message):
        check(FAMILIES["GptOssForCausalLM"], {**cfg, **change}, tmp_path)
    (note,) = check(FAMILIES["GptOssForCausalLM"], {**cfg, "rope_parameters": {**cfg["rope_parameters"], "truncate": False}}, tmp_path)
    assert note.startswith("yarn with truncate false: llama.cpp rounds the correction range to whole dimensions")


@pytest.mark.slow
def test_gpt2_from_its_4bit_checkpoint_matches_transformers(tmp_path):
    """A 4-bit Conv1D weight is stored and dequantized [out, in] (a 16-bit one is [in, out], the DENSE
    test): both are written as the [out, in] llama.cpp reads."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.compare import _HF

    _build(tmp_path / "src", "gpt2", DENSE)
    quantize_checkpoint(str(tmp_path / "src"), tmp_path / "q", compute_dtype="float32")
    _export(tmp_path / "q", tmp_path / "m.gguf")
    _assert_same(tmp_path / "m.gguf", _HF(str(tmp_path / "q"), None).model)
