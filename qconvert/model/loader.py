"""`qconvert.load_model`: a 4-bit checkpoint onto qconvert's own 4-bit modules.

The model is built from config.json with its parameters on the meta device (no full-precision
weights are ever allocated); each nn.Linear whose weight is stored in 4 bits becomes a
:class:`qconvert.nn.linear4bit.Linear4bit` holding the packed tensors, placed directly on the target device;
every other tensor is loaded as stored. Each tensor goes where transformers loads it, by transformers'
own conversion mapping (qconvert.model.conversions): renamed ones (GPT-NeoX's ``embed_out``, a 4-bit weight
of a renamed module) to their new place, and the groups a converter merges (MoE experts stacked into
3-D parameters) merged by that converter's operations, one group at a time (a merged parameter is a
new tensor, not a view of the file). 4-bit routed MoE experts (spec section 14) go into
:class:`qconvert.nn.experts4bit.Experts4bitWeight` holders in place of the experts' 3-D parameters,
which dequantize one routed expert at a time in the forward. Host memory while loading stays near one tensor beyond the
quantized checkpoint itself. On CPU the tensors stay zero-copy views of the memory-mapped safetensors
file (safetensors maps it copy-on-write), so most of that memory is file-backed page cache; on CUDA
each tensor is copied to the device and its host pages are released with the short-lived handle.
Measured (2-core EPYC, 2026-11-22): a 355 MB checkpoint of a 438M-parameter Llama, warm page cache,
peaked at 567 MB RSS, of which 239 MB is the interpreter with torch/transformers imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import FormatError, OptionError
from ..io.checkpoint import Checkpoint
from ..format.conformance import check_checkpoint
from ..format.layout import LOGICAL_DTYPES as DTYPES, is_4bit_config
from ..io.source import resolve_adapter_path, resolve_model_path


def _set_tensor(model, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise FormatError(f"checkpoint tensor {name!r} has no place in the model ({type(model).__name__})")


def _as_dtype(d: torch.dtype | str) -> torch.dtype:
    """One of the float dtypes the layers compute in, given by name or as a torch.dtype (a torch.int8
    or torch.complex64 was taken as it was: ignored by the 4-bit layers, or failing mid-forward)."""
    name = str(d).removeprefix("torch.")
    if name not in DTYPES:
        raise OptionError(f"unknown dtype {d!r}", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _as_device(given: str | torch.device | None) -> torch.device:
    """The device to load onto, refused before any file is read when it cannot hold the model:
    not a device name, the meta device (no data), or a CUDA device this machine does not have."""
    if given is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(given)
    except (RuntimeError, TypeError):
        raise OptionError(f"unknown device {given!r}", hint="use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "meta":
        raise OptionError(f"device {given!r} holds no data: a model cannot be loaded onto it", hint="use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and (dev.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise OptionError(f"device {given!r} is not on this machine ({n} CUDA device(s))", hint="use 'cpu', or a CUDA device it has")
    return dev


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """A stored unquantized tensor on ``device``, floating ones cast to ``dtype`` when one is given."""
    return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)


def load_model(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    adapter: str | os.PathLike | None = None,
):
    """Load a qconvert (or transformers + bitsandbytes) 4-bit checkpoint; see the module docstring.

    ``backend``: "auto", "reference", "triton" or "bitsandbytes" (also QCONVERT_BACKEND).
    ``dtype`` (as transformers' ``dtype=``): None or "auto" keeps every unquantized tensor
    (embeddings, norms, biases, output head) in its stored dtype; a dtype casts them all to it.
    ``compute_dtype``: the dtype of the 4-bit layers' matmuls; defaults to ``dtype`` when that is
    given, else to the checkpoint's ``bnb_4bit_compute_dtype``. The 4-bit weights are always their
    logical values (spec section 8), converted to ``compute_dtype``. So
    ``load_model(path, dtype=torch.float32)`` is an all-float32 model.
    ``adapter``: a PEFT LoRA folder, or its Hub id, to attach (returns a PeftModel).
    """
    from transformers import AutoConfig

    from ..ops.choice import resolve

    for given in (dtype, compute_dtype):  # option values first, before any file is read or downloaded
        if given not in (None, "auto"):
            _as_dtype(given)
    device = _as_device(device)
    adapter_dir = None if adapter is None else resolve_adapter_path(adapter)[0]  # a folder or a Hub id, before the model loads
    root, repo_id = resolve_model_path(path_or_repo_id, revision)
    from .checks import check_model_folder

    check_model_folder(root)  # config.json and every tensor header against the model it builds
    be = resolve(backend, device)
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not is_4bit_config(qc):
        raise FormatError(
            f"{root}: not a 4-bit checkpoint (config.json has no bitsandbytes 4-bit quantization_config)",
            hint=f"run `qconvert quantize {path_or_repo_id} OUT` first and load OUT",
        )
    dt = None if dtype in (None, "auto") else _as_dtype(dtype)
    cd = _as_dtype(compute_dtype or dt or qc.get("bnb_4bit_compute_dtype") or "float32")
    model = _skeleton(root, config, qc)
    ckpt = Checkpoint(root, streaming=True)
    quantized = check_checkpoint(ckpt)  # the reader rules of spec section 9 beyond single weights
    lm = _load_map(model, ckpt, quantized)
    with ckpt.held_open():  # hundreds of per-expert 4-bit weights: one header parse per file
        placed = _place_experts(model, ckpt, root, device, be, cd, quantized, lm)
    quantized = [n for n in quantized if n not in placed]
    placed |= _place_4bit(model, ckpt, root, device, dt, be, cd, quantized, lm)
    _place_others(model, ckpt, placed, device, dt, lm)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FormatError(f"{root}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    model.to(device)
    if dt is not None:  # the config says what the unquantized tensors now are (transformers' from_pretrained(dtype=) sets it too)
        model.config.dtype = dt
    model.is_loaded_in_4bit = True
    _mark_quantized(model)
    _fold_head_input(model)
    model.qconvert_backend = be
    model.config.name_or_path = repo_id or str(root)
    model.eval()
    if adapter is not None:
        from .adapters import attach_peft, check_adapter_for_model, module_targets_kept, peft_notices_hidden

        check_adapter_for_model(adapter_dir, model)  # PEFT's own errors for a damaged adapter are tracebacks

        from ..nn.experts4bit_lora import peft_sees_4bit_experts

        with peft_notices_hidden(model), module_targets_kept(), peft_sees_4bit_experts(model):
            model = attach_peft(model, adapter_dir)  # PEFT's refusals as FormatError; config and weights must agree
    return model


def _canonical_input(module, args):
    """A forward pre-hook: a 3-D or wider input whose leading strides are not the canonical ones,
    cloned into canonical strides (the same values); any other input passed as it is."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 3:
        return None
    x = args[0]
    if all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 2)):
        return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


