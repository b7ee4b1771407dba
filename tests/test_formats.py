"""formats/ is the single source of truth: the package's constants equal it, it equals what
bitsandbytes uses, it is regenerable from first principles, and the installed wheel can read it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qconvert.format.constants import codebook, dynamic_map, load_json, quantize_order

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def test_tables_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(codebook("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebook("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    # the FP4 walk order is what torch's argsort gives on this table (how bitsandbytes bins FP4)
    assert quantize_order("fp4") == torch.argsort(F.get_4bit_type("fp4", device="cpu")).tolist()


def test_constants_read_from_formats_files():
    """No drift: the tensors the code uses are exactly the bit patterns written in formats/."""
    on_disk = json.loads((ROOT / "formats" / "codebooks.json").read_text())
    for qt in ("nf4", "fp4"):
        bits = [int(b, 16) for b in on_disk[qt]["bits"]]
        assert codebook(qt).view(torch.int32).tolist() == [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    dm = json.loads((ROOT / "formats" / "dynamic_map.json").read_text())
    assert [f"0x{b & 0xFFFFFFFF:08x}" for b in dynamic_map().view(torch.int32).tolist()] == dm["bits"]
    assert load_json("codebooks.json") == on_disk


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["make_formats.py", "make_golden.py"])
def test_formats_regenerate_identically(tool):
    r = subprocess.run([PY, str(ROOT / "tools" / tool), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_installed_wheel_reads_formats(tmp_path):
    """Build the wheel, install it into an empty folder, and read the tables from there (not the checkout)."""
    wheel_dir = tmp_path / "wheel"
    r = subprocess.run(
        [PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = wheel_dir.glob("qconvert-*.whl")
    target = tmp_path / "site"
    r = subprocess.run([PY, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = (
        "import sys; sys.path.insert(0, %r);" % str(target)
        + "import qconvert, qconvert.format.constants as c, json;"
        "assert qconvert.__file__.startswith(%r), qconvert.__file__;"
        "print(json.dumps([c.codebook('nf4').tolist(), len(c.dynamic_map()), len(c.load_json('golden/vectors.json')['vectors'])]))"
        % str(target)
    )
    # -I: isolated mode, so neither the checkout nor the editable install is on the path
    r = subprocess.run([PY, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    nf4, n_dyn, n_golden = json.loads(r.stdout)
    assert nf4 == codebook("nf4").tolist() and n_dyn == 256 and n_golden >= 5


def test_schemas_accept_real_quant_states():
    jsonschema = pytest.importorskip("jsonschema")
    from qconvert.quant.reference import quantize_4bit_ref

    schema = load_json("quant_state.schema.json")
    for qtype, dq in (("nf4", True), ("fp4", False)):
        qs = quantize_4bit_ref(torch.randn(9, 7).bfloat16(), qtype, 64, dq).quant_state_dict()
        jsonschema.validate(qs, schema)
    bad = {"quant_type": "nf4", "blocksize": 100, "dtype": "float32", "shape": [3]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_schemas_accept_what_quantize_writes(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from safetensors import safe_open

    from helpers import make_tiny_llama
    from qconvert.convert.quantize import quantize_checkpoint

    out = tmp_path / "out"
    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src")), out)
    cfg = json.loads((out / "config.json").read_text())
    qschema = load_json("quantization_config.schema.json")
    jsonschema.validate(cfg["quantization_config"], qschema)
    jsonschema.validate(cfg["qconvert"], {**qschema["$defs"]["provenance"], "$schema": qschema["$schema"]})
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        jsonschema.validate(h.metadata(), load_json("metadata.schema.json"))
        qs_schema = load_json("quant_state.schema.json")
        for k in h.keys():
            if ".quant_state." in k:
                jsonschema.validate(json.loads(bytes(h.get_tensor(k).tolist())), qs_schema)
