"""An adapter_config.json that disagrees with its adapter_model.safetensors, loaded through PEFT
(`qconvert.load_model(adapter=)`, generate and eval --adapter, merge's check):

- targeting fewer modules than the weights hold: PEFT ignored the others in silence (the model ran
  without part of the trained update);
- targeting more (or asking for modules_to_save / DoRA magnitudes the file lacks): PEFT started
  those from its initialisation (random with init_lora_weights false) behind one UserWarning (its
  default initialisation, lora_B zero, changes nothing and is still accepted);
- settings PEFT itself rejects (a target matching the whole model, layers that do not exist,
  modules_to_save without weights, DoRA without magnitudes, a megatron_core module): PEFT's own
  exception type, out of load_model as it was.

Each is now a FormatError naming the file and what disagrees, from one place
(qconvert.model.adapters.attach_peft)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hostile_util import make_llama_files, make_lora
from test_hostile_runtime import refused

from qconvert.errors import FormatError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    from runtime_helpers import make_word_tokenizer

    d = tmp_path_factory.mktemp("hostile-adapter-targets")
    src = make_llama_files(d / "src", vocab=128)
    make_word_tokenizer(src)
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    make_lora(d / "adapter", src, modules=("q_proj", "v_proj"))
    return {"dir": d, "q": d / "q", "adapter": d / "adapter"}


def edited(env, tmp_path, **changes):
    a = shutil.copytree(env["adapter"], tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg.update(changes)
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


CASES = [
    ({"target_modules": ["q_proj"]}, "adapter_config.json leaves out 1 LoRA module(s) the weights hold e.g. model.layers.0.self_attn.v_proj"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"], "init_lora_weights": False},
     "adapter_config.json adds 2 tensor(s) the weights lack e.g. model.layers.0.self_attn.k_proj.lora_A.weight"),
    ({"modules_to_save": ["lm_head"]}, "PEFT cannot attach this adapter"),
    ({"use_dora": True}, "PEFT cannot attach this adapter"),
    ({"layers_to_transform": [7], "layers_pattern": "layers"}, "PEFT cannot attach this adapter"),
    ({"target_modules": ".*"}, "PEFT cannot attach this adapter"),
    ({"megatron_config": {"a": 1}, "megatron_core": "os"}, "PEFT cannot attach this adapter"),
]


@pytest.mark.parametrize("changes, match", CASES)
def test_load_model_refuses_a_config_that_disagrees_with_the_weights(env, tmp_path, changes, match):
    import qconvert

    a = edited(env, tmp_path, **changes)
    with pytest.raises(FormatError) as e:
        qconvert.load_model(env["q"], adapter=str(a))
    assert match in " ".join(str(e.value).split("\n")), e.value


@pytest.mark.parametrize("changes, match", CASES[:2])
def test_generate_refuses_it_too(env, tmp_path, capsys, changes, match):
    a = edited(env, tmp_path, **changes)
    refused(capsys, "generate", env["q"], "--adapter", a, "--prompt", "w1 w2", "--max-new-tokens", 1, match=match)


def test_the_matching_adapter_loads_and_its_update_counts(env):
    import qconvert

    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        bare = qconvert.load_model(env["q"])(input_ids=ids).logits
        with_lora = qconvert.load_model(env["q"], adapter=str(env["adapter"]))(input_ids=ids).logits
    assert not torch.equal(bare, with_lora)


def test_extra_targets_that_peft_starts_at_zero_change_nothing_and_load(env, tmp_path):
    import qconvert

    a = edited(env, tmp_path, target_modules=["q_proj", "v_proj", "k_proj"])  # k_proj: lora_B zero, PEFT's default
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = qconvert.load_model(env["q"], adapter=str(env["adapter"]))(input_ids=ids).logits
        got = qconvert.load_model(env["q"], adapter=str(a))(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_values_are_refused_as_merge_refuses_them(env, tmp_path, capsys, value):
    """load_model and generate attached them and every logit came out NaN."""
    from safetensors.torch import load_file, save_file

    import qconvert

    a = shutil.copytree(env["adapter"], tmp_path / "a")
    sd = load_file(str(a / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    sd[key][3, 1] = value
    save_file(sd, str(a / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match="model.layers.0.self_attn.v_proj.lora_B.weight holds NaN or Inf values"):
        qconvert.load_model(env["q"], adapter=str(a))
    refused(capsys, "generate", env["q"], "--adapter", a, "--prompt", "w1", "--max-new-tokens", 1, match="holds NaN or Inf values")
