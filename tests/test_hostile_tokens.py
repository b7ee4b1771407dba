"""A tokenizer that does not fit its model (tokens added after the model was saved, or another
model's tokenizer copied in): every command that runs the model on tokenized text names the token
id and the embedding count in one line, instead of an IndexError from the embedding lookup
reported as a bug. train had this check; generate, eval, compare and merge's check did not."""

from __future__ import annotations

import shutil

import pytest

from runtime_helpers import make_word_llama, write_jsonl
from test_hostile_runtime import refused


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-tokens")
    src = make_word_llama(d / "src")
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    shutil.copytree(d / "q", d / "q-added")
    tok = AutoTokenizer.from_pretrained(d / "q-added")
    tok.add_tokens(["zzqq"])  # id 128, past the 128 embedding rows
    tok.save_pretrained(d / "q-added")
    return {"dir": d, "src": src, "q": d / "q", "added": d / "q-added"}


MESSAGE = "the tokenizer gives token id 128 ('zzqq'), past the model's 128 input embeddings"


def test_generate(env, capsys):
    refused(capsys, "generate", env["added"], "--prompt", "w1 zzqq w2", "--max-new-tokens", 2, match=MESSAGE)


def test_eval(env, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"text": "w4 zzqq w5"}])
    refused(capsys, "eval", env["added"], "--data", data, match=MESSAGE)


def test_compare(env, capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 zzqq w2\n")
    err = refused(capsys, "compare", env["added"], env["src"], "--prompts", prompts, match="past the model's 128 input embeddings")
    assert "token id 128" in err


def test_merge_check_refuses_and_publishes_nothing(env, capsys, tmp_path):
    """merge's check probes with its built-in prompts, tokenized by the base's tokenizer: here one
    whose every word is past the embeddings (a Llama 3 tokenizer beside a smaller model, say)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = shutil.copytree(env["q"], tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["The", "capital", "of", "France", "is"])
    tok.save_pretrained(base)
    get_peft_model(AutoModelForCausalLM.from_pretrained(env["src"]), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    refused(capsys, "merge", base, tmp_path / "adapter", out, match="past the model's 128 input embeddings")
    assert not out.exists() and not (tmp_path / "merged.unverified").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no staging folder, no lock left


def test_the_fitting_tokenizer_still_runs(env, capsys):
    from runtime_helpers import cli

    rc, out, err = cli(capsys, "generate", env["q"], "--prompt", "w1 w2", "--max-new-tokens", 2)
    assert rc == 0, err
