"""Hostile and careless adapters: `merge`, `export-adapter` and `push` refuse each with a qconvert
FormatError naming the file and the tensor, and write nothing (spec/robustness.md, "Adapters").

The adapter is written here in PEFT's layout (tests/test_merge.py checks PEFT-made ones by value):
LoRA r=4 on q_proj and v_proj of a tiny float32 Llama (hidden 64: q_proj [64, 64], v_proj [32, 64])."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_tiny_llama
from qconvert.errors import FormatError

MODULES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)}
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-adapter")
    quantize_checkpoint(str(make_tiny_llama(d / "src", dtype=torch.float32)), d / "q")
    return d / "q"


def write_adapter(folder: Path, *, config=None, tensors=None, raw_config: str | None = None) -> Path:
    """A valid PEFT LoRA adapter folder, then edited by ``config(dict)``/``tensors(dict)``."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for m, (out, inp) in MODULES.items():
        sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(4, inp, generator=g)
        sd[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "acme/tiny-nf4", "task_type": "CAUSAL_LM"}
    if config:
        config(cfg)
    if tensors:
        tensors(sd)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def put(**kv):
    return lambda c: c.update(kv)


Q_A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


def truncate(folder: Path) -> None:
    p = folder / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


#: (case id, write_adapter arguments, a damage applied afterwards, the message)
CASES = [
    ("config-invalid-json", dict(raw_config='{"peft_type": "LORA", "r": 4,'), None, r"adapter_config\.json: not valid JSON"),
    ("config-a-list", dict(raw_config="[]"), None, r"adapter_config\.json: must hold a JSON object, not list"),
    ("config-nested-100k-deep", dict(raw_config="[" * 100_000), None, r"adapter_config\.json: not valid JSON"),
    ("config-not-lora", dict(config=put(peft_type="IA3")), None, r"peft_type 'IA3' is not LORA"),
    ("r-zero", dict(config=put(r=0)), None, r"r must be a positive integer, got 0"),
    ("r-negative", dict(config=put(r=-4)), None, r"r must be a positive integer, got -4"),
    ("r-a-string", dict(config=put(r="4")), None, r"r must be a positive integer, got '4'"),
    ("r-true", dict(config=put(r=True)), None, r"r must be a positive integer, got True"),
    ("alpha-nan", dict(config=put(lora_alpha=math.nan)), None, r"lora_alpha must be a finite number, got nan"),
    ("rank-pattern-zero", dict(config=put(rank_pattern={"q_proj": 0})), None, r"rank_pattern must map module names to positive integers"),
    ("rank-pattern-bad-regex", dict(config=put(rank_pattern={"q_proj[": 4})), None, r"rank_pattern key 'q_proj\[' is not a valid regular expression"),
    ("lora-B-missing", dict(tensors=lambda sd: sd.pop(Q_B)), None, r"q_proj\.lora_A has no matching lora_B"),
    ("lora-A-missing", dict(tensors=lambda sd: sd.pop(Q_A)), None, r"q_proj\.lora_B has no matching lora_A"),
    ("rank-mismatch", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(3, 64)})), None,
     r"q_proj: lora_A is \[3, 64\] and lora_B \[64, 4\], rank 4 needs \[4, in\] and \[out, 4\]"),
    ("rank-differs-from-config", dict(config=put(r=8)), None, r"rank 8 needs"),
    ("lora-A-3d", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(4, 8, 8)})), None, r"lora_A is \[4, 8, 8\]"),
    ("integer-weights", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(4, 64, dtype=torch.int32)})), None,
     r"must be floating point"),
    ("not-a-lora-tensor", dict(tensors=lambda sd: sd.update({f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)})), None,
     r"tensor 'base_model\.model\.model\.embed_tokens\.lora_embedding_A' is not a LoRA A/B weight"),
    ("no-tensors-at-all", dict(tensors=lambda sd: sd.clear()), None, r"no LoRA weights"),
    ("truncated-weights", {}, truncate, r"adapter_model\.safetensors: not a readable safetensors file"),
    ("garbage-weights", {}, lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), r"not a readable safetensors file"),
]


