"""Where every source tensor goes, worked out the way transformers + bitsandbytes does it.

The anchor, ``from_pretrained(src, quantization_config=BitsAndBytesConfig(...)).save_pretrained(out)``,
does four things to a checkpoint's tensors that a converter must reproduce to write the same bytes:

- it **renames and merges** tensors on load with the per-model conversions of
  ``transformers/conversion_mapping.py`` (MoE experts stacked into 3-D parameters, ``embed_out`` to
  ``lm_head`` in GPT-NeoX, ...) and writes the original names back on save;
- it **quantizes** the weight of every module that is exactly ``nn.Linear`` or a GPT-2 style
  ``Conv1D`` (whose weight it transposes first), bar the skipped modules;
- it **casts** every tensor to the load dtype (config.json's ``dtype``), except the parameters that
  the model declares in another dtype and the ``_keep_in_fp32_modules_strict`` ones (float32);
- it **drops** tied copies, keys it ignores on load or save, and leftovers of non-persistent buffers.

None of this is restated here: the conversions, the rename functions, the revert used by
``save_pretrained``, the dtype plan and the ignore lists are transformers' own, called on a model
built on the meta device (no weights, no memory). What is ours is the bookkeeping: each source tensor
gets a :class:`Placement` or a stated reason for being dropped, and a tensor that fits neither is an
error that names it. The output names are then checked against transformers' own revert of the
whole state dict, so a change in transformers' conversions shows up as an error, never as a lost
tensor. tests/test_arch.py holds this to the anchor, byte for byte, on one family per rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, QuantizationError

# Reasons printed by the summary and listed by --json for each tensor that is not written.
TIED = "tied to {}: transformers saves the pair once"
IGNORED_ON_LOAD = "transformers ignores it on load (the model's _keys_to_ignore_on_load_unexpected)"
IGNORED_ON_SAVE = "transformers does not save it (the model's _keys_to_ignore_on_save)"
STALE_BUFFER = "a leftover of the non-persistent buffer {!r}, which transformers recomputes and never saves"


@dataclass(frozen=True)
class Placement:
    """One source tensor in the output: its name, whether it is quantized, its dtype there, and
    whether it is transposed first (a Conv1D weight, stored [in, out], is quantized as [out, in])."""

    out_key: str
    quantize: bool
    out_dtype: torch.dtype
    transpose: bool = False
    cast_reason: str | None = None  # why out_dtype differs from the source dtype, when it does
    expert: bool = False  # a routed-expert tensor (one expert's matrix, or a fused [E, out, in] stack)


@dataclass
class Placements:
    architecture: str
    skips: list[str]
    load_dtype: torch.dtype
    places: dict[str, Placement] = field(default_factory=dict)  # source key -> placement
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    linear_subclasses: list[str] = field(default_factory=list)  # nn.Linear subclasses bitsandbytes leaves alone
    config_dtype: torch.dtype | None = None  # the dtype save_pretrained writes into config.json (default: load_dtype)
    modules: list[str] = field(default_factory=list)  # module names beyond the keys' (a tied lm_head), for --skip-modules


def load_dtype(config: dict[str, Any] | None, first_float: torch.dtype | None) -> torch.dtype:
    """The dtype transformers loads a checkpoint in with ``dtype="auto"``: config.json's ``dtype``
    (``torch_dtype`` in older files), else the dtype of the first floating tensor."""
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    return first_float or torch.float32


def cast_reason(src: torch.dtype, out: torch.dtype, why: str) -> str | None:
    return None if src == out else f"{why}: {str(src).removeprefix('torch.')} -> {str(out).removeprefix('torch.')}"


def meta_model(root, dtype: torch.dtype = torch.float32) -> Any:
    """The model skeleton on the meta device, built from config.json with ``dtype`` as the default
    dtype (as from_pretrained builds it, so parameters declared in another dtype stand out). Never
    runs remote code."""
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
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # a config transformers parses but cannot build (zero heads, bad sizes...)
        raise FormatError(f"{root}/config.json: transformers cannot build {arch} from it ({type(e).__name__}: {e})"[:300],
                          hint="use the config.json that came with these weights") from None
    finally:
        torch.set_default_dtype(previous)
    return model, config


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


def check_user_skips(user: list[str], placed: Placements, keys) -> None:
    """Each --skip-modules pattern must skip some module: one that matches none (a typo: ``down_prj``)
    would leave the layers the user meant to keep 16-bit quantized, silently. Modules are those of the
    checkpoint's keys, where the plan puts them, and the model's own (a tied ``lm_head`` has no key)."""
    modules = {k.rpartition(".")[0] for k in keys} | {p.out_key.rpartition(".")[0] for p in placed.places.values()} | set(placed.modules)
    for pattern in user:
        if not any(is_skipped(m, [pattern]) for m in modules if m):
            names = sorted({p.out_key.removesuffix(".weight").rpartition(".")[2] for p in placed.places.values() if p.quantize})
            from ..errors import OptionError

            raise OptionError(f"--skip-modules {pattern!r} matches no module of this {placed.architecture}: it would skip nothing",
                              hint="a pattern matches a module's name from its start (model.layers.0.mlp) or its end (down_proj); "
                                   f"the quantized layers here end in {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")


def uses_conv1d(config: dict[str, Any] | None) -> bool:
    """Whether transformers builds this model with GPT-2 style Conv1D layers (weight stored [in, out];
    transformers + bitsandbytes quantizes its transpose). Read from the model's modeling source file,
    which is cheap: no model code is imported. tests/test_arch.py checks it against built models."""
    mt = (config or {}).get("model_type")
    if not isinstance(mt, str):
        return False
    src = _modeling_source(mt)
    return src.is_file() and "Conv1D(" in src.read_text(encoding="utf-8")


def _modeling_source(model_type: str) -> Path:
    """transformers' modeling file for ``model_type``. A type that names its own folder (llama, gpt2)
    is found without importing transformers, which takes 2-4 s (most of a small merge); the others go
    through transformers' own mapping. tests/test_arch.py checks both ways agree on every model type."""
    import importlib.util

    key = model_type.replace("-", "_")
    spec = importlib.util.find_spec("transformers")  # finds the package without running its __init__
    if key.isidentifier() and spec is not None and spec.submodule_search_locations:
        direct = Path(list(spec.submodule_search_locations)[0]) / "models" / key / f"modeling_{key}.py"
        if direct.is_file():
            return direct
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    return Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"


