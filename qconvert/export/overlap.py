"""Read, compute and write overlapped, in order, with at most two items in flight beside the current one.

A merge spends its time in three steps per tensor: reading it from the base (safetensors copies
it out of the file), dequantizing and adding the LoRA update (torch), and writing the result
(file write and sha256). Run one after another, each step leaves the other two idle; in torch,
safetensors, file writes and hashlib the work runs without the GIL, so three threads overlap them.

:func:`run_overlapped` keeps the sequential program's meaning:
- order: items are computed and written in the order given, one writer, so the output bytes are
  the sequential path's (the test compares the files byte for byte);
- memory: one item read ahead (the reader thread) and one written behind (the writer thread) beside
  the item being computed: at most two items beyond the one being merged, whatever the model's size;
- errors: an error is raised in the calling thread, and a failed earlier write is reported before a
  later read or compute error, as the sequential path reports it; when it returns or raises, no
  thread is still reading or writing (the caller may then delete a half-written output safely).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run_sequential(items: Sequence[T], read: Callable[[T], Any], compute: Callable[[T, Any], Iterable[Any]],
                   write: Callable[[Any], None]) -> None:
    """The reference the overlapped run must equal: for each item, read, compute, write its outputs."""
    for item in items:
        for out in compute(item, read(item)):
            write(out)


def run_overlapped(items: Sequence[T], read: Callable[[T], Any], compute: Callable[[T, Any], Iterable[Any]],
                   write: Callable[[Any], None]) -> None:
    """:func:`run_sequential`, with ``read`` of the next item and ``write`` of the previous item's
    outputs in two threads while the calling thread computes (module docstring)."""
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="qconvert-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="qconvert-write") as writer:
        ahead = reader.submit(read, items[0])
        behind: Future | None = None
        for i, item in enumerate(items):
            try:
                data = ahead.result()
                ahead = reader.submit(read, items[i + 1]) if i + 1 < len(items) else None
                outs = list(compute(item, data))
                del data
                if behind is not None:
                    behind.result()  # one write in flight at most
                behind = writer.submit(_write_all, write, outs)
                del outs
            except BaseException:
                _settle(ahead, behind)
                raise
        behind.result()


def _write_all(write: Callable[[Any], None], outs: list[Any]) -> None:
    for out in outs:
        write(out)


def _settle(ahead: Future | None, behind: Future | None) -> None:
    """Before an error leaves :func:`run_overlapped`: drop the read ahead, and let the write behind
    finish; its own error, being earlier in the sequential order, is the one raised."""
    if ahead is not None:
        ahead.cancel()
    if behind is not None:
        behind.result()
