"""`qconvert export-gguf`: a model (4-bit or 16-bit, optionally with a LoRA adapter merged on the fly)
written as one GGUF file that llama.cpp runs, or a LoRA adapter alone as a GGUF LoRA adapter.

The values written are the model's logical values: a 4-bit weight's dequantized value (spec section 8,
the weight the model computed with), a merged weight exactly as `qconvert merge` computes it (this
module calls lora_merge's per-tensor function, in float32), anything else as stored. The file format,
tensor names, vocabulary and the Q8_0 / Q4_0 quantizers come from the ``gguf`` package (llama.cpp's own
Python library); K-quants (Q4_K_M) come from llama.cpp's quantizer through ``llama_cpp``: an F16 file is
written first beside the output, then quantized into the final file. Nothing of the binary format is
hand-written here.

Streaming: the tensors' names, shapes and types are planned from the checkpoint's headers (a 4-bit
weight's shape from its quant state), the header is written, then each tensor is read, converted and
written in turn, so memory holds one tensor at a time. The output is built under a unique hidden
temporary name in OUT's folder and renamed onto OUT at the end (qconvert.io.writes): an interrupted
export never leaves a file that looks complete.

Families: :data:`FAMILIES` (llama and the dense and MoE families of qconvert.export.gguf_families,
which holds what differs per family); any other architecture is refused by name. llama.cpp's llama
graph (and the graphs built like it) applies rotary embeddings to interleaved pairs while
transformers rotates the two halves of each head, so for them q_proj and k_proj rows are permuted per
head as llama.cpp's own converter does (:func:`_rope_permute`); the other graphs rotate as the
weights are stored. Routed MoE experts, stored per expert or fused (spec section 14; 4-bit ones as
their dequantized values), are written as the stacked [experts, out, in] ``ffn_*_exps`` tensors
llama.cpp reads (:func:`_expert_plans`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, OptionError
from .gguf_families import FAMILIES as _FAMILIES
from .lora_merge import Source

#: --type choices: the GGUF file types a user picks
TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
#: Hugging Face architectures exported -> the gguf package's architecture name (gguf_families.FAMILIES: the rest)
FAMILIES = {k: f.arch for k, f in _FAMILIES.items()}
#: --check's default bound on the mean KL(model || GGUF) by type: a gross error (a swapped tensor, a
#: wrong scaling) gives KL of 10 and more on the tests' tiny Llama, a type's rounding far less. Set from
#: the tiny model's figures (docs/gguf.md), not calibrated on a real model: pass --check-tolerance.
CHECK_TOLERANCE = {"f16": 1e-2, "bf16": 1e-2, "q8_0": 5e-2, "q4_0": 0.5, "q4_k_m": 0.5}
#: why another family is refused
_NOT_YET = "not exported by qconvert yet (only " + ", ".join(FAMILIES) + "); use llama.cpp's convert_hf_to_gguf.py on a `qconvert merge` output"


@dataclass
class _Planned:
    """One output tensor: its GGUF name, the checkpoint tensor it comes from, shape and GGML type."""

    name: str
    source: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # q_proj / k_proj: the head count of the rotary permutation
    fetch: Callable[[], torch.Tensor] | None = None  # a tensor made of several (stacked experts), or none (rope_freqs)
    fix: Callable[[torch.Tensor], torch.Tensor] | None = None  # a change of value on the way out (Gemma's norms + 1)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionError("export-gguf needs the gguf package", hint="pip install 'qconvert[gguf]' (gguf==0.19.0)") from e
    return gguf


def export_gguf(model: str, output: str | os.PathLike, *, out_type: str | None = None, adapter: str | None = None,
                lora_only: bool = False, overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write MODEL (plus ADAPTER merged as `qconvert merge` merges) to OUTPUT as GGUF of ``out_type``
    (default f16); with ``lora_only``, ADAPTER alone as a GGUF LoRA adapter for MODEL's GGUF."""
    from ..io.staging import check_file_output
    from ..io.writes import write_file

    say = log or (lambda m: None)
    if out_type is not None and out_type not in TYPES:
        raise OptionError(f"unknown --type {out_type!r}", hint="use one of " + ", ".join(TYPES))
    if lora_only and (adapter is None or out_type is not None):
        raise OptionError("--lora-only writes the --adapter alone, in float32" + ("" if adapter else ": --adapter is missing"),
                          hint="give --adapter DIR and no --type (the base model's GGUF carries the type)")
    out = Path(output)
    check_file_output(out, overwrite, inputs=[model, adapter])
    if lora_only:
        return export_gguf_lora(model, adapter, out, say)
    out_type = out_type or "f16"
    src = _Source.open(model, adapter, say)
    plan = _plan(src, "f16" if out_type == "q4_k_m" else out_type)
    out.parent.mkdir(parents=True, exist_ok=True)  # as the folder writers make theirs, once the model is accepted
    if out_type == "q4_k_m":
        _write_then_quantize(src, plan, out, say)
    else:
        write_file(out, lambda f: _write(src, plan, out_type, f, say))
    return {"model": str(model), "adapter": adapter, "output": str(out), "type": out_type, "architecture": src.arch,
            "tensors": len(plan), "bytes": out.stat().st_size, "merged_modules": len(src.job.targets) if src.job else 0,
            "notes": src.notes}


