"""A LoRA adapter folded into its 4-bit base, one tensor at a time: what `qconvert merge` writes,
`qconvert export-gguf --adapter` converts and `qconvert compare --adapter-a` runs, computed here once.

Each adapted weight becomes W = float32(dequant(W4)) + scaling * B @ A, computed in float32 and then
cast. dequant(W4) is the weight's normative value (spec section 8): the float32 product code * scale
rounded to the weight's logical dtype (bfloat16 for most LLMs), here widened exactly to float32. That
is the weight the model computed with during training (bitsandbytes' dequantize_4bit returns it), so
a float32 merge reproduces the unmerged model to float32 rounding. Other quantized weights are
dequantized, and everything else is copied. A GPT-2 style Conv1D weight (stored [in, out] by the
16-bit model; its 4-bit tensor and its LoRA update are [out, in]) is given back as [in, out]. With
``quantize`` the merged weights are re-quantized to 4 bits instead, and the cost is measured.

:func:`prepare` reads the adapter and checks it against the base; :func:`output_tensors` gives base
tensor k's output tensors; :class:`Source` is a model's tensors as it computes with them (an adapter
merged on the fly). Writing a merged checkpoint is qconvert.export.merge's.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..format.conformance import check_checkpoint
from ..format.layout import LOGICAL_DTYPES as DTYPES
from ..io.checkpoint import Checkpoint
from ..io.source import resolve_model_path


class LoraAdapter:
    """A PEFT LoRA adapter folder: per-module A, B and scaling."""

    def __init__(self, folder: str | os.PathLike):
        from ..model.adapters import read_adapter_config, read_lora_weights
        from ..io.source import resolve_adapter_path

        self.folder = resolve_adapter_path(folder)[0]  # a folder, or a Hub id fetched as generate/eval/load_model fetch it
        cfg_path = self.folder / "adapter_config.json"
        self.config = cfg = read_adapter_config(self.folder)  # validated: see export/adapter.py
        # fan_in_fan_out (GPT-2 style Conv1D) only says how the 16-bit base stores a weight; lora_A is [r, in]
        # and lora_B [out, r] either way, and the base's layout is read from the model itself (_conv1d_weights)
        if cfg.get("use_dora"):
            raise FormatError(f"{cfg_path}: DoRA is not supported by qconvert merge", hint="merge it with PEFT itself")
        self.weights = self.folder / "adapter_model.safetensors"
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = read_lora_weights(self.folder, cfg)

    @property
    def base_model_id(self) -> str | None:
        """base_model_name_or_path when it is a Hub repo id (a local path must not reach a card)."""
        from ..io.hub import REPO_ID

        base = self.config.get("base_model_name_or_path")
        return base if isinstance(base, str) and REPO_ID.match(base) and not os.path.exists(base) else None

    def check_base(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Each module's lora_B @ lora_A has its base weight's [out, in] shape."""
        from ..model.adapters import check_against_base

        check_against_base(self.weights, self.modules, base_shapes)

    def _pattern(self, table: dict, module: str, default):
        from ..model.adapters import module_value

        return module_value(table, module, default)

    def scaling(self, module: str) -> float:
        r = self._pattern(self.config.get("rank_pattern"), module, self.config["r"])
        alpha = self._pattern(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.modules[module]
        return self.scaling(module) * (b.float() @ a.float())


def _base_shapes(ckpt: Checkpoint, targets: dict[str, str], conv1d: set[str]) -> dict[str, tuple[int, ...]]:
    """[out, in] of each adapted base weight (a 4-bit one's from its quant state; an unquantized
    Conv1D weight's is its shape reversed), by module name."""
    from ..model.checks import quant_shapes

    q = quant_shapes(ckpt)
    return {m: tuple(q[k]) if k in q else tuple(reversed(ckpt.info(k)[1])) if k in conv1d else ckpt.info(k)[1]
            for k, m in targets.items()}


def _conv1d_weights(root: Path, cfg: dict[str, Any]) -> set[str]:
    """The weights of the model's GPT-2 style Conv1D layers, stored [in, out] in a 16-bit checkpoint
    (their 4-bit tensors hold the transpose, [out, in]); read from the model built on the meta device."""
    from ..convert.meta import uses_conv1d

    if not uses_conv1d(cfg):  # cheap: no model built for the families without Conv1D
        return set()
    from transformers import AutoConfig

    from ..model.checks import build_meta, is_conv1d, model_class

    cls = model_class(cfg, f"{root}/config.json")
    model = build_meta(cls, AutoConfig.from_pretrained(root, trust_remote_code=False), f"{root}/config.json")
    return {f"{name}.weight" for name, m in model.named_modules() if is_conv1d(m)}



@dataclass
class _ParameterMerge:
    """LoRA on parameters (PEFT's ParamWrapper, e.g. on the 3-D experts transformers merges MoE checkpoints
    into), folded where the checkpoint stores the parameter: a tensor loaded as it is (``direct``: key ->
    parameter), or a group of tensors a transformers converter merges (``group_of``: key -> the group's
    first target). A group is merged as transformers merges it on load (float32), the updates added, and
    split back into its stored tensors by transformers' save-time revert, one group at a time."""

    model: Any  # the model on the meta device: converters and reverts run against it
    lm: Any  # qconvert.model.conversions.LoadMap of the checkpoint on that model
    loras: dict[str, Any]  # parameter name -> qconvert.model.adapters.ParameterLora
    direct: dict[str, str]
    group_of: dict[str, str]
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # first target -> reverted tensors not yet written



@dataclass
class Merge:
    """One merge's inputs and settings, shared by the steps of :func:`merge_adapter`."""

    ckpt: Checkpoint
    lora: LoraAdapter
    adapter: str
    orig: Checkpoint | None
    quantized: set[str]
    owned: set[str]
    targets: dict[str, str]  # adapted weight name -> module name
    conv1d: set[str]  # weights of GPT-2 style Conv1D layers: written [in, out] in a 16-bit checkpoint
    quantize: bool
    dtype: str
    orig_names: dict[str, str] = field(default_factory=dict)  # 4-bit weight -> its name in ``orig``
    params: _ParameterMerge | None = None  # LoRA on parameters (target_parameters), when the adapter has any
    costs: list[dict[str, float]] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def out_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def prepare(ckpt: Checkpoint, root: Path, adapter: str, base_original: str | None, quantize: bool, dtype: str,
             say: Callable[[str], None]) -> Merge:
    """The adapter read and checked against the base; which tensors are 4-bit, owned or adapted."""
    lora = LoraAdapter(adapter)
    orig = Checkpoint(base_original, streaming=True) if base_original else None
    if orig is not None:
        warnings.warn("--base-original: merging into the original weights, but the adapter was trained against the dequantized 4-bit weights")
        say("warning: merging into the original full-precision weights; the adapter was trained against the dequantized 4-bit weights")
    keys = ckpt.keys()
    quantized = set(check_checkpoint(ckpt))
    owned = {k for q in quantized for k in ckpt.companions(q)}
    params = _parameter_merge(root, ckpt, lora, owned, quantized) if lora.config.get("target_parameters") else None
    targets = {m + ".weight": m for m in lora.modules}
    if any(t not in ckpt for t in targets):  # the adapter names the model's modules; transformers may rename on load
        stored = _stored_names(root, ckpt, owned, quantized)
        targets = {stored.get(t, t): m for t, m in targets.items()}
    missing = sorted(t for t in targets if t not in keys)
    if missing:
        raise FormatError(f"{adapter}: adapts {missing[0]!r}, which {root} does not have", hint="is this adapter for this base?")
    conv1d = _conv1d_weights(root, ckpt.config() or {})
    lora.check_base(_base_shapes(ckpt, targets, conv1d))
    orig_names = _original_names(orig, base_original, quantized, ckpt.config() or {}, root) if orig is not None else {}
    return Merge(ckpt, lora, adapter, orig, quantized, owned, targets, conv1d, quantize, dtype, orig_names, params=params)


def _meta_model(root: Path):
    from transformers import AutoConfig

    from ..model.checks import build_meta, model_class, read_config

    where = str(root / "config.json")
    return build_meta(model_class(read_config(root), where), AutoConfig.from_pretrained(root, trust_remote_code=False), where)


def _parameter_merge(root: Path, ckpt: Checkpoint, lora: LoraAdapter, owned: set[str], quantized: set[str]) -> _ParameterMerge:
    """The adapter's LoRA on parameters (taken out of ``lora.modules``), each placed where ``ckpt``
    stores its parameter (see :class:`_ParameterMerge`)."""
    from ..model.adapters import parameter_adapters
    from ..model.conversions import load_map

    model = _meta_model(root)
    loras = parameter_adapters(lora.config, lora.modules, model, lora.weights)
    lm = load_map(model, [k for k in ckpt.keys() if k not in owned or k in quantized])
    stored = {name: k for k, name in lm.names.items()}
    direct, group_of = {}, {}
    for p in loras:
        if p in stored:
            direct[stored[p]] = p
            continue
        first = next((f for f, ts in lm.targets.items() if p in ts), None)
        if first is None:
            raise FormatError(f"{lora.weights}: adapts parameter {p!r}, which {root} does not store", hint="is this adapter for this base?")
        group_of.update({k: first for k, _ in lm.groups[first]})
    return _ParameterMerge(model, lm, loras, direct, group_of)


def _original_names(orig: Checkpoint, where: str, quantized: set[str], cfg: dict[str, Any], root: Path) -> dict[str, str]:
    """The original checkpoint's name for each 4-bit weight: the same name, or the name without the
    model's base_model_prefix, which transformers also accepts on load (the gpt2 checkpoint on the Hub
    holds ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn.weight``)."""
    have = set(orig.keys())
    names = {k: k for k in quantized if k in have}
    if len(names) == len(quantized):
        return names
    from ..model.checks import model_class

    prefix = getattr(model_class(cfg, f"{root}/config.json"), "base_model_prefix", "") + "."
    for k in sorted(quantized - names.keys()):
        short = k.removeprefix(prefix) if prefix != "." else k
        if short not in have:
            raise FormatError(f"{where}: has no tensor {k!r}" + (f" (nor {short!r})" if short != k else "") + f", a 4-bit weight of {root}",
                              hint="--base-original must be the original checkpoint that BASE was quantized from")
        names[k] = short
    return names


def _stored_names(root: Path, ckpt: Checkpoint, owned: set[str], quantized: set[str]) -> dict[str, str]:
    """The model's name -> the checkpoint's, for the tensors transformers renames on load (hy_v4's
    ``linear_gate`` is the model's ``gate_proj``): an adapter names the model's modules, the merged
    checkpoint keeps the stored names. Tensors a converter merges (MoE experts) have no single
    stored name and are left out."""
    from transformers import AutoConfig

    from ..model.conversions import load_map
    from ..model.checks import build_meta, model_class, read_config

    where = str(root / "config.json")
    model = build_meta(model_class(read_config(root), where), AutoConfig.from_pretrained(root, trust_remote_code=False), where)
    lm = load_map(model, [k for k in ckpt.keys() if k not in owned or k in quantized])
    return {name: k for k, name in lm.names.items() if name != k}


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` without its tensor of flags: min and max propagate NaN and are
    +-inf when any element is, so both are finite exactly when every element is. On a CPU core it is
    about 100x faster (isfinite took 1.9 of a 200M-parameter merge's 12 s)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))



@dataclass
class Inputs:
    """What base tensor ``k``'s outputs are computed from, read ahead (by the reader thread)."""

    qt: Any = None  # the 4-bit weight (QuantizedTensor), when ``k`` is one
    w: torch.Tensor | None = None  # the stored tensor, or the original's for a 4-bit weight under --base-original
    kept: dict[str, torch.Tensor] | None = None  # a 4-bit weight's stored entries, kept as they are (re-quantizing, not adapted)
    delta: torch.Tensor | None = None  # the LoRA update scaling * B @ A, when ``k`` is adapted (computed ahead too)


def read_inputs(job: Merge, k: str) -> Inputs | None:
    """The reads :func:`output_tensors` needs for ``k``, and its LoRA update (a matmul the reader thread
    does while the previous tensor is dequantized); None for LoRA on parameters (read as merged)."""
    if job.params is not None and (k in job.params.direct or k in job.params.group_of):
        return None
    ckpt = job.ckpt
    delta = job.lora.delta(job.targets[k]) if k in job.targets else None
    if k not in job.quantized:
        return Inputs(w=ckpt.get(k), delta=delta)
    qt = ckpt.quantized(k)
    if job.orig is not None:
        return Inputs(qt=qt, w=job.orig.get(job.orig_names[k]), delta=delta)
    if job.quantize and k not in job.targets:
        return Inputs(qt=qt, kept={c: qt.packed if c == k else ckpt.get(c) for c in ckpt.companions(k)})
    return Inputs(qt=qt, delta=delta)


def output_tensors(job: Merge, k: str, inputs: Inputs | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors for base tensor ``k``: merged, re-quantized, kept or cast, from ``inputs``
    (:func:`read_inputs`, read here when not given). A 4-bit weight and a LoRA update are [out, in]; a
    Conv1D weight (``job.conv1d``) is [in, out] in a 16-bit checkpoint (the original, the output, an
    unquantized base tensor), so it is transposed on the way in and out."""
    from ..ops import dequantize_4bit  # dispatched: on CPU the fast dequantizer, the reference's bits
    from ..ops.args import weight_args
    from ..quant.fast_cpu import quantize_4bit_fast

    is_4bit, conv1d = k in job.quantized, k in job.conv1d
    inputs = inputs or read_inputs(job, k)
    if inputs is None:  # LoRA on parameters
        w = _merged_parameter(job, k)
        yield k, w.to(job.out_dtype)
        return
    qt = inputs.qt  # re-quantizing keeps the base's quant type, block size and double quant
    if is_4bit:
        if job.orig is not None:
            w = inputs.w.float()
            w = w.T.contiguous() if conv1d else w  # the original holds a Conv1D weight as [in, out]
        else:  # the logical value widened (spec 8), not the float32 product before rounding
            w = dequantize_4bit(*weight_args(qt), torch.float32)
    else:
        w = inputs.w
    if k in job.targets:
        delta = inputs.delta
        if not all_finite(delta):
            raise FormatError(f"{job.adapter}: the LoRA update of {k!r} holds NaN or Inf",
                              hint="the adapter is damaged (a diverged training run?); nothing was written")
        w = w.float() + (delta.T if conv1d and not is_4bit else delta)
        if job.quantize and is_4bit:
            yield from _requantized_with_cost(job, k, w, delta, qt)
            return
    elif is_4bit and job.quantize and job.orig is None:  # not adapted: keep the stored 4-bit bytes as they are
        yield from inputs.kept.items()  # the codes as uint8, whatever quant_storage held them
        return
    if is_4bit and job.quantize:
        yield from quantize_4bit_fast(w.to(job.out_dtype), qt.quant_type, qt.blocksize, qt.double_quant, name=k).state_dict(k).items()
        return
    if is_4bit and conv1d:  # back to the Conv1D's [in, out]
        w = w.T.contiguous()
    yield k, (w.to(job.out_dtype) if w.is_floating_point() else w)


def _read_float32(job: Merge, k: str) -> torch.Tensor:
    """A stored tensor's value in float32: a 4-bit one's logical value (spec 8), widened."""
    from ..quant.reference import dequantize_4bit_ref

    return dequantize_4bit_ref(job.ckpt.quantized(k), torch.float32) if k in job.quantized else job.ckpt.get(k).float()


def _parameter_delta(job: Merge, name: str) -> torch.Tensor:
    pl = job.params.loras[name]
    delta = pl.delta(job.lora.scaling(name))
    if not all_finite(delta):
        raise FormatError(f"{job.adapter}: the LoRA update of {name!r} holds NaN or Inf",
                          hint="the adapter is damaged (a diverged training run?); nothing was written")
    return delta


def _merged_parameter(job: Merge, k: str) -> torch.Tensor:
    """Stored tensor ``k`` with the LoRA on the parameter it loads into folded in, float32 (a converted
    group is merged and reverted once, when its first tensor is written)."""
    from ..model.conversions import convert_group, revert_group

    pm = job.params
    if k in pm.direct:
        return _read_float32(job, k) + _parameter_delta(job, pm.direct[k])
    first = pm.group_of[k]
    if first not in pm.pending:
        merged = convert_group(pm.model, pm.lm, first, lambda key: _read_float32(job, key))
        merged = {n: (t.float() + _parameter_delta(job, n) if n in pm.loras else t.float()) for n, t in merged.items()}
        pm.pending[first] = revert_group(pm.model, pm.lm, merged)
    out = pm.pending[first].pop(k)
    if not pm.pending[first]:
        del pm.pending[first]
    return out


def _requantized_with_cost(job: Merge, k: str, merged: torch.Tensor, delta: torch.Tensor, qt) -> Iterator[tuple[str, torch.Tensor]]:
    """A merged weight re-quantized to 4 bits, with what that costs measured on a random probe."""
    from ..ops import dequantize_4bit
    from ..ops.args import weight_args
    from ..quant.fast_cpu import quantize_4bit_fast

    rq = quantize_4bit_fast(merged.to(job.out_dtype), qt.quant_type, qt.blocksize, qt.double_quant, name=k)
    back = dequantize_4bit(*weight_args(rq), torch.float32)
    probe = torch.randn(64, merged.shape[1], generator=job.generator)
    ref = probe @ merged.T
    job.costs.append({
        "output_error": ((probe @ back.T - ref).norm() / ref.norm()).item(),
        "adapter_change_lost": ((back - merged).norm() / delta.norm()).item() if delta.norm() > 0 else 0.0,
    })
    yield from rq.state_dict(k).items()



class Source:
    """A model's tensors by name, each in float32 as the model computes with it: a 4-bit weight's
    logical value, and with an adapter, merged exactly as `qconvert merge` merges."""

    def __init__(self, root: Path, ckpt: Checkpoint, cfg: dict[str, Any], job: Merge | None):
        self.root, self.ckpt, self.cfg, self.job = root, ckpt, cfg, job
        self.quantized = set(check_checkpoint(ckpt))
        self.owned = {k for q in self.quantized for k in ckpt.companions(q)}

    @classmethod
    def open(cls, model: str, adapter: str | None, say):
        """MODEL (a folder or Hub id) read as it streams, with ``adapter`` checked against it (float32)."""
        root, _ = resolve_model_path(model, None)
        ckpt = Checkpoint(root, streaming=True)
        cfg = ckpt.config() or {}
        _check_readable(root, cfg)
        job = prepare(ckpt, root, adapter, None, False, "float32", say) if adapter else None
        return cls(root, ckpt, cfg, job)

    def names(self) -> list[str]:
        """The model's tensors (a 4-bit weight once, by its weight name), in checkpoint order."""
        return [k for k in self.ckpt.keys() if k not in self.owned or k in self.quantized]

    def shape(self, k: str) -> tuple[int, ...]:
        if k in self.quantized:
            return tuple(self.ckpt.quantized(k).shape)
        return tuple(self.ckpt.info(k)[1])

    def get(self, k: str) -> torch.Tensor:
        """Tensor ``k`` in float32: merged exactly as `qconvert merge` merges when an adapter is given."""
        if self.job is not None:
            ((name, t),) = list(output_tensors(self.job, k))
            return t.float()
        if k in self.quantized:
            from ..ops import dequantize_4bit
            from ..ops.args import weight_args

            return dequantize_4bit(*weight_args(self.ckpt.quantized(k)), torch.float32)
        return self.ckpt.get(k).float()


def _check_readable(root: Path, cfg: dict) -> None:
    """Refuse a checkpoint quantized otherwise than 4-bit (an FP8 or MXFP4 release, GPTQ, 8-bit
    bitsandbytes...) by its quant_method: its stored tensors are not the model's values, and reading
    them as such fails later with a misleading line (gpt_oss's MXFP4 blocks have no GGUF name)."""
    from ..format.layout import is_4bit_config

    qc = cfg.get("quantization_config")
    if qc is None or is_4bit_config(qc):
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    raise FormatError(f"{root}: quantized with {method or 'an unknown method'!r} (config.json quantization_config); export-gguf and "
                      "compare read 16/32-bit folders and 4-bit ones (qconvert, transformers + bitsandbytes)",
                      hint=f"convert it first: `qconvert quantize {root} OUT` reads FP8 and MXFP4 releases; then use OUT")
