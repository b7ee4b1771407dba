"""Training data: JSONL/JSON records in the formats people have, tokenized with loss masks.

Formats (``--format auto`` detects from the first record's keys):
- ``text``: {"text"}; loss on every token.
- ``alpaca``: {"instruction", "input"?, "output"}: rendered as a "### Instruction / ### Input /
  ### Response" prompt; loss on the output only.
- ``prompt``: {"prompt", "completion"}; loss on the completion only.
- ``chat``: {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template;
  loss on assistant turns only (found by character spans and the tokenizer's offset mapping).
``train_on_inputs`` puts the loss on every token. EOS is appended (to the text, the output, the
completion; chat templates end turns themselves). Labels of -100 are ignored by the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

FORMATS = ("auto", "text", "alpaca", "prompt", "chat")
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def load_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .jsonl file or a .json array; clear errors with line numbers."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{p}: the file is empty", hint="give one JSON object per line")
    records: list[tuple[int, dict]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        records = [(i + 1, r) for i, r in enumerate(data)]
        where = "record"
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})", hint="each line must be one JSON object") from None
        where = "line"
    if not records:
        raise DataError(f"{p}: holds no records")
    for n, r in records:
        if not isinstance(r, dict):
            raise DataError(f"{p}: {where} {n}: expected a JSON object, got {type(r).__name__}")
    return records


def detect(rec: dict) -> str | None:
    if isinstance(rec.get("messages"), list):
        return "chat"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt"
    if isinstance(rec.get("text"), str):
        return "text"
    return None


def _pair(tok, prompt: str, completion: str, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + c, (p if train_on_inputs else [IGNORE] * len(p)) + c


def _chat(tok, messages: list, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    if not getattr(tok, "chat_template", None):
        raise DataError("chat records need a tokenizer with a chat template", hint="use text/prompt records, or add a chat_template")
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
            end = len(tok.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        return ids, list(ids)
    labels = [t if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE for t, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def build_examples(records, tok, fmt: str = "auto", max_length: int = 512, train_on_inputs: bool = False, source: str = "data") -> list[Example]:
    if fmt not in FORMATS:
        raise DataError(f"unknown --format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token", hint="set eos_token in tokenizer_config.json")
    out = []
    for n, rec in records:
        f = detect(rec) if fmt == "auto" else fmt
        where = f"{source}:{n}"
        if f is None:
            raise DataError(f"{where}: record with keys {sorted(rec)} is of no known shape",
                            hint='use {"text"}, {"instruction","input","output"}, {"prompt","completion"} or {"messages"}')
        try:
            if f == "text":
                ids = tok(rec["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
                labels = list(ids)
            elif f == "alpaca":
                prompt = f"### Instruction:\n{rec['instruction']}\n\n"
                if rec.get("input"):
                    prompt += f"### Input:\n{rec['input']}\n\n"
                ids, labels = _pair(tok, prompt + "### Response:\n", str(rec["output"]), train_on_inputs)
            elif f == "prompt":
                ids, labels = _pair(tok, str(rec["prompt"]), str(rec["completion"]), train_on_inputs)
            else:
                ids, labels = _chat(tok, rec["messages"], train_on_inputs)
        except KeyError as e:
            raise DataError(f"{where}: a {f} record needs the key {e.args[0]!r}") from None
        first = next((i for i, l in enumerate(labels) if l != IGNORE), None)
        if first is None:
            raise DataError(f"{where}: no token to learn from (empty completion?)")
        if first >= max_length:
            raise DataError(f"{where}: --max-length {max_length} is shorter than the prompt ({first} tokens)", hint="raise --max-length")
        out.append(Example(ids[:max_length], labels[:max_length]))
    return out


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples and cut into max_length pieces (labels travel with their tokens)."""
    ids, labels, out = [], [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= max_length:
            out.append(Example(ids[:max_length], labels[:max_length]))
            ids, labels = ids[max_length:], labels[max_length:]
    if ids:
        out.append(Example(ids, labels))
    return out


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