def check_export(model: str, output: str | os.PathLike, out_type: str, adapter: str | None = None,
                 tolerance: float | None = None) -> dict[str, Any]:
    """`qconvert compare` of MODEL (plus ADAPTER, merged) against the GGUF just written, run by llama.cpp:
    the export computes what was trained, or the verdict says it does not. Skipped (and said so)
    without llama-cpp-python. It holds MODEL in float32 in memory."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed"}
    from .compare import compare

    r = compare(model, str(output), adapter_a=adapter, tolerance=CHECK_TOLERANCE[out_type] if tolerance is None else tolerance, new_tokens=0)
    return {k: r[k] for k in ("kl", "top1_agreement", "max_rel_logit_error", "tolerance", "passed")}


class _Source(Source):
    """The model's tensors (lora_merge.Source) and the llama.cpp family they are written as; another
    family is refused by name before any tensor is read."""

    def __init__(self, root: Path, ckpt, cfg: dict[str, Any], job):
        from .gguf_families import config

        self.family, self.notes = _family(cfg, root)  # (refused by name before any tensor is read)
        self.arch = self.family.arch
        super().__init__(root, ckpt, config(self.family, cfg), job)


def _family(cfg: dict[str, Any], root: Path):
    """The model's :class:`gguf_families.Family` and the notes its check returns; refused by name otherwise."""
    from .gguf_families import REFUSED, check, config

    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "?")
    if arch in REFUSED:
        raise FormatError(f"{root}: architecture {arch!r} is not exported: {REFUSED[arch]}",
                          hint="use llama.cpp's convert_hf_to_gguf.py on a `qconvert merge` output")
    if arch not in FAMILIES:
        raise FormatError(f"{root}: architecture {arch!r} is {_NOT_YET}", hint="export-gguf runs: " + ", ".join(FAMILIES))
    fam = _FAMILIES[arch]
    return fam, check(fam, config(fam, cfg), root)


def _plan(src: _Source, out_type: str) -> list[_Planned]:
    """Every output tensor in write order, named by the gguf package's map for the family."""
    from .gguf_families import split

    gguf = _gguf()
    cfg = src.cfg
    arch = model_arch(gguf, src.arch)
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tied = cfg.get("tie_word_embeddings", False)
    names = [k for k in src.names() if not (tied and k == "lm_head.weight")]  # llama.cpp uses token_embd for a missing output.weight
    names = _drop_mtp_layers(src, names)
    plan = _expert_plans(src, tmap, names, out_type) if src.family.moe else []
    taken = {k for p in plan for k in p.source.split("\0")}
    for k in names:
        if k in taken:
            continue
        shape = src.shape(k)
        if pieces := split(src.family, cfg, k, shape):
            plan += [_Planned(_gguf_name(src, tmap, target), k, piece, _tensor_type(gguf, out_type, piece),
                              fetch=lambda k=k, f=f: f(src.get(k))) for target, piece, f in pieces]
            continue
        name = _gguf_name(src, tmap, k)
        if src.arch == "gpt2" and _CONV1D.search(k):
            plan.append(_conv1d_plan(gguf, src, k, name, out_type))
            continue
        plan.append(_Planned(name, k, shape, _tensor_type(gguf, out_type, shape, name), rope_heads(src, k), fix=_fix(src, name)))
    return plan + _rope_freqs_plan(gguf, src)


#: GPT-2's Conv1D weights (held [in, out] in a 16-bit checkpoint)
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


