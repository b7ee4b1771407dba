"""Importing qconvert (and its CLI) touches no GPU and imports neither Triton nor transformers."""

import subprocess
import sys

PROBE = """
import sys, torch
import qconvert, qconvert.cli, qconvert.backends, qconvert.format, qconvert.quant
qconvert.cli._load_commands()
heavy = [m for m in ("triton", "transformers", "peft", "bitsandbytes", "huggingface_hub") if m in sys.modules]
print(heavy, torch.cuda.is_initialized())
"""


def test_import_is_light():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False"
