"""Model cards, rendered and read through huggingface_hub's ModelCard/ModelCardData.

A card is YAML front matter the Hub reads (``base_model``, ``base_model_relation``, tags...) and a
Markdown body. Writing goes through ``ModelCardData.to_yaml`` and reading through ``ModelCard(text)``,
so a card means to qconvert exactly what it means to the Hub: a hand-edited card with quoted values,
flow or block lists and comments reads as the Hub reads it. One template per relation:
:func:`quantized_card` (qconvert quantize), :func:`adapter_card` (train, export-adapter) and
:func:`merged_card` (merge; ``quantized`` again when the merge is re-quantized).

huggingface_hub is imported on first use, never at ``import qconvert``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import FormatError

def _front_matter_yaml(data: dict[str, Any]) -> str:
    """``data`` as YAML block text with every string value double-quoted and the keys plain
    (``base_model_relation: "merge"``), as qconvert has always written cards and tests look for."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def quoted(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')

    def plain_keys(dumper, mapping: dict):
        node = dumper.represent_mapping("tag:yaml.org,2002:map", mapping)
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str" and _plain_key(key.value):
                key.style = None
        return node

    Dumper.add_representer(str, quoted)
    Dumper.add_representer(dict, plain_keys)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1 << 16).strip()


def _plain_key(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "_-" for c in key) and key[0].isalpha()


def render_card(meta: dict[str, Any], body: str) -> str:
    """README.md text: the ``---``-delimited YAML of ``meta`` (None values left out, keys in the
    given order) and the body. The metadata goes through ``ModelCardData`` (the Hub's own
    normalisation), and the card is checked to read back through ``ModelCard`` as that data."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items() if v is not None}
    data = ModelCardData(**meta).to_dict()
    data = {k: data[k] for k in [*meta, *(k for k in data if k not in meta)] if k in data}
    text = f"---\n{_front_matter_yaml(data)}\n---\n\n{body.strip()}\n"
    if ModelCard(text).data.to_dict() != data:  # a value YAML cannot carry as given (not for str/number/bool/list)
        raise FormatError("model card metadata does not read back as written", detail=repr(data)[:500],
                          hint="card metadata values must be strings, numbers, booleans or lists of them")
    return text


def _yaml_block(text: str) -> str | None:
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    m = REGEX_YAML_BLOCK.search(text)
    return m.group(2) if m else None


def read_card_meta(text: str, where: str = "model card") -> dict[str, Any]:
    """The YAML front matter of a model card as a dict ({} when the card has none), as
    huggingface_hub's ModelCard reads it (null values left out). FormatError when the YAML does not
    parse or is not a mapping."""
    import yaml
    from huggingface_hub import ModelCard

    block = _yaml_block(text)
    if block is None:
        return {}
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except (yaml.YAMLError, RecursionError) as e:  # deep nesting exhausts the parser's recursion
        first = (str(e).strip().splitlines() or [""])[0]
        raise FormatError(f"{where}: the YAML front matter does not parse", detail=f"{first} ({type(e).__name__})",
                          hint="fix the YAML between the two --- lines") from None
    except (ValueError, TypeError):  # not a mapping, or a mapping with keys that are not strings
        kind = type(yaml.safe_load(block)).__name__
        what = "a mapping with keys that are not strings" if kind == "dict" else kind
        raise FormatError(f"{where}: the YAML front matter must be a mapping, not {what}",
                          hint="write it as key: value lines") from None
    return card.data.to_dict()


def read_card(folder: Path) -> dict[str, Any]:
    """The front matter of ``folder/README.md``; FormatError when there is none or it is unreadable."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        raise FormatError(f"{folder}: no README.md model card", hint="qconvert quantize/train/merge write one")
    try:
        text = card.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{card}: not UTF-8 text", hint="save the model card as UTF-8") from None
    return read_card_meta(text, str(card))


def hub_id(value: str | Path | None, known: str | None = None) -> str | None:
    """The Hub repo id a card may name for an input: ``known`` (the id it was downloaded by), else
    ``value`` when it is a repo id and not a local path; None for a local folder."""
    from .hub import looks_like_repo_id

    if known:
        return known
    return value if isinstance(value, str) and looks_like_repo_id(value) else None