def _fold_head_input(model) -> None:
    """The output head (a 16-bit nn.Linear) gets :func:`_canonical_input` as a pre-hook. torch.matmul
    runs a 3-D input against a frozen 2-D weight as one product only where the input's leading
    strides are the canonical ones; otherwise it broadcasts the weight to 3-D and copies it. During
    ``generate`` transformers passes the head the prompt's last position, ``hidden_states[:, -1:, :]``,
    whose leading stride is the prompt's: with qconvert's frozen head that copied the whole head
    once per generate call (108 ms of a 32000x1024 bfloat16 head's 117 ms, 2-core EPYC, 2026-12-07),
    where transformers' own model, whose head requires grad, takes torch's other branch and does not.
    Cloning the one-position input costs a few kilobytes."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        head.register_forward_pre_hook(_canonical_input)


def _mark_quantized(model) -> None:
    """``config._is_quantized``, as transformers' quantizers set it after loading: Jamba's and FalconMamba's
    mixers then call ``dt_proj(x)`` instead of multiplying by ``dt_proj.weight`` (here the packed 4-bit
    bytes, and a LoRA on dt_proj would be bypassed)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.config._is_quantized = True


def _skeleton(root: Path, config, qc: dict):
    """The model built from ``config`` with its parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise FormatError(f"{root}/config.json: architecture {arch!r} is not in transformers")
    # the skeleton must not try to quantize itself: hide quantization_config while building it
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    config.quantization_config = qc
    return model


def _load_map(model, ckpt: Checkpoint, quantized: list[str]):
    """Where transformers loads each checkpoint tensor (qconvert.model.conversions): the 4-bit weights and
    every other tensor, the quant-state entries left out (they follow their weight)."""
    from .conversions import load_map
    from .checks import owned_keys

    owned = owned_keys(ckpt.keys(), quantized)
    q = set(quantized)
    return load_map(model, [k for k in ckpt.keys() if k not in owned or k in q])


def _place_4bit(model, ckpt: Checkpoint, root: Path, device: torch.device, dt, be, cd, quantized: list[str], lm) -> set[str]:
    """Each 4-bit weight's nn.Linear or GPT-2 style Conv1D (at the place transformers loads the weight:
    ``lm``) replaced by a Linear4bit holding it (and its bias); returns the checkpoint tensors used."""
    from ..nn.linear4bit import Linear4bit
    from .checks import is_conv1d, linear_shape

    placed: set[str] = set()
    group_of = lm.group_of
    for name in quantized:
        if name in group_of or name not in lm.names:  # check_model_folder refuses both first
            raise FormatError(f"{root}: 4-bit tensor {name!r} has no place qconvert.load_model can fill",
                              hint="load this model with transformers + bitsandbytes: AutoModelForCausalLM.from_pretrained(path)")
        comp = ckpt.companions(name)
        qt = ckpt.quantized(name, device)
        stored_mod = name.removesuffix(".weight")
        mod_name = lm.names[name].removesuffix(".weight")  # renamed on load by transformers, or the same
        old = model.get_submodule(mod_name)
        # a GPT-2 style Conv1D holds its weight as [in, out]: the stored 4-bit tensor is its transpose,
        # [out, in], so the Linear4bit that takes its place computes x @ W.T + b, what the Conv1D computed
        shape = linear_shape(old)
        if shape is None or tuple(qt.shape) != shape:
            want = "not a Linear or Conv1D" if shape is None else f"[out, in] {list(shape)}"
            raise FormatError(f"{root}: 4-bit tensor {name!r} (quant-state shape {list(qt.shape)}) does not fit module {mod_name!r} "
                              f"({type(old).__name__}, {want})", hint="config.json does not describe these weights; quantize the source again")
        bias_key = f"{stored_mod}.bias"
        if bias_key in ckpt and lm.names.get(bias_key) != f"{mod_name}.bias":
            raise FormatError(f"{root}: the bias {bias_key!r} of 4-bit tensor {name!r} loads elsewhere than its weight",
                              hint="load this model with transformers + bitsandbytes: AutoModelForCausalLM.from_pretrained(path)")
        bias = _cast(ckpt.get(bias_key), device, dt) if bias_key in ckpt else None
        parent_name, _, child = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit(qt, bias, be, cd, from_conv1d=is_conv1d(old)))
        placed.update(comp)
        if bias is not None:
            placed.add(bias_key)
    return placed


def _place_experts(model, ckpt: Checkpoint, root: Path, device: torch.device, be, cd, quantized: list[str], lm) -> set[str]:
    """The 4-bit routed experts (spec section 14), each stack in an Experts4bitWeight in place of its
    experts module's 3-D parameter: a fused 4-bit stack loaded 1:1, or the per-expert 4-bit weights of
    a group that transformers' converter merges, stacked as that converter stacks them
    (:func:`expert_parts`); returns the checkpoint tensors used."""
    from .conversions import converted_sources, routed_expert_params
    from ..nn.experts4bit import Experts4bitWeight, quantize_experts_module

    experts = routed_expert_params(model)
    q = set(quantized)
    sources = converted_sources(model, lm, model.state_dict()) if any(k in q for k in lm.group_of) else {}
    stacks: dict[str, Experts4bitWeight] = {}
    used: set[str] = set()
    for name in quantized:
        if lm.names.get(name) in experts:
            stacks[lm.names[name]] = Experts4bitWeight.from_fused(ckpt.quantized(name, device), be, cd)
            used.add(name)
    for first, members in lm.groups.items():
        keys = [k for k, _ in members]
        if not any(k in q for k in keys):
            continue
        if not all(k in q for k in keys) or not all(t in experts for t in lm.targets[first]):
            raise FormatError(f"{root}: 4-bit tensors {keys[:2]} are merged by transformers into {lm.targets[first]}, "
                              "which are not all 4-bit routed experts", hint="quantize the source again with qconvert")
        rows = {k: sources[k].shape[0] for k in keys}
        for target, parts in expert_parts(model, lm, first, rows, root).items():
            stacks[target] = Experts4bitWeight.from_parts([[ckpt.quantized(k, device) for k in ks] for ks in parts], be, cd)
        used.update(keys)
    by_module: dict[str, dict] = {}
    for target, w in stacks.items():
        if tuple(w.shape) != experts[target]:
            raise FormatError(f"{root}: the 4-bit experts for {target!r} make {list(w.shape)}, the model needs {list(experts[target])}",
                              hint="config.json and the weights disagree; quantize the source again")
        mod, _, attr = target.rpartition(".")
        by_module.setdefault(mod, {})[attr] = w
    for mod, weights in by_module.items():
        quantize_experts_module(model.get_submodule(mod), weights)
    return {c for n in used for c in ckpt.companions(n)}


def expert_parts(model, lm, first: str, rows: dict[str, int], root: Path) -> dict[str, list[list[str]]]:
    """For each parameter the converted group ``first`` fills: per expert, the checkpoint keys whose
    whole matrices make its rows, in order (``rows``: each key's row count). Worked out by running
    transformers' own converter on probes (key k becomes the column k * 2**32 + row), so nothing here
    restates a family's merge; a converter that does anything but stack whole matrices by rows is
    refused."""
    from .conversions import convert_group

    members = [k for k, _ in lm.groups[first]]

    def probe(k: str) -> torch.Tensor:
        return (members.index(k) * 2.0**32 + torch.arange(rows[k], dtype=torch.float64)).reshape(-1, 1)

    out: dict[str, list[list[str]]] = {}
    for target, merged in convert_group(model, lm, first, probe).items():
        columns = merged.reshape(merged.shape[0], -1).tolist() if merged.dim() == 3 and merged.shape[-1] == 1 else [None]
        out[target] = [_whole_matrices(column, members, rows) for column in columns]
        if any(keys is None for keys in out[target]):
            raise FormatError(f"{root}: transformers merges {members[:2]} into {target!r} in a way qconvert cannot do on 4-bit "
                              "experts", hint="quantize this model with --experts 16bit")
    return out


def _whole_matrices(column: list[float] | None, members: list[str], rows: dict[str, int]) -> list[str] | None:
    """The keys whose probes fill ``column`` one whole matrix after another, rows in order; None if
    the column is anything else (a split, a transpose, an interleave)."""
    keys: list[str] = []
    at = 0
    while column is not None and at < len(column):
        i = int(column[at] // 2.0**32)
        if i >= len(members):
            return None
        k = members[i]
        if [v - i * 2.0**32 for v in column[at:at + rows[k]]] != [float(r) for r in range(rows[k])]:
            return None
        keys.append(k)
        at += rows[k]
    return keys if column is not None else None


def _place_others(model, ckpt: Checkpoint, placed: set[str], device: torch.device, dt, lm) -> None:
    """Every other stored tensor the model has a place for, as stored (cast to ``dt`` when given), at
    the place transformers loads it (``lm``); the groups a transformers converter merges (MoE
    experts) merged by that converter, one group at a time, each tensor read once."""
    from .conversions import convert_group

    state = model.state_dict()
    for k in ckpt.keys():
        if k in placed or k not in lm.names:
            continue  # groups below; a key with no place is one check_model_folder allowed (a computed buffer)
        _set_tensor(model, lm.names[k], _cast(ckpt.get(k), device, dt))
    for first in lm.groups:
        if all(k in placed for k, _ in lm.groups[first]):
            continue  # 4-bit experts, placed by _place_experts
        merged = convert_group(model, lm, first, lambda k: _cast(ckpt.get(k), device, dt))
        for name, value in merged.items():
            want = state.get(name)
            if want is None or tuple(value.shape) != tuple(want.shape):
                raise FormatError(
                    f"{ckpt.root}: transformers' conversion of {[k for k, _ in lm.groups[first]][:2]} gives {name!r} of shape "
                    f"{list(value.shape)}, the model needs {None if want is None else list(want.shape)}",
                    hint="config.json and the weights disagree; re-download the model, or quantize its source again",
                )
            _set_tensor(model, name, value)
