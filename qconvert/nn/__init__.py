"""qconvert's 4-bit modules."""

from .linear4bit import Linear4bit

__all__ = ["Linear4bit"]
