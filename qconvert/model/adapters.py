"""A PEFT LoRA adapter folder, read and checked before anything uses it: adapter_config.json and
adapter_model.safetensors (spec/robustness.md section 5). The one reader of adapters: loading
(``load_model(..., adapter=)``), generate and eval (``runtime.check_adapter``), merging, exporting
(export-adapter, export-gguf) and pushing all read them through :func:`read_adapter_config` and
:func:`lora_shapes` / :func:`read_lora_weights`, so one hostile adapter gets one refusal everywhere
(tests/test_adapter_owner.py). Where the folder comes from (a path or a Hub id) is
:func:`qconvert.io.source.resolve_adapter_path`'s to decide, for every command.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import FormatError

#: A PEFT LoRA weight key: base_model.model.<module>.lora_A|lora_B[.<adapter name>].weight
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
#: PEFT's LoRA on an embedding layer: lora_embedding_A|B[.<adapter name>], saved without ``.weight``
#: (accepted only where PEFT attaches the adapter: generate, eval; merge has no embedding form)
EMBEDDING_KEY = re.compile(r"base_model\.model\.(.+)\.lora_embedding_([AB])(?:\.[^.]+)?(?:\.weight)?")
#: the two files of a PEFT LoRA adapter folder
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: safetensors dtype names of floating-point tensors (F16, F32, F64, BF16, F8_E4M3, F8_E5M2)
_FLOAT_DTYPES = ("F", "BF")
_FIX = "the adapter is damaged or was edited; export it again from its training run"


#: How PEFT matches each adapter_config.json field that holds regular expressions against a module
#: name (peft.tuners.tuners_utils.check_target_module_exists, peft.utils.other.get_pattern_key):
#: field -> the expression built from one pattern ``{p}``, and whether it is re.fullmatch (else re.match).
PATTERN_FORMS = {
    "target_modules": ("{p}", True),  # when a string; a list is matched by name and dotted suffix
    "exclude_modules": ("{p}", True),  # likewise
    "modules_to_save": (r"(^|.*\.){p}($|\..*)", False),
    "layers_pattern": (r"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", False),
    "rank_pattern": (r"(.*\.)?({p})$", False),  # the keys
    "alpha_pattern": (r"(.*\.)?({p})$", False),
}
#: The longest pattern accepted (a real one is a few dozen characters).
MAX_PATTERN_CHARS = 1000
#: The time all patterns together may take to match every module name, in a child process that is
#: stopped at this deadline: Python's regular expressions backtrack, and a pattern such as
#: ``(.*)*X`` never finishes on a 30-character name. Matching that finishes here finishes as fast
#: when PEFT repeats it (the same engine on the same strings).
PATTERN_SECONDS = 5.0
#: A pattern of these characters only has no repetition to backtrack over; it is not timed, unless
#: a module name is longer than MAX_PLAIN_NAME_CHARS (PEFT's ``(.*\.)?(p)$`` tries ``p`` after every
#: dot of the name, each ``.`` of ``p`` matching any character).
_PLAIN = re.compile(r"[\w.-]*")
MAX_PLAIN_NAME_CHARS = 4096


def module_value(table: Mapping | None, module: str, default):
    """The value of a PEFT rank_pattern/alpha_pattern for ``module``, else ``default``: as PEFT's
    get_pattern_key, the first key that matches the name's end at a dot (a full name, a dotted
    suffix, or a regular expression, alternations included)."""
    for key, val in (table or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def adapter_patterns(cfg: Mapping[str, Any], where: Path) -> list[tuple[str, str]]:
    """(field, pattern) for every regular expression PEFT will evaluate from ``cfg``; refuses a field
    of the wrong type, a pattern over :data:`MAX_PATTERN_CHARS` and one that does not compile."""
    found: list[tuple[str, str]] = []
    for field in PATTERN_FORMS:
        v = cfg.get(field)
        if v is None or (field in ("target_modules", "exclude_modules") and isinstance(v, list)):
            continue  # a list of names: no regular expression
        if field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(v, dict):
                raise FormatError(f"{where}: {field} must map module names to values, got {type(v).__name__}", hint=_FIX)
            v = list(v)  # the keys are the patterns
        elif isinstance(v, str) and field != "modules_to_save":
            v = [v]
        if not (isinstance(v, list) and all(isinstance(p, str) for p in v)):
            kinds = "a list of strings" if field == "modules_to_save" else "a string or a list of strings"
            raise FormatError(f"{where}: {field} must be {kinds}, got {type(v).__name__}", hint=_FIX)
        found += [(field, p) for p in v]
    for field, p in found:
        what = f"{field} key" if field.endswith("_pattern") and field != "layers_pattern" else field
        if len(p) > MAX_PATTERN_CHARS:
            raise FormatError(f"{where}: {what} {p[:60]!r}... is {len(p):,} characters, over the {MAX_PATTERN_CHARS} qconvert accepts",
                              hint="name the modules in a list instead of one long regular expression")
        form, _ = PATTERN_FORMS[field]
        try:
            re.compile(form.format(p=p))
        except (re.error, RecursionError, OverflowError) as e:
            raise FormatError(f"{where}: {what} {p[:60]!r} is not a valid regular expression ({e})", hint=_FIX) from None
    return found


#: The child process of :func:`check_pattern_time`: reads {"forms": [[expr, fullmatch]], "names": [...]}
#: on stdin and prints each form's index before matching it against every name.
_MATCH_ALL = """
import json, re, sys
job = json.load(sys.stdin)
for i, (expr, full) in enumerate(job["forms"]):
    print(i, flush=True)
    match = (re.compile(expr).fullmatch if full else re.compile(expr).match)
    for name in job["names"]:
        match(name)