def _conv1d_plan(gguf, src: _Source, k: str, name: str, out_type: str) -> _Planned:
    """A Conv1D weight as the [out, in] matrix llama.cpp reads: a 4-bit one is stored (and dequantized)
    [out, in] already; a 16-bit one, or one merged with an adapter (written as merge writes it), is [in, out]."""
    q = k in src.quantized
    shape = src.shape(k) if q else tuple(reversed(src.shape(k)))  # (a 4-bit weight's shape is its [out, in])

    def fetch() -> torch.Tensor:
        t = src.get(k)
        return t if q and src.job is None else t.T.contiguous()

    return _Planned(name, k, tuple(shape), _tensor_type(gguf, out_type, shape, name), fetch=fetch)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _drop_mtp_layers(src: _Source, names: list[str]) -> list[str]:
    """deepseek and glm4_moe checkpoints carry multi-token-prediction layers past num_hidden_layers, which
    transformers does not load and llama.cpp's graph does not run: left out, with a note."""
    n = src.cfg["num_hidden_layers"]
    extra = {k for k in names if (m := _LAYER.match(k)) and int(m[1]) >= n} if src.family.mtp else set()
    if extra:
        src.notes.append(f"{len(extra)} tensors of layers past num_hidden_layers ({n}: multi-token prediction) are not written; "
                         "transformers does not run them either")
    return [k for k in names if k not in extra]


