"""`qconvert eval`: the loss a model gets on a data set, counted exactly as `qconvert train` counts it.

The data goes through the training data pipeline (:mod:`qconvert.training.data`): every file format and
record shape that ``train`` reads, the same prompt rendering, the same EOS, and the same loss mask
(completions and assistant turns only, unless ``train_on_inputs``). The loss is the token-weighted
mean next-token cross-entropy over the labelled tokens (:func:`qconvert.training.loop.label_loss_sum`),
so the number equals the eval loss ``train`` reports for the same records, and a merged model scores
what the 4-bit base plus its adapter scored, up to the rounding of the merged weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, OptionError


def load_examples(data: str | os.PathLike, tok, *, fmt: str = "auto", max_length: int = 512,
                  train_on_inputs: bool = False, split: str | None = None, config: str | None = None,
                  truncation: str = "truncate", report=None) -> list:
    """Read and tokenize ``data`` the way ``qconvert train`` does; a list of training.data.Example.
    ``split``/``config`` pick a Hub dataset's (or a dataset folder's) split and configuration;
    ``truncation`` ("truncate" or "drop") treats records over ``max_length`` as train does, and
    ``report`` (a training.data.DataReport) counts what was truncated or dropped."""
    from ..training.data import build_examples, load_records

    if max_length < 2:
        raise OptionError(f"--max-length must be at least 2, got {max_length}")
    try:
        records = load_records(data, split=split, config=config, report=report)
    except UnicodeDecodeError as e:
        raise DataError(f"{data}: not UTF-8 text (invalid byte at offset {e.start})", hint="re-encode the file as UTF-8") from None
    return build_examples(records, tok, fmt, max_length, train_on_inputs, source=str(data), truncation=truncation, report=report)


def score(model, examples: list, pad_id: int, *, batch_size: int = 8) -> dict[str, Any]:
    """Mean loss over the labelled tokens of ``examples``, its exponential, and the counts."""
    import torch

    from ..training.data import IGNORE, collate
    from ..training.loop import label_loss_sum

    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            total += label_loss_sum(logits, b["labels"]).item()
            count += int((b["labels"][:, 1:] != IGNORE).sum())
    if count == 0:
        raise DataError("no token to score: every example has fewer than 2 tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "examples": len(examples)}


def evaluate(model: str | os.PathLike, data: str | os.PathLike, *, adapters: list[str] | None = None, compare: bool = False,
             fmt: str = "auto", max_length: int = 512, train_on_inputs: bool = False, batch_size: int = 8,
             backend: str = "auto", revision: str | None = None, dtype: str = "auto", device: str | None = None,
             data_split: str | None = None, data_config: str | None = None, truncation: str = "truncate") -> list[dict]:
    """Score MODEL, and MODEL with each adapter; one row each. With ``compare`` the bare model is scored
    first even when adapters are given (base vs base+adapter in one run, the base loaded once)."""
    from .inference import attach_adapter, load_for_inference

    adapters = list(adapters or [])
    if compare and not adapters:
        raise OptionError("--compare needs at least one --adapter", hint="eval MODEL --adapter DIR --compare")
    from ..io.hub import looks_like_repo_id

    if not Path(data).exists() and not looks_like_repo_id(str(data)):  # refused before the model is loaded
        raise DataError(f"{data}: no such file")
    from ..io.source import resolve_adapter_path

    folders = [resolve_adapter_path(a)[0] for a in adapters]  # folders or Hub ids, fetched before the model loads
    lm = load_for_inference(model, backend=backend, revision=revision, dtype=dtype, device=device)
    tok = lm.tokenizer
    from ..training.data import DataReport

    report = DataReport()
    examples = load_examples(data, tok, fmt=fmt, max_length=max_length, train_on_inputs=train_on_inputs,
                             split=data_split, config=data_config, truncation=truncation, report=report)
    if not examples:
        raise DataError(f"{data}: no record left to score ({report.n_dropped} dropped)", hint="raise --max-length or use --truncation truncate")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    row = {"model": str(model), "kind": lm.kind, "dtype": lm.dtype, "data": str(data), "scored": "all tokens" if train_on_inputs else "targets",
           "records": report.records, "truncated": report.truncated, "dropped": report.n_dropped}
    rows = []
    if compare or not adapters:
        rows.append({**row, "adapter": None, **score(lm.model, examples, pad, batch_size=batch_size)})
    for a, folder in zip(adapters, folders):
        attach_adapter(lm, folder)
        rows.append({**row, "adapter": str(a), **score(lm.model, examples, pad, batch_size=batch_size)})
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per scored model; the change against the bare model when it was scored too."""
    base = next((r for r in rows if r["adapter"] is None), None)
    names = [("base " if len(rows) > 1 else "") + r["model"] if r["adapter"] is None else f"+ adapter {r['adapter']}" for r in rows]
    w = max(len("model"), *map(len, names))
    head = f"{'model':<{w}}  {'examples':>8}  {'tokens':>8}  {'loss':>8}  {'perplexity':>11}"
    what = "every token" if rows[0]["scored"] == "all tokens" else "the tokens train learns (completions, assistant turns, texts)"
    lines = [f"data {rows[0]['data']}: {what} scored; {rows[0]['kind']} model computing in {rows[0]['dtype']}", head]
    for name, r in zip(names, rows):
        line = f"{name:<{w}}  {r['examples']:>8}  {r['tokens']:>8}  {r['loss']:>8.4f}  {r['perplexity']:>11.3f}"
        if base is not None and r is not base:
            line += f"  ({r['loss'] - base['loss']:+.4f} vs base)"
        lines.append(line)
    return "\n".join(lines)
