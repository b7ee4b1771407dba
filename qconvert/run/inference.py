"""A causal language model ready to run, for `qconvert generate` and `qconvert eval`.

:func:`load_for_inference` takes what people have after a qconvert workflow, or before it:

- a 4-bit checkpoint (qconvert's or transformers + bitsandbytes'): loaded by :func:`qconvert.load_model`
  onto qconvert's kernels, computing in its ``bnb_4bit_compute_dtype`` unless ``dtype`` says otherwise;
- any other checkpoint (the original model, `qconvert merge` output): loaded by plain transformers in
  the dtype it is stored in (``dtype="auto"``) or the one asked for.

:func:`attach_adapter` puts a PEFT LoRA adapter on top, after checking that every adapted module
exists in the model with the shape the adapter was trained for (an adapter of another base is
refused in one line, before PEFT sees it). Several adapters can be attached under different names;
the last one attached is active, and ``with model.disable_adapter():`` runs the bare base.

Only decoders are accepted: an encoder such as BERT, or an encoder-decoder, is refused before any
weight is read. The config is read as JSON first, so a missing or broken config.json is one clear
error, and no remote code is ever run (``trust_remote_code=False``, architecture looked up in
transformers itself).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, FormatError, OptionError, SourceError
from ..names import DTYPE_CHOICES



@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer; ``model`` becomes a PeftModel once an adapter is attached."""

    model: Any
    tokenizer: Any
    path: Path
    name: str
    kind: str  # "4-bit" or "unquantized"
    dtype: str  # what the layers compute in
    adapters: list[str]


def read_model_config(root: Path) -> dict[str, Any]:
    """config.json as a dict, or a qconvert error saying what is wrong with it."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a model folder", hint="pass a folder with config.json, weights and tokenizer, or a Hub id")
    if not (root / "config.json").is_file():
        from ..io.checkpoint import refuse_adapter_as_model

        refuse_adapter_as_model(root)
        raise SourceError(f"{root}: no config.json", hint="pass a model folder (config.json, weights, tokenizer)")
    from ..model.checks import read_config

    return read_config(root)  # the one config.json reader: size limit, UTF-8 JSON object


def causal_lm_class(root: Path, raw: dict[str, Any]):
    """The transformers class that config.json names, checked to be a decoder that can generate."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs, model_type = raw.get("architectures") or [], raw.get("model_type")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if not isinstance(arch, str) or not arch:
        raise FormatError(f"{root}/config.json: names no architecture, and model_type {model_type!r} has no causal LM class")
    cls = getattr(transformers, arch, None)
    if cls is None or not isinstance(cls, type):
        raise FormatError(f"{root}/config.json: architecture {arch!r} is not in transformers",
                          hint="qconvert never runs code shipped with a checkpoint")
    if raw.get("is_encoder_decoder") or not cls.can_generate():
        raise FormatError(f"{root}: {arch} is not a causal language model",
                          hint="generate and eval need a decoder such as LlamaForCausalLM, not an encoder like BERT")
    return cls


def _tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except Exception as e:  # transformers raises several types for a missing or broken tokenizer
        raise DataError(f"{root}: no usable tokenizer ({type(e).__name__})", hint="copy the tokenizer files into the model folder") from None
    return tok


def load_for_inference(model: str | os.PathLike, *, backend: str = "auto", revision: str | None = None, dtype: str = "auto",
                       device: str | None = None) -> LoadedModel:
    """Load MODEL (folder or Hub id; 4-bit or not) and its tokenizer for generation and scoring.
    Everything that can be refused without reading weights (config, architecture, tokenizer) is checked first."""
    import torch
    from transformers import AutoConfig

    from ..format.layout import is_4bit_config
    from ..model.loader import load_model
    from ..io.source import resolve_model_path
    from ..nn.linear4bit import Linear4bit

    if dtype not in DTYPE_CHOICES:
        raise OptionError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPE_CHOICES)}")
    root, _ = resolve_model_path(model, revision)
    raw = read_model_config(root)
    cls = causal_lm_class(root, raw)
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError... for configs it cannot use
        raise FormatError(f"{root}/config.json: transformers cannot build a config from it ({type(e).__name__})",
                          hint="check model_type and the fields of config.json") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_4bit_config(raw.get("quantization_config")):
        # load_model checks the weights against config.json first, before the tokenizer is looked at
        m = load_model(root, backend=backend, device=dev, dtype=None if dtype == "auto" else dtype)  # an all-`dtype` model
        kind = "4-bit"
        computes = next((mod.compute_dtype for mod in m.modules() if isinstance(mod, Linear4bit)), None)
        tok = _tokenizer(root)
    else:
        _check_other_quantization(root, raw.get("quantization_config"))
        tok = _tokenizer(root)
        m = _load_plain(root, cls, config, dtype).to(dev)
        kind = "unquantized"
        computes = None
    computes = computes or next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
    m.eval()
    return LoadedModel(m, tok, root, str(model), kind, str(computes).removeprefix("torch."), [])


