"""What export-gguf does differently per model family, as llama.cpp's graphs for them compute.

Each Hugging Face architecture that export-gguf writes has a :class:`Family`: the gguf package's
architecture name (its tensor name map does the naming), whether q/k rows are permuted for llama's
interleaved rotary pairs, whether RMSNorm weights get +1 (Gemma's norm computes ``x * (1 + w)``,
llama.cpp's ``x * w``), the family's extra metadata, and the configurations llama.cpp's graph does
not compute, which are refused by name (:func:`check`). Facts from llama.cpp's src/models/*.cpp and
its converter (llama-cpp-python 0.3.36's vendored copy), read, not copied:

- gemma2 / gemma3 scale queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models, which
  llama.cpp recognises by their layer count: 46 for gemma2, 62 for gemma3), where transformers uses
  ``query_pre_attn_scalar``; gemma2 soft-caps attention and final logits; both read the sliding
  window and (as an array) which layers slide; gemma3 reads the sliding layers' rope base apart.
- phi3 takes the fused ``qkv_proj`` and ``gate_up_proj`` as they are; llama.cpp runs it without
  its sliding window (a warning in llama.cpp), so it differs beyond that many tokens of context.
- qwen2moe never renormalises the top-k routing weights and qwen3moe always does; both need experts
  in every layer. mixtral is llama's graph with experts (always renormalised).
- rope scaling: linear and yarn through the general keys every graph reads; llama3 through a
  ``rope_freqs`` tensor that llama's graph reads (other graphs ignore it, so it is refused there).
- deepseek_v2 / deepseek_v3 run as llama.cpp's deepseek2 graph with MLA "absorption": one KV head
  of kv_lora_rank + qk_rope_head_dim, the per-head sizes in the ``*_mla`` keys, and kv_b_proj split
  per head into ``attn_k_b`` ([heads, kv_lora_rank, qk_nope], transposed) and ``attn_v_b`` ([heads,
  v_head_dim, kv_lora_rank]), as its current converter writes it (the whole ``attn_kv_b`` is only
  read from legacy files). It rotates interleaved pairs, as deepseek_v2 does and deepseek_v3 does
  with ``rope_interleave``. Routing: v2 softmax, greedy top-k, never renormalised (transformers'
  v2 router ignores norm_topk_prob); v3 sigmoid plus ``e_score_correction_bias`` for the choice,
  groups chosen by their two best scores (llama.cpp's grouping is v3's, not v2's
  group_limited_greedy, which is refused); both scaled by routed_scaling_factor; leading dense
  layers (first_k_dense_replace) and shared experts. No attention biases, default rope only.
- glm4_moe_lite is deepseek_v3's MLA attention with glm4_moe's routing: llama.cpp's converter writes
  it as deepseek2, and so does the export (its rope_interleave false is refused as for deepseek_v3).
- glm4_moe is llama.cpp's glm4moe graph: NEOX rope on the first partial_rotary_factor of each head,
  optional q/k norms, the post-attention norm as its ``post_attention_norm``, deepseek_v3's routing
  (sigmoid, choice bias, groups, renormalised as norm_topk_prob says, scaled), leading dense layers
  and shared experts.
- olmo3 is olmo2's graph with a sliding window on the layers ``layer_types`` names (an array, as
  for gemma); llama.cpp runs those layers' rope unscaled and with the full layers' base, so another
  rope there is refused.
- granitemoe: granite's multipliers, its fused ``input_linear`` experts (and granitemoeshared's
  shared expert) split into gate and up (gguf.py), the top-k routing weights always renormalised (softmax over the chosen logits).
- olmo2 normalises q and k over all heads at once and after (not before) attention and MLP, as
  transformers' Olmo2 does; olmoe never renormalises the top-k routing weights and has no grouped-query
  attention (its k_norm is read over all heads). granite's
  multipliers (embedding, residual, attention; logits divided by logits_scaling) go into its
  ``*_scale`` keys; its graph rotates interleaved pairs, so q/k rows are permuted as for llama.
- olmo: llama's rotation (q/k permuted), weightless LayerNorms (eps 1e-5, as transformers fixes it)
  and clip_qkv as llama.cpp's ``clamp_kqv``.
- stablelm, phi (llama.cpp's phi2) and cohere (its command-r) use LayerNorm (eps under the LayerNorm
  key) and partial or interleaved rope as stored; cohere's logit_scale is its ``logit_scale`` key;
  per-head q/k LayerNorms (qk_layernorm, use_qk_norm) are refused. cohere2 adds a sliding window on
  the layers layer_types names, which alone get rope (in both). nemotron's LayerNorm1P computes
  with 1 + w, written as such (llama.cpp's converter does the same).
- arcee (llama's graph with a gate-less ReLU² MLP; q/k permuted), ernie4_5 (interleaved pairs as
  stored: no permutation) and seed_oss (NEOX) need nothing beyond the common keys.
- gpt_neox (NEOX rope, partial; LayerNorm; parallel residual as its key) gets its fused
  query_key_value rows reordered (:func:`transform`); a --lora-only adapter on it is refused.
- glm4 rotates interleaved pairs of the first partial_rotary_factor of each head, as transformers'
  Glm4 does (no permutation), takes the fused gate_up_proj as its ``ffn_up`` (SwiGLU over the two
  halves) and normalises after attention and MLP as well as before.
- smollm3 is llama's graph without rope on every fourth layer (a fixed step in llama.cpp), so other
  ``no_rope_layers`` are refused. starcoder2 uses LayerNorm (its eps under the LayerNorm key), biases
  and a tanh-GELU MLP, and no sliding window (one is refused: transformers would apply it).
- dots1 is qwen3's attention (q/k norms; no grouped-query attention in llama.cpp's graph) with
  deepseek_v3's routing, leading dense layers and shared experts.
- deepseek and glm4_moe checkpoints carry multi-token-prediction layers past num_hidden_layers,
  which transformers does not run: they are left out (gguf.py says so in a note).
- gpt_oss is llama.cpp's gpt-oss graph: NEOX rope (yarn through the general keys), attention sinks
  (``attn_sinks``, one per head), q/k/v and output biases (the output one required), a sliding
  window on the layers layer_types names, the post-attention norm as ``post_attention_norm``, and
  experts with biases routed by a softmax over the top-k biased router logits (its
  SOFTMAX_WEIGHT gating, fixed in the graph). Its clamped SwiGLU has alpha 1.702 and limit 7.0 fixed
  in the graph, so other swiglu_alpha / swiglu_limit are refused. transformers holds the experts as
  [E, in, out] with gate and up interleaved (gate_up_proj[..., ::2] and [..., 1::2]): gguf.py
  transposes them and splits them so, as llama.cpp's converter does.
- ernie4_5_moe is llama.cpp's ernie4_5-moe graph: ernie4_5's attention (interleaved rope as stored),
  softmax routing with the ``moe_statics`` bias added for the choice only (``exp_probs_b``), the top-k
  weights renormalised, shared experts of moe_intermediate_size x moe_num_shared_experts, and the
  layers from moe_layer_start_index on as MoE layers: its loader reads experts in every layer past the
  leading dense ones, so a moe_layer_interval above 1 or a moe_layer_end_index before the last layer
  is refused. Neither ernie graph reads MLP biases (use_bias).
- hunyuan_v1_moe / hunyuan_v1_dense are llama.cpp's hunyuan-moe / hunyuan-dense graphs: NEOX rope,
  q/k RMSNorms after the rope (as transformers applies them), no attention biases (refused);
  hunyuan_v1_moe's softmax routing renormalised over the top-k, experts and the always-added shared
  MLP both of intermediate_size; a per-layer moe_topk or num_experts list is refused (one value is written).
  Their "dynamic" rope with a fixed alpha only stretches the base (rope_theta * alpha ** (d / (d - 2)),
  d the head size), which is written as the base.
- gemma (the first) is llama.cpp's gemma graph: embeddings scaled by sqrt(hidden_size), norms + 1,
  queries scaled by 1/sqrt(head_dim), NEOX rope and the tanh GELU (another hidden_act is refused).
- bloom is llama.cpp's bloom graph: ALiBi with the maximum bias 8 (as transformers' slopes), a
  LayerNorm on the embeddings (``token_embd_norm``), LayerNorms with biases, the tanh GELU, and the fused
  query_key_value reordered as for gpt_neox (transformers holds it per head [q, k, v]). Its config
  names layers and heads n_layer / n_head and has no intermediate_size (4 x hidden): :func:`config`
  gives the common names. apply_residual_connection_post_layernorm is refused (llama.cpp adds the
  un-normalised input).
- gpt2 is llama.cpp's gpt2 graph: learned position embeddings (``position_embd``, context length
  n_positions), LayerNorms with biases, the tanh GELU, and the fused c_attn (q, k, v one after the
  other) as it is. Its Conv1D weights are held [in, out] in a 16-bit checkpoint and [out, in] as 4-bit
  weights (spec section 8's logical shape): gguf.py writes both as [out, in].
- gpt_bigcode is llama.cpp's starcoder graph: gpt2's with one KV head (multi_query; c_attn is q, then
  k and v of one head, as stored) and linear weights.
- yarn: ggml rounds the correction range to whole dimensions (floor and ceil); transformers does
  not when the rope parameters say ``truncate: false`` (gpt_oss's default), so the frequencies in
  between differ slightly: a note says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture as llama.cpp runs it (see the module docstring)."""

    arch: str  # the gguf package's MODEL_ARCH name, lower case
    permute: bool = False  # q/k rows to llama's interleaved rotary pairs
    norm_plus_one: bool = False  # RMSNorm weights written as 1 + w
    moe: bool = False  # routed experts stacked into ffn_*_exps
    norm_topk: bool | None = None  # what the graph does with the top-k routing weights (None: not a MoE)
    swa_27b_layers: int = 0  # gemma: the layer count llama.cpp takes for its 27B model's query scaling
    mla: bool = False  # deepseek2's multi-head latent attention (kv_b_proj split into attn_k_b / attn_v_b)
    deepseek_routing: bool = False  # deepseek-style router keys (leading dense layers, shared experts; _routing_metadata)
    mtp: bool = False  # layers past num_hidden_layers are multi-token prediction, left out
    oai_experts: bool = False  # gpt_oss: fused experts [E, in, out], gate and up interleaved, with biases


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", permute=True),
    "MistralForCausalLM": Family("llama", permute=True),
    "MixtralForCausalLM": Family("llama", permute=True, moe=True, norm_topk=True),
    "Qwen2ForCausalLM": Family("qwen2"),
    "Qwen3ForCausalLM": Family("qwen3"),
    "Qwen2MoeForCausalLM": Family("qwen2moe", moe=True, norm_topk=False),
    "Qwen3MoeForCausalLM": Family("qwen3moe", moe=True, norm_topk=True),
    "Gemma2ForCausalLM": Family("gemma2", norm_plus_one=True, swa_27b_layers=46),
    "Gemma3ForCausalLM": Family("gemma3", norm_plus_one=True, swa_27b_layers=62),
    "Phi3ForCausalLM": Family("phi3"),
    "DeepseekV2ForCausalLM": Family("deepseek2", moe=True, mla=True, deepseek_routing=True, mtp=True),
    "DeepseekV3ForCausalLM": Family("deepseek2", moe=True, mla=True, deepseek_routing=True, mtp=True),
    "Glm4MoeForCausalLM": Family("glm4moe", moe=True, deepseek_routing=True, mtp=True),
    "Glm4MoeLiteForCausalLM": Family("deepseek2", moe=True, mla=True, deepseek_routing=True, mtp=True),  # (as llama.cpp's converter writes it)
    "Dots1ForCausalLM": Family("dots1", moe=True, deepseek_routing=True),
    "Olmo2ForCausalLM": Family("olmo2"),
    "Olmo3ForCausalLM": Family("olmo2"),  # olmo2's graph with a sliding window on the layers layer_types says
    "OlmoeForCausalLM": Family("olmoe", moe=True, norm_topk=False),
    "GraniteForCausalLM": Family("granite", permute=True),
    "GraniteMoeForCausalLM": Family("granitemoe", permute=True, moe=True, norm_topk=True),
    "GraniteMoeSharedForCausalLM": Family("granitemoe", permute=True, moe=True, norm_topk=True),
    "SmolLM3ForCausalLM": Family("smollm3", permute=True),
    "Glm4ForCausalLM": Family("glm4"),
    "OlmoForCausalLM": Family("olmo", permute=True),
    "ArceeForCausalLM": Family("arcee", permute=True),
    "Ernie4_5ForCausalLM": Family("ernie4_5"),
    "SeedOssForCausalLM": Family("seed_oss"),
    "StableLmForCausalLM": Family("stablelm"),
    "PhiForCausalLM": Family("phi2"),
    "NemotronForCausalLM": Family("nemotron", norm_plus_one=True),
    "CohereForCausalLM": Family("command-r"),
    "Cohere2ForCausalLM": Family("cohere2"),
    "Starcoder2ForCausalLM": Family("starcoder2"),
    "GPTNeoXForCausalLM": Family("gptneox"),
    "GemmaForCausalLM": Family("gemma", norm_plus_one=True),
    "BloomForCausalLM": Family("bloom"),
    "GPT2LMHeadModel": Family("gpt2"),
    "GPTBigCodeForCausalLM": Family("starcoder"),
    "GptOssForCausalLM": Family("gpt-oss", moe=True, norm_topk=True, oai_experts=True),
    "Ernie4_5_MoeForCausalLM": Family("ernie4_5-moe", moe=True, norm_topk=True),
    "HunYuanMoEV1ForCausalLM": Family("hunyuan-moe", moe=True, norm_topk=True),
    "HunYuanDenseV1ForCausalLM": Family("hunyuan-dense"),
}
_SSM = "(conv1d, A written as -exp(A_log), D, dt and their norms under llama.cpp's ssm_* names and keys)"
_MMPROJ = ("a multimodal checkpoint: llama.cpp runs the language model from one GGUF and the vision (and audio) encoder from a separate "
           "mmproj GGUF, and qconvert writes neither split")
