"""Which tensors get quantized, under which names, into which output shard (`qconvert quantize` plan).

The set of quantized tensors is decided exactly as transformers' bitsandbytes integration decides it:
the model is built on the meta device from config.json (no weights, no memory), every module whose
type is exactly ``nn.Linear`` is a candidate, and these are excluded: the default skips (tied
weights, the module of the model's last parameter, the output embeddings), the model's
``_keep_in_fp32_modules``, and the user's ``--skip-modules`` patterns, matched as transformers matches
``llm_int8_skip_modules``. The two rules are restated here rather than imported, because importing
``transformers.quantizers`` loads every quantization backend transformers knows (over 2 s); the
byte-identity tests against transformers + bitsandbytes hold them to transformers' behaviour.
Output names are the model's own state-dict names, which is what ``save_pretrained`` writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError, OptionError, QuantizationError
from ..format.checkpoint import Checkpoint

QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_STATE_JSON_ESTIMATE = 240  # bytes; only used to decide shard membership


@dataclass
class Item:
    source_key: str
    out_key: str
    source_file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    quantize: bool
    out_bytes: int  # estimated


@dataclass
class Plan:
    items: list[Item]
    shards: list[list[int]]  # item indices per output shard, in order
    dropped: list[str]
    skip_patterns: list[str]
    architecture: str
    source_bytes: int
    source_dtype: str
    settings: dict[str, Any] = field(default_factory=dict)

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def summary(self) -> dict[str, Any]:
        names = self.shard_names()
        return {
            "architecture": self.architecture,
            "tensors": len(self.items),
            "quantized": sum(i.quantize for i in self.items),
            "dropped": self.dropped,
            "skip_modules": self.skip_patterns,
            "source_bytes": self.source_bytes,
            "estimated_output_bytes": sum(i.out_bytes for i in self.items),
            "shards": [
                {"file": names[s], "tensors": len(idx), "estimated_bytes": sum(self.items[i].out_bytes for i in idx)}
                for s, idx in enumerate(self.shards)
            ],
            "settings": self.settings,
        }


def quantized_size(numel: int, blocksize: int, double_quant: bool) -> int:
    nblocks = -(-numel // blocksize)
    size = (numel + 1) // 2 + 64 + QUANT_STATE_JSON_ESTIMATE
    if double_quant:
        size += nblocks + 4 * -(-nblocks // 256) + 1024
    else:
        size += 4 * nblocks
    return size


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as the Hub counts); also KB/MB/GiB/MiB and plain integers."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise OptionError(f"cannot read size {text!r}", hint="use a number with KB, MB or GB (decimal), e.g. 2GB")


def default_skips(model) -> set[str]:
    """Modules transformers never quantizes: tied weights (both ends), the module that owns the
    model's last parameter, and the output embeddings."""
    skips: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skips.update(tied.keys())
    skips.update(tied.values())
    params = list(model.named_parameters())
    if params:
        skips.add(params[-1][0])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        skips.update(name for name, m in model.named_modules() if m is out_emb)
    return {k.removesuffix(".weight") for k in skips}


def is_skipped(module_name: str, patterns) -> bool:
    """A pattern skips a module when it matches from the start up to a dot boundary (also as a
    regular expression), or when the module name ends with it."""
    for p in patterns:
        if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module_name) or module_name.endswith(p):
            return True
    return False


def meta_model(root) -> Any:
    """The model skeleton on the meta device, built from config.json. Never runs remote code."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for unknown models
        raise FormatError(
            f"{root}/config.json: transformers cannot build a config from it ({e})",
            hint="qconvert needs a model type that transformers knows without trust_remote_code",
        ) from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping.get(type(config), None) if hasattr(transformers.AutoModel, "_model_mapping") else None
    if cls is None:
        raise FormatError(f"{root}/config.json: architecture {arch!r} is not in transformers", hint="upgrade transformers")
    with torch.device("meta"):
        model = cls(config)
    return model, config


def make_plan(
    ckpt: Checkpoint,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: list[str] | None = None,
    max_shard_size: int = 2 * 10**9,
) -> Plan:
    from torch import nn

    model, config = meta_model(ckpt.config_dir())
    skip = sorted(default_skips(model) | set(model._keep_in_fp32_modules or ()) | set(skip_modules or ()))
    state_keys = list(model.state_dict().keys())
    state_set = set(state_keys)
    quant_weights = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not is_skipped(name, skip):
            quant_weights.add(f"{name}.weight")
        elif type(module).__name__ == "Conv1D" and not is_skipped(name, skip):
            raise QuantizationError(
                f"module {name!r} is a transposed Conv1D (GPT-2 style), which qconvert does not quantize yet",
                hint="use transformers + bitsandbytes for this architecture",
            )
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
    prefix = getattr(model, "base_model_prefix", "") or ""

    def out_name(k: str) -> str | None:
        if k in state_set:
            return k
        if prefix and f"{prefix}.{k}" in state_set:
            return f"{prefix}.{k}"
        if prefix and k.startswith(prefix + ".") and k[len(prefix) + 1 :] in state_set:
            return k[len(prefix) + 1 :]
        return None

    items: list[Item] = []
    dropped: list[str] = []
    seen: set[str] = set()
    source_bytes = 0
    dtypes: dict[str, int] = {}
    for file in ckpt.files:
        for k in ckpt.iter_file(file):
            dt, shape = ckpt.info(k)
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            source_bytes += nbytes
            o = out_name(k)
            if o is None or o in seen or (o in tied_targets and tied_targets and _tie_source_present(model, o, ckpt, out_name)):
                dropped.append(k)
                continue
            seen.add(o)
            q = o in quant_weights
            if q and dt not in QUANTIZABLE_DTYPES:
                raise QuantizationError(
                    f"{ckpt.root / file}: tensor {k!r} has dtype {dt}, which cannot be quantized",
                    hint="only float32, float16 and bfloat16 weights are quantized; skip it with --skip-modules",
                )
            if q:
                dtypes[str(dt).removeprefix("torch.")] = dtypes.get(str(dt).removeprefix("torch."), 0) + nbytes
            size = quantized_size(math.prod(shape), blocksize, double_quant) if q else nbytes
            items.append(Item(k, o, file, dt, tuple(shape), q, size))
    if not any(i.quantize for i in items):
        raise QuantizationError(
            f"{ckpt.root}: no tensor would be quantized (architecture {type(model).__name__})",
            hint="check --skip-modules; qconvert quantizes the weights of nn.Linear layers",
        )
    shards: list[list[int]] = [[]]
    current = 0
    for idx, it in enumerate(items):
        if shards[-1] and current + it.out_bytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(idx)
        current += it.out_bytes
    return Plan(
        items=items,
        shards=shards,
        dropped=dropped,
        skip_patterns=skip,
        architecture=type(model).__name__,
        source_bytes=source_bytes,
        source_dtype=max(dtypes, key=dtypes.get) if dtypes else "float32",
    )


def _tie_source_present(model, target: str, ckpt: Checkpoint, out_name) -> bool:
    """A tied weight (e.g. lm_head.weight tied to the embeddings) is not saved by save_pretrained
    when the tensor it is tied to is saved."""
    src = model.all_tied_weights_keys.get(target)
    return src is not None and any(out_name(k) == src for k in ckpt.keys())
