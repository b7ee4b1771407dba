"""The checkpoint reader protocol: what a workflow may ask of a checkpoint, wherever it lives.

Two implementations: :class:`qconvert.io.checkpoint.Checkpoint` (a local folder or file,
memory-mapped safetensors) and :class:`qconvert.io.hub.HubCheckpoint` (a Hub repo whose shards
are downloaded one at a time, on demand, the next one in the background). :func:`open_checkpoint`
(in :mod:`.source`) picks one from what the user typed. A workflow reads tensors one at a time with
``get``, announces the next file with ``prefetch`` and lets go of a finished one with ``release``;
both are no-ops for a local folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class CheckpointReader(Protocol):
    root: Path

    def keys(self) -> list[str]:
        """Every tensor name, in a stable order."""

    def file_of(self, name: str) -> str:
        """The weight file (relative name) that holds tensor ``name``."""

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored."""

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor ``name`` from the header, without reading its data."""

    def config(self) -> dict[str, Any] | None:
        """config.json as a dict, or None when there is none."""

    def config_dir(self) -> Path:
        """The folder config.json and the companion files are read from."""

    def extra_files(self) -> Iterator[tuple[str, Path]]:
        """(relative name, path) of the non-weight entries, for :func:`.staging.copy_companions`."""

    def prefetch(self, file: str) -> None:
        """Start fetching weight file ``file`` (a no-op when it is local)."""

    def release(self, file: str) -> None:
        """Done with weight file ``file`` (a downloaded one may be deleted)."""


def cleanup(reader: CheckpointReader) -> None:
    """Delete what the reader downloaded for this run (a no-op for a local folder)."""
    done = getattr(reader, "cleanup", None)
    if done is not None:
        done()
