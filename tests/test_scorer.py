"""One scorer (issue 22): `train`'s evaluation and `qconvert eval` compute the loss with one function
(qconvert.training.score.loss_sums): the token-weighted mean next-token cross-entropy over the labelled
tokens, in eval mode. Before, they were two copies of that loop with one difference: eval's scored the
model in whatever mode it was in (dropout on for a model in training mode), train's switched to eval
mode; and train's gave 0.0 for examples with no labelled token, where eval refuses them."""

from __future__ import annotations

import json

import pytest
import torch

from runtime_helpers import make_word_llama, random_texts, write_jsonl
from tolerances import FLOAT32_REL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from qconvert.training.data import build_examples, load_records

    d = tmp_path_factory.mktemp("scorer")
    src = make_word_llama(d / "src")
    rows = [{"prompt": " ".join(t.split()[:3]), "completion": " ".join(t.split()[3:])} for t in random_texts(5, 9, seed=3)]
    data = write_jsonl(d / "d.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(src)
    examples = build_examples(load_records(data), tok, "auto", 64, False, source=str(data))
    return {"dir": d, "src": src, "data": data, "tok": tok, "examples": examples}


def _lora_in_training_mode(src):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(src), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    return m.train()


def test_train_and_eval_score_a_model_in_training_mode_identically(setup):
    """A LoRA model with dropout 0.5, in training mode (as train's model is when it evaluates): both
    scorers give the same number bit for bit, each time, and hand the model back in training mode."""
    from qconvert.run.evaluate import score
    from qconvert.training.loop import evaluate

    m, ex, pad = _lora_in_training_mode(setup["src"]), setup["examples"], setup["tok"].pad_token_id
    train_loss = evaluate(m, ex, pad, 2, torch.device("cpu"))
    assert m.training
    eval_rows = [score(m, ex, pad, batch_size=2) for _ in range(3)]
    assert m.training
    assert [r["loss"] for r in eval_rows] == [train_loss] * 3


def test_the_loss_is_token_weighted_as_transformers_computes_it(setup):
    """The oracle: transformers' own loss (labels given, one batch holding every example) is the mean over
    all labelled tokens; any batch size gives it, to float32 rounding (a mean of per-batch means would not)."""
    from qconvert.run.evaluate import score
    from qconvert.training.data import collate

    m, ex, pad = _lora_in_training_mode(setup["src"]), setup["examples"], setup["tok"].pad_token_id
    m.eval()
    b = collate(ex, pad)
    with torch.no_grad():
        want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.item()
    labelled = int((b["labels"][:, 1:] != -100).sum())
    for bs in (1, 2, len(ex)):
        r = score(m, ex, pad, batch_size=bs)
        assert r["tokens"] == labelled and r["loss"] == pytest.approx(want, rel=FLOAT32_REL), (bs, r, want)


@pytest.mark.slow
def test_train_eval_loss_equals_qconvert_eval_on_its_adapter(setup, tmp_path):
    """End to end: the eval_loss train logs after its last step equals what `qconvert eval` gives for the
    saved adapter on the same records (the same scorer; the adapter's weights saved in float32)."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.run.evaluate import evaluate
    from qconvert.training.loop import train

    q = tmp_path / "q"
    quantize_checkpoint(str(setup["src"]), q, compute_dtype="float32")
    train(str(q), setup["data"], tmp_path / "run", backend="reference", max_steps=3, batch_size=2, grad_accum=1,
                   lr=1e-2, lora_r=4, lora_dropout=0.1, eval_data=str(setup["data"]), warmup_ratio=0.0, seed=0, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_eval = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]
    [row] = evaluate(q, setup["data"], adapters=[str(tmp_path / "run")], batch_size=2, backend="reference", device="cpu")
    assert row["loss"] == pytest.approx(train_eval, rel=FLOAT32_REL), (row["loss"], train_eval)
