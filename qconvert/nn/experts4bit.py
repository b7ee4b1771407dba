"""Routed MoE experts held in 4 bits, dequantized one routed expert at a time (spec section 14).

transformers 5 keeps a MoE layer's routed experts as 3-D parameters of an experts module
(``Qwen3MoeExperts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) whose eager forward loops
over the experts the router picked and reads ``self.gate_up_proj[expert_idx]``. :class:`Experts4bitWeight`
takes such a parameter's place and answers ``weight[e]`` with expert e's matrix, dequantized from its
4-bit codes on the spot, so a forward never dequantizes more than the one expert it is computing:
the family's own eager forward runs unchanged (:func:`quantize_experts_module` binds it, bypassing
the grouped-matmul implementations, which read the whole stack).

A stack comes from one of two stored forms:

- a fused 4-bit [E, out, in] tensor (:meth:`Experts4bitWeight.from_fused`): one weight in the 2-D
  rule over its expert-major flattening, each expert's out * in elements a whole number of blocks,
  so expert e's codes and block scales are one contiguous slice; the double quantization (nested
  scales and offset) is the tensor's, shared by its experts;
- one 2-D 4-bit weight per expert and part (:meth:`Experts4bitWeight.from_parts`), as a checkpoint
  with per-expert tensors stores them (Mixtral's ``w1``/``w3`` of expert e are the gate and up rows
  of ``gate_up_proj[e]``); each part keeps its own double quantization.

Either way expert e's value is bit for bit the spec's dequantization of its codes (section 8): the
block scales are decoded as section 3.5 decodes them (each step rounded to float32), then the
backend's own dequantization of a plain (float32-scaled) 4-bit weight rounds the products to the
logical dtype, exactly as for the whole tensor. The value is then converted to the compute dtype.

Under autograd (LoRA training needs the gradient to flow through the experts to the layers below), a
linear layer saves its weight for backward: the module's forward keeps, through
``torch.autograd.graph.saved_tensors_hooks``, only (stack, expert) in its place and dequantizes that
expert again in backward, as Linear4bit does; otherwise every expert used in a step, in every layer,
would stay dequantized until backward. On the CPU kernels, the module's forward and backward's
recomputation dequantize each expert into one reused buffer per parameter name (:func:`_scratch`):
the families' eager forwards read ``weight[e]`` for one product at once, and a saved value that is
not recognised is copied out of the buffer.

LoRA on a stack (``train --lora-experts``, PEFT's target_parameters) sets :attr:`Experts4bitWeight.delta`
while its wrapper's forward runs (qconvert.nn.experts4bit_lora): ``weight[e]`` is then expert e's
dequantized matrix plus that expert's own LoRA update, and the saved-tensor hook rebuilds both.
"""

from __future__ import annotations

import threading
import types
import weakref

import torch
from torch import nn

from .. import ops
from ..errors import FormatError
from ..names import NESTED_BLOCKSIZE
from ..format.layout import QuantizedTensor, dtype_name


