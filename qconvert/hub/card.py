"""Model cards: YAML front matter the Hub reads, then a Markdown body."""

from __future__ import annotations

import json
from typing import Any


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def render_card(meta: dict[str, Any], body: str) -> str:
    """README.md text: ``---``-delimited YAML (scalars and lists of scalars) and the body."""
    lines = ["---"]
    for k, v in meta.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}:")
            lines += [f"- {_yaml_scalar(x)}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_scalar(v)}")
    lines.append("---")
    return "\n".join(lines) + "\n\n" + body.strip() + "\n"


def read_card_meta(text: str) -> dict[str, Any]:
    """Parse the front matter written by :func:`render_card` (and simple hand-written ones)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    meta: dict[str, Any] = {}
    key = None
    for line in text[3:end].splitlines():
        if not line.strip():
            continue
        if line.startswith("- ") and key:
            meta.setdefault(key, [])
            meta[key].append(_parse_scalar(line[2:]))
        elif ":" in line and not line.startswith(" "):
            key, _, rest = line.partition(":")
            key = key.strip()
            meta[key] = _parse_scalar(rest.strip()) if rest.strip() else []
    return meta


def _parse_scalar(s: str) -> Any:
    s = s.strip()
    if s.startswith('"'):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return s.strip('"')
    if s in ("true", "false"):
        return s == "true"
    if s == "null":
        return None
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return s
