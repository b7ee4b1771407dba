"""Model card front matter: read as the Hub reads it (YAML), written so that it reads back exactly.
huggingface_hub's ModelCard is the oracle for both directions."""

from __future__ import annotations

import pytest

from helpers import make_tiny_llama
from qconvert.errors import FormatError
from qconvert.io.cards import read_card_meta, render_card

HAND_WRITTEN = """---
# written by hand, as people do
base_model: 'acme/tiny-llama'   # single-quoted
base_model_relation: 'quantized'
library_name: transformers
license: "apache-2.0"
tags: [qconvert, 'nf4', "4-bit"]
datasets:
  - acme/data
  - 'acme/more: data'
---

# A card
"""


def hub_reads(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text, ignore_metadata_errors=True).data.to_dict()


def test_hand_written_card_reads_as_the_hub_reads_it():
    meta = read_card_meta(HAND_WRITTEN)
    assert meta == {
        "base_model": "acme/tiny-llama", "base_model_relation": "quantized", "library_name": "transformers",
        "license": "apache-2.0", "tags": ["qconvert", "nf4", "4-bit"], "datasets": ["acme/data", "acme/more: data"],
    }
    assert meta == hub_reads(HAND_WRITTEN)


def test_rendered_card_round_trips():
    meta = {
        "base_model": "acme/tiny-llama", "base_model_relation": "adapter", "library_name": "peft",
        "tags": ["qconvert", "lora", "- dash", "#hash", "colon: here", 'quote " and \' both', "ünïcode ✓", "two\nlines"],
        "license": "other", "pipeline_tag": "text-generation",
    }
    text = render_card(meta, "# Body\n\n---\n\nnot front matter\n")
    assert read_card_meta(text) == meta == hub_reads(text)


@pytest.mark.parametrize("text,message", [
    ("---\ntags: [a, b\n---\n", "does not parse"),
    ("---\nbase_model: x\n  bad: indent\n---\n", "does not parse"),
    ("---\n- just\n- a list\n---\n", "must be a mapping, not list"),
    ("---\na: " + "[" * 5000 + "\n---\n", "does not parse"),
])
@pytest.mark.slow
def test_broken_front_matter_is_one_clear_error(text, message):
    with pytest.raises(FormatError, match=message):
        read_card_meta(text, "README.md")


def test_no_front_matter_is_empty():
    assert read_card_meta("# just markdown\n") == {} and read_card_meta("---\n---\nbody\n") == {}


def test_push_accepts_a_valid_hand_written_card(tmp_path):
    """A card whose relation is single-quoted YAML was rejected by push (the quotes were kept)."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.hub.push import validate_folder

    q = tmp_path / "q"
    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src")), q)
    (q / "README.md").write_text(HAND_WRITTEN)
    info = validate_folder(q)
    assert info["kind"] == "quantized" and info["card"]["base_model_relation"] == "quantized"
    (q / "README.md").write_text("---\nbase_model_relation: [quantized\n---\n")
    with pytest.raises(FormatError, match=r"README\.md: the YAML front matter does not parse"):
        validate_folder(q)


# ---------------------------------------------------------------- no local path in a card (issue 22)
def test_cards_name_local_inputs_by_folder_name_only(tmp_path):
    """merge's and export-adapter's cards name a local input as "the local folder `NAME`", and a Hub
    id as itself; no path of the writing machine reaches the published card or its base_model."""
    from qconvert.io.cards import adapter_card, exported_adapter_card, merged_card

    base, run = tmp_path / "llama-nf4", tmp_path / "runs" / "run1"
    base.mkdir()
    summary = {"output": str(tmp_path / "merged"), "adapter": str(run), "base": str(base), "dtype": "bfloat16", "quantized": False}
    cards = {
        "merge": merged_card(summary, None, "0.1"),
        "export": exported_adapter_card(run, {"base_model_name_or_path": str(base), "r": 4, "lora_alpha": 8}),
        "adapter": adapter_card(str(base), "# body"),
    }
    for kind, card in cards.items():
        assert str(tmp_path) not in card, kind
        assert "base_model:" not in card, kind
    assert "The LoRA adapter the local folder `run1` merged into the local folder `llama-nf4`" in cards["merge"]
    assert "No Hub id is known for the base model" in cards["merge"]
    assert "Base model: the local folder `llama-nf4` (no Hub id known" in cards["export"]
    hub = merged_card(dict(summary, base="acme/llama-nf4"), "acme/llama-nf4", "0.1")
    assert 'base_model: "acme/llama-nf4"' in hub and "merged into `acme/llama-nf4`" in hub


@pytest.mark.slow
def test_merge_and_train_cards_carry_no_local_path(tmp_path):
    """A real merge of a PEFT adapter (whose adapter_config names the base by its absolute path, as
    PEFT writes it) and train's adapter card: the folder names only."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.merge import merge_adapter
    from qconvert.training.loop import _write_adapter

    src = make_tiny_llama(tmp_path / "src", hidden=32, intermediate=48, layers=1, vocab=64)
    quantize_checkpoint(str(src), tmp_path / "q")
    peft = get_peft_model(qconvert.load_model(str(tmp_path / "q")), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    merge_adapter(str(tmp_path / "q"), str(tmp_path / "adapter"), tmp_path / "m")
    (tmp_path / "run").mkdir()
    _write_adapter(peft, tmp_path / "run", str(tmp_path / "q"), SimpleNamespace(r=2, lora_alpha=8, lora_dropout=0.0),
                   {"steps": 1, "examples": 2, "optimizer": "adamw", "lr": 1e-3, "final_loss": 1.0})
    for card in (tmp_path / "m" / "README.md", tmp_path / "run" / "README.md"):
        text = card.read_text()
        assert str(tmp_path) not in text and "the local folder `q`" in text, text
        assert read_card_meta(text).get("base_model") is None
