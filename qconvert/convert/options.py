"""The settings of one `qconvert quantize` run as one frozen object: :class:`QuantizeOptions`.

Why: the run's thirteen settings used to travel as thirteen keyword parameters from the CLI through
:func:`qconvert.convert.quantize.quantize_checkpoint` into its helpers; one object is passed whole,
cannot be changed on the way (frozen), and a Python caller can build it once and reuse it
(``dataclasses.replace(opts, blocksize=128)``). ``quantize_checkpoint`` still takes the same names
as keywords, over the object. The values are checked where the run starts (quantize.py), before
anything is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuantizeOptions:
    """One quantize run's settings (the defaults are the CLI's). ``skip_modules``: patterns of modules
    left unquantized (transformers' matching rules); ``max_shard_size``: bytes or "2GB"; ``workers``:
    threads (None, 0 or "auto": one per CPU this process may use); ``experts``: "4bit" or "16bit";
    ``base_model``: the Hub id the card names as base_model when the source is a local folder."""

    revision: str | None = None
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ()
    max_shard_size: str | int = "2GB"
    workers: int | str | None = None
    dry_run: bool = False
    overwrite: bool = False
    keep_source: bool = False
    experts: str = "4bit"
    base_model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))  # a list given: kept as a tuple

    @classmethod
    def of(cls, options: QuantizeOptions | None = None, keywords: dict[str, Any] | None = None) -> QuantizeOptions:
        """``options`` (or the defaults) with ``keywords`` over it; an unknown name is a TypeError, as
        for any keyword argument."""
        keywords = keywords or {}
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"quantize_checkpoint() got an unexpected keyword argument {unknown[0]!r}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"quantize_checkpoint(): options must be a QuantizeOptions, not {type(options).__name__}")
        return dataclasses.replace(options or cls(), **keywords)
