"""Constants of the format, read from the packaged formats/ data (the single source of truth).

Nothing here is typed in by hand: the codebooks and the dynamic map come from
``formats/codebooks.json`` and ``formats/dynamic_map.json`` (shipped as ``qconvert._formats``),
as float32 bit patterns. Kernels receive these tensors; they never carry literals of their own.
"""

from __future__ import annotations

import functools
import json
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..names import FLOAT_DTYPE_NAMES, QUANT_TYPES

#: The floating dtypes of qconvert.names.FLOAT_DTYPE_NAMES as torch dtypes, in the same order.
FLOAT_DTYPES = tuple(getattr(torch, name) for name in FLOAT_DTYPE_NAMES)


def formats_root():
    """formats/ as shipped in the wheel (``qconvert._formats``), or beside the package in a checkout
    (an editable install does not map the folder into the package)."""
    try:
        return resources.files("qconvert._formats")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "formats"


@functools.lru_cache(maxsize=None)
def load_json(name: str) -> Any:
    """Read one JSON file of formats/ (``name`` may hold a sub-folder, e.g. 'golden/nf4.json')."""
    node = formats_root()
    for part in name.split("/"):  # one part at a time: namespace-package paths take one argument
        node = node.joinpath(part)
    return json.loads(node.read_text(encoding="utf-8"))


def _from_bits(bits: list[str]) -> list[float]:
    return [struct.unpack("<f", struct.pack("<I", int(b, 16)))[0] for b in bits]


@functools.lru_cache(maxsize=None)
def _codebook_cpu(quant_type: str) -> torch.Tensor:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    return torch.tensor(_from_bits(load_json("codebooks.json")[quant_type]["bits"]), dtype=torch.float32)


def codebook(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 codebook, indexed by nibble value. Returns a fresh tensor."""
    return _codebook_cpu(quant_type).to(device or "cpu", copy=True)


def quantize_order(quant_type: str) -> list[int]:
    """Nibble values in the ascending order that quantization walks (spec section 6.3)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    return list(load_json("codebooks.json")[quant_type]["quantize_order"])


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    return torch.tensor(_from_bits(load_json("dynamic_map.json")["bits"]), dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic map used for double quantization. Returns a fresh tensor."""
    return _dynamic_map_cpu().to(device or "cpu", copy=True)


def quantize_midpoints(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order): the 15 float32 decision boundaries between neighbouring codes in value
    order, and the nibble value of each of the 16 bins. A value on a boundary takes the lower bin."""
    code = _codebook_cpu(quant_type)
    order = torch.tensor(quantize_order(quant_type), dtype=torch.int64)
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order
