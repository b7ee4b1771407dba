"""`qconvert eval`: the loss a model gets on a data set, counted exactly as `qconvert train` counts it.

The data goes through the training data pipeline (:mod:`qconvert.training.data`): every file format and
record shape that ``train`` reads, the same prompt rendering, the same EOS, and the same loss mask
(completions and assistant turns only, unless ``train_on_inputs``). The loss is the token-weighted
mean next-token cross-entropy over the labelled tokens (:mod:`qconvert.training.score`, the scorer train's evaluation uses),
so the number equals the eval loss ``train`` reports for the same records, and a merged model scores
what the 4-bit base plus its adapter scored, up to the rounding of the merged weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, OptionError


@dataclass(frozen=True)
class EvalOptions:
    """Everything `qconvert eval` takes besides MODEL, DATA and the adapters, as one object. The data
    fields are train's own TrainConfig fields (qconvert.training.settings: names, defaults, ranges and
    choices), checked by train's checks (:meth:`check`), so eval refuses what train refuses with the
    same line; ``fmt`` may also be "raw" (prompt/completion records scored as written, not in an
    adapter's recorded prompt format). ``load_in_4bit`` / ``keep_quantized``: a 16-bit MODEL is
    quantized on the way in, as train does (convert/on_load.py)."""

    compare: bool = False
    fmt: str = "auto"
    max_length: int = 512
    train_on_inputs: bool = False
    truncation: str = "truncate"
    data_split: str | None = None
    data_config: str | None = None
    batch_size: int = 8
    backend: str = "auto"
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    load_in_4bit: bool = False
    keep_quantized: str | os.PathLike | None = None

    def check(self) -> EvalOptions:
        """OptionError for a value train's declarations refuse; the options themselves."""
        from ..training.settings import check_choices, check_options

        check_options({"max_length": self.max_length, "batch_size": self.batch_size}, command="eval")
        check_choices({"truncation": self.truncation, "fmt": None if self.fmt == "raw" else self.fmt, "backend": self.backend})
        return self


def load_examples(data: str | os.PathLike, tok, options: EvalOptions | None = None, report=None) -> list:
    """Read and tokenize ``data`` the way ``qconvert train`` does; a list of training.data.Example.
    ``options``' data fields apply: the split and configuration of a Hub dataset (or a dataset
    folder), the format, and records over ``max_length`` truncated or dropped as train does;
    ``report`` (a training.data.DataReport) counts what was truncated or dropped."""
    o = (options or EvalOptions()).check()
    return _tokenized(_records(data, o, report), data, tok, o, "auto" if o.fmt == "raw" else o.fmt, report)


def _records(data, o: EvalOptions, report) -> list:
    from ..training.data import load_records

    try:
        return load_records(data, split=o.data_split, config=o.data_config, report=report)
    except UnicodeDecodeError as e:
        raise DataError(f"{data}: not UTF-8 text (invalid byte at offset {e.start})", hint="re-encode the file as UTF-8") from None


def _tokenized(records: list, data, tok, o: EvalOptions, fmt: str, report) -> list:
    from ..training.data import build_examples

    return build_examples(records, tok, fmt, o.max_length, o.train_on_inputs, source=str(data), truncation=o.truncation, report=report)


def score(model, examples: list, pad_id: int, *, batch_size: int = 8) -> dict[str, Any]:
    """Mean loss over the labelled tokens of ``examples``, its exponential, and the counts: the scorer
    train's evaluation uses (:func:`qconvert.training.score.loss_sums`); no labelled token is refused."""
    from ..training.score import loss_sums
    from ..training.settings import check_options

    check_options({"batch_size": batch_size}, command="eval")
    device = next(model.parameters()).device
    total, count = loss_sums(model, examples, pad_id, batch_size, device)
    if count == 0:
        raise DataError("no token to score: every example has fewer than 2 tokens", hint="give records with longer texts or completions")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "examples": len(examples)}


def evaluate(model: str | os.PathLike, data: str | os.PathLike, options: EvalOptions | None = None, *,
             adapters: list[str] | None = None, log=None, **settings) -> list[dict]:
    """Score MODEL, and MODEL with each adapter; one row each. ``options`` (an :class:`EvalOptions`), or
    its fields as keywords (``batch_size=2``). With ``compare`` the bare model is scored first even
    when adapters are given (base vs base+adapter in one run, the base loaded once). ``fmt`` "auto":
    each adapter's recorded prompt format applies (:func:`prompt_formats`); "raw": records as
    detected, prompts as written. ``log`` gets the notices."""
    import contextlib
    import dataclasses

    from ..io.hub import looks_like_repo_id
    from ..io.source import resolve_adapter_path

    o = dataclasses.replace(options or EvalOptions(), **settings).check()
    adapters = list(adapters or [])
    if o.compare and not adapters:
        raise OptionError("--compare needs at least one --adapter", hint="eval MODEL --adapter DIR --compare")
    if not Path(data).exists() and not looks_like_repo_id(str(data)):  # refused before the model is loaded
        raise DataError(f"{data}: no such file", hint="give a .jsonl/.json/.parquet/.csv/.arrow/.txt file or a Hub dataset id org/name")
    folders = [resolve_adapter_path(a)[0] for a in adapters]  # folders or Hub ids, fetched before the model loads
    say = log or (lambda m: None)
    formats = prompt_formats(folders, o.fmt, say)
    with contextlib.ExitStack() as held:  # a 16-bit MODEL's temporary 4-bit copy lives as long as the scoring
        from ..convert.on_load import inference_base

        loaded, rev = inference_base(model, o.revision, o.load_in_4bit, o.keep_quantized, held, say)
        return _evaluate(model, loaded, data, list(zip(adapters, folders, formats)), dataclasses.replace(o, revision=rev))


