"""Read Hugging Face-layout checkpoints lazily, one tensor at a time.

A :class:`Checkpoint` is a folder holding ``model.safetensors`` or ``model-0000k-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (or ``pytorch_model*.bin``), or a single ``.safetensors`` file.
Nothing is loaded until asked for; names in an index are checked before any file is opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import FormatError, SourceError

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


def is_weight_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(WEIGHT_SUFFIXES) or base in (SAFE_INDEX, BIN_INDEX)


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read index ({e})", hint="re-download or regenerate the index") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise FormatError(f"{path}: no 'weight_map' object", hint="the index must map tensor names to shard files")
    for k, v in wm.items():
        check_member_name(v, f"{path.name}: weight_map[{k!r}]")
    return wm


class Checkpoint:
    """Lazy view of a checkpoint folder or a single safetensors file."""

    def __init__(self, path: str | os.PathLike, streaming: bool = False):
        #: streaming: read each tensor through a short-lived handle, so a shard's memory-mapped pages
        #: do not stay resident while the next tensors are read (they count towards RSS)
        self.streaming = streaming
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder", hint="pass a checkpoint folder or a .safetensors file")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.weight_map: dict[str, str] = {}
        self.is_bin = False
        self._handles: dict[str, Any] = {}
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
            raise SourceError(
                f"{self.root}: no model.safetensors, sharded safetensors index, or pytorch_model.bin found",
                hint="point at a folder in Hugging Face layout",
            )

    # ----------------------------------------------------------------- files
    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _check_files_exist(self) -> None:
        for f in self.files:
            if not (self.root / f).is_file():
                raise SourceError(f"{self.root / f}: shard named in the index is missing", hint="re-download the checkpoint")

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
        for f in self.files:
            present = set(self._open(f).keys())
            for k, v in self.weight_map.items():
                if v == f and k not in present:
                    raise FormatError(
                        f"{self.root / f}: tensor {k!r} is listed in {SAFE_INDEX} but missing from this shard",
                        hint="the index and the shards disagree; re-download the checkpoint",
                    )

    def _open(self, name: str):
        h = self._handles.get(name)
        if h is None:
            from safetensors import safe_open

            p = self.root / name
            try:
                h = safe_open(str(p), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError and OSError
                raise FormatError(
                    f"{p}: not a readable safetensors file ({e})", hint="the file is truncated or corrupt; re-download it"
                ) from None
            self._handles[name] = h
        return h

    def _load_bin(self, name: str) -> dict[str, torch.Tensor]:
        if self._bin_cache and self._bin_cache[0] == name:
            return self._bin_cache[1]
        p = self.root / name
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
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
        return (k for k, v in self.weight_map.items() if v == file)

    def config_dir(self) -> Path:
        """The folder holding config.json (and tokenizer files)."""
        return self.root

    def extra_files(self) -> Iterator[tuple[str, Path]]:
        """(relative name, path) of every non-weight file: tokenizer, chat template, generation
        config, processor and sentence-transformers files. Hidden files are left out."""
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not is_weight_file(rel) and not any(part.startswith(".") for part in rel.split("/")):
                yield rel, p

    def release(self, file: str) -> None:
        """Done with a file (a no-op for local folders)."""
        self._handles.pop(file, None)

    def prefetch(self, file: str) -> None:
        """Start fetching a file in the background (a no-op for local folders)."""

    def quantized(self, name: str, device: "torch.device | str | None" = None):
        """The 4-bit weight ``name`` as a validated QuantizedTensor (its entries must share one file)."""
        from .layout import QuantizedTensor, companion_keys

        comp = companion_keys(name, self.keys())
        files = {self.file_of(k) for k in comp}
        if len(files) != 1:
            raise FormatError(
                f"{self.root}: the entries of {name!r} are split across {sorted(files)}",
                hint="all entries of a weight must share one file",
            )
        tensors = {k: self.get(k) if device is None else self.get(k).to(device) for k in comp}
        return QuantizedTensor.from_state_dict(name, tensors, where=str(self.root / files.pop()))

    def config(self) -> dict[str, Any] | None:
        p = self.config_dir() / "config.json"
        if not p.is_file():
            return None
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{p}: not valid JSON", detail=str(e), hint="fix the file or re-download it") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{p}: must hold a JSON object, not {type(cfg).__name__}", hint="fix the file or re-download it")
        return cfg
