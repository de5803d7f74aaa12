"""Layering: imports inside a package flow one way.

The graph is read from the source with ``ast`` rather than from ``sys.modules``, so an import
inside a function counts as much as one at the top of the module: a lazy import only postpones
a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_names(package_dir: Path, package_name: str) -> dict[str, Path]:
    """Dotted name -> file for every module of the package (``__init__.py`` is the package itself)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package_name, *parts))] = path
    return out


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (``from .x import y`` in ``a.b`` -> ``a.x``)."""
    if node.level == 0:
        return node.module or ""
    anchor = module.split(".")
    if not is_package:  # a plain module's relative imports start from its package
        anchor = anchor[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that defines ``name`` (the longest module prefix of it), if any."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _imported(node: ast.AST, module: str, modules: dict[str, Path]) -> set[str]:
    """Package modules one import statement brings in. Parent packages that Python also imports
    implicitly are not edges: otherwise every ``__init__`` that imports a submodule is a cycle."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, module, modules[module].name == "__init__.py")
        # ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from pkg.mod import f`` imports ``pkg.mod``
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return set()
    return {m for m in (_owner(n, modules) for n in names) if m is not None}


def _import_graph(package_dir: Path, package_name: str) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its source (top level, functions, classes,
    ``if TYPE_CHECKING`` blocks), relative imports resolved; imports from outside the package are left out."""
    modules = _module_names(package_dir, package_name)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set().union(*(_imported(node, module, modules) for node in ast.walk(tree)))
        graph[module] = targets - {module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None if the graph is acyclic (depth-first search; nodes
    visited in sorted order so the reported cycle is the same on every run)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_data_imports_are_acyclic():
    # the helpers themselves must see a cycle, or an empty graph would pass vacuously
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = _import_graph(SRC / "medivae" / "data", "medivae.data")
    assert "medivae.data.readers" in graph["medivae.data.sources"], "the parser found no imports"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle in medivae.data: " + " -> ".join(cycle or [])
