"""Tensor keys and the packed quant-state of one 4-bit weight (spec/format.md sections 4 and 5).

A quantized weight ``P`` is stored as up to six safetensors entries:

=====================================  =========  ====================================
key                                    dtype      shape
=====================================  =========  ====================================
``P``                                  uint8      ``[(n + 1) // 2, 1]``
``P.absmax``                           uint8/f32  ``[ceil(n / blocksize)]``
``P.quant_map``                        float32    ``[16]``
``P.nested_absmax`` (double quant)     float32    ``[ceil(nblocks / 256)]``
``P.nested_quant_map`` (double quant)  float32    ``[256]``
``P.quant_state.bitsandbytes__<qt>``   uint8      ``[len(json)]``
=====================================  =========  ====================================

That table is :data:`ENTRIES` below, written once: validation, planning, inspect and bits per
parameter read it (:func:`entries`, :func:`stored_nbytes`, :func:`core_nbytes`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import FormatError
from ..names import BLOCKSIZES, FLOAT_DTYPE_NAMES, NESTED_BLOCKSIZE, QUANT_TYPES, ceil_div
from .constants import codebook, dynamic_map

QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
#: torch dtype of each logical dtype name a quant-state may hold, in the spec's order
LOGICAL_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPE_NAMES}


@dataclass(frozen=True)
class Entry:
    """One stored entry of a 4-bit weight ``P``: the key ``P.<suffix>`` (``P`` itself for suffix ""),
    its dtype, and its shape as a function of the weight's element count and block size. ``double_quant``
    says in which layout it is stored: None in both, True only with double quantization, False only
    without it."""

    suffix: str
    dtype: torch.dtype
    shape: Callable[[int, int], tuple[int, ...]]
    double_quant: bool | None = None


def nblocks(numel: int, blocksize: int) -> int:
    """The number of blocks of a weight of ``numel`` elements (the last one may be ragged)."""
    return ceil_div(numel, blocksize)


#: The entries of a 4-bit weight besides its quant-state (spec section 4.1), in the order they are
#: validated. The quant-state entry is ``P.quant_state.bitsandbytes__<quant_type>``, uint8 [L] with
#: L the bytes of its JSON (:func:`pack_quant_state`).
ENTRIES = (
    Entry("", torch.uint8, lambda n, bs: ((n + 1) // 2, 1)),
    Entry("absmax", torch.float32, lambda n, bs: (nblocks(n, bs),), double_quant=False),
    Entry("absmax", torch.uint8, lambda n, bs: (nblocks(n, bs),), double_quant=True),
    Entry("quant_map", torch.float32, lambda n, bs: (16,)),
    Entry("nested_absmax", torch.float32, lambda n, bs: (ceil_div(nblocks(n, bs), NESTED_BLOCKSIZE),), double_quant=True),
    Entry("nested_quant_map", torch.float32, lambda n, bs: (256,), double_quant=True),
)
#: The companion suffixes (every entry but the codes and the quant-state), in table order.
SUFFIXES = tuple(dict.fromkeys(e.suffix for e in ENTRIES if e.suffix))
#: Bytes of the float32 ``nested_offset`` held in the quant-state of a double-quantized weight.
NESTED_OFFSET_BYTES = 4
#: The entries that bits-per-parameter counts (spec section 3.6): codes and block scales, plus
#: NESTED_OFFSET_BYTES with double quantization; not the per-tensor tables nor the quant-state.
CORE_SUFFIXES = ("", "absmax", "nested_absmax")


def entry_key(name: str, suffix: str) -> str:
    """The safetensors key of the entry ``suffix`` of the weight ``name``."""
    return f"{name}.{suffix}" if suffix else name


def quant_state_key(name: str, quant_type: str) -> str:
    return f"{name}.{QUANT_STATE_PREFIX}{quant_type}"


def entries(numel: int, blocksize: int, double_quant: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of every entry a weight of ``numel`` elements stores, quant-state aside."""
    return {
        e.suffix: (e.dtype, e.shape(numel, blocksize))
        for e in ENTRIES
        if e.double_quant is None or e.double_quant == double_quant
    }


