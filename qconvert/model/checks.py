"""What a checkpoint folder must be before qconvert loads it: the reader rules of spec/robustness.md.

A folder's config.json says which model to build; the tensors must be exactly what that model holds.
:func:`check_model_folder` proves it before any weight is read:

1. config.json exists, is at most :data:`MAX_CONFIG_BYTES`, is UTF-8 JSON and a JSON object; its
   ``model_type`` is one transformers knows (a config that needs remote code is refused, never run)
   and its architecture is a transformers model class.
2. No count read from it may size work or memory beyond what the tensors can back: every integer
   field named ``num_*``/``n_*`` or a layer count is checked against the number of tensors and their
   largest dimension before the model is built (a config claiming 10**9 layers is refused at once).
3. The model is built on the meta device (nothing allocated) and compared with the checkpoint's
   headers: every 4-bit weight sits on a Linear whose [out, in] is its quant-state shape; every
   other tensor has its parameter's shape and a usable dtype; nothing the model needs is missing and
   nothing is left over. Buffers the model computes itself may not exceed :data:`MAX_BUFFER_BYTES`
   or 4 bytes per element in the checkpoint, whichever is larger.

``qconvert verify`` runs the same comparison in its lenient form (``strict=False``): tensors the
model has no place for are allowed (transformers ignores them) and float dtypes may mix
(transformers casts them); tensors the model needs must be present unless transformers renames the
checkpoint's tensors on load for that model type (MoE experts...). Every 4-bit weight must fit its
module in both forms.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..names import SAFETENSORS_FLOAT_NAMES

MAX_CONFIG_BYTES = 16 * 2**20
MAX_BUFFER_BYTES = 2**30
LAYER_COUNT_KEYS = frozenset({
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "num_encoder_layers",
    "decoder_layers", "encoder_layers",
})
FLOAT_DTYPES = frozenset(SAFETENSORS_FLOAT_NAMES)
_REUPLOAD = "re-download the model, or quantize its source again"


def read_config(root: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict; FormatError for anything else."""
    p = root / "config.json"
    if not p.is_file():
        raise FormatError(f"{p}: missing", hint="a model folder needs the config.json it was saved with")
    check_config_size(p)
    from ..io.checkpoint import read_json_object

    return read_json_object(p, "config.json")


def check_config_size(p: Path) -> None:
    """Refuse a config file over :data:`MAX_CONFIG_BYTES` before reading it."""
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"{p}: {p.stat().st_size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config")


