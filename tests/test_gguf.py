"""`qconvert export-gguf`: llama.cpp itself (through llama-cpp-python) loads the GGUF files qconvert
writes and computes what transformers computes on the same model.

The model is a tiny Llama (hidden 256 so that llama.cpp's K-quants, which need rows of 256, apply to
every matrix) with a byte-level BPE tokenizer, quantized to 4 bits by qconvert; the reference is a
float32 transformers model holding the 4-bit weights' dequantized values (helpers.float32_reference).
Without llama_cpp these tests skip, unless QCONVERT_REQUIRE_GGUF is set (tools/test.sh sets it) and
they fail instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import float32_reference, make_bpe_tokenizer, make_tiny_bert, make_tiny_llama, run_cli_here as run_cli
from tolerances import GGUF_F16_LOGIT_REL, GGUF_KL_MAX

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the environment
    llama_cpp = None

if llama_cpp is None:
    if os.environ.get("QCONVERT_REQUIRE_GGUF"):
        pytest.fail("llama-cpp-python and gguf are required (QCONVERT_REQUIRE_GGUF=1): run tools/setup.sh", pytrace=False)
    pytest.skip("llama_cpp is not installed", allow_module_level=True)

VOCAB = 320
#: fixed prompt token ids (not text: the comparison is of the models, not of two tokenizers)
PROMPT = [1, 5, 17, 99, 200, 3, 42, 250, 7, 311, 64, 128]
GREEDY = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """src: the float32 model; q: its qconvert 4-bit checkpoint; adapter: a PEFT LoRA with a non-zero update."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("gguf")
    src = make_tiny_llama(d / "src", dtype=torch.float32, hidden=256, intermediate=512, vocab=VOCAB, heads=4, kv_heads=2)
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 25  # logits of a trained model's size: greedy is not decided by noise
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    make_bpe_tokenizer(src)
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(d / "adapter")
    return {"src": src, "q": d / "q", "adapter": d / "adapter", "dir": d}


def _llama(path: Path, lora: Path | None = None):
    kw = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False, **kw)


def _gguf_logits(path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    ll = _llama(path, lora)
    try:
        ll.eval(ids)
        return np.array(ll.scores[: len(ids)], dtype=np.float64)
    finally:
        ll.close()


def _gguf_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    ll = _llama(path)
    try:
        ll.eval(ids)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(ll.scores[ll.n_tokens - 1]))
            out.append(nxt)
            ll.eval([nxt])
        return out
    finally:
        ll.close()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(P || Q), P the reference."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _export(model, out, *extra, check: bool = False):
    r = run_cli("export-gguf", model, out, "--json", *extra, *(() if check else ("--no-check",)))
    return json.loads(r.stdout)


@pytest.mark.slow
def test_f16_of_a_4bit_model_matches_transformers_and_greedy_is_identical(models):
    out = models["dir"] / "q-f16.gguf"
    s = _export(models["q"], out, "--type", "f16")
    assert s["type"] == "f16" and s["architecture"] == "llama" and Path(s["output"]).stat().st_size == s["bytes"]
    ref = float32_reference(models["q"])
    got, want = _gguf_logits(out, PROMPT), _hf_logits(ref, PROMPT)
    assert _rel(got, want) < GGUF_F16_LOGIT_REL["f16"], _rel(got, want)
    assert _gguf_greedy(out, PROMPT, GREEDY) == _hf_greedy(ref, PROMPT, GREEDY)


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["bf16", "q8_0", "q4_0", "q4_k_m"])
def test_other_types_within_their_kl_bound(models, out_type):
    out = models["dir"] / f"q-{out_type}.gguf"
    s = _export(models["q"], out, "--type", out_type)
    assert s["type"] == out_type
    ref = float32_reference(models["q"])
    kl = _kl(_hf_logits(ref, PROMPT), _gguf_logits(out, PROMPT))
    assert kl < GGUF_KL_MAX[out_type], kl


@pytest.mark.slow
def test_adapter_merged_on_the_fly_equals_qconvert_merge(models):
    """export-gguf --adapter computes what `qconvert merge` writes (float32), and not the base model."""
    from transformers import AutoModelForCausalLM

    merged = models["dir"] / "merged-hf"
    if not merged.exists():
        run_cli("merge", models["q"], models["adapter"], merged, "--dtype", "float32")
    out = models["dir"] / "merged.gguf"
    s = _export(models["q"], out, "--adapter", models["adapter"])
    assert s["merged_modules"] == 14  # 7 linears x 2 layers
    want = _hf_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), PROMPT)
    got = _gguf_logits(out, PROMPT)
    assert _rel(got, want) < GGUF_F16_LOGIT_REL["f16"], _rel(got, want)
    base = _hf_logits(float32_reference(models["q"]), PROMPT)
    assert _rel(base, want) > 20 * GGUF_F16_LOGIT_REL["f16"]  # the adapter's change is far above the tolerance


