"""Every error qconvert raises on purpose.

Each class subclasses both :class:`QConvertError` and the builtin it most resembles, so callers can
catch either. Messages say what went wrong, where (file, tensor, line), what was expected against
what was found, and how to fix it. The CLI prints ``str(error)`` plus ``error.hint`` on one line.
"""

from __future__ import annotations


class QConvertError(Exception):
    """Root of every error qconvert raises deliberately."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class OptionError(QConvertError, ValueError):
    """An option's value cannot be used (a size that does not parse, a block size out of range...)."""


class FormatError(QConvertError, ValueError):
    """A checkpoint, tensor or quant-state does not follow the qconvert/bitsandbytes 4-bit layout."""


class QuantizationError(QConvertError, ValueError):
    """A tensor cannot be quantized (non-finite values, unsupported dtype, bad block size...)."""


class SourceError(QConvertError, OSError):
    """The input checkpoint cannot be found or read (missing repo, revision, file, gated access)."""


class OutputExistsError(QConvertError, FileExistsError):
    """The output location already holds files and ``--overwrite`` was not given."""


class DiskSpaceError(QConvertError, OSError):
    """Not enough free disk for the output, checked before any work starts."""


class BackendError(QConvertError, RuntimeError):
    """A compute backend is unknown or not available on this machine."""


class DataError(QConvertError, ValueError):
    """Training or evaluation data is empty, malformed or of an unknown shape."""


class HubError(QConvertError, RuntimeError):
    """The Hugging Face Hub refused or failed a request (token, permissions, network)."""