def quantizable_modules(model, skips: list[str]) -> dict[str, bool]:
    """Module name -> is a Conv1D, for each module that bitsandbytes' integration replaces by a
    4-bit layer: type exactly nn.Linear, or any Conv1D (transformers' replace_with_bnb_linear)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        conv = isinstance(module, Conv1D)
        if (conv or type(module) is nn.Linear) and not is_skipped(name, skips):
            out[name] = conv
    return out


def meta_placements(root, info: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict | None, user_skips: list[str],
                    quantize_experts: bool = False) -> Placements:
    """Place every source tensor (``info``: key -> dtype and shape, in checkpoint order) as the anchor
    would; see the module docstring. Raises QuantizationError naming the tensors that have no place.
    ``quantize_experts``: also quantize the routed experts (:func:`expert_source`), which the anchor
    leaves 16-bit; every other placement is the anchor's."""
    from ..model.conversions import routed_expert_params
    first_float = next((dt for dt, _ in info.values() if dt.is_floating_point), None)
    ldt = load_dtype(config, first_float)
    model, _ = meta_model(root, ldt)
    skips = sorted(default_skips(model) | set(model._keep_in_fp32_modules or ()) | set(user_skips))
    quantizable = quantizable_modules(model, skips)
    result = Placements(type(model).__name__, skips, ldt, modules=[name for name, _ in model.named_modules() if name])
    result.linear_subclasses = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear}
    )
    sd = model.state_dict()
    loaded = _loaded_names(model, list(info), sd)
    _drop_unplaced(model, loaded, sd, result, root)
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    present = {n for n, _ in loaded.values()}
    dtype_of = _dtype_rule(model, ldt, sd)
    experts = routed_expert_params(model)
    for k, (name, converter) in loaded.items():
        if k in result.dropped:
            continue
        if tied.get(name) in present:  # a tied weight is saved once, at its source
            result.dropped[k] = TIED.format(tied[name])
            continue
        module, _, attr = name.rpartition(".")
        quantize = attr == "weight" and module in quantizable
        if quantize and converter is not None:
            raise QuantizationError(
                f"{root}: transformers converts {k!r} on load into the 4-bit layer {module!r}, and qconvert cannot write what it saves then",
                hint="transformers + bitsandbytes would have to quantize this model",
            )
        expert = name in experts and not is_skipped(module, skips) and expert_source(info[k][1], converter, experts[name])
        out_dtype, why = dtype_of(name, quantize or (expert and quantize_experts))
        result.places[k] = Placement(
            out_key=k if converter is not None else name,  # renamed back below; a converted group keeps its source names
            quantize=quantize or (expert and quantize_experts),
            out_dtype=out_dtype,
            transpose=quantize and quantizable[module],
            cast_reason=cast_reason(info[k][0], out_dtype, why),
            expert=expert,
        )
    _refuse_missing(model, loaded, root)
    _saved_names(model, loaded, sd, result, root, info)
    result.config_dtype = _saved_model_dtype(model, quantizable, dtype_of)
    return result


