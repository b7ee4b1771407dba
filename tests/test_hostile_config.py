"""Hostile and careless config.json / checkpoint pairs: `load_model` and `verify` refuse each with a
qconvert FormatError naming the file and the tensor (spec/robustness.md, "Config and structure").

Each case damages one thing in a copy of a good 4-bit checkpoint (tiny Llama: hidden 64, vocab 128,
2 layers, bf16). Every case here failed on the code before these checks: it loaded (wrong shapes,
mixed dtypes, extra tensors), raised a plain ValueError/AttributeError/RuntimeError, or, for verify,
passed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import qconvert
from helpers import bnb_quantize_save, make_tiny_bert, make_tiny_llama
from qconvert.errors import FormatError, QConvertError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-config")
    quantize_checkpoint(str(make_tiny_llama(d / "src")), d / "q")
    return d / "q"


def variant(good: Path, tmp_path: Path, *, config=None, tensors=None, raw_config: bytes | None = None) -> Path:
    """A copy of ``good`` with config.json edited by ``config(dict)`` (or replaced by ``raw_config``;
    b"" removes it) and its tensors edited by ``tensors(dict)``."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "v"
    shutil.copytree(good, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if raw_config is not None:
        (d / "config.json").unlink()
        if raw_config:
            (d / "config.json").write_bytes(raw_config)
    if tensors is not None:
        sd = load_file(str(d / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def edit_quant_state(name: str, change):
    def f(sd):
        from qconvert.format.layout import pack_quant_state, unpack_quant_state

        key = f"{name}.quant_state.bitsandbytes__nf4"
        d = unpack_quant_state(sd[key])
        change(d)
        sd[key] = pack_quant_state(d)
    return f


def put(**kv):
    return lambda c: c.update(kv)


K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]
EMB = "model.embed_tokens.weight"  # [128, 64]

#: (case id, variant arguments, the message load_model must give)
LOAD_CASES = [
    ("config-missing", dict(raw_config=b""), r"config\.json: missing"),
    ("config-invalid-json", dict(raw_config=b'{"model_type": "llama",'), r"config\.json: not valid JSON"),
    ("config-not-utf8", dict(raw_config=b'{"model_type": "\xff"}'), r"config\.json: not valid JSON"),
    ("config-a-list", dict(raw_config=b"[1, 2]"), r"config\.json: must hold a JSON object, not list"),
    ("config-nested-100k-deep", dict(raw_config=b"[" * 100_000), r"config\.json: not valid JSON"),
    ("config-17-MB", dict(raw_config=b'{"pad": "' + b"x" * (17 * 2**20) + b'"}'), r"config\.json: \d+ bytes, over the 16777216-byte limit"),
    ("config-remote-code", dict(config=put(model_type="evil", architectures=["EvilForCausalLM"],
                                           auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})),
     r"needs remote code \(auto_map\), which qconvert never runs"),
    ("config-unknown-model-type", dict(config=put(model_type="nosuchmodel")), r"model_type 'nosuchmodel' is not known to transformers"),
    ("config-architecture-not-a-model", dict(config=put(architectures=["pipeline"])), r"'pipeline' is not a transformers model class"),
    ("config-no-architectures", dict(config=lambda c: c.pop("architectures")), r"architectures\[0\] None is not a transformers model class"),
    ("config-fewer-layers", dict(config=put(num_hidden_layers=1)), r"'model\.layers\.1\.\S+' has no place in the LlamaForCausalLM"),
    ("config-more-layers", dict(config=put(num_hidden_layers=3)), r"lacks 9 tensor\(s\) .* e\.g\. 'model\.layers\.2\."),
    ("config-a-billion-layers", dict(config=put(num_hidden_layers=10**9)), r"num_hidden_layers is 1000000000, but the checkpoint's \d+ tensors"),
    ("config-a-billion-heads", dict(config=put(num_attention_heads=10**9)), r"num_attention_heads is 1000000000"),
    ("config-huge-hidden", dict(config=put(hidden_size=10**12)), r"needs \[1000000000000, 100\]"),
    ("config-huge-vocab", dict(config=put(vocab_size=10**12)), r"needs \[1000000000000, 64\]"),
    ("config-negative-hidden", dict(config=put(hidden_size=-64)), r"config\.json: does not build a LlamaForCausalLM"),
    ("config-float-hidden", dict(config=put(hidden_size=64.5)), r"config\.json: transformers cannot read it"),
    ("config-negative-layers", dict(config=put(num_hidden_layers=-1)), r"num_hidden_layers is -1"),
    ("config-quantization-config-a-string", dict(config=put(quantization_config="bitsandbytes")),
     r"quantization_config must be a JSON object, not str"),
    ("config-bad-compute-dtype", dict(config=lambda c: c["quantization_config"].update(bnb_4bit_compute_dtype="int8")),
     r"bnb_4bit_compute_dtype 'int8' is not one of"),
    ("weights-embedding-shape", dict(tensors=lambda sd: sd.update({EMB: sd[EMB][:64].clone()})),
     r"'model\.embed_tokens\.weight' is \[64, 64\], the LlamaForCausalLM built from config\.json needs \[128, 64\]"),
    ("weights-embedding-float32-in-bf16", dict(tensors=lambda sd: sd.update({EMB: sd[EMB].float()})),
     r"'model\.embed_tokens\.weight' is F32, the other unquantized tensors are BF16"),
    ("weights-norm-as-integers", dict(tensors=lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
     r"'model\.norm\.weight' is stored as I32"),
    ("weights-unexpected-tensor", dict(tensors=lambda sd: sd.update({"model.backdoor": torch.zeros(3)})),
     r"1 tensor\(s\) have no place in the LlamaForCausalLM .* 'model\.backdoor'"),
    ("weights-missing-tensor", dict(tensors=lambda sd: sd.pop("model.norm.weight")), r"lacks 1 tensor\(s\) .* 'model\.norm\.weight'"),
    ("weights-no-4bit-tensor-but-4bit-config", dict(tensors=lambda sd: [sd.pop(k) for k in list(sd) if "_proj" in k]),
     r"config\.json claims 4-bit weights, but the checkpoint holds none"),
    ("quant-state-transposed", dict(tensors=edit_quant_state(K_PROJ, lambda d: d.update(shape=d["shape"][::-1]))),
     r"'model\.layers\.0\.self_attn\.k_proj\.weight' has quant-state shape \[64, 32\], the LlamaForCausalLM needs \[32, 64\]"),
    ("quant-state-extra-field", dict(tensors=edit_quant_state(K_PROJ, lambda d: d.update(evil="x"))), r"unknown quant-state fields \['evil'\]"),
    ("quant-state-nested-60k-deep", dict(tensors=lambda sd: sd.update({f"{K_PROJ}.quant_state.bitsandbytes__nf4":
                                                                       torch.tensor(list(b"[" * 60_000), dtype=torch.uint8)})),
     r"quant state is not UTF-8 JSON"),
    ("quant-state-missing-shape", dict(tensors=edit_quant_state(K_PROJ, lambda d: d.pop("shape"))), r"shape None must be a list"),
]


@pytest.mark.parametrize("case,kw,message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_model_refuses(good, tmp_path, case, kw, message):
    bad = variant(good, tmp_path, **kw)
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match=message) as e:
        qconvert.load_model(bad, backend="reference", device="cpu")
    assert time.perf_counter() - t0 < 30  # refused before any allocation sized by the config
    assert str(bad) in str(e.value)  # names the folder or its config.json


def test_load_model_still_loads_tied_and_untied(good, tmp_path):
    """The checks accept what they must: the good checkpoint, and a tied model whose checkpoint has
    no lm_head (transformers ties it); both give the float32 reference's logits."""
    from helpers import float32_reference

    from qconvert.convert.quantize import quantize_checkpoint

    tied = tmp_path / "tied-q"
    quantize_checkpoint(str(make_tiny_llama(tmp_path / "tied", tie=True)), tied)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    for folder in (good, tied):
        m = qconvert.load_model(folder, backend="reference", device="cpu", compute_dtype=torch.float32)
        with torch.no_grad():
            got = m(input_ids=ids).logits.float()
            want = float32_reference(folder)(input_ids=ids).logits
        assert ((got - want).norm() / want.norm()).item() < 2e-2


# ------------------------------------------------------------------------------------------ verify
VERIFY_CASES = [
    ("quant-state-transposed", dict(tensors=edit_quant_state(K_PROJ, lambda d: d.update(shape=d["shape"][::-1]))),
     r"quant-state shape \[64, 32\], the LlamaForCausalLM needs \[32, 64\]"),
    ("quant-state-flattened", dict(tensors=edit_quant_state(K_PROJ, lambda d: d.update(shape=[2048]))),
     r"quant-state shape \[2048\], the LlamaForCausalLM needs \[32, 64\]"),
    ("no-4bit-weight", dict(tensors=lambda sd: [sd.pop(k) for k in list(sd) if "_proj" in k]), r"holds no 4-bit weight"),
    ("fewer-layers", dict(config=put(num_hidden_layers=1)), r"has no place in the LlamaForCausalLM"),
    ("more-layers", dict(config=put(num_hidden_layers=3)), r"lacks 9 tensor\(s\)"),
    ("embedding-shape", dict(tensors=lambda sd: sd.update({EMB: sd[EMB][:64].clone()})), r"is \[64, 64\], .* needs \[128, 64\]"),
    ("config-a-list", dict(raw_config=b"[]"), r"must hold a JSON object"),
    ("config-missing", dict(raw_config=b""), r"config\.json: missing"),
]


@pytest.mark.parametrize("case,kw,message", VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES])
def test_verify_refuses(good, tmp_path, case, kw, message):
    from qconvert.convert.verify import verify_checkpoint

    with pytest.raises(FormatError, match=message):
        verify_checkpoint(variant(good, tmp_path, **kw))


def test_verify_refuses_a_plain_checkpoint(tmp_path):
    from qconvert.convert.verify import verify_checkpoint

    with pytest.raises(FormatError, match="holds no 4-bit weight"):
        verify_checkpoint(make_tiny_llama(tmp_path / "plain"))


def test_verify_accepts_ours_and_transformers_bitsandbytes(good, tmp_path):
    """The structural check passes what loads: our output, and what transformers + bitsandbytes
    save (a BERT, a second architecture), each checked against the model config.json builds."""
    from qconvert.convert.verify import verify_checkpoint

    assert verify_checkpoint(good)["structure"] == "matches the LlamaForCausalLM config.json builds"
    bnb = bnb_quantize_save(make_tiny_bert(tmp_path / "bert"), tmp_path / "bnb-bert", auto_class="AutoModel")
    assert verify_checkpoint(bnb)["structure"] == "matches the BertModel config.json builds"


def test_verify_remote_code_model_gets_the_2d_rule(good, tmp_path):
    """A config that needs remote code cannot be built here: its quant-state shapes must be 2-D, and
    the report says the structure was not checked against config.json."""
    from qconvert.convert.verify import verify_checkpoint

    remote = put(model_type="evil", architectures=["EvilForCausalLM"], auto_map={"AutoModelForCausalLM": "m.EvilForCausalLM"})
    assert "needs remote code" in verify_checkpoint(variant(good, tmp_path, config=remote))["structure"]
    flat = edit_quant_state(K_PROJ, lambda d: d.update(shape=[2048]))
    shutil.rmtree(tmp_path / "v")
    with pytest.raises(QConvertError, match=r"quant-state shape \[2048\]; a Linear weight is 2-D"):
        verify_checkpoint(variant(good, tmp_path, config=remote, tensors=flat))


@pytest.mark.slow
def test_checks_accept_every_known_decoder_family(tmp_path):
    """The controls for the structure checks: what `quantize` writes for each family it plans from
    config.json (tied heads, so the checkpoint has no lm_head) passes verify and loads."""
    from helpers import make_tiny_decoder

    from qconvert.convert.plan import KNOWN_DECODERS
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint

    for arch in KNOWN_DECODERS:
        q = tmp_path / f"{arch}-q"
        quantize_checkpoint(str(make_tiny_decoder(tmp_path / arch, arch, tie=True, flags={})), q)
        assert verify_checkpoint(q)["structure"] == f"matches the {arch} config.json builds"
        assert type(qconvert.load_model(q, backend="reference", device="cpu")).__name__ == arch


# ---------------------------------------------------------------- train --config: bounded reading


def _alias_bomb() -> str:
    """Billion laughs in YAML: ten levels of nine aliases each, under 500 bytes."""
    lines = ["learning_rate:", '  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  - &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


RUN_CONFIG_CASES = [
    ("alias-bomb", "run.yaml", _alias_bomb(), "run.yaml:3: uses the alias *a, which qconvert does not expand"),
    ("32-MB", "run.yaml", "target_modules:\n" + "  - q_proj\n" * (32 * 2**20 // 11), "bytes, over the 262144-byte limit for a run config"),
    ("yaml-nested-deep", "run.yaml", "learning_rate: " + "[" * 50_000, "nested too deep (over 64 levels)"),
    ("json-nested-deep", "run.json", '{"learning_rate": ' + "[" * 50_000, "nested too deep (over 64 levels)"),
    ("yaml-key-twice", "run.yaml", "learning_rate: 1e-4\nlora_r: 8\nlearning_rate: 2e-4\n", "run.yaml:3: gives the key 'learning_rate' twice"),
    ("json-key-twice", "run.json", '{"learning_rate": 1e-4, "learning_rate": 2e-4}', "run.json: names 'learning_rate' twice"),
]


@pytest.mark.parametrize("case,name,text,needle", RUN_CONFIG_CASES, ids=[c[0] for c in RUN_CONFIG_CASES])
def test_train_config_file_is_read_within_bounds(tmp_path, case, name, text, needle):
    """Each failed on the old reader: the alias bomb and the 32 MB file ran past the deadline, deep
    nesting ended in a RecursionError ("bug" line), a repeated key was accepted with the last value."""
    from hostile_util import run_limited

    cfg = tmp_path / name
    cfg.write_text(text)
    code = "import runpy, sys; sys.argv = ['qconvert', 'train', '--config', sys.argv[1]]; runpy.run_module('qconvert', run_name='__main__')"
    r, seconds = run_limited(code, cfg, mem_mb=1024, timeout_s=20)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0].startswith("qconvert: error: --config") and needle in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and seconds < 10, (seconds, r.stderr[-2000:])
