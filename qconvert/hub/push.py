"""Publishing a folder to the Hugging Face Hub, with the checks a published model deserves.

Before anything is uploaded the folder is validated: a 4-bit checkpoint must pass ``qconvert verify``
(the spec check), an adapter needs a PEFT LoRA adapter_config.json and weights, and every folder needs
a model card whose ``base_model_relation`` matches what the folder is. The upload itself is
huggingface_hub's ``create_repo(exist_ok=True)`` + ``create_commit`` of the files to publish: file
contents go up first (LFS objects, or xet chunks when hf_xet is installed), then one commit. Contents
the Hub already holds are not sent again, so re-running an upload that was cut off resumes it (tested:
tests/test_push.py). The card is sent as the repo shows it: its usage snippet names the repo id
instead of the local folder (io/cards.with_repo_id); the local card is not changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import FormatError, HubError
from ..io.cards import read_card
from ..io.staging import TEMPORARY, WRITTEN, matches


def folder_kind(folder: Path) -> str:
    """'adapter', 'quantized' or 'merge' (a plain full-precision checkpoint)."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: neither a model (config.json) nor an adapter (adapter_config.json)",
                          hint="give the folder that quantize, train, merge or export-adapter wrote")
    from ..format.layout import is_4bit_config  # here: the adapter path of push needs no torch

    from ..model.checks import read_config

    qc = read_config(folder).get("quantization_config") or {}
    return "quantized" if is_4bit_config(qc) else "merge"


