"""The package layers: no import circle, and no arrow from a lower layer to a higher one.

Read from the source with `ast` (every import counts: module level, inside functions, under
TYPE_CHECKING). `from pkg import name` is an arrow to `pkg.name` when that is a module, else to `pkg`.
A package's `__init__` may import from its own subtree (it re-exports); every other arrow must point to
the same layer or a lower one. Every module must belong to a layer of `LAYERS`.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modiff", "analysis")

# Lowest first. A module belongs to the layer of its longest matching prefix; "=name" matches exactly.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("utils", ("modiff._version", "modiff.utils")),
    ("datasets", ("modiff.datasets",)),
    ("diffusion", ("modiff.diffusion",)),
    ("models", ("modiff.models",)),
    ("quant", ("modiff.quant",)),
    ("ptq", ("modiff.quant.ptq",)),
    ("record", ("modiff.record",)),
    ("metrics", ("modiff.metrics",)),
    ("pipelines", ("modiff.pipelines",)),
    ("cli", ("modiff.cli", "=modiff.__main__")),
    ("api", ("=modiff",)),
    ("analysis", ("analysis",)),
)

Graph = Mapping[str, set[str]]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            yield f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports."""
    files = {p: _module_name(p, root) for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files.values())
    graph: dict[str, set[str]] = {}
    for path, module in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module, path.name == "__init__.py", modules):
                if target.split(".")[0] in PACKAGES:
                    assert target in modules, f"{module} imports {target}, which is not a module of {PACKAGES}"
                    targets.add(target)
        graph[module] = targets - {module}
    return graph


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            name = prefix.lstrip("=")
            if module == name or (not exact and module.startswith(name + ".")):
                if len(name) > best:
                    best, rank = len(name), i
    if rank < 0:
        raise ValueError(f"module {module} belongs to no layer; add it to LAYERS in tests/test_layers.py")
    return rank


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_arrows(graph: Graph, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS,
                  packages: frozenset[str] = frozenset()) -> list[str]:
    """Arrows to a higher layer, except a package `__init__` (in `packages`) importing its own subtree."""
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if source in packages and target.startswith(source + "."):
                continue
            if layer_of(target, layers) > layer_of(source, layers):
                bad.append(f"{source} ({layers[layer_of(source, layers)][0]}) -> "
                           f"{target} ({layers[layer_of(target, layers)][0]})")
    return bad


def _packages(root: Path = ROOT) -> frozenset[str]:
    return frozenset(_module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("__init__.py"))


def test_no_import_circle() -> None:
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_arrow_to_a_higher_layer() -> None:
    bad = upward_arrows(import_graph(), packages=_packages())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_the_checks_fail_on_a_bad_graph() -> None:
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high",)))
    graph = {"pkg.low.a": {"pkg.low.b"}, "pkg.low.b": {"pkg.low.c"}, "pkg.low.c": {"pkg.low.a", "pkg.high.x"},
             "pkg.high.x": {"pkg.low.a"}}
    assert cycles(graph) == [["pkg.high.x", "pkg.low.a", "pkg.low.b", "pkg.low.c"]]
    assert upward_arrows(graph, layers) == ["pkg.low.c (low) -> pkg.high.x (high)"]
    assert upward_arrows({"pkg.low": {"pkg.low.a"}, "pkg.low.a": {"pkg.high.x"}}, layers,
                         packages=frozenset({"pkg.low"})) == ["pkg.low.a (low) -> pkg.high.x (high)"]
    with pytest.raises(ValueError, match="belongs to no layer"):
        layer_of("pkg.other", layers)


def test_the_graph_reads_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "modiff"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "analysis").mkdir()
    (pkg / "__init__.py").write_text("from modiff.sub import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from modiff.sub.a import g\n")
    assert import_graph(tmp_path) == {"modiff": {"modiff.sub.a"}, "modiff.sub": set(),
                                      "modiff.sub.a": {"modiff.sub.b"}, "modiff.sub.b": {"modiff.sub.a"}}
    assert cycles(import_graph(tmp_path)) == [["modiff.sub.a", "modiff.sub.b"]]