#: architectures llama.cpp runs (its vendored converter has a model for them) and the architecture sweep covers,
#: which export-gguf does not write -> why: what llama.cpp's graph computes differently, or what qconvert does not write
REFUSED = {
    "Exaone4ForCausalLM": "llama.cpp applies exaone4's sliding window (and leaves rope out of its full layers) only at 64 layers "
                          "(the 32B model), transformers at every size",
    "PhimoeForCausalLM": "transformers' PhiMoE weights the chosen experts by sparsemixer (each a softmax over the logits within "
                         "router_jitter_noise of it, the second with the first masked out), llama.cpp's phimoe graph by a softmax "
                         "renormalised over the top-k",
    "Llama4ForCausalLM": "qconvert does not write llama4's NoPE layers, chunked attention, attention temperature tuning, L2 q/k norms "
                         "and its sigmoid-after-top-k routing over experts held [E, in, out] (llama.cpp's llama4 keys and tensors)",
    "FalconForCausalLM": "llama.cpp's falcon graph computes the tanh GELU where transformers' Falcon (activation 'gelu') computes "
                         "the exact one; and qconvert quantizes no falcon weight (FalconLinear, docs/architectures.md)",
    "MptForCausalLM": "llama.cpp's mpt graph computes the tanh GELU where transformers' MPT computes the exact one; and qconvert "
                      "does not write its ALiBi bias maximum and clip_qkv as that graph reads them",
    "MambaForCausalLM": f"qconvert does not write the Mamba mixer {_SSM}",
    "Mamba2ForCausalLM": f"qconvert does not write the Mamba-2 mixer {_SSM}",
    "FalconMambaForCausalLM": f"qconvert does not write the Mamba mixer {_SSM} nor falcon_mamba's B/C/dt RMS norms",
    "JambaForCausalLM": f"a hybrid of Mamba and attention layers: qconvert does not write the Mamba mixer {_SSM} nor the per-layer "
                        "KV-head counts (0 on Mamba layers) llama.cpp's jamba graph reads",
    "BambaForCausalLM": f"a hybrid of Mamba-2 and attention layers: qconvert does not write the Mamba-2 mixer {_SSM} nor the per-layer "
                        "KV-head counts llama.cpp's granite-hybrid graph reads",
    "GraniteMoeHybridForCausalLM": f"a hybrid of Mamba-2 and attention layers: qconvert does not write the Mamba-2 mixer {_SSM} nor the "
                                   "per-layer KV-head counts llama.cpp's granite-hybrid graph reads",
    "FalconH1ForCausalLM": f"Mamba-2 and attention in parallel in every layer: qconvert does not write the Mamba-2 mixer {_SSM} nor "
                           "falcon_h1's multipliers, which llama.cpp's converter folds into the weights",
    "NemotronHForCausalLM": f"a hybrid of Mamba-2, attention and MLP layers: qconvert does not write the Mamba-2 mixer {_SSM} nor the "
                            "per-layer KV-head and feed-forward counts llama.cpp's nemotron_h graph reads",
    "Lfm2ForCausalLM": "qconvert does not write LFM2's short-convolution layers (llama.cpp's shortconv tensors, KV heads 0 on them)",
    "Lfm2MoeForCausalLM": "qconvert does not write LFM2's short-convolution layers (llama.cpp's shortconv tensors, KV heads 0 on them)",
    "KimiLinearForCausalLM": "qconvert does not write Kimi Delta Attention (its q/k/v short convolutions, decay and gate under llama.cpp's "
                             "ssm_* names) nor its MLA layers' split",
    "Qwen3NextForCausalLM": "qconvert does not write the gated DeltaNet linear-attention layers (conv1d, A as -exp(A_log), dt bias, "
                            "beta/alpha projections in llama.cpp's order) nor the gated full attention",
    "Qwen3_5ForCausalLM": "qconvert does not write the gated DeltaNet linear-attention layers (conv1d, A as -exp(A_log), dt bias, "
                          "beta/alpha projections in llama.cpp's order) nor the gated full attention",
    "Qwen3_5MoeForCausalLM": "qconvert does not write the gated DeltaNet linear-attention layers (conv1d, A as -exp(A_log), dt bias, "
                             "beta/alpha projections in llama.cpp's order) nor the gated full attention",
    "Qwen4ExpForCausalLM": "qconvert does not write qwen4_exp's hyper-connections, per-layer embeddings, sparse-attention indexer and "
                           "recurrent layers (llama.cpp's hc_*, per_layer_token_embd, indexer and ssm_* tensors)",
    "AfmoeForCausalLM": "qconvert does not write afmoe's attention gate (attn_gate), its sliding layers' rope base and its sigmoid "
                        "routing keys as llama.cpp's afmoe graph reads them",
    "Cohere2MoeForCausalLM": "qconvert does not write cohere2_moe's sigmoid routing and shared-expert keys and its sliding layers' rope "
                             "base as llama.cpp's cohere2moe graph reads them",
    "DeepseekV32ForCausalLM": "qconvert does not write DeepSeek sparse attention's lightning indexer (llama.cpp's indexer tensors and keys)",
    "GlmMoeDsaForCausalLM": "qconvert does not write DeepSeek sparse attention's lightning indexer (llama.cpp's indexer tensors and keys)",
    "DeepseekV4ForCausalLM": "qconvert does not write deepseek_v4's compressed sparse attention, hyper-connections and hash-routed "
                             "layers (llama.cpp's compressor, indexer and hc_* tensors)",
    "HYV4ForCausalLM": "qconvert does not write hy_v4's sparse-attention indexer, hyper-connections and attention sinks",
    "HYV3ForCausalLM": "qconvert does not write hy_v3's sigmoid routing with a choice bias and its shared-expert keys as llama.cpp's "
                       "hy-v3 graph reads them",
    "ExaoneMoeForCausalLM": "qconvert does not write exaone_moe's sliding layers' rope base and its sigmoid routing, choice-bias and "
                            "shared-expert keys as llama.cpp's exaone-moe graph reads them",
    "SolarOpenForCausalLM": "llama.cpp runs solar_open as glm4moe; transformers' SolarOpen is llama attention with glm4_moe's "
                            "routing and no intermediate_size, a mapping qconvert has not checked",
    "LagunaForCausalLM": "qconvert does not write laguna's attention gate (attn_gate), its sliding layers' rope dimensions and base "
                         "and its sigmoid routing keys",
    "MellumForCausalLM": "qconvert does not write mellum's sliding-window layer pattern, rope base and expert keys as llama.cpp's "
                         "mellum graph reads them",
    "MiMoV2FlashForCausalLM": "qconvert does not write mimo_v2_flash's attention sinks, value scale, sliding layers' rope base and "
                              "sigmoid routing keys",
    "MiniMaxM2ForCausalLM": "qconvert does not write minimax_m2's sigmoid routing with a choice bias as llama.cpp's minimax-m2 graph "
                            "reads it",
    "GraniteSWAForCausalLM": "qconvert does not write granite_swa's attention sinks and sliding-window and rope layer patterns",
    "GraniteMoeSWAForCausalLM": "qconvert does not write granitemoe_swa's attention sinks and sliding-window and rope layer patterns",
    "Jais2ForCausalLM": "qconvert does not write jais2's LayerNorm and ungated ReLU-squared MLP as llama.cpp's jais2 graph reads them",
    "ApertusForCausalLM": "qconvert does not write apertus's xIELU activation parameters (llama.cpp's xielu_* keys, one per layer)",
    "BitNetForCausalLM": "qconvert does not write BitNet's sub-norms (attn_sub_norm, ffn_sub_norm), and its weights are ternary values "
                         "quantized on the fly, which a dequantized export does not reproduce",
    "HrmTextForCausalLM": "qconvert does not quantize hrm_text (docs/architectures.md) nor write its hierarchical H/L cycles (llama.cpp's "
                          "hrm_* keys and z_L init tensor)",
    "MiniCPM3ForCausalLM": "llama.cpp's minicpm3 graph fixes scale_emb 12 and scale_depth 1.4 (the released model's) where "
                           "transformers reads the config's, and qconvert does not write its MLA tensors as that graph reads them",
    "GlmForCausalLM": "llama.cpp runs glm through its chatglm graph, a mapping qconvert has not written or checked",
    "Gemma4ForCausalLM": "qconvert does not write gemma4's per-layer embeddings (per_layer_token_embd and its projections), shared KV "
                         "layers and layer output scales as llama.cpp's gemma4 graph reads them",
    "Gemma3ForConditionalGeneration": _MMPROJ + " (a Gemma3ForCausalLM text checkpoint is exported)",
    "Gemma4ForConditionalGeneration": _MMPROJ,
    "Gemma4UnifiedForConditionalGeneration": _MMPROJ,
}
#: families whose graph uses LayerNorm -> their config's key for its eps (written under the LayerNorm key)
_LAYER_NORM_EPS = {"starcoder2": "norm_epsilon", "stablelm": "layer_norm_eps", "phi2": "layer_norm_eps", "nemotron": "norm_eps",
                   "command-r": "layer_norm_eps", "cohere2": "layer_norm_eps", "gptneox": "layer_norm_eps", "bloom": "layer_norm_epsilon",
                   "gpt2": "layer_norm_epsilon", "starcoder": "layer_norm_epsilon"}
