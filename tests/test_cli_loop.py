"""Issue 13's loop, from the command line only, as a user runs it: quantize -> eval the base -> train ->
eval with the adapter (lower loss on the training data) -> generate with the adapter -> merge to 16 bits
-> eval the merged model (the adapter's loss, to bf16 rounding). Every step is a real `qconvert` process."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from runtime_helpers import make_word_llama, random_texts, write_jsonl
from tolerances import FLOAT32_REL, FLOAT32_SAME_MATH_REL


def eval_rows(*args) -> list[dict]:
    r = run_cli("eval", *args, "--backend", "reference", "--json")
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.mark.slow
def test_quantize_eval_train_eval_generate_merge_eval(tmp_path):
    src = make_word_llama(tmp_path / "src", dtype=torch.bfloat16)  # a bf16 model, as published models are
    # prompt/completion records: train learns the completions only, and eval must score exactly those
    rows = [{"prompt": " ".join(t.split()[:4]), "completion": " ".join(t.split()[4:])} for t in random_texts(8, 12, seed=1)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    q, run, merged = tmp_path / "q", tmp_path / "run", tmp_path / "merged"

    run_cli("quantize", src, q)
    [base] = eval_rows(q, "--data", data)
    assert base["kind"] == "4-bit" and base["dtype"] == "bfloat16" and base["adapter"] is None
    assert base["tokens"] == 8 * (8 + 1)  # 8 completion words and the EOS per record

    run_cli("train", q, "--data", data, "--output", run, "--backend", "reference", "--max-steps", 12, "--batch-size", 4,
            "--grad-accum", 1, "--lr", "1e-2", "--lora-r", 8, "--lora-alpha", 16, "--lora-dropout", 0.0, "--max-grad-norm", 1.0,
            "--warmup-ratio", 0.0, "--optim", "adamw", "--seed", 0, "--eval-data", data)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_train_loss = [r["loss"] for r in logged if "loss" in r][-1]
    train_eval_loss = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]  # train's own evaluation, after the last step

    # eval batched as train evaluates (--batch-size 4), so both run the very same computation
    before, after = eval_rows(q, "--data", data, "--adapter", run, "--compare", "--batch-size", 4)
    assert before["loss"] == pytest.approx(base["loss"], rel=FLOAT32_SAME_MATH_REL) and after["tokens"] == base["tokens"]
    assert after["loss"] < 0.5 * base["loss"], (base["loss"], after["loss"])
    assert after["loss"] == pytest.approx(train_eval_loss, rel=FLOAT32_REL), (after["loss"], train_eval_loss)

    # the adapted model continues a training prompt with its completion (memorized), the base does not
    prompt, completion = rows[0]["prompt"], rows[0]["completion"]
    g = json.loads(run_cli("generate", q, "--adapter", run, "--prompt", prompt, "--max-new-tokens", 8, "--backend", "reference",
                           "--json").stdout)
    words = completion.split()
    hits = sum(a == b for a, b in zip(g["completion"].split(), words))
    assert hits >= 4, (g["completion"], completion)  # measured 7 of 8
    plain = run_cli("generate", q, "--prompt", prompt, "--max-new-tokens", 8, "--backend", "reference").stdout.split()
    assert sum(a == b for a, b in zip(plain, words)) < hits

    run_cli("merge", q, run, merged)  # bf16, no quantization_config: a plain transformers checkpoint
    [m] = eval_rows(merged, "--data", data)
    assert m["kind"] == "unquantized" and m["dtype"] == "bfloat16" and m["tokens"] == after["tokens"]
    # The merged weights are dequant(W4) + scaling * B @ A rounded once to bf16, and activations are bf16 on both
    # sides. Measured 0.3% and 1.2% apart in two runs (seeds 0 and 42); for scale, the same 4-bit model with the
    # adapter moves by 0.75% between bf16 and float32 matmuls. A 4-bit re-quantized merge loses 21-49% of the change.
    assert abs(m["loss"] - after["loss"]) <= 0.03 * after["loss"], (m["loss"], after["loss"])
    print(f"\nloop losses: base {base['loss']:.4f}, last train step {last_train_loss:.4f}, with adapter {after['loss']:.4f}, "
          f"merged bf16 {m['loss']:.4f}; generated {hits}/8 completion words")