def checked_base_model(value: str | None) -> str | None:
    """``--base-model``: a Hub repo id (namespace/name) that is not a local path, else OptionError.
    A card names the base as others load it from the Hub, which qconvert cannot know for a local folder."""
    from ..errors import OptionError
    from .hub import REPO_ID

    if value is not None and (not REPO_ID.match(value) or Path(value).exists()):
        raise OptionError(f"--base-model {value!r} is not a Hub repo id (namespace/name)",
                          hint="name the base model as others will load it from the Hub")
    return value


def shown(value: str | Path | None, known: str | None = None) -> str:
    """How a card's text names an input: its Hub id, else "the local folder `NAME`", the folder's
    base name only. A card is published (``push``): it never carries a path of the machine that
    wrote it, and says that the input was local instead."""
    rid = hub_id(value, known)
    if rid:
        return f"`{rid}`"
    name = Path(str(value or "")).name
    return f"the local folder `{name}`" if name else "a local folder"


def _size(b: int) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def quantized_card(summary: dict[str, Any], skip_patterns: list[str], folder: Path | None = None,
                   base_model: str | None = None) -> str:
    """The card of a `qconvert quantize` output, from its summary; ``folder``: the written folder
    (its config.json and tokenizer shape the usage snippet); ``base_model``: the Hub id of a local
    source (--base-model)."""
    prov = summary["provenance"]
    src = prov["source"]
    name = Path(summary["output"]).name
    meta = {
        "base_model": base_model or hub_id(src),
        "base_model_relation": "quantized",
        "pipeline_tag": pipeline_tag(folder),
        # 4-bit routed experts load only in qconvert (plain transformers refuses the folder): the Hub's widget and
        # "use this model" snippet must not promise transformers
        "library_name": "qconvert" if summary.get("experts_4bit") else "transformers",
        "tags": ["qconvert", "4-bit", summary["quant_type"], "bitsandbytes", "qlora"],
    }
    revision = f" (revision `{prov['source_revision']}`)" if prov["source_revision"] else ""
    dq = "yes (8-bit absmax, nested block 256)" if summary["double_quant"] else "no"
    body = f"""# {name}

A 4-bit {summary['quant_type'].upper()} quantization of `{src}`{revision}, written by
[qconvert](https://pypi.org/project/qconvert/) {prov['version']} in the bitsandbytes 4-bit layout.

| | |
|---|---|
| quant type | {summary['quant_type']} |
| block size | {summary['blocksize']} |
| double quantization | {dq} |
| compute dtype | {summary['compute_dtype']} |
| quantized tensors | {summary['quantized']} of {summary['tensors']} |
| bits per parameter (quantized weights) | {summary['bits_per_param']:.3f} |
| bits per parameter (whole model) | {summary['bits_per_param_model']:.3f} |
| size before | {_size(summary['source_bytes'])} |
| size after | {_size(summary['output_bytes'])} ({summary['size_ratio']:.3f} of before) |
{_experts_row(summary)}| left unquantized | {', '.join(skip_patterns) or 'none'} (and embeddings, norms, biases) |

## Loading

{_loading(summary, name, folder)}
"""
    return render_card(meta, body)


def _experts_row(summary: dict[str, Any]) -> str:
    """The table row for routed MoE experts, or nothing for a dense model."""
    e = summary.get("experts") or {}
    if not e.get("params"):
        return ""
    if e["mode"] == "4bit" and not e["kept_16bit_params"]:
        return f"| routed experts | 4-bit ({e['share']:.1%} of the parameters; qconvert layout extension, spec section 14) |\n"
    return f"| routed experts | {e['kept_16bit_share']:.1%} of the parameters left 16-bit |\n"