#: rope types written (linear and yarn by the general keys, llama3 by llama's rope_freqs tensor, longrope
#: by phi3's rope_factors_long / rope_factors_short tensors)
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")
#: the one family whose graph reads each rope type's tensors
_ROPE_TENSOR_FAMILY = {"llama3": "llama", "longrope": "phi3"}
_ADVICE = "use llama.cpp's convert_hf_to_gguf.py on a `qconvert merge` output"


def config(fam: Family, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` under the common names the export reads (bloom's and gpt2's n_layer / n_head, gpt2's n_embd,
    n_inner and n_positions, their 4 x hidden MLP, no grouped-query attention); other families' as they are."""
    if fam.arch not in ("bloom", "gpt2", "starcoder"):
        return cfg
    heads, hidden = cfg.get("n_head", cfg.get("num_attention_heads")), cfg.get("n_embd", cfg.get("hidden_size"))
    out = {**cfg, "num_hidden_layers": cfg.get("n_layer", cfg.get("num_hidden_layers")), "num_attention_heads": heads,
           "num_key_value_heads": heads, "hidden_size": hidden, "intermediate_size": 4 * hidden}
    if fam.arch in ("gpt2", "starcoder"):
        out.update(intermediate_size=cfg.get("n_inner") or 4 * hidden, max_position_embeddings=cfg.get("n_positions", 1024))
    if fam.arch == "starcoder":  # gpt_bigcode: one KV head (multi_query, _check_gpt2)
        out["num_key_value_heads"] = 1
    return out


def rope_parameters(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope parameters of ``layer_type`` layers (transformers 5's rope_parameters, nested per layer
    type for gemma3; older configs' rope_scaling and rope_theta)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return {}
    rope = rope.get(layer_type, rope) if isinstance(rope.get(layer_type), dict) else rope
    if "rope_theta" not in rope and "rope_theta" in cfg:
        rope = {**rope, "rope_theta": cfg["rope_theta"]}
    return rope


def _ntk_alpha(fam: Family, cfg: dict[str, Any]) -> float | None:
    """HunYuan's "dynamic" rope with a fixed ``alpha``: transformers (and llama.cpp's hunyuan graphs) only
    stretch the base, to rope_theta * alpha ** (head_dim / (head_dim - 2)); None for any other rope."""
    rope = rope_parameters(cfg)
    if fam.arch.startswith("hunyuan") and rope_type(rope) == "dynamic" and rope.get("alpha"):
        return float(rope["alpha"])
    return None


def rope_base(fam: Family, cfg: dict[str, Any]) -> float:
    """The rope base written (``rope.freq_base``): rope_theta, stretched by HunYuan's NTK alpha."""
    base = float(rope_parameters(cfg).get("rope_theta", 10000.0))
    if alpha := _ntk_alpha(fam, cfg):
        dim = _head_dim(cfg)
        base *= alpha ** (dim / (dim - 2))
    return base


def rope_type(rope: dict[str, Any]) -> str:
    kind = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    return "longrope" if kind == "su" else kind  # (Phi-3's first name for it)


def _longrope(cfg: dict[str, Any]) -> tuple[float, int]:
    """longrope's attention factor and original context, as transformers computes them: the given
    attention_factor, else sqrt(1 + ln(factor) / ln(original)) for a factor above 1, the factor being
    the given one or max_position_embeddings / original_max_position_embeddings."""
    rope = rope_parameters(cfg)
    orig = int(rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"]), orig
    factor = float(rope.get("factor") or cfg["max_position_embeddings"] / orig)
    return (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0), orig


def longrope_factors(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Phi-3's longrope as llama.cpp's phi3 graph reads it: the per-frequency divisors, long and short
    (transformers divides its inverse frequencies by them); empty for other rope types."""
    rope = rope_parameters(cfg)
    if rope_type(rope) != "longrope":
        return {}
    return {k: torch.tensor(rope[k + "_factor"], dtype=torch.float32) for k in ("long", "short")}


def check(fam: Family, cfg: dict[str, Any], root: Path) -> list[str]:
    """Refuse (FormatError) what llama.cpp's graph for ``fam`` does not compute; return notes about
    what it computes differently only in a case the user should know of."""
    where = f"{root}/config.json"
    kind = rope_type(rope_parameters(cfg))
    if (kind not in ROPE_TYPES or _ROPE_TENSOR_FAMILY.get(kind, fam.arch) != fam.arch) and not _ntk_alpha(fam, cfg):
        raise FormatError(f"{where}: rope_type {kind!r} is not exported for {fam.arch} (written: " + ", ".join(ROPE_TYPES[:3])
                          + ", llama3 for llama, longrope for phi3)", hint=_ADVICE)
    if fam.mla:
        _check_deepseek(cfg, where, kind)
    elif fam.moe and not fam.deepseek_routing:
        _check_moe(fam, cfg, where)
    if fam.swa_27b_layers:
        _check_gemma_scale(fam, cfg, where)
    for arches, family_check in _CHECKS:
        if fam.arch in arches:
            family_check(fam, cfg, where)
    return _notes(fam, cfg, kind)


def _notes(fam: Family, cfg: dict[str, Any], kind: str) -> list[str]:
    notes = []
    if kind == "yarn" and rope_parameters(cfg).get("truncate") is False:
        notes.append("yarn with truncate false: llama.cpp rounds the correction range to whole dimensions, transformers does not, "
                     "so the rotary frequencies between them differ slightly")
    if kind == "longrope":
        orig = _longrope(cfg)[1]
        notes.append(f"longrope: llama.cpp takes the long factors whenever its context size is above {orig} tokens "
                     f"(original_max_position_embeddings), transformers once the sequence is: with a larger context, shorter "
                     "sequences differ")
    if fam.arch == "phi3" and cfg.get("sliding_window"):
        notes.append(f"llama.cpp runs phi3 without its sliding window ({cfg['sliding_window']} tokens): past that much context it "
                     "differs from transformers")
    return notes


def _refuse_if(why: str | None, where: str) -> None:
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_bloom(fam: Family, cfg: dict[str, Any], where: str) -> None:
    _refuse_if(cfg.get("apply_residual_connection_post_layernorm") and "apply_residual_connection_post_layernorm: llama.cpp's bloom "
               "graph adds the un-normalised input to each block's output", where)


def _check_gemma(fam: Family, cfg: dict[str, Any], where: str) -> None:
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    _refuse_if(act not in ("gelu_pytorch_tanh", "gelu_new") and f"hidden_act {act!r}: llama.cpp's gemma graph computes the tanh GELU", where)


def _check_qk_layernorm(fam: Family, cfg: dict[str, Any], where: str) -> None:
    keys = ("use_qk_norm",) if fam.arch == "command-r" else ("qk_layernorm", "use_qk_norm")
    key = next((k for k in keys if cfg.get(k)), None)
    _refuse_if(key and f"{key} (per-head q/k LayerNorms) is not exported for {fam.arch}", where)


def _check_all_heads(fam: Family, cfg: dict[str, Any], where: str) -> None:
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    _refuse_if(kv != cfg["num_attention_heads"] and f"num_key_value_heads {kv} < num_attention_heads: llama.cpp's {fam.arch} graph "
               "reads k and v (olmoe: its k_norm) over all heads (no grouped-query attention)", where)


def _check_moe(fam: Family, cfg: dict[str, Any], where: str) -> None:
    norm = bool(cfg.get("norm_topk_prob", fam.norm_topk))
    if norm != fam.norm_topk:
        raise FormatError(f"{where}: norm_topk_prob is {norm}, but llama.cpp's {fam.arch} graph "
                          f"{'always' if fam.norm_topk else 'never'} renormalises the top-k routing weights", hint=_ADVICE)
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise FormatError(f"{where}: dense layers between the MoE layers (mlp_only_layers / decoder_sparse_step) are not in "
                          f"llama.cpp's {fam.arch} graph", hint=_ADVICE)


#: gpt_oss's clamped SwiGLU as llama.cpp's graph fixes it (alpha, limit)
_OAI_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def _check_gpt_oss(cfg: dict[str, Any], where: str) -> None:
    for key, fixed in _OAI_SWIGLU.items():
        if float(cfg.get(key, fixed)) != fixed:
            raise FormatError(f"{where}: {key} {cfg[key]}: llama.cpp's gpt-oss graph computes the clamped SwiGLU with {key.split('_')[1]} "
                              f"{fixed}, no other", hint=_ADVICE)
    if not cfg.get("attention_bias", True):
        raise FormatError(f"{where}: attention_bias false: llama.cpp's gpt-oss graph needs the attention output's bias, which the model "
                          "has not", hint=_ADVICE)
    if not cfg.get("sliding_window") or "sliding_attention" not in (cfg.get("layer_types") or ["sliding_attention"]):
        raise FormatError(f"{where}: no sliding-window layer (sliding_window {cfg.get('sliding_window')}): llama.cpp's gpt-oss graph "
                          "needs one (its loader aborts without)", hint=_ADVICE)


def _check_ernie(fam: Family, cfg: dict[str, Any], where: str) -> None:
    n = cfg["num_hidden_layers"]
    why = None
    if cfg.get("use_bias"):
        why = f"use_bias: llama.cpp's {fam.arch} graph has no MLP biases"
    elif fam.moe and cfg.get("moe_layer_interval", 1) != 1:
        why = f"moe_layer_interval {cfg['moe_layer_interval']}: llama.cpp's {fam.arch} loader reads experts in every layer past the leading dense ones"
    elif fam.moe and cfg.get("moe_layer_end_index", -1) not in (-1, n - 1):
        why = f"moe_layer_end_index {cfg['moe_layer_end_index']}: llama.cpp's {fam.arch} graph has MoE layers up to the last one ({n - 1})"
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_gpt2(fam: Family, cfg: dict[str, Any], where: str) -> None:
    """gpt2 and gpt_bigcode (llama.cpp's starcoder graph)."""
    why = None
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        why = f"activation_function {cfg['activation_function']!r}: llama.cpp's {fam.arch} graph computes the tanh GELU"
    elif cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
        why = f"scale_attn_by_inverse_layer_idx / scale_attn_weights: llama.cpp's {fam.arch} graph scales attention by 1/sqrt(head size) only"
    elif fam.arch == "starcoder" and not cfg.get("multi_query", True):
        why = "multi_query false: qconvert writes gpt_bigcode's c_attn as the multi-query layout (q, then one k and one v) only"
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_hunyuan(fam: Family, cfg: dict[str, Any], where: str) -> None:
    why = None
    if cfg.get("attention_bias"):
        why = f"attention_bias: llama.cpp's {fam.arch} graph has no attention output bias"
    for key in ("moe_topk", "num_experts"):
        if fam.moe and isinstance(cfg.get(key), list) and len(set(cfg[key])) > 1:
            why = f"{key} {cfg[key]} per layer: llama.cpp's {fam.arch} graph reads one value for every layer"
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_deepseek(cfg: dict[str, Any], where: str, kind: str) -> None:
    """What llama.cpp's deepseek2 graph computes differently from transformers' deepseek_v2 / v3."""
    v3 = cfg.get("model_type") in ("deepseek_v3", "glm4_moe_lite")  # (glm4_moe_lite: deepseek_v3's attention, glm4_moe's routing)
    why = None
    if cfg.get("attention_bias"):
        why = "attention_bias: llama.cpp's deepseek2 graph has no attention biases"
    elif kind != "default":
        why = f"rope_type {kind!r}: only the default rope is exported for deepseek2 (its yarn attention scaling is not checked)"
    elif v3 and cfg.get("rope_interleave") is False:
        why = "rope_interleave false: transformers then rotates halves, llama.cpp's deepseek2 graph interleaved pairs"
    elif not v3 and cfg.get("topk_method", "greedy") != "greedy" and (cfg.get("n_group") or 1) > 1:
        why = (f"topk_method {cfg.get('topk_method')!r}: llama.cpp ranks expert groups by their two best scores (deepseek_v3's way), "
               "deepseek_v2 by its best one")
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_smollm3_starcoder2(fam: Family, cfg: dict[str, Any], where: str) -> None:
    why = None
    if fam.arch == "smollm3":
        step = [int((i + 1) % 4 != 0) for i in range(cfg["num_hidden_layers"])]
        if cfg.get("no_rope_layers", step) != step:
            why = f"no_rope_layers {cfg['no_rope_layers']}: llama.cpp's smollm3 graph leaves rope out of every fourth layer, no other"
    elif cfg.get("sliding_window"):
        why = f"sliding_window {cfg['sliding_window']}: llama.cpp's starcoder2 graph has no sliding window"
    elif cfg.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        why = f"hidden_act {cfg['hidden_act']!r}: llama.cpp's starcoder2 graph computes the tanh GELU"
    if why:
        raise FormatError(f"{where}: {why}", hint=_ADVICE)


def _check_olmo3_rope(cfg: dict[str, Any], where: str) -> None:
    """llama.cpp's olmo2 graph runs sliding layers with the full layers' rope base, unscaled."""
    local, full = rope_parameters(cfg, "sliding_attention"), rope_parameters(cfg)
    if rope_type(local) != "default" or local.get("rope_theta") != full.get("rope_theta"):
        raise FormatError(f"{where}: the sliding layers' rope ({rope_type(local)}, base {local.get('rope_theta')}) is not what llama.cpp's "
                          f"olmo2 graph runs them with (default, the full layers' base {full.get('rope_theta')})", hint=_ADVICE)


def _check_gemma_scale(fam: Family, cfg: dict[str, Any], where: str) -> None:
    heads, head_dim = cfg["num_attention_heads"], _head_dim(cfg)
    want = cfg["hidden_size"] // heads if cfg["num_hidden_layers"] == fam.swa_27b_layers else head_dim
    if cfg.get("query_pre_attn_scalar", head_dim) != want:
        raise FormatError(f"{where}: query_pre_attn_scalar {cfg.get('query_pre_attn_scalar')} is not the {want} llama.cpp's {fam.arch} "
                          "graph scales queries by (head_dim; hidden_size / heads for its 27B layer count)", hint=_ADVICE)


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


#: llama.cpp architectures -> the check of what their graph computes differently (each refuses with the reason)
_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Family, dict[str, Any], str], None]], ...] = (
    (("olmo2",), lambda fam, cfg, where: _check_olmo3_rope(cfg, where)),
    (("bloom",), _check_bloom),
    (("gpt2", "starcoder"), _check_gpt2),
    (("gemma",), _check_gemma),
    (("stablelm", "phi2", "command-r"), _check_qk_layernorm),
    (("smollm3", "starcoder2"), _check_smollm3_starcoder2),
    (("olmoe", "dots1"), _check_all_heads),
    (("gpt-oss",), lambda fam, cfg, where: _check_gpt_oss(cfg, where)),
    (("ernie4_5", "ernie4_5-moe"), _check_ernie),
    (("hunyuan-moe", "hunyuan-dense"), _check_hunyuan),
)


def metadata(gw, gguf, fam: Family, cfg: dict[str, Any]) -> None:
    """The family's hyper-parameters beyond the common ones (gguf.py's _metadata writes those)."""
    _rope_metadata(gw, gguf, cfg)
    if fam.mla:
        _deepseek_metadata(gw, cfg)
    if fam.deepseek_routing:
        _routing_metadata(gw, gguf, cfg)
    elif fam.arch == "ernie4_5-moe":
        _ernie_metadata(gw, cfg)
    elif fam.arch == "hunyuan-moe":
        _hunyuan_metadata(gw, cfg)
    elif fam.moe:
        _moe_metadata(gw, fam, cfg)
    if fam.arch in ("gemma2", "gemma3"):
        _gemma_metadata(gw, fam, cfg)
    if fam.arch in ("gemma2", "gemma3", "olmo2", "cohere2"):
        _sliding_metadata(gw, cfg, swa_base=fam.arch == "gemma3")
    if fam.arch in ("phi3", "gpt-oss"):  # (a key both loaders require)
        gw.add_sliding_window(int(cfg.get("sliding_window") or 0))
    if fam.arch == "gpt-oss":  # which layers slide (_check_gpt_oss: some do)
        gw.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.get("layer_types") or []])
    if fam.arch in _LAYER_NORM_EPS:
        gw.add_layer_norm_eps(float(cfg.get(_LAYER_NORM_EPS[fam.arch], 1e-5)))
    if fam.arch == "gptneox":
        gw.add_parallel_residual(bool(cfg.get("use_parallel_residual", True)))
    if fam.arch in ("command-r", "cohere2"):
        gw.add_logit_scale(float(cfg.get("logit_scale", 1.0)))
    if fam.arch == "olmo":
        gw.add_layer_norm_eps(1e-5)  # transformers' OlmoLayerNorm has it fixed
        if cfg.get("clip_qkv") is not None:
            gw.add_clamp_kqv(float(cfg["clip_qkv"]))
    if fam.arch in ("granite", "granitemoe"):
        for key, method in (("embedding_multiplier", "add_embedding_scale"), ("residual_multiplier", "add_residual_scale"),
                            ("attention_multiplier", "add_attention_scale"), ("logits_scaling", "add_logit_scale")):
            getattr(gw, method)(float(cfg.get(key, 1.0)))


def _moe_metadata(gw, fam: Family, cfg: dict[str, Any]) -> None:
    """Expert counts and sizes (gpt_oss's experts are intermediate_size wide)."""
    gw.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    gw.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size") or fam.oai_experts:
        gw.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if cfg.get("shared_expert_intermediate_size") or cfg.get("shared_intermediate_size"):
        gw.add_expert_shared_feed_forward_length(cfg.get("shared_expert_intermediate_size") or cfg["shared_intermediate_size"])


def _ernie_metadata(gw, cfg: dict[str, Any]) -> None:
    """ernie4_5_moe's experts as llama.cpp's loader reads them (the choice bias is a tensor)."""
    gw.add_expert_count(int(cfg["moe_num_experts"]))
    gw.add_expert_used_count(int(cfg["moe_k"]))
    gw.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    gw.add_interleave_moe_layer_step(1)
    gw.add_leading_dense_block_count(int(cfg.get("moe_layer_start_index") or 0))
    shared = int(cfg.get("moe_num_shared_experts") or 0)
    gw.add_expert_shared_count(shared)
    if shared:
        gw.add_expert_shared_feed_forward_length(int(cfg["moe_intermediate_size"]) * shared)


def _hunyuan_metadata(gw, cfg: dict[str, Any]) -> None:
    """hunyuan_v1_moe's experts: routed and shared both of intermediate_size (one value per model, _check_hunyuan)."""
    def one(v):
        return int(v[0] if isinstance(v, list) else v)

    gw.add_expert_count(one(cfg["num_experts"]))
    gw.add_expert_used_count(one(cfg["moe_topk"]))
    gw.add_expert_feed_forward_length(int(cfg["intermediate_size"]))
    gw.add_expert_shared_feed_forward_length(int(cfg["intermediate_size"]))


def _deepseek_metadata(gw, cfg: dict[str, Any]) -> None:
    """MLA sizes as llama.cpp's deepseek2 loader reads them (attention_dims: the head sizes)."""
    gw.add_q_lora_rank(int(cfg.get("q_lora_rank") or 0))  # 0: a plain q_proj (llama.cpp reads the key unless the layer count is a "lite" one)
    gw.add_kv_lora_rank(int(cfg["kv_lora_rank"]))
    gw.add_key_length_mla(int(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]))
    gw.add_value_length_mla(int(cfg["v_head_dim"]))


def _routing_metadata(gw, gguf, cfg: dict[str, Any]) -> None:
    """deepseek's and glm4_moe's routing as llama.cpp reads it: deepseek_v2 softmax, never
    renormalised (its transformers router ignores norm_topk_prob); deepseek_v3 and glm4_moe sigmoid,
    renormalised as norm_topk_prob says, groups of experts; all scaled by routed_scaling_factor."""
    v2 = cfg.get("model_type") == "deepseek_v2"
    gw.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace") or 0))
    gw.add_expert_count(int(cfg["n_routed_experts"]))
    gw.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    gw.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    gw.add_expert_shared_count(int(cfg.get("n_shared_experts") or 0))
    gw.add_expert_weights_scale(float(cfg.get("routed_scaling_factor") or 1.0))
    gw.add_expert_weights_norm(bool(not v2 and cfg.get("norm_topk_prob")))
    gw.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if v2 else gguf.ExpertGatingFuncType.SIGMOID)
    if not v2 and (cfg.get("n_group") or 1) > 1:
        gw.add_expert_group_count(int(cfg["n_group"]))
        gw.add_expert_group_used_count(int(cfg["topk_group"]))


def attention_dims(fam: Family, cfg: dict[str, Any]) -> tuple[int, int, int]:
    """KV heads, key length and value length as llama.cpp's graph for ``fam`` reads them: deepseek2's
    MLA runs as one KV head of the compressed latent (plus its rotary part)."""
    if fam.mla:
        return 1, int(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]), int(cfg["kv_lora_rank"])
    head_dim = _head_dim(cfg)
    if fam.arch == "gptneox":  # no grouped-query attention (a num_key_value_heads in its config is not read by transformers)
        return cfg["num_attention_heads"], head_dim, head_dim
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim, head_dim


def split(fam: Family, cfg: dict[str, Any], name: str, shape: tuple[int, ...]):
    """Tensors llama.cpp reads in pieces: deepseek2's kv_b_proj [heads * (nope + v), rank] as
    (checkpoint-style name, shape, function of the whole tensor) for ``k_b_proj`` (per head
    [rank, nope]: transposed) and ``v_b_proj`` (per head [v, rank]); None for any other tensor."""
    if not (fam.mla and name.endswith("self_attn.kv_b_proj.weight")):
        return None
    heads, nope, v, rank = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], shape[1]
    if shape[0] != heads * (nope + v):
        raise FormatError(f"{name}: shape {list(shape)} is not [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]", hint="is the checkpoint damaged?")

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(heads, nope + v, rank)

    return [(name.replace("kv_b_proj", "k_b_proj"), (heads, rank, nope), lambda t: per_head(t)[:, :nope].transpose(1, 2).contiguous()),
            (name.replace("kv_b_proj", "v_b_proj"), (heads, v, rank), lambda t: per_head(t)[:, nope:].contiguous())]


def rope_dimensions(fam: Family, cfg: dict[str, Any]) -> int:
    if fam.mla:
        return int(cfg["qk_rope_head_dim"])
    return int(_head_dim(cfg) * float(rope_parameters(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))


def _rope_metadata(gw, gguf, cfg: dict[str, Any]) -> None:
    rope = rope_parameters(cfg)
    kind = rope_type(rope)
    R = gguf.RopeScalingType
    if kind == "linear":
        gw.add_rope_scaling_type(R.LINEAR)
        gw.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "longrope":
        attn, orig = _longrope(cfg)
        gw.add_rope_scaling_attn_factors(attn)
        gw.add_rope_scaling_orig_ctx_len(orig)
    elif kind == "yarn":
        gw.add_rope_scaling_type(R.YARN)
        gw.add_rope_scaling_factor(float(rope["factor"]))
        gw.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings") or cfg["max_position_embeddings"]))
        for key, method in (("beta_fast", "add_rope_scaling_yarn_beta_fast"), ("beta_slow", "add_rope_scaling_yarn_beta_slow"),
                            ("attention_factor", "add_rope_scaling_yarn_attn_factor")):
            if rope.get(key) is not None:
                getattr(gw, method)(float(rope[key]))


def _gemma_metadata(gw, fam: Family, cfg: dict[str, Any]) -> None:
    if fam.arch == "gemma2" and cfg.get("attn_logit_softcapping"):
        gw.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping"):
        gw.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def _sliding_metadata(gw, cfg: dict[str, Any], swa_base: bool) -> None:
    """The sliding window, which layers slide (an array, from layer_types) and, where the graph reads
    it apart (gemma3), the sliding layers' rope base."""
    types = cfg.get("layer_types")
    if cfg.get("sliding_window") and types:
        gw.add_sliding_window(int(cfg["sliding_window"]))
        gw.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    local = rope_parameters(cfg, "sliding_attention")
    if swa_base and "rope_theta" in local:
        gw.add_rope_freq_base_swa(float(local["rope_theta"]))


def rope_freqs(root: Path) -> torch.Tensor | None:
    """llama3 rope scaling as llama.cpp's llama graph reads it: per rotary frequency, the factor
    transformers divides it by (its default inverse frequencies over its llama3 ones); None otherwise."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(root, trust_remote_code=False).get_text_config()
    if rope_type(cfg.rope_parameters or {}) != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (float(cfg.rope_parameters["rope_theta"]) ** (torch.arange(0, scaled.numel() * 2, 2, dtype=torch.int64).float() / (scaled.numel() * 2)))
    return (plain / scaled).float()


def transform(fam: Family, name: str, cfg: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A change of value on the way out for tensor ``name`` (its GGUF name): Gemma's and nemotron's
    norms + 1; gpt_neox's and bloom's fused query_key_value rows, per head [q, k, v] in transformers,
    reordered to all q, all k, all v as llama.cpp's graphs read them (as its converter reorders them)."""
    if fam.norm_plus_one and name.endswith("norm.weight"):
        return lambda t: t + 1.0
    if fam.arch in ("gptneox", "bloom") and name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
        heads = cfg["num_attention_heads"]
        return lambda t: t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return None
