"""Where each checkpoint tensor goes in the model transformers builds, as transformers loads it.

transformers renames and merges some checkpoints' tensors on load (``transformers/conversion_mapping.py``):
GPT-NeoX's ``embed_out`` becomes ``lm_head``, hy_v4's ``linear_gate`` becomes ``gate_proj``, and the
per-expert weights of MoE models (``experts.0.w1.weight``, ...) are stacked into 3-D parameters
(``experts.gate_up_proj``). A 4-bit checkpoint keeps the saved names (``save_pretrained`` reverts
the conversions), so a loader that maps names 1:1 finds no place for those tensors.

:func:`load_map` works out each tensor's place with transformers' own objects, in the order
``convert_and_load_state_dict_in_model`` applies them: every ``WeightRenaming`` in turn, then at most
one ``WeightConverter``, then the ``base_model_prefix`` rule, over the keys sorted by
``dot_natural_key``. Nothing here is a per-family table. A 4-bit weight is mapped like any weight
(its quant-state entries follow it); one that a converter would merge is refused by the callers,
since its packed bytes cannot be stacked. :func:`converted_sources` gives the checkpoint names and
shapes a converted parameter is made from, by transformers' own save-time revert on the meta model,
so that validation checks every source tensor before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoadMap:
    """Checkpoint keys against a model: ``names`` (key -> the model's name, for keys loaded one to
    one, renamed or not), ``groups`` (first target name -> [(key, source pattern)] in load order, for
    keys a converter merges), ``targets`` (first target name -> every parameter the group fills) and
    ``unplaced`` (keys the model has no name for)."""

    names: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)
    converters: dict[str, Any] = field(default_factory=dict)  # source pattern -> transformers' WeightConverter
    transforms: list = field(default_factory=list)  # the model's conversion mapping, as matched

    @property
    def group_of(self) -> dict[str, str]:
        """Converted key -> the first target name of its group."""
        return {k: t for t, members in self.groups.items() for k, _ in members}

    def placed_names(self) -> set[str]:
        """Every model name some checkpoint key fills."""
        return set(self.names.values()) | {t for ts in self.targets.values() for t in ts}


def conversion_mapping(model) -> list:
    """transformers' conversion mapping for ``model`` (fresh objects: they record what they matched)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)


def load_map(model, keys, state: dict | None = None) -> LoadMap:
    """Each of ``keys`` placed in ``model`` as ``convert_and_load_state_dict_in_model`` places it (see
    the module docstring). ``state``: the model's state dict (meta tensors), when the caller has it."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    sd = model.state_dict() if state is None else state
    transforms = conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    out = LoadMap(converters=by_pattern, transforms=transforms)
    for k in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(k, renamings, converters, prefix, sd)
        if name not in sd and k in sd:  # transformers' own fallback: the key as it is (prefix rule only)
            name, pattern = rename_source_key(k, [], [], prefix, sd)
        if name not in sd:
            out.unplaced.append(k)
        elif pattern is None:
            out.names[k] = name
        else:
            if name not in out.groups:
                first = by_pattern[pattern].target_patterns[0]
                out.targets[name] = [name.replace(first, t) for t in by_pattern[pattern].target_patterns]
            out.groups.setdefault(name, []).append((k, pattern))
    return out


def converted_sources(model, lm: LoadMap, state: dict) -> dict[str, torch.Tensor]:
    """Checkpoint name -> meta tensor (shape, dtype) of every source the converted parameters of
    ``lm`` are made from, by transformers' save-time revert of those parameters (what
    ``save_pretrained`` writes for them). Raises whatever transformers raises for a conversion it
    cannot run on meta tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    if not lm.groups:
        return {}
    previous = getattr(model, "_weight_conversions", None)
    model._weight_conversions = [t for t in lm.transforms if t.was_used()]
    try:
        wanted = {t: state[t] for ts in lm.targets.values() for t in ts if t in state}
        return dict(revert_weight_conversion(model, wanted))
    finally:
        model._weight_conversions = previous


def convert_group(model, lm: LoadMap, first: str, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of one converted group, merged from its checkpoint tensors exactly as transformers
    merges them: its own converter (a fresh copy), the tensors collected in load order and read
    lazily with ``read`` (each once), then the converter's operations in their order."""
    from copy import deepcopy

    members = lm.groups[first]
    converter = deepcopy(lm.converters[members[0][1]])
    for key, pattern in members:
        converter.add_tensor(first, key, pattern, lambda key=key: read(key))
    out = converter.convert(first, model=model, config=model.config)
    return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}


def revert_group(model, lm: LoadMap, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for converted parameters ``params`` (model name -> value, a whole
    group's), by transformers' save-time revert: what ``save_pretrained`` writes for them (the experts of
    a 3-D parameter split back into the stored per-expert tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    previous = getattr(model, "_weight_conversions", None)
    model._weight_conversions = [t for t in lm.transforms if t.was_used()]
    try:
        return dict(revert_weight_conversion(model, params))
    finally:
        model._weight_conversions = previous


def is_experts_module(module) -> bool:
    """Whether ``module`` is one of transformers 5's fused routed-experts modules: a class wrapped by
    ``use_experts_implementation`` (it sets ``_apply_gate`` and wraps ``forward``), holding
    ``num_experts`` 3-D parameters. Their eager forward indexes each parameter by expert
    (``self.gate_up_proj[expert_idx]``), which is what lets a 4-bit holder dequantize only the
    experts the router picks (qconvert.nn.experts4bit)."""
    cls = type(module)
    return (hasattr(cls, "_apply_gate") and hasattr(cls.forward, "__wrapped__")
            and isinstance(getattr(module, "num_experts", None), int))


def routed_expert_params(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every routed-expert parameter of ``model``: a floating 3-D parameter
    [num_experts, out, in] of an experts module (:func:`is_experts_module`). These are what
    ``quantize --experts 4bit`` writes in 4 bits (spec/format.md section 14)."""
    out = {}
    for mod_name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for attr, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point() and p.shape[0] == module.num_experts:
                out[f"{mod_name}.{attr}" if mod_name else attr] = tuple(p.shape)
    return out
