"""Where every source tensor goes (`qconvert quantize` plan): quantized, copied, or dropped for a
stated reason, under which name and dtype, into which output shard.

Every source tensor is accounted for. The plan places each one exactly where transformers +
bitsandbytes quantize-on-load + save_pretrained puts it (meta.py works that out with transformers'
own conversion mapping, rename, revert and dtype rules, on a model built on the meta device), or
drops it with a reason that the summary prints and ``--json`` lists (a tied copy, a key transformers
ignores, the leftover of a non-persistent buffer). A tensor that fits neither is an error naming it.

Importing transformers' model code costs 3-4 s on a small machine, more than quantizing a 0.5B model.
For the common decoder-only families in ``KNOWN_DECODERS`` the same answer is read off config.json
instead: their state-dict names, which of them are ``nn.Linear`` weights, the tie and the default
skips follow from a few config fields. That table is a restatement, so tests/test_plan.py builds
every entry with transformers, under each config flag that changes the module tree, and checks that
both ways give the same plan; and any checkpoint whose tensor names are not exactly what the table
expects (an unknown key, a missing one, another prefix) takes the transformers path. The skip rules
(default skips, ``_keep_in_fp32_modules``, ``--skip-modules`` matched as transformers matches
``llm_int8_skip_modules``) are restated in meta.py rather than imported, because importing
``transformers.quantizers`` loads every quantization backend transformers knows (over 2 s); the
byte-identity tests hold them to transformers' behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError, OptionError, QuantizationError
from ..io.checkpoint import SAFETENSORS_DTYPES, Checkpoint
from ..format.constants import FLOAT_DTYPES
from ..format.layout import dtype_name, stored_nbytes
from .meta import TIED, Placement, Placements, cast_reason, check_user_skips, is_skipped, load_dtype, meta_placements
from .options import QuantizeOptions
from .sources import DequantizingReader, reading_view

QUANTIZABLE_DTYPES = FLOAT_DTYPES
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
    out_dtype: torch.dtype  # the dtype written (quantized: the dtype quantized from)
    transpose: bool = False  # a Conv1D weight, quantized as its transpose
    cast_reason: str | None = None
    expert: bool = False  # a routed-expert tensor (quantized or not: see Plan.experts)


@dataclass
class Plan:
    items: list[Item]
    shards: list[list[int]]  # item indices per output shard, in order
    dropped: dict[str, str]  # source key -> why it is not written
    skip_patterns: list[str]
    architecture: str
    source_bytes: int
    source_dtype: str
    settings: dict[str, Any] = field(default_factory=dict)
    experts: str = "4bit"  # what was asked for the routed experts: "4bit" or "16bit"
    experts_kept: dict[str, str] = field(default_factory=dict)  # expert tensor kept 16-bit under --experts 4bit -> why
    source_scheme: dict[str, Any] | None = None  # an FP8 / MXFP4 source: what is dequantized (sources.py)

    def expert_figures(self) -> dict[str, Any]:
        """The routed experts' share of the model's parameters, and how many of those stay 16-bit."""
        total = sum(math.prod(i.shape) for i in self.items)
        routed = sum(math.prod(i.shape) for i in self.items if i.expert)
        kept = sum(math.prod(i.shape) for i in self.items if i.expert and not i.quantize)
        return {"mode": self.experts, "params": routed, "share": routed / total if total else 0.0,
                "kept_16bit_params": kept, "kept_16bit_share": kept / total if total else 0.0,
                "kept_16bit": [{"tensor": k, "reason": r} for k, r in self.experts_kept.items()]}

    def shard_names(self) -> list[str]:
        from ..io.shards import shard_names

        return shard_names(len(self.shards))

    def summary(self) -> dict[str, Any]:
        names = self.shard_names()
        return {
            "architecture": self.architecture,
            "tensors": len(self.items),
            "quantized": sum(i.quantize for i in self.items),
            "dropped": [{"tensor": k, "reason": r} for k, r in self.dropped.items()],
            "cast": [{"tensor": i.source_key, "reason": i.cast_reason} for i in self.items if i.cast_reason],
            "skip_modules": self.skip_patterns,
            "source_bytes": self.source_bytes,
            "estimated_output_bytes": sum(i.out_bytes for i in self.items),
            "shards": [
                {"file": names[s], "tensors": len(idx), "estimated_bytes": sum(self.items[i].out_bytes for i in idx)}
                for s, idx in enumerate(self.shards)
            ],
            "settings": self.settings,
            "experts": self.expert_figures(),
            "source_scheme": self.source_scheme,
        }


def quantized_size(numel: int, blocksize: int, double_quant: bool) -> int:
    """Estimated bytes of one 4-bit weight in its shard: the layout's entries, exact, plus an estimate
    of its quant-state JSON."""
    return stored_nbytes(numel, blocksize, double_quant, QUANT_STATE_JSON_ESTIMATE)


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


def table_placements(layout: Layout, info: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict, user_skips: list[str]) -> Placements:
    """Placements for a ``KNOWN_DECODERS`` checkpoint (whose names known_layout has checked)."""
    skips = sorted(set(layout.skips) | set(user_skips))
    first_float = next((dt for dt, _ in info.values() if dt.is_floating_point), None)
    ldt = load_dtype(config, first_float)
    result = Placements(layout.architecture, skips, ldt, modules=list(layout.skips))
    for k, (dt, _) in info.items():
        if layout.tied.get(k) in info:
            result.dropped[k] = TIED.format(layout.tied[k])
            continue
        q = k in layout.quant_weights and not is_skipped(k.removesuffix(".weight"), skips)
        result.places[k] = Placement(k, q, ldt, False, cast_reason(dt, ldt, "config.json dtype"))
    return result


def make_plan(ckpt: Checkpoint, options: QuantizeOptions | None = None, *, use_transformers: bool = False) -> Plan:
    """The plan for ``ckpt`` under a quantize run's ``options`` (default: the CLI's defaults); the
    plan reads its skip_modules, blocksize, double_quant, max_shard_size and experts.
    ``use_transformers`` forces the meta-model path (tests compare the two). ``experts``: "4bit"
    quantizes the routed experts (spec section 14), "16bit" leaves them as transformers +
    bitsandbytes does (byte-identical output). An FP8 or MXFP4 source is planned as the 16-bit
    checkpoint transformers dequantizes it into."""
    o = options or QuantizeOptions()
    blocksize, double_quant, experts = o.blocksize, o.double_quant, o.experts
    if experts not in EXPERT_MODES:
        raise OptionError(f"unknown experts mode {experts!r}", hint=f"use one of {', '.join(EXPERT_MODES)}")
    ckpt = reading_view(ckpt)
    info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    files: dict[str, str] = {}
    for file in ckpt.files:
        for k in ckpt.iter_file(file):
            if (raw := ckpt.dtype_name(k)) not in SAFETENSORS_DTYPES:
                raise FormatError(
                    f"{ckpt.root / file}: tensor {k!r} has dtype {raw}, which qconvert cannot read or copy",
                    hint="convert that tensor to a torch dtype first, or use transformers + bitsandbytes for this model",
                )
            dt, shape = ckpt.info(k)
            info[k], files[k] = (dt, tuple(shape)), file
    user = list(o.skip_modules)
    layout = None if use_transformers else known_layout(ckpt.config(), list(info))
    if layout is None:
        placed = meta_placements(ckpt.config_dir(), info, ckpt.config(), user, quantize_experts=experts == "4bit")
    else:
        placed = table_placements(layout, info, ckpt.config() or {}, user)
    check_user_skips(user, placed, info)
    items: list[Item] = []
    kept: dict[str, str] = {}
    for k, (dt, shape) in info.items():
        p = placed.places.get(k)
        if p is None:
            if k not in placed.dropped:  # the placement functions answer for every key; never skip one silently
                raise QuantizationError(f"{ckpt.root / files[k]}: tensor {k!r} was neither placed nor dropped by the plan")
            continue
        if p.expert and p.quantize and (why := expert_unquantizable(shape, dt, blocksize)):
            kept[k] = why
            p = Placement(p.out_key, False, p.out_dtype, p.transpose, p.cast_reason, True)
        if p.quantize and dt not in QUANTIZABLE_DTYPES:
            raise QuantizationError(
                f"{ckpt.root / files[k]}: tensor {k!r} has dtype {dt}, which cannot be quantized",
                hint="only float32, float16 and bfloat16 weights are quantized; skip it with --skip-modules",
            )
        nbytes = ckpt.nbytes(k)
        size = quantized_size(math.prod(shape), blocksize, double_quant) if p.quantize else math.prod(shape) * p.out_dtype.itemsize
        items.append(Item(k, p.out_key, files[k], dt, shape, p.quantize, size, nbytes, p.out_dtype, p.transpose, p.cast_reason,
                          p.expert))
    if not any(i.quantize for i in items):
        subclasses = f" (its linear layers are {', '.join(placed.linear_subclasses)}, subclasses it leaves alone)" if placed.linear_subclasses else ""
        raise QuantizationError(
            f"{ckpt.root}: no tensor would be quantized: transformers + bitsandbytes quantizes no layer of {placed.architecture}{subclasses}",
            hint="it quantizes only modules of type exactly nn.Linear, and Conv1D; check --skip-modules",
        )
    source_dropped = ckpt.dropped if isinstance(ckpt, DequantizingReader) else {}
    return Plan(
        items=items,
        shards=_shards(items, parse_size(o.max_shard_size)),
        dropped={**placed.dropped, **source_dropped},
        skip_patterns=placed.skips,
        architecture=placed.architecture,
        source_bytes=sum(i.src_bytes for i in items) + sum(ckpt.nbytes(k) for k in (*placed.dropped, *source_dropped)),
        source_dtype=dtype_name(placed.config_dtype or placed.load_dtype),
        experts=experts,
        experts_kept=kept,
        source_scheme=ckpt.describe() if isinstance(ckpt, DequantizingReader) else None,
    )


def _shards(items: list[Item], limit: int) -> list[list[int]]:
    """Item indices per output shard, in order: a shard is closed before the item that would take it
    over ``limit`` bytes (an item larger than the limit gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    current = 0
    for idx, it in enumerate(items):
        if shards[-1] and current + it.out_bytes > limit:
            shards.append([])
            current = 0
        shards[-1].append(idx)
        current += it.out_bytes
    return shards


EXPERT_MODES = ("4bit", "16bit")


def expert_unquantizable(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int) -> str | None:
    """Why a routed-expert tensor stays 16-bit under ``--experts 4bit``, or None. A fused [E, out, in]
    stack is quantized over its expert-major flattening, so each expert's out * in elements must be
    a whole number of blocks (no block straddles two experts: spec section 14.2)."""
    if dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {dtype} cannot be quantized"
    if len(shape) == 3 and (shape[1] * shape[2]) % blocksize:
        return f"an expert's {shape[1]} x {shape[2]} elements are not a multiple of the block size {blocksize}"
    return None
