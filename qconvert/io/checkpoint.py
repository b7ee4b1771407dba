"""Read Hugging Face-layout checkpoints lazily, one tensor at a time.

A :class:`Checkpoint` is a folder holding ``model.safetensors`` or ``model-0000k-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (or ``pytorch_model*.bin``), or a single ``.safetensors`` file.
Nothing is loaded until asked for; names in an index are checked before any file is opened.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import OPEN_FILES_HINT, FormatError, SourceError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: Safetensors handles (memory maps) a Checkpoint keeps open at once; see Checkpoint._open.
MAX_OPEN_SHARDS = 256
#: Largest config.json or index JSON read (a real one is under 10 MB; DeepSeek-V3's index is 9 MB).
MAX_JSON_BYTES = 64 * 2**20
#: config.json fields that count layers: each layer has at least one tensor, so none of them may
#: exceed the number of tensors present (a model skeleton is built from them before any is read).
LAYER_COUNT_KEYS = (
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "num_encoder_layers",
    "encoder_layers", "decoder_layers",
)
#: config.json fields that count experts: stored one tensor per expert or stacked along a dimension,
#: so none may exceed both the number of tensors and the largest tensor dimension.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

#: The files copied from a source model folder next to the weights (docs/quantize.md): the
#: tokenizer, chat templates, generation/processor configs, licences and sentence-transformers
#: module configs. Nothing else is copied: not notes, keys or code (``*.py`` remote code is never run
#: by qconvert and is not republished), and no folder is walked.
COMPANION_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "image_processor_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md", "NOTICE", "NOTICE.txt",
    "NOTICE.md", "USE_POLICY.md",
})
#: Patterns: tiktoken vocabularies, and one level of sub-folder: sentence-transformers modules
#: (``1_Pooling/config.json``) and transformers' extra chat templates (``additional_chat_templates/NAME.jinja``).
COMPANION_SUBFILES = (
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tiktoken"),  # tiktoken vocabularies (qwen.tiktoken)
    re.compile(r"[0-9]+_[A-Za-z][A-Za-z0-9]*/config\.json"),
    re.compile(r"additional_chat_templates/[A-Za-z0-9][A-Za-z0-9_.-]*\.jinja"),
)
COMPANION_SUBDIRS = re.compile(r"[0-9]+_[A-Za-z][A-Za-z0-9]*|additional_chat_templates")


def is_weight_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(WEIGHT_SUFFIXES) or base in (SAFE_INDEX, BIN_INDEX)


def is_companion_file(rel: str) -> bool:
    """Whether ``rel`` (a path relative to the model folder, with ``/``) is a file worth carrying over
    from a source model: see :data:`COMPANION_FILES`."""
    return rel in COMPANION_FILES or any(p.fullmatch(rel) for p in COMPANION_SUBFILES)


def refuse_linked_weights(root: Path) -> None:
    """Refuse a model folder any of whose weight files, index or config.json is a link out of it
    (:func:`.links.refuse_outside`), before a library that reads the folder itself (transformers'
    ``from_pretrained``) follows it. :class:`Checkpoint` checks each file it opens the same way."""
    from .links import refuse_outside

    for p in Path(root).iterdir():
        if is_weight_file(p.name) or p.name == "config.json":
            refuse_outside(p, Path(root))


def read_json_object(path: Path, what: str, *, unique: bool = False) -> dict[str, Any]:
    """A JSON object from a small file of a model or adapter folder, refused when it is a link out of
    that folder (:func:`.links.refuse_outside`), too large, not UTF-8 JSON, or not an object. ``unique``: also refuse an object that repeats a name (JSON readers differ on which one wins)."""
    from .links import refuse_outside

    refuse_outside(path, path.parent, "adapter" if what == "adapter_config.json" else "model")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(
                f"{path}: {what} is {size / 1e6:.0f} MB, over the {MAX_JSON_BYTES >> 20} MiB that qconvert reads",
                hint="a real one is far smaller; re-download it",
            )
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(MAX_JSON_BYTES + 1), object_pairs_hook=_unique_object if unique else None)
    except _RepeatedName as e:
        raise FormatError(f"{path}: {what} names {e.args[0]!r} twice", hint="readers differ on which entry wins; regenerate it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise_resource_error(e, path)
        raise FormatError(f"{path}: not valid JSON ({what})", detail=f"{type(e).__name__}: {e}", hint="re-download or regenerate it") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object, not {type(data).__name__}", hint="re-download or regenerate it")
    return data


class _RepeatedName(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        raise _RepeatedName(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def check_member_name(name: Any, where: str) -> str:
    """A file name from an index must be a plain name inside the folder (checked by name, not by
    resolving links: Hub cache snapshots are symlinks into blobs/)."""
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or os.path.isabs(name)
        or "\x00" in name
    ):
        raise FormatError(
            f"{where}: names file {name!r}, which is outside the checkpoint folder",
            hint="an index may only name shard files that sit in the same folder",
        )
    return name


def read_index(path: Path) -> dict[str, str]:
    """weight_map of an index file, validated."""
    data = read_json_object(path, "the index", unique=True)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise FormatError(f"{path}: no 'weight_map' object", hint="the index must map tensor names to shard files")
    for k, v in wm.items():
        check_member_name(v, f"{path.name}: weight_map[{k!r}]")
    meta = data.get("metadata")
    if meta is not None and not isinstance(meta, dict):  # transformers indexes into it as an object
        raise FormatError(f"{path}: 'metadata' must be a JSON object, not {type(meta).__name__}",
                          hint="an index holds {\"metadata\": {\"total_size\": N}, \"weight_map\": {...}}; regenerate it")
    return wm


def refuse_adapter_as_model(root: Path) -> None:
    """A LoRA adapter folder where a model belongs (``merge run qwen-nf4 OUT``, arguments swapped) is
    named as such: "no model.safetensors" would not tell the user what they passed."""
    if (Path(root) / "adapter_config.json").is_file():
        raise SourceError(f"{root}: a LoRA adapter (adapter_config.json), not a model",
                          hint="give the model the adapter was trained on here, and the adapter where the command takes one "
                               "(--adapter; merge BASE ADAPTER OUT)")


class Checkpoint:
    """Lazy view of a checkpoint folder or a single safetensors file."""

    _by_file: tuple[tuple[int, int], dict[str, list[str]]] | None = None  # file -> its tensor names, built once
    _companions: dict[str, list[str]] | None = None  # 4-bit weight -> its entries, built once
    _storage: torch.dtype | None = None  # the dtype config.json says packed codes are stored in, read once

    def __init__(self, path: str | os.PathLike, streaming: bool = False):
        #: streaming: read each tensor through a short-lived handle, so a shard's memory-mapped pages
        #: do not stay resident while the next tensors are read (they count towards RSS)
        self.streaming = streaming
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder", hint="pass a checkpoint folder or a .safetensors file")
        if not self.path.is_dir() and not self.path.is_file():
            raise SourceError(f"{self.path}: not a regular file or folder", hint="pass a checkpoint folder or a .safetensors file")
        if self.path.is_file() and not self.path.name.endswith((".safetensors", ".bin")):
            raise SourceError(
                f"{self.path}: not a .safetensors (or PyTorch .bin) weights file",
                hint="pass the checkpoint folder, or one of its .safetensors files",
            )
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.weight_map: dict[str, str] = {}
        self.is_bin = False
        self._handles: dict[str, Any] = {}  # file -> safetensors handle, least recently used first
        self._checked: set[str] = set()  # files whose header passed check_header
        self._bin_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        if self.path.is_file():
            self._add_file(self.path.name)
        elif (self.root / SAFE_INDEX).is_file():
            self.weight_map = read_index(self.root / SAFE_INDEX)
            self._verify_index()
        elif (self.root / "model.safetensors").is_file():
            self._add_file("model.safetensors")
        elif (self.root / BIN_INDEX).is_file():
            self.is_bin = True
            self.weight_map = read_index(self.root / BIN_INDEX)
            self._check_files_exist()
        elif (self.root / "pytorch_model.bin").is_file():
            self.is_bin = True
            self._add_file("pytorch_model.bin")
        else:
            refuse_adapter_as_model(self.root)
            raise SourceError(
                f"{self.root}: no model.safetensors, sharded safetensors index, or pytorch_model.bin found",
                hint="point at a folder in Hugging Face layout",
            )

    # ----------------------------------------------------------------- files
    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _inside(self, p: Path) -> None:
        """A weight file of a folder source must lie in the folder once links are followed (a single
        file given as SOURCE is the input itself, wherever its link points)."""
        if not self.path.is_file():
            from .links import refuse_outside

            refuse_outside(p, self.root)

    def _check_files_exist(self) -> None:
        for f in self.files:
            p = self.root / f
            self._inside(p)
            if not p.is_file():
                what = "is missing" if not p.exists() and not p.is_symlink() else "is not a regular file"
                raise SourceError(f"{p}: shard named in the index {what}", hint="re-download the checkpoint")

    def _add_file(self, name: str) -> None:
        if name.endswith(".bin"):
            self.is_bin = True
            for k in self._load_bin(name):
                self.weight_map[k] = name
        else:
            for k in self._open(name).keys():
                self.weight_map[k] = name

    def _verify_index(self) -> None:
        self._check_files_exist()
        for f, names in self._files_to_names().items():
            check_shard_against_index(self.weight_map, names, self._open(f).keys(), self.root / f)

    def _open(self, name: str):
        """A safetensors handle on weight file ``name``. At most :data:`MAX_OPEN_SHARDS` stay open
        (the least recently used is let go): each holds a memory map, and a process may hold only
        so many (vm.max_map_count, 65,530 by default), so a checkpoint of more shards than that
        failed as "out of memory". A file's header is checked once, however often it is reopened."""
        h = self._handles.pop(name, None)
        if h is None:
            from safetensors import safe_open

            from ..format.conformance import check_header

            p = self.root / name
            if name not in self._checked:
                self._inside(p)
                try:
                    check_header(p)  # duplicate names, which safetensors accepts (spec 9); the rest is safetensors' own check
                except OSError as e:  # a permission, a missing file: the CLI reports the OSError as it is
                    raise_resource_error(e, p)
                    raise
                self._checked.add(name)
            try:
                h = safe_open(str(p), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError, OSError and MemoryError
                raise_resource_error(e, p)
                raise FormatError(
                    f"{p}: not a readable safetensors file ({e})", hint="the file is truncated or corrupt; re-download it"
                ) from None
            while len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles)))
        self._handles[name] = h  # the most recently used last
        return h

    def _load_bin(self, name: str) -> dict[str, torch.Tensor]:
        if self._bin_cache and self._bin_cache[0] == name:
            return self._bin_cache[1]
        p = self.root / name
        self._inside(p)
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise_resource_error(e, p)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FormatError(
                f"{p}: cannot load as a weights-only PyTorch file ({first})",
                hint="qconvert never runs pickled code; convert the file to safetensors, or re-download it",
            ) from None
        self._bin_cache = (name, sd)
        return sd

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None

    @contextlib.contextmanager
    def held_open(self):
        """Within the block a streaming checkpoint reads through its cached handles (one header parse
        per file, not one per tensor), and lets them go at the end. Loading a MoE's per-expert 4-bit
        weights (6 entries each) re-parsed a 4,700-key header 5,445 times: 108 of a 169 s load."""
        streaming, self.streaming = self.streaming, False
        try:
            yield self
        finally:
            self.streaming = streaming
            if streaming:
                self._handles.clear()

    # --------------------------------------------------------------- tensors
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        f = self.weight_map[name]
        if self.is_bin:
            return self._load_bin(f)[name]
        try:
            if self.streaming:
                from safetensors import safe_open

                with safe_open(str(self.root / f), framework="pt") as h:
                    return h.get_tensor(name)
            return self._open(f).get_tensor(name)
        except FormatError:
            raise
        except Exception as e:
            raise_resource_error(e, self.root / f)
            raise FormatError(
                f"{self.root / f}: cannot read tensor {name!r} ({e})", hint="the shard is truncated or corrupt; re-download it"
            ) from None

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor without reading its data."""
        f = self.weight_map[name]
        if self.is_bin:
            t = self._load_bin(f)[name]
            return t.dtype, tuple(t.shape)
        sl = self._open(f).get_slice(name)
        dt = sl.get_dtype()
        if dt not in SAFETENSORS_DTYPES:
            return torch.float32, tuple(sl.get_shape())  # unknown to torch (F8_E8M0, F4 ...): sized as 4-byte
        return SAFETENSORS_DTYPES[dt], tuple(sl.get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string of a tensor (``str(torch dtype)`` for .bin checkpoints)."""
        f = self.weight_map[name]
        if self.is_bin:
            dt = self._load_bin(f)[name].dtype
            return DTYPE_NAMES.get(dt, str(dt))
        return self._open(f).get_slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        dt, shape = self.info(name)
        return math.prod(shape) * torch.empty((), dtype=dt).element_size()

    def metadata(self, file: str) -> dict[str, str]:
        if self.is_bin:
            return {}
        return dict(self._open(file).metadata() or {})

    def iter_file(self, file: str) -> Iterator[str]:
        """Tensor names stored in ``file``, in the order they appear in the index/file."""
        return iter(self._files_to_names().get(file, []))

    def _files_to_names(self) -> dict[str, list[str]]:
        # grouped once: looping over all names per file is quadratic in a hostile index of many shards
        stamp = (id(self.weight_map), len(self.weight_map))  # rebuilt if the map was replaced or grew
        if self._by_file is None or self._by_file[0] != stamp:
            by_file: dict[str, list[str]] = {}
            for k, v in self.weight_map.items():
                by_file.setdefault(v, []).append(k)
            self._by_file = (stamp, by_file)
        return self._by_file[1]

    def _largest_dim(self) -> int:
        def dims(k: str) -> tuple[int, ...]:
            try:
                return self.info(k)[1]
            except SourceError:  # a Hub tensor of a dtype torch lacks: its shape does not matter here
                return ()

        return max((max(dims(k), default=0) for k in self.weight_map), default=0)

    def companions(self, name: str) -> list[str]:
        """Every entry of the 4-bit weight ``name`` (as :func:`layout.companion_keys`), from an index
        of all names built once, so that looking up every weight stays linear in the number of names."""
        from ..format.layout import companion_index

        if self._companions is None:
            self._companions = companion_index(self.weight_map)
        return self._companions.get(name) or ([name] if name in self.weight_map else [])

    def config_dir(self) -> Path:
        """The folder holding config.json (and tokenizer files)."""
        return self.root

    def extra_files(self) -> Iterator[tuple[str, Path]]:
        """(relative name, path) of the entries beside the weights that are not weights or hidden, for
        the caller to choose from with :func:`is_companion_file`. Only the folder itself is listed,
        plus one level into the sub-folders that hold companion files (``1_Pooling/``): nothing is
        walked, and entries are given as they are (links, folders and other non-files included)."""
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or is_weight_file(p.name):
                continue
            if COMPANION_SUBDIRS.fullmatch(p.name) and p.is_dir():
                for c in sorted(p.iterdir()):
                    if not c.name.startswith(".") and not is_weight_file(c.name):
                        yield f"{p.name}/{c.name}", c
            else:
                yield p.name, p

    def release(self, file: str) -> None:
        """Done with a file (a no-op for local folders)."""
        self._handles.pop(file, None)

    def prefetch(self, file: str) -> None:
        """Start fetching a file in the background (a no-op for local folders)."""

    def quantized(self, name: str, device: "torch.device | str | None" = None):
        """The 4-bit weight ``name`` as a validated QuantizedTensor (its entries must share one file)."""
        from ..format.layout import QuantizedTensor

        comp = self.companions(name)
        files = {self.file_of(k) for k in comp}
        if len(files) != 1:
            raise FormatError(
                f"{self.root}: the entries of {name!r} are split across {sorted(files)}",
                hint="all entries of a weight must share one file",
            )
        tensors = {k: self.get(k) if device is None else self.get(k).to(device) for k in comp}
        return QuantizedTensor.from_state_dict(name, tensors, where=str(self.root / files.pop()), storage=self.quant_storage())

    def quant_storage(self) -> torch.dtype:
        """The dtype the packed codes are stored in, from config.json's ``bnb_4bit_quant_storage``
        (uint8 without one; layout.quant_storage). Their bytes are the codes, whatever the dtype."""
        if self._storage is None:
            from ..format.layout import quant_storage

            cfg = self.config() or {}
            self._storage = quant_storage(cfg.get("quantization_config"), str(self.config_dir() / "config.json"))
        return self._storage

    def config(self) -> dict[str, Any] | None:
        """config.json, refused when it is not a JSON object or sizes layers it cannot have: a
        layer count above the number of tensors present (model skeletons are built from it)."""
        p = self.config_dir() / "config.json"
        if not p.is_file():
            return None
        config = read_json_object(p, "config.json")
        check_layer_counts(config, len(self.weight_map), p, self._largest_dim)
        return config


