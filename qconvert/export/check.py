"""The check `qconvert merge` runs at the end: the merged folder against the model that was trained,
the 4-bit base with the adapter attached unmerged, exactly as :func:`qconvert.load_model` runs it
(PEFT's LoRA layers on qconvert's 4-bit modules, all in float32).

The reference side shares no code with the merge: a merge that scales the update wrongly, adapts
the wrong tensor or starts from the wrong base computes something else than the unmerged model, and
`qconvert compare`'s figures (KL, top-1 agreement, max relative logit error) say so. Comparing
against an on-the-fly merge instead would repeat the merge's own mistake on both sides.

Probes: the built-in prompts tokenized by the base's tokenizer; a base without a tokenizer gets fixed
token-id probes (seeded, so every run checks the same ids), which test the computation just as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .compare import _HF, DEFAULT_PROMPTS, _tokenizer, _Torch, compare_models

#: the check's default bound on the mean KL(unmerged || merged), by what the merge writes. A plain
#: merge's only departure from the unmerged float32 model is the output dtype's rounding, so the bound
#: follows the dtype: on tiny random models a faithful merge gave KL up to 1e-11 in float32, 8e-6 in
#: float16, 7e-4 in bfloat16, while a LoRA scaling 10% off gave 7e-3 and a doubled one 0.1 and more
#: (docs/merge-push.md has the figures): float32 and float16 catch the 10% error, bfloat16 (whose own
#: rounding can approach it) only gross ones. --quantize and --base-original merge on purpose into
#: something else than what was trained, so their figures are what those choices cost; they get the
#: bound a 4-bit GGUF export gets (qconvert.export.gguf.CHECK_TOLERANCE). Not calibrated on real models.
TOLERANCE = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2, "quantize": 0.5, "base_original": 0.5}
#: the check refuses to start when its models would take more than this share of the memory available
MEMORY_SHARE = 0.9
#: fixed token-id probes for a base without a tokenizer: this many sequences of this many ids
_ID_PROBES, _ID_LEN = 4, 12


class _Unmerged(_Torch):
    """The 4-bit base plus the adapter, unmerged, as load_model runs it (float32)."""

    def __init__(self, base: Path, adapter: str):
        self.base, self.adapter = base, adapter
        self.tokenizer = _tokenizer(base)

    def _build(self):
        from ..model.loader import load_model

        return load_model(str(self.base), dtype=torch.float32, adapter=self.adapter).eval()


def check_merge(base: Path, adapter: str, merged: Path, mode: str, tolerance: float | None = None,
                new_tokens: int = 0) -> dict[str, Any]:
    """`compare` of the unmerged model (``base`` + ``adapter``) against the ``merged`` folder; ``mode``
    (a plain merge's output dtype, "quantize" or "base_original") picks the default tolerance."""
    ref = _Unmerged(base, adapter)
    out = _HF(str(merged), None)
    tok = ref.tokenizer or out.tokenizer
    probes = [(t, tok(t)["input_ids"]) for t in DEFAULT_PROMPTS] if tok is not None else _id_probes(_vocab_size(base))
    tol = TOLERANCE[mode] if tolerance is None else tolerance
    r = compare_models(ref, out, probes, tok, tol, new_tokens, f"{base} (+ {adapter}) and {merged}")
    return {"against": "base + adapter, unmerged (load_model)", "probes": "prompts" if tok is not None else "token ids",
            **{k: r[k] for k in ("kl", "top1_agreement", "max_rel_logit_error", "tolerance", "passed")}}


def _vocab_size(base: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, trust_remote_code=False).get_text_config().vocab_size


def _id_probes(vocab: int) -> list[tuple[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [(f"ids #{i}", torch.randint(0, vocab, (_ID_LEN,), generator=g).tolist()) for i in range(_ID_PROBES)]


def float32_bytes(root: Path, ckpt=None) -> int:
    """Bytes of ``root``'s model in float32 (every floating tensor at its logical shape): what the
    check's float32 copy of it takes (compare's _HF side). ``ckpt``: its Checkpoint, when open already."""
    from ..format.layout import QUANT_STATE_PREFIX
    from ..io.checkpoint import Checkpoint
    from ..model.checks import quant_shapes

    ckpt = ckpt or Checkpoint(root, streaming=True)
    shapes = quant_shapes(ckpt)
    total = 4 * sum(_numel(s) for s in shapes.values())
    for k in ckpt.keys():
        if k in shapes or any(k.startswith(w + ".") for w in shapes) or "." + QUANT_STATE_PREFIX in k:
            continue
        dtype, shape = ckpt.info(k)
        total += 4 * _numel(shape) if dtype.is_floating_point else 0
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read: the check then runs)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(root: Path, command: str, ckpt=None) -> None:
    """Refuse, before any work, a check whose float32 model would not fit in the memory available
    (the two sides run one after the other, and the float32 one is the larger: the 4-bit side
    holds only its unquantized tensors in float32): one line, and the two ways on (--no-check, or
    compare later where memory allows), instead of a merge or export killed for memory at its end."""
    from ..errors import OptionError

    need, have = float32_bytes(root, ckpt), available_memory()
    if have is not None and need > MEMORY_SHARE * have:
        raise OptionError(f"{command}'s check needs about {_size(need)} of memory (the model in float32), {_size(have)} are available",
                          hint=f"pass --no-check to {command} without it, then run `qconvert compare` where memory allows")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
