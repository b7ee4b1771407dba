"""Quantized sources: which scheme a checkpoint's ``quantization_config`` names, and a reader that
shows the plan and the writer the 16-bit weights transformers would load from it.

Two schemes are read, both the way ``from_pretrained`` dequantizes them (the numbers are in
:mod:`qconvert.quant.source_dequant`):

* ``fp8`` (DeepSeek-V3, Kimi K2, Qwen3 and MiniMax FP8 releases): ``P.weight`` float8_e4m3fn or
  float8_e5m2 with ``P.weight_scale_inv``, one scale per ``weight_block_size`` block. Static
  ``P.activation_scale`` tensors are not written, as transformers drops them when it dequantizes.
* ``mxfp4`` (gpt-oss): ``P_blocks`` + ``P_scales`` (uint8) become ``P`` [experts, in, out].

:class:`DequantizingReader` wraps any checkpoint reader: the pairs above appear as one tensor each,
in the dtype transformers gives the parameter they load into, and are dequantized one at a time
when the writer asks (memory stays flat). Every other tensor passes through unchanged. Any other
``quant_method`` (gptq, awq, compressed-tensors, a bitsandbytes checkpoint...) is refused by name:
qconvert never guesses what stored integers mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError, SourceError
from ..io.checkpoint import DTYPE_NAMES
from ..format.layout import dtype_name
from ..quant.source_dequant import FP8_DTYPES, MXFP4_BLOCK_BYTES, dequantize_fp8, dequantize_mxfp4, fp8_scale_grid, mxfp4_shape
from .meta import load_dtype

FP8_SCALE = "_scale_inv"  # P.weight_scale_inv beside P.weight
FP8_ACTIVATION_SCALE = ".activation_scale"
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
ACTIVATION_DROPPED = "an FP8 activation scale (transformers drops it when it dequantizes the weights)"
READ_HINT = ("qconvert reads 16/32-bit checkpoints and FP8 (quant_method fp8) or MXFP4 (quant_method mxfp4) "
             "releases; quantize the 16-bit original instead")


@dataclass(frozen=True)
class Scheme:
    """A source's quantization, as its config.json states it."""

    method: str  # "fp8" or "mxfp4"
    block: tuple[int, int] | None = None  # fp8 weight_block_size; None: one scale per tensor


def source_scheme(config: dict[str, Any] | None, where: str) -> Scheme | None:
    """The scheme named by ``config['quantization_config']``, None for a plain checkpoint; a
    scheme qconvert does not read is a SourceError naming it."""
    qc = (config or {}).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
        raise SourceError(f"{where}: quantization_config is not an object with a quant_method string", hint=READ_HINT)
    method = qc["quant_method"]
    if method == "fp8":
        return Scheme("fp8", _block_size(qc.get("weight_block_size"), where))
    if method == "mxfp4":
        return Scheme("mxfp4")
    if method == "bitsandbytes":
        bits = "4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else "quantized"
        raise SourceError(f"{where}: the source is already a bitsandbytes {bits} checkpoint (quant_method bitsandbytes)",
                          hint="use it as it is (qconvert verify / inspect / load it), or quantize its 16-bit original")
    raise SourceError(f"{where}: the source is quantized with {method!r} (quantization_config.quant_method), "
                      "which qconvert cannot read", hint=READ_HINT)


def _block_size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and 0 < v <= 2**20 for v in value)):
        raise SourceError(f"{where}: quantization_config.weight_block_size must be two positive integers, not {value!r}")
    return value[0], value[1]


