"""Which modules and parameters of the loaded 4-bit model `qconvert train` puts LoRA on, and how it says so.

The default is every linear layer that LoRA can wrap, the output head excepted: attention, dense MLPs,
shared experts, Mamba/linear-attention projections. Left out, each for a reason the start summary names:

- a Linear subclass with a forward of its own (llama4's router returns a tuple: PEFT's LoRA layer adds
  its update to the output and fails on it);
- a module PEFT refuses for the model type (the out_proj of Mamba mixers in falcon_h1, falcon_mamba...,
  found by asking PEFT's own check, so the list follows the installed PEFT);
- a layer whose weight its parent multiplies by directly on the 16-bit model (dt_proj in jamba's and
  falcon_mamba's mixers, read from the class's code): a LoRA there would work on qconvert's 4-bit model
  (config._is_quantized makes the mixer call the layer) but be skipped by PEFT on the 16-bit original;
- the routed experts, which transformers 5 stores as 3-D parameters, not Linear layers (qconvert's 4-bit
  experts: Experts4bitWeight stacks). ``--lora-experts`` adapts them the way PEFT does (``target_parameters``:
  one LoRA pair per parameter, rank r per expert; on 4-bit stacks through qconvert.nn.experts4bit_lora);
  PEFT cannot apply dropout there, so the run's LoRA dropout is then 0.

Targets are written as PEFT matches them: a layer's last name part (``q_proj``) when that part names
exactly the chosen modules, else full names. On model types whose adapters PEFT's transformers-5 MoE
conversion rewrites (qconvert.model.adapters.module_targets_kept), full names are used for the parts it would
move to the experts, and the adapter is attached with those names kept.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from ..errors import OptionError


@dataclass
class Targets:
    """What LoRA goes on: PEFT's ``target_modules`` and ``target_parameters``, and what was left out
    (name -> why)."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def wrappable(mod) -> bool:
    """A layer PEFT's LoRA Linear wraps correctly: torch's Linear itself or qconvert's 4-bit Linear,
    not a subclass with a forward of its own."""
    from ..nn.linear4bit import Linear4bit

    return isinstance(mod, Linear4bit) or (isinstance(mod, torch.nn.Linear) and type(mod).forward is torch.nn.Linear.forward)


def peft_refuses(model, leaf: str) -> bool:
    """Whether PEFT refuses LoRA on modules named ``leaf`` for this model type (its Mamba check)."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a PEFT without that check refuses nothing
        return False
    try:
        check(LoraConfig(target_modules=[leaf]), model, leaf)
    except ValueError:
        return True
    return False


def read_as_weight(model, name: str) -> bool:
    """Whether the module holding layer ``name`` multiplies by ``self.<layer>.weight`` in its own code
    instead of calling the layer: jamba's and falcon_mamba's mixers do so with dt_proj on a 16-bit model
    (they call it only when config._is_quantized is set), so PEFT on the 16-bit original would skip a
    LoRA there while the 4-bit model used it."""
    parent, _, leaf = name.rpartition(".")
    return _multiplies_by_weight(type(model.get_submodule(parent)), leaf)


@functools.lru_cache(maxsize=None)
def _multiplies_by_weight(cls: type, leaf: str) -> bool:
    """Whether ``cls``'s code has ``self.<leaf>.weight @`` (once per class and name: reading a class's
    source parses its whole file)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{re.escape(leaf)}\.weight\s*@", source) is not None


def linear_layers(model) -> tuple[list[str], dict[str, str]]:
    """(the linear layers LoRA goes on by default, {left-out layer: why})."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen, left_out = [], {}
    refused: dict[str, bool] = {}
    for name, mod in model.named_modules():
        if mod is head or not isinstance(mod, torch.nn.Linear):
            continue
        leaf = name.rpartition(".")[2]
        if not wrappable(mod):
            left_out[name] = f"a {type(mod).__name__}: a Linear with a forward of its own"
        elif refused.setdefault(leaf, peft_refuses(model, leaf)):
            left_out[name] = f"PEFT refuses LoRA on {leaf} in {model.config.model_type}"
        elif read_as_weight(model, name):
            left_out[name] = "the 16-bit model multiplies by its weight directly (PEFT's LoRA there would be skipped)"
        else:
            chosen.append(name)
    return chosen, left_out


def expert_parameters(model) -> list[str]:
    """The routed experts' weights that PEFT's target_parameters can adapt: the floating-point 3-D
    parameters held directly by a module that is not a convolution ([experts, out, in] or [experts,
    in, out]; transformers 5 stores fused MoE experts so)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.conv._ConvNd):
            continue
        out += [f"{name}.{p}" for p, t in mod.named_parameters(recurse=False) if t.dim() == 3 and t.is_floating_point()]
    return out


