"""The package's shape: no import cycles, and imports go down the layers, never back up.

Every import counts, at module level or inside a function (a function-level import dodges a cycle at import time
but keeps the modules tangled). The layers, bottom up: ``errors`` → ``config`` → ``runtime`` (what every stage
shares) → the dataset layer (``data``, ``toyworld``) → the model code several stages use (``models``: the CLIP
loader) → the stages → the orchestrators above them (``sweep``, ``report``, ``experiment``, ``cli``, ``bench``). A
stage may read an earlier stage's tables; the layers below never import a stage.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "discl_ray"

# group -> the groups it may import (besides itself). A group is the first name under discl_ray.
BOTTOM = {"errors": set(), "config": {"errors"}, "runtime": {"errors", "config"}}
SHARED = set(BOTTOM) | {"__init__"}
DATASET = {"data", "toyworld"}
MODELS = {"models"}
STAGES = {"mining", "prompts", "generation", "scoring", "training"}
ABOVE_STAGES = {"sweep", "report", "experiment", "cli", "bench"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (``from a import b`` names a.b when a.b is
    a module, else a)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name.startswith("discl_ray.") and name != mod:
                    graph[mod].add(name)
        graph.setdefault(mod, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def group(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def allowed(src: str) -> set[str]:
    if src in BOTTOM:
        return BOTTOM[src]
    if src in DATASET:
        return SHARED | DATASET
    if src in MODELS:
        return SHARED | DATASET | MODELS
    if src in STAGES:
        return SHARED | DATASET | MODELS | STAGES
    return SHARED | DATASET | MODELS | STAGES | ABOVE_STAGES


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        src = group(mod)
        for t in targets:
            dst = group(t)
            if dst != src and dst not in allowed(src) and dst != "__init__":
                bad.append(f"{mod} -> {t}")
    return sorted(bad)


def test_every_module_belongs_to_a_layer():
    groups = {group(m) for m in import_graph()}
    known = SHARED | DATASET | MODELS | STAGES | ABOVE_STAGES
    assert groups <= known, f"new top-level modules or packages need a layer in this test: {sorted(groups - known)}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles (function-level imports count too):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_go_down_the_layers():
    bad = upward_imports(import_graph())
    assert bad == [], "imports up the layers (stages -> runtime -> config, never back):\n" + "\n".join(bad)


@pytest.mark.parametrize("graph, expect", [
    ({"discl_ray.a.x": {"discl_ray.b.y"}, "discl_ray.b.y": {"discl_ray.a.x"}}, [["discl_ray.a.x", "discl_ray.b.y"]]),
    ({"discl_ray.a.x": {"discl_ray.b.y"}, "discl_ray.b.y": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expect):
    assert cycles(graph) == expect


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"discl_ray.runtime.storage": {"discl_ray.training.loop"}}) == [
        "discl_ray.runtime.storage -> discl_ray.training.loop"]
    assert upward_imports({"discl_ray.config.base": {"discl_ray.runtime.cluster"}}) != []
    assert upward_imports({"discl_ray.training.loop": {"discl_ray.runtime.storage"}}) == []
    assert upward_imports({"discl_ray.models.clip": {"discl_ray.scoring.job"}}) == [
        "discl_ray.models.clip -> discl_ray.scoring.job"]
    assert upward_imports({"discl_ray.generation.store": {"discl_ray.models.clip"}}) == []