#: quantization schemes transformers runs itself, with what it installs (dequantized on a CPU)
PLAIN_SCHEMES = ("fp8", "mxfp4")


def _check_other_quantization(root: Path, qc: Any) -> None:
    """Refuse a checkpoint quantized otherwise than 4-bit bitsandbytes or :data:`PLAIN_SCHEMES`
    (GPTQ, AWQ, 8-bit bitsandbytes...): transformers needs other libraries for those and failed
    deep in its loader (ImportError, AttributeError), which read as a bug in qconvert."""
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in PLAIN_SCHEMES:
        what = "8-bit bitsandbytes" if isinstance(qc, dict) and qc.get("load_in_8bit") else repr(method)
        raise FormatError(f"{root}/config.json: quantization_config names {what}, which qconvert does not run",
                          hint="run its 16-bit original, or a 4-bit bitsandbytes checkpoint of it (qconvert quantize)")


def _load_plain(root: Path, cls, config, dtype: str):
    """A checkpoint without 4-bit weights, through transformers, in its stored dtype ("auto") or ``dtype``."""
    from transformers.utils import logging as hf_logging

    from ..format.layout import LOGICAL_DTYPES
    from ..io.checkpoint import refuse_linked_weights

    refuse_linked_weights(root)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per call: noise for a local folder
    try:
        return cls.from_pretrained(root, config=config, dtype="auto" if dtype == "auto" else LOGICAL_DTYPES[dtype])
    except (OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{root}: transformers cannot load the weights ({type(e).__name__})",
                          hint="check that the folder holds the model's safetensors files") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def check_adapter(folder: str | os.PathLike, model, model_name: str) -> dict[str, Any]:
    """Refuse an adapter that does not fit ``model``: a module it adapts is missing, or has other in/out sizes.
    The files are read and checked by the one adapter reader (:mod:`qconvert.model.adapters`), as PEFT attaches
    them (embedding LoRA accepted); only the fit to this model is checked here."""
    import torch

    from ..model.adapters import lora_shapes, read_adapter_config, unwrapped
    from ..model.checks import linear_shape

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes = lora_shapes(folder, cfg, [name for name, _ in base.named_modules()], attach=True)
    hint = f"it was trained on {cfg.get('base_model_name_or_path')!r}; use it with that model"
    for mod, e in shapes.items():
        try:
            target = base.get_submodule(unwrapped(mod)[0])  # LoRA on parameters: MODULE(.base_layer)*
        except AttributeError:
            raise FormatError(f"{folder}: adapts {mod}, which {model_name} does not have", hint=hint) from None
        a, b = e.a_shape, e.b_shape
        if isinstance(target, torch.nn.Embedding):
            want = (target.num_embeddings, target.embedding_dim)
        else:  # a Linear, qconvert's 4-bit one, or a GPT-2 style Conv1D (weight [in, out]): lora_A [r, in], lora_B [out, r] on all
            out_in = linear_shape(target) or (None, None)
            want = (out_in[1], out_in[0])
        if None not in want and (a[1], b[0]) != want:  # any other kind of layer is left to PEFT
            raise FormatError(f"{folder}: {mod} maps {want[0]}->{want[1]} features in {model_name}, the adapter's {a[1]}->{b[0]}", hint=hint)
    return cfg


def attach_adapter(lm: LoadedModel, folder: str | os.PathLike, name: str | None = None) -> None:
    """Check the adapter (a folder, or a Hub id: :func:`qconvert.io.source.resolve_adapter_path`)
    against the model, attach it with PEFT and make it the active one."""
    from ..model.adapters import attach_peft, module_targets_kept, peft_notices_hidden
    from ..io.source import resolve_adapter_path
    from ..nn.experts4bit_lora import peft_sees_4bit_experts

    given, (folder, _) = folder, resolve_adapter_path(folder)
    check_adapter(folder, lm.model, lm.name)
    name = name or f"adapter{len(lm.adapters)}"
    with peft_notices_hidden(lm.model), module_targets_kept(), peft_sees_4bit_experts(lm.model):
        lm.model = attach_peft(lm.model, folder, name)  # PEFT's refusals as FormatError; config and weights must agree
    lm.model.set_adapter(name)
    lm.model.eval()
    lm.adapters.append(str(given))


def forward_inputs(model, encoding) -> dict[str, Any]:
    """The tokenizer outputs the model's forward accepts (a Llama takes no token_type_ids)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return {k: v for k, v in encoding.items() if k in params}
