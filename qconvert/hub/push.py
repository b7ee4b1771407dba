"""Publishing a folder to the Hugging Face Hub, with the checks a published model deserves.

Before anything is uploaded the folder is validated: a 4-bit checkpoint must pass ``qconvert verify``
(the spec check), an adapter needs a PEFT LoRA adapter_config.json and weights, and every folder needs
a model card whose ``base_model_relation`` matches what the folder is. The upload itself is
huggingface_hub's ``create_repo(exist_ok=True)`` + ``upload_folder``: file contents go up first (LFS
objects, or xet chunks when hf_xet is installed), then one commit. Contents the Hub already holds are
not sent again, so re-running an upload that was cut off resumes it (tested: tests/test_push.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import FormatError, HubError
from ..io.cards import read_card


def folder_kind(folder: Path) -> str:
    """'adapter', 'quantized' or 'merge' (a plain full-precision checkpoint)."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: neither a model (config.json) nor an adapter (adapter_config.json)")
    from ..format.layout import is_4bit_config  # here: the adapter path of push needs no torch

    from ..validate import read_config

    qc = read_config(folder).get("quantization_config") or {}
    return "quantized" if is_4bit_config(qc) else "merge"


def validate_folder(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such folder")
    kind = folder_kind(folder)
    if kind == "adapter":
        from ..adapters import read_adapter_config, read_lora_weights

        cfg = read_adapter_config(folder)
        read_lora_weights(folder, cfg)  # a damaged or half-written adapter is not published
        check_base_model_id(cfg.get("base_model_name_or_path"), folder / "adapter_config.json")
    elif kind == "quantized":
        from ..convert.verify import verify_checkpoint

        verify_checkpoint(folder)
    meta = read_card(folder)
    relation = meta.get("base_model_relation")
    if relation != kind:
        raise FormatError(
            f"{folder / 'README.md'}: base_model_relation is {relation!r}, but the folder holds a {kind} model",
            hint=f"set base_model_relation: {kind} in the card's front matter",
        )
    return {"kind": kind, "card": meta}


#: What a `qconvert train` output holds beside the adapter that is not published with it: resumable
#: checkpoints (optimizer and RNG state), TensorBoard logs, and the resolved run configuration,
#: which names local paths (the data, the base model folder).
RUN_ONLY = ("checkpoint-*/**", "runs/**", "config.yaml")


def publish_ignores(kind: str) -> list[str]:
    """upload_folder's ignore_patterns for a folder of this kind."""
    return list(RUN_ONLY) if kind == "adapter" else []


def check_links_inside(folder: Path) -> None:
    """Refuse a symbolic link that leads out of the folder: uploading follows links, so a
    ``notes.txt -> ~/.ssh/id_rsa`` would publish the private file."""
    root = folder.resolve()
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(top) / name
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                raise FormatError(
                    f"{p.relative_to(folder)}: a symbolic link out of the folder, nothing was uploaded (it leads to {os.readlink(p)})",
                    hint="replace the link with the file itself, or remove it",
                )


def check_base_model_id(base: object, where: Path) -> None:
    """An adapter's base_model_name_or_path must be a Hub repo id (namespace/name) that is not also
    a local path: others cannot load an adapter whose base is a folder on this machine."""
    if not isinstance(base, str) or not _is_repo_id(base) or os.path.exists(base):
        what = "missing" if not base else f"a local path ({base!r})" if isinstance(base, str) and (
            os.path.exists(base) or base.startswith(("/", ".", "~")) or "\\" in base) else f"not a Hub repo id ({base!r})"
        raise FormatError(
            f"{where}: base_model_name_or_path is {what}",
            hint="set it to the Hub id of the base model (namespace/name), e.g. with `qconvert export-adapter SRC OUT --base-model ID`",
        )


def _is_repo_id(s: str) -> bool:
    from .download import REPO_ID

    return bool(REPO_ID.match(s))


@contextmanager
def _push_errors(repo_id: str) -> Iterator[None]:
    from huggingface_hub import errors as E

    resume = "re-running the same command resumes the upload"
    try:
        yield
    except E.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"{repo_id}: the Hub rejected the token (HTTP 401)", hint="set HF_TOKEN to a valid write token") from None
        if status == 403:
            raise HubError(
                f"{repo_id}: not allowed to write there (HTTP 403): the repo or its namespace belongs to someone else, or the token is read-only",
                hint="push to your own namespace, or use a write token of the owner",
            ) from None
        raise HubError(f"{repo_id}: the Hub answered with an error ({e})", hint=resume) from None
    except ValueError as e:  # huggingface_hub raises ValueError subclasses for answers it cannot use
        raise HubError(f"{repo_id}: the Hub's answer could not be used ({e})", hint=resume) from None
    except Exception as e:
        from .download import is_network_error

        if not is_network_error(e):
            raise
        raise HubError(f"{repo_id}: network failure during the upload ({type(e).__name__})", hint=resume) from None


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> dict[str, Any]:
    """Validate ``folder`` and upload it to ``repo_id``; returns the commit (and PR) URL."""
    from huggingface_hub import HfApi, get_token

    info = validate_folder(folder)
    check_links_inside(Path(folder))
    if not _is_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a repo id of the form namespace/name")
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token", hint="set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    with _push_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {info['kind']} model with qconvert",
            ignore_patterns=publish_ignores(info["kind"]) or None,
        )
    return {"repo_id": repo_id, "kind": info["kind"], "commit_url": commit.commit_url, "pr_url": getattr(commit, "pr_url", None)}
