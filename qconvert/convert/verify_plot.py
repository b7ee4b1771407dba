"""Pictures of a verify report: the quantization error of each 4-bit weight by layer and module type.

matplotlib is imported only here, when a picture is asked for, and drawn through its Agg canvas on a
Figure of our own (pyplot and its global backend are never touched). :func:`plot_quantization_error`
returns what it drew, read back from the axes, so a test can compare the picture's numbers with the
report's without looking at pixels.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import OptionError, OutputExistsError

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+?)(?:\.weight)?$")


def layer_and_module(name: str) -> tuple[int | None, str]:
    """(layer index, module type) of a tensor name: model.layers.3.self_attn.q_proj.weight -> (3, self_attn.q_proj);
    a tensor outside the numbered blocks (pooler.dense.weight) -> (None, pooler.dense)."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(2)), m.group(3)
    return None, name.removesuffix(".weight")


def plot_data(error: dict[str, Any]) -> dict[str, Any]:
    """Series to draw from a verify report's ``error`` section: per module type, (layer, SQNR dB) points."""
    series: dict[str, list[dict[str, Any]]] = {}
    other: list[dict[str, Any]] = []
    exact: list[str] = []
    for t in error["tensors"]:
        if not math.isfinite(t["sqnr_db"]):
            exact.append(t["name"])  # no error at all: nothing to draw on a dB scale
            continue
        layer, module = layer_and_module(t["name"])
        point = {"name": t["name"], "layer": layer, "sqnr_db": t["sqnr_db"]}
        (series.setdefault(module, []) if layer is not None else other).append(point)
    for pts in series.values():
        pts.sort(key=lambda p: p["layer"])
    return {"series": series, "other": other, "exact": exact}


def check_plot_path(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """The picture's file: a ``.png`` name, and not an existing file unless ``overwrite`` (a
    careless ``--plot`` naming a file that is already there replaced it); the output rules of every
    file a command writes (``io.staging.check_file_output``): not inside ``inputs`` (the checkpoint
    and the source verify reads), not a folder."""
    from ..io.staging import check_file_output

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OptionError(f"--plot {path}: the picture is written as PNG", hint="give a file name ending in .png")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"--plot {path}: already exists", hint="pass --overwrite to replace it, or choose another file name")
    check_file_output(path, overwrite, inputs)
    return path


def plot_quantization_error(error: dict[str, Any], path: str | os.PathLike, *, title: str | None = None,
                            overwrite: bool = False, inputs=()) -> dict[str, Any]:
    """Draw SQNR (dB) against layer index, one line per module type; tensors outside the numbered layers
    are drawn as labelled points after the last layer. Writes a PNG (refusing to replace a file
    unless ``overwrite``) and returns the plotted values (``lines``: label -> (x, y) as read back
    from the axes) next to :func:`plot_data`'s series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path, overwrite, inputs)
    data = plot_data(error)
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = []
    for module, pts in sorted(data["series"].items()):
        drawn += ax.plot([p["layer"] for p in pts], [p["sqnr_db"] for p in pts], marker="o", markersize=3, linewidth=1, label=module)
    layers = [p["layer"] for pts in data["series"].values() for p in pts]
    x_other = (max(layers) + 1) if layers else 0
    for i, p in enumerate(data["other"]):
        drawn += ax.plot([x_other + i], [p["sqnr_db"]], marker="s", linestyle="none", label=p["name"].removesuffix(".weight"))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if data["other"] and layers:
        ax.axvline(x_other - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("layer index" + (" (right of the dotted line: tensors outside the layers)" if data["other"] and layers else ""))
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title(title or f"quantization error per 4-bit weight: mean {error['sqnr_db_mean']:.2f} dB, lowest {error['sqnr_db_min']:.2f} dB")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(handles=drawn, fontsize=7, ncol=2 if len(drawn) > 8 else 1, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..io.writes import write_file

    write_file(path, lambda f: fig.savefig(f, format="png"))  # a unique temporary name, never a link followed
    data["lines"] = {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()]) for ln in drawn}
    data["path"] = str(path)
    return data


def plot_verify_report(report: dict[str, Any], path: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """The verify CLI's hook: the picture needs the per-tensor error that ``--against`` measures."""
    if "error" not in report:
        raise OptionError("--plot needs --against SOURCE", hint="the picture shows the error against the original weights")
    return plot_quantization_error(report["error"], path, overwrite=overwrite, inputs=[report.get("path")])
