"""A 16-bit base given where a 4-bit one is needed (train, generate, eval): quantized on the way in.

TRL's ``load_in_4bit``, axolotl's and Unsloth's QLoRA and FinLoRA's ``quant_bits: 4`` all take the
16-bit model and quantize it as it loads. qconvert does the same through the one quantizer it has:
:func:`~qconvert.convert.quantize.quantize_checkpoint` streams the source (a Hub repo one shard at a
time) into a 4-bit folder, with its defaults, so the base trained on is bit for bit the folder
``qconvert quantize MODEL OUT`` writes, and so is the adapter trained on it.

Where the 4-bit copy lives: with ``keep`` (``--keep-quantized DIR``) in DIR, kept, and reused by a
later run when DIR already holds the quantization of the same source and revision. Otherwise in a
private temporary folder (under TMPDIR) removed when the run ends, and not inside the run's output
folder: that folder is what ``push`` publishes and ``--overwrite`` removes by its manifest, and a
hidden copy of the whole base in it would travel with every copy of the run. A resumed run without
``keep`` quantizes again; quantization is deterministic, so it resumes on the same bytes.

``generate`` and ``eval`` run a 16-bit model as it is by default (a merged model, or the original
to compare with, is scored in its own weights); ``--load-in-4bit`` (or ``--keep-quantized DIR``)
makes them quantize it on the way in through :func:`inference_base`, the same code and message
as train, so an adapter trained on a 16-bit base runs on the very weights it was trained on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import OptionError


def is_16bit(model: str | os.PathLike, revision: str | None) -> bool:
    """Whether ``model`` (folder or Hub id) is a checkpoint without 4-bit weights: its config.json has
    no 4-bit ``quantization_config``. Only config.json and the tensor headers are read (a Hub repo's
    shards are not downloaded). A folder without config.json is left to the loader to refuse."""
    from ..format.layout import is_4bit_config
    from ..io.reader import cleanup
    from ..io.source import open_checkpoint

    with tempfile.TemporaryDirectory(prefix="qconvert-probe-") as work:
        src = open_checkpoint(str(model), revision if not os.path.exists(model) else None, Path(work))
        try:
            config = src.config()
        finally:
            cleanup(src)
    return config is not None and not is_4bit_config(config.get("quantization_config"))


def four_bit_base(model: str | os.PathLike, revision: str | None, keep: str | os.PathLike | None,
                  held: contextlib.ExitStack, say: Callable[[str], None], processes: int = 1) -> str:
    """The folder or Hub id to load as the 4-bit base: ``model`` itself when it is 4-bit, else its
    quantization (module docstring), which lives as long as ``held``. Several ``processes`` (one
    run under torchrun) would each quantize the base: refused, with the two commands instead."""
    if not is_16bit(model, revision):
        if keep is not None:
            raise OptionError(f"--keep-quantized {keep}: {model} is a 4-bit checkpoint already",
                              hint="leave out --keep-quantized: it keeps the 4-bit copy of a 16-bit base")
        return str(model)
    if processes > 1:
        raise OptionError(f"{model} is a 16-bit model, and {processes} processes would each quantize it",
                          hint=f"quantize it once: `qconvert quantize {model} DIR`, then train on DIR")
    if keep is not None and _same_quantization(Path(keep), model, revision):
        say(f"base: {model} is 16-bit; using its 4-bit copy in {keep} (--keep-quantized)")
        return str(keep)
    from .quantize import quantize_checkpoint

    if keep is not None:
        dest = Path(keep)
    else:
        dest = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="qconvert-base-"))) / "base-nf4"
    where = f"kept in {dest}" if keep is not None else "a temporary copy, removed at the end; --keep-quantized DIR keeps it"
    say(f"base: {model} is 16-bit; quantizing it to 4-bit NF4 on the way in, as `qconvert quantize` does ({where})")
    quantize_checkpoint(str(model), dest, revision=None if os.path.exists(model) else revision)
    return str(dest)


def _same_quantization(folder: Path, model, revision: str | None) -> bool:
    """Whether ``folder`` is a complete qconvert quantization of ``model``, as far as its config.json
    records it (a card never names a local path, so the provenance has the source's name only): the
    same name, and for a local source the same size in bytes and the same config; for a Hub id the
    same revision when one is given."""
    from ..io.checkpoint import read_json_object

    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():  # the card is written after the weights
        return False
    kept = read_json_object(folder / "config.json", "config.json")
    prov = kept.get("qconvert") or {}
    if not os.path.exists(model):
        return prov.get("source") == str(model) and (revision is None or prov.get("source_revision") == revision)
    src = Path(model)
    config = read_json_object(src / "config.json", "config.json")
    size = sum(_tensor_bytes(p) for p in src.glob("*.safetensors"))
    added = ("quantization_config", "qconvert", "dtype", "torch_dtype")
    same_config = {k: v for k, v in config.items() if k not in added} == {k: v for k, v in kept.items() if k not in added}
    return prov.get("source") == src.name and prov.get("source_bytes") == size and same_config


def _tensor_bytes(path: Path) -> int:
    """A safetensors file's tensor data bytes (its size less the 8-byte length and the JSON header),
    as quantize records ``source_bytes``."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def inference_base(model: str | os.PathLike, revision: str | None, load_in_4bit: bool, keep: str | os.PathLike | None,
                   held: contextlib.ExitStack, say: Callable[[str], None]) -> tuple[str, str | None]:
    """(model, revision) for generate and eval to load: as given unless ``load_in_4bit`` or ``keep``
    asks for the 4-bit base (:func:`four_bit_base`; a 16-bit model's copy is a local folder, loaded
    without a revision)."""
    if not load_in_4bit and keep is None:
        return str(model), revision
    base = four_bit_base(model, revision, keep, held, say)
    return base, (revision if base == str(model) else None)