print("done", flush=True)
"""


def check_pattern_time(cfg: Mapping[str, Any], names, where: Path) -> None:
    """Refuse an adapter whose regular expressions (:func:`adapter_patterns`) do not finish matching
    ``names`` (the module names PEFT or qconvert will match them against) within
    :data:`PATTERN_SECONDS`. Plain names are not timed; the others run in a child process."""
    import subprocess
    import sys

    names = sorted(set(names))
    long_names = any(len(n) > MAX_PLAIN_NAME_CHARS for n in names)  # the adapter's own names come from its file
    found = [(f, p) for f, p in adapter_patterns(cfg, where) if long_names or not _PLAIN.fullmatch(p)]
    if not found:
        return
    forms = [PATTERN_FORMS[f][0].format(p=p) for f, p in found]
    job = json.dumps({"forms": [[e, PATTERN_FORMS[f][1]] for e, (f, _) in zip(forms, found)], "names": names})
    try:
        r = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_ALL], input=job, capture_output=True, text=True,
                           timeout=PATTERN_SECONDS)
        done = r.returncode == 0 and r.stdout.rstrip().endswith("done")
        out = r.stdout
    except subprocess.TimeoutExpired as e:
        done = False
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    if done:
        return
    started = [int(x) for x in out.split() if x.isdigit()]
    field, p = found[started[-1]] if started else found[0]
    what = f"{field} key" if field in ("rank_pattern", "alpha_pattern") else field
    raise FormatError(
        f"{where}: {what} {p[:60]!r} does not finish matching the {len(names):,} module names within {PATTERN_SECONDS:g} s",
        detail="the regular expression backtracks catastrophically (nested or repeated wildcards); PEFT would hang on it",
        hint='name the modules in a list ("target_modules": ["q_proj", "v_proj"]) instead of a regular expression',
    )


def _positive_int(v: Any) -> bool:
    return type(v) is int and v > 0


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def adapter_file(folder: Path, name: str) -> Path:
    """``folder/name`` (:data:`ADAPTER_CONFIG` or :data:`ADAPTER_WEIGHTS`), refused unless it is a regular
    file that lies inside the folder once links are followed (a Hub snapshot's links into the cache's
    ``blobs/`` are inside: io/links.py): an adapter is copied by export-adapter and published by push."""
    p = folder / name
    if not p.is_file():
        hint = ("qconvert reads adapters in safetensors only (never pickle)" if name == ADAPTER_WEIGHTS
                else "pass a PEFT LoRA adapter folder (a qconvert train output)")
        raise FormatError(f"{folder}: no {name}", hint=hint)
    from ..io.links import outside_folder

    if outside_folder(p, folder):
        raise FormatError(f"{p}: a link to a file outside the adapter folder ({p.resolve()})",
                          hint="replace the link with the file itself")
    return p


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, validated: a JSON object with peft_type LORA, a
    positive integer r, a finite lora_alpha, and rank/alpha patterns of the same kinds. The one reader
    of adapter_config.json (merge, export-adapter, export-gguf, push, load_model, generate, eval)."""
    p = adapter_file(Path(folder), ADAPTER_CONFIG)
    from ..io.checkpoint import read_json_object
    from .checks import check_config_size

    check_config_size(p)
    cfg = read_json_object(p, "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise FormatError(f"{p}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r} is not LORA)",
                          hint="qconvert handles PEFT LoRA adapters only")
    if not _positive_int(cfg.get("r")):
        raise FormatError(f"{p}: r must be a positive integer, got {cfg.get('r')!r}", hint=_FIX)
    if "lora_alpha" in cfg and not _finite_number(cfg["lora_alpha"]):
        raise FormatError(f"{p}: lora_alpha must be a finite number, got {cfg['lora_alpha']!r}", hint=_FIX)
    for table, ok, what in (("rank_pattern", _positive_int, "positive integers"), ("alpha_pattern", _finite_number, "finite numbers")):
        t = cfg.get(table)
        if t is not None and not (isinstance(t, dict) and all(isinstance(k, str) and ok(v) for k, v in t.items())):
            raise FormatError(f"{p}: {table} must map module names to {what}", hint=_FIX)
    adapter_patterns(cfg, p)  # rank/alpha pattern keys and the other regular expressions: valid and short
    return cfg