def _names(model, chosen: list[str], kind: str, converted: set[str] = frozenset()) -> list[str]:
    """``chosen`` as PEFT matches them: the last ``kind`` parts where those name exactly the chosen
    ones (and PEFT's MoE conversion leaves them alone), else the full names."""
    every = [n for n, _ in model.named_modules()] if kind == "module" else [n for n, _ in model.named_parameters()] + experts_in_4bit(model)
    tail = (lambda n: n.rpartition(".")[2]) if kind == "module" else (lambda n: ".".join(n.split(".")[-2:]))
    want = set(chosen)
    out = set()
    for short in sorted({tail(n) for n in chosen}):
        matched = {n for n in every if n == short or n.endswith("." + short)}
        if matched <= want and short not in converted:
            out.add(short)
        else:
            out.update(n for n in chosen if tail(n) == short)
    return sorted(out)


def choose(model, given: list[str] | None, experts: bool) -> Targets:
    """The run's LoRA targets: ``given`` module names (--target-modules) or the default linear layers,
    and with ``experts`` the routed experts' parameters."""
    from ..model.adapters import peft_moves_to_parameters

    chosen, left_out = linear_layers(model)
    if given:
        check_given(model, given)
        matched = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in given)]
        moved = peft_moves_to_parameters(model, given)
        modules = sorted({t for t in given if t not in moved} | {n for n in matched if any(n == t or n.endswith("." + t) for t in moved)})
        left_out = {}
    else:
        leaves = {n.rpartition(".")[2] for n in chosen}
        modules = _names(model, chosen, "module", peft_moves_to_parameters(model, leaves))
    params: list[str] = []
    found = expert_parameters(model) + experts_in_4bit(model)  # 16-bit 3-D parameters, 4-bit stacks (qconvert.nn.experts4bit_lora)
    if experts:
        if not found:
            raise OptionError("--lora-experts: this model has no routed-expert parameters LoRA can be put on",
                              hint="leave out --lora-experts (the experts of this model are not 3-D parameters)")
        params = _names(model, found, "parameter")
    elif found:
        left_out.update({n: "routed experts (--lora-experts adapts them)" for n in found})
    return Targets(modules, params, left_out)


def experts_in_4bit(model) -> list[str]:
    """The routed-expert stacks that load_model holds in 4 bits (qconvert.nn.experts4bit), by name."""
    from ..nn.experts4bit import Experts4bitWeight

    return [n for n, m in model.named_modules() if isinstance(m, Experts4bitWeight)]


def check_given(model, targets: list[str]) -> None:
    """Each --target-modules name must match a linear layer (PEFT's rule: the full name, or its last dotted parts)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for t in targets:
        matched = [n for n in linear if n == t or n.endswith("." + t)]
        if not matched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            shown = ", ".join(leaves[:20]) + (" ..." if len(leaves) > 20 else "")
            heads = [n for n, m in model.named_modules() if head is not None and m is head and (n == t or n.endswith("." + t))]
            what = "is the output head, which train does not adapt" if heads else "no linear layer of this model has that name"
            raise OptionError(f"--target-modules {t!r}: {what}", hint=f"available: {shown}")
        odd = next((n for n in matched if not wrappable(model.get_submodule(n))), None)
        if odd is not None:
            raise OptionError(f"--target-modules {t!r}: {odd} is a {type(model.get_submodule(odd)).__name__}, a Linear with a forward "
                              "of its own that LoRA cannot wrap", hint="leave it out of --target-modules")
        leaf = t.rpartition(".")[2]
        if peft_refuses(model, leaf):
            raise OptionError(f"--target-modules {t!r}: PEFT refuses LoRA on {leaf} in {model.config.model_type}",
                              hint="leave it out of --target-modules")


def _pattern(names) -> str:
    """Names grouped with their numbers as ``*``: ``model.layers.*.self_attn.q_proj (2)``."""
    groups: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(groups.items()))


def describe(peft_model, targets: Targets) -> str:
    """What carries LoRA, counted from the PEFT model itself, and what was left out and why."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    from ..nn.experts4bit import Experts4bitWeight

    layers, params, packed = [], [], 0
    for name, m in peft_model.named_modules():
        if isinstance(m, ParamWrapper):
            params.append(re.sub(r"^base_model\.model\.|(\.base_layer)+$", "", name) + "." + m.parameter_name)
            packed += isinstance(m.get_param(), Experts4bitWeight)
        elif isinstance(m, LoraLayer):
            layers.append(name.removeprefix("base_model.model."))
    text = f"{len(layers)} linear layers [{_pattern(layers)}]"
    if params:
        text += f" and {len(params)} expert parameters [{_pattern(params)}]"
        if packed:
            text += f" ({packed} of them 4-bit stacks: each routed expert's update is added as that expert is dequantized)"
    if targets.left_out:
        whys: dict[str, list[str]] = {}
        for n, why in targets.left_out.items():
            whys.setdefault(why, []).append(n)
        text += "; not adapted: " + "; ".join(f"{_pattern(ns)}: {why}" for why, ns in whys.items())
    return text
