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
    outside it is: ``medivae.models.losses`` importing ``medivae.models.outputs`` runs ``models/__init__.py``."""
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


# --- the whole package: folders are layers ------------------------------------------------------------
# Lowest first. A module may import its own layer and the ones below it, never one above, so the graph of
# layers has no cycle however the files inside them import each other. ``report`` renders files and never
# imports torch: it reads them through ``runfolder.results``, ``train.metrics`` and three runtime modules.
LAYERS = (
    ("runtime", ("medivae.runtime",)),
    ("data", ("medivae.data",)),
    ("models", ("medivae.models",)),
    ("train", ("medivae.train",)),
    ("runfolder", ("medivae.runfolder",)),
    ("evaluation", ("medivae.evaluation",)),
    ("report", ("medivae.report",)),
    ("workflows", ("medivae.workflows",)),
    ("api", ("medivae.api", "medivae")),  # the package itself is the notebook facade (medivae.load)
    ("cli", ("medivae.commands", "medivae.cli", "medivae.__main__")),
)
REPORT_MAY_IMPORT = ("medivae.report", "medivae.runfolder.results", "medivae.train.metrics",
                     "medivae.runtime.errors", "medivae.runtime.io", "medivae.runtime.version")
TORCH_FREE_PACKAGES = ("medivae.runfolder", "medivae.train", "medivae.runtime")  # their __init__ imports nothing


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the layer that holds ``module`` (the longest matching prefix), or None."""
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix if prefix == "medivae" else _inside(module, prefix)
            if hit and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def _dynamic_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules ``importlib.import_module("medivae.x")`` or ``import_module(f"medivae.commands.{name}")``
    can bring in: every package module under the literal prefix of the argument."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args and getattr(node.func, "attr", getattr(node.func, "id", ""))
                == "import_module"):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            prefix = arg.value
        elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            prefix = str(arg.values[0].value)
        else:
            continue
        found |= {m for m in modules if m.startswith(prefix) and m != prefix.rstrip(".")}
    return found


def _package_graph() -> dict[str, set[str]]:
    graph = _import_graph(SRC / "medivae", "medivae")
    modules = _module_names(SRC / "medivae", "medivae")
    for module, path in modules.items():
        graph[module] |= _dynamic_imports(path, modules) - {module}
    # function-level imports count: api reaches workflows only inside its functions
    assert "medivae.workflows.evaluate" in graph["medivae.api"], "the parser missed a function-level import"
    assert "medivae.commands.train" in graph["medivae.cli"], "the parser missed cli's importlib imports"
    return graph


def folder_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every module without a layer, and every import that runs up a layer."""
    unplaced = [f"{m} has no layer" for m in sorted(graph) if layer_of(m) is None]
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
              for m in sorted(graph) if layer_of(m) is not None
              for t in sorted(graph[m]) if layer_of(t) is not None and layer_of(t) > layer_of(m)]
    return unplaced + upward


def test_the_layer_check_sees_upward_imports_and_unplaced_modules():
    graph = {"medivae.models.a": {"medivae.train.b"}, "medivae.train.b": set(), "medivae.stray": set()}
    assert folder_violations(graph) == ["medivae.stray has no layer",
                                        "medivae.models.a (models) -> medivae.train.b (train)"]


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    wrong = folder_violations(_package_graph())
    assert not wrong, "layer violations: " + "; ".join(wrong)


def test_report_and_results_stay_free_of_torch_layers():
    graph = _package_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _inside(m, "medivae.report")
                   for t in targets
                   if not any(_inside(t, p) for p in REPORT_MAY_IMPORT) and t not in TORCH_FREE_PACKAGES)
    for package in TORCH_FREE_PACKAGES:
        assert not graph[package], f"{package}/__init__.py imports {graph[package]}: the report would pull them in"
    assert not wrong, "report imports beyond results/metrics/errors/io/version: " + "; ".join(wrong)
    assert graph["medivae.runfolder.results"] <= {"medivae.runtime.errors", "medivae.runtime.io", "medivae.runtime"}


def test_package_imports_are_acyclic():
    cycle = _find_cycle(_package_graph())
    assert cycle is None, "import cycle in medivae: " + " -> ".join(cycle or [])
