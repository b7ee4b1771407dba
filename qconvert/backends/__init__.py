"""Compute backends for 4-bit weights.

Each backend offers ``dequantize(qt, dtype) -> Tensor`` and ``matmul(x, qt, bias) -> Tensor`` over a
:class:`qconvert.format.layout.QuantizedTensor` whose tensors live on the compute device.

- ``reference``: the pure-torch reference math (qconvert.quant.reference); any device. The default.
- ``triton``: qconvert's own Triton kernels (one-pass dequantize with double-quant decode; a fused
  small-batch matmul). Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (for tests).
- ``bitsandbytes``: bitsandbytes' own kernels, for comparison.
- ``auto``: the device-dispatched ops (``torch.ops.qconvert.*``, qconvert.ops): the kernels follow
  the tensors' device at every call, so a model moved with ``.to(...)`` computes with its new
  device's kernels (Triton on CUDA when Triton is importable, the reference elsewhere).

``reference``, ``triton`` and ``bitsandbytes`` are forced choices: they compute with those kernels
on whatever device the tensors are on, bypassing the dispatcher (the reference for CI and numerics
debugging; triton on CPU under TRITON_INTERPRET=1 for tests). The environment variable
QCONVERT_BACKEND selects one when the caller passes "auto". Importing this module imports neither
torch, Triton nor bitsandbytes, and does not register the ops: the CLI takes :data:`NAMES` from here
at start-up.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import BackendError, OptionError
#: Every backend name a caller, a CLI flag (--backend), a train config file or QCONVERT_BACKEND may
#: give: one tuple, in qconvert.names, which the CLI reads without importing torch.
from ..names import BACKEND_NAMES as NAMES

if TYPE_CHECKING:
    import torch


class Backend:
    """What every backend shares: a matmul that dequantizes the whole weight, then calls the vendor
    matmul. A backend supplies ``name`` and ``dequantize`` (and may override ``matmul``)."""

    name = "?"

    def dequantize(self, qt, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, qt, bias: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        return torch.nn.functional.linear(x, self.dequantize(qt, x.dtype), bias)
ENV = "QCONVERT_BACKEND"


def resolve(name: str | None, device: torch.device) -> str:
    """The backend a caller's ``name`` stands for: "auto" (the device-dispatched ops) unless
    QCONVERT_BACKEND or the name forces one; raises BackendError for one that cannot run here."""
    name = name or "auto"
    if name == "auto":
        name = os.environ.get(ENV) or "auto"
    if name not in NAMES:
        raise OptionError(f"unknown backend {name!r}", hint=f"use one of {', '.join(NAMES)} (argument or {ENV})")
    if name == "auto":
        return "auto"
    if name == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        raise BackendError(
            f"the triton backend needs a CUDA device (got {device})",
            hint="use --backend reference on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter",
        )
    if name == "triton" and not _triton_ok():
        raise BackendError("the triton backend needs the triton package", hint="pip install triton, or use --backend reference")
    if name == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BackendError("the bitsandbytes backend needs the bitsandbytes package", hint="pip install bitsandbytes") from None
    return name


def _triton_ok() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def get_backend(name: str | None, device: torch.device | str):
    """The backend object for ``name`` on ``device`` (raises BackendError if unknown or unavailable)."""
    import torch

    device = torch.device(device)
    resolved = resolve(name, device)
    if resolved == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    if resolved == "bitsandbytes":
        from .bnb import BitsandbytesBackend

        return BitsandbytesBackend()
    if resolved == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    from .dispatch import DeviceBackend

    return DeviceBackend()
