"""`qconvert verify --against SOURCE --plot FILE.png`: the picture's numbers are the run's per-tensor SQNR."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_bert, make_tiny_llama
from runtime_helpers import cli
from tolerances import REPORTED_FIGURE_REL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("plot")
    out = {}
    for name, make in (("llama", lambda p: make_tiny_llama(p, layers=3, dtype=torch.float32)), ("bert", make_tiny_bert)):
        src = make(d / f"{name}-src")
        quantize_checkpoint(str(src), d / f"{name}-q")
        out[name] = (src, d / f"{name}-q")
    return out


def read_png(path):
    from PIL import Image

    blob = path.read_bytes()
    assert blob[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.format, im.size


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_plot_shows_the_sqnr_verify_reports(pairs, capsys, tmp_path, arch):
    from qconvert.convert.verify_plot import plot_quantization_error

    src, q = pairs[arch]
    png = tmp_path / "err.png"
    rc, out, err = cli(capsys, "verify", q, "--against", src, "--json", "--plot", png)
    assert rc == 0, err
    report = json.loads(out)  # stdout stays one JSON object; the "wrote" line goes to stderr
    assert err.strip() == f"wrote {png}"
    assert read_png(png) == ("PNG", (900, 500))
    per = {t["name"]: t["sqnr_db"] for t in report["error"]["tensors"]}
    assert len(per) == report["quantized"] > 0

    data = plot_quantization_error(report["error"], tmp_path / "again.png")
    # the CLI's picture is the one these numbers draw, byte for byte
    assert (tmp_path / "again.png").read_bytes() == png.read_bytes()
    drawn = {}
    for label, (xs, ys) in data["lines"].items():
        for x, y in zip(xs, ys):
            drawn[(label, x)] = y
    assert len(drawn) == len(per)  # every quantized tensor is one point, none twice
    n_layers = 3 if arch == "llama" else 2
    for name, sqnr in per.items():
        parts = name.removesuffix(".weight").split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:  # outside the numbered layers: its own point after the last layer
            key = next(k for k in drawn if k[0] == ".".join(parts))
            assert key[1] >= n_layers
        else:
            key = (".".join(parts[idx + 1:]), float(parts[idx]))
        assert drawn[key] == pytest.approx(sqnr, rel=REPORTED_FIGURE_REL), name
    if arch == "llama":
        assert set(data["series"]) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
        assert all([p["layer"] for p in pts] == [0, 1, 2] for pts in data["series"].values())
    else:
        assert [p["name"] for p in data["other"]] == ["pooler.dense.weight"]
    assert 5 < min(per.values()) and max(per.values()) < 40  # NF4 on Gaussian-like weights: about 20 dB


def test_plot_data_layer_parsing():
    from qconvert.convert.verify_plot import layer_and_module

    assert layer_and_module("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert layer_and_module("encoder.layer.0.attention.self.query.weight") == (0, "attention.self.query")
    assert layer_and_module("transformer.h.3.mlp.c_fc.weight") == (3, "mlp.c_fc")
    assert layer_and_module("pooler.dense.weight") == (None, "pooler.dense")
