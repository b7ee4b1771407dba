"""A Linear layer over a frozen 4-bit weight, for inference and LoRA training.

``Linear4bit`` subclasses ``nn.Linear`` (with ``in_features``/``out_features``), so PEFT wraps it with
its standard LoRA layer and ``target_modules="all-linear"`` finds it. ``weight`` holds the packed
uint8 codes (frozen); the block scales and tables are buffers. Inputs are cast to the compute dtype,
as bitsandbytes' Linear4bit does, and the output is cast back to the input dtype. The weight the
matmul uses is the 4-bit weight's value in its logical dtype (``weight_dtype``), converted to the
compute dtype (spec section 8): at float32 compute, a bfloat16 weight's value widened.

It also takes the place of a GPT-2 style ``Conv1D`` (weight stored [in, out]): the 4-bit tensor
holds that weight's transpose, [out, in] (spec section 10), so ``x @ W.T + b`` is what the Conv1D
computed. ``from_conv1d`` records it, for the adapters and merges written for the 16-bit model.

The forward is one call of the custom op ``torch.ops.qconvert.matmul_4bit`` (qconvert.ops) over the
module's current tensors: with the ``auto`` backend the dispatcher picks the kernels from their
device, so a moved module computes with its new device's kernels; a forced backend
(``--backend reference``, ``triton``, ``bitsandbytes``) is the op's ``kernels`` argument. torch.compile
sees one opaque op with a fake implementation.

Backward (the op's one registered autograd) reaches the input (that is what LoRA needs below the
adapter) and saves nothing but the module's own tensors: the input gradient dequantizes the weight
again instead of keeping a dequantized copy alive between forward and backward.

The state dict carries the whole quant state, as bitsandbytes' Linear4bit does: the tensors (codes,
block scales, tables) and, under ``_extra_state``, the packed quant-state JSON of the file format
(quant type, block size, logical dtype, shape, nested offset; spec section 5), so ``load_state_dict``
between two layers round-trips the nested offset that is otherwise a plain attribute. Loading refuses
a state from a layer of another shape or quant setting instead of copying (and silently casting) its
tensors into this one.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import ops
from ..errors import FormatError
from ..format.layout import QuantizedTensor, dtype_name, entries, pack_quant_state, unpack_quant_state

_EXTRA = "_extra_state"
#: per layer, what ops.matmul_no_grad keeps between calls (the compiled kernels' checked arguments);
#: beside the module rather than on it, so that copies, pickles and state dicts never carry it
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settings(qs: dict) -> dict:
    """The quant-state fields two layers must share for one's state to load into the other."""
    return {"shape": qs["shape"], "quant_type": qs["quant_type"], "blocksize": qs["blocksize"], "dtype": qs["dtype"],
            "double_quant": "nested_offset" in qs, "nested_blocksize": qs.get("nested_blocksize")}


