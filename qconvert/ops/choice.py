"""Which kernels a caller's ``backend`` name stands for, checked before any weight is placed.

- ``auto`` (the default): the kernels follow the tensors' device at every call (the CPU kernels on
  CPU, Triton on CUDA when Triton is importable, the reference elsewhere), so a model moved with
  ``.to(...)`` computes with its new device's kernels;
- ``reference``, ``triton``, ``bitsandbytes``: that kernel family on whatever device the tensors are
  on (the reference for CI and numerics debugging; triton on CPU under TRITON_INTERPRET=1 for tests;
  bitsandbytes for comparison).

The name travels with each call of an op (its ``kernels`` argument): qconvert/ops/__init__.py holds
the one table from names to kernel families. The environment variable QCONVERT_BACKEND selects one
when the caller passes "auto". The names themselves are :data:`qconvert.names.BACKEND_NAMES`, which
the CLI reads without importing torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import BackendError, OptionError
from ..names import BACKEND_NAMES

if TYPE_CHECKING:
    import torch

ENV = "QCONVERT_BACKEND"


def resolve(name: str | None, device: torch.device) -> str:
    """The kernels a caller's ``name`` stands for: "auto" (the device-dispatched kernels) unless
    QCONVERT_BACKEND or the name forces a family; OptionError for an unknown name, BackendError for
    a family that cannot run here."""
    name = name or "auto"
    if name == "auto":
        name = os.environ.get(ENV) or "auto"
    if name not in BACKEND_NAMES:
        raise OptionError(f"unknown backend {name!r}", hint=f"use one of {', '.join(BACKEND_NAMES)} (argument or {ENV})")
    if name == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        raise BackendError(
            f"the triton backend needs a CUDA device (got {device})",
            hint="use --backend reference on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter",
        )
    if name == "triton" and not _installed("triton"):
        raise BackendError("the triton backend needs the triton package", hint="pip install triton, or use --backend reference")
    if name == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BackendError("the bitsandbytes backend needs the bitsandbytes package", hint="pip install bitsandbytes") from None
    return name


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None
