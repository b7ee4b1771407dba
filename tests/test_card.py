"""Model card front matter: read as the Hub reads it (YAML), written so that it reads back exactly.
huggingface_hub's ModelCard is the oracle for both directions."""

from __future__ import annotations

import pytest

from helpers import make_tiny_llama
from qconvert.errors import FormatError
from qconvert.hub.card import read_card_meta, render_card

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
