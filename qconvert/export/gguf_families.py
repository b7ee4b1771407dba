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
}
#: architectures llama.cpp runs but computes differently from transformers -> why (refused with it)
REFUSED = {
    "Exaone4ForCausalLM": "llama.cpp applies exaone4's sliding window (and leaves rope out of its full layers) only at 64 layers "
                          "(the 32B model), transformers at every size",
}
#: families whose graph uses LayerNorm -> their config's key for its eps (written under the LayerNorm key)
_LAYER_NORM_EPS = {"starcoder2": "norm_epsilon", "stablelm": "layer_norm_eps", "phi2": "layer_norm_eps", "nemotron": "norm_eps",
                   "command-r": "layer_norm_eps", "cohere2": "layer_norm_eps", "gptneox": "layer_norm_eps"}
#: rope types written (linear and yarn by the general keys, llama3 by llama's rope_freqs tensor, longrope
#: by phi3's rope_factors_long / rope_factors_short tensors)
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")
#: the one family whose graph reads each rope type's tensors
_ROPE_TENSOR_FAMILY = {"llama3": "llama", "longrope": "phi3"}
_ADVICE = "use llama.cpp's convert_hf_to_gguf.py on a `qconvert merge` output"


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
    if kind not in ROPE_TYPES or _ROPE_TENSOR_FAMILY.get(kind, fam.arch) != fam.arch:
        raise FormatError(f"{where}: rope_type {kind!r} is not exported for {fam.arch} (written: " + ", ".join(ROPE_TYPES[:3])
                          + ", llama3 for llama, longrope for phi3)", hint=_ADVICE)
    if fam.mla:
        _check_deepseek(cfg, where, kind)
    elif fam.moe and not fam.deepseek_routing:
        _check_moe(fam, cfg, where)
    if fam.swa_27b_layers:
        _check_gemma_scale(fam, cfg, where)
    if fam.arch == "olmo2":
        _check_olmo3_rope(cfg, where)
    if fam.arch in ("stablelm", "phi2") and (cfg.get("qk_layernorm") or cfg.get("use_qk_norm")):
        raise FormatError(f"{where}: qk_layernorm (per-head q/k LayerNorms) is not exported for {fam.arch}", hint=_ADVICE)
    if fam.arch == "command-r" and cfg.get("use_qk_norm"):
        raise FormatError(f"{where}: use_qk_norm (per-head q/k LayerNorms) is not exported for {fam.arch}", hint=_ADVICE)
    if fam.arch in ("smollm3", "starcoder2"):
        _check_smollm3_starcoder2(fam, cfg, where)
    if fam.arch in ("olmoe", "dots1") and cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
        raise FormatError(f"{where}: num_key_value_heads {cfg['num_key_value_heads']} < num_attention_heads: llama.cpp's {fam.arch} graph "
                          "reads k and v (olmoe: its k_norm) over all heads (no grouped-query attention)", hint=_ADVICE)
    notes = []
    if kind == "longrope":
        orig = _longrope(cfg)[1]
        notes.append(f"longrope: llama.cpp takes the long factors whenever its context size is above {orig} tokens "
                     f"(original_max_position_embeddings), transformers once the sequence is: with a larger context, shorter "
                     "sequences differ")
    if fam.arch == "phi3" and cfg.get("sliding_window"):
        notes.append(f"llama.cpp runs phi3 without its sliding window ({cfg['sliding_window']} tokens): past that much context it "
                     "differs from transformers")
    return notes


def _check_moe(fam: Family, cfg: dict[str, Any], where: str) -> None:
    norm = bool(cfg.get("norm_topk_prob", fam.norm_topk))
    if norm != fam.norm_topk:
        raise FormatError(f"{where}: norm_topk_prob is {norm}, but llama.cpp's {fam.arch} graph "
                          f"{'always' if fam.norm_topk else 'never'} renormalises the top-k routing weights", hint=_ADVICE)
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise FormatError(f"{where}: dense layers between the MoE layers (mlp_only_layers / decoder_sparse_step) are not in "
                          f"llama.cpp's {fam.arch} graph", hint=_ADVICE)


def _check_deepseek(cfg: dict[str, Any], where: str, kind: str) -> None:
    """What llama.cpp's deepseek2 graph computes differently from transformers' deepseek_v2 / v3."""
    v3 = cfg.get("model_type") == "deepseek_v3"
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


def metadata(gw, gguf, fam: Family, cfg: dict[str, Any]) -> None:
    """The family's hyper-parameters beyond the common ones (gguf.py's _metadata writes those)."""
    _rope_metadata(gw, gguf, cfg)
    if fam.mla:
        _deepseek_metadata(gw, cfg)
    if fam.deepseek_routing:
        _routing_metadata(gw, gguf, cfg)
    elif fam.moe:
        gw.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        gw.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            gw.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size") or cfg.get("shared_intermediate_size"):
            gw.add_expert_shared_feed_forward_length(cfg.get("shared_expert_intermediate_size") or cfg["shared_intermediate_size"])
    if fam.arch in ("gemma2", "gemma3"):
        _gemma_metadata(gw, fam, cfg)
    if fam.arch in ("gemma2", "gemma3", "olmo2", "cohere2"):
        _sliding_metadata(gw, cfg, swa_base=fam.arch == "gemma3")
    if fam.arch == "phi3":
        gw.add_sliding_window(int(cfg.get("sliding_window") or 0))
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
    norms + 1; gpt_neox's fused query_key_value rows, per head [q, k, v] in transformers, reordered to
    all q, all k, all v as llama.cpp's gptneox graph reads them (as its converter reorders them)."""
    if fam.norm_plus_one and name.endswith("norm.weight"):
        return lambda t: t + 1.0
    if fam.arch == "gptneox" and name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
        heads = cfg["num_attention_heads"]
        return lambda t: t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return None
