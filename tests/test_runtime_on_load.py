"""Issue 24 items 4 and 5 for generate and eval: a 16-bit MODEL quantized on the way in with
--load-in-4bit (the same code and line as train), and eval --adapter scoring prompt/completion
records in the adapter's recorded prompt format, as generate prompts it."""

from __future__ import annotations

import json

import pytest
import torch

from runtime_helpers import cli, make_word_llama, write_jsonl
from test_train import WORDS
from tolerances import FLOAT32_REL

PROMPT = "w1 w2 w3 w4"


@pytest.fixture(scope="module")
def src16(tmp_path_factory):
    """A bf16 tiny Llama with a word tokenizer, and its `qconvert quantize` output."""
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("on-load")
    src = make_word_llama(d / "src", dtype=torch.bfloat16)
    quantize_checkpoint(str(src), d / "q")
    data = write_jsonl(d / "data.jsonl", [{"prompt": " ".join(WORDS[i:i + 3]), "completion": " ".join(WORDS[i + 3:i + 6])}
                                          for i in range(0, 40, 8)])
    return src, d / "q", data


def json_rows(capsys, *args) -> tuple[list[dict], str]:
    rc, out, err = cli(capsys, *map(str, args), "--backend", "reference", "--json")
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()], err


QUANTIZING = "is 16-bit; quantizing it to 4-bit NF4 on the way in, as `qconvert quantize` does"


@pytest.mark.slow
def test_load_in_4bit_generates_and_scores_as_quantize_then_run(src16, tmp_path, capsys):
    """generate and eval on MODEL --load-in-4bit give what they give on `qconvert quantize MODEL`'s
    output (same ids, same loss to the bit), not the 16-bit model's; --keep-quantized keeps the same
    bytes and is reused. Old code: no such option (usage error)."""
    src, q, data = src16
    (want,), _ = json_rows(capsys, "generate", q, "--prompt", PROMPT, "--max-new-tokens", 8)
    (got,), err = json_rows(capsys, "generate", src, "--prompt", PROMPT, "--max-new-tokens", 8, "--load-in-4bit")
    assert f"base: {src} {QUANTIZING} (a temporary copy, removed at the end; --keep-quantized DIR keeps it)" in err
    assert got["completion_ids"] == want["completion_ids"]
    (w,), _ = json_rows(capsys, "eval", q, "--data", data)
    (g,), err = json_rows(capsys, "eval", src, "--data", data, "--keep-quantized", tmp_path / "kept")
    assert f"base: {src} {QUANTIZING} (kept in {tmp_path / 'kept'})" in err
    assert g["kind"] == w["kind"] == "4-bit" and g["loss"] == w["loss"] and g["tokens"] == w["tokens"]
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == (q / "model.safetensors").read_bytes()
    (plain,), err = json_rows(capsys, "eval", src, "--data", data)  # without the option: the 16-bit model as it is
    assert plain["kind"] == "unquantized" and plain["loss"] != w["loss"] and "quantizing" not in err
    (again,), err = json_rows(capsys, "generate", src, "--prompt", PROMPT, "--max-new-tokens", 8, "--keep-quantized", tmp_path / "kept")
    assert f"base: {src} is 16-bit; using its 4-bit copy in {tmp_path / 'kept'} (--keep-quantized)" in err
    assert again["completion_ids"] == want["completion_ids"]
    rc, _, err = cli(capsys, "eval", q, "--data", data, "--keep-quantized", tmp_path / "k2")  # a 4-bit MODEL has nothing to keep
    assert rc == 1 and err.startswith(f"qconvert: error: --keep-quantized {tmp_path / 'k2'}: {q} is a 4-bit checkpoint already")


def hand_loss(model, tok, pairs: list[tuple[str, str]]) -> float:
    """Mean next-token cross-entropy over the completion tokens (and EOS) of ``pairs``, each prompt
    given as written: one sequence at a time, no padding."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()[0]
        targets = ids[0, len(p):]
        total += torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], targets, reduction="sum").item()
        count += len(c)
    return total / count


@pytest.mark.slow
def test_eval_scores_prompts_in_the_adapters_recorded_format(src16, tmp_path, capsys):
    """An alpaca-trained adapter scored on prompt/completion records: with no --format the prompts
    are rendered with the recorded alpaca template (the loss computed here by hand from the template
    in qconvert_prompt_format.json), which differs from --format raw (the prompts as written, also
    computed by hand). Old code scored the raw prompts (and knew no --format raw)."""
    import qconvert
    from qconvert.training.loop import train

    _, q, data = src16
    out = tmp_path / "run"
    rows = [{"instruction": WORDS[i], "input": "", "output": WORDS[i + 1]} for i in range(8)]
    said: list[str] = []
    train(str(q), rows, out, max_steps=2, batch_size=4, grad_accum=1, lr=3e-2, backend="reference", lora_r=4, lora_alpha=8,
          lora_dropout=0.0, progress=False, log=said.append)
    assert any(m.startswith(f"threads: {torch.get_num_threads()} (") for m in said)  # item 6: train's start lines name its threads
    template = json.loads((out / "qconvert_prompt_format.json").read_text())["prompt_without_input"]
    (rec,), err = json_rows(capsys, "eval", q, "--data", data, "--adapter", out, "--dtype", "float32")
    assert "prompt format: alpaca, the adapter" in err and rec["prompt_format"] == "alpaca"
    (raw,), _ = json_rows(capsys, "eval", q, "--data", data, "--adapter", out, "--dtype", "float32", "--format", "raw")
    assert raw["prompt_format"] == "raw"
    pairs = [(r["prompt"], r["completion"]) for r in map(json.loads, data.read_text().splitlines())]
    model = qconvert.load_model(q, backend="reference", device="cpu", dtype=torch.float32, adapter=out).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(q)
    want = hand_loss(model, tok, [(template.format(instruction=p), c) for p, c in pairs])
    want_raw = hand_loss(model, tok, pairs)
    assert abs(want - want_raw) > 0.01  # the format matters here
    assert rec["loss"] == pytest.approx(want, rel=FLOAT32_REL) and raw["loss"] == pytest.approx(want_raw, rel=FLOAT32_REL)
    assert rec["tokens"] == raw["tokens"] == sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in pairs)
    rc, table, _ = cli(capsys, "eval", q, "--data", data, "--adapter", out, "--compare", "--backend", "reference")
    assert rc == 0 and f"+ adapter {out} [alpaca prompts]" in table and f"base {q} [alpaca prompts]" in table
