"""Routed MoE experts in 4 bits (issue 20, spec/format.md section 14).

The golden vectors (formats/golden/experts.json) pin the fused [E, out, in] layout byte for byte,
against the reference and against bitsandbytes' own quantizer on the same tensor, and show that
each expert is quantized on its own (its codes are the 2-D rule on its matrix alone). The model
tests quantize tiny qwen3_moe checkpoints in both source forms (fused 3-D parameters as transformers 5
holds them; per-expert tensors as save_pretrained writes them) and mixtral (whose w1/w3 transformers
merges into gate_up_proj), then check load_model's logits against a float32 oracle: transformers'
own model of the source in which every 4-bit tensor is replaced by its reference dequantization
(tests/test_load_arch.py), and that plain transformers refuses the folder instead of loading it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.format.constants import load_json
from qconvert.format.layout import QuantizedTensor, pack_quant_state
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref
from test_golden import from_hex, to_hex
from test_load_arch import dequantized_source_model, rel, sweep
from tolerances import FLOAT32_REL

VECTORS = load_json("golden/experts.json")["vectors"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def stored(v) -> QuantizedTensor:
    """The vector's stack rebuilt from its stored bytes alone, as a reader sees it."""
    from qconvert.format.constants import codebook, dynamic_map

    t = {"w": from_hex(v["packed"], torch.uint8, (-1, 1)),
         "w.absmax": from_hex(v["absmax"], torch.uint8 if v["double_quant"] else torch.float32, (-1,)),
         "w.quant_map": codebook(v["quant_type"]), f"w.quant_state.bitsandbytes__{v['quant_type']}": pack_quant_state(v["quant_state"])}
    if v["double_quant"]:
        t |= {"w.nested_absmax": from_hex(v["nested_absmax"], torch.float32, (-1,)), "w.nested_quant_map": dynamic_map()}
    return QuantizedTensor.from_state_dict("w", t)


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_expert_golden_bytes_reference_and_bitsandbytes(v):
    """The stack is the 2-D rule over its expert-major flattening: the reference and bitsandbytes'
    quantize_4bit give the stored bytes, and the quant-state keeps the 3-D shape."""
    x = from_hex(v["input"], DTYPES[v["dtype"]], v["shape"])
    qt = quantize_4bit_ref(x, v["quant_type"], v["blocksize"], v["double_quant"])
    assert qt.quant_state_dict() == v["quant_state"] and len(v["quant_state"]["shape"]) == 3
    assert (to_hex(qt.packed), to_hex(qt.absmax)) == (v["packed"], v["absmax"])
    F = pytest.importorskip("bitsandbytes.functional")
    packed, st = F.quantize_4bit(x, blocksize=v["blocksize"], quant_type=v["quant_type"], compress_statistics=v["double_quant"])
    assert (to_hex(packed), to_hex(st.absmax)) == (v["packed"], v["absmax"])
    if v["double_quant"]:
        assert to_hex(st.state2.absmax) == v["nested_absmax"] == to_hex(qt.nested_absmax)


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_each_expert_is_quantized_on_its_own(v):
    """Expert e's packed codes and first-level block scales are those of its own matrix quantized
    alone by the 2-D rule, at the offsets the spec gives: no block straddles two experts."""
    x = from_hex(v["input"], DTYPES[v["dtype"]], v["shape"])
    whole = quantize_4bit_ref(x, v["quant_type"], v["blocksize"], False)
    c, b = v["expert_code_bytes"], v["expert_blocks"]
    packed = from_hex(v["packed"], torch.uint8, (-1,))
    for e in range(x.shape[0]):
        alone = quantize_4bit_ref(x[e], v["quant_type"], v["blocksize"], False)
        assert torch.equal(packed[e * c:(e + 1) * c], alone.packed.reshape(-1)), e
        assert torch.equal(whole.absmax[e * b:(e + 1) * b], alone.absmax), e


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_expert_holder_dequantizes_each_expert_from_stored_bytes(v):
    """qconvert.nn's 4-bit experts give each expert's slice of the spec's dequantization, bit for
    bit, from the stored bytes (the nested scales of a later expert included)."""
    from qconvert.nn.experts4bit import Experts4bitWeight

    qt = stored(v)
    want = from_hex(v["dequantized"], DTYPES[v["dtype"]], v["shape"])
    assert torch.equal(dequantize_4bit_ref(qt), want)
    w = Experts4bitWeight.from_fused(qt, "reference", torch.float32)
    for e in range(want.shape[0]):
        got = w.expert(e, qt.dtype)
        assert got.dtype == qt.dtype and torch.equal(got, want[e]), e
        assert torch.equal(w[e], want[e].float())  # the compute dtype: the logical value widened


