"""The numbers: the one reference implementation of 4-bit quantization and dequantization."""

from .reference import dequantize_4bit_ref, dequantize_absmax_ref, quantize_4bit_ref

__all__ = ["dequantize_4bit_ref", "dequantize_absmax_ref", "quantize_4bit_ref"]
