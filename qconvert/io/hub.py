"""Reading a Hub repo: a repo id fetched with huggingface_hub, shard by shard.

For a Hub repo the small files (config, tokenizer, index...) are downloaded at once and the weight
shards one at a time, on demand, by :class:`HubCheckpoint`; the next shard downloads in a background
thread while the current one is converted. Shards that were already in the user's Hugging Face cache
are used in place and never deleted; shards downloaded for this run go to a private folder and are
deleted once consumed, unless the caller keeps them. Every huggingface_hub failure becomes a
:class:`qconvert.errors.SourceError` that says what happened and what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import SourceError
from .checkpoint import (
    SAFETENSORS_DTYPES, Checkpoint, check_member_name, check_shard_against_index, is_companion_file, is_weight_file,
    raise_resource_error,
)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPO_ID_HINT = "e.g. you/qwen-nf4: your user or organization name, a slash, the repo name"


def check_push_target(repo_id: str, flag: str = "--push-to-hub") -> None:
    """A repo to push to, checked when the command starts: push would refuse it only after the whole run."""
    if not REPO_ID.match(repo_id):
        from ..errors import OptionError

        raise OptionError(f"{flag} {repo_id!r} is not a repo id of the form namespace/name", hint=REPO_ID_HINT)


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one clear SourceError."""
    from huggingface_hub import errors as E

    rev = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except E.GatedRepoError:
        raise SourceError(
            f"{repo_id}: this repository is gated and your token has no access",
            hint="accept its terms on the Hub, then set HF_TOKEN to a token of that account",
        ) from None
    except E.RevisionNotFoundError:
        raise SourceError(f"{repo_id}: revision {revision!r} not found", hint="check the branch, tag or commit sha") from None
    except (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError):  # (the latter is an EntryNotFoundError: caught first)
        if _offline():
            raise SourceError(f"{repo_id}{rev}: not in the Hugging Face cache, and offline mode (HF_HUB_OFFLINE=1) forbids downloading it",
                              hint="unset HF_HUB_OFFLINE (or set it to 0) to download it, or give a local folder") from None
        raise SourceError(f"{repo_id}{rev}: not in the local cache and the Hub cannot be reached",
                          hint="check the network or HF_ENDPOINT, or unset HF_HUB_OFFLINE") from None
    except E.EntryNotFoundError as e:
        raise SourceError(f"{repo_id}{rev}: file not found in the repository ({e})", hint="check the repo id and --revision") from None
    except E.RepositoryNotFoundError:
        raise SourceError(
            f"{repo_id}: repository not found (or private and your token has no access)",
            hint="check the repo id; for a private repo set HF_TOKEN",
        ) from None
    except E.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise SourceError(f"{repo_id}: the Hub refused access (HTTP {status})", hint="set HF_TOKEN to a valid token with read access") from None
        raise SourceError(f"{repo_id}{rev}: the Hub answered with an error ({e})", hint="try again; HF_ENDPOINT points at " + _endpoint()) from None
    except Exception as e:
        if isinstance(e, SourceError) or not is_network_error(e):
            raise
        raise SourceError(f"{repo_id}{rev}: cannot reach the Hub ({type(e).__name__}: {e})", hint="check the network or HF_ENDPOINT") from None


def is_network_error(e: BaseException) -> bool:
    """A transport failure from the HTTP stack under huggingface_hub (connection refused, timeout...)."""
    if isinstance(e, (OSError, ConnectionError, TimeoutError)):
        return True
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not os.path.exists(source)


