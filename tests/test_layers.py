"""The module graph of ``service/``: no import cycles, and no import against the layer rules.

Every module under ``service/`` is parsed with ``ast`` (nothing is imported); every ``import`` /
``from ... import`` statement counts, at module level, inside functions and under ``TYPE_CHECKING``
alike, with relative imports resolved. An edge goes to the most specific module the statement
names (``from service.store import artifacts`` -> ``service.store.artifacts``; ``from service.store
import JobStore`` -> ``service.store``); importing a submodule does not add an edge to its parent
packages (their ``__init__`` runs, but a package importing its own submodules is not a cycle).

The layer rules mirror ``docs/architecture.md`` ("Layers and import rules"); change both together.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "service"

# layer -> the layers it may import (besides itself). Lowest first.
LAYER_RULES: dict[str, frozenset[str]] = {
    "compiler": frozenset(),  # pure library: imports nothing of ours
    "domain": frozenset(),  # JobSpec, Job, JobService, the error table: imports nothing of ours
    "settings": frozenset(),  # service/settings.py: configuration read from the environment
    "store": frozenset({"domain", "settings"}),
    "workers": frozenset({"compiler", "domain", "store", "settings"}),
    "api": frozenset({"compiler", "domain", "store", "workers", "settings"}),
    "entry": frozenset({"compiler", "domain", "store", "workers", "api", "settings"}),  # service/cli.py, demo.py
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("cli", "demo"):
        return "entry"
    if parts[1] in LAYER_RULES:
        return parts[1]
    raise ValueError(f"{module}: no layer; add its package to LAYER_RULES and docs/architecture.md")


# service/compiler may import these at module level (the stdlib and its own modules aside); anything
# else (transformers, huggingface_hub, gguf, onnx, onnxruntime, tensorrt, ...) only inside the function
# that needs it. triton comes with torch's CUDA wheels; the Triton kernel modules that import it are
# themselves imported only where a GPU exists.
COMPILER_TOP_LEVEL = frozenset({"torch", "safetensors", "numpy", "triton"})


# ------------------------------------------------------------------ the graph


def discover(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """module name -> file, for every module of the package (generated gRPC stubs aside)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if "grpc_gen" in rel.parts or "__pycache__" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Import:
    """One import statement's target module, where it is and how it runs."""

    def __init__(self, target: str, line: int, top_level: bool, type_checking: bool):
        self.target, self.line, self.top_level, self.type_checking = target, line, top_level, type_checking


def _statements(tree: ast.Module) -> Iterable[tuple[ast.stmt, bool, bool]]:
    """(import statement, at module level, under ``if TYPE_CHECKING``) for every import in the tree."""

    def walk(nodes: list[ast.stmt], top: bool, tc: bool):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, top, tc
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(node.body, False, tc)
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, top, tc)
            elif isinstance(node, ast.If):
                yield from walk(node.body, top, tc or _is_type_checking(node.test))
                yield from walk(node.orelse, top, tc)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from walk(getattr(node, field, []) or [], top, tc)
                if isinstance(node, ast.ExceptHandler):
                    pass
                for case in getattr(node, "cases", []) or []:  # match statements
                    yield from walk(case.body, top, tc)

    yield from walk(tree.body, True, False)