def check_shard_against_index(weight_map: dict[str, str], listed: list[str], present, where: Path | str) -> None:
    """A shard named by an index holds exactly what the index lists for it (``listed``), apart from
    copies of tensors the index places in another shard: a tensor it leaves out entirely would be
    neither converted nor checked, and one it lists but the shard lacks cannot be read."""
    present = set(present)
    for k in listed:
        if k not in present:
            raise FormatError(
                f"{where}: tensor {k!r} is listed in {SAFE_INDEX} but missing from this shard",
                hint="the index and the shards disagree; re-download the checkpoint",
            )
    hidden = present.difference(weight_map)
    if hidden:
        raise FormatError(
            f"{where}: holds {len(hidden)} tensor(s) that {SAFE_INDEX} does not list, e.g. {min(hidden)!r}",
            hint="the index and the shards disagree (a tensor it leaves out would be neither converted nor checked); "
            "re-download the checkpoint",
        )


def check_layer_counts(config: dict[str, Any], n_tensors: int, where: Path | str, largest_dim=lambda: 0) -> None:
    """Refuse a layer count (top level or one level down, e.g. ``text_config``) that is not a
    non-negative integer no larger than the number of tensors in the checkpoint, and an expert count
    larger than both that and ``largest_dim()`` (asked only then: it reads every tensor's shape)."""
    subs = [("", config)] + [(f"{k}.", v) for k, v in config.items() if isinstance(v, dict)]
    for prefix, d in subs:
        for keys, limit in ((LAYER_COUNT_KEYS, lambda: n_tensors), (EXPERT_COUNT_KEYS, lambda: max(n_tensors, largest_dim()))):
            for key in keys:
                v = d.get(key)
                if v is None or (type(v) is int and 0 <= v <= n_tensors):
                    continue
                if type(v) is not int or v < 0 or v > limit():
                    what = "tensors" if keys is LAYER_COUNT_KEYS else "tensors, none with a dimension that large"
                    raise FormatError(
                        f"{where}: {prefix}{key} is {str(v)[:40]}, but the checkpoint holds {n_tensors} {what}",
                        hint="config.json does not describe these weights; use the config.json that came with them",
                    )


