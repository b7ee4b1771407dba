"""Moved to :mod:`qconvert.io.cards` (model cards through huggingface_hub's ModelCard); the names
stay importable from here."""

from ..io.cards import read_card_meta, render_card  # noqa: F401
