"""Training data: records in the formats people have, read from files or the Hub, tokenized with
loss masks, with every dropped or truncated record counted.

Sources (:func:`load_records`): local ``.jsonl`` / ``.json`` (read here, with line numbers in every
message), ``.parquet``, ``.csv``, ``.tsv``, ``.arrow`` and ``.txt`` files and dataset folders through
the ``datasets`` library, and Hub dataset ids (``org/name``, ``--data-split``, ``--data-config``),
downloaded through :func:`qconvert.io.hub.fetch_snapshot` into the Hugging Face cache (HF_ENDPOINT,
HF_TOKEN and HF_HUB_OFFLINE apply) and then read by ``datasets`` exactly as a local folder.

Splits: a Hub dataset or a folder has named splits (from its card's YAML or its file names: a
``valid``/``val``/``dev`` file is the "validation" split). Training reads "train" unless
``--data-split`` names another. Evaluation (``load_records(..., evaluation=True)``, for
``--eval-data``) reads the split ``--eval-data-split`` names, else the first of :data:`EVAL_SPLITS`
the source has; a source with neither is refused, never read as its training split.

Formats (``--format auto`` detects per record from its keys):
- ``text``: {"text"}; loss on every token.
- ``alpaca``: {"instruction", "input"?, "output"}: rendered as a "### Instruction / ### Input /
  ### Response" prompt; loss on the output only.
- ``prompt``: {"prompt", "completion"}; loss on the completion only.
- ``chat``: {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template;
  loss on assistant turns only (found by character spans and the tokenizer's offset mapping).
- ``sharegpt``: {"conversations": [{"from", "value"}, ...]} with from = system / human / gpt
  (also user / assistant): mapped to chat messages, then as ``chat``.
``train_on_inputs`` puts the loss on every token. EOS is appended (to the text, the output, the
completion; chat templates end turns themselves). Labels of -100 are ignored by the loss.

Length (``truncation``): a record longer than ``max_length`` tokens is cut to its first
``max_length`` tokens ("truncate", the default) or left out ("drop"). A truncated record loses its
tail and with it its EOS: the model is not taught to stop where the cut fell. Both are counted in the
:class:`DataReport`. A record whose prompt alone fills ``max_length`` has nothing left to learn and is
always dropped. Before tokenizing, a record over :func:`record_bound` characters is cut to it (a
text record that "truncate" cuts anyway) or left out, counted as "over the size bound": records are
tokenized whole, and a 12 KB parquet file can hold a 120 MB string.

Confinement: a folder's or Hub dataset's files (as its card's ``data_files`` name them) must lie
inside it, links resolved; CSV/parquet files have at most :data:`MAX_COLUMNS` columns. Chat
templates render within bounds (:mod:`.templates`); one that raises for a record drops that record,
counted as "chat template refused".

Bad records (invalid JSON, unknown shape, missing key, not UTF-8...): with ``strict`` (the default
of these functions, and ``--strict-data`` of the CLI) the first one raises :class:`DataError`;
otherwise each is left out and counted, and the run goes on with the others.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, OptionError
from ..io.readers import parse_json, read_json
from .templates import TemplateRefused, render

FORMATS = ("auto", "text", "alpaca", "prompt", "chat", "sharegpt")
TRUNCATION = ("truncate", "drop")
IGNORE = -100
#: Local file types read through the ``datasets`` library, by suffix -> its builder.
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
#: Files fetched from a Hub dataset repo (the data, and the card whose YAML names configs and splits).
HUB_PATTERNS = ["*.parquet", "*.csv", "*.tsv", "*.json", "*.jsonl", "*.ndjson", "*.arrow", "*.txt", "README.md", "*.yaml"]
#: The splits evaluation reads from a Hub dataset or folder when none is named: the first one it has.
EVAL_SPLITS = ("validation", "test")
#: characters a record may hold per --max-length token before tokenizing (about 4 per token in
#: English; 64 leaves room for any script), and never fewer than MIN_RECORD_CHARS
CHARS_PER_TOKEN = 64
MIN_RECORD_CHARS = 2**20
#: columns a CSV/TSV or parquet data file may have (a record format uses a handful)
MAX_COLUMNS = 10_000
MAX_HEADER_BYTES = 2**20
_COLUMNS_HINT = "training records use a few columns (text, or prompt/completion, or messages...); check the file"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "tool": "tool"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What reading and tokenizing made of a source: counts the start summary prints."""

    source: str = "data"
    split: str | None = None  # the split read, for a Hub dataset or a folder
    records: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    first_hint: str | None = None  # how to fix the first dropped record, for the error when none is left

    def drop(self, reason: str, message: str, hint: str | None = None) -> None:
        self.dropped[reason] += 1
        if len(self.problems) < 3:
            self.problems.append(message)
        if self.n_dropped == 1:
            self.first_hint = hint

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def first_problem(self, width: int = 120) -> str:
        """The first bad record's message, with the source shortened to its file name."""
        if not self.problems:
            return ""
        return self.problems[0].replace(self.source, Path(self.source).name)[:width]