class Experts4bitWeight(nn.Module):
    """One routed-experts parameter [E, out, in] in 4 bits; ``self[e]`` is expert e's [out, in] value
    in ``compute_dtype``. Per part p (rows stacked in order): codes [E, c], absmax [E, nb] (uint8
    with double quantization, else float32), nested_absmax [E or 1, nnb] and nested_offset [E or 1]."""

    def __init__(self, parts: list[dict], shared_nested: bool, meta: QuantizedTensor, backend, compute_dtype: torch.dtype):
        super().__init__()
        self.num_experts = parts[0]["codes"].shape[0]
        self.part_shapes = [p["shape"] for p in parts]
        self.shape = torch.Size((self.num_experts, sum(s[0] for s in self.part_shapes), self.part_shapes[0][1]))
        self.shared_nested = shared_nested  # a fused stack: nested blocks run over all experts' scales
        self.quant_type, self.blocksize, self.weight_dtype = meta.quant_type, meta.blocksize, meta.dtype
        self.backend, self.compute_dtype = backend, compute_dtype
        self._made: dict | None = None  # set by the experts module's forward while autograd records
        self._name = None  # its parameter name in the experts module (quantize_experts_module)
        self._slot = None  # while the module's forward (or backward's recomputation) runs: _name, the reused buffer's
        self.delta = None  # set by a LoRA wrapper while its forward runs (qconvert.nn.experts4bit_lora)
        # copies: a tensor read from a shard keeps that shard's whole memory map, and the pages the
        # stacking read, resident (one layer's expert codes a second time in RSS, measured)
        self.register_buffer("quant_map", meta.quant_map.clone())
        self.register_buffer("nested_quant_map", None if meta.nested_quant_map is None else meta.nested_quant_map.clone())
        for i, p in enumerate(parts):
            self.register_buffer(f"codes{i}", p["codes"])
            self.register_buffer(f"absmax{i}", p["absmax"])
            self.register_buffer(f"nested_absmax{i}", p.get("nested_absmax"))
            self.register_buffer(f"nested_offset{i}", p.get("nested_offset"))

    @classmethod
    def from_fused(cls, qt: QuantizedTensor, backend, compute_dtype: torch.dtype) -> "Experts4bitWeight":
        """A fused [E, out, in] 4-bit tensor (spec 14.2: each expert a whole number of blocks)."""
        e, o, i = qt.shape
        if (o * i) % qt.blocksize:
            raise FormatError(f"a fused 4-bit experts stack {list(qt.shape)}: an expert's {o} x {i} elements are not a whole "
                              f"number of {qt.blocksize}-element blocks (spec section 14.2)", hint="quantize the source again with qconvert")
        part = {"shape": (o, i), "codes": qt.packed.reshape(e, o * i // 2), "absmax": qt.absmax.reshape(e, -1)}
        if qt.double_quant:
            part["nested_absmax"] = qt.nested_absmax.reshape(1, -1)
            part["nested_offset"] = torch.tensor([qt.nested_offset], dtype=torch.float32, device=qt.absmax.device)
        return cls([part], True, qt, backend, compute_dtype)

    @classmethod
    def from_parts(cls, experts: list[list[QuantizedTensor]], backend, compute_dtype: torch.dtype) -> "Experts4bitWeight":
        """Expert e's rows are the 2-D 4-bit weights ``experts[e]`` stacked in order (same shapes,
        quant type, block size and double quantization for every expert)."""
        first = experts[0][0]
        if len({len(ex) for ex in experts}) > 1:
            raise FormatError("the experts of one parameter are made of different numbers of 4-bit tensors",
                              hint="quantize the source again with qconvert")
        parts = []
        for p in range(len(experts[0])):
            qts = [ex[p] for ex in experts]
            if len({_kind(q) for q in qts} | {_kind(first)}) > 1 or len({tuple(q.shape) for q in qts}) > 1:
                raise FormatError(f"the 4-bit experts of one parameter {[list(q.shape) for q in qts[:2]]} differ in quant type, block "
                                  "size, dtype, double quantization or shape; the spec stores every expert alike (section 14.3)",
                                  hint="quantize the source again with qconvert")
            part = {"shape": tuple(qts[0].shape), "codes": torch.stack([q.packed.reshape(-1) for q in qts]),
                    "absmax": torch.stack([q.absmax for q in qts])}
            if first.double_quant:
                part["nested_absmax"] = torch.stack([q.nested_absmax for q in qts])
                part["nested_offset"] = torch.tensor([q.nested_offset for q in qts], dtype=torch.float32, device=first.absmax.device)
            parts.append(part)
        return cls(parts, False, first, backend, compute_dtype)

    def _scales(self, p: int, e: int) -> torch.Tensor:
        """The float32 block scales of expert e's part p (spec section 3.5 for double quantization)."""
        absmax = getattr(self, f"absmax{p}")[e]
        nested = getattr(self, f"nested_absmax{p}")
        if nested is None:
            return absmax
        first = e * absmax.numel() if self.shared_nested else 0
        row = 0 if self.shared_nested else e
        idx = (torch.arange(absmax.numel(), device=absmax.device) + first) // NESTED_BLOCKSIZE
        scales = self.nested_quant_map[absmax.long()] * nested[row][idx]
        return scales + getattr(self, f"nested_offset{p}")[row]

    def expert(self, e: int, dtype: torch.dtype | None = None, delta=None) -> torch.Tensor:
        """Expert e's [out, in] matrix: its codes alone dequantized (spec section 8), in ``dtype``;
        with ``delta`` (a LoRA on this stack, qconvert.nn.experts4bit_lora), ``delta(e, value)``."""
        dtype = dtype or self.compute_dtype
        buf = _scratch(self._slot, self.shape[1:].numel(), dtype) if self._slot is not None else None
        values, row = [], 0
        for p, shape in enumerate(self.part_shapes):
            qt = QuantizedTensor(packed=getattr(self, f"codes{p}")[e].reshape(-1, 1), absmax=self._scales(p, e), shape=shape,
                                 dtype=self.weight_dtype, quant_type=self.quant_type, blocksize=self.blocksize, quant_map=self.quant_map)
            into = None if buf is None else ops.dequantize_into(qt, buf[row * shape[1]:(row + shape[0]) * shape[1]], self.backend)
            values.append(ops.dequantize(qt, dtype, self.backend) if into is None else into)
            row += shape[0]
        value = values[0] if len(values) == 1 else buf.view(self.shape[1:]) if all(_on(v, buf) for v in values) else torch.cat(values)
        if delta is not None:
            value = delta(e, value)
        if self._made is not None:  # a forward under autograd: let the saved-tensor hook recognise it
            self._made[value.data_ptr()] = (weakref.ref(value), self, e, dtype, delta)
        return value

    def __getitem__(self, e) -> torch.Tensor:
        return self.expert(int(e), delta=self.delta)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.quant_map.device

    def extra_repr(self) -> str:
        return (f"shape={list(self.shape)}, {self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_quant_map is not None}, compute_dtype={dtype_name(self.compute_dtype)}")


def _kind(qt: QuantizedTensor) -> tuple:
    return qt.quant_type, qt.blocksize, qt.dtype, qt.double_quant


def quantize_experts_module(module: nn.Module, weights: dict[str, Experts4bitWeight]) -> None:
    """Put each of ``weights`` (parameter name -> 4-bit stack) in place of that parameter of the
    experts ``module``, and make the module run its family's eager forward (which reads one expert at
    a time) in the weights' compute dtype, its output cast back to the input's dtype."""
    for attr in [a for a in module._parameters if a in weights]:  # in the class's order, which PEFT's nesting follows
        del module._parameters[attr]
        module.add_module(attr, weights[attr])
        weights[attr]._name = attr
    eager = type(module).forward.__wrapped__  # transformers' use_experts_implementation wraps it
    compute = next(iter(weights.values())).compute_dtype

    def forward(self, hidden_states, *args, **kwargs):
        def to(a):
            return a.to(compute) if torch.is_tensor(a) and a.is_floating_point() else a

        call = (self, hidden_states.to(compute), *map(to, args))
        kw = {k: to(v) for k, v in kwargs.items()}
        made: dict | None = {} if torch.is_grad_enabled() else None
        for name, w in weights.items():
            w._made, w._slot = made, name
        try:
            if made is None:
                return eager(*call, **kw).to(hidden_states.dtype)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: _pack(made, t), _unpack):
                out = eager(*call, **kw)
        finally:
            for w in weights.values():
                w._made = w._slot = None
        return out.to(hidden_states.dtype)

    module.forward = types.MethodType(forward, module)


#: Per thread, the buffer each experts parameter name dequantizes its expert into during the experts
#: module's forward (qconvert/ops/cpu kernels only): a fresh multi-megabyte tensor per routed expert,
#: freed while autograd keeps the small activations allocated around it, fragmented glibc's heap so
#: much that a Qwen3-30B-A3B-shaped layer's training step held ~0.8 GB more than it used (measured).
#: One buffer per name (gate_up_proj, down_proj, ...), shared by every layer, since layers run in turn.
_SCRATCH = threading.local()


def _scratch(slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of ``dtype`` in this thread's buffer ``slot`` (overwritten by its next use)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    need = -(-n * dtype.itemsize // 8) * 8
    if slot not in bufs or bufs[slot].numel() < need:
        bufs[slot] = torch.empty(need, dtype=torch.uint8)
    return bufs[slot][:need].view(dtype)[:n]


def _on(t: torch.Tensor, buf: torch.Tensor | None) -> bool:
    return buf is not None and t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _in_scratch(t: torch.Tensor) -> bool:
    return any(_on(t, b) for b in getattr(_SCRATCH, "bufs", {}).values())


def _pack(made: dict, t: torch.Tensor):
    """What autograd keeps of a tensor it saves for backward: a dequantized expert matrix (or its
    transpose, which a linear layer saves) is kept as (holder, expert, dtype, transposed) and
    dequantized again in backward, as Linear4bit does: training through the experts never holds
    the dequantized experts of every layer between forward and backward. An expert with a LoRA delta
    (W_e + scaling * B_e @ A_e) is kept the same way, with its delta function, and rebuilt alike."""
    hit = made.get(t.data_ptr())
    w = hit[0]() if hit is not None else None
    if w is not None and t is w:
        return hit[1:] + (False,)
    root = None if w is None else w if w._base is None else w._base  # views of views keep the first tensor as their base
    if w is not None and t._base is root and t.shape == w.t().shape and t.stride() == w.t().stride():
        return hit[1:] + (True,)
    return t.clone() if _in_scratch(t) else t  # a reused buffer is overwritten by the next expert


def _unpack(x):
    if not isinstance(x, tuple):
        return x
    holder, e, dtype, delta, transposed = x
    slot, holder._slot = holder._slot, holder._name  # the value lives as long as the one product that reads it
    try:
        with torch.no_grad():  # a value for backward's products; the LoRA weights are unchanged since forward
            value = holder.expert(e, dtype, delta)
    finally:
        holder._slot = slot
    return value.t() if transposed else value
