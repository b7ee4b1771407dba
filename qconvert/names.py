"""The vocabularies of qconvert, spelled once: quant types, block sizes, float dtypes, backend names.

This module imports nothing (no torch), so the command line offers the same choices the library
checks without paying for torch at start-up. Tensors of these names live one layer up:
``qconvert.format.constants`` (codebooks, torch dtypes) and ``qconvert.format.layout`` (the entries
of a 4-bit weight and their sizes).
"""

from __future__ import annotations

#: The 4-bit data types (spec section 3), in the order the CLI offers them (nf4 is the default).
QUANT_TYPES = ("nf4", "fp4")
#: The block sizes a 4-bit weight may use (spec section 3.2).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block size of the second-level (double-quantization) scales.
NESTED_BLOCKSIZE = 256

#: The floating dtypes, by torch's name, in the spec's order: what a 4-bit weight may logically be
#: (its quant-state "dtype"), what is quantized, and what a model computes in. Interfaces that
#: offer them as choices list them sorted (bfloat16, float16, float32).
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: The same dtypes as safetensors names them in a file header.
SAFETENSORS_FLOAT_NAMES = ("F32", "F16", "BF16")
#: The choices of a compute-dtype option that may also follow the checkpoint.
DTYPE_CHOICES = ("auto", *sorted(FLOAT_DTYPE_NAMES))

#: The backend names a caller may ask for (qconvert.ops.choice documents each).
BACKEND_NAMES = ("auto", "reference", "triton", "bitsandbytes")


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, exactly (no float rounding, whatever their size)."""
    return -(-a // b)


__all__ = [
    "BACKEND_NAMES",
    "BLOCKSIZES",
    "DTYPE_CHOICES",
    "FLOAT_DTYPE_NAMES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "SAFETENSORS_FLOAT_NAMES",
    "ceil_div",
]