def _bad(strict: bool, report: DataReport | None, reason: str, message: str, hint: str | None = None) -> None:
    """A bad record: raise when strict, else count it and go on."""
    if strict or report is None:
        raise DataError(message, hint=hint)
    report.drop(reason, message, hint)


def load_records(path: str | Path, *, split: str | None = None, config: str | None = None, revision: str | None = None,
                 strict: bool = True, report: DataReport | None = None, evaluation: bool = False) -> list[tuple[int, dict]]:
    """(record number, record) pairs from a local file or folder, or a Hub dataset id; numbers are
    line numbers for .jsonl and 1-based row numbers elsewhere. ``split`` names the split of a Hub
    dataset or folder; without it "train" is read, or with ``evaluation`` the first of
    :data:`EVAL_SPLITS` the source has (the split read is ``report.split``). Clear errors, see the
    module docstring."""
    if not isinstance(path, (str, os.PathLike)):  # records given as objects (the training API)
        return _given_records(path, split, strict, report)
    p = Path(path)
    flag = "--eval-data-split" if evaluation else "--data-split"
    if report is not None:
        report.source = str(path)
    dropped_before = report.n_dropped if report is not None else 0
    if not p.exists():
        if HUB_ID.match(str(path)) and p.suffix.lower() not in (*JSON_SUFFIXES, *DATASETS_BUILDERS):
            snapshot = _hub_folder(str(path), revision)  # links into the repo's blobs/, two levels up
            records = _split_records(snapshot, str(path), split, config, evaluation, report, link_root=str(Path(snapshot).parents[1]))
        else:
            raise DataError(f"{p}: no such file", hint="give a .jsonl/.json/.parquet/.csv/.arrow/.txt file or a Hub dataset id org/name")
    elif p.is_dir():
        records = _split_records(str(p), str(p), split, config, evaluation, report)
    elif not p.is_file():  # opening a FIFO blocks until someone writes to it; a device never ends
        raise DataError(f"{p}: not a regular file or folder (a FIFO or device)", hint="give a data file or folder")
    elif split not in (None, "train"):
        raise DataError(f"{p}: {flag} {split!r} applies to Hub datasets and folders, not to one file",
                        hint=f"leave out {flag}: the whole file is read")
    elif p.suffix.lower() in JSON_SUFFIXES:
        records = _json_records(p, strict, report)
    elif p.suffix.lower() in DATASETS_BUILDERS:
        check_columns(p, str(p))
        _refuse_no_rows(p)
        records = _datasets_records(DATASETS_BUILDERS[p.suffix.lower()], str(p), data_files=str(p))
    else:
        raise DataError(f"{p}: unknown data file type {p.suffix or '(no suffix)'!r}",
                        hint="use .jsonl, .json, .parquet, .csv, .tsv, .arrow or .txt")
    if report is not None:  # every row read, the ones left out here included
        report.records += len(records) + report.n_dropped - dropped_before
    if not records and not (report and report.n_dropped):
        raise DataError(f"{p}: holds no records", hint=RECORDS_HINT.get(p.suffix.lower(), RECORDS_HINT[".jsonl"]))
    return records


