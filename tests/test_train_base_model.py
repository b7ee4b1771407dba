"""`train --base-model HUB_ID` names the base a local 4-bit folder was made from, and `--push-to-hub`
with a local base and no such name is refused before anything runs (issue 24 item 8)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import QCONVERT
from test_hostile_train import one_line_error
from test_train import memorize_set, qmodel, train  # noqa: F401  (qmodel is a fixture)


def test_push_with_a_local_base_and_no_base_model_is_refused_before_training(tmp_path):
    model = tmp_path / "tiny-nf4"
    model.mkdir()  # a local folder: refused on the command line, before it is even read
    out = tmp_path / "run"
    r = subprocess.run([*QCONVERT, "train", str(model), "--data", str(tmp_path / "d.jsonl"), "--output", str(out),
                        "--push-to-hub", "alice/tiny-lora"], capture_output=True, text=True)
    one_line_error(r, "--push-to-hub alice/tiny-lora", "is a local folder", "hint: name the base model's Hub id with --base-model")
    assert not out.exists()
    r = subprocess.run([*QCONVERT, "train", str(model), "--data", str(tmp_path / "d.jsonl"), "--output", str(out),
                        "--base-model", str(model)], capture_output=True, text=True)
    one_line_error(r, "--base-model", "is not a Hub repo id")
    assert not out.exists()


@pytest.mark.slow
def test_base_model_is_named_in_the_adapter_config_and_card(qmodel, tmp_path):
    from qconvert.io.cards import read_card_meta

    out = tmp_path / "run"
    train(qmodel, memorize_set(tmp_path), out, "--max-steps", "1", "--grad-accum", "1", "--lora-r", "2", "--base-model", "acme/tiny-llama")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-llama"
    card = (out / "README.md").read_text()
    assert read_card_meta(card)["base_model"] == "acme/tiny-llama" and "# LoRA adapter for `acme/tiny-llama`" in card
