"""export-gguf writes the llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text as the
model's own byte-level BPE tokenizer does: llama.cpp's tokenization of a text with digit runs,
contractions, runs of spaces and newlines and non-ASCII letters gives the Hugging Face tokenizer's
ids, for the GPT-2, Llama 3, Qwen2 and StarCoder pre-tokenizers (each tokenizer trained here, offline). Others
are written as "default" with a note.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_llama

# test_gguf skips (or, with QCONVERT_REQUIRE_GGUF=1, fails) at import without llama.cpp: so does this module
from test_gguf import llama_cpp

TEXT = "It's 12345 apples, they'll cost $3.50!\n\n  Über   naïve café 😀 x2 don't   1000000\t\tend\r\nDONE'S"
CORPUS = ["the quick brown fox jumps over the lazy dog", TEXT, "numbers 123 4567 89 0 and words it's we'll I'M", "café naïve Über 😀"]


def _model_with_tokenizer(folder, kind: str):
    """A tiny Llama with a byte-level BPE tokenizer whose pre-tokenizer is ``kind``'s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qconvert.export.gguf_pretok import SPLIT_REGEX

    make_tiny_llama(folder, dtype=torch.float32, hidden=64, intermediate=128, vocab=640, heads=4, kv_heads=2)
    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=kind == "prefix-space", use_regex=kind in ("gpt-2", "prefix-space", "starcoder"))
    if kind in ("gpt-2", "prefix-space"):
        tk.pre_tokenizer = byte_level
    elif kind == "starcoder":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "whitespace":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), byte_level])
    else:
        regex = next(r for r, name in SPLIT_REGEX.items() if name == kind)
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def _written_pre(path) -> str:
    import gguf

    field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[field.data[0]]).decode()


def _llama_cpp_ids(path, text: str) -> list[int]:
    ll = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return ll.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        ll.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe", "qwen2", "starcoder"])
def test_llama_cpp_tokenizes_text_as_the_models_tokenizer(tmp_path, kind):
    from transformers import AutoTokenizer

    from qconvert.export.gguf import export_gguf

    _model_with_tokenizer(tmp_path / "m", kind)
    s = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf")
    assert _written_pre(tmp_path / "m.gguf") == kind and s["notes"] == []
    want = AutoTokenizer.from_pretrained(tmp_path / "m")(TEXT, add_special_tokens=False).input_ids
    assert _llama_cpp_ids(tmp_path / "m.gguf", TEXT) == want


@pytest.mark.slow
@pytest.mark.parametrize("kind, described", [("whitespace", "Sequence of WhitespaceSplit, ByteLevel"), ("prefix-space", "ByteLevel")])
def test_another_pre_tokenizer_is_written_as_default_with_a_note(tmp_path, kind, described):
    from qconvert.export.gguf import export_gguf

    _model_with_tokenizer(tmp_path / "m", kind)
    s = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf")
    assert _written_pre(tmp_path / "m.gguf") == "default"
    (note,) = s["notes"]
    assert f"its pre-tokenizer ({described}) is not one whose splitting llama.cpp reproduces" in note
