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

Importing transformers' model code costs 3-4 s on a small machine, more than quantizing a 0.5B model.
For the common decoder-only families in ``KNOWN_DECODERS`` the same answer is read off config.json
instead: their state-dict names, which of them are ``nn.Linear`` weights, the tie and the default
skips follow from a few config fields. That table is a restatement too, so tests/test_plan.py
builds every entry with transformers, under each config flag that changes the module tree, and
checks that both ways give the same plan; and any checkpoint whose tensor names are not exactly
what the table expects (an unknown key, a missing one, another prefix) takes the transformers path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError, OptionError, QuantizationError
from ..format.checkpoint import SAFETENSORS_DTYPES, Checkpoint
from ..format.layout import dtype_name

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
    src_bytes: int


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


@dataclass(frozen=True)
class Layout:
    """What the plan needs to know about the model class: its state-dict names, which of them are
    weights of quantizable ``nn.Linear`` modules, the skip list, and the tied weights."""

    architecture: str
    state_keys: set[str]
    quant_weights: set[str]
    skips: list[str]
    tied: dict[str, str]  # tied target -> source, as transformers' all_tied_weights_keys
    prefix: str


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Decoder:
    """A decoder-only family: model.embed_tokens, model.layers.N.{norms, linears}, model.norm, lm_head."""

    model_type: str
    tie_default: bool
    biases: Any  # config dict -> the linear modules that have a bias
    norms: tuple[str, ...] = _NORMS
    linears: tuple[str, ...] = _ATTN + _MLP


def _attn_bias(c: dict) -> tuple[str, ...]:
    return _ATTN if c.get("attention_bias") else ()


def _attn_mlp_bias(c: dict) -> tuple[str, ...]:
    return _attn_bias(c) + (_MLP if c.get("mlp_bias") else ())


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_SANDWICH = _NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")

KNOWN_DECODERS: dict[str, Decoder] = {
    "LlamaForCausalLM": Decoder("llama", False, _attn_mlp_bias),
    "MistralForCausalLM": Decoder("mistral", False, lambda c: ()),
    "Qwen2ForCausalLM": Decoder("qwen2", False, lambda c: _ATTN[:3]),
    "Qwen3ForCausalLM": Decoder("qwen3", False, _attn_bias, _NORMS + _QK_NORMS),
    "GemmaForCausalLM": Decoder("gemma", True, _attn_bias),
    "Gemma2ForCausalLM": Decoder("gemma2", True, _attn_bias, _SANDWICH),
    "Gemma3ForCausalLM": Decoder("gemma3_text", True, _attn_bias, _SANDWICH + _QK_NORMS),
    "Olmo2ForCausalLM": Decoder(
        "olmo2", False, _attn_bias, ("post_attention_layernorm", "post_feedforward_layernorm") + _QK_NORMS
    ),
    "GraniteForCausalLM": Decoder("granite", False, _attn_mlp_bias),
    "SmolLM3ForCausalLM": Decoder("smollm3", True, _attn_mlp_bias),
    "Phi3ForCausalLM": Decoder(
        "phi3", False, lambda c: (), linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ),
}


def known_layout(config: dict[str, Any] | None, keys: list[str]) -> Layout | None:
    """The layout of a ``KNOWN_DECODERS`` checkpoint from its config alone, or None (use transformers)."""
    # An auto_map (remote code) does not matter: qconvert never runs remote code, and without it
    # transformers builds its own class for the architecture, which is what the table describes.
    if not isinstance(config, dict):
        return None
    archs = config.get("architectures")
    spec = KNOWN_DECODERS.get(archs[0]) if isinstance(archs, list) and len(archs) == 1 else None
    layers = config.get("num_hidden_layers")
    if spec is None or config.get("model_type") != spec.model_type or type(layers) is not int or layers < 1:
        return None
    tie = config.get("tie_word_embeddings", spec.tie_default)
    biases = set(spec.biases(config))
    linear = {f"model.layers.{i}.{m}.weight" for i in range(layers) for m in spec.linears}
    state = linear | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    state |= {f"model.layers.{i}.{m}.bias" for i in range(layers) for m in biases}
    state |= {f"model.layers.{i}.{m}.weight" for i in range(layers) for m in spec.norms}
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}
    # exactly the expected names, bar a tied lm_head that was not saved; anything else: transformers
    present = set(keys)
    if not present <= state or state - present - set(tied):
        return None
    # default skips (see default_skips): the tie's both ends, the module of the last parameter
    # (lm_head, or model.norm when lm_head is tied and so not a parameter of its own), the output embeddings
    skips = {"lm_head", "model.embed_tokens", "model.norm"} if tie else {"lm_head"}
    return Layout(archs[0], state, linear, sorted(skips), tied, "model")