def _loading(summary: dict[str, Any], name: str, folder: Path | None) -> str:
    """How to load the folder: plain transformers + bitsandbytes, unless its routed experts are 4-bit."""
    if summary.get("experts_4bit"):
        return ("Its routed experts are 4-bit, which bitsandbytes cannot hold: plain transformers refuses this folder.\n"
                "Load it with qconvert (`pip install qconvert`):\n\n" + model_snippet(name, folder, qconvert_loader=True))
    return "With transformers and bitsandbytes, no qconvert needed:\n\n" + model_snippet(name, folder) + \
        "\n\nWith qconvert's own kernels: `qconvert.load_model(repo)`."


def adapter_card(base_model: str | None, body: str, extra_tags: tuple[str, ...] = ()) -> str:
    """The card of a PEFT LoRA adapter folder (train output, export-adapter)."""
    meta = {"base_model": hub_id(base_model), "base_model_relation": "adapter", "library_name": "peft",
            "pipeline_tag": "text-generation", "tags": ["qconvert", "lora", *extra_tags]}
    return render_card(meta, body)


def exported_adapter_card(source: Path, cfg: dict[str, Any], name: str = "adapter", fmt: str | None = None) -> str:
    """The card of a `qconvert export-adapter` output named ``name``; ``fmt``: the training format, when known."""
    base = cfg.get("base_model_name_or_path")
    named = shown(base) if base else "not recorded"
    if base and not hub_id(base):
        named += " (no Hub id known: the card names no base_model; `--base-model` names one)"
    body = (f"# LoRA adapter\n\nExported by qconvert from {shown(source)}: r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
            f"target modules {cfg.get('target_modules')}. Base model: {named}.\n\n{usage_section(base, name, fmt)}")
    return adapter_card(base, body)


def merged_card(summary: dict[str, Any], source: str | None, version: str, folder: Path | None = None) -> str:
    """The card of a `qconvert merge` output: relation ``merge``, or ``quantized`` when re-quantized;
    ``folder``: the written folder (its config.json and tokenizer shape the usage snippet)."""
    quantize = summary["quantized"]
    how = "re-quantized to 4 bits" if quantize else f"stored as {summary['dtype']}"
    body = (
        f"# {Path(summary['output']).name}\n\nThe LoRA adapter {shown(summary['adapter'])} merged into {shown(summary['base'], source)} by "
        f"qconvert {version}: each adapted weight is dequant(W4) + scaling * B @ A computed in float32, then {how}.\n"
    )
    if not source:
        body += "\nNo Hub id is known for the base model, so this card names no `base_model` (`--base-model HUB_ID` names one).\n"
    c = summary.get("requantization_cost")
    if c:
        body += (f"\nRe-quantizing cost: relative output error {c['output_error_mean']:.4f} (mean over {c['layers']} merged layers) "
                 f"against the 16-bit merge; {c['adapter_change_lost_mean']:.0%} of the adapter's change lost.\n")
    body += f"\n## Usage\n\n{model_snippet(Path(summary['output']).name, folder)}\n"
    meta = {"base_model": hub_id(source), "base_model_relation": "quantized" if quantize else "merge", "library_name": "transformers",
            "pipeline_tag": pipeline_tag(folder), "tags": ["qconvert", "lora", "merge"]}
    return render_card(meta, body)


# --- usage snippets that run for a stranger -------------------------------------------------------
# A card's snippet must run as written once the folder is on the Hub. The repo id is known only at
# push time, so the line naming the folder carries REPO_MARK: the card written locally names the
# folder (the snippet runs beside it), and `qconvert push` uploads a copy whose marked lines name the
# repo id instead (:func:`with_repo_id`); the local folder is never changed.

#: the comment that marks the line `qconvert push` rewrites to the repo id
REPO_MARK = "# the repo id (qconvert push writes it here)"
_REPO_LINE = re.compile(r'^(\w+) = "[^"\n]*"  ' + re.escape(REPO_MARK) + "$", re.M)
#: architectures loaded with AutoModelForCausalLM (a head that generates); others with AutoModel
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: files that make a folder's tokenizer loadable by AutoTokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


def repo_line(var: str, name: str) -> str:
    """``var = "name"`` with :data:`REPO_MARK`: the line push rewrites."""
    return f'{var} = "{name}"  {REPO_MARK}'