def model_arch(gguf, name: str):
    """The gguf package's MODEL_ARCH whose written name (general.architecture) is ``name``."""
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _gguf_name(src: _Source, tmap, k: str) -> str:
    """Tensor ``k``'s GGUF name by the gguf package's map (a router's ``e_score_correction_bias`` is
    its ``exp_probs_b.bias`` and gpt_oss's ``self_attn.sinks`` its ``attn_sinks.weight``, as llama.cpp's
    converter renames them)."""
    key = re.sub(r"e_score_correction_bias$", "e_score_correction.bias", re.sub(r"\.sinks$", ".sinks.weight", k))
    name = tmap.get_name(key, try_suffixes=(".weight", ".bias")) or tmap.get_name(key.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
    if name is None:  # (the map names bloom's tensors without transformers' "transformer." prefix)
        raise FormatError(f"{src.root}: tensor {k!r} has no GGUF name for {src.arch}", hint="is the checkpoint damaged?")
    return name


def _fix(src: _Source, name: str):
    from .gguf_families import transform

    return transform(src.family, name, src.cfg)


def _rope_freqs_plan(gguf, src: _Source) -> list[_Planned]:
    """llama3 rope scaling: the ``rope_freqs`` tensor llama's graph divides each frequency by; longrope:
    the long and short factors phi3's graph divides them by (by its context size)."""
    from .gguf_families import longrope_factors, rope_freqs, rope_parameters, rope_type

    F32 = gguf.GGMLQuantizationType.F32
    T = gguf.MODEL_TENSOR
    plan = [_Planned(gguf.TENSOR_NAMES[T.ROPE_FACTORS_LONG if k == "long" else T.ROPE_FACTORS_SHORT] + ".weight", "", tuple(t.shape), F32,
                     fetch=lambda t=t: t) for k, t in longrope_factors(src.cfg).items()]
    if rope_type(rope_parameters(src.cfg)) != "llama3":
        return plan
    t = rope_freqs(src.root)
    return [_Planned(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", "", tuple(t.shape), F32, fetch=lambda: t)]


#: a routed expert's own tensor (spec 14, per-expert form) and a fused stack (its parameter's name)
_PER_EXPERT = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<pre>.+\.experts)\.(?P<w>gate_up_proj|down_proj)$")
#: granitemoe's fused gate and up experts as its checkpoints hold them ([E, 2I, H]), and
#: granitemoeshared's shared expert's ([2S, H]); their ``output_linear`` has a name in the gguf package's map
_INPUT_LINEAR = re.compile(r"^model\.layers\.(?P<bid>\d+)\.(?P<m>block_sparse_moe|shared_mlp)\.input_linear\.weight$")


def _expert_plans(src: _Source, tmap, names: list[str], out_type: str) -> list[_Planned]:
    """The routed experts as the stacked [experts, out, in] tensors llama.cpp reads: per-expert tensors
    stacked in expert order; a fused gate_up_proj [E, 2I, H] split into its gate (first I rows) and up
    halves, as transformers' experts module splits it; a fused down_proj as it is."""
    gguf = _gguf()
    stacks: dict[str, dict[int, str]] = {}
    plan = []
    for k in names:
        if src.family.oai_experts and (m := _OAI.match(k)):
            plan += _oai_expert_plans(gguf, src, tmap, k, m, out_type)
        elif m := _INPUT_LINEAR.match(k):
            plan += _input_linear_plans(gguf, src, k, int(m["bid"]), m["m"] == "shared_mlp", out_type)
        elif m := _PER_EXPERT.match(k):
            stacks.setdefault(f"{m['pre']}.{m['w']}.weight", {})[int(m["e"])] = k
        elif m := _FUSED.match(k):
            shape = src.shape(k)
            halves = [(f"{m['pre']}.down_proj.weight", None)] if m["w"] == "down_proj" else \
                [(f"{m['pre']}.gate_proj.weight", 0), (f"{m['pre']}.up_proj.weight", 1)]
            for target, half in halves:
                rows = shape[1] if half is None else shape[1] // 2
                fetch = (lambda k=k: src.get(k)) if half is None else (lambda k=k, h=half: src.get(k).chunk(2, dim=1)[h].contiguous())
                plan.append(_expert_plan(gguf, src, tmap, target, k, (shape[0], rows, shape[2]), out_type, fetch))
    for target, members in stacks.items():
        keys = [members[e] for e in sorted(members)]
        if sorted(members) != list(range(len(keys))):
            raise FormatError(f"{src.root}: the experts of {target!r} are not numbered 0..{len(keys) - 1}", hint="is the checkpoint damaged?")
        shape = (len(keys), *src.shape(keys[0]))
        plan.append(_expert_plan(gguf, src, tmap, target, "\0".join(keys), shape, out_type, lambda keys=keys: torch.stack([src.get(k) for k in keys])))
    return plan


#: gpt_oss's fused experts and their biases: gate_up_proj [E, H, 2I] (gate and up interleaved), down_proj [E, I, H]
_OAI = re.compile(r"^(?P<pre>.+\.experts)\.(?P<w>gate_up_proj|down_proj)(?P<bias>_bias)?$")


def _oai_expert_plans(gguf, src: _Source, tmap, k: str, m: re.Match, out_type: str) -> list[_Planned]:
    """gpt_oss's experts as llama.cpp reads them: the weights, held [E, in, out], transposed to [E, out, in];
    gate_up_proj's (and its bias's) even outputs are the gate, the odd ones the up projection, as
    transformers' experts module takes them apart."""
    shape = src.shape(k)
    bias = bool(m["bias"])
    out = shape[-1] if bias else shape[2]
    if m["w"] == "down_proj":
        pieces = [("down_proj", slice(None))]
    else:
        pieces, out = [("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))], out // 2
    suffix = ".bias" if bias else ".weight"
    plan = []
    for target, rows in pieces:
        def fetch(k=k, rows=rows):
            t = src.get(k)
            return t[:, rows].contiguous() if bias else t.transpose(1, 2)[:, rows].contiguous()
        piece = (shape[0], out) if bias else (shape[0], out, shape[1])
        plan.append(_expert_plan(gguf, src, tmap, f"{m['pre']}.{target}{suffix}", k, piece, out_type, fetch))
    return plan


def _input_linear_plans(gguf, src: _Source, k: str, bid: int, shared: bool, out_type: str) -> list[_Planned]:
    """granitemoe's ``input_linear`` ([E, 2I, H] for the experts, [2S, H] for granitemoeshared's shared
    expert) split into its gate (first half of the rows) and up, as transformers splits it, under the
    tensor names llama.cpp reads."""
    *lead, rows, cols = src.shape(k)
    shape = (*lead, rows // 2, cols)
    T = gguf.MODEL_TENSOR
    names = (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP) if shared else (T.FFN_GATE_EXP, T.FFN_UP_EXP)
    return [_Planned(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight", k, shape, _tensor_type(gguf, out_type, shape),
                     fetch=lambda h=h: src.get(k).chunk(2, dim=-2)[h].contiguous()) for h, t in enumerate(names)]


def _expert_plan(gguf, src: _Source, tmap, target: str, source: str, shape, out_type: str, fetch) -> _Planned:
    name = tmap.get_name(target, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise FormatError(f"{src.root}: experts {target!r} have no GGUF name for {src.arch}", hint="is the checkpoint damaged?")
    return _Planned(name, source, tuple(shape), _tensor_type(gguf, out_type, shape, name), fetch=fetch)


def rope_heads(src: _Source, k: str) -> int:
    """The head count by which weight ``k``'s rows are permuted for llama.cpp (0: not permuted)."""
    if not src.family.permute:
        return 0
    heads = src.cfg["num_attention_heads"]
    if k.endswith("self_attn.q_proj.weight"):
        return heads
    return (src.cfg.get("num_key_value_heads") or heads) if k.endswith("self_attn.k_proj.weight") else 0


#: tensors kept F32 whatever the type, as llama.cpp's converter and quantizer keep them: MoE routers
#: (an F16 router flips near-tied expert choices; docs/gguf.md has the measured effect), learned position embeddings
_F32_TENSORS = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight", "position_embd.weight")


def _tensor_type(gguf, out_type: str, shape: tuple[int, ...], name: str = ""):
    """The GGML type of one tensor: 1-D tensors (norms), biases (gpt_oss's experts' are 2-D) and routers
    stay F32, as llama.cpp's converter keeps them; a matrix whose rows do not fill the quantizer's blocks
    is written F16 rather than refused."""
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith(_F32_TENSORS) or name.endswith(".bias"):
        return Q.F32
    q = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[out_type]
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if shape[-1] % block == 0 else Q.F16


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj / k_proj reordered per head from transformers' rotate-half layout to the
    interleaved pairs llama.cpp's llama graph rotates (the same reordering as its converter's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf, t: torch.Tensor, qtype):
    """A float32 tensor as the bytes (numpy array) of GGML type ``qtype``, by the gguf package's quantizers."""
    a = t.contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return a.astype("float32")
    if qtype == Q.F16:
        return a.astype("float16")
    return gguf.quants.quantize(a, qtype)


def _write(src: _Source, plan: list[_Planned], out_type: str, f, say) -> None:
    """The whole model GGUF (see :func:`_stream`)."""
    _stream(src.arch, lambda gw, gguf: _metadata(gw, gguf, src, out_type), plan, src.get, f, say)


def _stream(arch: str, metadata, plan: list[_Planned], get, f, say) -> None:
    """Metadata and tensor table from the plan, then each tensor fetched by ``get(source)``, converted
    and written in turn (the gguf package's writer, lent the open file ``f``)."""
    import numpy as np

    gguf = _gguf()
    gw = gguf.GGUFWriter(path=None, arch=arch)
    metadata(gw, gguf)
    for p in plan:
        gw.add_tensor_info(p.name, p.shape, np.float32, _nbytes(gguf, p), raw_dtype=p.qtype)  # (not uint8: the shape is the logical one)
    gw.fout = [f]
    gw.state = gguf.gguf_writer.WriterState.EMPTY
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_ti_data_to_file()
    for i, p in enumerate(plan):
        t = p.fetch() if p.fetch else get(p.source)
        if p.permute_heads:
            t = _rope_permute(t, p.permute_heads)
        if p.fix:
            t = p.fix(t)
        gw.write_tensor_data(_encode(gguf, t, p.qtype))
        say(f"[{i + 1}/{len(plan)}] {p.name} {p.qtype.name} {list(p.shape)}")
    gw.flush()


def _nbytes(gguf, p: _Planned) -> int:
    block, size = gguf.GGML_QUANT_SIZES[p.qtype]
    return math.prod(p.shape[:-1]) * (p.shape[-1] // block) * size


def _metadata(gw, gguf, src: _Source, out_type: str) -> None:
    """Hyper-parameters, file type and the tokenizer, as llama.cpp's loaders read them."""
    from .gguf_families import metadata as family_metadata
    from .gguf_families import attention_dims, rope_base, rope_dimensions

    cfg = src.cfg
    kv_heads, key_length, value_length = attention_dims(src.family, cfg)
    gw.add_name(src.root.name)
    gw.add_context_length(cfg.get("max_position_embeddings", 2048))
    gw.add_embedding_length(cfg["hidden_size"])
    gw.add_block_count(cfg["num_hidden_layers"])
    gw.add_feed_forward_length(cfg["intermediate_size"])
    gw.add_head_count(cfg["num_attention_heads"])
    gw.add_head_count_kv(kv_heads)
    gw.add_key_length(key_length)
    gw.add_value_length(value_length)
    gw.add_rope_dimension_count(rope_dimensions(src.family, cfg))
    gw.add_rope_freq_base(rope_base(src.family, cfg))
    family_metadata(gw, gguf, src.family, cfg)
    gw.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    gw.add_vocab_size(cfg["vocab_size"])
    ft = gguf.LlamaFileType
    gw.add_file_type({"f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0}[out_type])
    gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(gw, gguf, src)
    _sampling(gw, src.ckpt.config_dir() / "generation_config.json")


#: generation_config.json's sampling settings -> the GGUFWriter method that writes each (general.sampling.*)
_SAMPLING = {"temperature": "add_sampling_temp", "top_k": "add_sampling_top_k", "top_p": "add_sampling_top_p", "min_p": "add_sampling_min_p"}


def _sampling(gw, path: Path) -> None:
    """The model's sampling defaults, so llama.cpp starts from what its authors set (only when sampling is on)."""
    if not path.is_file():
        return
    from ..io.readers import read_json

    gen = read_json(path, "generation config", FormatError, limit=1 << 20)
    if not isinstance(gen, dict) or not gen.get("do_sample"):
        return
    for key, method in _SAMPLING.items():
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            getattr(gw, method)(int(v) if key == "top_k" else float(v))


def _vocab(gw, gguf, src: _Source) -> None:
    """The tokenizer (tokens, types, scores, merges, special ids, chat template) so the file runs alone.
    A byte-level BPE tokenizer.json is written as llama.cpp's "gpt2" model with the pre-tokenizer that
    splits text as it does (gguf_pretok; "default" and a note when none does); a SentencePiece
    tokenizer.model as its "llama" model. Anything else is refused."""
    folder = src.ckpt.config_dir()
    vocab = _read_vocab(gguf, folder)
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(typ)
    n = src.cfg["vocab_size"]
    if len(tokens) > n:
        raise FormatError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than vocab_size {n}", hint="is this the model's tokenizer?")
    for i in range(len(tokens), n):  # the embedding's rows past the tokenizer: unused, as llama.cpp's converter pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    gw.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        from .gguf_pretok import pre_tokenizer

        pre, note = pre_tokenizer(folder)
        gw.add_tokenizer_pre(pre)
        src.notes += [note] if note else []
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n).add_to_gguf(gw, quiet=True)


def _read_vocab(gguf, folder: Path):
    from gguf.vocab import BpeVocab, SentencePieceVocab

    if (folder / "tokenizer.model").is_file():
        try:
            return SentencePieceVocab(folder)
        except RuntimeError as e:  # the gguf package's own refusal: sentencepiece is not installed
            raise FormatError(f"{folder}: reading tokenizer.model needs the sentencepiece package ({e})",
                              hint="pip install sentencepiece, then re-run") from None
    try:
        return BpeVocab(folder)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise FormatError(f"{folder}: no tokenizer llama.cpp can run (a byte-level BPE tokenizer.json or a SentencePiece "
                          f"tokenizer.model): {e}", hint="export-gguf writes the tokenizer into the file; add the model's tokenizer files") from None


def _write_then_quantize(src: _Source, plan: list[_Planned], out: Path, say) -> None:
    """Q4_K_M: the F16 file under a temporary name beside OUT, quantized by llama.cpp into another
    temporary name, renamed onto OUT; both temporaries removed whatever happens."""
    from ..io.writes import remove, replace_file, temp_name, write_file

    f16 = temp_name(out.parent, out.name + ".f16")
    q = temp_name(out.parent, out.name)
    try:
        write_file(f16, lambda f: _write(src, plan, "f16", f, say))
        _llama_quantize(f16, q, "q4_k_m")
        replace_file(q, out)
    finally:
        remove(f16)  # the one writer's removal: a link planted at a temporary name is unlinked, never followed
        remove(q)


def _llama_quantize(src: Path, dst: Path, out_type: str) -> None:
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OptionError(f"--type {out_type} needs llama.cpp's quantizer", hint="pip install 'qconvert[gguf]' (llama-cpp-python==0.3.36)") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    import ctypes

    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise FormatError(f"llama.cpp's quantizer failed on {src} (code {rc})", hint="re-run with --type f16 to get the unquantized file")


def export_gguf_lora(model: str, adapter: str, out: Path, say) -> dict[str, Any]:
    """Write ``adapter`` (checked against ``model``, its base) to ``out`` as a GGUF LoRA adapter
    (``--lora-only``), which llama.cpp applies at run time to the base model's GGUF.

    The conventions are llama.cpp's (its convert_lora_to_gguf.py and llama-adapter.cpp): general.type
    "adapter", adapter.type "lora", adapter.lora.alpha; for each adapted base tensor ``T`` (its GGUF name)
    two tensors ``T.lora_a`` ([r, in], PEFT's lora_A) and ``T.lora_b`` ([out, r], PEFT's lora_B), which
    llama.cpp multiplies into ``scale * B @ (A @ x)`` with scale = alpha / r (r read from the tensors).
    Where PEFT's scaling is not alpha / r for a module (rank_pattern, alpha_pattern, rsLoRA) the ratio is
    folded into that module's lora_b, so llama.cpp's alpha / r times B gives PEFT's scaling times B.
    lora_b of q_proj / k_proj gets the same per-head row permutation as the base weights (its rows are
    the weight's rows). The tensors are written in float32: an adapter is small, and the base GGUF's type
    is the user's choice. The base GGUF must come from the same base the adapter was trained on (for a
    4-bit base: `qconvert export-gguf BASE`), since llama.cpp adds the update to whatever weights it has.
    """
    from ..io.writes import write_file

    src = _Source.open(model, adapter, say)
    if src.job.params is not None:
        raise OptionError(f"{adapter}: LoRA on parameters (target_parameters) has no GGUF adapter form", hint="export the merged model instead (drop --lora-only)")
    lora = src.job.lora
    alpha = float(lora.config.get("lora_alpha", lora.config["r"]))
    if not alpha > 0:  # llama.cpp reads alpha 0 as "no scaling"
        raise OptionError(f"{adapter}: lora_alpha {alpha} cannot be written as a GGUF adapter", hint="export the merged model instead (drop --lora-only)")
    plan = _lora_plan(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, lambda f: _stream(src.arch, lambda gw, gguf: _lora_metadata(gw, gguf, src, alpha), plan,
                                      lambda name: _lora_tensor(src, alpha, name), f, say))
    return {"model": str(model), "adapter": adapter, "output": str(out), "type": "lora", "architecture": src.arch,
            "tensors": len(plan), "bytes": os.stat(out).st_size, "merged_modules": 0, "lora_alpha": alpha}


def _lora_plan(src: _Source) -> list[_Planned]:
    from .gguf_families import split, transform

    gguf = _gguf()
    cfg = src.cfg
    tmap = gguf.get_tensor_name_map(model_arch(gguf, src.arch), cfg["num_hidden_layers"])
    F32 = gguf.GGMLQuantizationType.F32
    plan = []
    for k, m in src.job.targets.items():
        base = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        if split(src.family, cfg, k, src.shape(k)) or (base and transform(src.family, base, cfg)):
            raise OptionError(f"{src.job.adapter}: adapts {k!r}, which llama.cpp reads split in two or reordered ({src.arch}): a LoRA "
                              "pair cannot be written for it", hint="export the merged model instead (drop --lora-only)")
        if base is None:
            raise OptionError(f"{src.job.adapter}: adapts {k!r}, which has no GGUF name for {src.arch}", hint="export the merged model instead (drop --lora-only)")
        a, b = src.job.lora.modules[m]
        perm = rope_heads(src, k)
        plan.append(_Planned(base + ".lora_a", m + "\0a", tuple(a.shape), F32))
        plan.append(_Planned(base + ".lora_b", m + "\0b", tuple(b.shape), F32, perm))
    return plan


def _lora_tensor(src: _Source, alpha: float, source: str) -> torch.Tensor:
    """lora_A as it is; lora_B times PEFT's scaling over llama.cpp's alpha / r (1 for a plain LoRA)."""
    m, which = source.split("\0")
    a, b = src.job.lora.modules[m]
    if which == "a":
        return a.float()
    ratio = src.job.lora.scaling(m) * a.shape[0] / alpha
    return b.float() if ratio == 1.0 else b.float() * ratio


def _lora_metadata(gw, gguf, src: _Source, alpha: float) -> None:
    gw.add_type(gguf.GGUFType.ADAPTER)
    gw.add_string(gguf.Keys.Adapter.TYPE, "lora")
    gw.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    gw.add_name(Path(src.job.adapter).name)
