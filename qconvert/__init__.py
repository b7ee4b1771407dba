"""qconvert: QLoRA-style 4-bit (NF4, double-quantized) checkpoints, end to end.

Importing this package is cheap: it touches no GPU and imports neither Triton nor transformers.
Heavy pieces load on first use (``qconvert.load_model`` imports the loader when called).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Version of the on-disk layout (spec/format.md). Bumped only when bytes a reader sees change.
LAYOUT_VERSION = "1"
#: Version of the quantization algorithm (which bytes a writer produces for a given input).
QUANTIZER_VERSION = "1"

__all__ = ["__version__", "LAYOUT_VERSION", "QUANTIZER_VERSION", "load_model"]


def load_model(*args, **kwargs):
    """Load a 4-bit checkpoint onto qconvert's own 4-bit modules. See :func:`qconvert.model.loader.load_model`."""
    from .model.loader import load_model as _load_model

    return _load_model(*args, **kwargs)