class HubCheckpoint(Checkpoint):
    """A Hub model's checkpoint, read from safetensors headers fetched over HTTP, with shards
    downloaded one at a time. Same reading interface as :class:`Checkpoint`."""

    def __init__(self, repo_id: str, revision: str | None, workdir: Path, keep: bool = False):
        from huggingface_hub import get_safetensors_metadata

        self.repo_id = repo_id
        self.keep = keep
        self.streaming = False
        self._download = _checked_download
        self.path = self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.is_bin = False
        self._handles = {}
        self._bin_cache = None
        self._local: dict[str, Path] = {}
        self._owned: set[str] = set()
        self._threads: dict[str, threading.Thread] = {}
        self._errors: dict[str, BaseException] = {}
        offline = _offline()
        with hub_errors(repo_id, revision):
            if offline:
                from huggingface_hub import snapshot_download

                snap = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
                self.sha = snap.name
                files = [str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()]
            else:
                info = _model_info(repo_id, revision)
                self.sha = _checked_sha(info.sha, repo_id)
                files = [check_repo_path(s.rfilename, repo_id) for s in info.siblings or []]
        self.revision = self.sha
        self.repo_files = sorted(files)
        weights = [f for f in files if f.endswith(".safetensors") and "/" not in f]
        if not weights:
            raise SourceError(f"{repo_id}: no .safetensors weights in the repository", hint="qconvert reads safetensors from the Hub")
        self.weight_map = {}
        self._infos: dict[str, tuple] = {}
        with hub_errors(repo_id, self.sha):
            if offline:  # the cached snapshot read as a local folder: its index decides, as online
                ck = Checkpoint(snap)
                if ck.is_bin:
                    raise SourceError(f"{repo_id}: no model.safetensors or safetensors index in the cached snapshot",
                                      hint="qconvert reads safetensors from the Hub; go online to fetch them")
                for k in ck.keys():
                    self.weight_map[k] = f = ck.file_of(k)
                    self._local[f] = Path(snap) / f
                    self._infos[k] = (ck.dtype_name(k), ck.info(k)[1])
            else:
                meta = get_safetensors_metadata(repo_id, revision=self.sha)
                for f, fm in meta.files_metadata.items():
                    check_member_name(f, f"{repo_id}: weight_map")
                    for k, ti in fm.tensors.items():
                        self.weight_map[k] = f
                        self._infos[k] = (ti.dtype, tuple(ti.shape))
                if meta.weight_map:
                    self.weight_map = dict(meta.weight_map)
                    for f, names in self._files_to_names().items():
                        check_shard_against_index(self.weight_map, names, meta.files_metadata[f].tensors, f"{repo_id}/{f}")
        for f in self.repo_files:  # small files now: config.json for the plan, the companions to copy
            if f == "config.json" or is_companion_file(f):
                with hub_errors(repo_id, self.sha):
                    self._local[f] = Path(self._download(repo_id, f, revision=self.sha))

    # dtype and shape come from the headers read at start: planning downloads no shard
    def info(self, name: str):
        raw, shape = self._infos[name]
        if raw not in SAFETENSORS_DTYPES:
            raise SourceError(f"{self.repo_id}: tensor {name!r} has dtype {raw}, which qconvert cannot read")
        return SAFETENSORS_DTYPES[raw], shape

    def dtype_name(self, name: str) -> str:
        return self._infos[name][0]

    def config_dir(self) -> Path:
        if "config.json" not in self._local:
            raise SourceError(f"{self.repo_id}: no config.json in the repository")
        return self._local["config.json"].parent

    def extra_files(self):
        for f in sorted(self._local):
            if not is_weight_file(f) and not f.startswith("."):
                yield f, self._local[f]

    # -------------------------------------------------------------- shards
    def prefetch(self, file: str) -> None:
        if file in self._local or file in self._threads:
            return
        t = threading.Thread(target=self._fetch, args=(file,), daemon=True)
        self._threads[file] = t
        t.start()

    def _fetch(self, file: str) -> None:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(self.repo_id, file, revision=self.sha)
            if isinstance(cached, str) and not self.keep:
                self._local[file] = Path(cached)  # the user's cache: use in place, never delete
                return
            with hub_errors(self.repo_id, self.sha):
                if self.keep:
                    p = Path(self._download(self.repo_id, file, revision=self.sha))
                else:
                    p = Path(self._download(self.repo_id, file, revision=self.sha, local_dir=self.root / "shards"))
                    self._owned.add(file)
            self._local[file] = p
        except BaseException as e:  # re-raised in the converting thread by ensure()
            self._errors[file] = e

    def ensure(self, file: str) -> Path:
        self.prefetch(file)
        t = self._threads.get(file)
        if t is not None:
            t.join()
        if file in self._errors:
            raise self._errors.pop(file)
        return self._local[file]

    def _open(self, name: str):
        h = self._handles.get(name)
        if h is None:
            from safetensors import safe_open

            p = self.ensure(name)
            try:
                h = safe_open(str(p), framework="pt")
            except Exception as e:
                raise_resource_error(e, p)
                raise SourceError(f"{self.repo_id}/{name}: downloaded shard is not readable ({e})", hint="delete it from the cache and re-run") from None
            self._handles[name] = h
        return h

    def release(self, file: str) -> None:
        """Done with a shard: close it, and delete it if this run downloaded it privately."""
        self._handles.pop(file, None)
        if file in self._owned and not self.keep:
            p = self._local.pop(file, None)
            if p is not None:
                p.unlink(missing_ok=True)

    def cleanup(self) -> None:
        for t in self._threads.values():
            t.join()
        if not self.keep:
            shutil.rmtree(self.root / "shards", ignore_errors=True)