def entry_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def stored_nbytes(numel: int, blocksize: int, double_quant: bool, quant_state_bytes: int) -> int:
    """Bytes a 4-bit weight stores: every entry, plus its quant-state JSON of ``quant_state_bytes``."""
    return sum(entry_nbytes(*e) for e in entries(numel, blocksize, double_quant).values()) + quant_state_bytes


def core_nbytes(sizes: Mapping[str, int], double_quant: bool) -> int:
    """The bytes bits-per-parameter counts, from the stored size of each entry (suffix -> bytes)."""
    return sum(sizes[s] for s in CORE_SUFFIXES if s in sizes) + (NESTED_OFFSET_BYTES if double_quant else 0)


#: bitsandbytes' ``quant_storage`` dtypes, by the names transformers' BitsAndBytesConfig takes: the
#: packed codes' bytes held in a tensor of that dtype, ``[bytes // itemsize, 1]`` (FSDP-QLoRA set-ups
#: store them as the model's bfloat16 so that FSDP shards one dtype). Readers take the bytes (spec 1.4).
QUANT_STORAGE = {name: getattr(torch, name) for name in ("uint8", "int8", "float16", "bfloat16", "float32", "float64")}


def quant_storage(quantization_config: Any, where: str) -> torch.dtype:
    """The dtype config.json's ``bnb_4bit_quant_storage`` names (uint8 when absent, as transformers
    defaults); FormatError for a name bitsandbytes does not store codes in."""
    name = quantization_config.get("bnb_4bit_quant_storage") if isinstance(quantization_config, Mapping) else None
    if name is None:
        return torch.uint8
    if name not in QUANT_STORAGE:
        raise FormatError(f"{where}: quantization_config.bnb_4bit_quant_storage is {name!r}, not one of {list(QUANT_STORAGE)}",
                          hint="the checkpoint is damaged, or was written by a program qconvert does not know")
    return QUANT_STORAGE[name]


def check_storage(dtype: torch.dtype, storage: torch.dtype, where: str) -> None:
    """Packed codes stored as ``dtype`` where config.json names ``storage``: they must agree (spec 5.2)."""
    if dtype != storage:
        raise FormatError(f"{where}: packed codes stored as {dtype_name(dtype)}, but config.json's "
                          f"bnb_4bit_quant_storage is {dtype_name(storage)!r}", hint="config.json and the weights disagree")