def raise_resource_error(e: BaseException, path: Path) -> None:
    """Raise a SourceError that names the exhausted resource, not corruption, when reading ``path``
    failed for want of memory or address space (mapping a valid file needs address space as large as
    the file) or of file descriptors (the open-file limit, ``ulimit -n``); return otherwise."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        try:
            size = f"{path.stat().st_size / 1e9:.2f} GB"
        except OSError:
            size = "the file"
        raise SourceError(
            f"{path}: out of memory or address space while mapping it ({size})",
            hint="the file is not necessarily damaged: raise the memory limit (ulimit -v) or free memory, then re-run",
        ) from None
    if out_of_file_descriptors(e):
        raise SourceError(
            f"{path}: too many open files while opening it ({open_file_limit()})",
            hint=OPEN_FILES_HINT,
        ) from None


def out_of_file_descriptors(e: BaseException) -> bool:
    """Whether ``e`` came from the process (EMFILE) or the system (ENFILE) running out of file
    descriptors. safetensors reports a failed open() as a FileNotFoundError or RuntimeError without
    an errno, so for any other exception this asks the system itself: it opens two descriptors
    (``safe_open`` holds two at once) and looks at the errno of a refusal."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in (errno.EMFILE, errno.ENFILE)
    held: list[int] = []
    try:
        for _ in range(2):
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as probe:
        return probe.errno in (errno.EMFILE, errno.ENFILE)
    finally:
        for fd in held:
            os.close(fd)
    return False


def open_file_limit() -> str:
    """The process's open-file limit, in words (for the error above)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return "the open-file limit is reached"
    return "the open-file limit is reached" if soft == resource.RLIM_INFINITY else f"this process may hold {soft} open files"