def model_class(cfg: dict[str, Any], where: str):
    """The transformers model class config.json names, refusing remote code and non-model names."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        if cfg.get("auto_map"):
            raise FormatError(f"{where}: model_type {mt!r} needs remote code (auto_map), which qconvert never runs",
                              hint="use a model whose architecture is built into transformers")
        raise FormatError(f"{where}: model_type {mt!r} is not known to transformers {transformers.__version__}",
                          hint="check the folder, or upgrade transformers")
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        hint = "use a model whose architecture is built into transformers" if cfg.get("auto_map") else "set architectures to the model class"
        raise FormatError(f"{where}: architectures[0] {arch!r} is not a transformers model class", hint=hint)
    return cls


def _int_fields(d: Any, depth: int = 0):
    if isinstance(d, dict) and depth < 4:
        for k, v in d.items():
            if isinstance(v, dict):
                yield from _int_fields(v, depth + 1)
            elif type(v) is int:
                yield k, v


def check_counts(cfg: dict[str, Any], n_tensors: int, largest_dim: int, where: str) -> None:
    """Counts from config.json (layers, heads, experts...) within what the tensors can back."""
    bound = max(n_tensors, largest_dim)
    for k, v in _int_fields(cfg):
        if k in LAYER_COUNT_KEYS or k.startswith(("num_", "n_")):
            if not 0 <= v <= bound:
                raise FormatError(
                    f"{where}: {k} is {v}, but the checkpoint's {n_tensors} tensors (largest dimension {largest_dim}) cannot back that",
                    hint="config.json does not describe these weights; " + _REUPLOAD)


def build_meta(cls, config, where: str):
    """The model on the meta device: no memory for parameters or buffers."""
    from accelerate import init_empty_weights

    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config  # the skeleton must not try to quantize itself
    try:
        with init_empty_weights(include_buffers=True):
            model = cls(config)
        model.tie_weights()
    except Exception as e:  # transformers and torch raise many types for a config they cannot build
        first = (str(e).strip().splitlines() or [""])[0]
        raise FormatError(f"{where}: does not build a {cls.__name__}", detail=f"{type(e).__name__}: {first}",
                          hint="config.json is damaged or was edited; " + _REUPLOAD) from None
    finally:
        if qc is not None:
            config.quantization_config = qc
    return model


def is_conv1d(module) -> bool:
    """Whether ``module`` is a GPT-2 style Conv1D (transformers' ``Conv1D`` or a subclass): a linear
    layer whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_shape(module) -> tuple[int, int] | None:
    """[out, in] of a module a 4-bit weight can replace (nn.Linear, or transformers' Conv1D)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module) and getattr(module, "weight", None) is not None:
        return tuple(reversed(module.weight.shape))
    return None


def compare(model, ckpt, quant_shapes: dict[str, tuple[int, ...]], where: str, *, strict: bool = True,
            require_all: bool | None = None) -> None:
    """The checkpoint's tensors against the meta ``model`` (module docstring, point 3), each at the
    place transformers loads it (qconvert.model.conversions: renamed, or merged by a converter).
    ``strict`` also refuses tensors the model has no place for and a mix of float dtypes;
    ``require_all`` (default: ``strict``) refuses a checkpoint that lacks a tensor the model needs."""
    from .conversions import converted_sources, load_map, routed_expert_params

    arch = type(model).__name__
    state = model.state_dict(keep_vars=True)
    keys = ckpt.keys()
    owned = owned_keys(keys, quant_shapes)
    lm = load_map(model, [k for k in keys if k not in owned or k in quant_shapes], state)
    group_of = lm.group_of
    try:
        sources = converted_sources(model, lm, state)
    except Exception as e:  # a conversion transformers cannot run on meta tensors: nothing to check against
        if not strict:  # verify's lenient form: the merged tensors go unchecked, as names it does not know
            sources = {}
        else:
            raise FormatError(f"{where}: cannot work out the tensors transformers merges into the {arch} ({type(e).__name__}: {e})"[:300],
                              hint="load this model with transformers") from None
    experts = routed_expert_params(model)
    for name, shape in quant_shapes.items():
        if _check_4bit_expert(name, shape, lm, experts, sources, arch, where):
            continue
        if name in group_of:
            raise FormatError(f"{where}: 4-bit weight {name!r} is one that transformers merges on load into {group_of[name]!r}, "
                              "which qconvert cannot do with packed 4-bit data",
                              hint="qconvert quantize never writes this; load the model with transformers + bitsandbytes")
        target = lm.names.get(name, name)
        mod_name = target.removesuffix(".weight")
        try:
            module = model.get_submodule(mod_name) if target.endswith(".weight") else None
        except AttributeError:
            module = None
        if module is None or target not in state:
            raise FormatError(f"{where}: 4-bit weight {name!r} has no place in the {arch} config.json builds",
                              hint="config.json and the weights disagree (a layer count?); " + _REUPLOAD)
        want = linear_shape(module)
        if want is None:
            raise FormatError(f"{where}: 4-bit weight {name!r} is not the weight of a Linear layer in the {arch} config.json builds",
                              hint="config.json and the weights disagree; " + _REUPLOAD)
        if tuple(shape) != tuple(want):
            raise FormatError(f"{where}: 4-bit weight {name!r} has quant-state shape {list(shape)}, the {arch} needs {list(want)}",
                              hint="the quant state is damaged or config.json was edited; " + _REUPLOAD)
    unexpected = []
    placed = {}  # checkpoint key -> the model's name for it (plain keys)
    for k in keys:
        if k in owned:
            continue
        if k in lm.names:
            want_t = state[lm.names[k]]
            placed[k] = lm.names[k]
        elif k in group_of and k in sources:
            want_t = sources[k]
        else:
            unexpected.append(k)
            continue
        dt = ckpt.dtype_name(k)
        _, shape = ckpt.info(k)
        if want_t.is_floating_point() != (dt in FLOAT_DTYPES) or (not want_t.is_floating_point() and dt.startswith("F")):
            raise FormatError(f"{where}: tensor {k!r} is stored as {dt}, the {arch} needs a {want_t.dtype} tensor",
                              hint=_REUPLOAD)
        if tuple(shape) != tuple(want_t.shape):
            raise FormatError(f"{where}: tensor {k!r} is {list(shape)}, the {arch} built from config.json needs {list(want_t.shape)}",
                              hint="config.json and the weights disagree; " + _REUPLOAD)
    if strict:
        floats = [k for k in keys if k not in owned and (k in placed or k in sources)]
        _check_one_float_dtype(model, ckpt, floats, where, {**placed, **{k: group_of[k] for k in floats if k in group_of}})
        _refuse_unexpected(model, state, unexpected, arch, where)
    if strict if require_all is None else require_all:
        present = set(keys)
        lacking = [k for k in sources if k not in present]  # a converted parameter made from every source
        if lacking:
            raise FormatError(f"{where}: lacks {len(lacking)} tensor(s) the {arch} built from config.json needs, e.g. {lacking[0]!r}",
                              hint="config.json and the weights disagree (a layer count?); " + _REUPLOAD)
        _refuse_missing(state, lm.placed_names(), arch, where)


def _check_4bit_expert(name: str, shape, lm, experts: dict, sources: dict, arch: str, where: str) -> bool:
    """Whether the 4-bit weight ``name`` is a routed expert (spec section 14), checked: a fused
    [E, out, in] stack loaded 1:1 into an experts parameter of that shape, or one expert's matrix
    that transformers merges into one (the shape its save-time revert gives). False: not an expert."""
    target = lm.group_of.get(name) or lm.names.get(name)
    targets = lm.targets.get(target, [target])
    if not targets or not all(t in experts for t in targets):
        return False
    want = experts[target] if name in lm.names else getattr(sources.get(name), "shape", None)
    if want is None and not sources:
        return True  # verify's lenient form, where transformers cannot revert the conversion on meta tensors
    if want is None or tuple(shape) != tuple(want):
        raise FormatError(f"{where}: 4-bit expert weight {name!r} has quant-state shape {list(shape)}, the {arch} needs "
                          f"{None if want is None else list(want)}", hint="the quant state is damaged or config.json was edited; " + _REUPLOAD)
    return True


def _refuse_unexpected(model, state, unexpected: list[str], arch: str, where: str) -> None:
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    persistent = set(state)
    computed = {n for n, _ in model.named_buffers()} - persistent
    unexpected = [k for k in unexpected if k not in computed and not any(p.search(k) for p in ignore)]
    if unexpected:
        raise FormatError(f"{where}: {len(unexpected)} tensor(s) have no place in the {arch} config.json builds, e.g. {unexpected[0]!r}",
                          hint="config.json and the weights disagree (a layer count?); " + _REUPLOAD)


def _refuse_missing(state, present, arch: str, where: str) -> None:
    """``present``: the model names the checkpoint fills."""
    present = set(present)
    groups: dict[int, list[str]] = {}
    for n, t in state.items():
        groups.setdefault(id(t), []).append(n)
    missing = [names[0] for names in groups.values() if not present.intersection(names)]
    if missing:
        raise FormatError(f"{where}: lacks {len(missing)} tensor(s) the {arch} built from config.json needs, e.g. {missing[0]!r}",
                          hint="config.json and the weights disagree (a layer count?); " + _REUPLOAD)


def _check_one_float_dtype(model, ckpt, names: list[str], where: str, model_names: dict[str, str] | None = None) -> None:
    """Unquantized floating tensors share one dtype (float32 is also allowed in the modules the
    model keeps in float32): a mix loads but fails in the first matmul. ``model_names``: checkpoint
    key -> the model's name for it, where transformers renames it (the fp32 modules are model names)."""
    from collections import Counter

    model_names = model_names or {}
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    floats = {k: ckpt.dtype_name(k) for k in names if ckpt.dtype_name(k) in FLOAT_DTYPES}
    kept = {k for k in floats if any(m in k or m in model_names.get(k, k) for m in keep)}
    if not floats:
        return
    # the model's dtype is the one of the tensors it does not keep in float32 (hy_v4 keeps most in float32)
    common = Counter(dt for k, dt in floats.items() if k not in kept).most_common(1)
    common = common[0][0] if common else Counter(floats.values()).most_common(1)[0][0]
    for k, dt in floats.items():
        if dt != common and not (dt == "F32" and k in kept):
            raise FormatError(f"{where}: tensor {k!r} is {dt}, the other unquantized tensors are {common}",
                              hint="a model computes in one dtype; cast the tensor, or quantize the source again")


def owned_keys(keys, quantized) -> set[str]:
    """The keys that belong to the 4-bit weights ``quantized`` (each weight and its quant-state
    entries), found in one pass (layout.companion_keys per weight would be quadratic)."""
    from ..format.layout import QUANT_STATE_PREFIX, SUFFIXES

    qset = set(quantized)
    out = set()
    for k in keys:
        i = k.find("." + QUANT_STATE_PREFIX)
        owner = k[:i] if i > 0 else k
        if owner not in qset and "." in k:
            head, _, last = k.rpartition(".")
            owner = head if last in SUFFIXES else owner
        if owner in qset:
            out.add(k)
    return out


def buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for _, b in model.named_buffers())