def fused_source(family: str, out: Path) -> Path:
    """A tiny ``family`` checkpoint whose routed experts are stored as the 3-D parameters transformers 5
    holds (experts.gate_up_proj [E, 2I, H], ...), not per expert: transformers loads it 1:1."""
    from transformers import AutoModelForCausalLM

    src = sweep.build_source(family, out)
    sd = load_file(str(src / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src)
    sd = {k: t for k, t in sd.items() if ".experts." not in k}
    sd |= {k: t.to(torch.bfloat16).contiguous() for k, t in model.state_dict().items() if ".experts." in k and t.dim() == 3}
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def check_against_oracle(src: Path, q: Path, work: Path) -> None:
    """load_model's float32 logits equal transformers' on the dequantized source (FLOAT32_REL)."""
    import qconvert
    from qconvert.nn.experts4bit import Experts4bitWeight

    ours = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    assert any(isinstance(m, Experts4bitWeight) for m in ours.modules())
    ref = dequantized_source_model(src, q, work / "ref")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits
    assert rel(got, want) < FLOAT32_REL, rel(got, want)


def plain_transformers_refuses(q: Path) -> None:
    """transformers (with bitsandbytes installed, without qconvert) never loads the folder: the quant
    method it does not know, then a size mismatch on every 4-bit tensor."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(q)


def lose_one_expert_then_verify(src: Path, q: Path, victim: str) -> None:
    """verify --against accepts the output, then names a 4-bit expert that is missing (every entry)."""
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.errors import FormatError

    assert verify_checkpoint(q, against=str(src))["error"]["unquantized_identical"] is True
    f = q / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: t for k, t in sd.items() if not k.startswith(victim)}, str(f), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=f"source tensor '{victim}' of .* is missing from the output|needs, e.g. '{victim}'"):
        verify_checkpoint(q, against=str(src))
    save_file(sd, str(f), metadata={"format": "pt"})


def refuses_an_unknown_extension(q: Path) -> None:
    """A later layout extension in config.json is refused by load_model and verify, never guessed."""
    import qconvert
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.errors import FormatError

    cfg = json.loads((q / "config.json").read_text())
    cfg["qconvert"]["layout_extensions"] = ["experts-1", "experts-2"]
    (q / "config.json").write_text(json.dumps(cfg))
    for load in (lambda: qconvert.load_model(q, device="cpu", backend="reference"), lambda: verify_checkpoint(q)):
        with pytest.raises(FormatError, match=r"layout extension\(s\) \['experts-2'\]; this reader implements experts-1"):
            load()


@pytest.mark.slow
def test_fused_3d_experts_quantize_load_and_refuse(tmp_path):
    """qwen3_moe with fused 3-D expert tensors: each is written as one 4-bit [E, out, in] weight,
    load_model matches the float32 oracle, verify --against accepts it, plain transformers refuses."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint

    src = fused_source("qwen3_moe", tmp_path / "src")
    s = quantize_checkpoint(str(src), tmp_path / "q")
    out = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    qs = json.loads(bytes(out[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))
    assert qs["shape"] == [4, 128, 64] and out[name].shape == (4 * 128 * 64 // 2, 1)
    assert s["experts"]["kept_16bit_params"] == 0 and s["experts"]["share"] > 0.6
    check_against_oracle(src, tmp_path / "q", tmp_path)
    r = verify_checkpoint(tmp_path / "q", against=str(src))
    assert name in {t["name"] for t in r["error"]["tensors"]} and r["error"]["unquantized_identical"]
    plain_transformers_refuses(tmp_path / "q")
    # a quant-state whose shape holds the same elements in another arrangement is refused, never misread
    import qconvert
    from qconvert.errors import FormatError

    out[f"{name}.quant_state.bitsandbytes__nf4"] = pack_quant_state({**qs, "shape": [4, 64, 128]})
    save_file(out, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"4-bit expert weight '{name}' has quant-state shape \[4, 64, 128\], the Qwen3MoeForCausalLM needs \[4, 128, 64\]"):
        qconvert.load_model(tmp_path / "q", device="cpu", backend="reference")


@pytest.mark.slow
def test_per_expert_sources_figures_and_refusal(tmp_path):
    """mixtral's per-expert w1/w2/w3: each one expert's 2-D 4-bit weight under its own name; the
    summary, the card and inspect give the honest figures; config.json is refused by plain
    transformers; --experts 16bit writes bitsandbytes' bytes and says the experts' share."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.inspect import inspect_checkpoint

    src = sweep.build_source("mixtral", tmp_path / "src")
    source = load_file(str(src / "model.safetensors"))
    plan = quantize_checkpoint(str(src), tmp_path / "q", dry_run=True)  # what --dry-run --json prints
    s = quantize_checkpoint(str(src), tmp_path / "q")
    assert plan["quantized"] == s["quantized"] and plan["experts"] == s["experts"] and plan["experts"]["mode"] == "4bit"
    out = load_file(str(tmp_path / "q" / "model.safetensors"))
    experts = [k for k in source if ".experts." in k]
    assert experts and all(f"{k}.absmax" in out for k in experts)
    params = sum(t.numel() for t in source.values())
    share = sum(source[k].numel() for k in experts) / params
    assert s["params"] == params and math.isclose(s["experts"]["share"], share)
    assert math.isclose(s["bits_per_param_model"], 8 * s["output_bytes"] / params)
    assert math.isclose(s["size_ratio"], s["output_bytes"] / s["source_bytes"]) and s["source_bytes"] == sum(
        t.numel() * t.element_size() for t in source.values())
    assert 4.1 < s["bits_per_param"] < 4.2
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qconvert" and qc["experts_4bit"] is True and "load_in_4bit" not in qc
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(qc, load_json("quantization_config.schema.json"))  # formats/ describes it
    with pytest.raises(jsonschema.ValidationError):  # and refuses it with a bitsandbytes flag
        jsonschema.validate({**qc, "load_in_4bit": True}, load_json("quantization_config.schema.json"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["qconvert"]["layout_extensions"] == ["experts-1"]
    jsonschema.validate(cfg["qconvert"], {**load_json("quantization_config.schema.json")["$defs"]["provenance"]})
    card = (tmp_path / "q" / "README.md").read_text()
    assert f"| bits per parameter (whole model) | {s['bits_per_param_model']:.3f} |" in card and "plain transformers refuses" in card
    assert "\nlibrary_name: \"qconvert\"\n" in card  # not "transformers", which cannot load it
    r = inspect_checkpoint(tmp_path / "q")
    assert r["experts_4bit"] and r["experts_4bit_tensors"] == len(experts) and r["total_params"] == params
    assert math.isclose(r["size_ratio"], s["size_ratio"]) and math.isclose(r["bits_per_param"], s["bits_per_param"])
    plain_transformers_refuses(tmp_path / "q")
    lose_one_expert_then_verify(src, tmp_path / "q", "model.layers.1.block_sparse_moe.experts.3.w2.weight")
    refuses_an_unknown_extension(tmp_path / "q")
    s16 = quantize_checkpoint(str(src), tmp_path / "q16", experts="16bit")
    out16 = load_file(str(tmp_path / "q16" / "model.safetensors"))
    assert all(torch.equal(out16[k], source[k]) for k in experts)
    assert json.loads((tmp_path / "q16" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert math.isclose(s16["experts"]["kept_16bit_share"], share) and s16["output_bytes"] > 1.5 * s["output_bytes"]


@pytest.mark.slow
def test_only_the_routed_experts_are_dequantized(tmp_path, monkeypatch):
    """A forward dequantizes only the experts the router picked (one token, top-2 of 4: at most two
    experts per stack), never the whole stack; generate and eval run on the model."""
    import qconvert
    from qconvert.run.evaluate import evaluate, load_examples, score
    from qconvert.run.generate import encode_prompt, generate_text
    from qconvert.nn.experts4bit import Experts4bitWeight
    from qconvert.run.inference import load_for_inference
    from test_train import make_tokenizer, memorize_set

    src = sweep.build_source("qwen3_moe", tmp_path / "src")
    make_tokenizer(src)
    from qconvert.convert.quantize import quantize_checkpoint

    quantize_checkpoint(str(src), tmp_path / "q")
    model = qconvert.load_model(tmp_path / "q", device="cpu", backend="reference", dtype=torch.float32)
    seen: dict[int, list[int]] = {}
    real = Experts4bitWeight.expert

    def spy(self, e, dtype=None, delta=None):
        seen.setdefault(id(self), []).append(e)
        return real(self, e, dtype, delta)

    monkeypatch.setattr(Experts4bitWeight, "expert", spy)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), use_cache=False)
    stacks = [m for m in model.modules() if isinstance(m, Experts4bitWeight)]
    assert len(seen) == len(stacks) == 4 and all(1 <= len(set(v)) == len(v) <= 2 for v in seen.values())
    monkeypatch.undo()
    lm = load_for_inference(tmp_path / "q", backend="reference", dtype="float32", device="cpu")
    ref = dequantized_source_model(src, tmp_path / "q", tmp_path / "ref")
    got = generate_text(lm.model, lm.tokenizer, "user : hello", max_new_tokens=5)
    ids = encode_prompt(lm.tokenizer, "user : hello")["input_ids"]
    want = ref.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert got["completion_ids"] and got["completion_ids"] == want[:len(got["completion_ids"])]  # greedy: the oracle's tokens
    data = memorize_set(tmp_path)
    rows = evaluate(tmp_path / "q", data, backend="reference", dtype="float32", device="cpu")
    oracle = score(ref, load_examples(data, lm.tokenizer), lm.tokenizer.pad_token_id)
    assert rows[0]["kind"] == "4-bit" and math.isclose(rows[0]["loss"], oracle["loss"], rel_tol=FLOAT32_REL)


@pytest.mark.slow
def test_experts_stored_unalike_are_refused(tmp_path):
    """One expert's 4-bit tensor re-quantized with another block size (each file entry valid on its
    own): load_model refuses the stack instead of reading it with the other experts' block size."""
    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import FormatError

    src = sweep.build_source("mixtral", tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(str(f))
    victim = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    other = quantize_4bit_ref(load_file(str(src / "model.safetensors"))[victim], "nf4", 32, True)
    sd = {k: t for k, t in sd.items() if not k.startswith(victim)} | other.state_dict(victim)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="differ in quant type, block size"):
        qconvert.load_model(tmp_path / "q", device="cpu", backend="reference")


@pytest.mark.slow
def test_backward_through_4bit_experts_recomputes_them(tmp_path, monkeypatch):
    """Training through 4-bit experts (LoRA below them needs the input gradient): the gradient equals
    the float32 oracle's, and backward dequantizes the experts again instead of autograd keeping every
    dequantized expert of every layer alive between forward and backward."""
    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.nn.experts4bit import Experts4bitWeight

    src = sweep.build_source("mixtral", tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    ours = qconvert.load_model(tmp_path / "q", device="cpu", backend="reference", dtype=torch.float32)
    ref = dequantized_source_model(src, tmp_path / "q", tmp_path / "ref")
    calls = []
    real = Experts4bitWeight.expert
    monkeypatch.setattr(Experts4bitWeight, "expert", lambda self, e, dtype=None, delta=None: calls.append(e) or real(self, e, dtype, delta))
    embeds = ref.get_input_embeddings()(torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))).detach()
    grads, forward_calls = [], 0
    for model in (ours, ref):
        x = embeds.clone().requires_grad_(True)
        loss = model(inputs_embeds=x, use_cache=False).logits.square().mean()
        forward_calls = len(calls) if model is ours else forward_calls
        loss.backward()
        grads.append(x.grad)
    assert 0 < forward_calls < len(calls)  # backward dequantized the experts it needed again
    assert rel(grads[0], grads[1]) < FLOAT32_REL, rel(grads[0], grads[1])


def test_a_fused_stack_that_straddles_blocks_stays_16bit_with_the_reason():
    """A fused expert stack whose experts are not whole blocks is kept 16-bit (never a block across
    two experts), and the plan says why; 16-bit sources of other dtypes are refused by name."""
    from qconvert.convert.plan import expert_unquantizable

    assert expert_unquantizable((4, 128, 64), torch.bfloat16, 64) is None
    assert expert_unquantizable((8, 48, 20), torch.bfloat16, 128) == \
        "an expert's 48 x 20 elements are not a multiple of the block size 128"
    assert expert_unquantizable((4, 64), torch.bfloat16, 64) is None  # one expert's 2-D matrix: the 2-D rule
    assert expert_unquantizable((4, 64), torch.int8, 64) == "dtype torch.int8 cannot be quantized"


def test_cli_experts_option_and_dry_run(tmp_path):
    """`quantize --dry-run` (text and --json) states the experts' share; `--experts 16bit` says they
    stay 16-bit; an unknown value is refused before anything is read."""
    from helpers import run_cli_here as run_cli

    src = sweep.build_source("qwen3_moe", tmp_path / "src")
    r = run_cli("quantize", src, tmp_path / "out", "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert plan["experts"]["mode"] == "4bit" and plan["quantized"] == 32 and not (tmp_path / "out").exists()
    r = run_cli("quantize", src, tmp_path / "out", "--dry-run")
    assert f"routed experts in 4 bits ({plan['experts']['share']:.1%} of the parameters)" in r.stdout
    r = run_cli("quantize", src, tmp_path / "out", "--dry-run", "--experts", "16bit")
    assert "routed experts stay 16-bit (--experts 16bit" in r.stdout
    r = run_cli("quantize", src, tmp_path / "out", "--experts", "8bit", ok=False)
    assert r.returncode != 0 and "8bit" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_experts_dequantize_into_reused_buffers_on_cpu(tmp_path, monkeypatch):
    """Memory of 4-bit experts. On the CPU kernels a training step's routed experts are dequantized into one reused buffer per
    experts parameter, not a fresh tensor per expert: those multi-megabyte temporaries, freed among the
    small activations autograd keeps, fragmented the heap (a Qwen3-30B-A3B-shaped layer's step held
    ~0.6 GB more). Each expert's value is still its own: the gradient equals the reference kernels'.
    And the loaded stacks hold no tensor of the shard's memory map (_no_buffer_in_the_shard_map)."""
    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.nn.experts4bit import Experts4bitWeight

    src = sweep.build_source("qwen3_moe", tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    kept: list[torch.Tensor] = []
    real = Experts4bitWeight.expert

    def spy(self, e, dtype=None, delta=None):
        value = real(self, e, dtype, delta)
        kept.append(value)  # kept alive: a fresh tensor per expert cannot share another's memory
        return value

    hidden = json.loads((tmp_path / "q" / "config.json").read_text())["hidden_size"]
    # 18 rows of input: more than the CPU kernels fuse (GEMV_ROWS_BY32, within GEMV_REL of the
    # reference), so every 4-bit linear layer here takes their bit-exact dequantize-then-multiply path
    embeds = torch.randn(2, 9, hidden, generator=torch.Generator().manual_seed(3))
    from qconvert.ops.cpu.kernels import GEMV_ROWS_BY32

    assert embeds.shape[0] * embeds.shape[1] > GEMV_ROWS_BY32
    grads = []
    for backend in ("auto", "reference"):
        model = qconvert.load_model(tmp_path / "q", device="cpu", backend=backend, dtype=torch.float32)
        x = embeds.clone().requires_grad_(True)
        kept.clear()
        with monkeypatch.context() as m:
            m.setattr(Experts4bitWeight, "expert", spy)
            loss = model(inputs_embeds=x, use_cache=False).logits.square().mean()
            if backend == "auto":
                storages = {v.untyped_storage().data_ptr() for v in kept}
                assert len(kept) > 4 and len(storages) <= 2, (len(kept), len(storages))  # gate_up_proj's and down_proj's
            loss.backward()
        grads.append(x.grad)
        if backend == "auto":
            _no_buffer_in_the_shard_map(model, tmp_path / "q" / "model.safetensors")
    assert torch.equal(grads[0], grads[1])


def _no_buffer_in_the_shard_map(model, shard: Path) -> None:
    """Per-expert 4-bit tensors are copied into one stack per parameter; nothing of the stack may be
    a tensor read from the shard (its 16-entry code tables were): safetensors' tensors keep their
    shard's whole memory map alive, and with it every page the stacking read, so each layer's expert
    codes sat in RSS twice (~300 MB more per Qwen3-30B-A3B-shaped layer after loading, measured)."""
    from qconvert.nn.experts4bit import Experts4bitWeight

    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if m[-1] == str(shard.resolve())]
    stacks = [m for m in model.modules() if isinstance(m, Experts4bitWeight)]
    assert spans and stacks  # the shard is mapped (the attention weights read from it), the experts stacked
    inside = [n for s in stacks for n, b in s.named_buffers() if any(a <= b.data_ptr() < z for a, z in spans)]
    assert not inside, inside