def packed_as_uint8(t: torch.Tensor, storage: torch.dtype, nbytes: int, where: str) -> torch.Tensor:
    """The packed codes ``t``, stored as ``storage``, as the uint8 ``[nbytes, 1]`` they hold. Refused:
    a tensor of another dtype than ``storage`` names (config.json and the weights disagree), and one
    that does not hold exactly ``nbytes`` bytes as ``[nbytes // itemsize, 1]`` (bitsandbytes' CUDA
    quantizer drops the last bytes of a weight whose byte count ``storage`` does not divide)."""
    if storage == torch.uint8:
        return t  # the layout table checks it
    check_storage(t.dtype, storage, where)
    want = (nbytes // storage.itemsize, 1)
    if nbytes % storage.itemsize or tuple(t.shape) != want:
        raise FormatError(f"{where}: the weight has {nbytes} bytes of codes, stored as {dtype_name(storage)} {list(t.shape)} "
                          f"({t.numel() * storage.itemsize} bytes)",
                          hint="the checkpoint is damaged, or its writer dropped codes; quantize the model again")
    return t.contiguous().view(torch.uint8).reshape(nbytes, 1)


#: A quant-state JSON longer than this is refused (a real one is about 200 bytes).
MAX_QUANT_STATE_BYTES = 65536
#: the largest finite float32; a nested_offset beyond it is refused
FLT_MAX = 3.4028234663852886e38


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantizedTensor:
    """One 4-bit tensor: packed codes, block scales and everything needed to dequantize them."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return nblocks(self.numel, self.blocksize)

    def quant_state_dict(self) -> dict[str, Any]:
        """The non-tensor fields, in the key order bitsandbytes writes them."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            d.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=float(self.nested_offset),
            )
        return d

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The safetensors entries for this weight under the key ``name``."""
        out = {
            name: self.packed,
            f"{name}.absmax": self.absmax,
            f"{name}.quant_map": self.quant_map,
        }
        if self.double_quant:
            out[f"{name}.nested_absmax"] = self.nested_absmax
            out[f"{name}.nested_quant_map"] = self.nested_quant_map
        out[f"{name}.{QUANT_STATE_PREFIX}{self.quant_type}"] = pack_quant_state(self.quant_state_dict())
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict("w").values())

    @property
    def core_nbytes(self) -> int:
        """The bytes bits-per-parameter counts (:func:`core_nbytes`)."""
        held = {"": self.packed, "absmax": self.absmax, "nested_absmax": self.nested_absmax}
        return core_nbytes({s: t.numel() * t.element_size() for s, t in held.items() if t is not None}, self.double_quant)

    @classmethod
    def from_state_dict(cls, name: str, tensors: Mapping[str, torch.Tensor], where: str = "",
                        storage: torch.dtype = torch.uint8) -> "QuantizedTensor":
        """Rebuild from safetensors entries, validating every field (spec section 9).

        ``tensors`` maps full keys to tensors (it may hold other keys too). ``where`` names the file
        for error messages. ``storage``: the dtype config.json says the packed codes are stored in
        (:func:`quant_storage`); their bytes are read as the uint8 codes.
        """
        loc = f"{where}: " if where else ""
        qs_keys = [k for k in tensors if k.startswith(f"{name}.{QUANT_STATE_PREFIX}")]
        if len(qs_keys) != 1:
            raise FormatError(
                f"{loc}tensor {name!r}: expected exactly one '{name}.{QUANT_STATE_PREFIX}<nf4|fp4>' entry, "
                f"found {len(qs_keys)}",
                hint="the checkpoint is not a bitsandbytes/qconvert 4-bit checkpoint or is damaged",
            )
        qs = unpack_quant_state(tensors[qs_keys[0]], f"{loc}tensor {name!r}")
        if qs_keys[0].rsplit("__", 1)[1] != qs["quant_type"]:
            raise FormatError(f"{loc}tensor {name!r}: key {qs_keys[0]!r} disagrees with quant_type {qs['quant_type']!r}")

        shape = tuple(qs["shape"])
        nested = "nested_offset" in qs
        expected = entries(math.prod(shape), qs["blocksize"], nested)

        def need(suffix: str) -> torch.Tensor:
            """The entry ``suffix``, present and of the dtype and shape of the layout table."""
            key = entry_key(name, suffix)
            if key not in tensors:
                raise FormatError(f"{loc}tensor {name!r}: missing entry {key!r}")
            dtype, want = expected[suffix]
            t = tensors[key] if suffix else packed_as_uint8(tensors[key], storage, want[0], f"{loc}{key!r}")
            if t.dtype != dtype or tuple(t.shape) != want:
                raise FormatError(
                    f"{loc}{key!r}: expected {dtype_name(dtype)} {list(want)}, got {dtype_name(t.dtype)} {list(t.shape)}"
                )
            return t

        packed = need("")
        absmax = need("absmax")
        quant_map = need("quant_map")
        if not torch.equal(quant_map.cpu(), codebook(qs["quant_type"])):
            raise FormatError(
                f"{loc}{name}.quant_map is not the standard {qs['quant_type']} codebook",
                hint="readers disagree on non-standard tables (bitsandbytes ignores the stored one); re-quantize",
            )
        kw: dict[str, Any] = {}
        if nested:
            nested_absmax = need("nested_absmax")
            nested_map = need("nested_quant_map")
            if not torch.equal(nested_map.cpu(), dynamic_map()):
                raise FormatError(f"{loc}{name}.nested_quant_map is not the standard 8-bit dynamic map")
            if not torch.isfinite(nested_absmax).all():
                raise FormatError(f"{loc}{name}.nested_absmax holds NaN or Inf")
            kw = dict(nested_absmax=nested_absmax, nested_quant_map=nested_map, nested_offset=qs["nested_offset"])
        else:
            extra = [entry_key(name, x) for x in SUFFIXES if x not in expected and entry_key(name, x) in tensors]
            if extra:
                raise FormatError(f"{loc}tensor {name!r}: {extra[0]!r} is present but the quant-state has no nested_* fields")
            if not torch.isfinite(absmax).all():
                raise FormatError(f"{loc}{name}.absmax holds NaN or Inf")
        qt = cls(
            packed=packed,
            absmax=absmax,
            shape=shape,
            dtype=LOGICAL_DTYPES[qs["dtype"]],
            quant_type=qs["quant_type"],
            blocksize=qs["blocksize"],
            quant_map=quant_map,
            **kw,
        )
        if nested and not torch.isfinite(decoded_scales(qt)).all():
            raise FormatError(
                f"{loc}tensor {name!r}: a decoded block scale (nested_absmax * code + nested_offset) overflows float32",
                hint="no conforming writer produces this; the file is damaged or hostile",
            )
        return qt


def pack_quant_state(d: Mapping[str, Any]) -> torch.Tensor:
    """UTF-8 JSON bytes of the quant-state as a uint8 tensor, formatted as bitsandbytes formats it."""
    return torch.tensor(list(json.dumps(dict(d)).encode("utf-8")), dtype=torch.uint8)


def unpack_quant_state(t: torch.Tensor, where: str = "quant state") -> dict[str, Any]:
    """Parse and validate a packed quant-state (spec sections 5 and 9). Raises FormatError."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise FormatError(f"{where}: quant state must be a 1-D uint8 tensor, got {dtype_name(t.dtype)} {list(t.shape)}")
    if t.numel() > MAX_QUANT_STATE_BYTES:
        raise FormatError(f"{where}: quant state is {t.numel()} bytes, over the {MAX_QUANT_STATE_BYTES}-byte limit")
    def no_duplicates(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):  # counting each name among all names was quadratic: seconds per 64 KiB state
            seen: set[str] = set()
            dup = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
            raise FormatError(f"{where}: quant state repeats the field(s) {dup[:10]}")
        return d

    try:
        d = json.loads(bytes(t.tolist()).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{where}: quant state is not UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{where}: quant state must be a JSON object")
    if d.get("quant_type") not in QUANT_TYPES:
        raise FormatError(f"{where}: quant_type {d.get('quant_type')!r} is not one of {list(QUANT_TYPES)}")
    if type(d.get("blocksize")) is not int or d["blocksize"] not in BLOCKSIZES:
        raise FormatError(f"{where}: blocksize {d.get('blocksize')!r} is not one of {list(BLOCKSIZES)}")
    if d.get("dtype") not in LOGICAL_DTYPES:
        raise FormatError(f"{where}: dtype {d.get('dtype')!r} is not one of {list(LOGICAL_DTYPES)}")
    shape = d.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        or math.prod(shape) >= 2**40
    ):
        raise FormatError(f"{where}: shape {shape!r} must be a list of 1 to 8 non-negative integers (under 2**40 elements)")
    nested_keys = {"nested_blocksize", "nested_dtype", "nested_offset"}
    present = nested_keys & d.keys()
    if present and present != nested_keys:
        raise FormatError(f"{where}: double quantization needs all of {sorted(nested_keys)}, found {sorted(present)}")
    if present:
        if type(d["nested_blocksize"]) is not int or d["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise FormatError(f"{where}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {d['nested_blocksize']!r}")
        if d["nested_dtype"] != "float32":
            raise FormatError(f"{where}: nested_dtype must be 'float32', got {d['nested_dtype']!r}")
        d["nested_offset"] = offset_float32(d["nested_offset"], where)
    unknown = d.keys() - {"quant_type", "blocksize", "dtype", "shape"} - nested_keys
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise FormatError(f"{where}: unknown quant-state fields {sorted(unknown)[:10]}{more}")
    return d


def offset_float32(off: Any, where: str) -> float:
    """The float32 value of a JSON ``nested_offset`` (spec 1.1 sections 3.5 and 9): the number read
    as the nearest double, as ordinary JSON parsers (bitsandbytes' included) read it, then rounded
    once to float32. Refused: a non-number, a non-finite one, and one whose double lies beyond the
    largest float32 (which a conforming writer, writing a float32 exactly, never produces)."""
    if isinstance(off, bool) or not isinstance(off, (int, float)) or (isinstance(off, float) and not math.isfinite(off)):
        raise FormatError(f"{where}: nested_offset must be a finite number, got {off!r}")
    try:
        value = float(off)  # an integer beyond the double range raises here
    except OverflowError:
        value = math.inf
    if abs(value) <= FLT_MAX:
        return struct.unpack("<f", struct.pack("<f", value))[0]  # rounded once, to nearest even
    raise FormatError(
        f"{where}: nested_offset {off!r} is beyond the float32 range",
        hint="the offset is a float32 (largest 3.4028234663852886e38); the file is damaged or was not written by a conforming writer",
    )


def decoded_scales(qt: "QuantizedTensor") -> torch.Tensor:
    """The float32 block scales of a double-quantized weight (spec section 3.5): each step rounded
    to float32 separately, no fused multiply-add."""
    n = qt.absmax.numel()
    t = qt.nested_quant_map[qt.absmax.long()] * qt.nested_absmax.repeat_interleave(qt.nested_blocksize)[:n]
    return t + torch.tensor(qt.nested_offset, dtype=torch.float32, device=t.device)


#: ``quantization_config.quant_method`` of a folder whose routed experts are 4-bit (spec section 14.4)
EXPERTS_QUANT_METHOD = "qconvert"
#: The layout extension of 4-bit routed experts (spec section 14), recorded in config.json's
#: ``qconvert.layout_extensions``; the extensions this reader implements
EXPERTS_EXTENSION = "experts-1"
LAYOUT_EXTENSIONS = (EXPERTS_EXTENSION,)


def is_4bit_config(quantization_config: Any) -> bool:
    """Whether a config.json ``quantization_config`` describes 4-bit weights: bitsandbytes' (spec 5.2),
    or qconvert's with 4-bit routed experts (spec 14.4)."""
    qc = quantization_config
    return isinstance(qc, Mapping) and (
        (qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))) or has_4bit_experts(qc))