def with_repo_id(text: str, repo_id: str) -> str:
    """The card ``text`` with every marked snippet line naming ``repo_id`` (what push uploads)."""
    return _REPO_LINE.sub(lambda m: repo_line(m.group(1), repo_id), text)


def _code(lines: list[str]) -> str:
    return "```python\n" + "\n".join(lines) + "\n```"


def _config(folder: Path | None) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_causal(folder: Path | None) -> bool:
    """Whether the folder's config names a generating architecture (``*ForCausalLM``); a folder
    without a config is taken as causal, as qconvert's train and merge outputs are."""
    archs = _config(folder).get("architectures")
    if not isinstance(archs, list) or not archs:
        return True
    return any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in archs)


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def pipeline_tag(folder: Path | None) -> str:
    """The Hub's pipeline_tag: text-generation for a causal LM, feature-extraction for an encoder."""
    return "text-generation" if is_causal(folder) else "feature-extraction"


def model_snippet(name: str, folder: Path | None, qconvert_loader: bool = False) -> str:
    """Python that loads the model folder ``name`` (the repo id once pushed) with transformers, or
    with ``qconvert_loader`` with qconvert.load_model, and runs it once: generation for a causal LM,
    the hidden states for an encoder (token ids stand in for text when the folder has no tokenizer)."""
    auto = "AutoModelForCausalLM" if is_causal(folder) else "AutoModel"
    tok = has_tokenizer(folder)
    out = "logits" if auto != "AutoModel" else "last_hidden_state"
    head = ["import qconvert"] if qconvert_loader else [f"from transformers import {auto}"]
    load = "model = qconvert.load_model(repo)" if qconvert_loader else f"model = {auto}.from_pretrained(repo)"
    if tok:
        head.append("from transformers import AutoTokenizer")
    lines = [*head, "", repo_line("repo", name), load]
    if tok and auto == "AutoModel":
        lines += ["tokenizer = AutoTokenizer.from_pretrained(repo)",
                  'print(model(**tokenizer("Hello world", return_tensors="pt")).last_hidden_state[0, 0, :4].tolist())']
    elif tok:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(repo)", 'inputs = tokenizer("Hello", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    else:
        lines = ["import torch", *lines, f"print(model(torch.tensor([[1, 2, 3]])).{out}[0, -1, :4].tolist())"]
    return _code(lines)


#: how a prompt is written for each training format (data.py builds the training text the same way)
_PROMPTS = {
    "alpaca": ('"### Instruction:\\nName a colour.\\n\\n### Response:\\n"', "alpaca (`### Instruction:` / `### Input:` / `### Response:`)"),
    "prompt": ('"Name a colour."', "prompt/completion: the prompt as given, the completion follows it"),
    "text": ('"Once upon a time"', "plain text"),
}


def adapter_snippet(base: str, name: str, fmt: str | None) -> tuple[str, str]:
    """(what the prompt format is, Python that loads the adapter ``name`` on ``base`` with PEFT and
    generates once from a prompt in the format the adapter was trained with)."""
    lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'base = "{base}"', repo_line("adapter", name),
             "tokenizer = AutoTokenizer.from_pretrained(base)",
             "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)"]
    if fmt in ("chat", "sharegpt"):
        what = "chat: the base tokenizer's chat template"
        lines += ['messages = [{"role": "user", "content": "Name a colour."}]',
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)']
    else:
        prompt, what = _PROMPTS.get(fmt or "text", _PROMPTS["text"])
        lines += [f"inputs = tokenizer({prompt}, return_tensors=\"pt\")"]
    lines += ["print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    return what, _code(lines)


def usage_section(base: str | None, name: str, fmt: str | None) -> str:
    """The adapter card's "Usage" section; without a Hub id for the base it says how to name one."""
    if not hub_id(base):
        shown_base = Path(str(base or "")).name or "BASE"
        note = (f"\n\nThe base is {shown(base)}, which has no Hub id: replace `base` with its repo id "
                "(give `--base-model HUB_ID` when training or exporting to have it written here).")
    else:
        shown_base, note = str(base), ""
    what, code = adapter_snippet(shown_base, name, fmt)
    return f"## Usage\n\nPrompt format: {what}.\n\n{code}{note}\n"