@pytest.mark.parametrize("case,kw,damage,message", CASES, ids=[c[0] for c in CASES])
def test_merge_refuses(base, tmp_path, case, kw, damage, message):
    from qconvert.export.merge import merge_adapter

    a = write_adapter(tmp_path / "a", **kw)
    if damage:
        damage(a)
    with pytest.raises(FormatError, match=message):
        merge_adapter(str(base), str(a), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no output, no staging folder left


@pytest.mark.parametrize("case,kw,damage,message", CASES, ids=[c[0] for c in CASES])
def test_export_adapter_refuses(tmp_path, case, kw, damage, message):
    from qconvert.export.adapter import export_adapter

    a = write_adapter(tmp_path / "a", **kw)
    if damage:
        damage(a)
    with pytest.raises(FormatError, match=message):
        export_adapter(a, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("base_id", ["/home/me/base", "./base", "base", ""])
def test_export_adapter_refuses_a_base_model_that_is_not_a_hub_id(tmp_path, base_id):
    from qconvert.errors import OptionError
    from qconvert.export.adapter import export_adapter

    with pytest.raises(OptionError, match=r"--base-model .* is not a Hub repo id"):
        export_adapter(write_adapter(tmp_path / "a"), tmp_path / "out", base_model=base_id)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,tensors,message", [
    ("in-features-differ", lambda sd: sd.update({Q_A: torch.zeros(4, 32)}), r"q_proj: lora_B @ lora_A is \[64, 32\], the base weight is \[64, 64\]"),
    ("out-features-differ", lambda sd: sd.update({Q_B: torch.zeros(32, 4)}), r"q_proj: lora_B @ lora_A is \[32, 64\], the base weight is \[64, 64\]"),
    ("module-not-in-base", lambda sd: sd.update({f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                                                 f"{PREFIX}model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}),
     r"adapts 'model\.layers\.7\.self_attn\.q_proj\.weight', which .* does not have"),
])
def test_merge_refuses_an_adapter_for_another_base(base, tmp_path, case, tensors, message):
    from qconvert.export.merge import merge_adapter

    a = write_adapter(tmp_path / "a", tensors=tensors)
    with pytest.raises(FormatError, match=message):
        merge_adapter(str(base), str(a), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("raw,message", [("[]", r"config\.json: must hold a JSON object, not list"),
                                         ("{oops", r"config\.json: not valid JSON")])
def test_merge_refuses_a_base_with_a_broken_config(base, tmp_path, raw, message):
    from qconvert.export.merge import merge_adapter

    b = tmp_path / "base"
    shutil.copytree(base, b)
    (b / "config.json").write_text(raw)
    with pytest.raises(FormatError, match=message):
        merge_adapter(str(b), str(write_adapter(tmp_path / "a")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_of_the_valid_adapter_is_exact_and_keeps_local_paths_out_of_the_card(base, tmp_path):
    """The control: the adapter the cases damage merges to dequant(W4) + (alpha / r) B @ A. Its
    base_model_name_or_path is a local folder, which must not reach the published card."""
    from qconvert.export.merge import merge_adapter
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.io.cards import read_card_meta
    from qconvert.quant.reference import dequantize_4bit_ref

    a = write_adapter(tmp_path / "a", config=put(base_model_name_or_path=str(tmp_path / "private" / "base")))
    (tmp_path / "private" / "base").mkdir(parents=True)
    merge_adapter(str(base), str(a), tmp_path / "out", dtype="float32")
    sd, lora = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(a / "adapter_model.safetensors"))
    k = "model.layers.0.self_attn.q_proj.weight"
    want = dequantize_4bit_ref(Checkpoint(base).quantized(k), torch.float32) + 2.0 * lora[Q_B] @ lora[Q_A]
    assert torch.allclose(sd[k], want, rtol=0, atol=1e-6)
    meta = read_card_meta((tmp_path / "out" / "README.md").read_text())
    assert str(tmp_path) not in json.dumps(meta)


# ------------------------------------------------------------------------------------------- push
def _adapter_folder(tmp_path: Path, **kw) -> Path:
    from qconvert.io.cards import render_card

    a = write_adapter(tmp_path / "a", **kw)
    (a / "README.md").write_text(render_card({"base_model": "acme/tiny-nf4", "base_model_relation": "adapter", "library_name": "peft"}, "x"))
    return a


@pytest.mark.parametrize("case,base_id,message", [
    ("absolute-path", "/home/alice/models/llama", r"base_model_name_or_path is a local path \('/home/alice/models/llama'\)"),
    ("relative-path", "./llama", r"is a local path"),
    ("home-path", "~/llama", r"is a local path"),
    ("windows-path", "C:\\models\\llama", r"is a local path"),
    ("existing-folder-shaped-like-an-id", "EXISTING", r"is a local path"),
    ("single-name", "llama", r"is not a Hub repo id \('llama'\)"),
    ("missing", None, r"base_model_name_or_path is missing"),
    ("empty", "", r"base_model_name_or_path is missing"),
    ("not-a-string", ["acme/x"], r"is not a Hub repo id"),
])
def test_push_refuses_an_adapter_whose_base_is_not_a_hub_id(tmp_path, monkeypatch, case, base_id, message):
    from qconvert.hub.push import validate_folder

    monkeypatch.chdir(tmp_path)
    if base_id == "EXISTING":
        base_id = "out/llama-nf4"
        (tmp_path / base_id).mkdir(parents=True)
    a = _adapter_folder(tmp_path, config=lambda c: c.update(base_model_name_or_path=base_id) if base_id is not None else c.pop("base_model_name_or_path"))
    with pytest.raises(FormatError, match=message):
        validate_folder(a)


@pytest.mark.parametrize("case,damage,message", [
    ("adapter-config-invalid-json", lambda a: (a / "adapter_config.json").write_text("{oops"), r"adapter_config\.json: not valid JSON"),
    ("adapter-r-zero", lambda a: (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0})), r"r must be a positive integer"),
    ("adapter-truncated", truncate, r"not a readable safetensors file"),
    ("model-config-invalid-json", lambda a: [(a / "adapter_config.json").unlink(), (a / "config.json").write_text("{oops")],
     r"config\.json: not valid JSON"),
    ("model-config-a-list", lambda a: [(a / "adapter_config.json").unlink(), (a / "config.json").write_text("[]")],
     r"config\.json: must hold a JSON object"),
    ("card-not-utf8", lambda a: (a / "README.md").write_bytes(b"---\nbase_model: \xff\n---\n"), r"README\.md: not UTF-8"),
])
def test_push_refuses_damaged_folders(tmp_path, case, damage, message):
    from qconvert.hub.push import validate_folder

    a = _adapter_folder(tmp_path)
    assert validate_folder(a)["kind"] == "adapter"  # the control passes
    damage(a)
    with pytest.raises(FormatError, match=message):
        validate_folder(a)


@pytest.mark.parametrize("case,kw,message", [
    ("r-zero", dict(config=put(r=0)), r"r must be a positive integer, got 0"),
    ("in-features-differ", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(4, 32)})), r"lora_B @ lora_A is \[64, 32\], the base weight is \[64, 64\]"),
    ("module-not-in-model", dict(tensors=lambda sd: sd.update({f"{PREFIX}model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                                                               f"{PREFIX}model.layers.7.mlp.up_proj.lora_B.weight": torch.zeros(100, 4)})),
     r"adapts 'model\.layers\.7\.mlp\.up_proj', which is not a Linear layer of the LlamaForCausalLM"),
    ("truncated", dict(), r"not a readable safetensors file"),
])
def test_load_model_refuses_a_damaged_adapter(base, tmp_path, case, kw, message):
    """load_model(adapter=...) checks the adapter against the loaded model before PEFT sees it
    (PEFT raises a ValueError or a size-mismatch RuntimeError traceback); the valid one attaches."""
    import qconvert

    good = qconvert.load_model(base, backend="reference", device="cpu", adapter=write_adapter(tmp_path / "good"))
    from peft import PeftModel

    assert isinstance(good, PeftModel)
    a = write_adapter(tmp_path / "a", **kw)
    if case == "truncated":
        truncate(a)
    with pytest.raises(FormatError, match=message):
        qconvert.load_model(base, backend="reference", device="cpu", adapter=a)