def _tensor(module: nn.Module, name: str):
    """``module.name`` read from its parameter or buffer table first: nn.Module.__getattr__ costs more
    than a small product's checks. A name in neither table (FSDP turns the block scales from buffers
    into parameters, and wrappers may hold them elsewhere) is read the usual way."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name)


class Linear4bit(nn.Linear):
    """y = x @ dequant(W4).T + b, with W4 frozen in the packed 4-bit format."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, backend: str, compute_dtype: torch.dtype, *,
                 from_conv1d: bool = False):
        nn.Module.__init__(self)
        if len(qt.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D, got shape {list(qt.shape)}")
        self.out_features, self.in_features = qt.shape
        self.weight = nn.Parameter(qt.packed, requires_grad=False)
        self.register_buffer("absmax", qt.absmax)
        self.register_buffer("quant_map", qt.quant_map)
        self.register_buffer("nested_absmax", qt.nested_absmax)
        self.register_buffer("nested_quant_map", qt.nested_quant_map)
        self.nested_offset = qt.nested_offset
        self.quant_type = qt.quant_type
        self.blocksize = qt.blocksize
        self.weight_dtype = qt.dtype
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        #: the kernels: "auto" (by device) or a forced family (qconvert.ops.choice)
        self.backend = backend
        self.compute_dtype = compute_dtype
        #: this layer stands in for a GPT-2 style Conv1D of the 16-bit model (weight stored [in, out] there):
        #: a LoRA adapter trained on it is saved with PEFT's fan_in_fan_out=True, merged weights transposed back
        self.from_conv1d = from_conv1d

    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over this module's current (possibly moved) tensors."""
        return QuantizedTensor(
            packed=self.weight.data,
            absmax=self.absmax,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            quant_map=self.quant_map,
            nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map,
            nested_offset=self.nested_offset,
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.dequantize(self.quantized(), dtype or self.weight_dtype, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype, cd = x.dtype, self.compute_dtype
        xc = x if in_dtype == cd else x.to(cd)
        bias = _tensor(self, "bias")
        if bias is not None and bias.dtype != cd:
            bias = bias.to(cd)
        nested = _tensor(self, "nested_absmax")
        weight = (_tensor(self, "weight"), _tensor(self, "absmax"), _tensor(self, "quant_map"), nested, _tensor(self, "nested_quant_map"),
                  float(self.nested_offset) if nested is not None else 0.0, self.blocksize,
                  [self.out_features, self.in_features], self.weight_dtype)
        kept = _KEPT.get(self)
        got = ops.matmul_no_grad(xc, weight, bias, self.backend, kept)
        if got is not None:  # no gradient wanted, CPU kernels: the op's result without dispatcher and autograd
            y = got[0]
            if got[1] is not kept:
                _KEPT[self] = got[1]
        else:
            y = torch.ops.qconvert.matmul_4bit(xc, *weight, bias, self.backend)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def get_extra_state(self) -> torch.Tensor:
        """The packed quant-state JSON (uint8, as the file format stores it): what the tensors alone
        do not say, the nested offset included."""
        return pack_quant_state(self.quantized().quant_state_dict())

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Take the nested offset of a quant state that :meth:`_load_from_state_dict` has checked."""
        qs = unpack_quant_state(state, "Linear4bit state dict")
        if "nested_offset" in qs:
            self.nested_offset = qs["nested_offset"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Check the incoming quant state against this layer before torch copies any tensor."""
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _check_state(self, state_dict, prefix: str) -> None:
        """Refuse (FormatError) a state whose quant settings differ from this layer's, a quantized tensor
        given without the quant state that says how to read it, or a tensor of another dtype or shape
        than the layout table gives for this layer."""
        where = f"Linear4bit {prefix.rstrip('.') or '(root)'}"
        mine = _settings(self.quantized().quant_state_dict())
        given = [s for s in ("weight", "absmax", "nested_absmax") if prefix + s in state_dict]
        if prefix + _EXTRA not in state_dict:
            if given:
                raise FormatError(f"{where}: the state dict holds {prefix + given[0]!r} but no {prefix + _EXTRA!r} "
                                  "(its quant state), so its nested offset and settings are unknown",
                                  hint="save the state dict from a qconvert Linear4bit (its state_dict() carries both)")
            return
        theirs = _settings(unpack_quant_state(state_dict[prefix + _EXTRA], f"{where}: state dict"))
        for field in mine:
            if theirs[field] != mine[field]:
                raise FormatError(f"{where}: the state dict is from a layer with {field} {theirs.get(field)!r}, "
                                  f"this layer has {mine.get(field)!r}",
                                  hint="load a state saved from a layer of the same shape and quant settings")
        self._check_tensors(state_dict, prefix, where)

    def _check_tensors(self, state_dict, prefix: str, where: str) -> None:
        table = entries(self.in_features * self.out_features, self.blocksize, self.nested_absmax is not None)
        for suffix, (dtype, shape) in table.items():
            t = state_dict.get(prefix + (suffix or "weight"))
            if t is not None and (t.dtype != dtype or tuple(t.shape) != shape):
                raise FormatError(f"{where}: state dict entry {suffix or 'weight'!r} is {dtype_name(t.dtype)} "
                                  f"{list(t.shape)}, this layer holds {dtype_name(dtype)} {list(shape)}",
                                  hint="load a state saved from a layer of the same shape and quant settings")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
            f"compute_dtype={dtype_name(self.compute_dtype)}, backend={self.backend}"
        )
