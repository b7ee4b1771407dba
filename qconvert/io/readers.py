"""Bounded readers: every small text input qconvert parses (run configs, JSON side files, metrics
logs) is read here, so its size, nesting depth and parse time have one owner.

Why: a parser given hostile bytes can take unbounded memory or time from a small file (a 1.5 KB
YAML alias bomb expands to billions of nodes; a 32 MB YAML file keeps PyYAML busy for minutes;
``[`` repeated 100,000 times ends Python's JSON parser in a RecursionError). The rules:

- size: the file's size is checked before a byte is read, and no more than the limit is read;
- depth: JSON and YAML nesting deeper than :data:`MAX_DEPTH` is refused (checked while composing
  YAML, before any recursion limit is reached; for JSON the parser's own RecursionError is caught);
- YAML: aliases (``*name``) are refused while composing, so nothing can be expanded, and a mapping
  that names a key twice is refused by name (YAML readers differ on which one wins; PyYAML keeps the
  last in silence). With no aliases a document's nodes are bounded by its size, and so its time.

Each reader raises the caller's error class (``error``), so a ``--config`` file gets an OptionError
and a checkpoint's side file a FormatError, with the file named in the first line.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import QConvertError

#: nesting depth a config may use (real ones use 3 or 4)
MAX_DEPTH = 64
#: a run config (``train --config``): real ones are a few KB; PyYAML's pure-Python loader reads
#: this much in well under a second
MAX_RUN_CONFIG_BYTES = 256 * 2**10


def read_limited(path: Path, limit: int, what: str, error: type[QConvertError], shown: str | None = None) -> bytes:
    """The bytes of ``path``, refused before reading when it is over ``limit`` bytes (``shown``: how
    messages name the file)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO blocks until someone writes to it; a device never ends
            raise error(f"{shown or path}: not a regular file (a folder, FIFO or device)", hint=f"give {what} as a file")
        size = st.st_size
        if size > limit:
            raise error(f"{shown or path}: {size} bytes, over the {limit}-byte limit for {what}",
                        hint="a real one is far smaller; check that this is the right file")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{shown or path}: cannot read it ({e.strerror or type(e).__name__})", hint="check the path and its permissions") from None
    if len(raw) > limit:  # grew while read
        raise error(f"{shown or path}: over the {limit}-byte limit for {what}")
    return raw


def decode_utf8(raw: bytes, where: str, error: type[QConvertError]) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                    hint="re-save the file as UTF-8") from None


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON/YAML value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


class _Repeated(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Repeated(k)
        out[k] = v
    return out


def parse_json(text: str, where: str, error: type[QConvertError], *, max_depth: int = MAX_DEPTH, lineno: bool = True,
               hint: str | None = None) -> Any:
    """A JSON value with unique object names and at most ``max_depth`` levels of nesting
    (``lineno``: a syntax error names its line after ``where``; off for one line of a JSONL file,
    which ``where`` names already; ``hint``: how to fix a syntax error, where the caller knows)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique)
    except _Repeated as e:
        raise error(f"{where}: names {e.args[0]!r} twice", hint="readers differ on which one wins; keep one") from None
    except RecursionError:
        raise error(f"{where}: nested too deep (over {max_depth} levels)") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}{f':{e.lineno}' if lineno else ''}: not valid JSON ({e.msg})", hint=hint) from None
    if depth(value) > max_depth:
        raise error(f"{where}: nested too deep (over {max_depth} levels)")
    return value


def parse_yaml(text: str, where: str, error: type[QConvertError], *, max_depth: int = MAX_DEPTH) -> Any:
    """A YAML document through a safe loader that refuses aliases, repeated keys and deep nesting."""
    import yaml

    loader = _bounded_loader_class()(text)
    loader.max_depth = max_depth
    try:
        return loader.get_single_data()
    except _Refused as e:
        line = f":{e.mark.line + 1}" if e.mark is not None else ""
        raise error(f"{where}{line}: {e.args[0]}", hint=e.hint) from None
    except RecursionError:
        raise error(f"{where}: nested too deep (over {max_depth} levels)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise error(f"{where}{f':{mark.line + 1}' if mark else ''}: not valid YAML",
                    detail=" ".join(str(getattr(e, "problem", "") or "").split())[:120] or None) from None
    finally:
        loader.dispose()


class _Refused(Exception):
    def __init__(self, message: str, mark, hint: str | None = None):
        super().__init__(message)
        self.mark, self.hint = mark, hint


_LOADER = None


def _bounded_loader_class():
    """PyYAML's pure-Python SafeLoader with the three refusals of the module docstring (the C loader
    composes whole documents in C, with no hook per node)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class BoundedLoader(yaml.SafeLoader):
            max_depth = MAX_DEPTH
            _depth = 0

            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    event = self.peek_event()
                    raise _Refused(f"uses the alias *{event.anchor}, which qconvert does not expand", event.start_mark,
                                   hint="write the value out where it is used")
                self._depth += 1
                try:
                    if self._depth > self.max_depth:
                        raise _Refused(f"nested too deep (over {self.max_depth} levels)", self.peek_event().start_mark)
                    return super().compose_node(parent, index)
                finally:
                    self._depth -= 1

            def construct_mapping(self, node, deep=False):
                _no_repeated_key(self, node)
                return super().construct_mapping(node, deep=deep)

        _LOADER = BoundedLoader
    return _LOADER


def _no_repeated_key(loader, node) -> None:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:
            continue  # an unhashable key: SafeConstructor refuses it itself
        if repeated:
            raise _Refused(f"gives the key {key!r} twice", key_node.start_mark, hint="YAML readers differ on which one wins; keep one")


def read_json(path: Path, what: str, error: type[QConvertError], *, limit: int, max_depth: int = MAX_DEPTH,
              shown: str | None = None) -> Any:
    """A JSON file within ``limit`` bytes and ``max_depth`` levels, names unique."""
    where = shown or str(path)
    text = decode_utf8(read_limited(Path(path), limit, what, error, shown), where, error)
    return parse_json(text, where, error, max_depth=max_depth)


def read_yaml(path: Path, what: str, error: type[QConvertError], *, limit: int, max_depth: int = MAX_DEPTH,
              shown: str | None = None) -> Any:
    """A YAML file within ``limit`` bytes and ``max_depth`` levels; no aliases, no repeated keys."""
    where = shown or str(path)
    text = decode_utf8(read_limited(Path(path), limit, what, error, shown), where, error)
    return parse_yaml(text, where, error, max_depth=max_depth)


def seconds_setting(name: str, default: float, error: type[QConvertError]) -> float:
    """The environment variable ``name`` as a positive number of seconds (``default`` when unset or
    empty); nan, inf, 0 or less (no deadline at all, or one already past) and non-numbers are ``error``."""
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise error(f"{name}={raw!r} is not a number of seconds", hint=f"a positive number, or unset it for {default:g}")
    return value
