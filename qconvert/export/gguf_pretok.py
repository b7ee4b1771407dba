"""Which of llama.cpp's BPE pre-tokenizers (``tokenizer.ggml.pre``) splits text as the model's own
byte-level BPE tokenizer does.

A byte-level BPE tokenizer first splits text into pieces by a regular expression (its
pre-tokenizer), then merges bytes within each piece; llama.cpp does the same with the expression it
keeps for the pre-tokenizer named in the file. A wrong name gives other pieces, so other token ids
for the same text (digit runs, contractions, runs of spaces and newlines). llama.cpp's own converter
recognises a model by hashing its tokenizer's output on a probe text, which only knows published
vocabularies; here the pre-tokenizer itself is read from tokenizer.json and matched against the
expressions llama.cpp runs (src/llama-vocab.cpp of llama-cpp-python 0.3.36's llama.cpp, whose
comments give the tokenizer.json originals it adapts):

- ``ByteLevel`` with its own (GPT-2) regex -> "gpt-2";
- ``Split`` by Llama 3's regex (digits in runs of up to three) then ``ByteLevel`` without a regex ->
  "llama-bpe";
- the same with single digits (Qwen2, Qwen2.5, Qwen3) -> "qwen2";
- ``Digits`` one by one then ``ByteLevel`` with its GPT-2 regex (StarCoder, SmolLM) -> "starcoder".

Anything else is written as "default" with a note: llama.cpp then tokenizes text by its default
expression, which may split differently; token ids given directly (as qconvert compare gives them)
are not affected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FormatError

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: a Split regex followed by a regex-less ByteLevel -> llama.cpp's pre-tokenizer that runs that regex
SPLIT_REGEX = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
#: a tokenizer.json bigger than this is not read for its pre-tokenizer (the vocabulary reader reads it whole too)
_LIMIT = 256 << 20


def pre_tokenizer(folder: Path) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for ``folder``'s tokenizer.json, and a note when none matches."""
    from ..io.readers import read_json

    path = folder / "tokenizer.json"
    pre = read_json(path, "tokenizer", FormatError, limit=_LIMIT).get("pre_tokenizer") if path.is_file() else None
    name = _match(pre)
    if name:
        return name, None
    return "default", (f"{path}: its pre-tokenizer ({_describe(pre)}) is not one whose splitting llama.cpp reproduces (gpt-2, llama-bpe, "
                       "qwen2, starcoder): written as llama.cpp's \"default\", so text llama.cpp tokenizes may give other token ids than the "
                       "model's tokenizer (ids given directly are not affected)")


def _match(pre: Any) -> str | None:
    if not isinstance(pre, dict):
        return None
    if _byte_level(pre, regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2 or not isinstance(steps[0], dict):
        return None
    split = steps[0]
    if split.get("type") == "Digits" and split.get("individual_digits") and _byte_level(steps[1], regex=True):
        return "starcoder"
    if not _byte_level(steps[1], regex=False):
        return None
    if not (isinstance(split, dict) and split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")):
        return None
    pattern = split.get("pattern")
    return SPLIT_REGEX.get(pattern.get("Regex")) if isinstance(pattern, dict) else None


def _byte_level(step: Any, *, regex: bool) -> bool:
    """A ByteLevel step that adds no prefix space and uses (or not) its own GPT-2 regex."""
    return (isinstance(step, dict) and step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and bool(step.get("use_regex", True)) == regex)


def _describe(pre: Any) -> str:
    if not isinstance(pre, dict):
        return "none"
    if pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list):
        return "Sequence of " + ", ".join(str(s.get("type")) if isinstance(s, dict) else "?" for s in pre["pretokenizers"])
    return str(pre.get("type"))
