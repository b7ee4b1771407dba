"""`train`, `merge` and `export-adapter` on the MoE and hybrid Mamba/attention families the architecture
sweep loads (issue 20, item 4), on tiny sources built as tools/arch_sweep.py builds them.

- train's defaults run on every family: LoRA on the linear layers LoRA can wrap (attention, dense and
  shared-expert MLPs, Mamba projections), none on a module PEFT refuses (a Mamba mixer's out_proj in
  falcon_h1 and falcon_mamba) or on a Linear with a forward of its own (llama4's router); the full names of
  shared-expert layers survive PEFT's MoE conversion (which would move them to the routed experts).
- ``--lora-experts`` adds PEFT's LoRA on the fused expert parameters (dropout 0), and `merge` folds it in
  exactly: the merged experts equal PEFT's own merge_and_unload on the dequantized model (float32).
- load_model's jamba runs a forward (config._is_quantized, as transformers' quantizer sets it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_load_arch import dequantized_source_model, quantized_family, rel, sweep
from tolerances import FLOAT32_REL, FLOAT32_SAME_MATH_REL

# family -> (names a default adapter must hold, names it must not hold)
DEFAULTS = {
    "qwen3_next": ("mlp.shared_expert.gate_proj", "mlp.experts"),
    "deepseek_v3": ("mlp.shared_experts.gate_proj", "mlp.experts"),
    "deepseek_v2": ("mlp.shared_experts.down_proj", "mlp.experts"),
    "glm4_moe": ("mlp.shared_experts.up_proj", "mlp.experts"),
    "falcon_h1": ("mamba.in_proj", "mamba.out_proj"),
    "falcon_mamba": ("mixer.x_proj", "mixer.out_proj"),  # and dt_proj: test_dt_proj_left_out
    "llama4_text": ("feed_forward.shared_expert.gate_proj", "feed_forward.router"),
    "jamba": ("mamba.x_proj", "mamba.dt_proj"),
    "mixtral": ("self_attn.q_proj", "mlp.experts"),
    "qwen3_moe": ("self_attn.q_proj", "mlp.experts"),
    "qwen2_moe": ("mlp.shared_expert.gate_proj", "mlp.experts"),
}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """(family, experts) -> (source, 4-bit folder), each built once per module. ``experts`` is quantize's
    option: "4bit" (its default) or "16bit" (the expert parameters PEFT's target_parameters can wrap)."""
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(family: str, experts: str = "4bit") -> tuple[Path, Path]:
        if (family, experts) not in made:
            made[family, experts] = quantized_family(family, tmp_path_factory.mktemp(family), tokenizer=True, experts=experts)
        return made[family, experts]

    return get


def train_steps(q: Path, out: Path, tmp: Path, steps: int = 1, **options) -> tuple[dict, list[str]]:
    from qconvert.training.loop import train
    from test_train import memorize_set

    lines: list[str] = []
    r = train(str(q), str(memorize_set(tmp)), out, max_steps=steps, backend="reference", lora_r=4, lora_alpha=8, grad_accum=1,
              lr=1e-2, log=lines.append, **options)
    return r, lines


def check_defaults(family: str, family_dir, tmp_path: Path) -> None:
    src, q = family_dir(family)
    r, lines = train_steps(q, tmp_path / "run", tmp_path)
    assert r["step"] == 1 and not r["interrupted"]
    keys = list(load_file(str(tmp_path / "run" / "adapter_model.safetensors")))
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}
    want, never = DEFAULTS[family]
    assert any(m.endswith(want) for m in adapted), sorted(adapted)
    assert not any(never in m for m in adapted), sorted(adapted)
    summary = next(line for line in lines if line.startswith("LoRA: "))
    assert f"on {len(adapted)} linear layers [" in summary, summary  # counted from the model PEFT built
    assert "expert parameters" not in summary
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert not cfg.get("target_parameters") and cfg["lora_dropout"] == 0.05


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(DEFAULTS))
def test_train_defaults(family, family_dir, tmp_path):
    """Before: `unexpected ValueError: lora.ParamWrapper does not work with lora_dropout != 0` on qwen3_next,
    deepseek_v2/v3 and glm4_moe; falcon_h1/falcon_mamba a ValueError from PEFT (out_proj), llama4_text an
    AttributeError (the router's tuple), jamba a RuntimeError (dt_proj.weight); mixtral, qwen2_moe and
    qwen3_moe ran, their summary saying "all linear layers"."""
    check_defaults(family, family_dir, tmp_path)


