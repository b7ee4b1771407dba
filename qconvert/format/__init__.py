"""The bytes: codebooks and constants (from formats/), tensor keys, the packed quant-state."""

from .constants import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, codebook, dynamic_map, quantize_order
from .layout import QuantizedTensor, find_quantized, pack_quant_state, unpack_quant_state

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "QuantizedTensor",
    "codebook",
    "dynamic_map",
    "find_quantized",
    "pack_quant_state",
    "quantize_order",
    "unpack_quant_state",
]