def expert_source(shape: tuple[int, ...], converter: str | None, param: tuple[int, ...]) -> bool:
    """Whether a source tensor of a routed-expert parameter ``param`` [E, out, in] can be quantized
    expert by expert: the fused parameter itself (loaded 1:1, same shape), or, for a checkpoint that
    transformers merges on load, one expert's 2-D matrix (each a weight of its own: spec section 14)."""
    return tuple(shape) == tuple(param) if converter is None else len(shape) == 2


def _saved_model_dtype(model, quantizable: dict, dtype_of) -> torch.dtype:
    """The ``dtype`` save_pretrained writes into config.json: ``model.dtype``, the dtype of the first
    floating-point parameter, where the 4-bit weights (uint8 by then) do not count."""
    for name, p in model.named_parameters():
        module, _, attr = name.rpartition(".")
        if p.is_floating_point() and not (attr == "weight" and module in quantizable):
            return dtype_of(name, False)[0]
    return torch.float32


def _refuse_missing(model, loaded: dict, root) -> None:
    """Parameters the checkpoint lacks (neither they nor a tied partner are in it): transformers would
    initialize them randomly and save that. qconvert does not invent weights."""
    present = {n for n, _ in loaded.values()}
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    partners = {**tied, **{v: k for k, v in tied.items()}}
    missing = [n for n, _ in model.named_parameters() if n not in present and partners.get(n) not in present]
    if missing:
        raise QuantizationError(
            f"{root}: the checkpoint lacks {len(missing)} parameter(s) of {type(model).__name__}: {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else ""),
            hint="transformers would fill them with random values; qconvert does not invent weights: check that config.json belongs to these weights",
        )


