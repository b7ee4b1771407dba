"""qconvert: QLoRA-style 4-bit (NF4, double-quantized) checkpoints, end to end.

Importing this package is cheap: it touches no GPU and imports neither torch, Triton nor
transformers. Each function of the Python API below is looked up on first use (module
``__getattr__``, PEP 562), which imports its workflow then, so ``import qconvert`` stays light:

==========================  ==================================================  =====================
``qconvert.<name>``         what it is                                          command
==========================  ==================================================  =====================
``quantize``                :func:`qconvert.convert.quantize.quantize_checkpoint`  ``qconvert quantize``
``verify``                  :func:`qconvert.convert.verify.verify_checkpoint`   ``qconvert verify``
``inspect``                 :func:`qconvert.convert.inspect.inspect_checkpoint` ``qconvert inspect``
``load_model``              :func:`qconvert.model.loader.load_model`            (Python only)
``load_for_inference``      :func:`qconvert.run.inference.load_for_inference`   (generate, eval)
``generate_text``           :func:`qconvert.run.generate.generate_text`         ``qconvert generate``
``evaluate``                :func:`qconvert.run.evaluate.evaluate`              ``qconvert eval``
``train``                   :func:`qconvert.training.loop.train`                ``qconvert train``
``merge``                   :func:`qconvert.export.merge.merge_adapter`         ``qconvert merge``
``export_adapter``          :func:`qconvert.export.adapter.export_adapter`      ``qconvert export-adapter``
``export_gguf``             :func:`qconvert.export.gguf.export_gguf`            ``qconvert export-gguf``
``compare``                 :func:`qconvert.export.compare.compare`             ``qconvert compare``
``push``                    :func:`qconvert.hub.push.push_folder`               ``qconvert push``
==========================  ==================================================  =====================
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Version of the on-disk layout (spec/format.md). Bumped only when bytes a reader sees change.
LAYOUT_VERSION = "1"
#: Version of the quantization algorithm (which bytes a writer produces for a given input).
QUANTIZER_VERSION = "1"

#: The Python API: name -> (module, function), imported on first use.
API = {
    "quantize": ("qconvert.convert.quantize", "quantize_checkpoint"),
    "verify": ("qconvert.convert.verify", "verify_checkpoint"),
    "inspect": ("qconvert.convert.inspect", "inspect_checkpoint"),
    "load_model": ("qconvert.model.loader", "load_model"),
    "load_for_inference": ("qconvert.run.inference", "load_for_inference"),
    "generate_text": ("qconvert.run.generate", "generate_text"),
    "evaluate": ("qconvert.run.evaluate", "evaluate"),
    "train": ("qconvert.training.loop", "train"),
    "merge": ("qconvert.export.merge", "merge_adapter"),
    "export_adapter": ("qconvert.export.adapter", "export_adapter"),
    "export_gguf": ("qconvert.export.gguf", "export_gguf"),
    "compare": ("qconvert.export.compare", "compare"),
    "push": ("qconvert.hub.push", "push_folder"),
}

__all__ = ["__version__", "LAYOUT_VERSION", "QUANTIZER_VERSION", *API]


#: bitsandbytes logs, when imported (PEFT imports it), that an optional CPU kernel package is missing and
#: asks to `pip install kernels`: advice about a kernel qconvert does not need, which reads as a broken install.
BNB_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_bitsandbytes_notice() -> None:
    """Hide that notice (its logger's warnings), unless the user gave that logger a level of their own."""
    import logging

    log = logging.getLogger(BNB_NOTICE_LOGGER)
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)


def __getattr__(name: str) -> Any:
    """The API function ``name``, its module imported now (and the function cached here)."""
    if name not in API:
        raise AttributeError(f"module 'qconvert' has no attribute {name!r}")
    quiet_bitsandbytes_notice()
    module, function = API[name]
    value = getattr(importlib.import_module(module), function)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