def data_label(data) -> str:
    """How messages name the data: its path or Hub id, or what the records given as objects are."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    kind = "datasets.Dataset" if type(data).__module__.split(".")[0] == "datasets" else type(data).__name__
    n = len(data) if hasattr(data, "__len__") else "?"
    return f"data ({kind} of {n} records)"


def _given_records(data, split: str | None, strict: bool, report: DataReport | None) -> list[tuple[int, dict]]:
    """(record number, record) pairs of records given as objects, as SFTTrainer takes them: a
    ``datasets.Dataset`` (its rows, None values as absent keys, as for files read through datasets)
    or a list or tuple of dicts (anything else in it is refused or counted, as a JSON file's
    non-object). The same checks and bounds follow (build_examples) as for records read from files."""
    shown = data_label(data)
    if report is not None:
        report.source = shown
    if split is not None:
        raise DataError(f"{shown}: --data-split applies to Hub datasets and folders", hint="pass the split itself, e.g. ds['train']")
    if type(data).__module__.split(".")[0] == "datasets":
        if not hasattr(data, "to_list"):  # a DatasetDict or an IterableDataset
            raise DataError(f"{shown}: a {type(data).__name__} is not one split of records",
                            hint="pass one split, e.g. dataset['train'] (a datasets.Dataset)")
        pairs = [(i + 1, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(data.to_list())]
    elif isinstance(data, (list, tuple)):
        pairs = list(enumerate(data, 1))
    else:
        raise DataError(f"{shown}: data must be a path, a Hub dataset id, a datasets.Dataset or a list of records (dicts)")
    records = _objects(pairs, strict, report, lambda n, r: f"{shown}: record {n}: expected a dict, got {type(r).__name__}")
    if report is not None:
        report.records += len(pairs)
    if not records and not (report and report.n_dropped):
        raise DataError(f"{shown}: holds no records", hint="pass at least one record")
    return records


def _json_records(p: Path, strict: bool, report: DataReport | None) -> list[tuple[int, dict]]:
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: the file is empty", hint="give one JSON object per line")
    if raw.lstrip().startswith(b"["):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", hint="re-save the file as UTF-8") from None
        data = parse_json(text, str(p), DataError,  # names unique, nesting bounded (io.readers)
                          hint="a .json file holds one array of records; or write one per line (.jsonl)")
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON array of records, got {type(data).__name__}", hint='e.g. [{"text": "..."}, {"text": "..."}]')
        pairs, where = [(i + 1, r) for i, r in enumerate(data)], "record"
    else:
        pairs, where = [], "line"
        for i, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                pairs.append((i, parse_json(line.decode("utf-8-sig" if i == 1 else "utf-8"), f"{p}:{i}", DataError, lineno=False)))
            except UnicodeDecodeError as e:
                _bad(strict, report, "not UTF-8", f"{p}:{i}: not UTF-8 text (byte 0x{line[e.start]:02x})", hint="re-save the file as UTF-8")
            except DataError as e:  # not JSON, nested too deep, or a name given twice
                _bad(strict, report, "not valid JSON", str(e), hint=e.hint or "each line must be one JSON object")
    return _objects(pairs, strict, report, lambda n, r: f"{p}: {where} {n}: expected a JSON object, got {type(r).__name__}")


def _objects(pairs, strict: bool, report: DataReport | None, message) -> list[tuple[int, dict]]:
    """The records of ``pairs`` that are objects (dicts); each other one is dropped and counted, or
    refused with --strict-data (:func:`_bad`), with ``message(n, record)``."""
    records = []
    for n, r in pairs:
        if isinstance(r, dict):
            records.append((n, r))
        else:
            _bad(strict, report, "not an object", message(n, r))
    return records


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures reach the user as our one line
    return datasets


def _datasets_records(path: str, shown: str, *, data_files: str | None = None, split: str | None = None,
                      config: str | None = None) -> list[tuple[int, dict]]:
    """Rows read by ``datasets.load_dataset``, into a throw-away cache (the user's HF cache is not
    filled with copies of local files); None values are treated as absent keys."""
    import tempfile

    datasets = _quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="qconvert-data-") as cache:
        try:
            ds = datasets.load_dataset(path, name=config, data_files=data_files, split=split or "train", cache_dir=cache,
                                       keep_in_memory=True)
            rows = ds.to_list()
        except (ValueError, KeyError, TypeError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__, UnicodeDecodeError):
                raise DataError(f"{shown}: not UTF-8 text", hint="re-save the file as UTF-8") from None
            detail = " ".join(str(e).split())[:120]
            raise DataError(f"{shown}: cannot read the data (split {split or 'train'!r}, config {config!r})",
                            hint=f"{type(e).__name__}: {detail}") from None
    text_lines = path == "text"  # a .txt file: one record per line, blank lines are separators
    return [(i + 1, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(rows)
            if not (text_lines and not str(row.get("text", "")).strip())]


def _hub_folder(repo_id: str, revision: str | None) -> str:
    """A Hub dataset's data files, downloaded through qconvert's checked path
    (:func:`qconvert.io.hub.fetch_snapshot`): the snapshot folder in the Hugging Face cache."""
    from ..io.hub import fetch_snapshot

    return str(fetch_snapshot(repo_id, revision, HUB_PATTERNS, repo_type="dataset"))


def _split_records(folder: str, shown: str, split: str | None, config: str | None, evaluation: bool,
                   report: DataReport | None, link_root: str | None = None) -> list[tuple[int, dict]]:
    """The records of one split of a dataset folder (a Hub dataset's download, or the user's): its
    files checked first (:func:`_check_data_files`)."""
    files = _data_files(folder, shown, config)
    _check_data_files(files, folder, shown, link_root or folder)
    if split is None:
        split = _eval_split(list(files), shown) if evaluation else "train"
    if report is not None:
        report.split = split
    return _datasets_records(folder, shown, split=split, config=config)


def _data_files(folder: str, shown: str, config: str | None) -> dict[str, list[str]]:
    """{split: [file, ...]} as ``datasets`` resolves a folder's card and file names, nothing read."""
    import tempfile

    datasets = _quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="qconvert-data-") as cache:
        try:
            files = datasets.load_dataset_builder(folder, name=config, cache_dir=cache).config.data_files
        except (ValueError, KeyError, TypeError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            detail = " ".join(str(e).split())[:120]
            raise DataError(f"{shown}: cannot read the data (config {config!r})", hint=f"{type(e).__name__}: {detail}") from None
    return {str(s): [str(f) for f in paths] for s, paths in (files or {}).items()}


def _check_data_files(files: dict[str, list[str]], folder: str, shown: str, link_root: str) -> None:
    """Every data file of a dataset folder lies inside it, by name (no ``../``, absolute path or URL
    from a card's ``data_files``) and once links are resolved (inside ``link_root``: the folder, or
    for a Hub download the repo's cache folder that holds the blobs its snapshot links to); and each
    has a bounded number of columns (:func:`check_columns`)."""
    import os

    lex_root, real_root = os.path.abspath(folder), os.path.realpath(link_root)
    for split, paths in files.items():
        for f in paths:
            lex, real = os.path.normpath(os.path.abspath(f)), os.path.realpath(f)
            if "://" in f or not _inside(lex, lex_root) or not _inside(real, real_root):
                raise DataError(f"{shown}: split {split!r} names the file {f!r}, outside the dataset",
                                hint="a dataset's files must lie inside its folder or Hub repo (no ../, absolute path or link out)")
            check_columns(Path(f), shown)


def _inside(path: str, root: str) -> bool:
    import os

    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


#: how records are laid out, by file type: the hint when a file holds none
RECORDS_HINT = {".jsonl": "add records: one JSON object per line", ".json": 'add records: [{"text": "..."}, ...]',
                ".csv": "add records: a header line (e.g. text, or prompt,completion), then one record per line",
                ".tsv": "add records: a header line (e.g. text, or prompt<TAB>completion), then one record per line",
                ".txt": "add records: one text per line"}


def _refuse_no_rows(path: Path) -> None:
    """An empty file, or a CSV/TSV with a header line only: one line saying so, where ``datasets``
    fails with a message about splits or dataset generation."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    suffix = path.suffix.lower()
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if not lines or (suffix in (".csv", ".tsv") and len(lines) == 1 and len(head) < MAX_HEADER_BYTES):
        what = "holds no records (only a header line)" if lines else "holds no records (the file is empty or blank)"
        raise DataError(f"{path}: {what}", hint=RECORDS_HINT.get(suffix, "add records"))


def check_columns(path: Path, shown: str) -> None:
    """Refuse a CSV/TSV or parquet file with more than :data:`MAX_COLUMNS` columns before ``datasets``
    reads it (a 200,000-column CSV keeps its reader busy for minutes); a CSV header is counted in
    its first :data:`MAX_HEADER_BYTES` bytes."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES)
        line = head.split(b"\n", 1)[0]
        if len(line) == MAX_HEADER_BYTES:
            raise DataError(f"{shown}: {path.name}: the header line is over {MAX_HEADER_BYTES} bytes", hint=_COLUMNS_HINT)
        n = line.count(b"\t" if suffix == ".tsv" else b",") + 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            n = len(pq.read_schema(path).names)
        except (OSError, ValueError):
            return  # ``datasets`` names what is wrong with it
    else:
        return
    if n > MAX_COLUMNS:
        raise DataError(f"{shown}: {path.name} has {n} columns, over the {MAX_COLUMNS} qconvert reads", hint=_COLUMNS_HINT)


def _eval_split(have: list[str], shown: str) -> str:
    """The first of EVAL_SPLITS the dataset has; refused when it has none (its train split is never
    taken for evaluation in silence)."""
    for name in EVAL_SPLITS:
        if name in have:
            return name
    raise DataError(f"{shown}: no {' or '.join(map(repr, EVAL_SPLITS))} split to evaluate on (its splits: {', '.join(have) or 'none'})",
                    hint="name one with --eval-data-split, or hold out a fraction of --data with --eval-split (e.g. 0.1)")


def alpaca_prompt(instruction: Any, input: Any = None) -> str:
    """The prompt train renders for an alpaca record (its output and EOS follow): qconvert's own
    headers, without the Stanford preamble ("Below is an instruction..."). ``generate --format
    alpaca`` renders an instruction with this same function."""
    prompt = f"### Instruction:\n{instruction}\n\n"
    if input:
        prompt += f"### Input:\n{input}\n\n"
    return prompt + "### Response:\n"


#: the adapter file that records the prompt format an adapter was trained on
PROMPT_FORMAT_FILE = "qconvert_prompt_format.json"


def prompt_format(formats: dict[str, int]) -> dict[str, Any]:
    """What an adapter's PROMPT_FORMAT_FILE says: the record formats trained on ({format: count}),
    and, when all were one format, that ``format`` and how its prompt is rendered."""
    out: dict[str, Any] = {"formats": dict(sorted(formats.items())), "format": None}
    if len(formats) == 1:
        (f,) = formats
        out["format"] = f
        out["prompt"] = {"alpaca": alpaca_prompt("{instruction}", "{input}"), "prompt": "{prompt}", "text": "{text}"}.get(
            f, "the tokenizer's chat template, assistant turn opened")
        if f == "alpaca":
            out["prompt_without_input"] = alpaca_prompt("{instruction}")
    return out


def read_prompt_format(folder) -> dict | None:
    """An adapter folder's PROMPT_FORMAT_FILE (None when it has none: an adapter from elsewhere);
    a file that is not one such record is refused (DataError)."""
    from ..io.links import refuse_outside

    p = Path(folder) / PROMPT_FORMAT_FILE
    if not p.is_file():
        return None
    refuse_outside(p, Path(folder), "adapter")  # export-adapter copies it
    fmt = read_json(p, "a prompt format record", DataError, limit=1 << 16)  # bounded size and nesting, names unique
    try:
        counts = fmt.get("formats") if isinstance(fmt, dict) else None
        if not isinstance(counts, dict) or not all(k in FORMATS and type(v) is int for k, v in counts.items()):
            raise ValueError("no 'formats' of {format: count}")
        if fmt.get("format") != prompt_format(counts)["format"]:
            raise ValueError("its 'format' disagrees with its 'formats'")
    except ValueError as e:
        raise DataError(f"{p}: not a prompt format record ({e})"[:190], hint="remove it, or give generate --format raw, alpaca or chat") from None
    return fmt


def prompt_format_text(fmt: dict) -> str:
    """The card's paragraph on the prompt format trained on (as recorded in PROMPT_FORMAT_FILE)."""
    if fmt.get("format") is None:
        return f"\nTrained on records of several formats ({', '.join(fmt.get('formats') or {})}); see {PROMPT_FORMAT_FILE}.\n"
    text = f"\nPrompt format: `{fmt['format']}` (recorded in {PROMPT_FORMAT_FILE}; `qconvert generate --adapter` applies it)."
    if fmt["format"] == "alpaca":
        text += f" Prompt it as it was trained, the answer follows:\n\n```\n{fmt['prompt_without_input']}```\n\nwith an input:\n\n```\n{fmt['prompt']}```"
    return text + "\n"


def detect(rec: dict) -> str | None:
    if isinstance(rec.get("messages"), list):
        return "chat"
    if isinstance(rec.get("conversations"), list):
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt"
    if isinstance(rec.get("text"), str):
        return "text"
    return None


def sharegpt_messages(conversations: list) -> list[dict]:
    """ShareGPT turns ({"from": "human" | "gpt" | "system", "value"}) as chat messages."""
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _RecordError(f"turn {i + 1} needs a string 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise _RecordError(f"turn {i + 1}: unknown speaker {turn.get('from')!r} (expected human, gpt or system)")
        out.append({"role": role, "content": turn["value"]})
    return out


class _RecordError(Exception):
    """One record cannot be used (the caller adds where it is)."""


def _pair(tok, prompt: str, completion: str, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + c, (p if train_on_inputs else [IGNORE] * len(p)) + c


def _chat(tok, messages: list, train_on_inputs: bool, max_chars: int) -> tuple[list[int], list[int]]:
    if not getattr(tok, "chat_template", None):
        raise DataError("chat records need a tokenizer with a chat template", hint="use text/prompt records, or add a chat_template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _RecordError(f"message {i + 1} needs string 'role' and 'content'")
    full = render(tok, messages, max_chars)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = len(render(tok, messages[:i], max_chars, add_generation_prompt=True)) if i else 0
            end = len(render(tok, messages[: i + 1], max_chars))
            spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        return ids, list(ids)
    labels = [t if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE for t, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _tokenize(rec: dict, f: str, tok, train_on_inputs: bool, max_chars: int) -> tuple[list[int], list[int]]:
    if f == "text":
        if not isinstance(rec["text"], str):
            raise _RecordError("'text' must be a string")
        ids = tok(rec["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        return ids, list(ids)
    if f == "alpaca":
        return _pair(tok, alpaca_prompt(rec["instruction"], rec.get("input")), str(rec["output"]), train_on_inputs)
    if f == "prompt":
        return _pair(tok, str(rec["prompt"]), str(rec["completion"]), train_on_inputs)
    if f == "sharegpt":
        if not isinstance(rec["conversations"], list):
            raise _RecordError("'conversations' must be a list of turns")
        return _chat(tok, sharegpt_messages(rec["conversations"]), train_on_inputs, max_chars)
    if not isinstance(rec["messages"], list):
        raise _RecordError("'messages' must be a list")
    return _chat(tok, rec["messages"], train_on_inputs, max_chars)


def record_bound(max_length: int) -> int:
    """Characters a record may hold before it is tokenized: records are tokenized whole, and a
    12 KB parquet file can hold a 120 MB string (several GB once tokenized)."""
    return max(MIN_RECORD_CHARS, CHARS_PER_TOKEN * max_length)


#: the keys of a record each format tokenizes (other columns are never tokenized, nor counted)
FORMAT_KEYS = {"text": ("text",), "alpaca": ("instruction", "input", "output"), "prompt": ("prompt", "completion"),
               "chat": ("messages",), "sharegpt": ("conversations",)}


def _chars(value) -> int:
    """Characters in the strings of a record (its keys and values, nested lists and dicts), counted
    without recursion."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n


def _bounded(rec: dict, f: str, max_length: int, truncation: str) -> tuple[dict | None, int]:
    """(record, 0) when it is within :func:`record_bound`; over it, a text record that will be
    truncated anyway is cut to the bound before tokenizing ((cut record, its length)), and any other
    is left out ((None, its length)): the caller counts it."""
    bound = record_bound(max_length)
    text = rec.get("text") if f == "text" else None
    n = len(text) if isinstance(text, str) else _chars([rec.get(k) for k in FORMAT_KEYS.get(f, ())])
    if n <= bound:
        return rec, 0
    if isinstance(text, str) and truncation == "truncate":
        return dict(rec, text=text[:bound]), n
    return None, n


def check_token_ids(examples: list[Example], embeddings, tok, source: str) -> None:
    """Every token id has a row in the model's input embeddings (:func:`qconvert.model.checks.check_token_ids`)."""
    from ..model.checks import check_token_ids as check

    check([e.input_ids for e in examples], embeddings, tok, source)


def build_examples(records, tok, fmt: str = "auto", max_length: int = 512, train_on_inputs: bool = False, source: str = "data",
                   *, truncation: str = "truncate", strict: bool = True, report: DataReport | None = None) -> list[Example]:
    """Tokenized examples with loss masks. See the module docstring for ``truncation`` and ``strict``;
    ``report`` (filled in place) counts formats, drops and truncations."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown --format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if truncation not in TRUNCATION:
        raise OptionError(f"unknown --truncation {truncation!r}", hint=f"use one of {', '.join(TRUNCATION)}")
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token", hint="set eos_token in tokenizer_config.json")
    out = []
    for n, rec in records:
        f = detect(rec) if fmt == "auto" else fmt
        where = f"{source}:{n}"
        if f is None:
            _bad(strict, report, "unknown shape", f"{where}: record with keys {sorted(rec)[:8]} is of no known shape",
                 hint='use {"text"}, {"instruction","input","output"}, {"prompt","completion"}, {"messages"} or {"conversations"}')
            continue
        rec, over = _bounded(rec, f, max_length, truncation)
        if rec is None:
            if report is not None:
                report.drop("over the size bound", f"{where}: {over} characters, over {record_bound(max_length)} (--max-length x {CHARS_PER_TOKEN})")
            continue
        try:
            ids, labels = _tokenize(rec, f, tok, train_on_inputs, 4 * record_bound(max_length))
        except KeyError as e:
            _bad(strict, report, "missing key", f"{where}: a {f} record needs the key {e.args[0]!r}")
            continue
        except TemplateRefused as e:
            _bad(strict, report, "chat template refused", f"{where}: the chat template refuses this record ({e})")
            continue
        except _RecordError as e:
            _bad(strict, report, "malformed", f"{where}: {e}")
            continue
        first = next((i for i, l in enumerate(labels) if l != IGNORE), None)
        if first is None:
            _bad(strict, report, "nothing to learn", f"{where}: no token to learn from (empty completion?)")
            continue
        if first >= max_length:
            _bad(strict, report, "prompt fills --max-length", f"{where}: --max-length {max_length} is shorter than the prompt ({first} tokens)",
                 hint="raise --max-length")
            continue
        if over and len(ids) <= max_length:  # the cut text fell short: its first tokens are not known
            if report is not None:
                report.drop("over the size bound", f"{where}: {over} characters, over {record_bound(max_length)}")
            continue
        if len(ids) > max_length:
            if truncation == "drop":
                if report is not None:
                    report.drop("longer than --max-length", f"{where}: {len(ids)} tokens, over --max-length {max_length}")
                continue
            if report is not None:
                report.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if report is not None:
            report.formats[f] += 1
        out.append(Example(ids, labels))
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
