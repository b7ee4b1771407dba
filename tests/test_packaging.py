"""The package list in pyproject.toml names every package under qconvert/ (an explicit list is kept
because formats/ ships as qconvert._formats; a package missing from it is missing from the wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_wheel_list():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qconvert").rglob("__init__.py")}
    assert found, "no packages found under qconvert/"
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert {n for n in listed if not n.startswith("qconvert._formats")} <= found, "the list names a package that does not exist"