def has_4bit_experts(quantization_config: Any) -> bool:
    """Whether a ``quantization_config`` says the routed experts are 4-bit (spec section 14.4)."""
    qc = quantization_config
    return isinstance(qc, Mapping) and qc.get("quant_method") == EXPERTS_QUANT_METHOD and qc.get("experts_4bit") is True


def find_quantized(keys: "list[str] | set[str] | Mapping[str, Any]") -> list[str]:
    """Names P of the 4-bit weights among safetensors keys (those with a P.quant_state.* entry)."""
    names = []
    for k in keys:
        i = k.find("." + QUANT_STATE_PREFIX)
        if i > 0:
            names.append(k[:i])
    return sorted(names)


def companion_keys(name: str, keys) -> list[str]:
    """Every key that belongs to the 4-bit weight ``name`` (itself and its quant-state entries)."""
    return [k for k in keys if k == name or (k.startswith(name + ".") and k[len(name) + 1 :].split(".")[0] in SUFFIXES + ("quant_state",))]


def companion_index(keys) -> dict[str, list[str]]:
    """``companion_keys`` of every 4-bit weight among ``keys`` at once, in one pass over the keys.

    Calling ``companion_keys`` once per weight scans every key each time: quadratic, which a file
    with tens of thousands of 4-bit weights turns into hours. Here each key is cut before each of
    its segments that is an entry suffix, and the part before is looked up among the weights (only
    when its length is that of some weight name, so a hostile key of many segments stays cheap)."""
    owners = set(find_quantized(keys))
    lengths = {len(o) for o in owners}
    tags = set(SUFFIXES) | {"quant_state"}
    index: dict[str, list[str]] = {name: [] for name in owners}
    for k in keys:
        if k in owners:
            index[k].append(k)
        start = k.find(".")
        while start > 0:
            end = k.find(".", start + 1)
            if start in lengths and k[start + 1 : end if end > 0 else None] in tags and k[:start] in owners:
                index[k[:start]].append(k)
            start = end
    return index