@pytest.mark.slow
def test_lora_only_adapter_applied_by_llama_cpp_equals_the_merged_export(models):
    """llama.cpp applying the GGUF LoRA adapter to the base's GGUF computes the merged model; the
    adapter file has llama.cpp's keys and tensor names."""
    import gguf
    from transformers import AutoModelForCausalLM

    d = models["dir"]
    base, lora, merged = d / "base-f16.gguf", d / "lora.gguf", d / "merged-f16.gguf"
    _export(models["q"], base)
    _export(models["q"], merged, "--adapter", models["adapter"])
    s = _export(models["q"], lora, "--adapter", models["adapter"], "--lora-only")
    assert s["type"] == "lora" and s["tensors"] == 28 and s["lora_alpha"] == 16.0
    r = gguf.GGUFReader(lora)
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 16.0
    assert "blk.1.attn_q.weight.lora_b" in {t.name for t in r.tensors}
    applied = _gguf_logits(base, PROMPT, lora=lora)
    assert _rel(applied, _gguf_logits(merged, PROMPT)) < GGUF_F16_LOGIT_REL["f16"]
    merge_dir = d / "merged-hf"
    if not merge_dir.exists():
        run_cli("merge", models["q"], models["adapter"], merge_dir, "--dtype", "float32")
    want = _hf_logits(AutoModelForCausalLM.from_pretrained(merge_dir, dtype=torch.float32).eval(), PROMPT)
    assert _rel(applied, want) < GGUF_F16_LOGIT_REL["f16"], _rel(applied, want)
    assert _rel(_gguf_logits(base, PROMPT), want) > 20 * GGUF_F16_LOGIT_REL["f16"]  # the adapter matters


