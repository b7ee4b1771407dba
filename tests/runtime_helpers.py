"""Tiny models with a word-level tokenizer for the generate/eval/verify-plot tests, and an in-process CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import make_tiny_llama

WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", "system", ":"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def make_word_tokenizer(folder: Path, *, token_type_ids: bool = False, chat_template: bool = True) -> None:
    """One token per whitespace-separated word (w0..w119); ``token_type_ids``: a tokenizer that returns
    them, as BERT-style tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_type_ids else ["input_ids", "attention_mask"]
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                model_input_names=names)
    if chat_template:
        t.chat_template = CHAT_TEMPLATE
    t.save_pretrained(folder)


def make_word_llama(folder: Path, *, dtype: torch.dtype = torch.float32, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny Llama over the word tokenizer whose frozen head is scaled like a trained one's (a random
    init behind RMSNorm caps the logits near 1.3, so nothing could learn far below log(vocab))."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_llama(folder, hidden=hidden, intermediate=128, vocab=128, dtype=dtype, seed=seed)
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = (sd["lm_head.weight"].float() * 25).to(dtype)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    make_word_tokenizer(src)
    return src


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_texts(n: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g).tolist()) for _ in range(n)]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``qconvert ARGS`` in this process (same code path as the console script): (exit code, stdout, stderr)."""
    from qconvert.cli.main import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # click exits for usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