def meta_layout(root, user_skips: list[str]) -> Layout:
    """The layout read from the model class itself, built on the meta device by transformers."""
    from torch import nn

    model, _ = meta_model(root)
    skip = sorted(default_skips(model) | set(model._keep_in_fp32_modules or ()) | set(user_skips))
    quant_weights = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not is_skipped(name, skip):
            quant_weights.add(f"{name}.weight")
        elif type(module).__name__ == "Conv1D" and not is_skipped(name, skip):
            raise QuantizationError(
                f"module {name!r} is a transposed Conv1D (GPT-2 style), which qconvert does not quantize yet",
                hint="use transformers + bitsandbytes for this architecture",
            )
    return Layout(
        architecture=type(model).__name__,
        state_keys=set(model.state_dict().keys()),
        quant_weights=quant_weights,
        skips=skip,
        tied=dict(getattr(model, "all_tied_weights_keys", {}) or {}),
        prefix=getattr(model, "base_model_prefix", "") or "",
    )


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
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # a config transformers parses but cannot build (zero heads, bad sizes...)
        raise FormatError(f"{root}/config.json: transformers cannot build {arch} from it ({type(e).__name__}: {e})"[:300],
                          hint="use the config.json that came with these weights") from None
    return model, config


def make_plan(
    ckpt: Checkpoint,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: list[str] | None = None,
    max_shard_size: int = 2 * 10**9,
    use_transformers: bool = False,
) -> Plan:
    """The plan for ``ckpt``. ``use_transformers`` forces the meta-model path (tests compare the two)."""
    layout = None if use_transformers else known_layout(ckpt.config(), ckpt.keys())
    if layout is None:
        layout = meta_layout(ckpt.config_dir(), list(skip_modules or ()))
    else:  # the user's patterns on top of the defaults, as transformers applies them
        skip = sorted(set(layout.skips) | set(skip_modules or ()))
        layout = Layout(
            layout.architecture, layout.state_keys,
            {w for w in layout.quant_weights if not is_skipped(w.removesuffix(".weight"), skip)},
            skip, layout.tied, layout.prefix,
        )
    state_set, prefix, tied = layout.state_keys, layout.prefix, layout.tied

    def out_name(k: str) -> str | None:
        if k in state_set:
            return k
        if prefix and f"{prefix}.{k}" in state_set:
            return f"{prefix}.{k}"
        if prefix and k.startswith(prefix + ".") and k[len(prefix) + 1 :] in state_set:
            return k[len(prefix) + 1 :]
        return None

    saved = {o for k in ckpt.keys() if (o := out_name(k)) is not None}
    items: list[Item] = []
    dropped: list[str] = []
    seen: set[str] = set()
    source_bytes = 0
    dtypes: dict[str, int] = {}
    for file in ckpt.files:
        for k in ckpt.iter_file(file):
            if (raw := ckpt.dtype_name(k)) not in SAFETENSORS_DTYPES:
                raise FormatError(
                    f"{ckpt.root / file}: tensor {k!r} has dtype {raw}, which qconvert cannot read or copy",
                    hint="convert that tensor to a torch dtype first, or use transformers + bitsandbytes for this model",
                )
            dt, shape = ckpt.info(k)
            nbytes = math.prod(shape) * dt.itemsize
            source_bytes += nbytes
            o = out_name(k)
            if o is None or o in seen or tied.get(o) in saved:  # a tied weight is saved once, at its source
                dropped.append(k)
                continue
            seen.add(o)
            q = o in layout.quant_weights
            if q and dt not in QUANTIZABLE_DTYPES:
                raise QuantizationError(
                    f"{ckpt.root / file}: tensor {k!r} has dtype {dt}, which cannot be quantized",
                    hint="only float32, float16 and bfloat16 weights are quantized; skip it with --skip-modules",
                )
            if q:
                dtypes[dtype_name(dt)] = dtypes.get(dtype_name(dt), 0) + nbytes
            size = quantized_size(math.prod(shape), blocksize, double_quant) if q else nbytes
            items.append(Item(k, o, file, dt, tuple(shape), q, size, nbytes))
    if not any(i.quantize for i in items):
        raise QuantizationError(
            f"{ckpt.root}: no tensor would be quantized (architecture {layout.architecture})",
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
        skip_patterns=layout.skips,
        architecture=layout.architecture,
        source_bytes=source_bytes,
        source_dtype=max(dtypes, key=dtypes.get) if dtypes else "float32",
    )