@pytest.mark.slow
def test_lora_only_folds_a_scaling_other_than_alpha_over_r(models, tmp_path):
    """rsLoRA (scaling alpha / sqrt(r)) and a rank_pattern: llama.cpp's alpha / r times the written
    lora_b gives PEFT's scaling; checked against the merged export."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4}, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(models["src"], dtype=torch.float32), cfg).save_pretrained(tmp_path / "rs")
    base, lora, merged = models["dir"] / "rs-base.gguf", tmp_path / "rs.gguf", tmp_path / "rs-merged.gguf"
    if not base.exists():
        _export(models["q"], base)
    _export(models["q"], lora, "--adapter", tmp_path / "rs", "--lora-only")
    _export(models["q"], merged, "--adapter", tmp_path / "rs")
    applied, want = _gguf_logits(base, PROMPT, lora=lora), _gguf_logits(merged, PROMPT)
    assert _rel(applied, want) < GGUF_F16_LOGIT_REL["f16"], _rel(applied, want)
    assert _rel(_gguf_logits(base, PROMPT), want) > 20 * GGUF_F16_LOGIT_REL["f16"]


@pytest.mark.slow
def test_tied_embeddings_run_from_token_embd(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "tied", dtype=torch.float32, hidden=256, intermediate=512, vocab=VOCAB, tie=True)
    make_bpe_tokenizer(src)
    out = tmp_path / "tied.gguf"
    s = _export(src, out)
    import gguf

    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors} and s["tensors"] == 2 * 9 + 2  # blocks, token_embd, output_norm
    want = _hf_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), PROMPT)
    assert _rel(_gguf_logits(out, PROMPT), want) < GGUF_F16_LOGIT_REL["f16"]


def test_lora_only_needs_an_adapter_and_no_type(tmp_path):
    from qconvert.errors import OptionError
    from qconvert.export.gguf import export_gguf

    with pytest.raises(OptionError, match="--adapter is missing"):
        export_gguf("m", tmp_path / "o.gguf", lora_only=True)
    with pytest.raises(OptionError, match="alone, in float32$") as e:
        export_gguf("m", tmp_path / "o.gguf", adapter="a", lora_only=True, out_type="q8_0")
    assert "no --type" in e.value.hint


@pytest.mark.slow
def test_compare_runs_a_gguf_against_the_folder_and_adapter_it_came_from(models):
    """`qconvert compare` with llama.cpp on one side: the merged F16 export passes against the 4-bit
    base plus adapter, the base export without the adapter fails."""
    from qconvert.export.compare import compare

    d = models["dir"]
    merged, base = d / "cmp-merged.gguf", d / "cmp-base.gguf"
    s = _export(models["q"], merged, "--adapter", models["adapter"], check=True)  # export-gguf's own check: compare
    assert s["check"]["passed"] and s["check"]["kl"] < GGUF_KL_MAX["bf16"] and s["check"]["top1_agreement"] == 1.0
    r = run_cli("export-gguf", models["q"], base, "--check-tolerance", "1e-9", ok=False)  # a bound nothing meets
    assert r.returncode == 1 and "check FAIL" in r.stdout and base.exists()  # (kept, to be inspected)
    bad = compare(str(models["q"]), str(base), adapter_a=str(models["adapter"]), new_tokens=4)
    assert not bad["passed"] and bad["kl"] > 100 * s["check"]["kl"]
    assert all(len(p["greedy_a"]) > 0 and len(p["greedy_b"]) > 0 for p in bad["prompts"])


@pytest.mark.slow
def test_16bit_folder_exports_too(models):
    from transformers import AutoModelForCausalLM

    out = models["dir"] / "src-f16.gguf"
    _export(models["src"], out)
    want = _hf_logits(AutoModelForCausalLM.from_pretrained(models["src"], dtype=torch.float32).eval(), PROMPT)
    assert _rel(_gguf_logits(out, PROMPT), want) < GGUF_F16_LOGIT_REL["f16"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_match_transformers(tmp_path, family):
    """Families that llama.cpp runs with its own graphs: mistral (llama's, permuted), qwen2 (q/k/v
    biases, not permuted), qwen3 (q/k norms, tied embeddings)."""
    import transformers

    cls = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls + "Config")(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                                               tie_word_embeddings=family == "qwen3")
    model = getattr(transformers, cls + "ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)  # qwen2's biases start at zero: make them count
    model.save_pretrained(tmp_path / family)
    make_bpe_tokenizer(tmp_path / family)
    out = tmp_path / f"{family}.gguf"
    _export(tmp_path / family, out)
    got, want = _gguf_logits(out, PROMPT), _hf_logits(model, PROMPT)
    assert _rel(got, want) < GGUF_F16_LOGIT_REL["f16"], _rel(got, want)


@pytest.mark.slow  # (the first transformers import in the process)
@pytest.mark.slow
def test_chat_template_and_sampling_settings_travel_in_the_file(tmp_path):
    """The file runs alone: the tokenizer's chat template and generation_config.json's sampling settings
    are in its metadata (and a config without do_sample writes none)."""
    import gguf

    src = make_tiny_llama(tmp_path / "m", dtype=torch.float32, hidden=64, vocab=VOCAB)
    make_bpe_tokenizer(src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    (src / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    from qconvert.export.gguf import export_gguf

    export_gguf(str(src), tmp_path / "a.gguf")
    f = gguf.GGUFReader(tmp_path / "a.gguf").fields
    assert f["tokenizer.chat_template"].contents() == (src / "chat_template.jinja").read_text()
    assert f["general.sampling.top_k"].contents() == 20
    assert f["general.sampling.temp"].contents() == pytest.approx(0.6) and f["general.sampling.top_p"].contents() == pytest.approx(0.9)
    assert f["tokenizer.ggml.bos_token_id"].contents() == 0 and f["tokenizer.ggml.model"].contents() == "gpt2"
    (src / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    export_gguf(str(src), tmp_path / "b.gguf")
    assert not [k for k in gguf.GGUFReader(tmp_path / "b.gguf").fields if k.startswith("general.sampling")]


@pytest.mark.slow  # (the first transformers import in the process)
def test_other_architectures_are_refused_by_name(tmp_path):
    from qconvert.errors import FormatError
    from qconvert.export.gguf import export_gguf

    make_tiny_bert(tmp_path / "bert")
    with pytest.raises(FormatError, match="'BertModel'.*only LlamaForCausalLM, Mistral"):
        export_gguf(str(tmp_path / "bert"), tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_existing_output_is_kept_without_overwrite_and_a_link_is_refused(tmp_path):
    from qconvert.errors import OptionError, OutputExistsError
    from qconvert.export.gguf import export_gguf

    src = make_tiny_llama(tmp_path / "m", dtype=torch.float32)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        export_gguf(str(src), out)
    assert out.read_bytes() == b"mine"
    link = tmp_path / "l.gguf"
    link.symlink_to(out)
    with pytest.raises(OptionError, match="link"):
        export_gguf(str(src), link, overwrite=True)
    assert out.read_bytes() == b"mine"


def test_missing_tokenizer_is_refused_and_leaves_nothing(tmp_path):
    """The file must run alone: no tokenizer, no file (and no temporary left behind)."""
    from qconvert.errors import FormatError
    from qconvert.export.gguf import export_gguf

    src = make_tiny_llama(tmp_path / "m", dtype=torch.float32)
    with pytest.raises(FormatError, match="no tokenizer llama.cpp can run"):
        export_gguf(str(src), tmp_path / "o.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_sentencepiece_tokenizer_without_sentencepiece_is_refused_with_the_fix(tmp_path):
    try:  # the refusal is only reachable where sentencepiece is missing
        import sentencepiece  # noqa: F401
        pytest.skip("sentencepiece is installed")
    except ImportError:
        pass
    from qconvert.errors import FormatError
    from qconvert.export.gguf import export_gguf

    src = make_tiny_llama(tmp_path / "m", dtype=torch.float32)
    (src / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FormatError, match="needs the sentencepiece package") as e:
        export_gguf(str(src), tmp_path / "o.gguf")
    assert "pip install sentencepiece" in e.value.hint and not (tmp_path / "o.gguf").exists()


def test_rope_permutation_matches_the_interleaved_pairs():
    """Head h's rows (first half i, second half i + d/2) go to rows 2i and 2i + 1 of that head."""
    from qconvert.export.gguf import _rope_permute

    heads, d = 2, 8
    w = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 3)
    got = _rope_permute(w, heads)[:, 0].tolist()
    want = [h * d + j for h in range(heads) for i in range(d // 2) for j in (i, i + d // 2)]
    assert got == want


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