@pytest.mark.slow
def test_summary_names_what_is_left_out(family_dir, tmp_path):
    """The start summary says which layers were not adapted, and why."""
    _, q = family_dir("deepseek_v3")
    _, lines = train_steps(q, tmp_path / "run", tmp_path)
    summary = next(line for line in lines if line.startswith("LoRA: "))
    assert "model.layers.*.mlp.shared_experts.gate_proj (1)" in summary
    assert "not adapted: model.layers.*.mlp.experts.down_proj (1), model.layers.*.mlp.experts.gate_up_proj (1): routed experts" in summary


def test_jamba_load_model_runs_and_matches_float32_oracle(family_dir, tmp_path):
    """Before: its mixer multiplied by the packed bytes of dt_proj (RuntimeError). Now the logits equal
    transformers' float32 model of the dequantized source."""
    import qconvert

    src, q = family_dir("jamba")
    ours = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    ref = dequantized_source_model(src, q, tmp_path / "ref")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
    assert rel(got, want) < FLOAT32_REL, rel(got, want)


@pytest.mark.slow
def test_dt_proj_left_out(family_dir, tmp_path):
    """falcon_mamba's mixer multiplies by dt_proj.weight on a 16-bit model: no LoRA there by default
    (PEFT on the 16-bit original would skip it), and the summary says why."""
    _, q = family_dir("falcon_mamba")
    _, lines = train_steps(q, tmp_path / "run", tmp_path)
    keys = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert not any(".dt_proj." in k for k in keys) and any(".in_proj." in k for k in keys)
    summary = next(line for line in lines if line.startswith("LoRA: "))
    assert "backbone.layers.*.mixer.dt_proj (2): the 16-bit model multiplies by its weight directly" in summary


def test_parameter_delta_is_peft_s(tmp_path):
    """ParameterLora.delta (what merge folds into an expert parameter) equals PEFT's own ParamWrapper
    delta, for experts stored [E, out, in] and [E, in, out] (``is_transposed``) and a 2-D parameter."""
    from peft import LoraConfig, get_peft_model

    from qconvert.model.adapters import ParameterLora

    class Experts(torch.nn.Module):
        def __init__(self, transposed: bool):
            super().__init__()
            self.is_transposed = transposed
            self.up = torch.nn.Parameter(torch.zeros(3, 6, 5))
            self.gate = torch.nn.Parameter(torch.zeros(7, 6))

        def forward(self, x):
            return x

    for transposed in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(Experts(transposed))
        peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_parameters=["0.up", "0.gate"], init_lora_weights=False))
        for wrapper in (m for m in peft.modules() if type(m).__name__ == "ParamWrapper"):
            param = wrapper.get_param()
            pl = ParameterLora("p", wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach(),
                               tuple(param.shape), transposed)
            want = wrapper.get_delta_weight("default").detach()
            assert want.shape == param.shape
            assert rel(pl.delta(wrapper.scaling["default"]), want) < FLOAT32_SAME_MATH_REL


