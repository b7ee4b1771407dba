"""Where a model comes from: a local folder (or file), or a Hub repo id at a revision.

:func:`resolve_model_path` turns either into a local folder (a Hub repo is downloaded whole into the
Hugging Face cache: loading, merging and training read every file anyway). :func:`open_checkpoint`
turns either into a :class:`.reader.CheckpointReader` without downloading the weights up front
(quantizing reads one shard at a time, and deletes each once consumed).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from .reader import CheckpointReader


def refuse_local_revision(path: str | os.PathLike, revision: str | None) -> None:
    """--revision names a Hub commit, branch or tag: with a local folder it would be ignored."""
    if revision:
        raise SourceError(f"{path}: --revision applies to Hub repo ids, not local folders", hint="leave out --revision for a local folder")


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder, or a Hub repo id downloaded through qconvert's checked path; returns (folder, repo id).
    A ``revision`` with a local folder is refused, as quantize refuses it: it would be ignored, and the
    folder's files used as if they were that revision."""
    p = Path(path_or_repo_id)
    if p.exists():
        refuse_local_revision(p, revision)
        return p, None
    from .hub import looks_like_repo_id

    rid = str(path_or_repo_id)
    if not looks_like_repo_id(rid):
        raise SourceError(f"{rid}: no such folder, and not a Hub repo id of the form org/name", hint="check the path, or give a Hub id as org/name")
    from .hub import fetch_snapshot

    return fetch_snapshot(rid, revision, None, repo_type="model"), rid  # names checked, a deadline


#: the files of a PEFT LoRA adapter read from a Hub repo (never a pickled adapter_model.bin)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_adapter_path(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """A local adapter folder, or a Hub repo id (PEFT takes both) whose adapter files, and only
    those (:data:`ADAPTER_FILES`), are downloaded into the Hugging Face cache through the same
    checked path as a model (:func:`.hub.hub_errors`); returns (folder, repo id). The folder is then
    read and validated as any local adapter is."""
    p = Path(path_or_repo_id)
    if p.exists():
        return p, None
    from .hub import hub_errors, looks_like_repo_id

    rid = str(path_or_repo_id)
    if not looks_like_repo_id(rid):
        raise SourceError(f"{rid}: no such adapter folder, and not a Hub repo id of the form org/name",
                          hint="pass a PEFT LoRA adapter folder (a qconvert train output) or its Hub id")
    from huggingface_hub import snapshot_download

    with hub_errors(rid, revision):
        folder = Path(snapshot_download(rid, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    if not (folder / ADAPTER_FILES[0]).is_file():
        raise SourceError(f"{rid}: the Hub repository holds no {ADAPTER_FILES[0]}: not a PEFT adapter",
                          hint="pass the Hub id of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    return folder, rid


def open_checkpoint(source: str, revision: str | None, workdir: Path, keep: bool = False) -> CheckpointReader:
    """A local folder / file, or a Hub repo id (``org/name``) whose shards are fetched into
    ``workdir`` as they are read (and kept there when ``keep``)."""
    from .checkpoint import Checkpoint
    from .hub import HubCheckpoint, looks_like_repo_id

    if os.path.exists(source):
        refuse_local_revision(source, revision)
        return Checkpoint(source, streaming=True)
    if looks_like_repo_id(source):
        return HubCheckpoint(source, revision, workdir, keep=keep)
    raise SourceError(f"{source}: no such folder, and not a Hub repo id of the form org/name", hint="check the path, or give a Hub id as org/name")
