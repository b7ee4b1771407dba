"""Sequences longer than a model with learned position embeddings can take (GPT-2's ``wpe``, OPT's
``embed_positions``: ``n_positions`` rows): generate, eval, compare and train name the length and
the limit in one line before running, instead of an IndexError from the table lookup reported as a
bug (GPT-2 takes 1024 positions: ``eval --max-length 2048`` or a long prompt reached it). Models
whose positions are computed (RoPE) are not limited. Also here, on the same tiny model: a chat
template that raises or loops under ``generate --chat``."""

from __future__ import annotations

import pytest

from runtime_helpers import cli, make_word_tokenizer, write_jsonl
from test_hostile_runtime import refused

LONG = " ".join(f"w{i % 100}" for i in range(40))  # 40 tokens
LIMIT = "past the 16 positions the model can take"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-positions")
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=16, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(d / "gpt2")
    make_word_tokenizer(d / "gpt2")
    quantize_checkpoint(str(d / "gpt2"), d / "q", compute_dtype="float32")
    return {"dir": d, "src": d / "gpt2", "q": d / "q"}


@pytest.mark.parametrize("model", ["src", "q"])
def test_generate_prompt_or_new_tokens_past_the_positions(env, capsys, model):
    refused(capsys, "generate", env[model], "--prompt", LONG, "--max-new-tokens", 2,
            match=f"the prompt (40 tokens) with --max-new-tokens 2: 42 tokens, {LIMIT}")
    refused(capsys, "generate", env[model], "--prompt", "w1 w2", "--max-new-tokens", 20,
            match=f"the prompt (2 tokens) with --max-new-tokens 20: 22 tokens, {LIMIT}")


def test_generate_within_the_positions_runs(env, capsys):
    rc, out, err = cli(capsys, "generate", env["q"], "--prompt", "w1 w2", "--max-new-tokens", 14)
    assert rc == 0, err


def test_eval_records_past_the_positions(env, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": LONG}])
    err = refused(capsys, "eval", env["q"], "--data", data, match=f"41 tokens, {LIMIT}")  # 40 words and </s>
    assert "--max-length 16" in err
    rc, out, err = cli(capsys, "eval", env["q"], "--data", data, "--max-length", 16)  # what the hint says runs
    assert rc == 0 and " 15 " in out, err  # 16 tokens: 15 predicted


def test_compare_probes_past_the_positions(env, capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3\n")
    refused(capsys, "compare", env["src"], env["q"], "--prompts", prompts, match=f"the longest probe (3 tokens) with 16 new tokens: 19 tokens, {LIMIT}")
    rc, out, err = cli(capsys, "compare", env["src"], env["q"], "--prompts", prompts, "--new-tokens", 13)
    assert rc == 0, err


def test_train_records_past_the_positions(env, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": LONG}] * 4)
    rc, out, err = cli(capsys, "train", env["q"], "--data", data, "--output", tmp_path / "out", "--max-steps", 1)
    lines = [ln for ln in err.splitlines() if not ln.startswith("note: ")]  # (the CPU optimizer's note comes first)
    assert rc == 1 and lines[0] == f"qconvert: error: {data}: 41 tokens, {LIMIT}" and lines[1:] == ["hint: pass --max-length 16 or lower"], err


def test_rope_models_are_not_limited(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qconvert.model.checks import position_limit

    cfg = LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32,
                      max_position_embeddings=8)
    assert position_limit(LlamaForCausalLM(cfg)) is None


@pytest.mark.parametrize("template, match", [
    ('{% if messages[-1]["role"] == "user" %}{{ raise_exception("users not welcome") }}{% endif %}',
     "--chat: the chat template refused the prompt (users not welcome)"),
    ("{% for i in range(100000000000) %}w1 {% endfor %}", "--chat: the chat template refused the prompt"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}w1 {% endfor %}{% endfor %}", "the chat template produced over"),
])
def test_generate_chat_template_that_raises_or_loops_is_one_line(env, capsys, tmp_path, template, match, monkeypatch):
    """generate --chat rendered the template unbounded: a raise or the sandbox's range limit was an
    unexpected error reported as a bug, and nested loops ran without end. It renders through train's
    bounded renderer now (time and size; its refusals named)."""
    import shutil

    monkeypatch.setenv("QCONVERT_TEMPLATE_SECONDS", "2")
    m = shutil.copytree(env["src"], tmp_path / "m")
    (m / "chat_template.jinja").write_text(template)
    refused(capsys, "generate", m, "--prompt", "w1", "--chat", "--max-new-tokens", 1, match=match)