def _model_info(repo_id: str, revision: str | None):
    """model_info, telling a missing revision from a missing repo even where a server answers both
    with 404 'repository not found' (olah does, offline): if the repo resolves without the revision,
    it is the revision that is missing."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as E

    api = HfApi()
    try:
        return api.model_info(repo_id, revision=revision)
    except E.GatedRepoError:
        raise
    except E.RepositoryNotFoundError:
        if revision is None:
            raise
        try:
            api.model_info(repo_id)
        except Exception:
            raise E.RepositoryNotFoundError(f"{repo_id} not found") from None
        raise SourceError(f"{repo_id}: revision {revision!r} not found", hint="check the branch, tag or commit sha") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------- checked downloads into the HF cache
#: a commit sha as the Hub gives it
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
#: an ETag that may name a blob: a git blob sha1 or an LFS sha256, hex
BLOB_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
SAFE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: seconds a whole download may take; QCONVERT_DOWNLOAD_SECONDS sets another bound
DOWNLOAD_SECONDS = 4 * 3600.0


def _checked_download(repo_id: str, name: str, *, revision: str, local_dir: Path | None = None) -> str:
    """hf_hub_download's call shape, through :func:`fetch_file` (HubCheckpoint's downloader)."""
    return str(fetch_file(repo_id, revision, name, local_dir=local_dir))


def check_repo_path(name, repo_id: str) -> str:
    """A file name from a repo's listing, refused unless it is a plain relative path inside the repo."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if (not isinstance(name, str) or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 32 or c == "\x7f" for c in name) or len(name) > 1024):
        raise SourceError(f"{repo_id}: the Hub lists a file named {name!r}, which is not a path inside the repository",
                          hint="a server that answers this is broken or hostile; check HF_ENDPOINT")
    return name


def download_seconds() -> float:
    from .readers import seconds_setting

    return seconds_setting("QCONVERT_DOWNLOAD_SECONDS", DOWNLOAD_SECONDS, SourceError)


def fetch_snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, repo_type: str = "dataset") -> Path:
    """The files of a Hub repo matching ``patterns``, in the Hugging Face cache's own layout
    (blobs/ETAG, snapshots/SHA/NAME linking to it, refs/REVISION), so ``HF_HUB_OFFLINE=1`` finds them
    later. Unlike huggingface_hub 2.4, which builds those paths from the server's ETag and commit sha
    unchecked, every name is checked before it becomes a path (sha: 40 hex; ETag: a hex blob id;
    file names: :func:`check_repo_path`), and the whole download has a deadline
    (:func:`download_seconds`). Offline, the cached snapshot is returned as huggingface_hub finds it."""
    import time

    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    with hub_errors(repo_id, revision):
        if _offline():
            return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                          local_files_only=True))
        deadline = time.monotonic() + download_seconds()
        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
        sha = _checked_sha(info.sha, repo_id)
        names = [check_repo_path(s.rfilename, repo_id) for s in info.siblings or []]
        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        snapshot = storage / "snapshots" / sha
        for name in filter_repo_objects(names, allow_patterns=patterns):
            _fetch_file(repo_id, repo_type, sha, name, storage, deadline)
        snapshot.mkdir(parents=True, exist_ok=True)
        ref = "main" if revision is None else revision
        if ref != sha and SAFE_REF.fullmatch(ref):
            _write_atomic(storage / "refs" / ref, sha.encode())
        return snapshot


