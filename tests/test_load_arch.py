"""`qconvert.load_model` on the families whose tensors transformers renames or merges on load.

For each family tests/test_arch.py holds byte-identical to the anchor with a rename or a converter
(gpt_neox's ``embed_out`` -> ``lm_head``, hy_v4's 4-bit ``linear_gate`` -> ``gate_proj``, the MoE
experts that transformers stacks into 3-D parameters), a tiny source (tools/arch_sweep.py) is
quantized, loaded with ``load_model(q, device="cpu", backend="reference")`` in float32, and compared
with plain transformers on the SOURCE checkpoint whose quantized weights were replaced by their
reference-dequantized values (their logical dtype, so the replacement is exact): every tensor that
is not 4-bit equal, bit for bit, to transformers' own renamed/merged parameter, and the logits within
FLOAT32_REL. Then `train` runs two steps on gpt_neox and one MoE family, and `merge` of that adapter
gives a checkpoint with the source's names that transformers loads to the unmerged model's logits.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tolerances import FLOAT32_REL

_spec = importlib.util.spec_from_file_location("arch_sweep", Path(__file__).parent.parent / "tools" / "arch_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# family -> what transformers does to its checkpoint on load
FAMILIES = {
    "gpt_neox": "embed_out renamed to lm_head",
    "mixtral": "block_sparse_moe renamed to mlp, experts merged",
    "phimoe": "block_sparse_moe renamed to mlp, experts merged",
    "qwen2_moe": "experts merged, shared expert",
    "qwen3_moe": "experts merged",
    "olmoe": "experts merged",
    "granitemoe": "input_linear/output_linear experts",
    "deepseek_v2": "experts merged, MLA",
    "deepseek_v3": "experts merged, fp32-kept e_score_correction_bias",
    "hy_v4": "4-bit linear_gate renamed to gate_proj",
}
FAST = ("gpt_neox", "mixtral")  # the CI's fast loop runs these two; the rest are slow


def quantized_family(family: str, work: Path, tokenizer: bool = False, experts: str = "4bit") -> tuple[Path, Path]:
    """A tiny ``family`` source (bfloat16) and its qconvert quantize output (``experts``: its option)."""
    from qconvert.convert.quantize import quantize_checkpoint

    src = sweep.build_source(family, work / "src")
    if tokenizer:
        from test_train import make_tokenizer

        make_tokenizer(src)
    quantize_checkpoint(str(src), work / "q", experts=experts)
    return src, work / "q"


def dequantized_source_model(src: Path, q: Path, out: Path):
    """transformers' own float32 model of the source checkpoint in which every weight that ``q`` holds
    in 4 bits is replaced by its reference dequantization (same names: quantize keeps the source's)."""
    from transformers import AutoModelForCausalLM

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import QuantizedTensor, companion_keys, find_quantized
    from qconvert.quant.reference import dequantize_4bit_ref

    shutil.copytree(src, out)
    sd = load_file(str(out / "model.safetensors"))
    ck = Checkpoint(q)
    quantized = find_quantized(ck.keys())
    assert quantized
    for name in quantized:
        assert name in sd, name
        qt = QuantizedTensor.from_state_dict(name, {k: ck.get(k) for k in companion_keys(name, ck.keys())})
        sd[name] = dequantize_4bit_ref(qt)  # its logical dtype: bf16 here, float32 for hy_v4's kept module
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_family(family: str, work: Path) -> None:
    """load_model against transformers on the dequantized source; the routed experts of MoE families
    are 4-bit (the default) and each expert's dequantized matrix is transformers' merged one."""
    import qconvert
    from qconvert.nn.linear4bit import Linear4bit
    from qconvert.nn.experts4bit import Experts4bitWeight

    src, q = quantized_family(family, work)
    ours = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    ref = dequantized_source_model(src, q, work / "ref")
    four_bit = {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    experts = {n: m for n, m in ours.named_modules() if isinstance(m, Experts4bitWeight)}
    assert four_bit
    assert bool(experts) == (family != "gpt_neox"), family  # every other family here is a MoE
    ref_sd = ref.state_dict()
    ours_sd = ours.state_dict()
    assert {n.removesuffix(".weight") for n in ref_sd if n.endswith(".weight")} >= four_bit
    for n, t in ours_sd.items():  # renamed and merged tensors are transformers' own, bit for bit
        mod, _, attr = n.rpartition(".")
        if (mod in four_bit and attr != "bias") or mod in experts:
            continue
        assert torch.equal(t, ref_sd[n]), n
    for n in four_bit:  # the 4-bit layers hold the dequantized weights transformers loaded
        assert torch.equal(ours.get_submodule(n).dequantized(torch.float32), ref_sd[f"{n}.weight"]), n
    for n, w in experts.items():  # and so does each 4-bit expert, one expert at a time
        assert all(torch.equal(w.expert(e, torch.float32), ref_sd[n][e]) for e in range(w.num_experts)), n
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
    assert got.dtype == want.dtype == torch.float32
    assert rel(got, want) < FLOAT32_REL, rel(got, want)


@pytest.mark.parametrize("family", FAST)
def test_load_model_matches_transformers_on_dequantized_source(tmp_path, family):
    check_family(family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FAST)))
def test_load_model_matches_transformers_on_dequantized_source_slow(tmp_path, family):
    check_family(family, tmp_path)


