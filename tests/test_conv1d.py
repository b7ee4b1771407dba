"""The GPT-2 family (transformers' Conv1D layers, weight stored [in, out]) end to end: quantize, load on
qconvert's 4-bit layers, LoRA-train, and write adapters and merges that the 16-bit original (built of
Conv1D) uses as it uses PEFT's own.

The 4-bit tensor of a Conv1D holds its weight's transpose, [out, in] (spec section 9), and a Linear4bit
takes the Conv1D's place. PEFT builds the same LoRA layer on a Conv1D as on a Linear (lora_A [r, in],
lora_B [out, r]); only its merge transposes, for a layer saved with fan_in_fan_out=True. The oracles
below are plain transformers and PEFT on float32 GPT-2 models whose Conv1D weights are the dequantized
4-bit ones transposed back (helpers.float32_reference).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import float32_reference, run_cli_here as run_cli
from runtime_helpers import make_word_tokenizer, random_texts, write_jsonl
from tolerances import FLOAT32_REL, LORA_CHANGE_ACROSS_NF4_REL, LOSS_ACROSS_RUNS_REL

CONV1D = ("c_attn", "c_proj", "c_fc")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (the absolute difference when b is all zeros, as a LayerNorm's initial bias)."""
    diff, scale = (a.float() - b.float()).norm().item(), b.float().norm().item()
    return diff / scale if scale else diff


def make_word_gpt2(folder: Path, *, tie: bool = True, seed: int = 0) -> Path:
    """A tiny GPT-2 over the word tokenizer (vocabulary 128), float32. n_embd 40 and n_inner 100 make
    every Conv1D weight non-square but c_proj of attention, and ragged (4800 and 4000 elements are not
    multiples of the block size 64 times 64). The tied head is scaled like a trained one's (a random
    init gives logits near zero, so nothing could learn far below log(vocab))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=40, n_inner=100, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                     eos_token_id=2, pad_token_id=3, tie_word_embeddings=tie)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    model.save_pretrained(folder)
    make_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(16-bit original, its qconvert 4-bit checkpoint)."""
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("gpt2")
    src = make_word_gpt2(d / "src")
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    return src, d / "q"


