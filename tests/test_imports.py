"""The edgemoe package's import graph, read from the source (no module is imported): no
import cycles among module-level imports, none at all inside edgemoe.quant, and the
layering between packages.

Module-level imports are the ones that run when a module is imported: top-level
statements, including inside module-level `if`/`try`/`with` and class bodies, but not in
functions, and not under `if TYPE_CHECKING:`. Inside edgemoe.quant function-level imports
count too (none may close a cycle there). Layering rules count every import, function
bodies and TYPE_CHECKING blocks included: a lazy import still ties the packages together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgemoe"
PACKAGE = "edgemoe"

# Known cycles, as the edge (importer, imported) to drop to break each one, with why it
# is still here. Empty: the lead removes entries as the cycles are fixed, and
# test_known_cycle_edges_still_exist fails on an entry whose edge is gone.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}

# (importer package, imported package): importers must never import these, anywhere.
FORBIDDEN = [
    ("edgemoe.quant", "edgemoe.cli"),
    ("edgemoe.store", "edgemoe.cli"),
    ("edgemoe.runtime", "edgemoe.cli"),
    ("edgemoe.models", "edgemoe.runtime"),
    ("edgemoe.models", "edgemoe.store"),
    ("edgemoe.models", "edgemoe.quant"),
    ("edgemoe.models", "edgemoe.cli"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], functions: bool, type_checking: bool):
    """Import statements under `body`: those run at import, plus with `functions` those in
    function bodies, plus with `type_checking` those under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if not functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse, functions, type_checking)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                yield from _imports([s for s in sub if isinstance(s, ast.AST)], functions, type_checking)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, modules: dict[str, Path]) -> set[str]:
    """The edgemoe modules an import statement in module `name` loads (its own code, not
    the parent packages every import passes through)."""
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names]
        out = set()
        for base in bases:
            # `import a.b.c` runs a.b.c; the nearest stored module is the target
            while base and base not in modules:
                base = base.rpartition(".")[0]
            if base:
                out.add(base)
        return out
    if node.level:
        pkg = name if is_pkg else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{node.module}" if node.module else pkg
    else:
        base = node.module or ""
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return set()
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in modules else base)  # `from pkg import submodule` loads the submodule
    return {m for m in out if m in modules}


def graph(functions: bool = False, type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the edgemoe modules it imports (see `_imports` for which imports count)."""
    modules = source_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node in _imports(tree.body, functions, type_checking):
            edges[name] |= _targets(node, name, is_pkg, modules) - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path of modules) per strongly connected component with more
    than one module, found with Tarjan's algorithm (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    return [_a_cycle(edges, comp) for comp in comps]


def _a_cycle(edges: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(comp)
    prev = {start: None}
    queue = [start]
    for v in queue:
        for w in sorted(edges[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in component {sorted(comp)}")


def test_no_import_cycles():
    edges = graph()
    for (a, b) in KNOWN_CYCLE_EDGES:
        edges.get(a, set()).discard(b)
    found = cycles(edges)
    assert not found, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in found)


def test_quant_has_no_cycles_even_through_function_level_imports():
    edges = {a: {b for b in bs if b.startswith("edgemoe.quant")} for a, bs in graph(functions=True).items()
             if a.startswith("edgemoe.quant")}
    found = cycles(edges)
    assert not found, "import cycles in edgemoe.quant:\n" + "\n".join(" -> ".join(c) for c in found)


def test_known_cycle_edges_still_exist():
    edges = graph()
    stale = [f"{a} -> {b}" for (a, b) in KNOWN_CYCLE_EDGES if b not in edges.get(a, set())]
    assert not stale, "KNOWN_CYCLE_EDGES entries no longer in the graph (remove them): " + ", ".join(stale)


@pytest.mark.parametrize("importer, imported", FORBIDDEN)
def test_layering(importer, imported):
    def inside(m: str, pkg: str) -> bool:
        return m == pkg or m.startswith(pkg + ".")

    edges = graph(functions=True, type_checking=True)
    bad = sorted(f"{a} -> {b}" for a, targets in edges.items() if inside(a, importer)
                 for b in targets if inside(b, imported))
    assert not bad, f"{importer} must not import {imported}: " + ", ".join(bad)


def test_version_comes_from_its_leaf():
    """`__version__` is imported from edgemoe._version, never from the package itself
    (whose __init__ every deep module would then depend on), and the leaf imports nothing."""
    modules = source_modules()
    assert not graph(functions=True, type_checking=True)["edgemoe._version"]
    bad = []
    for name, path in modules.items():
        if name == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree.body, True, True):
            if isinstance(node, ast.ImportFrom) and any(a.name == "__version__" for a in node.names):
                if _targets(node, name, path.name == "__init__.py", modules) != {"edgemoe._version"}:
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, "import __version__ from edgemoe._version: " + ", ".join(bad)


def test_graph_reader_sees_cycles_and_lazy_imports():
    """The checker itself: a planted cycle is found and reported as a closed path, and
    function-level imports count only for layering."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\nclass C:\n    import z\n")
    assert [n.names[0].name for n in _imports(tree.body, False, False)] == ["os", "z"]
    assert [n.names[0].name for n in _imports(tree.body, True, False)] == ["os", "y", "z"]
    assert [n.names[0].name for n in _imports(tree.body, True, True)] == ["os", "x", "y", "z"]
    # relative imports resolve to modules: `from .formats import X`, `from . import native`
    edges = graph()
    assert "edgemoe.quant.formats" in edges["edgemoe.quant.experts"]
    assert "edgemoe.quant.native" in edges["edgemoe.quant.kernels"]