def _loaded_names(model, keys: list[str], sd: dict) -> dict[str, tuple[str, str | None]]:
    """Source key -> (the model's name for it after transformers' renames, the converter pattern that
    merges it, or None), exactly as convert_and_load_state_dict_in_model computes them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = model.base_model_prefix
    out = {}
    for k in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(k, renamings, converters, prefix, sd)
        if name not in sd and k in sd:
            name, pattern = rename_source_key(k, [], [], prefix, sd)
        out[k] = (name, pattern)
    model._weight_conversions = [t for t in transforms if t.was_used()]  # what save_pretrained reverts
    return out


def _drop_unplaced(model, loaded: dict, sd: dict, result: Placements, root) -> None:
    """Keys with no place in the model: dropped when transformers says it ignores them, an error
    otherwise (never a silent skip)."""
    ignore = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    stale = {n.rpartition(".")[2] for n, _ in model.named_buffers() if n not in sd}
    lost = []
    for k, (name, _) in loaded.items():
        if name in sd:
            continue
        if any(p.search(k) or p.search(name) for p in ignore):
            result.dropped[k] = IGNORED_ON_LOAD
        elif k.rpartition(".")[2] in stale:
            result.dropped[k] = STALE_BUFFER.format(k.rpartition(".")[2])
        else:
            lost.append(k)
    if lost:
        raise QuantizationError(
            f"{root}: {len(lost)} tensor(s) have no place in {type(model).__name__} as transformers builds it from config.json: "
            + ", ".join(lost[:4]) + (" ..." if len(lost) > 4 else ""),
            hint="check that config.json belongs to these weights; qconvert never drops a tensor silently",
        )


def _dtype_rule(model, ldt: torch.dtype, sd: dict):
    """(name, quantized?) -> (the dtype transformers loads it in, why), as convert_and_load_state_dict_in_model
    decides: the dtype plan first, then a quantized weight takes the load dtype, any other tensor the
    dtype the model declares for it when that differs from the load dtype."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(ldt)
    alt, groups, _ = build_glob_alternation(list(plan)) if plan else (None, {}, None)

    def rule(name: str, quantize: bool) -> tuple[torch.dtype, str]:
        m = alt.search(name) if alt is not None else None
        if m is not None:
            pattern = groups[m.lastgroup]
            which = "_keep_in_fp32_modules_strict" if pattern in (model._keep_in_fp32_modules_strict or ()) else "_keep_in_fp32_modules"
            return plan[pattern], f"kept in float32 by transformers ({which})"
        if quantize:  # quantized from the load dtype, whatever the model declares
            return ldt, "config.json dtype"
        own = sd[name].dtype
        if own != ldt:
            return own, f"the model declares this tensor as {str(own).removeprefix('torch.')}"
        return ldt, "config.json dtype"

    return rule


def _saved_names(model, loaded: dict, sd: dict, result: Placements, root, info: dict) -> None:
    """Give renamed tensors their saved names back, and check the output names against the names
    transformers' own save_pretrained revert gives (by shape too)."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings, revert_weight_conversion

    reverse = [t.reverse_transform() for t in model._weight_conversions[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    for k, p in list(result.places.items()):
        if loaded[k][1] is None:
            result.places[k] = Placement(apply_renamings(p.out_key, renamings), p.quantize, p.out_dtype, p.transpose, p.cast_reason,
                                         p.expert)
    ignore = set(model._keys_to_ignore_on_save or ())
    for k, p in list(result.places.items()):
        if p.out_key in ignore or loaded[k][0] in ignore:
            del result.places[k]
            result.dropped[k] = IGNORED_ON_SAVE
    names = {loaded[k][0]: sd[loaded[k][0]] for k in result.places}
    try:
        theirs = {n: tuple(t.shape) for n, t in revert_weight_conversion(model, names).items()}
    except Exception as e:  # a conversion that cannot run on meta tensors: we cannot check, so refuse
        raise QuantizationError(
            f"{root}: cannot work out the names transformers saves for {type(model).__name__} ({type(e).__name__}: {e})",
            hint="quantize this model with transformers + bitsandbytes",
        ) from None
    ours = {p.out_key: k for k, p in result.places.items()}
    if ours.keys() != theirs.keys():
        diff = sorted(ours.keys() ^ theirs.keys())
        raise QuantizationError(
            f"{root}: the plan's output names differ from what transformers saves for {type(model).__name__}: {', '.join(diff[:4])}",
            hint="this transformers version converts the checkpoint in a way qconvert does not follow; use transformers + bitsandbytes",
        )
    wrong = [k for out, k in ours.items() if theirs[out] != tuple(info[k][1])]
    if wrong:
        k = wrong[0]
        raise QuantizationError(
            f"{root}: tensor {k!r} has shape {list(info[k][1])}, the model built from config.json expects {list(theirs[result.places[k].out_key])}",
            hint="check that config.json belongs to these weights",
        )
