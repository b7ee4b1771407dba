"""CLI commands that run a 4-bit model: `qconvert generate` and `qconvert eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .cli import register
from .errors import DataError

BACKENDS = click.Choice(["auto", "reference", "triton", "bitsandbytes"])


def _load(model: str, backend: str, revision: str | None):
    from transformers import AutoTokenizer

    from .loader import load_model, resolve_model_path

    m = load_model(model, backend=backend, revision=revision)
    root, _ = resolve_model_path(model, revision)
    try:
        tok = AutoTokenizer.from_pretrained(root)
    except Exception as e:  # transformers raises several types for a missing or broken tokenizer
        raise DataError(f"{root}: no usable tokenizer ({type(e).__name__})", hint="copy the tokenizer files into the model folder") from None
    return m, tok


@register
@click.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
@click.option("--revision", help="Branch, tag or commit of a Hub repo.")
def generate(model, prompt, max_new_tokens, backend, revision):
    """Continue PROMPT greedily with a 4-bit MODEL (folder or Hub id) on qconvert's kernels."""
    import torch

    m, tok = _load(model, backend, revision)
    ids = tok(prompt, return_tensors="pt").to(m.device)
    with torch.no_grad():
        out = m.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    click.echo(tok.decode(out[0], skip_special_tokens=True))


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{i}: expected an object with a \"text\" string")
            out.append(rec["text"])
        texts = out
    else:
        texts = [t for t in text.split("\n\n") if t.strip()]
    if not texts:
        raise DataError(f"{path}: holds no text")
    return texts


def perplexity(model, tok, texts: list[str], max_length: int = 512) -> dict:
    """Token-weighted mean negative log-likelihood over the texts, and its exponential."""
    import torch

    nll = 0.0
    count = 0
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(model.device)
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.float().item()
        n = ids.shape[1] - 1
        nll += loss * n
        count += n
    if count == 0:
        raise DataError("no text is long enough to score (at least 2 tokens each)")
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count, "texts": len(texts)}


@register
@click.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A .txt file (texts split on blank lines) or .jsonl with a \"text\" field.")
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--backend", type=BACKENDS, default="auto", show_default=True)
@click.option("--revision", help="Branch, tag or commit of a Hub repo.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(model, data, max_length, backend, revision, as_json):
    """Perplexity of a 4-bit MODEL on a text or JSONL file."""
    texts = read_texts(data)
    m, tok = _load(model, backend, revision)
    r = perplexity(m, tok, texts, max_length)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{r['texts']} texts, {r['tokens']} tokens: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}")
