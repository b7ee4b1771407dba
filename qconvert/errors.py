"""Every error qconvert raises on purpose.

Each class subclasses both :class:`QConvertError` and the builtin it most resembles, so callers can
catch either. Messages say what went wrong, where (file, tensor, line), what was expected against
what was found, and how to fix it.

A message is short (one line); a wrapped library message or other long explanation goes in
``detail``, which ``str(error)`` puts on the lines after the message. :func:`cli_lines` is how the
CLI prints any error: a first line ``qconvert: error: ...`` of at most :data:`MAX_FIRST_LINE`
characters, then the detail lines, then ``hint: ...``.
"""

from __future__ import annotations

#: The CLI's error prefix and the longest first line it prints (prefix included).
PREFIX = "qconvert: error: "
MAX_FIRST_LINE = 200
MAX_DETAIL_LINES = 12
#: How to fix running out of file descriptors (EMFILE/ENFILE), which is not damage to any file.
OPEN_FILES_HINT = "the file is not necessarily damaged: raise the open-file limit (ulimit -n) or close other programs, then re-run"


class QConvertError(Exception):
    """Root of every error qconvert raises deliberately."""

    hint: str | None = None
    detail: str | None = None

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None):
        super().__init__(f"{message}\n{detail}" if detail else message)
        if hint is not None:
            self.hint = hint
        self.detail = detail


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
    """A compute backend is not available on this machine (an unknown backend name is an OptionError)."""


class DataError(QConvertError, ValueError):
    """Training or evaluation data is empty, malformed or of an unknown shape."""


class HubError(QConvertError, RuntimeError):
    """The Hugging Face Hub refused or failed a request (token, permissions, network)."""


def _split_first_line(line: str, room: int) -> tuple[str, str]:
    """Cut a too-long first line: before a wrapped message in parentheses, after '; ' or ': ', or
    at a space, whichever keeps the most text within ``room`` characters."""
    if len(line) <= room:
        return line, ""
    for sep, keep in ((" (", 0), ("; ", 1), (": ", 1), (" ", 0)):
        i = line.rfind(sep, 0, room - 3 + (1 if keep else 0))
        if i >= 20:
            head, tail = line[: i + keep], line[i + len(sep) :]
            if sep == " (" and tail.endswith(")"):
                tail = tail[:-1]
            return head.rstrip() + " ...", tail
    return line[: room - 4] + " ...", line[room - 4 :]


def printable(text: str) -> str:
    """Control characters (a terminal escape sequence in a hostile tensor name or path) shown as
    ``\\xNN`` escapes instead of being sent to the terminal; newlines kept. The CLI passes its
    errors and every line it prints about a checkpoint through this."""
    return "".join(c if c == "\n" or c.isprintable() else ascii(c)[1:-1] for c in text)


_printable = printable


def cli_lines(message: str, hint: str | None = None) -> list[str]:
    """The CLI's lines for an error: ``qconvert: error: FIRST`` (at most MAX_FIRST_LINE characters,
    a long first line cut and continued below), indented detail lines, then ``hint: ...``."""
    text = _printable(message).strip() or "unknown error"
    hint = _printable(hint) if hint else hint
    first, _, rest = text.partition("\n")
    first, cut = _split_first_line(" ".join(first.split()), MAX_FIRST_LINE - len(PREFIX))
    lines = [PREFIX + first]
    detail = [ln.strip() for ln in (cut + "\n" + rest).splitlines() if ln.strip()]
    if len(detail) > MAX_DETAIL_LINES:
        detail = detail[:MAX_DETAIL_LINES] + [f"... ({len(detail) - MAX_DETAIL_LINES} more lines)"]
    lines += ["  " + ln for ln in detail]
    if hint:
        lines.append("hint: " + " ".join(hint.split()))
    return lines