def read_source(src, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Source tensor ``name`` for a plan item written in ``dtype``: from a quantized source dequantized
    straight into that dtype, as transformers dequantizes into the parameter's own dtype."""
    return src.get(name, dtype) if isinstance(src, DequantizingReader) else src.get(name)


def reading_view(ckpt):
    """``ckpt`` itself for a plain checkpoint, else a :class:`DequantizingReader` over it."""
    if isinstance(ckpt, DequantizingReader):
        return ckpt
    scheme = source_scheme(ckpt.config(), f"{ckpt.config_dir() / 'config.json'}" if ckpt.config() else str(ckpt.root))
    return ckpt if scheme is None else DequantizingReader(ckpt, scheme)


class DequantizingReader:
    """A checkpoint reader (io/reader.py's protocol, plus what the plan asks) over a quantized
    source: each stored pair (weight and scales) is one tensor, dequantized when read."""

    def __init__(self, inner, scheme: Scheme):
        self.inner, self.scheme, self.root = inner, scheme, inner.root
        self.parts: dict[str, tuple[str, str]] = {}  # shown name -> (stored weight or blocks, its scales)
        self.dropped: dict[str, str] = {}  # stored name -> why it is not shown
        (self._pair_fp8 if scheme.method == "fp8" else self._pair_mxfp4)(set(inner.keys()))
        self._name_of = {w: name for name, (w, _) in self.parts.items()}  # stored weight or blocks -> shown name
        hidden = {s for _, s in self.parts.values()} | set(self.dropped)
        self._shown = {k: None for k in inner.keys() if k not in hidden}  # stored names shown (as themselves or a pair)
        plain = (inner.info(k)[0] for k in self._shown if k not in self._name_of)
        self.dtype = load_dtype(self.config(), next((d for d in plain if d.is_floating_point and d not in FP8_DTYPES), None))
        # a stored pair split over two files keeps both open until it is read (release is deferred)
        self._waiting: dict[str, set[str]] = {}
        self._release_pending: set[str] = set()
        for name, (w, s) in self.parts.items():
            if inner.file_of(w) != inner.file_of(s):
                self._waiting.setdefault(inner.file_of(s), set()).add(name)

    # ------------------------------------------------------------ pairing
    def _pair_fp8(self, keys: set[str]) -> None:
        where = self.root
        for k in sorted(keys):
            if k.endswith(FP8_ACTIVATION_SCALE):
                self.dropped[k] = ACTIVATION_DROPPED
            elif k.endswith(".weight" + FP8_SCALE):
                w = k.removesuffix(FP8_SCALE)
                if w not in keys:
                    raise FormatError(f"{where}: FP8 scale {k!r} has no weight {w!r} beside it")
                self._check_fp8_pair(w, k)
                self.parts[w] = (w, k)
        for k in sorted(keys - set(self.parts)):
            if self.inner.dtype_name(k) in ("F8_E4M3", "F8_E5M2"):
                raise FormatError(f"{where}: FP8 tensor {k!r} has no {k + FP8_SCALE!r} beside it",
                                  hint="qconvert reads block-scaled FP8 weights (weight + weight_scale_inv)")

    def _check_fp8_pair(self, w: str, k: str) -> None:
        """An FP8 weight (2-D or more) and a scale grid of one scale per block, from the headers."""
        (dt, shape), grid = self.inner.info(w), tuple(self.inner.info(k)[1])
        if dt not in FP8_DTYPES or len(shape) < 2:
            raise FormatError(f"{self.root}: {w!r} has a block scale but is {self.inner.dtype_name(w)} {list(shape)}, "
                              "not an FP8 matrix")
        block = self.scheme.block or tuple(shape[-2:])
        want = fp8_scale_grid(tuple(shape), block)
        if grid != want and not (self.scheme.block is None and math.prod(grid) == 1):
            raise FormatError(f"{self.root}: {k!r} has shape {list(grid)}; a {list(shape)} weight in blocks of "
                              f"{block[0]}x{block[1]} has {list(want)}",
                              hint="check quantization_config.weight_block_size against the checkpoint")

    def _pair_mxfp4(self, keys: set[str]) -> None:
        where = self.root
        for k in sorted(keys):
            if k.endswith(MX_BLOCKS):
                base = k.removesuffix(MX_BLOCKS)
                if base + MX_SCALES not in keys:
                    raise FormatError(f"{where}: MXFP4 blocks {k!r} have no scales {base + MX_SCALES!r}")
                if base in keys:
                    raise FormatError(f"{where}: both {base!r} and its MXFP4 blocks {k!r} are stored")
                b, sc = self.inner.info(k)[1], self.inner.info(base + MX_SCALES)[1]
                if len(b) != 4 or b[-1] != MXFP4_BLOCK_BYTES or tuple(sc) != tuple(b[:-1]):
                    raise FormatError(f"{where}: MXFP4 blocks {k!r} {list(b)} and scales {list(sc)} are not "
                                      f"[experts, out, groups, {MXFP4_BLOCK_BYTES}] and [experts, out, groups]")
                self.parts[base] = (k, base + MX_SCALES)
        paired = {s for _, s in self.parts.values()}
        for k in sorted(keys):
            if k.endswith(MX_SCALES) and k not in paired:
                raise FormatError(f"{where}: MXFP4 scales {k!r} have no blocks {k.removesuffix(MX_SCALES) + MX_BLOCKS!r}")

    # ------------------------------------------------------------ the reader protocol
    @property
    def files(self) -> list[str]:
        return self.inner.files

    def keys(self) -> list[str]:
        return [self._name_of.get(k, k) for k in self._shown]

    def iter_file(self, file: str):
        return (self._name_of.get(k, k) for k in self.inner.iter_file(file) if k in self._shown)

    def file_of(self, name: str) -> str:
        return self.inner.file_of(self.parts[name][0] if name in self.parts else name)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self.parts:
            return self.inner.info(name)
        stored = self.inner.info(self.parts[name][0])[1]
        return self.dtype, (tuple(stored) if self.scheme.method == "fp8" else mxfp4_shape(tuple(stored)))

    def dtype_name(self, name: str) -> str:
        return DTYPE_NAMES[self.dtype] if name in self.parts else self.inner.dtype_name(name)

    def nbytes(self, name: str) -> int:
        """Bytes stored for ``name`` (both tensors of a pair)."""
        return sum(self.inner.nbytes(k) for k in self.parts.get(name, (name,)))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name``; a stored pair dequantized into ``dtype`` (default: the model's dtype),
        straight from the stored values as transformers dequantizes into a parameter of that dtype."""
        if name not in self.parts:
            return self.inner.get(name)
        w, s = self.parts[name]
        weight, scales = self.inner.get(w), self.inner.get(s)
        if self.scheme.method == "fp8":
            out = dequantize_fp8(weight, scales, self.scheme.block, dtype or self.dtype, name=w)
        else:
            out = dequantize_mxfp4(weight, scales, dtype or self.dtype, name=w)
        self._done(name)
        return out

    def config(self) -> dict[str, Any] | None:
        """config.json without the source's quantization_config (the plan and the output never see it)."""
        cfg = self.inner.config()
        if cfg is not None:
            cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        return cfg

    def release(self, file: str) -> None:
        if self._waiting.get(file):
            self._release_pending.add(file)
        else:
            self.inner.release(file)

    def _done(self, name: str) -> None:
        for file, names in self._waiting.items():
            names.discard(name)
            if not names and file in self._release_pending:
                self._release_pending.discard(file)
                self.inner.release(file)

    def __getattr__(self, attr: str):  # config_dir, extra_files, prefetch, cleanup, repo_id, sha ...
        return getattr(self.inner, attr)

    # ------------------------------------------------------------ what the plan and summary say
    def describe(self) -> dict[str, Any]:
        """The source scheme, for the plan (--dry-run/--json) and the summary."""
        stored = sorted({self.inner.dtype_name(w) for w, _ in self.parts.values()})
        out: dict[str, Any] = {"quant_method": self.scheme.method, "stored_dtypes": stored,
                               "dequantized_tensors": len(self.parts), "dequantized_to": dtype_name(self.dtype)}
        if self.scheme.method == "fp8":
            out["weight_block_size"] = list(self.scheme.block) if self.scheme.block else None
        else:
            out["block"] = 32
        out["dequantized_params"] = sum(math.prod(self.info(n)[1]) for n in self.parts)
        return out