def quant_shapes(ckpt) -> dict[str, tuple[int, ...]]:
    """Each 4-bit weight's shape from its quant state (the small JSON entry only)."""
    from ..format.layout import QUANT_STATE_PREFIX, unpack_quant_state

    out = {}
    for k in ckpt.keys():
        i = k.find("." + QUANT_STATE_PREFIX)
        if i > 0:
            qs = unpack_quant_state(ckpt.get(k), f"{ckpt.root}: tensor {k[:i]!r}")
            out[k[:i]] = tuple(qs["shape"])
    return out


def check_structure(root: Path, ckpt, cfg: dict[str, Any], *, strict: bool = True):
    """Build the model config.json describes on the meta device and compare it with ``ckpt``;
    returns the meta model. Raises FormatError (see the module docstring)."""
    from transformers import AutoConfig

    where = str(root / "config.json")
    cls = model_class(cfg, where)
    keys = ckpt.keys()
    dims = [d for k in keys for d in ckpt.info(k)[1]]
    check_counts(cfg, len(keys), max(dims, default=0), where)
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, OSError, its own validation errors...
        first = (str(e).strip().splitlines() or [""])[0]
        raise FormatError(f"{where}: transformers cannot read it", detail=f"{type(e).__name__}: {first}",
                          hint="config.json is damaged or was edited; " + _REUPLOAD) from None
    model = build_meta(cls, config, where)
    total = sum(math.prod(ckpt.info(k)[1]) for k in keys)
    limit = max(MAX_BUFFER_BYTES, total * 4)
    if buffer_bytes(model) > limit:
        raise FormatError(f"{where}: the {cls.__name__} it builds computes {buffer_bytes(model)} bytes of buffers, over the {limit}-byte limit",
                          hint="a size in config.json is far larger than the weights; " + _REUPLOAD)
    require_all = strict
    if not strict:  # checkpoints transformers renames on load (MoE experts...) keep their own names
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        require_all = get_checkpoint_conversion_mapping(config.model_type) is None
    compare(model, ckpt, quant_shapes(ckpt), str(ckpt.root), strict=strict, require_all=require_all)
    return model