def imports_of(module: str, source: str, is_package: bool, known: Iterable[str]) -> list[Import]:
    """Every import in ``source`` (the text of ``module``), resolved to absolute module names.

    Only names in ``known`` (ours) and top-level third-party/stdlib names are returned: a target of
    ours is the longest known prefix of what the statement names; anything else is its first part."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def ours(name: str) -> str | None:
        while name:
            if name in known:
                return name
            name = name.rpartition(".")[0]
        return None

    def add(name: str, node: ast.stmt, top: bool, tc: bool):
        if ".grpc_gen" in name:  # the generated gRPC stubs are not ours to check (and may not exist yet)
            return
        target = ours(name) if name.split(".")[0] == PACKAGE else name.split(".")[0]
        if target and target != module:
            found.append(Import(target, node.lineno, top, tc))

    for node, top, tc in _statements(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, top, tc)
            continue
        if node.level:
            base = package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module or ""
        for alias in node.names:  # `from pkg import submodule` names the submodule
            sub = f"{base_name}.{alias.name}"
            add(sub if sub in known else base_name, node, top, tc)
    return found


def build_graph(modules: dict[str, Path]) -> dict[str, list[Import]]:
    return {
        name: imports_of(name, path.read_text(), path.name == "__init__.py", modules)
        for name, path in modules.items()
    }


# ------------------------------------------------------------------ the checks


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def runtime_edges(graph: dict[str, list[Import]]) -> dict[str, set[str]]:
    """Edges between our modules that execute (``TYPE_CHECKING`` imports never run, so they cannot
    take part in an import cycle; they still count for the layer rules)."""
    return {m: {i.target for i in imps if i.target in graph and not i.type_checking} for m, imps in graph.items()}


def describe_cycle(component: list[str], edges: dict[str, set[str]], graph: dict[str, list[Import]]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for m in component:
        for imp in graph[m]:
            line = f"    {m}:{imp.line} imports {imp.target}"
            if imp.target in members and imp.target in edges[m] and line not in lines:
                lines.append(line)
    return "\n".join(lines)


def layer_violations(graph: dict[str, list[Import]]) -> list[str]:
    """Imports from a layer to one its row does not list, and imports of a package by its own
    submodules (upward inside a layer: the package's ``__init__`` imports its submodules)."""
    bad: list[str] = []
    for module, imps in sorted(graph.items()):
        mine = layer_of(module)
        for imp in imps:
            if imp.target not in graph:
                continue
            theirs = layer_of(imp.target)
            if theirs != mine and theirs not in LAYER_RULES[mine]:
                line = f"{module}:{imp.line} ({mine}) imports {imp.target} ({theirs})"
            elif module.startswith(imp.target + ".") and imp.target != PACKAGE:
                line = f"{module}:{imp.line} imports its own package {imp.target}"
            else:
                continue
            if line not in bad:
                bad.append(line)
    return bad


def compiler_top_level_violations(graph: dict[str, list[Import]]) -> list[str]:
    bad = []
    for module, imps in sorted(graph.items()):
        if layer_of(module) != "compiler":
            continue
        for imp in imps:
            if not imp.top_level or imp.type_checking or imp.target in graph:
                continue
            if imp.target in sys.stdlib_module_names or imp.target in COMPILER_TOP_LEVEL:
                continue
            bad.append(f"{module}:{imp.line} imports {imp.target} at module level")
    return bad



# ------------------------------------------------------------------ the tests


def _graph():
    return build_graph(discover())


def test_no_import_cycles():
    graph = _graph()
    edges = runtime_edges(graph)
    found = cycles(edges)
    assert not found, "import cycles in service/:\n" + "\n".join(describe_cycle(c, edges, graph) for c in found)


def test_no_import_against_the_layers():
    bad = layer_violations(_graph())
    assert not bad, ("imports against the layer rules (docs/architecture.md, tests/test_layers.py LAYER_RULES):\n"
                     + "\n".join(bad))


def test_compiler_imports_only_torch_safetensors_numpy_at_module_level():
    bad = compiler_top_level_violations(_graph())
    assert not bad, ("service/compiler may import only the stdlib, " + ", ".join(sorted(COMPILER_TOP_LEVEL))
                     + " and its own modules at module level; import the rest where it is used:\n" + "\n".join(bad))


def test_every_module_has_a_layer():
    for module in discover():
        assert layer_of(module) in LAYER_RULES


# ------------------------------------------------------------------ the checker can fail


def _synthetic(tmp_path: Path, files: dict[str, str]) -> dict[str, list[Import]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_graph(discover(tmp_path))


def test_checker_finds_a_two_module_cycle_through_a_function_level_relative_import(tmp_path):
    graph = _synthetic(tmp_path, {
        "service/__init__.py": "",
        "service/workers/__init__.py": "",
        "service/workers/a.py": "from .b import g\n",
        "service/workers/b.py": "def g():\n    from . import a\n    return a\n",
    })
    edges = runtime_edges(graph)
    assert cycles(edges) == [["service.workers.a", "service.workers.b"]]
    text = describe_cycle(["service.workers.a", "service.workers.b"], edges, graph)
    assert "service.workers.b:2 imports service.workers.a" in text


def test_checker_ignores_type_checking_cycles_but_not_their_layers(tmp_path):
    graph = _synthetic(tmp_path, {
        "service/__init__.py": "",
        "service/domain/__init__.py": "",
        "service/domain/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..store.y import Y\n",
        "service/store/__init__.py": "",
        "service/store/y.py": "from service.domain import x\n",
    })
    assert cycles(runtime_edges(graph)) == []
    assert layer_violations(graph) == ["service.domain.x:3 (domain) imports service.store.y (store)"]


def test_checker_flags_a_submodule_importing_its_own_package(tmp_path):
    graph = _synthetic(tmp_path, {
        "service/__init__.py": "",
        "service/compiler/__init__.py": "__version__ = '1'\nfrom .convert import f\n",
        "service/compiler/convert.py": "from . import __version__\ndef f():\n    return __version__\n",
    })
    assert layer_violations(graph) == ["service.compiler.convert:1 imports its own package service.compiler"]
    assert cycles(runtime_edges(graph)) == [["service.compiler", "service.compiler.convert"]]


def test_checker_flags_an_optional_package_at_compiler_module_level(tmp_path):
    graph = _synthetic(tmp_path, {
        "service/__init__.py": "",
        "service/compiler/__init__.py": "import json\nimport torch\nimport transformers\n"
                                        "def f():\n    import onnx\n",
    })
    assert compiler_top_level_violations(graph) == ["service.compiler:3 imports transformers at module level"]


if __name__ == "__main__":  # print the whole picture: python tests/test_layers.py
    g = _graph()
    e = runtime_edges(g)
    for c in cycles(e):
        print("CYCLE", describe_cycle(c, e, g))
    for line in layer_violations(g) + compiler_top_level_violations(g):
        print(line)
