"""qconvert's import graph, read from the source with ast: no cycle, leaves that stay leaves, layer
contracts over packages only, and no module kept only to re-export another (issue 22).

lint-imports (pyproject ``[tool.importlinter]``) checks the direction of imports between layers; it
allows an import cycle between siblings of one layer and says nothing about modules it is not told
about. These tests close both gaps from the source text alone (no qconvert module is imported).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qconvert"
#: Modules outside every package, below every layer: they may import each other, never the rest.
LEAVES = {"qconvert.errors", "qconvert.names", "qconvert._cpus"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _target(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")[: len(importer.split(".")) - (node.level - (1 if is_package else 0))]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> tuple[set[str], set[str]]:
    """(qconvert modules imported when ``name`` is imported, those imported inside its functions).
    ``from pkg import mod`` counts as an import of pkg.mod; TYPE_CHECKING blocks are not imports."""
    path = MODULES[name]
    top: set[str] = set()
    inner: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            into = inner if in_function else top
            if isinstance(child, ast.Import):
                into.update(a.name for a in child.names if a.name in MODULES)
            elif isinstance(child, ast.ImportFrom):
                mod = _target(child, name, path.name == "__init__.py")
                for a in child.names:
                    if f"{mod}.{a.name}" in MODULES:
                        into.add(f"{mod}.{a.name}")
                    elif mod in MODULES:
                        into.add(mod)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(TREES[name], False)
    return top - {name}, inner - {name}


GRAPH = {name: imports(name) for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_the_package():
    """The reader finds what is plainly there (guards the tests below against an empty graph)."""
    assert {"qconvert.ops", "qconvert.model.loader", "qconvert.cli.main"} <= set(MODULES)
    assert "qconvert.format.layout" in GRAPH["qconvert.ops"][0]
    assert "qconvert.ops.choice" in GRAPH["qconvert.model.loader"][1]  # imported inside load_model


def test_no_import_cycle_at_import_time():
    assert cycles({m: top for m, (top, _) in GRAPH.items()}) == []


def package_of(name: str) -> str:
    """qconvert.ops.cpu.kernels -> qconvert.ops; a leaf module is its own node."""
    return ".".join(name.split(".")[:2])


def test_no_cycle_between_packages_even_through_imports_inside_functions():
    """A lazy import inside a function breaks a cycle at import time, not in the design: between
    packages (qconvert.X, subpackages included) there is none either."""
    edges: dict[str, set[str]] = {}
    for name, (top, inner) in GRAPH.items():
        edges.setdefault(package_of(name), set()).update(package_of(m) for m in top | inner)
    assert cycles({p: targets - {p} for p, targets in edges.items()}) == []


def test_no_cycle_between_modules_even_through_imports_inside_functions():
    """A function-level import of a sibling that imports back hides a cycle from import time only:
    the two modules still need each other. Each shared piece lives in the one module that owns it, so
    no module of qconvert/ reaches itself through any import, wherever in the module it is written."""
    assert cycles({m: top | inner for m, (top, inner) in GRAPH.items()}) == []


def _assigned(module: str, name: str):
    """The literal value of ``name = ...`` at the top of ``module`` (read from the source)."""
    [node] = [n for n in TREES[module].body if isinstance(n, (ast.Assign, ast.AnnAssign))
              and name in [ast.unparse(t) for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]]
    return ast.literal_eval(node.value)


def by_name() -> dict[str, set[str]]:
    """The imports made by a computed name, which the AST graph cannot read: the lazy public API
    (``qconvert.__getattr__`` imports API's modules) and the CLI group loading COMMAND_MODULES."""
    return {"qconvert": {module for module, _ in _assigned("qconvert", "API").values()},
            "qconvert.cli.main": {f"qconvert.cli.{m}" for m in _assigned("qconvert.cli.main", "COMMAND_MODULES")}}


def test_no_import_hides_behind_a_computed_name():
    """``importlib.import_module(name)`` or ``__import__`` inside qconvert/ is an edge the cycle tests
    cannot read from an import statement: only the two places :func:`by_name` names use one. The CLI
    group's edges join the graph, which stays without a cycle. The lazy API's do not: ``qconvert``
    is the parent of every module (Python runs it before any of them, so ``from .. import
    __version__`` adds nothing), and its ``__getattr__`` is the public face over the workflows."""
    users = set()
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"):
                users.add(name)
    hidden = by_name()
    assert users == set(hidden) and all(hidden.values()) and set().union(*hidden.values()) <= set(MODULES)
    edges = {m: top | inner for m, (top, inner) in GRAPH.items()}
    edges["qconvert.cli.main"] |= hidden["qconvert.cli.main"]
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_only_leaves(leaf):
    top, inner = GRAPH[leaf]
    assert (top | inner) <= LEAVES, f"{leaf} imports {sorted((top | inner) - LEAVES)}"


def test_every_loose_module_is_a_leaf():
    """Outside the leaves, every module of qconvert/ lives in a package (``__main__`` runs the CLI)."""
    loose = {m for m, p in MODULES.items() if p.parent == PACKAGE and p.name != "__init__.py"}
    assert loose - LEAVES == {"qconvert.__main__"}


def _contract_names(contract: dict) -> list[str]:
    names = [n for key in ("containers", "source_modules", "forbidden_modules") for n in contract.get(key, [])]
    for layer in contract.get("layers", []):
        names += [f"qconvert.{n.strip()}" for n in layer.replace("|", ":").split(":")]
    return [n for n in names if n.startswith("qconvert")]


def test_layer_contracts_list_packages_only():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    names = [n for c in contracts for n in _contract_names(c)]
    assert names and all((ROOT / n.replace(".", "/") / "__init__.py").is_file() for n in names), names


def _body_without_docstring(tree: ast.Module) -> list[ast.stmt]:
    body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
    return [s for s in body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]


def test_no_module_only_re_exports_another():
    """A module whose whole body is imports (and an ``__all__``) exists only to re-export."""
    shims = []
    for name in MODULES:
        body = _body_without_docstring(TREES[name])
        is_all = lambda s: isinstance(s, ast.Assign) and [ast.unparse(t) for t in s.targets] == ["__all__"]  # noqa: E731
        if body and all(isinstance(s, (ast.Import, ast.ImportFrom)) or is_all(s) for s in body):
            shims.append(name)
    assert shims == []


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


DEFINED = {name: _defined(tree) for name, tree in TREES.items()}


def test_every_name_is_imported_from_the_module_that_defines_it():
    """``from qconvert.x import y`` inside qconvert/ names y's own module, never a module that imported
    it (so no module keeps a name alive for others to import through it)."""
    through = []
    for name, path in MODULES.items():
        for node in ast.walk(TREES[name]):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = _target(node, name, path.name == "__init__.py")
            if mod not in MODULES:
                continue
            through += [f"{name}: {a.name} from {mod}" for a in node.names
                        if a.name not in DEFINED[mod] and f"{mod}.{a.name}" not in MODULES]
    assert through == []