def check_model_folder(root: Path) -> None:
    """The load_model check: config.json and every tensor header against the model it builds."""
    from ..io.checkpoint import Checkpoint

    from ..format.layout import LOGICAL_DTYPES, find_quantized, is_4bit_config

    cfg = read_config(root)
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise FormatError(f"{root / 'config.json'}: quantization_config must be a JSON object, not {type(qc).__name__}",
                          hint="config.json is damaged or was edited; " + _REUPLOAD)
    if not is_4bit_config(qc):
        return  # load_model refuses it with its own message and hint
    cd = qc.get("bnb_4bit_compute_dtype")
    if cd is not None and (not isinstance(cd, str) or cd.removeprefix("torch.") not in LOGICAL_DTYPES):
        raise FormatError(f"{root / 'config.json'}: bnb_4bit_compute_dtype {cd!r} is not one of {list(LOGICAL_DTYPES)}")
    ckpt = Checkpoint(root)
    try:
        if not find_quantized(ckpt.keys()):
            raise FormatError(f"{root}: config.json claims 4-bit weights, but the checkpoint holds none",
                              hint="the weights are not the 4-bit ones; " + _REUPLOAD)
        check_structure(root, ckpt, cfg, strict=True)
    finally:
        ckpt.close()


def check_token_ids(sequences, embeddings, tok, source: str) -> None:
    """Every token id in ``sequences`` (lists of ids a tokenizer gave) has a row in ``embeddings``
    (the model's ``get_input_embeddings()``, or a row count: a GGUF's vocabulary). A tokenizer with tokens added after the model was
    saved, or another model's tokenizer, gives ids past them, and the lookup then fails deep inside
    the forward (an IndexError, or a CUDA assert) instead of naming the tokenizer. One rule for
    train, eval, generate, compare and merge's check."""
    from ..errors import DataError

    rows = embeddings if isinstance(embeddings, int) else getattr(embeddings, "num_embeddings", None)
    if not isinstance(rows, int):
        return
    top = max((max(s) for s in sequences if len(s)), default=-1)
    if top >= rows:
        shown = f" ({tok.convert_ids_to_tokens(top)!r})" if tok is not None else ""
        raise DataError(f"{source}: the tokenizer gives token id {top}{shown}, past the model's {rows} input embeddings",
                        hint="use the tokenizer saved with the model; tokens added later need resized embeddings")


