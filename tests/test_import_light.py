"""Importing qconvert (and its CLI) touches no GPU and imports neither Triton nor transformers."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
import qconvert, qconvert.cli.main, qconvert.format, qconvert.quant, qconvert.nn, qconvert.model, qconvert.run
qconvert.cli.main._load_commands()
heavy = [m for m in ("triton", "transformers", "peft", "bitsandbytes", "huggingface_hub") if m in sys.modules]
print(heavy, torch.cuda.is_initialized())
"""


def test_import_is_light():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False"


CONVERT = """
import sys
from qconvert.convert.quantize import quantize_checkpoint
quantize_checkpoint(sys.argv[1], sys.argv[2])
print([m for m in ("transformers", "peft", "triton") if m in sys.modules])
"""


@pytest.mark.slow
def test_converting_a_known_decoder_imports_no_transformers(tmp_path):
    """Llama-family plans come from config.json (tests/test_plan.py checks them against transformers);
    the 3-4 s transformers import is what this keeps out of a conversion."""
    from helpers import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src")
    r = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


MERGE = """
import sys
from qconvert.export.merge import merge_adapter
merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3])
print([m for m in ("transformers", "peft", "triton") if m in sys.modules])
"""


@pytest.mark.slow
def test_merging_into_a_llama_imports_no_transformers(tmp_path):
    """merge's Conv1D check reads the modeling file without importing transformers (2-4 s of a merge)."""
    from helpers import make_tiny_llama, write_lora_adapter

    from qconvert.convert.quantize import quantize_checkpoint

    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src")), tmp_path / "q")
    write_lora_adapter(tmp_path / "q", tmp_path / "adapter")
    r = subprocess.run([sys.executable, "-c", MERGE, *(str(tmp_path / n) for n in ("q", "adapter", "m"))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
