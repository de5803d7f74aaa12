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
    """Package modules one import statement brings in, with the parent packages Python runs first.
    A parent package that contains ``module`` is not an edge (it is already being imported when
    ``module`` runs; otherwise every ``__init__`` that imports a submodule would be a cycle), but one
    outside it is: ``medivae.losses`` importing ``medivae.models.outputs`` runs ``models/__init__.py``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, module, modules[module].name == "__init__.py")
        # ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from pkg.mod import f`` imports ``pkg.mod``
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return set()
    targets = {m for m in (_owner(n, modules) for n in names) if m is not None}
    return targets | {p for t in targets for p in _parents(t) if p in modules and not _inside(module, p)}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


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


# --- the whole package -------------------------------------------------------------------------------
# Layers, lowest first: data -> models -> losses -> train -> run -> evaluation -> workflows -> api ->
# commands/cli. ``config`` may import ``models`` (lazily, to build a family's config), never the reverse:
# what both check against (image sizes, likelihoods) lives in ``constants``. ``report`` renders files
# and never imports torch, so it reads them only through ``results``, ``errors``, ``io`` and ``version``.
UPWARD = {  # importer layers -> layers they must never import
    ("medivae.evaluation",): ("medivae.api", "medivae.workflows", "medivae.commands", "medivae.cli"),
    ("medivae.run", "medivae.train", "medivae.models", "medivae.data"):
        ("medivae.evaluation", "medivae.workflows", "medivae.api", "medivae.commands", "medivae.cli"),
    ("medivae.workflows",): ("medivae.api", "medivae.commands", "medivae.cli"),
    ("medivae.api",): ("medivae.commands", "medivae.cli"),
    ("medivae.models",): ("medivae.config",),
}
REPORT_MAY_IMPORT = ("medivae.report", "medivae.results", "medivae.errors", "medivae.io", "medivae.version")


def _in(module: str, layers: tuple[str, ...]) -> bool:
    return any(_inside(module, p) for p in layers)


def _package_graph() -> dict[str, set[str]]:
    graph = _import_graph(SRC / "medivae", "medivae")
    # function-level imports count: api reaches workflows only inside its functions
    assert "medivae.workflows.evaluate" in graph["medivae.api"], "the parser missed a function-level import"
    return graph


def test_package_layers_import_one_way():
    graph = _package_graph()
    wrong = sorted(
        f"{m} -> {t}"
        for importers, forbidden in UPWARD.items()
        for m, targets in graph.items() if _in(m, importers)
        for t in targets if _in(t, forbidden)
    )
    assert not wrong, "imports that run back up a layer: " + "; ".join(wrong)


def test_report_and_results_stay_free_of_torch_layers():
    graph = _package_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _in(m, ("medivae.report",))
                   for t in targets if not _in(t, REPORT_MAY_IMPORT))
    assert not wrong, "report imports beyond results/errors/io/version: " + "; ".join(wrong)
    assert graph["medivae.results"] <= {"medivae.errors", "medivae.io"}


def test_package_imports_are_acyclic():
    cycle = _find_cycle(_package_graph())
    assert cycle is None, "import cycle in medivae: " + " -> ".join(cycle or [])