def merged_matches_unmerged(src: Path, q: Path, adapter: Path, work: Path) -> None:
    """`merge` of ``adapter`` into ``q`` (float32) writes the source checkpoint's names, and plain
    transformers on it gives the logits of PEFT's unmerged adapter on the dequantized source."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qconvert.export.merge import merge_adapter

    merge_adapter(str(q), str(adapter), work / "merged", dtype="float32")
    assert set(sweep.tensors(work / "merged")) == set(sweep.tensors(src))  # the stored names, nothing quantized
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
    unmerged = PeftModel.from_pretrained(dequantized_source_model(src, q, work / "ref"), str(adapter)).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits
        want = unmerged(input_ids=ids, use_cache=False).logits
        base = unmerged.get_base_model()
        with unmerged.disable_adapter():
            bare = base(input_ids=ids, use_cache=False).logits
    assert rel(want, bare) > 100 * FLOAT32_REL  # the adapter changes the model, so the check below means something
    assert rel(got, want) < FLOAT32_REL, rel(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAST)
def test_train_two_steps_then_merge(tmp_path, family):
    """`train` runs on the 4-bit model (LoRA on its linear layers; PEFT's "all-linear" would also wrap
    the merged expert parameters), PEFT loads the adapter on qconvert's model and on transformers'
    with the same logits, and `merge` writes the source's names with the unmerged logits."""
    import qconvert
    from qconvert.training.loop import train
    from test_train import memorize_set

    src, q = quantized_family(family, tmp_path, tokenizer=True)
    out = tmp_path / "run"
    r = train(str(q), str(memorize_set(tmp_path)), out, max_steps=2, backend="reference", lora_r=4, lora_alpha=8,
              grad_accum=1, lr=1e-2)
    assert r["step"] == 2 and not r["interrupted"]
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(".lora_B." in k and t.abs().sum() > 0 for k, t in lora.items())  # trained: B left zero
    ours = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32, adapter=out)
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(dequantized_source_model(src, q, tmp_path / "ref0"), str(out)).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(ours(input_ids=ids, use_cache=False).logits, theirs(input_ids=ids, use_cache=False).logits) < FLOAT32_REL
    merged_matches_unmerged(src, q, out, tmp_path)


@pytest.mark.slow
def test_merge_of_a_renamed_4bit_layer_keeps_the_stored_name(tmp_path):
    """hy_v4's 4-bit ``linear_gate`` is the model's ``gate_proj``: an adapter on the model's names is
    merged into the stored ``linear_gate`` weights, and the result is the unmerged model."""
    from peft import LoraConfig, get_peft_model

    import qconvert
    from qconvert.nn.linear4bit import Linear4bit

    src, q = quantized_family("hy_v4", tmp_path)
    model = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    targets = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    renamed = [n for n in targets if n.endswith(".gate_proj")]
    assert renamed and all(f"{n.replace('.gate_proj', '.linear_gate')}.weight" in sweep.tensors(src) for n in renamed)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged_matches_unmerged(src, q, tmp_path / "adapter", tmp_path)


@pytest.mark.slow
def test_merge_folds_lora_on_merged_expert_parameters(tmp_path):
    """PEFT's LoRA on the 3-D expert parameters transformers merges (target_parameters): merge folds it
    into the stored per-expert tensors; transformers' model of the merged folder holds PEFT's own
    merge_and_unload of that adapter on the dequantized model (float32), and gives its unmerged logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    import qconvert

    src, q = quantized_family("mixtral", tmp_path, experts="16bit")  # 16-bit experts: parameters PEFT can wrap
    model = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    merged_matches_unmerged(src, q, tmp_path / "adapter", tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    peft = PeftModel.from_pretrained(dequantized_source_model(src, q, tmp_path / "ref2"), str(tmp_path / "adapter"))
    theirs = peft.merge_and_unload().state_dict()
    experts = [n for n in ours if ".experts." in n]
    assert len(experts) == 4
    for n in experts:
        assert rel(ours[n], theirs[n]) < FLOAT32_REL, n


@pytest.mark.parametrize("change, message", [
    ("drop", "lacks 1 tensor(s) the MixtralForCausalLM built from config.json needs, e.g. 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"),
    ("extra", "1 tensor(s) have no place in the MixtralForCausalLM config.json builds, e.g. 'model.layers.1.block_sparse_moe.experts.4.w2.weight'"),
    ("shape", "tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight' is [64, 32], the MixtralForCausalLM built from config.json needs [64, 128]"),
])
def test_merged_experts_are_checked_one_by_one(tmp_path, change, message):
    """A tensor transformers merges is still checked by its own name before anything is read: a
    missing expert, an expert the model has no place for, or a wrong shape is an error naming it."""
    import qconvert
    from qconvert.errors import FormatError

    _, q = quantized_family("mixtral", tmp_path, experts="16bit")  # 4-bit experts: tests/test_experts4bit.py
    f = q / "model.safetensors"
    sd = load_file(str(f))
    victim = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    if change == "drop":
        del sd[victim]
    elif change == "extra":
        sd[victim.replace(".3.", ".4.")] = sd[victim].clone()
    else:
        sd[victim] = sd[victim][:, :32].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(FormatError) as e:
        qconvert.load_model(q, device="cpu", backend="reference")
    assert str(e.value) == f"{q}: {message}"