def merge_and_compare(family: str, family_dir, tmp_path: Path, experts: str = "16bit") -> None:
    """train with --lora-experts on a folder whose experts are ``experts`` (quantize's option), then merge
    (float32): LoRA'd linear weights are dequant + scaling * B @ A; the merged experts equal PEFT's
    merge_and_unload of the adapter on the dequantized model; the merged folder loads in plain
    transformers with the logits of the unmerged adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qconvert.model.adapters import module_targets_kept
    from qconvert.export.merge import merge_adapter

    src, q = family_dir(family, experts)
    run = tmp_path / "run"
    r, lines = train_steps(q, run, tmp_path, steps=2, lora_experts=True)
    assert any("LoRA dropout 0" in line for line in lines)
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and cfg["lora_dropout"] == 0
    assert "lora_dropout: 0.0" in (run / "config.yaml").read_text()  # the dropout the run used, as adapter_config.json
    summary = merge_adapter(str(q), str(run), tmp_path / "merged", dtype="float32", check=True)  # merge's own check (export/check.py) passes on parameter adapters
    assert set(sweep.tensors(tmp_path / "merged")) == set(sweep.tensors(src))  # the stored names, experts split back
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with module_targets_kept():
        peft = PeftModel.from_pretrained(dequantized_source_model(src, q, tmp_path / "ref"), str(run)).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft(input_ids=ids, use_cache=False).logits
        with peft.disable_adapter():
            bare = peft(input_ids=ids, use_cache=False).logits
        got = merged(input_ids=ids, use_cache=False).logits
    assert rel(want, bare) > 100 * FLOAT32_REL
    assert rel(got, want) < FLOAT32_REL, rel(got, want)
    ref = peft.merge_and_unload().state_dict()
    ours = merged.state_dict()
    experts = [n for n, t in ours.items() if t.dim() == 3 and ".experts." in n]
    assert experts and summary["merged_parameters"] == len(experts)  # every expert parameter adapted, and merged
    for n in experts:  # PEFT's own merge of the parameter adapters, in float32
        assert rel(ours[n], ref[n]) < FLOAT32_REL, n
    check_adapter_loads(src, q, run, tmp_path, peft)
    sd = load_file(str(run / "adapter_model.safetensors"))
    scaling = cfg["lora_alpha"] / cfg["r"]
    linear = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")]
    linear = [m for m in linear if not m.endswith((".experts", ".base_layer"))]
    assert linear
    deq = dequantized_source_model(src, q, tmp_path / "ref2").state_dict()
    for m in linear:  # dequant + scaling * B @ A, float32
        a, b = sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"]
        assert rel(ours[f"{m}.weight"], deq[f"{m}.weight"] + scaling * (b.float() @ a.float())) < FLOAT32_SAME_MATH_REL, m


def check_adapter_loads(src: Path, q: Path, run: Path, tmp_path: Path, peft) -> None:
    """load_model(adapter=) gives the logits of ``peft`` (the adapter on the dequantized model); the
    export-adapter folder loads in PEFT on the 16-bit original with every tensor where it was trained,
    and on the dequantized model gives load_model's logits."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    import qconvert
    from qconvert.model.adapters import module_targets_kept
    from qconvert.export.adapter import export_adapter

    ours = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32, adapter=run)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(input_ids=ids, use_cache=False).logits
        assert rel(got, peft(input_ids=ids, use_cache=False).logits) < FLOAT32_REL
    export_adapter(run, tmp_path / "exported")
    with module_targets_kept():
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), str(tmp_path / "exported"))
        exported = PeftModel.from_pretrained(dequantized_source_model(src, q, tmp_path / "ref3"), str(tmp_path / "exported")).eval()
    with torch.no_grad():
        assert rel(exported(input_ids=ids, use_cache=False).logits, got) < FLOAT32_REL
    from qconvert.run.inference import attach_adapter, load_for_inference

    lm = load_for_inference(q, backend="reference", device="cpu", dtype="float32")  # generate/eval --adapter, then a second one
    for adapter in (run, tmp_path / "exported"):
        attach_adapter(lm, adapter)
        with torch.no_grad():
            assert rel(lm.model(input_ids=ids, use_cache=False).logits, got) < FLOAT32_REL, adapter
    saved = load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(original)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k].float(), saved[k].float()) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "jamba"])
def test_train_lora_experts_then_merge_exact(family, family_dir, tmp_path):
    """Before: `merge` refused any adapter with target_parameters."""
    merge_and_compare(family, family_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family, given, message", [
    ("falcon_h1", "out_proj", "--target-modules 'out_proj': PEFT refuses LoRA on out_proj in falcon_h1"),
    ("llama4_text", "router", "--target-modules 'router': model.layers.0.feed_forward.router is a Llama4Router, a Linear with a forward of its own"),
])
def test_given_targets_lora_cannot_take_are_refused(family, given, message, family_dir, tmp_path):
    """Before: `unexpected ValueError` (PEFT's Mamba check) and `unexpected AttributeError` (the tuple)."""
    from qconvert.errors import OptionError

    _, q = family_dir(family)
    with pytest.raises(OptionError, match="^" + re.escape(message)):
        train_steps(q, tmp_path / "run", tmp_path, target_modules=[given])


