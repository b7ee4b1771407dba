"""LoRA on 4-bit routed experts, in PEFT's own ``target_parameters`` form (``--lora-experts``).

PEFT adapts a 3-D experts parameter [E, out, in] with a ``lora.ParamWrapper``: lora_A [E * r, in] and
lora_B [out, E * r]; expert e's update is ``scaling * B_e @ A_e`` with A_e the e-th block of r rows of
A and B_e the columns e, e + E, e + 2E... of B (transposed for a module whose ``is_transposed`` stores
[E, in, out]); its forward folds the update of the whole stack into the parameter (a ``baddbmm`` over
every expert) and runs the module on that.

On qconvert's model the stack is an :class:`~qconvert.nn.experts4bit.Experts4bitWeight`, a module
that PEFT's injection cannot see (it matches ``named_parameters``). :func:`peft_sees_4bit_experts`
shows it, while an adapter is attached, as a parameter of its shape and compute dtype that holds no
memory (one element, expanded), so PEFT itself builds its wrappers: the tensor names, shapes,
initialisation, scaling, nesting and dtypes of the adapter are PEFT's, and so are save, load and
resume. On leaving, the 4-bit stacks are put back and each wrapper on one becomes a
:class:`ParamWrapper4bit`, whose forward gives the stack a per-expert delta instead of folding the
whole stack: when the experts module reads ``weight[e]``, expert e is dequantized and
``scaling * B_e @ A_e`` added (``torch.addmm``, in the compute dtype, as PEFT's fold is in the
parameter's dtype). Only the experts the router picks are ever built, one at a time.

Why a delta on the weight rather than the low-rank path ``x @ A_e^T @ B_e^T``: the families' own eager
forwards read ``weight[e]`` and multiply (``F.linear``), each in its own way (fused gate/up, biases,
transposed storage); adding the delta where the weight is read keeps them all unchanged and is
PEFT's math term for term (W + delta, then the module's own matmul). It costs out * in * r flops per
routed expert, the order of the dequantization itself.

Backward: the delta is built from views of lora_A and lora_B, so autograd sends gradients to them
only (the 4-bit codes are buffers). The dequantized-plus-delta matrix that a linear layer saves for
backward is not kept: the experts module's saved-tensor hook (qconvert.nn.experts4bit) keeps (stack,
expert, delta) and rebuilds it in backward, the LoRA weights being unchanged until the optimizer
steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import ParamWrapper

from ..errors import OptionError
from .experts4bit import Experts4bitWeight


def _holders(model) -> list[tuple[torch.nn.Module, str, Experts4bitWeight]]:
    """(experts module, attribute, 4-bit stack) for every stack in ``model``."""
    return [(m, attr, w) for m in model.modules() for attr, w in m._modules.items() if isinstance(w, Experts4bitWeight)]


@contextmanager
def peft_sees_4bit_experts(model):
    """Attach PEFT adapters to ``model`` inside this: each 4-bit experts stack is a stand-in parameter
    while PEFT injects (see the module docstring), and the wrappers PEFT puts on them run on the 4-bit
    stack afterwards."""
    holders = _holders(model)
    if not holders:
        yield
        return
    for m in model.modules():  # PEFT finds the wrappers it nests a further adapter in by class name
        if type(m) is ParamWrapper4bit:
            m.__class__ = ParamWrapper
    for mod, attr, w in holders:
        del mod._modules[attr]
        stand_in = torch.empty((), dtype=w.compute_dtype, device=w.device).expand(w.shape)
        mod.register_parameter(attr, torch.nn.Parameter(stand_in, requires_grad=False))
    try:
        yield
    finally:
        for mod, attr, w in holders:
            del mod._parameters[attr]
            mod.add_module(attr, w)
        for m in model.modules():
            if type(m) is ParamWrapper and isinstance(m.get_param(), Experts4bitWeight):
                m.__class__ = ParamWrapper4bit


class ParamWrapper4bit(ParamWrapper):
    """PEFT's ParamWrapper on a 4-bit experts stack: the same adapter, applied per routed expert."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)  # refused above when given
        adapters = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        holder = self.get_param()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        holder.delta = _Delta([self.expert_factors(a) for a in adapters], self._did_swap_in_out_features)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            holder.delta = None

    def expert_factors(self, adapter: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], float]:
        """(A_e for each e, B_e for each e, scaling), split as PEFT's get_delta_factors splits them: A
        [E * r, in] into [r, in] blocks, B [out, E * r] into its [out, r] columns e, e + E, ...
        ``unbind`` makes one view per expert with one backward for all: the gradients of the experts a
        step used are gathered into A's and B's shape once, not once per expert."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return a.view(self.num_experts, -1, a.shape[-1]).unbind(0), b.view(b.shape[0], -1, self.num_experts).unbind(2), self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise OptionError("LoRA on 4-bit experts cannot be merged into the 4-bit stack (PEFT would need 16-bit experts)",
                          hint="use `qconvert merge BASE ADAPTER OUT`, which writes the merged experts in 16 bits")

    def get_delta_weight(self, adapter_name, *args, **kwargs):
        raise OptionError("the whole update of a 4-bit experts stack is not built (it would dequantize every expert)",
                          hint="use `qconvert merge`, or qconvert.model.adapters.ParameterLora.delta on the adapter's tensors")


class _Delta:
    """What a 4-bit stack adds to expert e's matrix while its wrapper's forward runs: for each active
    adapter, ``scaling * B_e @ A_e`` ([out, in]; ``A_e^T @ B_e^T`` for a stack stored [E, in, out],
    ``swapped`` False as in PEFT), in the matrix's dtype."""

    def __init__(self, factors: list[tuple], swapped: bool):
        self.factors, self.swapped = factors, swapped

    def __call__(self, e: int, value: torch.Tensor) -> torch.Tensor:
        for a, b, scaling in self.factors:
            lhs, rhs = (b[e], a[e]) if self.swapped else (a[e].t(), b[e].t())
            value = torch.addmm(value, lhs.to(value.dtype), rhs.to(value.dtype), alpha=scaling)
        return value
