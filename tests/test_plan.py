"""The plan read off config.json (KNOWN_DECODERS) is the plan transformers' own model classes give.

Every table entry is built with transformers under each config flag that changes its module tree
(tie, biases), saved with and without the tied head, and planned both ways: with the table, and on a
meta-device model (``use_transformers=True``). Tensor names, which get quantized, dropped tensors and
the skip list must agree. A checkpoint the table does not describe must take the transformers path.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qconvert.convert.options import QuantizeOptions
from qconvert.convert.plan import KNOWN_DECODERS, known_layout, make_plan
from qconvert.convert.quantize import bnb_quantization_config
from qconvert.io.checkpoint import Checkpoint

from helpers import make_tiny_decoder

FLAGS = {  # config fields that add or remove modules, per family
    "llama": [{"attention_bias": a, "mlp_bias": m} for a, m in itertools.product((False, True), repeat=2)],
    "granite": [{"attention_bias": a, "mlp_bias": m} for a, m in itertools.product((False, True), repeat=2)],
    "smollm3": [{"attention_bias": a, "mlp_bias": m} for a, m in itertools.product((False, True), repeat=2)],
    "mistral": [{}],
    "qwen2": [{}],
    "phi3": [{}],
    **{t: [{"attention_bias": False}, {"attention_bias": True}] for t in ("qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
}


def same_plan(a, b) -> None:
    assert [(i.source_key, i.out_key, i.quantize, i.shape, i.out_dtype, i.transpose) for i in a.items] == [
        (i.source_key, i.out_key, i.quantize, i.shape, i.out_dtype, i.transpose) for i in b.items
    ]
    assert a.dropped == b.dropped and a.skip_patterns == b.skip_patterns and a.architecture == b.architecture
    assert a.shards == b.shards and a.source_dtype == b.source_dtype


CASES = [
    (arch, tie, flags)
    for arch, spec in KNOWN_DECODERS.items()
    for tie in (False, True)
    for flags in FLAGS[spec.model_type]
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,tie,flags", CASES, ids=[f"{a}-tie{t}-{'-'.join(k for k, v in f.items() if v)}" for a, t, f in CASES])
def test_table_plan_equals_transformers_plan(tmp_path, arch, tie, flags):
    assert set(FLAGS) == {s.model_type for s in KNOWN_DECODERS.values()}
    heads = (False, True) if tie else (False,)
    for keep_head, skips in itertools.product(heads, ([], ["mlp.down_proj", "model.layers.1"])):
        d = make_tiny_decoder(tmp_path / f"m-{keep_head}-{len(skips)}", arch, tie, flags, keep_tied_head=keep_head)
        ckpt = Checkpoint(d)
        assert known_layout(ckpt.config(), ckpt.keys()) is not None, "the table path was not taken"
        opts = QuantizeOptions(skip_modules=skips, max_shard_size=20_000)
        fast = make_plan(ckpt, opts)
        slow = make_plan(ckpt, opts, use_transformers=True)
        same_plan(fast, slow)
        per_layer = len(KNOWN_DECODERS[arch].linears)  # with skips: layer 1 and layer 0's down_proj
        assert sum(i.quantize for i in fast.items) == (per_layer - 1 if skips else 2 * per_layer)
        if tie and keep_head:
            assert fast.dropped == {"lm_head.weight": "tied to model.embed_tokens.weight: transformers saves the pair once"}


def test_unexpected_names_take_the_transformers_path(tmp_path):
    # a key the table does not know (here a stray buffer), a missing one, and a config it does not cover
    d = make_tiny_decoder(tmp_path / "extra", "LlamaForCausalLM", False, {}, extra_key="model.layers.0.self_attn.rotary_emb.inv_freq")
    ckpt = Checkpoint(d)
    assert known_layout(ckpt.config(), ckpt.keys()) is None
    plan = make_plan(ckpt)
    assert list(plan.dropped) == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "non-persistent buffer 'inv_freq'" in plan.dropped["model.layers.0.self_attn.rotary_emb.inv_freq"]
    same_plan(plan, make_plan(ckpt, use_transformers=True))
    cfg = ckpt.config()
    keys = [k for k in ckpt.keys() if k != "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert known_layout(cfg, keys) is not None
    assert known_layout(cfg, [k for k in keys if k != "model.norm.weight"]) is None
    assert known_layout({**cfg, "model_type": "mistral"}, keys) is None
    assert known_layout({**cfg, "num_hidden_layers": 3}, keys) is None


@pytest.mark.parametrize("qtype,dq,dtype,user_skips", [
    ("nf4", True, "bfloat16", []), ("fp4", False, "float16", ["lm_head", "mlp"]), ("nf4", False, "float32", ["x"]),
])
def test_quantization_config_is_what_transformers_writes(qtype, dq, dtype, user_skips):
    from transformers import BitsAndBytesConfig

    skips = sorted(["lm_head", *user_skips])
    ours = bnb_quantization_config({
        "quant_type": qtype, "double_quant": dq, "compute_dtype": dtype, "skip_modules": skips,
        "user_skip_modules": user_skips,
    })
    theirs = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=qtype, bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=getattr(torch, dtype), llm_int8_skip_modules=skips if user_skips else None,
    ).to_dict()
    assert ours == theirs


@pytest.mark.parametrize("arch", sorted(KNOWN_DECODERS))
def test_tie_default_is_the_config_class_default(arch):
    import transformers

    spec = KNOWN_DECODERS[arch]
    assert transformers.AutoConfig.for_model(spec.model_type).tie_word_embeddings is spec.tie_default


def test_remote_code_map_does_not_change_the_plan(tmp_path):
    """Phi-3 checkpoints on the Hub carry an auto_map; without remote code (qconvert never runs it)
    transformers uses its own Phi3ForCausalLM, and so does the table."""
    import json

    d = make_tiny_decoder(tmp_path / "phi3", "Phi3ForCausalLM", False, {})
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    ckpt = Checkpoint(d)
    assert known_layout(ckpt.config(), ckpt.keys()) is not None
    same_plan(make_plan(ckpt), make_plan(ckpt, use_transformers=True))