#: adapter_config.json keys PEFT keeps as sets (their order then follows the process's string hashing)
SET_KEYS = ("target_modules", "exclude_modules", "target_parameters")


def stable_adapter_config(folder: Path, **updates: Any) -> dict[str, Any]:
    """Rewrite the adapter_config.json that PEFT's ``save_pretrained`` wrote into ``folder`` so that
    the same adapter always gives the same bytes: keys sorted, and the lists of :data:`SET_KEYS`
    (sets in PEFT, written in an order that changes from one process to the next) sorted. PEFT reads
    a list where it wrote a set. ``updates`` set keys first (``base_model_name_or_path``). Written
    beside and renamed onto the file."""
    import json

    p = folder / "adapter_config.json"
    cfg = {**json.loads(p.read_text(encoding="utf-8")), **updates}
    for key in SET_KEYS:
        if isinstance(cfg.get(key), list) and all(isinstance(v, str) for v in cfg[key]):
            cfg[key] = sorted(cfg[key])
    from ..io.writes import write_file

    write_file(p, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


class LoraEntry(NamedTuple):
    """One adapted module as the weights file's header gives it: its lora_A and lora_B keys and shapes."""

    a_key: str
    a_shape: tuple[int, ...]
    b_key: str
    b_shape: tuple[int, ...]


def _header(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype name, shape)} of adapter_model.safetensors, from its header alone."""
    weights = adapter_file(folder, ADAPTER_WEIGHTS)
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as h:
            return {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()}
    except Exception as e:  # safetensors raises SafetensorError and OSError for damaged files
        raise FormatError(f"{weights}: not a readable safetensors file", detail=str(e),
                          hint="the file is truncated or corrupt; copy or export it again") from None


def _pairs(header: dict, weights: Path, attach: bool) -> dict[str, dict[str, tuple[str, str, tuple[int, ...]]]]:
    """{module: {"A"|"B": (key, dtype, shape)}}; a tensor that is not a LoRA A/B weight is refused, except
    where PEFT attaches the adapter (``attach``): there embedding LoRA is a pair too and other tensors
    (a saved embedding, modules_to_save) are PEFT's to load, so nothing is dropped silently either way."""
    pairs: dict[str, dict[str, tuple[str, str, tuple[int, ...]]]] = {}
    for k, (dtype, shape) in header.items():
        m = LORA_KEY.fullmatch(k) or (EMBEDDING_KEY.fullmatch(k) if attach else None)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = (k, dtype, shape)
        elif not attach:
            raise FormatError(f"{weights}: tensor {k!r} is not a LoRA A/B weight (base_model.model.<module>.lora_A.weight)",
                              hint="only plain LoRA layers can be used (no DoRA magnitudes, embeddings or modules_to_save)")
    if not pairs:
        raise FormatError(f"{weights}: no LoRA weights (keys like base_model.model.<module>.lora_A.weight)", hint=_FIX)
    return pairs