def validate_folder(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such folder", hint="give the folder that quantize, train, merge or export-adapter wrote")
    kind = folder_kind(folder)
    if kind == "adapter":
        from ..model.adapters import read_adapter_config, read_lora_weights

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
RUN_ONLY = ("checkpoint-*", "runs", "config.yaml")
#: Names that look like credentials: never published unless named with --include, and named in a warning.
SECRET_PATTERNS = ("*.env", ".env*", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx",
                   ".netrc", "_netrc", ".git-credentials", ".pypirc", "*credentials*", "*secret*", "*token*", ".npmrc",
                   "*.kdbx", ".htpasswd")

def upload_plan(folder: Path, kind: str, include=()) -> dict[str, list[str]]:
    """Sort every file under ``folder`` (paths relative to it, with ``/``) into what is published
    and what is not. Published: the files qconvert writes for this kind (:data:`WRITTEN`, the card,
    the companion files) and those matching an ``include`` pattern. Never: qconvert's temporary
    leftovers (:data:`TEMPORARY`). Hidden files and folders, a train run's own files
    (:data:`RUN_ONLY`) and ``secrets``, names that look like credentials (:data:`SECRET_PATTERNS`),
    are published only when an ``include`` names them exactly (no wildcard: ``--include '*'``
    does not send ``.env``); ``unknown``: any other file, which refuses the push unless included."""
    from ..io.checkpoint import is_companion_file

    exact = [p for p in include if not any(c in p for c in "*?[")]
    plan: dict[str, list[str]] = {"upload": [], "skipped": [], "secrets": [], "unknown": []}
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = (Path(top) / name).relative_to(folder).as_posix()
            parts = rel.split("/")
            companion = kind != "adapter" and is_companion_file(rel)
            # "*token*" names credentials, not the model's tokenizer.json and tokenizer_config.json
            secret = matches(rel, SECRET_PATTERNS) and not companion
            hidden = any(p.startswith(".") for p in parts) or (kind == "adapter" and matches(parts[0], RUN_ONLY))
            if secret:
                plan["secrets"].append(rel)
            if any(matches(p, TEMPORARY) for p in parts):
                plan["skipped"].append(rel)
            elif matches(rel, exact) or (include and matches(rel, include) and not (secret or hidden)):
                plan["upload"].append(rel)
            elif secret:
                continue
            elif hidden:
                plan["skipped"].append(rel)
            elif rel == "README.md" or matches(rel, WRITTEN[kind]) or companion:
                plan["upload"].append(rel)
            else:
                plan["unknown"].append(rel)
    return plan


def _shown(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_plan(plan: dict[str, list[str]], say) -> None:
    """Warn about secrets by name; refuse a folder holding files qconvert did not write."""
    held = [s for s in plan["secrets"] if s not in plan["upload"]]
    if held:
        say(f"warning: {_shown(held)}: looks like a secret (credentials, keys, tokens); not uploaded")
    sent = [s for s in plan["secrets"] if s in plan["upload"]]
    if sent:
        say(f"warning: {_shown(sent)}: looks like a secret, uploaded because --include names it")
    if plan["unknown"]:
        raise FormatError(f"{_shown(plan['unknown'])}: not a file qconvert writes; nothing was uploaded",
                          hint="publish it with --include NAME (a name or pattern), or move it out of the folder")


def check_links_inside(folder: Path) -> None:
    """Refuse a symbolic link that leads out of the folder: uploading follows links, so a
    ``notes.txt -> ~/.ssh/id_rsa`` would publish the private file. Refuse anything but folders and
    regular files too: the upload reads each file to hash it, and a FIFO blocks that read forever."""
    root = folder.resolve()
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(top) / name
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                raise FormatError(
                    f"{p.relative_to(folder)}: a symbolic link out of the folder, nothing was uploaded (it leads to {os.readlink(p)})",
                    hint="replace the link with the file itself, or remove it",
                )
            if not p.is_dir() and not p.is_file():
                raise FormatError(f"{p.relative_to(folder).as_posix()}: not a regular file (a FIFO, socket, device or broken link), nothing was uploaded",
                                  hint="remove it from the folder")


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
    from ..io.hub import REPO_ID

    return bool(REPO_ID.match(s))


@contextmanager
def _push_errors(repo_id: str) -> Iterator[None]:
    from huggingface_hub import errors as E

    resume = "re-running the same command resumes the upload"
    try:
        yield
    except E.OfflineModeIsEnabled:  # (a ConnectionError: re-running changes nothing)
        raise HubError(f"{repo_id}: offline mode is on (HF_HUB_OFFLINE=1), and push needs the network",
                       hint="unset HF_HUB_OFFLINE (or set it to 0), then re-run") from None
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
        from ..io.hub import is_network_error

        if not is_network_error(e):
            raise
        raise HubError(f"{repo_id}: network failure during the upload ({type(e).__name__})", hint=resume + _xet_advice()) from None


def _xet_advice() -> str:
    """huggingface_hub uploads through xet whenever hf_xet is installed, without asking the server, and a
    server without xet storage (olah, a private or local Hub) fails every upload: re-running then resumes
    nothing until HF_HUB_DISABLE_XET=1 (README, "Against a local or private Hub server")."""
    import importlib.util

    from huggingface_hub import constants

    if constants.ENDPOINT == "https://huggingface.co" or constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:
        return ""
    return f"; a server without xet storage at {constants.ENDPOINT} needs HF_HUB_DISABLE_XET=1 first"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    include: tuple[str, ...] | list[str] = (),
    log=None,
) -> dict[str, Any]:
    """Validate ``folder`` and upload it to ``repo_id``; returns the commit (and PR) URL and the
    files sent. Only what qconvert wrote is sent, and what ``include`` names (:func:`upload_plan`);
    ``log`` gets the warnings (default: ``warnings.warn``)."""
    import warnings

    from huggingface_hub import HfApi, get_token

    info = validate_folder(folder)
    check_links_inside(Path(folder))
    plan = upload_plan(Path(folder), info["kind"], include)
    check_plan(plan, log or (lambda m: warnings.warn(m, stacklevel=3)))
    if not _is_repo_id(repo_id):
        from ..io.hub import REPO_ID_HINT

        raise HubError(f"{repo_id!r} is not a repo id of the form namespace/name", hint=REPO_ID_HINT)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token", hint="set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    with _push_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id, _operations(Path(folder), plan["upload"], repo_id), revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {info['kind']} model with qconvert",
        )
    return {"repo_id": repo_id, "kind": info["kind"], "commit_url": commit.commit_url, "pr_url": getattr(commit, "pr_url", None),
            "files": plan["upload"]}


def _operations(folder: Path, files: list[str], repo_id: str) -> list:
    """One commit's additions: the files as they are, but the card as the repo will show it, its
    usage snippet naming ``repo_id`` instead of the local folder (io/cards.with_repo_id). The
    local card is read, never rewritten: the folder stays as it was written."""
    from huggingface_hub import CommitOperationAdd

    from ..io.cards import with_repo_id

    ops = []
    for rel in files:
        src = folder / rel
        if rel == "README.md":
            card = with_repo_id(src.read_text(encoding="utf-8"), repo_id).encode("utf-8")
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=card))
        else:
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(src)))
    return ops
