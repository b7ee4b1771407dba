"""An adapter records the prompt format it was trained on (issue 24 item 5): train writes
qconvert_prompt_format.json and the card's template; `generate --adapter` renders an instruction
exactly as train rendered the alpaca records, unless --format says otherwise."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli_here
from test_hostile_train import one_line_error
from test_train import WORDS, qmodel, train, write_jsonl  # noqa: F401  (qmodel is a fixture)


def generate(model, *args):
    r = run_cli_here("generate", model, "--backend", "reference", "--max-new-tokens", "2", "--json", *args)
    return json.loads(r.stdout), r.stderr


@pytest.mark.slow
def test_alpaca_adapter_records_its_format_and_generate_applies_it(qmodel, tmp_path):
    from transformers import AutoTokenizer

    from qconvert.training.data import build_examples

    rows = [{"instruction": WORDS[i], "input": "", "output": WORDS[i + 1]} for i in range(4)]
    out = tmp_path / "run"
    train(qmodel, write_jsonl(tmp_path / "alpaca.jsonl", rows), out, "--max-steps", "1", "--grad-accum", "1", "--lora-r", "2")
    recorded = json.loads((out / "qconvert_prompt_format.json").read_text())
    assert recorded["format"] == "alpaca" and recorded["formats"] == {"alpaca": 4}
    assert recorded["prompt_without_input"] == "### Instruction:\n{instruction}\n\n### Response:\n"
    assert recorded["prompt"] == "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    card = (out / "README.md").read_text()
    assert "Prompt format: `alpaca`" in card and "```\n### Instruction:\n{instruction}\n\n### Response:\n```" in card
    # generate with the adapter and no --format: the instruction rendered as train rendered it
    tok = AutoTokenizer.from_pretrained(qmodel)
    (ex,) = build_examples([(1, {"instruction": "w7", "output": "w8"})], tok, "alpaca")
    n_prompt = sum(l == -100 for l in ex.labels)
    r, err = generate(qmodel, "--adapter", out, "--prompt", "w7")
    assert "prompt format: alpaca, the adapter's training format" in err
    assert r["format"] == "alpaca" and r["prompt"] == "w7" and r["prompt_tokens"] == n_prompt
    assert tok(r["rendered_prompt"])["input_ids"] == ex.input_ids[:n_prompt]
    assert r["rendered_prompt"] == recorded["prompt_without_input"].format(instruction="w7")
    # --format raw sends the prompt as given; --format alpaca renders it without an adapter too
    raw, _ = generate(qmodel, "--adapter", out, "--prompt", "w7", "--format", "raw")
    assert raw["rendered_prompt"] == "w7" and raw["prompt_tokens"] == len(tok("w7")["input_ids"])
    bare, _ = generate(qmodel, "--prompt", "w7", "--format", "alpaca")
    assert bare["rendered_prompt"] == r["rendered_prompt"] and bare["prompt_tokens"] == n_prompt
    # export-adapter carries the record and the card's template; a forged record is refused, not copied
    from qconvert.export.adapter import export_adapter

    export_adapter(out, tmp_path / "exported", base_model="acme/tiny")
    assert json.loads((tmp_path / "exported" / "qconvert_prompt_format.json").read_text()) == recorded
    assert "```\n### Instruction:\n{instruction}\n\n### Response:\n```" in (tmp_path / "exported" / "README.md").read_text()
    (out / "qconvert_prompt_format.json").write_text(json.dumps(dict(recorded, format="chat")))
    r = run_cli_here("generate", qmodel, "--adapter", out, "--prompt", "w7", ok=False)
    one_line_error(r, "qconvert_prompt_format.json: not a prompt format record", "disagrees")
