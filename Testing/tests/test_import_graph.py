"""The import graph of ``MedDiffusionLib/`` has no circle.

Every ``.py`` file is read with :mod:`ast`; every import of a library module counts, at the top of
a file and inside functions and methods alike (a circle through a late import is still a circle:
the two modules cannot be understood, tested or moved apart). Only imports under
``if TYPE_CHECKING:`` are left out, because they never run.

How an import becomes edges of the module graph (nodes are dotted module names; a package is its
``__init__``):

* ``import pkg.a.b`` and ``from pkg.a import b`` where ``pkg/a/b.py`` exists: an edge to ``pkg.a.b``;
  ``from pkg.a import name`` where ``name`` is not a submodule: an edge to ``pkg.a`` (its ``__init__``).
  Relative imports are resolved against the importing module's package.
* Importing ``pkg.a.b`` first runs ``pkg/a/__init__``, so it is also an edge to every enclosing
  package of the target, *except* the packages that enclose the importer too: those have already
  started running when the importer runs (``pkg.a.c`` importing ``pkg.a.b`` does not re-enter
  ``pkg/a/__init__``). Without that exception every package whose ``__init__`` re-exports its
  submodules would be a circle with each submodule that imports a sibling.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

Site = str  # "file.py:line"


def _modules(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package folder ``pkg_dir``."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run (all nesting levels; not under TYPE_CHECKING)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_graph(pkg_dir: Path) -> dict[str, dict[str, list[Site]]]:
    """``{module: {imported module: [sites]}}`` of the package in ``pkg_dir`` (rules: module docstring)."""
    mods = _modules(pkg_dir)
    root = pkg_dir.name
    graph: dict[str, dict[str, list[Site]]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        site = path.relative_to(pkg_dir.parent).as_posix()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        # the longest known module the dotted name names
                        known = [alias.name] + _ancestors(alias.name)[::-1]
                        targets.append(next(k for k in known if k in mods))
            else:
                if node.level:
                    base_parts = package.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{site}:{node.lineno}: relative import beyond the top package")
                    base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                    target = f"{base}.{node.module}" if node.module else base
                elif node.module and (node.module == root or node.module.startswith(root + ".")):
                    target = node.module
                else:
                    continue
                if target not in mods:
                    raise AssertionError(f"{site}:{node.lineno}: imports {target}, which is not a module of {root}")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.append(sub if sub in mods else target)
            for target in targets:
                enclosing = set(_ancestors(mod)) | ({mod} if is_pkg else set())
                for t in [target] + _ancestors(target):
                    if t != mod and t in mods and t not in enclosing:
                        sites = graph[mod].setdefault(t, [])
                        if f"{site}:{node.lineno}" not in sites:
                            sites.append(f"{site}:{node.lineno}")
    return graph


def find_cycles(graph: dict[str, dict[str, list[Site]] | set[str] | list[str]]) -> list[list[str]]:
    """One circle ``[a, b, ..., a]`` per strongly connected component of more than one module
    (Tarjan's algorithm; self-imports are not circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return sorted(w for w in graph.get(v, ()) if w != v)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in comps:  # shortest circle through the component's first module (breadth first)
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in edges(v):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, list[Site]]]) -> str:
    return "\n".join(f"  {a} -> {b}   ({', '.join(graph[a][b])})" for a, b in zip(cycle, cycle[1:]))


def test_library_import_graph_has_no_circle():
    graph = module_graph(ROOT / "MedDiffusionLib")
    assert len(graph) > 30 and any(graph.values())  # the walk really saw the library
    cycles = find_cycles(graph)
    report = "\n\n".join(" -> ".join(c) + "\n" + describe(c, graph) for c in cycles)
    print(report)
    assert not cycles, f"import circle(s) in MedDiffusionLib:\n{report}"


def test_the_checker_finds_circles(tmp_path):
    """The checker fails on a circle made only by a late import (inside a method), through a
    package ``__init__``, and not on imports under TYPE_CHECKING or between siblings of a package."""
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .sub.c import helper\n",
        "sub/__init__.py": "from .c import helper\nfrom .d import other\n",
        "sub/c.py": "from . import d\n\ndef helper():\n    return d\n",
        "sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n\n"
                    "class K:\n    def m(self):\n        import demo.b\n        return demo.b\n\n"
                    "def other():\n    pass\n",
        "b.py": "import os\n\ndef f():\n    from .sub import other\n    return other\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = module_graph(pkg)
    assert set(graph["demo.a"]) == {"demo.sub.c", "demo.sub"}  # importing demo.sub.c runs demo/sub/__init__
    assert "demo.a" not in graph["demo.sub.d"]  # TYPE_CHECKING only
    assert set(graph["demo.sub.c"]) == {"demo.sub.d"}  # a sibling: demo/sub/__init__ is already running
    assert set(graph["demo.b"]) == {"demo.sub"}  # `from .sub import other`: a name of the __init__
    cycles = find_cycles(graph)
    assert cycles == [["demo.b", "demo.sub", "demo.sub.d", "demo.b"]], cycles
    assert "demo/sub/d.py:7" in describe(cycles[0], graph)

    (pkg / "b.py").write_text("import os\n")
    assert find_cycles(module_graph(pkg)) == []
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]
    assert find_cycles({"x": {"x"}}) == []