def lora_shapes(folder: Path, cfg: Mapping[str, Any], base_names=(), *, attach: bool = False) -> dict[str, LoraEntry]:
    """{module: LoraEntry} from adapter_model.safetensors's header (no tensor read), validated against
    ``cfg`` (spec/robustness.md 5.2, 5.3): every tensor a LoRA A/B weight (``attach``: see :func:`_pairs`),
    each A with its B, A [r, in] and B [out, r] in a float dtype, r the module's rank (rank_pattern,
    else r). ``cfg``'s regular expressions must finish matching these modules and ``base_names`` (the
    base model's modules, which PEFT matches) in bounded time. The one owner of these rules."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    pairs = _pairs(_header(folder), weights, attach)
    check_pattern_time(cfg, [*pairs, *base_names], folder / ADAPTER_CONFIG)
    out = {}
    for module, ab in sorted(pairs.items()):
        for have, lack in (("A", "B"), ("B", "A")):
            if have in ab and lack not in ab:
                raise FormatError(f"{weights}: {module}.lora_{have} has no matching lora_{lack}", hint=_FIX)
        (ka, da, a), (kb, db, b) = ab["A"], ab["B"]
        r = module_value(cfg.get("rank_pattern"), module, cfg["r"])
        if not (da.startswith(_FLOAT_DTYPES) and db.startswith(_FLOAT_DTYPES)):
            raise FormatError(f"{weights}: {module}: lora_A/lora_B must be floating point, got {da}/{db}", hint=_FIX)
        if may_wrap_parameter(cfg, module) and len(a) == len(b) == 2 and a[0] == b[1]:
            r = a[0]  # LoRA on a parameter: [experts * r, in], checked against the model (parameter_adapters)
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise FormatError(f"{weights}: {module}: lora_A is {list(a)} and lora_B {list(b)}, rank {r} needs [{r}, in] and [out, {r}]",
                              hint=_FIX)
        out[module] = LoraEntry(ka, a, kb, b)
    return out


def read_lora_weights(folder: Path, cfg: Mapping[str, Any], base_names=()) -> dict[str, tuple[Any, Any]]:
    """{module: (lora_A, lora_B)} of an adapter that :func:`lora_shapes` accepts (plain LoRA only: what
    merge, export and load_model use); each tensor read is checked to be the one the header described."""
    folder = Path(folder)
    shapes = lora_shapes(folder, cfg, base_names)
    weights = folder / ADAPTER_WEIGHTS
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises SafetensorError and OSError for damaged files
        raise FormatError(f"{weights}: not a readable safetensors file", detail=str(e),
                          hint="the file is truncated or corrupt; copy or export it again") from None
    out = {}
    for module, e in shapes.items():
        a, b = sd.get(e.a_key), sd.get(e.b_key)
        if a is None or b is None or tuple(a.shape) != e.a_shape or tuple(b.shape) != e.b_shape or set(sd) != set(_keys(shapes)):
            raise FormatError(f"{weights}: changed while it was read", hint="read it again once nothing writes it")
        out[module] = (a, b)
    return out


def _keys(shapes: Mapping[str, LoraEntry]) -> list[str]:
    return [k for e in shapes.values() for k in (e.a_key, e.b_key)]


def may_wrap_parameter(cfg: Mapping[str, Any], module: str) -> bool:
    """Whether adapter module ``module`` may be one of PEFT's ParamWrappers (LoRA on a parameter): the
    config has target_parameters whose module part the name (less its ``.base_layer`` nesting) ends in."""
    targets = cfg.get("target_parameters") or ()
    base = unwrapped(module)[0]
    return any(not t.rpartition(".")[0] or base == t.rpartition(".")[0] or base.endswith("." + t.rpartition(".")[0]) for t in targets)


def unwrapped(module: str) -> tuple[str, int]:
    """(the model's module name, how many ParamWrappers deep): PEFT nests one ParamWrapper per adapted
    parameter of a module, and names the inner ones ``MODULE.base_layer``, ``MODULE.base_layer.base_layer``..."""
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module.removesuffix(".base_layer"), depth + 1
    return module, depth


@dataclass
class ParameterLora:
    """LoRA on one parameter (PEFT's ParamWrapper): ``a`` [experts * r, in], ``b`` [out, experts * r]
    for a parameter ``shape`` [experts, out, in] (``transposed`` False) or [experts, in, out]
    (``transposed``: the module's ``is_transposed``); a 2-D parameter [out, in] is one expert."""

    parameter: str  # the model's parameter name: MODULE.NAME, what rank/alpha patterns are matched against
    a: Any
    b: Any
    shape: tuple[int, ...]
    transposed: bool

    def delta(self, scaling: float):
        """scaling * the update PEFT adds to the parameter, in float32 and the parameter's shape: for
        expert e, B_e @ A_e with A_e the e-th block of r rows of A, and B_e the columns e, e + E, e + 2E...
        of B (PEFT reshapes A to [E, r, in] and B to [out, r, E]); transposed for [experts, in, out]."""
        import torch

        a, b = self.a.float(), self.b.float()
        if len(self.shape) == 2:
            return scaling * (b @ a)
        e = self.shape[0]
        a3 = a.reshape(e, -1, a.shape[-1])  # [E, r, in]
        b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        d = scaling * torch.bmm(b3, a3)  # [E, out, in]
        return d.transpose(1, 2).contiguous() if self.transposed else d


def parameter_adapters(cfg: Mapping[str, Any], modules: dict[str, tuple[Any, Any]], model, where: Path) -> dict[str, ParameterLora]:
    """Take the ParamWrapper entries out of ``modules`` (from :func:`read_lora_weights`), each resolved
    to the parameter of ``model`` (a real or meta model) it adapts, as PEFT nests them: on one module,
    the parameters that target_parameters matches (the module's own, in registration order) are wrapped
    first to last, so the outermost wrapper (``MODULE``) holds the last one and ``MODULE.base_layer``
    the one before. Checks each A/B pair against the parameter's shape and rank."""
    targets = list(cfg.get("target_parameters") or ())
    out: dict[str, ParameterLora] = {}
    for name in [m for m in modules if targets and may_wrap_parameter(cfg, m)]:
        base, depth = unwrapped(name)
        try:
            mod = model.get_submodule(base)
        except AttributeError:
            continue  # not a module of this model: left for the module checks, which name it
        own = [p for p in _parameter_names(mod) if f"{base}.{p}" in targets or any(f"{base}.{p}".endswith("." + t) for t in targets)]
        if not own:
            continue  # a module adapter (its parameters are not targeted)
        if depth >= len(own):
            raise FormatError(f"{where}: {name}: {depth + 1} nested parameter adapters on {base!r}, which has {len(own)} targeted parameter(s)",
                              hint="is this adapter for this base?")
        param = own[len(own) - 1 - depth]
        a, b = modules.pop(name)
        shape = tuple(getattr(mod, param).shape)
        transposed = bool(getattr(mod, "is_transposed", False))
        key = f"{base}.{param}"
        experts = shape[0] if len(shape) == 3 else 1
        in_f, out_f = (shape[1], shape[0]) if len(shape) == 2 else (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        r = module_value(cfg.get("rank_pattern"), key, cfg["r"])
        if len(shape) not in (2, 3) or tuple(a.shape) != (experts * r, in_f) or tuple(b.shape) != (out_f, experts * r):
            raise FormatError(f"{where}: {key}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}; the parameter {list(shape)} "
                              f"at rank {r} needs [{experts * r}, {in_f}] and [{out_f}, {experts * r}]", hint="is this adapter for this base?")
        out[key] = ParameterLora(key, a, b, shape, transposed)
    for name, (a, _) in modules.items():  # the module adapters read_lora_weights let through as possible parameter ones
        r = module_value(cfg.get("rank_pattern"), name, cfg["r"])
        if a.shape[0] != r:
            raise FormatError(f"{where}: {name}: lora_A is {list(a.shape)}, rank {r} needs [{r}, in]", hint=_FIX)
    return out


def _parameter_names(mod) -> list[str]:
    """``mod``'s own parameters as PEFT's target_parameters sees them, a 4-bit experts stack counting
    as the parameter it stands for (qconvert.nn.experts4bit_lora)."""
    from ..nn.experts4bit import Experts4bitWeight

    return [p for p, _ in mod.named_parameters(recurse=False)] + [a for a, m in mod.named_children() if isinstance(m, Experts4bitWeight)]


def check_against_base(weights: Path, modules: Mapping[str, tuple[Any, Any]], base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each adapted module's B @ A has the [out, in] shape of its base weight (``base_shapes``,
    keyed by module name)."""
    for module, (a, b) in modules.items():
        want = tuple(base_shapes[module])
        if (b.shape[0], a.shape[1]) != want:
            raise FormatError(f"{weights}: {module}: lora_B @ lora_A is [{b.shape[0]}, {a.shape[1]}], the base weight is {list(want)}",
                              hint="is this adapter for this base?")


def check_adapter_for_model(folder: str | os.PathLike, model) -> None:
    """A PEFT LoRA folder about to be attached to ``model`` (load_model's ``adapter=``): sections 5.1
    to 5.4 of spec/robustness.md, with the model's Linear layers as the base."""
    from .checks import linear_shape

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    modules = read_lora_weights(folder, cfg, [name for name, _ in model.named_modules()])
    parameter_adapters(cfg, modules, model, folder / "adapter_model.safetensors")  # checked, and taken out of ``modules``
    shapes = {}
    for m in modules:
        try:
            shape = linear_shape(model.get_submodule(m))
        except AttributeError:
            shape = None
        if shape is None:
            raise FormatError(f"{folder}: adapts {m!r}, which is not a Linear layer of the {type(model).__name__}",
                              hint="is this adapter for this base?")
        shapes[m] = shape
    check_against_base(folder / "adapter_model.safetensors", modules, shapes)


# GPT-2 style Conv1D layers (weight stored [in, out]) and PEFT's fan_in_fan_out. PEFT builds the same
# LoRA layer on a Conv1D as on a Linear (lora_A [r, in], lora_B [out, r], output + B(A(x)) * scaling);
# fan_in_fan_out=True only tells it that the base weight is stored transposed, for merging. qconvert's
# 4-bit model holds a Linear4bit (from_conv1d) where the 16-bit model holds a Conv1D, so an adapter
# trained on it is saved with fan_in_fan_out=True (what PEFT needs on the 16-bit model), and PEFT's
# notice when that adapter meets the Linear4bit again ("Setting fan_in_fan_out to False") is expected.
_LINEAR_FAN_IN_FAN_OUT = r"fan_in_fan_out is set to True but the target module is `torch\.nn\.Linear`"


def adapts_conv1d(peft_model) -> bool:
    """Whether a LoRA layer of ``peft_model`` wraps a 4-bit layer that stands in for a Conv1D."""
    from peft.tuners.lora import LoraLayer

    return any(getattr(m.get_base_layer(), "from_conv1d", False) for m in peft_model.modules() if isinstance(m, LoraLayer))


def has_conv1d_4bit(model) -> bool:
    """Whether ``model`` holds a Linear4bit that stands in for a GPT-2 style Conv1D."""
    return any(getattr(m, "from_conv1d", False) for m in model.modules())


@contextmanager
def peft_notices_hidden(model):
    """Attach adapters to ``model`` inside this: two warnings PEFT gives there that users cannot act on
    are hidden. Its fan_in_fan_out notice when the model's 4-bit layers stand in for Conv1D (the adapter
    says True for the 16-bit model; False is right here), and transformers' FutureWarning for the
    deprecated ``is_gradient_checkpointing`` that PEFT reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        if has_conv1d_4bit(model):
            warnings.filterwarnings("ignore", message=_LINEAR_FAN_IN_FAN_OUT, category=UserWarning)
        yield


# PEFT 0.21 under transformers 5 rewrites, on every adapter it attaches to a model type that transformers
# maps to the qwen2_moe or mixtral conversion pattern (deepseek_v2/v3, glm4_moe, qwen3_moe, qwen3_next,
# ...), each target_modules entry that ends in an old per-expert projection name (gate_proj, up_proj,
# down_proj, gate; w1/w2/w3 for mixtral) into target_parameters on the fused experts
# (peft.utils.transformers_weight_conversion._convert_peft_config_moe). That is right for an adapter trained
# on transformers 4's per-expert Linear layers, but it also takes the full names of Linear layers that
# still exist (a shared expert's or a dense layer's gate_proj): the adapter then loses those layers and
# gains LoRA on the routed experts (peft issue #3711, fixed in peft PR #3715). qconvert attaches adapters
# inside module_targets_kept(), which keeps such names as module targets, as that fix does.


def _moe_conversion():
    """PEFT's transformers-5 MoE module, or None where this PEFT has none."""
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:
        return None
    return twc if callable(getattr(twc, "_convert_peft_config_moe", None)) else None


def peft_moves_to_parameters(model, names) -> set[str]:
    """Which of the target_modules ``names`` PEFT's transformers-5 MoE conversion would turn into
    target_parameters on ``model`` (empty where it converts nothing)."""
    from peft import LoraConfig

    twc = _moe_conversion()
    if twc is None or not names:
        return set()
    cfg = LoraConfig(target_modules=list(names))
    try:
        twc._convert_peft_config_moe(cfg, model)
    except ValueError:  # PEFT refuses part of a fused pair (gate_proj without up_proj): it would take them all
        return set(names)
    return set(names) - set(cfg.target_modules or ())


@contextmanager
def module_targets_kept():
    """Attach PEFT adapters inside this: a target_modules entry that is the full name of one of the
    model's modules stays a module target through PEFT's MoE conversion (see above); every other entry
    is converted as PEFT converts it."""
    twc = _moe_conversion()
    if twc is None:
        yield
        return
    original = twc._convert_peft_config_moe

    def convert(peft_config, model, *args, **kwargs):
        targets = peft_config.target_modules
        if isinstance(targets, str) or not targets:
            return original(peft_config, model, *args, **kwargs)
        full = {n for n, _ in model.named_modules() if "." in n}
        kept = {t for t in targets if t in full}
        peft_config.target_modules = set(targets) - kept
        try:
            return original(peft_config, model, *args, **kwargs)
        finally:
            peft_config.target_modules = set(peft_config.target_modules or ()) | kept

    twc._convert_peft_config_moe = convert
    try:
        yield
    finally:
        twc._convert_peft_config_moe = original


def attach_peft(model, folder: Path, name: str = "default"):
    """``model`` with the adapter in ``folder`` attached by PEFT as ``name`` (a PeftModel gets one
    more adapter); the caller has checked the files (:func:`check_adapter_for_model` or its like).

    PEFT follows adapter_config.json, not the weights: modules the config leaves out are ignored
    and modules it adds (or modules_to_save, DoRA magnitudes) start from PEFT's initialisation,
    random with ``init_lora_weights: false``, behind one UserWarning at most. So every LoRA tensor
    of the file must be one PEFT holds for the adapter (as it would save them), and every tensor
    PEFT holds must come from the file, unless PEFT's initialisation left that module's update
    zero (lora_B zero, its default: adding it changes nothing); and every value must be finite. PEFT's
    own refusals come out as FormatError, not PEFT's exception types."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    was_peft = isinstance(model, PeftModel)
    try:
        if was_peft:
            model.load_adapter(str(folder), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{folder}: PEFT cannot attach this adapter ({type(e).__name__})", detail=str(e).strip()[:300] or None,
                          hint="check adapter_config.json against the weights and the model") from None
    held = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    stored = set(_header(folder))
    lora = {k for k in stored if _factor(k)}
    added = sorted(k.removeprefix("base_model.model.") for k in held if k not in stored and not _idle(k, held))
    left_out = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora if k not in held})
    bad = next((k for k, v in held.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if added or left_out or bad:
        if was_peft:
            model.delete_adapter(name)
        if bad:  # (merge refuses them too: a NaN in one LoRA factor makes every logit NaN)
            raise FormatError(f"{folder}/adapter_model.safetensors: {bad.removeprefix('base_model.model.')} holds NaN or Inf values",
                              hint="the adapter is damaged (or its training diverged); use an earlier checkpoint")
        what, detail = ((f"leaves out {len(left_out)} LoRA module(s) the weights hold", f"e.g. {left_out[0]}: PEFT would ignore them")
                        if left_out else (f"adds {len(added)} tensor(s) the weights lack",
                                          f"e.g. {added[0]}: PEFT would start them from its initialisation"))
        raise FormatError(f"{folder}: adapter_config.json {what}", detail=detail,
                          hint="make target_modules (and modules_to_save, use_dora, layers_to_transform) match the weights saved with it")
    return model


def _factor(key: str) -> bool:
    return bool(LORA_KEY.fullmatch(key) or EMBEDDING_KEY.fullmatch(key))


def _idle(key: str, held: Mapping[str, Any]) -> bool:
    """``key`` is a LoRA factor of a module whose update PEFT's initialisation left zero (one of
    its factors all zeros: lora_B by default), so its absence from the file changes nothing."""
    if not _factor(key):
        return False
    module = key.rsplit(".lora_", 1)[0] + ".lora_"
    return any(not v.any() for k, v in held.items() if k.startswith(module) and _factor(k))
