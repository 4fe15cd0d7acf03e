"""The package layers, checked on the source: no import circle between modules, and no module
imports a layer above its own (README, "Layout").

    pipeline  <  retrieval, rerank  <  serving  <  analysis  <  scripts

`retrieval` and `rerank` are siblings: neither imports the other (the candidates file is their
only contract). Imports inside functions count too: hiding an import in a function is how a circle
or an upward import usually creeps in. Within `rerank`, the stages go one way as well:
prompting, model < inference < training < evaluation < the run-level modules at rerank's top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "retrieval", "rerank", "serving", "analysis")
# package -> the packages it may import (besides itself)
ALLOWED = {
    "pipeline": set(),
    "retrieval": {"pipeline"},
    "rerank": {"pipeline"},
    "serving": {"pipeline", "rerank"},
    "analysis": {"pipeline", "retrieval", "rerank", "serving"},
}
# rerank's stages, lowest first; a module may import its own stage or a lower one. Modules at
# rerank's top (run.py, load_run.py, export.py, ...) sit above every stage.
RERANK_STAGES = ("prompting", "model", "inference", "training", "evaluation")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, at any depth of its code. `from a.b import c` counts as
    a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    names = set(modules)
    return {m: imports_of(p, names) - {m} for m, p in modules.items()}


def rerank_level(module: str) -> int:
    """0.. for rerank's stages (by RERANK_STAGES), len(RERANK_STAGES) for rerank's top modules."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in RERANK_STAGES:
        return RERANK_STAGES.index(parts[1])
    return len(RERANK_STAGES)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        pkg = mod.split(".")[0]
        for target in targets:
            tpkg = target.split(".")[0]
            if tpkg != pkg and tpkg not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {target} ({pkg} may import only {sorted(ALLOWED[pkg]) or 'nothing of ours'})")
            elif pkg == tpkg == "rerank" and target != "rerank" and rerank_level(target) > rerank_level(mod):
                bad.append(f"{mod} imports {target}, a later rerank stage")
    return sorted(bad)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(graph()) == []


def test_no_upward_import():
    assert upward_imports(graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    edges = {"pipeline.a": {"rerank.b"}, "rerank.b": {"pipeline.a"}, "rerank.inference.x": {"rerank.training.y"}, "rerank.training.y": set()}
    assert circles(edges) == [["pipeline.a", "rerank.b"]]
    assert upward_imports(edges) == [
        "pipeline.a imports rerank.b (pipeline may import only nothing of ours)",
        "rerank.inference.x imports rerank.training.y, a later rerank stage",
    ]


@pytest.mark.parametrize("package", ["rerank"])
def test_no_long_module(package):
    """rerank's modules stay under ~400 lines: a longer one is several concerns joined."""
    long = {m: n for m, p in project_modules().items() if m.startswith(package) and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
