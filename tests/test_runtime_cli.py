"""`qconvert generate` and `qconvert eval` on 4-bit and 16-bit models, with PEFT adapters: every number
the CLI prints is checked against the same computation done here through transformers, PEFT and the
training code (the oracles), not against the CLI's own library."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import qconvert
from runtime_helpers import CHAT_TEMPLATE, cli, make_word_llama, make_word_tokenizer, random_texts, write_jsonl
from tolerances import FLOAT32_REL, FLOAT32_SAME_MATH_REL

PROMPT = "w1 w2 w3 w4"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("runtime")
    src = make_word_llama(d / "src")
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    ttid = d / "q-ttid"
    shutil.copytree(d / "q", ttid)
    make_word_tokenizer(ttid, token_type_ids=True)
    # a PEFT adapter with non-zero B (PEFT's init_lora_weights=False), as any PEFT user would save one
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(src), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    peft_model.save_pretrained(d / "adapter")
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(-0.5)
    peft_model.save_pretrained(d / "adapter2")
    return {"src": src, "q": d / "q", "ttid": ttid, "adapter": d / "adapter", "adapter2": d / "adapter2", "dir": d}


def tok_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_model(path, adapter=None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter)).eval()
    return m


def oracle_generate(model, ids, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=6, pad_token_id=3, **kw)
    return out[0, len(ids):].tolist()


def gen_json(capsys, model, *args):
    rc, out, err = cli(capsys, "generate", model, "--prompt", PROMPT, "--max-new-tokens", 6, "--backend", "reference", "--json", *args)
    assert rc == 0, err
    return json.loads(out)


def test_generate_prints_only_the_greedy_completion(models, capsys):
    tok = tok_of(models["q"])
    ids = tok(PROMPT)["input_ids"]
    want = oracle_generate(qconvert.load_model(models["q"], backend="reference", device="cpu"), ids, do_sample=False)
    r = gen_json(capsys, models["q"])
    assert r["completion_ids"] == want and r["prompt_tokens"] == len(ids) == 4 and r["completion_tokens"] == 6
    assert r["completion"] == tok.decode(want) and r["finish_reason"] == ("eos" if want[-1] == tok.eos_token_id else "length")
    rc, out, _ = cli(capsys, "generate", models["q"], "--prompt", PROMPT, "--max-new-tokens", 6, "--backend", "reference")
    assert rc == 0 and out == tok.decode(want) + "\n"
    rc, out, _ = cli(capsys, "generate", models["q"], "--prompt", PROMPT, "--max-new-tokens", 6, "--backend", "reference", "--echo")
    assert rc == 0 and out == tok.decode(ids + want) + "\n" and out.startswith(PROMPT + " ")


def test_generate_with_a_tokenizer_that_returns_token_type_ids(models, capsys):
    """A Llama has no token_type_ids input: transformers refused the call ("model_kwargs are not used")."""
    assert "token_type_ids" in tok_of(models["ttid"])(PROMPT)
    assert gen_json(capsys, models["ttid"])["completion_ids"] == gen_json(capsys, models["q"])["completion_ids"]


def test_generate_sampling_options(models, capsys):
    m = qconvert.load_model(models["q"], backend="reference", device="cpu")
    ids = tok_of(models["q"])(PROMPT)["input_ids"]
    greedy = oracle_generate(m, ids, do_sample=False)
    # top-k 1 leaves only the likeliest token: sampling must then equal greedy decoding
    assert gen_json(capsys, models["q"], "--temperature", 1.0, "--top-k", 1, "--seed", 5)["completion_ids"] == greedy
    a = gen_json(capsys, models["q"], "--temperature", 3.0, "--seed", 7)
    assert a["settings"]["do_sample"] and a["completion_ids"] == gen_json(capsys, models["q"], "--temperature", 3.0, "--seed", 7)["completion_ids"]
    torch.manual_seed(7)
    assert a["completion_ids"] == oracle_generate(m, ids, do_sample=True, temperature=3.0)
    others = {tuple(gen_json(capsys, models["q"], "--temperature", 3.0, "--seed", s)["completion_ids"]) for s in (8, 9, 10)}
    assert others != {tuple(a["completion_ids"])}
    torch.manual_seed(3)
    want = oracle_generate(m, ids, do_sample=True, temperature=0.7, top_p=0.5, repetition_penalty=1.3)
    got = gen_json(capsys, models["q"], "--temperature", 0.7, "--top-p", 0.5, "--repetition-penalty", 1.3, "--seed", 3)
    assert got["completion_ids"] == want
    assert gen_json(capsys, models["q"], "--repetition-penalty", 1.3)["completion_ids"] == oracle_generate(m, ids, do_sample=False, repetition_penalty=1.3)


def test_generate_chat_applies_the_template(models, capsys):
    tok = tok_of(models["q"])
    m = qconvert.load_model(models["q"], backend="reference", device="cpu")
    for system in (None, "w9 w9"):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROMPT}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert ids[-3:] == tok("<s> assistant :", add_special_tokens=False)["input_ids"]
        r = gen_json(capsys, models["q"], "--chat", *(["--system", system] if system else []))
        assert r["prompt_tokens"] == len(ids) == (11 if system is None else 17)
        assert r["completion_ids"] == oracle_generate(m, ids, do_sample=False)


def test_generate_16bit_model_with_adapter(models, capsys):
    ids = tok_of(models["src"])(PROMPT)["input_ids"]
    plain = gen_json(capsys, models["src"])
    assert plain["completion_ids"] == oracle_generate(hf_model(models["src"]), ids, do_sample=False)
    adapted = gen_json(capsys, models["src"], "--adapter", models["adapter"])
    assert adapted["completion_ids"] == oracle_generate(hf_model(models["src"], models["adapter"]), ids, do_sample=False)
    assert adapted["completion_ids"] != plain["completion_ids"]
    for r in (plain, adapted):
        assert r["finish_reason"] == ("eos" if r["completion_ids"][-1] == 2 else "length") and r["completion_tokens"] <= 6


def mixed_records(tmp_path):
    """One record of each shape train reads; returns the file and the number of tokens train learns from each."""
    texts = random_texts(4, 10, seed=3)
    rows = [
        {"prompt": texts[0][:30], "completion": texts[0][30:]},
        {"instruction": texts[1][:20], "input": "w5 w6", "output": "w7 w8 w9"},
        {"messages": [{"role": "user", "content": texts[2]}, {"role": "assistant", "content": "w10 w11 w12 w13"},
                      {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]},
        {"text": texts[3]},
    ]
    # completion words + EOS; alpaca output + EOS; each assistant turn's words + its </s>; every text token but the first
    learned = [len(texts[0][30:].split()) + 1, 4, (4 + 1) + (1 + 1), 10]
    return write_jsonl(tmp_path / "mixed.jsonl", rows), learned


def train_eval_loss(model, data, tok, train_on_inputs=False):
    """The eval loss `qconvert train` computes for these records (its own data pipeline and evaluate())."""
    from qconvert.training.data import build_examples, load_records
    from qconvert.training.loop import evaluate

    ex = build_examples(load_records(data), tok, "auto", 512, train_on_inputs, source=str(data))
    return evaluate(model, ex, tok.pad_token_id, 2, torch.device("cpu"))


def eval_json(capsys, *args):
    rc, out, err = cli(capsys, "eval", *args, "--backend", "reference", "--json")
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_eval_scores_exactly_what_train_scores(models, capsys, tmp_path):
    data, learned = mixed_records(tmp_path)
    tok = tok_of(models["src"])
    [r] = eval_json(capsys, models["src"], "--data", data)
    assert r["tokens"] == sum(learned) and r["examples"] == 4 and r["kind"] == "unquantized" and r["dtype"] == "float32"
    assert r["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"]), data, tok), rel=FLOAT32_REL)
    assert r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=FLOAT32_SAME_MATH_REL)
    [a] = eval_json(capsys, models["src"], "--data", data, "--train-on-inputs", "--batch-size", 1)
    assert a["tokens"] > r["tokens"] and a["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"]), data, tok, True), rel=FLOAT32_REL)
    [q] = eval_json(capsys, models["q"], "--data", data)
    want = train_eval_loss(qconvert.load_model(models["q"], backend="reference", device="cpu"), data, tok)
    assert q["kind"] == "4-bit" and q["tokens"] == r["tokens"] and q["loss"] == pytest.approx(want, rel=FLOAT32_REL)


def test_eval_reads_parquet_and_counts_over_long_records(models, capsys, tmp_path):
    """eval reads what train reads through `datasets` (here parquet), and treats records over
    --max-length as train does: truncated (scored on their first tokens) or dropped, counted."""
    import pandas as pd

    texts = random_texts(5, 10, seed=5)
    rows = [{"text": t} for t in texts[:4]] + [{"text": " ".join([texts[4]] * 6)}]  # the last one is 60 words
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    short = write_jsonl(tmp_path / "short.jsonl", rows[:4])
    tok = tok_of(models["src"])
    [whole] = eval_json(capsys, models["src"], "--data", tmp_path / "d.parquet", "--max-length", 512)
    assert whole["records"] == 5 and whole["truncated"] == 0 and whole["dropped"] == 0 and whole["examples"] == 5
    [cut] = eval_json(capsys, models["src"], "--data", tmp_path / "d.parquet", "--max-length", 20)
    assert cut["truncated"] == 1 and cut["dropped"] == 0 and cut["examples"] == 5 and cut["tokens"] == 4 * 10 + 19
    [drop] = eval_json(capsys, models["src"], "--data", tmp_path / "d.parquet", "--max-length", 20, "--truncation", "drop")
    assert drop["dropped"] == 1 and drop["examples"] == 4
    assert drop["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"]), short, tok), rel=FLOAT32_REL)
    rc, out, err = cli(capsys, "eval", models["src"], "--data", tmp_path / "d.parquet", "--max-length", 20, "--backend", "reference")
    assert rc == 0 and "5 records, 1 truncated to --max-length 20, 0 left out" in err


def test_eval_compare_base_and_adapter(models, capsys, tmp_path):
    from peft import PeftModel

    data, _ = mixed_records(tmp_path)
    tok = tok_of(models["src"])
    base, adapted = eval_json(capsys, models["src"], "--data", data, "--adapter", models["adapter"], "--compare")
    assert base["adapter"] is None and adapted["adapter"] == str(models["adapter"])
    assert base["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"]), data, tok), rel=FLOAT32_REL)
    assert adapted["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"], models["adapter"]), data, tok), rel=FLOAT32_REL)
    assert abs(adapted["loss"] - base["loss"]) > 0.01
    # the same adapter on the 4-bit base (its modules have the same shapes), against PEFT on qconvert's model
    [q] = eval_json(capsys, models["q"], "--data", data, "--adapter", models["adapter"])
    m = PeftModel.from_pretrained(qconvert.load_model(models["q"], backend="reference", device="cpu"), str(models["adapter"]))
    assert q["loss"] == pytest.approx(train_eval_loss(m, data, tok), rel=FLOAT32_REL)
    # two adapters in one call: one row each, each the score it gets alone
    rows = eval_json(capsys, models["src"], "--data", data, "--adapter", models["adapter"], "--adapter", models["adapter2"])
    [alone] = eval_json(capsys, models["src"], "--data", data, "--adapter", models["adapter2"])
    assert [r["adapter"] for r in rows] == [str(models["adapter"]), str(models["adapter2"])]
    assert rows[0]["loss"] == pytest.approx(adapted["loss"], rel=FLOAT32_SAME_MATH_REL) and rows[1]["loss"] == pytest.approx(alone["loss"], rel=FLOAT32_SAME_MATH_REL)
    assert abs(alone["loss"] - adapted["loss"]) > 0.01
    rc, out, err = cli(capsys, "eval", models["src"], "--data", data, "--adapter", models["adapter"], "--compare")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 4 and lines[1].split() == ["model", "examples", "tokens", "loss", "perplexity"]
    assert lines[2].split()[:6] == ["base", str(models["src"]), "4", str(base["tokens"]), f"{base['loss']:.4f}", f"{base['perplexity']:.3f}"]
    assert lines[3].split()[:3] == ["+", "adapter", str(models["adapter"])] and f"{adapted['loss'] - base['loss']:+.4f} vs base" in lines[3]


def test_runtime_library_modules_import_neither_click_nor_matplotlib():
    probe = ("import sys, qconvert.run.inference, qconvert.run.evaluate, qconvert.run.generate, qconvert.convert.verify_plot; "
             "print([m for m in ('click', 'matplotlib', 'transformers', 'peft') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_chat_template_constant_matches_tokenizer(models):
    assert tok_of(models["q"]).chat_template == CHAT_TEMPLATE


def test_eval_with_an_embedding_lora(models, capsys, tmp_path):
    """PEFT's embedding LoRA (lora_embedding_A/B, and the saved embedding itself) is accepted and scored as PEFT scores it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    get_peft_model(hf_model(models["src"]), LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False,
                                                       task_type="CAUSAL_LM")).save_pretrained(tmp_path / "emb")
    data, _ = mixed_records(tmp_path)
    [r] = eval_json(capsys, models["src"], "--data", data, "--adapter", tmp_path / "emb")
    assert r["loss"] == pytest.approx(train_eval_loss(hf_model(models["src"], tmp_path / "emb"), data, tok_of(models["src"])), rel=FLOAT32_REL)
