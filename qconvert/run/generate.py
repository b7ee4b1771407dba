"""`qconvert generate`: continue a prompt, greedily by default, or by sampling with a seed.

Sampling happens when ``temperature > 0``; ``top_p`` and ``top_k`` then narrow it, and are refused
with greedy decoding, where they would silently do nothing. ``repetition_penalty`` applies to both.
With ``chat`` the prompt becomes one user turn (after an optional system turn) rendered by the
tokenizer's chat template with the generation prompt appended. The model receives only the
tokenizer outputs its forward takes. Settings the model's generation_config.json makes for sampling
are used only when sampling; a greedy run is greedy whatever that file says.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import DataError, OptionError


def check_settings(*, max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None,
                   repetition_penalty: float | None, chat: bool, system: str | None) -> None:
    """Refuse option values that cannot be used, naming the option."""
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", hint="e.g. --max-new-tokens 32 (the default)")
    if not math.isfinite(temperature) or temperature < 0:
        raise OptionError(f"--temperature must be 0 (greedy) or positive, got {temperature}", hint="leave it out for greedy, or e.g. --temperature 0.7 to sample")
    if top_p is not None and not 0 < top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {top_p}", hint="e.g. --top-p 0.9")
    if top_k is not None and top_k < 1:
        raise OptionError(f"--top-k must be at least 1, got {top_k}", hint="e.g. --top-k 50")
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise OptionError(f"--repetition-penalty must be positive, got {repetition_penalty}", hint="1 changes nothing; e.g. --repetition-penalty 1.1")
    if temperature == 0 and (top_p is not None or top_k is not None):
        raise OptionError("--top-p and --top-k apply only when sampling", hint="add --temperature T with T > 0")
    if system is not None and not chat:
        raise OptionError("--system needs --chat", hint="add --chat (the prompt becomes a user turn), or put the text in --prompt")


#: generate's --format: the prompt as given, an alpaca instruction rendered as train renders it, a chat user turn
PROMPT_FORMATS = ("raw", "alpaca", "chat")
#: an adapter's recorded training format -> the --format that prompts it as it was trained
FROM_TRAINING = {"alpaca": "alpaca", "chat": "chat", "sharegpt": "chat", "prompt": "raw", "text": "raw"}


def recorded_format(adapter) -> str | None:
    """The --format an adapter folder's PROMPT_FORMAT_FILE (written by train) calls for; None when
    the folder has none (an adapter from elsewhere) or was trained on several formats."""
    from ..training.data import read_prompt_format

    fmt = read_prompt_format(adapter)
    return FROM_TRAINING.get(fmt["format"]) if fmt else None


def render_prompt(prompt: str, fmt: str) -> str:
    """The text the model is given for ``prompt`` (chat is rendered later, by the tokenizer)."""
    if fmt == "alpaca":
        from ..training.data import alpaca_prompt

        return alpaca_prompt(prompt)
    return prompt


def encode_prompt(tok, prompt: str, *, chat: bool = False, system: str | None = None):
    """Tokenized prompt (a BatchEncoding of one row); with ``chat``, through the chat template."""
    if not chat:
        return tok(prompt, return_tensors="pt")
    if not getattr(tok, "chat_template", None):
        raise DataError("--chat: the tokenizer has no chat template", hint="drop --chat, or add chat_template to tokenizer_config.json")
    from ..training.templates import TemplateRefused, render

    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    try:  # within train's bounds on time and output (a template can loop), its refusals as one line
        text = render(tok, messages, 4 * max(2**20, len(prompt) + len(system or "")), add_generation_prompt=True)
    except TemplateRefused as e:
        raise DataError(f"--chat: the chat template refused the prompt ({e})", hint="the template raises for these messages: "
                        "check its role rules (some refuse a system turn), or drop --chat") from None
    return tok(text, return_tensors="pt", add_special_tokens=False)


def generation_config(model, tok, *, max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None,
                      repetition_penalty: float | None):
    """The model's generation_config with these settings: greedy unless ``temperature > 0``, whatever
    generation_config.json says about sampling; stops at the tokenizer's EOS when the model names none."""
    import copy

    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens, cfg.max_length = max_new_tokens, None
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if cfg.eos_token_id is None:
        cfg.eos_token_id = tok.eos_token_id
    cfg.do_sample = temperature > 0
    if cfg.do_sample:
        cfg.temperature = temperature
        cfg.top_p = top_p if top_p is not None else cfg.top_p
        cfg.top_k = top_k if top_k is not None else cfg.top_k
    else:
        cfg.temperature = cfg.top_p = cfg.top_k = None
    cfg.repetition_penalty = repetition_penalty
    return cfg


def generate_text(model, tok, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                  chat: bool = False, system: str | None = None) -> dict[str, Any]:
    """Generate a continuation of ``prompt``; returns the completion, the full text and the token ids."""
    import torch

    from ..model.checks import check_positions, check_token_ids, position_limit
    from .inference import forward_inputs

    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty)
    check_settings(**settings, chat=chat, system=system)
    enc = encode_prompt(tok, prompt, chat=chat, system=system)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in forward_inputs(model, enc).items()}
    n_prompt = inputs["input_ids"].shape[1]
    if n_prompt == 0:
        raise DataError("the prompt is empty after tokenization", hint="give a non-empty --prompt")
    check_token_ids(inputs["input_ids"].tolist(), model.get_input_embeddings(), tok, "the prompt")
    check_positions(n_prompt + max_new_tokens, position_limit(model), f"the prompt ({n_prompt} tokens) with --max-new-tokens {max_new_tokens}",
                    hint="shorten the prompt or lower --max-new-tokens: together at most {limit}")
    cfg = generation_config(model, tok, **settings)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=cfg)
    new = out[0, n_prompt:].tolist()
    eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    return {
        "prompt": prompt,
        "completion": tok.decode(new, skip_special_tokens=True),
        "text": tok.decode(out[0].tolist(), skip_special_tokens=True),
        "prompt_tokens": n_prompt,
        "completion_tokens": len(new),
        "completion_ids": new,
        "finish_reason": "eos" if new and new[-1] in eos else "length",
        "settings": {**settings, "do_sample": cfg.do_sample, "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": seed, "chat": chat},
    }
