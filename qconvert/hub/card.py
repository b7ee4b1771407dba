"""Model cards: YAML front matter the Hub reads, then a Markdown body.

Cards are written with every string as a YAML double-quoted scalar (JSON string syntax), and read
with yaml.safe_load, so a hand-written card with single quotes, comments, flow lists or block
scalars reads as the Hub reads it (tests/test_card.py checks both against huggingface_hub's ModelCard).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import FormatError


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


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


#: A card's front matter: a first line ``---``, YAML, and a line ``---`` (as the Hub reads it).
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.DOTALL | re.MULTILINE)


def read_card_meta(text: str, where: str = "model card") -> dict[str, Any]:
    """The YAML front matter of a model card as a dict ({} when the card has none), read with
    yaml.safe_load as the Hub reads it. FormatError when the YAML is broken or not a mapping."""
    import yaml

    m = FRONT_MATTER.match(text)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except (yaml.YAMLError, RecursionError) as e:  # deep nesting exhausts the parser's recursion
        first = (str(e).strip().splitlines() or [""])[0]
        raise FormatError(f"{where}: the YAML front matter does not parse", detail=f"{first} ({type(e).__name__})",
                          hint="fix the YAML between the two --- lines") from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: the YAML front matter must be a mapping, not {type(meta).__name__}",
                          hint="write it as key: value lines")
    return meta
