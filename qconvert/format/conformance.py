"""Reader rules of spec/format.md that look at more than one tensor (spec 1.1, section 9).

:class:`~qconvert.format.layout.QuantizedTensor.from_state_dict` validates one weight. The rules here
cover what lies around the weights, and every reader of a 4-bit checkpoint (``load_model``, ``merge``,
``verify``) applies them through :func:`check_checkpoint`:

* the safetensors container: what the ``safetensors`` library refuses, plus duplicate member names
  in a header, which it accepts (the last one wins) and qconvert refuses (:func:`check_header`);
* each file's ``__metadata__``: ``format`` must be ``"pt"`` when present (and present, for ``verify``),
  and a ``qconvert.layout_version`` must be one this reader implements (:func:`check_metadata`);
* the key set: no ``P.*`` key beside a quantized weight's own entries, no companion entry
  (``X.absmax`` ...) without its weight's quant-state (:func:`quantized_names`);
* ``config.json``: its quantization settings, when present, agree with the weights (:func:`check_config`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Mapping

from ..errors import FormatError
from ..names import QUANT_TYPES
from .layout import QUANT_STATE_PREFIX, QUANT_STORAGE, SUFFIXES, entry_key, check_storage, find_quantized, quant_state_key, quant_storage

#: the layout versions this reader implements (spec section 1.3)
LAYOUT_VERSIONS = ("1",)
#: the safetensors library refuses longer headers; so does this check, before reading one
MAX_HEADER_BYTES = 100_000_000
_DAMAGED = "the file is truncated or corrupt, or not a safetensors file; re-download it"


def _no_duplicates(where: str):
    def hook(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise FormatError(
                    f"{where}: the safetensors header names {k!r} twice",
                    hint="JSON readers disagree on which entry wins; rewrite the file with one entry per name",
                )
            seen.add(k)
        return dict(pairs)

    return hook


def check_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a safetensors header, refusing duplicate member names at any level; returns it.

    The rest of the container (offsets tiling the data area, sizes, no trailing bytes, no NUL
    padding) is checked by the safetensors library when the file is opened; see spec section 9.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(head) < 8:
            raise FormatError(f"{path}: shorter than a safetensors header length (8 bytes)", hint=_DAMAGED)
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise FormatError(f"{path}: header length {n} runs past the end of the file ({size} bytes) or over the limit", hint=_DAMAGED)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(str(path)))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: the safetensors header is not UTF-8 JSON ({e})", hint=_DAMAGED) from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object", hint=_DAMAGED)
    return header


def check_metadata(meta: Mapping[str, str] | None, where: str, require_format: bool = False) -> None:
    """``format`` is "pt" (and present when ``require_format``); a qconvert layout version is known."""
    meta = meta or {}
    fmt = meta.get("format")
    if fmt is None and require_format:
        raise FormatError(f"{where}: __metadata__ lacks \"format\": \"pt\"", hint="every file of the layout carries it (spec 2.3)")
    if fmt is not None and fmt != "pt":
        raise FormatError(
            f"{where}: __metadata__ format is {fmt!r}, not 'pt'",
            hint="the file follows another framework's tensor conventions; only 'pt' files are this layout",
        )
    check_layout_version(meta.get("qconvert.layout_version"), where)


def check_layout_version(version: Any, where: str) -> None:
    if version is not None and version not in LAYOUT_VERSIONS:
        raise FormatError(
            f"{where}: layout version {version!r}; this reader implements {', '.join(LAYOUT_VERSIONS)}",
            hint="upgrade qconvert to read it",
        )


def check_layout_extensions(extensions: Any, where: str) -> None:
    """Layout extensions (spec section 14) this reader implements; anything else is refused, as an
    unknown layout version is (section 1.3): a reader that guesses computes with wrong weights."""
    from .layout import LAYOUT_EXTENSIONS

    if extensions is None:
        return
    if not isinstance(extensions, list) or not all(isinstance(e, str) for e in extensions):
        raise FormatError(f"{where}: layout_extensions must be a list of strings, got {extensions!r}"[:200])
    unknown = [e for e in extensions if e not in LAYOUT_EXTENSIONS]
    if unknown:
        raise FormatError(f"{where}: layout extension(s) {unknown[:3]}; this reader implements {', '.join(LAYOUT_EXTENSIONS)}"[:300],
                          hint="upgrade qconvert to read it")


def _companion_names(name: str) -> set[str]:
    return {name} | {entry_key(name, s) for s in SUFFIXES} | {quant_state_key(name, t) for t in QUANT_TYPES}


def quantized_names(keys: Iterable[str], where: str) -> list[str]:
    """The quantized weights among ``keys`` (as find_quantized), refusing unknown ``P.*`` keys and
    orphan companion entries (spec section 9)."""
    keys = list(keys)
    names = find_quantized(keys)
    owned: set[str] = set()
    for name in names:
        owned |= _companion_names(name)
    quantized = set(names)
    for k in keys:
        if k in owned:
            continue
        parts = k.split(".")
        if any(".".join(parts[:i]) in quantized for i in range(1, len(parts))):
            raise FormatError(
                f"{where}: {k!r} is not an entry of the 4-bit layout for its weight",
                hint="a 4-bit weight P has only P, P.absmax, P.quant_map, P.nested_absmax, P.nested_quant_map and one P.quant_state.*",
            )
        base, _, suffix = k.rpartition(".")
        if suffix in SUFFIXES or f".{QUANT_STATE_PREFIX}" in k:
            raise FormatError(
                f"{where}: {k!r} is a 4-bit companion entry, but {base!r} has no quant-state",
                hint="the weight's quant-state entry is missing; the file is damaged or was merged badly",
            )
    return names


def check_config(cfg: Mapping[str, Any] | None, keys: Iterable[str], where: str) -> None:
    """config.json's quantization settings, where present, agree with the stored weights (spec 5.2)."""
    cfg = cfg or {}
    prov = cfg.get("qconvert")
    if isinstance(prov, Mapping):
        check_layout_version(prov.get("layout_version"), f"{where}: qconvert")
        check_layout_extensions(prov.get("layout_extensions"), f"{where}: qconvert")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, Mapping):
        return
    keys = set(keys)
    names = find_quantized(keys)
    types = {k.rsplit("__", 1)[1] for k in keys if f".{QUANT_STATE_PREFIX}" in k}
    if len(types) > 1:
        raise FormatError(f"{where}: the checkpoint mixes 4-bit types {sorted(types)}", hint="one checkpoint holds one quant type")
    want = qc.get("bnb_4bit_quant_type")
    if want is not None and types and types != {want}:
        raise FormatError(f"{where}: quantization_config.bnb_4bit_quant_type is {want!r}, the weights are {sorted(types)}")
    dq = qc.get("bnb_4bit_use_double_quant")
    if dq is not None:
        differ = [n for n in names if (f"{n}.nested_absmax" in keys) != bool(dq)]
        if differ:
            raise FormatError(f"{where}: quantization_config.bnb_4bit_use_double_quant is {dq}, but {differ[0]!r} is "
                              f"{'not ' if dq else ''}double-quantized")
    quant_storage(qc, where)  # a name bitsandbytes stores codes in; each weight's dtype is checked as it is read


def check_checkpoint(ckpt, strict: bool = False) -> list[str]:
    """Every rule above for a Checkpoint; returns the names of its quantized weights. ``strict``
    (``qconvert verify``) also requires each file's ``format`` key."""
    for f in ckpt.files:
        check_metadata(ckpt.metadata(f), str(ckpt.root / f), require_format=strict)
    names = quantized_names(ckpt.keys(), str(ckpt.root))
    check_config(ckpt.config(), ckpt.keys(), str(ckpt.root / "config.json"))
    storage = ckpt.quant_storage()
    if storage != QUANT_STORAGE["uint8"]:  # every weight stored in it (uint8 codes: the layout table checks them)
        for name in names:
            check_storage(ckpt.info(name)[0], storage, f"{ckpt.root / ckpt.file_of(name)}: {name!r}")
    return names
