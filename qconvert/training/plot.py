"""OUTPUT/loss.png: training and evaluation loss against step, the learning rate on a second axis.

Drawn from metrics.jsonl with matplotlib's Agg backend (imported here, only when a plot is made).
The series actually drawn are read back from the figure's lines and stored, as JSON, in the PNG's
``qconvert:series`` text chunk, so a test (or a user) can check what the picture shows against the
metrics without reading pixels (:func:`read_png_series`).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

SERIES_KEY = "qconvert:series"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: a metrics.jsonl row is about 150 bytes
MAX_METRICS_LINE = 2**16
#: the numeric columns the plot draws
PLOTTED = ("loss", "eval_loss", "lr")


def read_metrics(path: Path, *, strict: bool = True) -> list[dict]:
    """The rows of metrics.jsonl, read line by line (each at most :data:`MAX_METRICS_LINE` bytes). A
    damaged line (a hand edit; a run killed while writing it) is a DataError naming it, or with
    ``strict=False`` skipped (the plot; a resume cuts the log back first: outdir.truncate_metrics)."""
    from ..errors import DataError

    rows: list[dict] = []
    for where, line in metrics_lines(path):
        try:
            rows.append(metrics_row(line, where))
        except DataError:
            if strict:
                raise
    return rows


def metrics_lines(path: Path):
    """(``path:N``, line) for each non-blank line of metrics.jsonl, each read within
    :data:`MAX_METRICS_LINE` + 1 bytes (a longer line is refused by :func:`_metrics_row`)."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_METRICS_LINE + 1), b""), 1):
            if line.strip():
                yield f"{path}:{n}", line


def metrics_row(line: bytes, where: str) -> dict:
    from ..errors import DataError

    hint = "remove or repair that line of metrics.jsonl (a run killed while writing it?), then run again"
    if len(line) > MAX_METRICS_LINE:
        raise DataError(f"{where}: a line over {MAX_METRICS_LINE} bytes, not a metrics row", hint=hint)
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(f"{where}: not a metrics row (not valid JSON)", hint=hint) from None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(row, dict) or not number(row.get("step")) or any(k in row and not number(row[k]) for k in PLOTTED):
        raise DataError(f"{where}: not a metrics row (a JSON object with a numeric step, loss, eval_loss, lr)", hint=hint)
    return row


def loss_figure(rows: list[dict]):
    """The figure for metrics rows; its lines carry labels "train loss", "eval loss" and "learning rate"."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if ev:
        ax.plot(*zip(*ev), label="eval loss", color="tab:orange", marker="o", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), label="learning rate", color="tab:green", linestyle="--", linewidth=1)
        ax2.set_ylabel("learning rate")
        ax2.set_ylim(bottom=0)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    ax.set_title("qconvert train")
    fig.tight_layout()
    return fig


def figure_series(fig) -> dict[str, dict[str, list[float]]]:
    """{label: {"x": [...], "y": [...]}} of every line drawn in the figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out[line.get_label()] = {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
    return out


def write_loss_plot(metrics_path: Path, png_path: Path) -> dict:
    """Draw metrics.jsonl into png_path (written to a temporary name, then renamed); returns the series."""
    fig = loss_figure(read_metrics(metrics_path, strict=False))  # a line a killed run left half-written is not drawn
    series = figure_series(fig)
    from ..io.writes import write_file

    write_file(png_path, lambda f: fig.savefig(f, format="png", metadata={SERIES_KEY: json.dumps(series)}))
    return series


def read_png_series(path: Path) -> dict:
    """The series stored in a loss.png, read with nothing but the PNG chunk layout (and CRC-checked)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            key, _, rest = body.partition(b"\0")
            if key.decode("latin-1") == SERIES_KEY:
                if kind == b"tEXt":
                    return json.loads(rest.decode("latin-1"))
                if kind == b"zTXt":
                    return json.loads(zlib.decompress(rest[1:]).decode("latin-1"))
                flag, _method, rest = rest[0], rest[1], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                return json.loads((zlib.decompress(text) if flag else text).decode("utf-8"))
        pos += 12 + length
    raise ValueError(f"{path}: no {SERIES_KEY} chunk")
