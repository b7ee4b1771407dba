"""The README stays a front page and its links lead somewhere; the guide lives in docs/.

What CI runs is the README's second command (.ci/run: `bash tools/test.sh`), and a newcomer's first
step is its first command, so both must stay in the README verbatim. mkdocs (`mkdocs build --strict`
in tools/test.sh) checks the links inside docs/; this checks the README's, which mkdocs does not
see, and the docs' links that leave docs/ (mkdocs would refuse them, so they must not exist).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300  # issue 22: a front page of about 250 lines, never over 300
TWO_COMMANDS = ("bash tools/setup.sh && bash tools/demo.sh", "bash tools/test.sh")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(path: Path) -> list[str]:
    """The link targets in a Markdown file that are relative paths (not URLs, not in-page anchors),
    outside fenced code blocks, without their #anchor."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_readme_keeps_the_two_commands_that_ci_and_a_newcomer_run():
    text = README.read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == list(TWO_COMMANDS)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == TWO_COMMANDS[1]  # CI runs the README's second command itself
    for script in ("tools/setup.sh", "tools/demo.sh", "tools/test.sh"):
        assert (ROOT / script).is_file(), script


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file(page):
    targets = relative_links(page)
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name}: links to nothing: {missing}"
    if page.parent == DOCS:  # mkdocs serves docs/ only: a link out of it is broken on the site
        outside = [t for t in targets if not (page.parent / t).resolve().is_relative_to(DOCS)]
        assert not outside, f"{page.name}: links out of docs/: {outside}"


def test_every_docs_page_is_in_the_mkdocs_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))
    assert listed == {p.name for p in DOCS.glob("*.md")}


def test_readme_links_into_every_docs_page():
    linked = {Path(t).name for t in relative_links(README) if t.startswith("docs/")}
    assert linked >= {p.name for p in DOCS.glob("*.md")}