def prompt_formats(folders: list, fmt: str, say) -> list[str]:
    """The prompt format each adapter is scored in, as generate prompts it: with ``fmt`` "auto" the
    adapter's recorded training format (train.data.PROMPT_FORMAT_FILE; "raw" when it has none),
    else "raw" (the records' own format, or the one ``fmt`` forces)."""
    from .generate import recorded_format

    out = []
    for folder in folders:
        pf = (recorded_format(folder) if fmt == "auto" else None) or "raw"
        if pf != "raw":
            say(f"prompt format: {pf}, the adapter {folder}'s training format: prompt/completion records are rendered in it "
                f"(--format raw scores them as written)")
        out.append(pf)
    return out


def as_prompt_format(records: list, pf: str) -> list:
    """``records`` ((line, record) pairs) with each {"prompt", "completion"} record in the prompt
    format ``pf``: "alpaca" makes the prompt the instruction (as ``generate --format alpaca``),
    "chat" a user turn answered by the completion; "raw" and records of other shapes (which carry
    their own format) are left as they are."""
    from ..training.data import detect

    if pf == "raw":
        return records
    out = []
    for n, rec in records:
        if detect(rec) == "prompt":
            rec = ({"instruction": rec["prompt"], "output": rec["completion"]} if pf == "alpaca" else
                   {"messages": [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]})
        out.append((n, rec))
    return out


def _evaluate(model, loaded: str, data, runs: list, o: EvalOptions) -> list[dict]:
    """``runs``: (adapter as given, its folder, its prompt format) each."""
    import copy

    from .inference import attach_adapter, load_for_inference
    from ..model.checks import check_positions, check_token_ids, position_limit
    from ..training.data import DataReport

    lm = load_for_inference(loaded, backend=o.backend, revision=o.revision, dtype=o.dtype, device=o.device)
    tok = lm.tokenizer
    report = DataReport()
    records = _records(data, o, report)
    built: dict[str, tuple[list, DataReport]] = {}

    def examples(pf: str):  # tokenized once per prompt format
        if pf not in built:
            rep = copy.deepcopy(report)  # what reading counted; tokenizing adds its own counts
            ex = _tokenized(as_prompt_format(records, pf), data, tok, o, "auto" if o.fmt == "raw" else o.fmt, rep)
            if not ex:
                raise DataError(f"{data}: no record left to score ({rep.n_dropped} dropped)", hint="raise --max-length or use --truncation truncate")
            check_token_ids([e.input_ids for e in ex], lm.model.get_input_embeddings(), tok, str(data))
            check_positions(max(len(e.input_ids) for e in ex), position_limit(lm.model), str(data),
                            hint="pass --max-length {limit} or lower (longer records are cut, or left out with --truncation drop)")
            built[pf] = ex, rep
        return built[pf]

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def row(adapter, pf: str) -> dict:
        ex, rep = examples(pf)
        return {"model": str(model), "kind": lm.kind, "dtype": lm.dtype, "data": str(data), "scored": "all tokens" if o.train_on_inputs else "targets",
                "records": rep.records, "truncated": rep.truncated, "dropped": rep.n_dropped, "adapter": adapter, "prompt_format": pf,
                **score(lm.model, ex, pad, batch_size=o.batch_size)}

    rows = []
    if o.compare or not runs:  # the bare model in the first adapter's prompt format: the same tokens, base vs adapter
        rows.append(row(None, runs[0][2] if runs else "raw"))
    for a, folder, pf in runs:
        attach_adapter(lm, folder)
        rows.append(row(str(a), pf))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per scored model; the change against the bare model when it was scored too."""
    base = next((r for r in rows if r["adapter"] is None), None)
    names = [("base " if len(rows) > 1 else "") + r["model"] if r["adapter"] is None else f"+ adapter {r['adapter']}" for r in rows]
    names = [n + (f" [{r['prompt_format']} prompts]" if r.get("prompt_format", "raw") != "raw" else "") for n, r in zip(names, rows)]
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
