"""`qconvert compare A B`: do two models compute the same thing? Each is a Hugging Face folder (16-bit,
or 4-bit: its dequantized values, spec section 8), a folder plus an adapter (merged exactly as `qconvert
merge` merges), or a GGUF file run by llama.cpp.

On probe prompts (built in, or one a line from ``--prompts FILE``), tokenized once by the tokenizer of
the first Hugging Face side (a GGUF pair: by llama.cpp from A), both models give logits for the same
token ids; per prompt and overall it reports KL(A || B) averaged over positions, top-1 agreement, the
largest logit error relative to A's largest logit, and greedy continuations side by side. The verdict
fails when the overall mean KL is above ``tolerance``. This is what catches an export that does not
compute what was trained (a swapped tensor, a wrong scaling, the wrong base): a merge whose weights are
plausible numbers passes every NaN check and loads everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, OptionError

#: built-in probes: short, varied text most tokenizers split into several tokens
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a small village,",
    "1, 2, 3, 5, 8, 13,",
    "Translate to German: the quick brown fox",
)
#: --prompts FILE: read at most this many bytes
PROMPTS_LIMIT = 1 << 20


class _Torch:
    """A float32 transformers model (``self.model``, built on first use by ``_build`` and dropped by
    :meth:`release`): logits and greedy continuations, each a whole forward without a cache (hybrid
    families such as jamba build a cache that cannot be measured)."""

    tokenizer: Any
    _model: Any = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._build()
        return self._model

    def _build(self):
        raise NotImplementedError

    def release(self) -> None:
        """Drop the model: :func:`compare_models` runs one side, then the other, never both at once."""
        self._model = None

    def vocab_rows(self):
        """The input embeddings (their row count: the ids the model can take)."""
        return self.model.get_input_embeddings()

    def positions(self) -> int | None:
        from ..model.checks import position_limit

        return position_limit(self.model)

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(self.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        return seq[len(ids):]


class _HF(_Torch):
    """A Hugging Face folder (plus adapter) as a float32 transformers model of its logical values."""

    def __init__(self, path: str, adapter: str | None):
        from .lora_merge import Source

        self.src = src = Source.open(path, adapter, lambda m: None)
        self.tokenizer = _tokenizer(src.ckpt.config_dir())

    def _build(self):
        return _float32_model(self.src)


class _GGUF:
    """A GGUF file run by llama.cpp (llama-cpp-python), loaded on first use."""

    def __init__(self, path: str):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise OptionError(f"{path}: comparing a GGUF needs llama.cpp", hint="pip install 'qconvert[gguf]'") from e
        self.path, self._ll, self.tokenizer = path, None, None

    @property
    def ll(self):
        if self._ll is None:
            import llama_cpp

            try:
                self._ll = llama_cpp.Llama(model_path=self.path, logits_all=True, n_ctx=512, verbose=False)
            except ValueError:  # llama-cpp-python's one error for a file llama.cpp cannot load (damaged, truncated, not GGUF)
                raise FormatError(f"{self.path}: llama.cpp cannot load this GGUF file",
                                  hint="it is truncated, damaged or not a GGUF model; export it again") from None
        return self._ll

    def release(self) -> None:
        if self._ll is not None:
            self._ll.close()
            self._ll = None

    def vocab_rows(self) -> int:
        return int(self.ll.n_vocab())

    def positions(self) -> int:
        return int(self.ll.n_ctx())

    def logits(self, ids: list[int]) -> np.ndarray:
        self.ll.reset()
        self.ll.eval(ids)
        return np.array(self.ll.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.ll.reset()
        self.ll.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.ll.scores[self.ll.n_tokens - 1])))
            self.ll.eval(out[-1:])
        return out

    def encode(self, text: str) -> list[int]:
        return self.ll.tokenize(text.encode("utf-8"), add_bos=True)


def _float32_model(src):
    """transformers' model of the checkpoint's logical values in float32, each tensor placed as
    transformers places it on load (renamed, or merged by its converter: MoE experts stored per
    expert become the model's 3-D parameters; qconvert.model.conversions)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.conversions import convert_group, load_map

    cfg = AutoConfig.from_pretrained(src.root, trust_remote_code=False)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    params = model.state_dict()  # views of the model's own tensors: each is filled in place, one at a time,
    lm = load_map(model, src.names(), params)  # so the float32 model is the only full copy in memory
    conv1d = _conv1d_weights(model) if src.job is None else set()  # (merged ones come back [in, out], as merge writes them)
    filled = set()

    def fill(name: str, t: torch.Tensor) -> None:
        want = params.get(name)
        if want is None:  # not a tensor of this model (load_state_dict(strict=False) left such out too)
            return
        if t.dim() == 2 and tuple(want.shape) == tuple(reversed(t.shape)) != tuple(t.shape):
            t = t.T
        if tuple(t.shape) != tuple(want.shape):
            raise FormatError(f"{src.root}: {name} is {list(t.shape)} in the checkpoint, the model's is {list(want.shape)}",
                              hint="is config.json the checkpoint's own?")
        with torch.no_grad():
            want.copy_(t)
        filled.add(name)

    for k, name in lm.names.items():
        t = src.get(k)
        fill(name, t.T if name in conv1d and k in src.quantized else t)  # a 4-bit Conv1D weight is [out, in], square ones too
    for first in lm.groups:
        for name, t in convert_group(model, lm, first, src.get).items():
            fill(name, t)
    missing = [m for m in params if m not in filled]
    if [m for m in missing if not (m == "lm_head.weight" and cfg.get_text_config().tie_word_embeddings)]:
        raise FormatError(f"{src.root}: the model has parameters the checkpoint does not hold: {missing[:3]}", hint="is it a causal LM checkpoint?")
    model.tie_weights()
    return model.eval()


def _conv1d_weights(model) -> set[str]:
    """The parameter names of the model's Conv1D weights (GPT-2's), which it holds [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def _tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        return None


def _open(path: str, adapter: str | None):
    if str(path).endswith(".gguf") and Path(path).is_file():
        if adapter:
            raise OptionError(f"{path}: an adapter is merged into a Hugging Face folder, not into a GGUF", hint="export the adapter merged (export-gguf --adapter) and compare that")
        return _GGUF(str(path))
    return _HF(path, adapter)


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    from ..io.readers import decode_utf8, read_limited

    text = decode_utf8(read_limited(Path(path), PROMPTS_LIMIT, "prompts file", OptionError), path, OptionError)
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OptionError(f"{path}: no prompt in it", hint="one prompt a line")
    return prompts


def compare(a: str, b: str, *, adapter_a: str | None = None, adapter_b: str | None = None, prompts: str | None = None,
            tolerance: float = 1e-2, new_tokens: int = 16) -> dict[str, Any]:
    """Both models on the probe prompts: per-prompt and overall figures, and the verdict (see module doc)."""
    ma, mb = _open(a, adapter_a), _open(b, adapter_b)
    tok = ma.tokenizer or mb.tokenizer
    encode = (lambda t: tok(t)["input_ids"]) if tok is not None else next(m.encode for m in (ma, mb) if isinstance(m, _GGUF)) \
        if any(isinstance(m, _GGUF) for m in (ma, mb)) else None
    if encode is None:
        raise OptionError(f"{a}, {b}: no tokenizer to make the probes with", hint="add the tokenizer files to one of the folders")
    probes = [(text, encode(text)) for text in read_prompts(prompts)]
    r = compare_models(ma, mb, probes, tok, tolerance, new_tokens, f"{a} and {b}")
    return {"a": str(a), "b": str(b), "adapter_a": adapter_a, "adapter_b": adapter_b, **r}


def compare_models(ma, mb, probes: list[tuple[str, list[int]]], tok, tolerance: float, new_tokens: int, names: str) -> dict[str, Any]:
    """Two models (each with ``logits``, ``greedy`` and ``release``) on ``probes`` (text, token ids):
    the per-prompt rows, the overall figures and the verdict. A runs every probe and is released
    before B loads, so the two are never in memory together (the merge check's peak is one model's)."""
    (outs_a, outs_b) = (_outputs(m, probes, new_tokens, tok, names) for m in (ma, mb))
    rows = []
    for (text, ids), (la, ga), (lb, gb) in zip(probes, outs_a, outs_b):
        if la.shape != lb.shape:
            raise FormatError(f"{names} have different vocabularies ({la.shape[-1]} and {lb.shape[-1]} logits)", hint="compare a model with its own exports")
        rows.append({"prompt": text, "tokens": len(ids), **_figures(la, lb), "greedy_a": _show(tok, ga), "greedy_b": _show(tok, gb),
                     "greedy_same": ga == gb})
    kl = float(np.mean([r["kl"] for r in rows]))
    return {"prompts": rows, "kl": kl, "top1_agreement": float(np.mean([r["top1_agreement"] for r in rows])),
            "max_rel_logit_error": max(r["max_rel_logit_error"] for r in rows), "tolerance": tolerance, "passed": kl <= tolerance}


def _outputs(model, probes, new_tokens: int, tok, names: str) -> list[tuple[np.ndarray, list[int]]]:
    """One side's float32 logits (what both kinds of model compute in; the figures upcast them) and
    greedy continuation for every probe, once every probe's ids are known to be in its vocabulary;
    then the side is released."""
    import gc

    from ..model.checks import check_positions, check_token_ids

    try:
        check_token_ids([ids for _, ids in probes], model.vocab_rows(), tok, names)
        longest = max(len(ids) for _, ids in probes)
        check_positions(longest + new_tokens, model.positions(), f"the longest probe ({longest} tokens) with {new_tokens} new tokens",
                        hint="shorten the prompts or ask for fewer new tokens (--new-tokens): together at most {limit}")
        return [(model.logits(ids), model.greedy(ids, new_tokens)) for _, ids in probes]
    finally:
        model.release()
        gc.collect()


def _figures(la: np.ndarray, lb: np.ndarray) -> dict[str, float]:
    la, lb = la.astype(np.float64), lb.astype(np.float64)
    lpa = la - np.logaddexp.reduce(la, axis=-1, keepdims=True)
    lpb = lb - np.logaddexp.reduce(lb, axis=-1, keepdims=True)
    return {"kl": float((np.exp(lpa) * (lpa - lpb)).sum(-1).mean()),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
            "max_rel_logit_error": float(np.abs(la - lb).max() / max(np.abs(la).max(), 1e-30))}


def _show(tok, ids: list[int]) -> str:
    return tok.decode(ids) if tok is not None else " ".join(map(str, ids))