def ids(n: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(8, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_load_model_puts_4bit_layers_in_place_of_conv1d(gpt2):
    """Every Conv1D became a Linear4bit over the stored [out, in] tensor, with its bias; the logits are
    the dequantize-then-run reference's (plain transformers, Conv1D weights transposed back)."""
    import qconvert
    from qconvert.nn.linear4bit import Linear4bit
    from transformers.pytorch_utils import Conv1D

    src, q = gpt2
    model = qconvert.load_model(q, backend="reference", device="cpu", dtype=torch.float32)
    stored = load_file(str(q / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if n.endswith(CONV1D)}
    assert len(layers) == 8 and not any(isinstance(m, Conv1D) for m in model.modules())
    for name, m in layers.items():
        assert isinstance(m, Linear4bit) and m.from_conv1d, name
        assert torch.equal(m.weight, stored[f"{name}.weight"]) and torch.equal(m.bias, stored[f"{name}.bias"]), name
    c_fc = model.transformer.h[0].mlp.c_fc
    assert (c_fc.out_features, c_fc.in_features) == (100, 40)
    assert not model.lm_head.__class__.__name__ == "Linear4bit"  # the tied head stays as stored
    ref = float32_reference(q)
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x).logits, ref(x).logits
        from transformers import AutoModelForCausalLM

        orig = AutoModelForCausalLM.from_pretrained(src).eval()(x).logits
    assert rel(ours, theirs) < FLOAT32_REL
    assert rel(ours, orig) > 100 * FLOAT32_REL  # the reference is the 4-bit model, not the original


@pytest.mark.parametrize("targets", [list(CONV1D), "all-linear"])
def test_peft_wraps_the_4bit_layers_as_linear_lora(gpt2, targets):
    """PEFT wraps each Linear4bit (not the head) with its Linear LoRA layer, fan_in_fan_out False and no
    notice about it; the LoRA update is B @ A applied as to a Linear: output + scaling * B(A(x))."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    import qconvert
    from qconvert.nn.linear4bit import Linear4bit

    base = qconvert.load_model(gpt2[1], backend="reference", device="cpu", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    assert not [w for w in seen if "fan_in_fan_out" in str(w.message)]
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(wrapped) == sorted(f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    for m in wrapped.values():
        assert isinstance(m.get_base_layer(), Linear4bit) and m.fan_in_fan_out is False
    layer = wrapped["transformer.h.1.mlp.c_fc"]
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T)
        assert rel(layer(x), want) < FLOAT32_REL


def test_adapter_shape_check_reads_conv1d_layers(gpt2, tmp_path):
    """generate/eval's adapter check knows a Conv1D's in/out (its weight reversed): an adapter of other
    sizes is one line from qconvert, on the 16-bit original as on the 4-bit model."""
    from safetensors.torch import save_file

    from qconvert.errors import FormatError
    from qconvert.run.inference import check_adapter, load_for_inference

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_fc"]}))
    save_file({"base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.zeros(2, 100),
               "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight": torch.zeros(40, 2)}, str(bad / "adapter_model.safetensors"))
    for model in gpt2:
        lm = load_for_inference(model, backend="reference", device="cpu")
        with pytest.raises(FormatError, match=r"transformer\.h\.0\.mlp\.c_fc maps 40->100 features in .*, the adapter's 100->40"):
            check_adapter(bad, lm.model, lm.name)


def peft_adapter(base, out: Path, targets, seed: int = 0) -> Path:
    """A random LoRA adapter made by PEFT itself on ``base`` (a 16-bit GPT-2: its Conv1D layers make PEFT
    save fan_in_fan_out=True), lora_B non-zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft.save_pretrained(out)
    peft.unload()
    return out


@pytest.mark.parametrize("skip", [None, "mlp.c_proj"])
def test_merge_writes_conv1d_weights_back_as_in_out(gpt2, tmp_path, skip):
    """qconvert merge on a GPT-2: every Conv1D weight written [in, out], so plain from_pretrained loads
    it with no missing, unexpected or mismatched key, and its logits (and weights) are PEFT's own
    merge_and_unload on the dequantized float32 model. With ``skip``, that Conv1D stays unquantized
    ([in, out] in the 4-bit checkpoint too) and is adapted all the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.merge import merge_adapter

    src, q = gpt2
    if skip:
        q = tmp_path / "q"
        quantize_checkpoint(str(src), q, compute_dtype="float32", skip_modules=[skip])
        assert load_file(str(q / "model.safetensors"))[f"transformer.h.0.{skip}.weight"].shape == (100, 40)  # [in, out]
    adapter = peft_adapter(float32_reference(q), tmp_path / "adapter", list(CONV1D))
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merge_adapter(str(q), str(adapter), tmp_path / "merged", dtype="float32")
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        oracle = PeftModel.from_pretrained(float32_reference(q), adapter).merge_and_unload()
    assert not [w for w in seen if "fan_in_fan_out" in str(w.message)]
    want = oracle.state_dict()
    for k, v in merged.state_dict().items():
        assert v.shape == want[k].shape and rel(v, want[k]) < FLOAT32_REL, k
    x = ids()
    with torch.no_grad():
        assert rel(merged.eval()(x).logits, oracle.eval()(x).logits) < FLOAT32_REL


def test_merge_requantized_keeps_the_4bit_layout(gpt2, tmp_path):
    """merge --quantize on a GPT-2: the 4-bit tensors stay [out, in] (what qconvert and bitsandbytes
    load), and qconvert's model of the output is the merged weights re-quantized."""
    import qconvert
    from qconvert.export.merge import merge_adapter
    from qconvert.model.checks import quant_shapes
    from qconvert.io.checkpoint import Checkpoint

    src, q = gpt2
    adapter = peft_adapter(float32_reference(q), tmp_path / "adapter", ["c_attn"])
    s = merge_adapter(str(q), str(adapter), tmp_path / "rq", dtype="float32", quantize=True)
    assert s["requantization_cost"]["layers"] == 2
    shapes = quant_shapes(Checkpoint(tmp_path / "rq"))
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (120, 40) and shapes["transformer.h.0.mlp.c_fc.weight"] == (100, 40)
    model = qconvert.load_model(tmp_path / "rq", backend="reference", device="cpu", dtype=torch.float32)
    x = ids()
    with torch.no_grad():
        assert rel(model(x).logits, float32_reference(tmp_path / "rq")(x).logits) < FLOAT32_REL


def without_prefix(src: Path, out: Path) -> Path:
    """A copy of a GPT-2 folder named as the gpt2 checkpoint on the Hub names its tensors (GPT2Model's
    names: ``h.0.attn.c_attn.weight``, no ``transformer.`` and no tied head), which transformers loads."""
    from safetensors.torch import save_file

    shutil.copytree(src, out)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("hub_names", [False, True])
def test_merge_into_the_original_conv1d_weights(gpt2, tmp_path, hub_names):
    """merge --base-original on a GPT-2: the original [in, out] weights plus the update transposed to
    match; a weight the adapter does not touch is the original's, bit for bit. The original may name
    its tensors without the model's prefix, as the gpt2 checkpoint on the Hub does; one that lacks a
    4-bit weight is refused before anything is written."""
    from safetensors.torch import save_file

    from qconvert.errors import FormatError
    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.export.merge import merge_adapter

    src, q = gpt2
    orig_dir = without_prefix(src, tmp_path / "orig") if hub_names else src
    adapter = peft_adapter(float32_reference(q), tmp_path / "adapter", ["c_attn"])
    with pytest.warns(UserWarning, match="--base-original"):
        merge_adapter(str(q), str(adapter), tmp_path / "merged", dtype="float32", base_original=str(orig_dir))
    orig, got = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    key = "transformer.h.1.attn.c_attn.weight"
    delta = LoraAdapter(adapter).delta("transformer.h.1.attn.c_attn")
    assert delta.shape == (120, 40) and got[key].shape == orig[key].shape == (40, 120)
    assert rel(got[key], orig[key] + delta.T) < FLOAT32_REL and rel(got[key], orig[key]) > 0.01
    assert torch.equal(got["transformer.h.1.mlp.c_fc.weight"], orig["transformer.h.1.mlp.c_fc.weight"])
    if hub_names:
        sd = load_file(str(orig_dir / "model.safetensors"))
        del sd["h.1.mlp.c_fc.weight"]
        save_file(sd, str(orig_dir / "model.safetensors"), metadata={"format": "pt"})
        with pytest.warns(UserWarning), pytest.raises(FormatError, match=r"orig: has no tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' "
                                                                        r"\(nor 'h\.1\.mlp\.c_fc\.weight'\), a 4-bit weight of "):
            merge_adapter(str(q), str(adapter), tmp_path / "merged2", dtype="float32", base_original=str(orig_dir))
        assert not (tmp_path / "merged2").exists()


@pytest.fixture(scope="module")
def trained(gpt2, tmp_path_factory):
    """A LoRA adapter trained by qconvert on the 4-bit GPT-2 (all linear layers)."""
    from qconvert.training.loop import train

    d = tmp_path_factory.mktemp("trained")
    data = write_jsonl(d / "mem.jsonl", [{"text": t} for t in random_texts(8, 12)])
    result = train(str(gpt2[1]), str(data), d / "run", max_steps=30, batch_size=4, lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                   backend="reference", seed=0)
    return d / "run", data, result


@pytest.mark.slow
def test_train_on_gpt2_writes_an_adapter_for_the_16bit_model(gpt2, trained, tmp_path):
    """The loss falls; adapter_config.json records fan_in_fan_out=True, so PEFT attaches the adapter to
    the 16-bit original (Conv1D layers) without a notice; there each layer adds exactly scaling * B(A(x))
    and the whole model equals qconvert's 4-bit model with the adapter once the weights are the same
    (the float32 dequantized model). export-adapter keeps all of this."""
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    import qconvert
    from qconvert.export.adapter import export_adapter
    from qconvert.run.inference import attach_adapter, load_for_inference

    src, q = gpt2
    run, _, result = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    acfg = json.loads((run / "adapter_config.json").read_text())
    assert acfg["fan_in_fan_out"] is True and {t.rsplit(".", 1)[-1] for t in acfg["target_modules"]} == set(CONV1D)
    sd = load_file(str(run / "adapter_model.safetensors"))
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 40)
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (120, 8)
    export_adapter(run, tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    x = ids()
    for adapter in (run, tmp_path / "exported"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            orig = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), adapter).eval()
            ours = qconvert.load_model(q, backend="reference", device="cpu", dtype=torch.float32, adapter=adapter).eval()
            lm = load_for_inference(q, backend="reference", device="cpu", dtype="float32")  # generate/eval --adapter
            attach_adapter(lm, adapter)
        assert not [w for w in seen if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in seen]
        layer = orig.base_model.model.transformer.h[1].attn.c_attn
        assert isinstance(layer, LoraLinear) and isinstance(layer.get_base_layer(), Conv1D) and layer.fan_in_fan_out
        h = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(2))
        a = sd["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
        b = sd["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
        with torch.no_grad():
            assert rel(layer(h) - layer.get_base_layer()(h), 2.0 * (h @ a.T @ b.T)) < FLOAT32_REL
            same_weights = PeftModel.from_pretrained(float32_reference(q), adapter).eval()
            assert rel(ours(x).logits, same_weights(x).logits) < FLOAT32_REL
            assert rel(lm.model(x).logits, same_weights(x).logits) < FLOAT32_REL
            # and PEFT's merge on the Conv1D model (which fan_in_fan_out=True makes transpose) changes nothing
            assert rel(same_weights.merge_and_unload()(x).logits, ours(x).logits) < FLOAT32_REL
            # the adapter moves the 16-bit original as it moves the 4-bit model (up to the quantization error)
            base_orig = AutoModelForCausalLM.from_pretrained(src).eval()(x).logits
            base_ours = qconvert.load_model(q, backend="reference", device="cpu", dtype=torch.float32)(x).logits
            d_orig, d_ours = orig(x).logits - base_orig, ours(x).logits - base_ours
            assert rel(d_ours, d_orig) < LORA_CHANGE_ACROSS_NF4_REL and d_orig.norm() > 0.1 * base_orig.norm()


@pytest.mark.slow
def test_trained_gpt2_adapter_on_transformers_bitsandbytes(gpt2, trained):
    """The same adapter on the same 4-bit checkpoint loaded by transformers + bitsandbytes (whose 4-bit
    layers replace the Conv1D too): PEFT attaches it without a notice, and the loss it gives is ours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qconvert
    from qconvert.training.data import build_examples, collate, load_records

    q, (run, data, _) = gpt2[1], trained
    tok = AutoTokenizer.from_pretrained(q)
    batch = collate(build_examples(load_records(data), tok), tok.pad_token_id)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    base = AutoModelForCausalLM.from_pretrained(q, **no_dropout)
    base.train()  # bitsandbytes' torch path (its CPU inference path computes in bf16, REFERENCE.md section 8)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        before = base(**batch).loss.item()
        peft = PeftModel.from_pretrained(base, run)
        peft.train()
        after_bnb = peft(**batch).loss.item()
    assert not [w for w in seen if "fan_in_fan_out" in str(w.message)]
    ours = qconvert.load_model(q, backend="reference", device="cpu", adapter=run)
    with torch.no_grad():
        after_ours = ours(**batch).loss.item()
    assert after_bnb < 0.5 * before
    assert abs(after_bnb - after_ours) < LOSS_ACROSS_RUNS_REL * max(1.0, after_bnb)


@pytest.mark.slow
def test_merge_of_a_trained_gpt2_adapter_loads_in_transformers(gpt2, trained, tmp_path):
    """The CLI merge of the trained adapter: plain from_pretrained loads it cleanly, and it computes what
    qconvert's 4-bit model with the adapter computes."""
    from transformers import AutoModelForCausalLM

    import qconvert

    run_cli("merge", gpt2[1], trained[0], tmp_path / "merged", "--dtype", "float32")
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = qconvert.load_model(gpt2[1], backend="reference", device="cpu", dtype=torch.float32, adapter=trained[0])
    x = ids()
    with torch.no_grad():
        assert rel(merged.eval()(x).logits, ours.eval()(x).logits) < FLOAT32_REL
