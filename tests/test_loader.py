"""qconvert.load_model against transformers + bitsandbytes and against a float32 reference; PEFT,
generate, gradient checkpointing, and backward without a stored dequantized weight."""

from __future__ import annotations

import pytest
import torch

import qconvert
from helpers import bnb_float32_oracle, bnb_quantize_save, float32_reference, make_tiny_llama, minilm_dir, save_as_bf16
from qconvert.errors import BackendError, FormatError, OptionError
from qconvert.nn.linear4bit import Linear4bit
from tolerances import BF16_REL, FLOAT32_REL, GRAD_REL

#: the triton backend runs on CUDA when there is one, else in Triton's interpreter on CPU (conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64], [3, 3, 8, 120, 4, 0, 11, 90]])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """in_features multiples of 64 (bitsandbytes' CPU dequant is only right there, spec section 11)."""
    d = tmp_path_factory.mktemp("aligned")
    out = {}
    for cd in ("float32", "bfloat16"):  # a float32 model computing in float32; a bf16 model in bf16
        src = make_tiny_llama(d / f"src-{cd}", hidden=64, intermediate=128, dtype=getattr(torch, cd))
        out[cd] = bnb_quantize_save(src, d / f"bnb-{cd}", compute_dtype=getattr(torch, cd))
    return out


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """hidden 100 (k_proj/v_proj of 100 rows, head_dim 20), intermediate 70: ragged blocks everywhere."""
    d = tmp_path_factory.mktemp("ragged")
    src = make_tiny_llama(d / "src", hidden=100, intermediate=70, heads=5, kv_heads=5, dtype=torch.float32)
    from qconvert.convert.quantize import quantize_checkpoint

    quantize_checkpoint(str(src), d / "q")
    return d / "q"


@pytest.fixture(scope="module")
def ragged_bf16(tmp_path_factory):
    """The ragged model of ``ragged``, stored in bfloat16: its 4-bit weights have logical dtype bfloat16."""
    d = tmp_path_factory.mktemp("ragged_bf16")
    src = make_tiny_llama(d / "src", hidden=100, intermediate=70, heads=5, kv_heads=5, dtype=torch.bfloat16)
    from qconvert.convert.quantize import quantize_checkpoint

    quantize_checkpoint(str(src), d / "q")
    return d / "q"


