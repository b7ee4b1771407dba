"""Whether a file given inside a folder really lies there once links are resolved.

One rule (spec/robustness.md 2.2) for every file qconvert reads or copies out of a folder it was
given (companion files, an adapter's two files): the file, links followed, must be a regular file
inside that folder, or, for a Hugging Face cache snapshot (``models--org--name/snapshots/SHA/``),
inside the same repository's ``blobs/`` folder, where the cache's links point. A link elsewhere (to
``~/.ssh/id_rsa``) would otherwise be read, copied into an output and published.
"""

from __future__ import annotations

from pathlib import Path


def allowed_roots(folder: Path) -> list[Path]:
    """The resolved folders a file of ``folder`` may resolve into: the folder, and a cache snapshot's ``blobs/``."""
    folder = folder.resolve()
    roots = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent / "blobs")
    return roots


def outside_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` (a file named inside ``folder``), its links followed, leaves :func:`allowed_roots`."""
    real = path.resolve()
    return not any(root in real.parents for root in allowed_roots(folder))


def refuse_outside(path: Path, folder: Path, what: str = "model") -> None:
    """Raise SourceError where ``path`` (named inside ``folder``) is a link that leaves it
    (:func:`outside_folder`): the weights, index and config.json of a model folder are read, and
    what is made of them (a quantized or merged model, a GGUF) is written out and published."""
    if outside_folder(path, folder):
        from ..errors import SourceError

        raise SourceError(f"{path}: a link to {path.resolve()}, outside the {what} folder",
                          hint=f"copy the file into the {what} folder, or pass the folder it lies in")