#: modules holding learned absolute position embeddings (GPT-2 and GPT-Neo's wpe, OPT and BioGPT's embed_positions)
_LEARNED_POSITIONS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def position_limit(model) -> int | None:
    """The longest sequence ``model`` can run when its positions are a learned table (config
    ``n_positions``/``max_position_embeddings``): past it the table lookup fails mid-forward. None
    for models whose positions are computed (RoPE, ALiBi), which run past their config's figure."""
    import torch

    cfg = getattr(model, "config", None)
    if cfg is None or not any(isinstance(m, torch.nn.Embedding) and _LEARNED_POSITIONS.search(n) for n, m in model.named_modules()):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = next((v for v in (getattr(cfg, k, None) for k in ("n_positions", "max_position_embeddings")) if isinstance(v, int)), None)
    return limit if limit and limit > 0 else None


def check_positions(length: int, limit: int | None, source: str, hint: str) -> None:
    """Refuse a run whose sequences reach ``length`` tokens when the model takes at most ``limit``
    (:func:`position_limit`; None: no limit): named before the run, not an IndexError from inside
    the forward. ``hint`` may name ``{limit}``."""
    if limit is not None and length > limit:
        from ..errors import DataError

        raise DataError(f"{source}: {length} tokens, past the {limit} positions the model can take", hint=hint.format(limit=limit))