@pytest.mark.slow
def test_given_shared_expert_leaf_stays_on_the_shared_expert(family_dir, tmp_path):
    """--target-modules gate_proj,up_proj on deepseek_v3: the dense and shared-expert layers of that name
    (PEFT alone would move the names onto the routed experts and fail on the dropout)."""
    _, q = family_dir("deepseek_v3")
    train_steps(q, tmp_path / "run", tmp_path, target_modules=["gate_proj", "up_proj"])
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in load_file(str(tmp_path / "run" / "adapter_model.safetensors"))}
    assert adapted == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.shared_experts.gate_proj",
                       "model.layers.1.mlp.shared_experts.up_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ("rows", "model.layers.0.mlp.experts.down_proj: lora_A is [6, 128] and lora_B [64, 6]; the parameter [4, 64, 128] at rank 2 "
             "needs [8, 128] and [64, 8]"),
    ("nesting", "model.layers.0.mlp.experts.base_layer.base_layer: 3 nested parameter adapters on 'model.layers.0.mlp.experts', "
                "which has 2 targeted parameter(s)"),
])
def test_merge_refuses_a_damaged_parameter_adapter(change, message, family_dir, tmp_path):
    """A parameter adapter whose A/B do not fit the expert parameter, or that nests more wrappers than the
    module has targeted parameters, is refused with one line naming it; nothing is written."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    import qconvert
    from qconvert.errors import FormatError
    from qconvert.export.merge import merge_adapter

    _, q = family_dir("mixtral", "16bit")
    model = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                     lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.model.layers.0.mlp.experts"
    if change == "rows":
        sd[f"{key}.lora_A.weight"] = sd[f"{key}.lora_A.weight"][:6].contiguous()
        sd[f"{key}.lora_B.weight"] = sd[f"{key}.lora_B.weight"][:, :6].contiguous()
    else:
        for ab in "AB":
            sd[f"{key}.base_layer.base_layer.lora_{ab}.weight"] = sd[f"{key}.lora_{ab}.weight"].clone()
    save_file(sd, str(f))
    with pytest.raises(FormatError, match=re.escape(message)):
        merge_adapter(str(q), str(tmp_path / "adapter"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["falcon_h1", "deepseek_v3"])
def test_train_defaults_then_merge(family, family_dir, tmp_path):
    """Hybrid Mamba/attention (falcon_h1) and shared-expert (deepseek_v3) defaults: the merged folder,
    with the source's names, gives in plain transformers the logits of the unmerged adapter (PEFT on the
    dequantized source, the shared-expert names kept)."""
    from qconvert.model.adapters import module_targets_kept
    from test_load_arch import merged_matches_unmerged

    src, q = family_dir(family)
    train_steps(q, tmp_path / "run", tmp_path, steps=2)
    with module_targets_kept():
        merged_matches_unmerged(src, q, tmp_path / "run", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("experts", ["16bit", "4bit"])
def test_lora_experts_resume_is_exact(experts, family_dir, tmp_path):
    """A --lora-experts run stopped after step 1 and resumed writes the adapter of the uninterrupted run,
    byte for byte (the parameter adapters' checkpoint is read back by PEFT's own state-dict loader),
    on 16-bit and on 4-bit experts."""
    _, q = family_dir("qwen3_moe", experts)
    kw = dict(steps=3, lora_experts=True, save_steps=1, optim="adamw")
    train_steps(q, tmp_path / "whole", tmp_path, **kw)
    r, _ = train_steps(q, tmp_path / "split", tmp_path, stop_after=1, **kw)
    assert r["interrupted"] and r["step"] == 1
    r, _ = train_steps(q, tmp_path / "split", tmp_path, resume="latest", **kw)
    assert r["step"] == 3
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "split"))
    assert any(".experts.base_layer.lora_A." in k for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_train_defaults_exit_0(family_dir, tmp_path):
    """`qconvert train` with default options on qwen3_next (before: exit 1, `unexpected ValueError:
    lora.ParamWrapper does not work with lora_dropout != 0`)."""
    from test_train import memorize_set
    from test_train import train as cli_train

    _, q = family_dir("qwen3_next")
    r = cli_train(q, memorize_set(tmp_path), tmp_path / "run", "--max-steps", 1, "--grad-accum", 1, "--lora-r", 4)
    assert "LoRA: r 4, alpha 16, dropout 0.05 on 15 linear layers [" in r.stderr
    assert "model.layers.*.mlp.shared_expert.gate_proj (2)" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_lora_experts_on_4bit_experts_then_merge_exact(family, family_dir, tmp_path):
    """Before: --lora-experts on quantize's default folder (4-bit experts) was refused ("needs them in 16 bits").
    Now it trains PEFT's own target_parameters adapter on the 4-bit stacks: merge is exact against PEFT's
    merge_and_unload on the dequantized model, and export-adapter's folder loads in stock PEFT."""
    merge_and_compare(family, family_dir, tmp_path, experts="4bit")


@pytest.mark.slow
def test_lora_experts_on_4bit_experts_summary(family_dir, tmp_path):
    """The start summary says the expert parameters are 4-bit stacks adapted per routed expert, and that
    nothing is left out; the adapter's expert tensors are trained (B moved from zero)."""
    _, q = family_dir("qwen3_moe")
    _, lines = train_steps(q, tmp_path / "run", tmp_path, lora_experts=True)
    summary = next(line for line in lines if line.startswith("LoRA: "))
    assert ("and 4 expert parameters [model.layers.*.mlp.experts.down_proj (2), model.layers.*.mlp.experts.gate_up_proj (2)] "
            "(4 of them 4-bit stacks: each routed expert's update is added as that expert is dequantized)") in summary, summary
    assert "not adapted" not in summary
    sd = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert all(sd[k].abs().max() > 0 for k in sd if ".experts." in k and ".lora_B." in k)