def _checked_sha(sha, repo_id: str) -> str:
    if not isinstance(sha, str) or not COMMIT_SHA.fullmatch(sha):
        raise SourceError(f"{repo_id}: the Hub answered the commit sha {sha!r}, which is not 40 hex digits",
                          hint="a server that answers this is broken or hostile; check HF_ENDPOINT")
    return sha


def fetch_file(repo_id: str, sha: str, name: str, *, local_dir: Path | None = None, repo_type: str = "model") -> Path:
    """One file of a Hub repo at commit ``sha`` through the checks of :func:`fetch_snapshot`: into the
    Hugging Face cache (the snapshot's path is returned), or with ``local_dir`` into ``local_dir/name``
    (a private folder the caller deletes)."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    _checked_sha(sha, repo_id)
    check_repo_path(name, repo_id)
    deadline = time.monotonic() + download_seconds()
    with hub_errors(repo_id, sha):
        if _offline():  # the cache alone: no server answer becomes a path
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id, name, repo_type=repo_type, revision=sha, local_dir=local_dir,
                                        local_files_only=True))
        if local_dir is not None:
            meta = _checked_meta(repo_id, repo_type, sha, name)
            dest = Path(local_dir) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            _stream(meta.location, dest, meta.size, deadline, f"{repo_id}: {name}")
            return dest
        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        _fetch_file(repo_id, repo_type, sha, name, storage, deadline)
        return storage / "snapshots" / sha / name


def _checked_meta(repo_id: str, repo_type: str, sha: str, name: str):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo_id, name, repo_type=repo_type, revision=sha))
    if meta.commit_hash != sha:
        raise SourceError(f"{repo_id}: the Hub serves {name!r} from commit {meta.commit_hash!r}, not {sha}",
                          hint="a server that answers this is broken or hostile; check HF_ENDPOINT")
    if not isinstance(meta.etag, str) or not BLOB_ETAG.fullmatch(meta.etag):
        raise SourceError(f"{repo_id}: the Hub gives {name!r} the ETag {meta.etag!r}, which is not a blob id",
                          hint="a server that answers this is broken or hostile; check HF_ENDPOINT")
    return meta


def _fetch_file(repo_id: str, repo_type: str, sha: str, name: str, storage: Path, deadline: float) -> None:
    """One file into blobs/ETAG (skipped when that blob is there), linked from snapshots/SHA/NAME."""
    meta = _checked_meta(repo_id, repo_type, sha, name)
    blob = storage / "blobs" / meta.etag
    if not (blob.is_file() and not blob.is_symlink() and (meta.size is None or blob.stat().st_size == meta.size)):
        blob.parent.mkdir(parents=True, exist_ok=True)
        _stream(meta.location, blob, meta.size, deadline, f"{repo_id}: {name}")
    pointer = storage / "snapshots" / sha / name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.qconvert-{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(blob, pointer.parent))
    os.replace(tmp, pointer)


def _stream(url: str, dest: Path, size: int | None, deadline: float, shown: str) -> None:
    """GET ``url`` into ``dest`` through a temporary file created exclusively, never through a link;
    stopped at the deadline however slowly the bytes come, and at more bytes than announced."""
    import time

    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    tmp = dest.with_name(f".{dest.name}.qconvert-{os.getpid()}.incomplete")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        got = 0
        with os.fdopen(fd, "wb") as f, get_session().stream("GET", url, headers=build_hf_headers(), follow_redirects=True) as r:
            hf_raise_for_status(r)
            for chunk in r.iter_bytes():
                got += len(chunk)
                if size is not None and got > size:
                    raise SourceError(f"{shown}: the server sent more than the {size} bytes it announced")
                if time.monotonic() > deadline:
                    raise SourceError(f"{shown}: the download ran past {download_seconds():g} s ({got} bytes received)",
                                      hint="the server is too slow or stalls; QCONVERT_DOWNLOAD_SECONDS sets the bound")
                f.write(chunk)
        if size is not None and got != size:
            raise SourceError(f"{shown}: the server sent {got} of the {size} bytes it announced", hint="try again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.qconvert-{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