def all_float32(model) -> bool:
    return all(t.dtype == torch.float32 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton", "bitsandbytes"])
def test_float32_model_equals_bitsandbytes_dequantized_oracle(ragged_bf16, backend, monkeypatch):
    """Spec 1.1 section 8: load_model(..., dtype=float32) of a bf16 checkpoint is an all-float32 model
    whose 4-bit weights are their bfloat16 values widened: it equals a float32 model built on
    bitsandbytes' own dequantize_4bit output, to float32 rounding."""
    oracle = bnb_float32_oracle(ragged_bf16)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    m = qconvert.load_model(ragged_bf16, backend=backend, device=dev, dtype=torch.float32)
    assert all_float32(m) and m.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32
    assert m.model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16
    with torch.no_grad():
        a, b = m(IDS.to(dev)).logits.cpu(), oracle(IDS).logits
    assert a.dtype == torch.float32 and rel(a, b) < FLOAT32_REL, rel(a, b)
    if backend == "reference":
        # control: the float32 product, not rounded to bfloat16 (the pre-1.1 reading), is far off
        from qconvert.ops import reference as reference_kernels

        monkeypatch.setitem(reference_kernels.KERNELS, "matmul_4bit", _float32_product_matmul)
        with torch.no_grad():
            c = m(IDS).logits
        assert rel(c, b) > 1e-4, rel(c, b)


def _float32_product_matmul(x, *weight_and_bias):
    """A matmul kernel over the unrounded float32 product: the reading spec 1.1 rules out."""
    from qconvert.ops.args import as_quantized
    from qconvert.quant.reference import float32_product_ref

    *weight, bias = weight_and_bias
    return torch.nn.functional.linear(x, float32_product_ref(as_quantized(*weight)).to(x.dtype), bias)


@pytest.mark.parametrize("backend", ["reference", "triton", "bitsandbytes"])
def test_every_compute_dtype_uses_the_logical_value(ragged_bf16, backend):
    """At every compute dtype a 4-bit layer computes with bitsandbytes' dequantize_4bit value (the
    bf16 value) converted to that dtype: bit-identical to F.linear on it (20 rows, so the triton
    backend takes its dequantize-then-matmul path; its fused small-batch kernel is tested in test_kernels)."""
    from helpers import bnb_dequantized

    weights = bnb_dequantized(ragged_bf16)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(20, 100, generator=torch.Generator().manual_seed(4))
    for cd in (torch.float32, torch.float16, torch.bfloat16):
        m = qconvert.load_model(ragged_bf16, backend=backend, device=dev, compute_dtype=cd)
        for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
            layer = m.get_submodule(name)
            with torch.no_grad():
                got = layer(x.to(cd).to(dev)).cpu()
            want = torch.nn.functional.linear(x.to(cd), weights[name + ".weight"].to(cd))
            assert got.dtype == cd and torch.equal(got, want), (cd, name)


def test_dtype_argument(ragged_bf16):
    """dtype=None keeps the stored dtypes (compute_dtype alone does not make a float32 model);
    dtype casts every unquantized tensor, and compute_dtype follows it unless given."""
    m = qconvert.load_model(ragged_bf16, backend="reference", device="cpu", compute_dtype="float32")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16 and not all_float32(m) and m.config.dtype == torch.bfloat16
    m = qconvert.load_model(ragged_bf16, backend="reference", device="cpu", dtype="float32", compute_dtype=torch.bfloat16)
    assert all_float32(m) and m.model.layers[1].mlp.down_proj.compute_dtype == torch.bfloat16
    assert m.config.dtype == torch.float32  # the config says what the tensors are, as transformers' from_pretrained(dtype=) sets it
    m = qconvert.load_model(ragged_bf16, backend="reference", device="cpu", dtype="auto")
    assert m.model.norm.weight.dtype == torch.bfloat16 and m.config.dtype == torch.bfloat16
    with pytest.raises(OptionError, match="unknown dtype 'float64'"):
        qconvert.load_model(ragged_bf16, backend="reference", device="cpu", dtype="float64")


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_minilm_float32_model_equals_bitsandbytes_dequantized_oracle(tmp_path, stored):
    """The real all-MiniLM-L6-v2 (float32 as published, and a bfloat16 copy of it), quantized, loaded
    as an all-float32 model: equal to the float32 model on bitsandbytes' dequantized weights."""
    from qconvert.convert.quantize import quantize_checkpoint

    src = minilm_dir() if stored == "float32" else save_as_bf16(minilm_dir(), tmp_path / "bf16")
    quantize_checkpoint(str(src), tmp_path / "q")
    oracle = bnb_float32_oracle(tmp_path / "q", auto_class="AutoModel")
    m = qconvert.load_model(tmp_path / "q", backend="reference", device="cpu", dtype=torch.float32)
    assert all_float32(m) and m.encoder.layer[0].attention.self.query.weight_dtype == getattr(torch, stored)
    ids = torch.tensor([[101, 1037, 3231, 6251, 2005, 1996, 4118, 1012, 102], [101, 7592, 2088, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a, b = m(input_ids=ids, attention_mask=mask), oracle(input_ids=ids, attention_mask=mask)
    for x, y in ((a.last_hidden_state, b.last_hidden_state), (a.pooler_output, b.pooler_output)):
        assert x.dtype == torch.float32 and rel(x, y) < FLOAT32_REL, rel(x, y)


def test_logits_match_transformers_bitsandbytes(aligned):
    """bitsandbytes has two CPU paths: in training mode it dequantizes and calls torch (compared at
    float32 rounding); in eval/no-grad on CPUs with AVX-512-BF16 it repacks the weight and computes
    in bf16 whatever the compute dtype (compared at bf16 rounding)."""
    from transformers import AutoModelForCausalLM

    for cd in ("float32", "bfloat16"):
        ours = qconvert.load_model(aligned[cd], backend="reference", device="cpu")
        theirs = AutoModelForCausalLM.from_pretrained(aligned[cd])
        assert isinstance(ours.model.layers[0].self_attn.q_proj, Linear4bit)
        with torch.no_grad():
            a = ours(IDS).logits
        theirs.train()  # dropout is 0 in this config: train mode only selects bitsandbytes' torch path
        b = theirs(IDS).logits.detach()
        assert a.dtype == b.dtype == getattr(torch, cd)
        assert rel(a, b) < (FLOAT32_REL if cd == "float32" else BF16_REL), (cd, rel(a, b))
        theirs.eval()
        with torch.no_grad():
            c = theirs(IDS).logits
        assert rel(a, c) < BF16_REL, (cd, rel(a, c))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton", "bitsandbytes"])
def test_ragged_model_matches_float32_reference_on_every_backend(ragged, backend):
    ref = float32_reference(ragged)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    m = qconvert.load_model(ragged, backend=backend, device=dev, compute_dtype="float32")
    assert m.model.layers[0].self_attn.k_proj.out_features == 100
    with torch.no_grad():  # bitsandbytes' own CPU matmul refuses 100 output rows under no_grad; ours does not
        a, b = m(IDS[:, :5].to(dev)).logits.cpu(), ref(IDS[:, :5]).logits
    assert rel(a.float(), b) < FLOAT32_REL, rel(a.float(), b)


@pytest.mark.slow
def test_lora_backward_triton_equals_reference(ragged):
    """The GPU training path (fused kernel forward at <= 16 rows, Triton dequant in the input
    gradient), run in the interpreter on the ragged model: same loss and LoRA gradients as reference."""
    pytest.importorskip("triton")
    from peft import LoraConfig, get_peft_model

    out = []
    for backend in ("reference", "triton"):
        m = get_peft_model(qconvert.load_model(ragged, backend=backend, device=TRITON_DEVICE, compute_dtype="float32"),
                           LoraConfig(r=2, lora_dropout=0.0, target_modules=["k_proj", "down_proj"]))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        m.train()
        ids = IDS[:1, :6].to(TRITON_DEVICE)
        loss = m(ids, labels=ids).loss
        loss.backward()
        out.append((loss.item(), {k: p.grad.cpu() for k, p in m.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) < FLOAT32_REL * abs(l0) and set(g0) == set(g1) and len(g0) == 8
    for k in g0:
        assert g0[k].abs().sum() > 0 and rel(g1[k], g0[k]) < GRAD_REL, k


def test_peft_lora_gradients_match_peft_on_bitsandbytes(aligned):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    ours = get_peft_model(qconvert.load_model(aligned["float32"], backend="reference", device="cpu"), cfg)
    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(aligned["float32"]), cfg)
    ours_params = dict(ours.named_parameters())
    theirs_params = dict(theirs.named_parameters())
    lora = [k for k, p in ours_params.items() if p.requires_grad]
    assert lora and set(lora) == {k for k, p in theirs_params.items() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in lora:  # same nonzero adapter on both sides
            v = torch.randn(ours_params[k].shape, generator=g) * 0.05
            ours_params[k].copy_(v)
            theirs_params[k].copy_(v)
    for model in (ours, theirs):
        model.train()
        model(IDS, labels=IDS).loss.backward()
    for k in lora:
        assert rel(ours_params[k].grad, theirs_params[k].grad) < GRAD_REL, k


def test_backward_keeps_no_dequantized_weight(aligned):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(qconvert.load_model(aligned["float32"], backend="reference", device="cpu"),
                       LoraConfig(r=2, target_modules=["q_proj", "up_proj"], lora_dropout=0.0))
    own = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    weight_shapes = {(64, 64), (32, 64), (128, 64), (64, 128)}
    copies = []

    def pack(t):
        # a saved weight-shaped float tensor that is not a model parameter would be a dequantized copy
        if t.dtype.is_floating_point and {tuple(t.shape), tuple(t.shape[::-1])} & weight_shapes:
            if t.untyped_storage().data_ptr() not in own:
                copies.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(IDS, labels=IDS).loss
    loss.backward()
    assert copies == []
    # control: the naive route (dequantize, then an autograd matmul) is caught by the same hook
    q = m.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.linear(x, q.dequantized(torch.float32)).sum().backward()
    assert copies == [(64, 64)]
    assert m.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad is not None


def test_gradient_checkpointing_same_gradients(aligned):
    from peft import LoraConfig, get_peft_model

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = get_peft_model(qconvert.load_model(aligned["float32"], backend="reference", device="cpu"),
                           LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # nonzero B, so every LoRA tensor gets a gradient
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        m.train()
        m(IDS, labels=IDS).loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
    for k in grads[0]:
        assert rel(grads[1][k], grads[0][k]) < FLOAT32_REL, k


def test_generate_matches_transformers(aligned):
    from transformers import AutoModelForCausalLM

    ours = qconvert.load_model(aligned["float32"], backend="reference", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(aligned["float32"])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(IDS[:1], **kw), theirs.generate(IDS[:1], **kw))


def test_head_runs_one_product_for_a_sliced_input(aligned):
    """transformers hands the output head the prompt's last position as a slice (the leading stride
    of the whole prompt). On a frozen weight torch.matmul runs that as bmm against the weight
    broadcast to 3-D, which torch's CPU bmm copied in whole (108 ms for a 32000x1024 bf16 head,
    each generate call's first token); the head's pre-hook makes it one mm. The ops under the call:
    an mm, no bmm, in both dtypes; the logits the bits of the product on a contiguous input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    for cd in ("float32", "bfloat16"):
        head = qconvert.load_model(aligned[cd]).get_output_embeddings()
        assert not head.weight.requires_grad  # the case torch broadcasts in
        last = torch.randn(1, 16, head.in_features, dtype=head.weight.dtype)[:, -1:, :]  # one sequence, as generate passes it
        with torch.no_grad(), Ops() as seen:
            got = head(last)
        assert "mm.default" in seen.names and "bmm.default" not in seen.names, (cd, seen.names)
        assert torch.equal(got, torch.nn.functional.linear(last.clone(), head.weight))
        with torch.no_grad(), Ops() as bare:  # the same call without the hook: the broadcast it avoids
            torch.nn.functional.linear(last, head.weight)
        assert "bmm.default" in bare.names


def test_backend_selection_errors(aligned, monkeypatch):
    with pytest.raises(OptionError, match="unknown backend 'cuda-magic'"):
        qconvert.load_model(aligned["float32"], backend="cuda-magic", device="cpu")
    monkeypatch.setenv("QCONVERT_BACKEND", "nope")
    with pytest.raises(OptionError, match="unknown backend 'nope'"):
        qconvert.load_model(aligned["float32"], device="cpu")
    monkeypatch.setenv("QCONVERT_BACKEND", "bitsandbytes")
    m = qconvert.load_model(aligned["float32"], device="cpu")
    assert m.qconvert_backend == "bitsandbytes"
    monkeypatch.delenv("QCONVERT_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs a CUDA device"):
        qconvert.load_model(aligned["float32"], backend="triton", device="cpu")


def test_not_a_4bit_checkpoint(tmp_path):
    src = make_tiny_llama(tmp_path / "plain")
    with pytest.raises(FormatError, match="not a 4-bit checkpoint") as e:
        qconvert.load_model(src, device="cpu")
    assert "qconvert quantize" in e.value.hint


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.mark.slow
def test_generate_and_eval_cli(aligned, tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    model = tmp_path / "m"
    shutil.copytree(aligned["float32"], model)
    _tokenizer(model)
    env = dict(os.environ, QCONVERT_BACKEND="reference")
    r = subprocess.run([sys.executable, "-m", "qconvert", "generate", str(model), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--echo"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[:3] == ["w1", "w2", "w3"] and len(words) == 7
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * j) % 100}" for j in range(12))}) for i in range(3)))
    r = subprocess.run([sys.executable, "-m", "qconvert", "eval", str(model), "--data", str(data), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # the same number computed here, in-process, through the library (text records are scored as train scores them: EOS appended)
    from transformers import AutoTokenizer

    from qconvert.run.evaluate import load_examples, score

    tok = AutoTokenizer.from_pretrained(model)
    want = score(qconvert.load_model(model, backend="reference", device="cpu"), load_examples(data, tok), tok.eos_token_id)
    assert got["tokens"] == want["tokens"] == 36 and abs(got["loss"] - want["loss"]) < 1e-5
    assert 1.0 < got["perplexity"] < 1000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n{oops\n')
    r = subprocess.run([sys.executable, "-m", "qconvert", "eval", str(model), "--data", str(bad)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "bad.jsonl:2: not valid JSON" in r.stderr


def test_weight_split_across_files_refused(aligned, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "split"
    shutil.copytree(aligned["float32"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    moved = "model.layers.0.mlp.up_proj.weight.absmax"
    save_file({k: v for k, v in sd.items() if k != moved}, str(bad / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({moved: sd[moved]}, str(bad / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in sd if k != moved} | {moved: "model-00002-of-00002.safetensors"}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    with pytest.raises(FormatError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' are split across"):
        qconvert.load_model(bad, backend="reference", device="cpu")
