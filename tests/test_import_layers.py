"""The import graph of the first-party packages: no cycles (imports inside functions included), and
each layer imports only the layers below it (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssl_med", "backbones", "objectives")

#: layer -> the modules (and packages) it is made of; the longest matching name wins
LAYERS = {
    "core": ("ssl_med.encoder", "ssl_med.objective", "ssl_med.registry", "ssl_med.layers", "ssl_med.ops",
             "ssl_med.utils", "ssl_med.geometry", "ssl_med.optim", "ssl_med.weights", "ssl_med.build",
             "ssl_med.version", "ssl_med.config", "ssl_med.lifetimes", "ssl_med.train.schedules", "ssl_med.train.ema"),
    "data": ("ssl_med.data",),
    "backbones": ("backbones",),
    "objectives": ("objectives",),
    "evaluators": ("ssl_med.evaluators",),
    "artefacts": ("ssl_med.export", "ssl_med.export_target", "ssl_med.hub", "ssl_med.model_card", "ssl_med.feature_model",
                  "ssl_med.timm_plugin", "ssl_med.timm_entrypoints", "ssl_med.monai_bundle"),
    "train": ("ssl_med.train",),
    "commands": ("ssl_med.cli", "ssl_med.commands", "ssl_med.__main__"),
}
#: layer -> the layers it may import (besides itself)
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "backbones": {"core"},
    "objectives": {"core", "data"},
    "evaluators": {"core", "data", "artefacts"},
    "artefacts": {"core", "data", "backbones"},
    "train": {"core", "data", "evaluators", "artefacts"},
    "commands": {"core", "data", "evaluators", "artefacts", "train"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            parts = file.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def parse(source: str, attempts: int = 3) -> ast.Module:
    """``ast.parse`` that retries CPython 3.11's spurious "AST constructor recursion depth mismatch"
    SystemError (python/cpython#106905: the AST builder's depth counter is shared with other threads,
    e.g. a logger's writer thread compiling on import, and goes wrong under a rare race)."""
    for attempt in range(attempts):
        try:
            return ast.parse(source)
        except SystemError as err:
            if "recursion depth mismatch" not in str(err) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def import_graph() -> dict[str, set[str]]:
    """module -> first-party modules it imports anywhere in its body."""
    graph = {}
    for name, file in MODULES.items():
        deps = set()
        for node in ast.walk(parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps |= {_owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {_owner(f"{node.module}.{a.name}") or _owner(node.module) for a in node.names}
        graph[name] = deps - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    if module == "ssl_med":  # the package facade (ssl_med.load_pretrained, imported lazily)
        return "commands"
    best = max(((p, layer) for layer, ps in LAYERS.items() for p in ps if module == p or module.startswith(p + ".")),
               key=lambda pl: len(pl[0]), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it")
    return best[1]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_import_only_what_they_may(module: str) -> None:
    layer = layer_of(module)
    wrong = sorted(d for d in import_graph_cached()[module] if layer_of(d) not in MAY_IMPORT[layer] | {layer})
    assert not wrong, f"{module} ({layer}) imports {wrong}"


_GRAPH: dict[str, set[str]] = {}


def import_graph_cached() -> dict[str, set[str]]:
    if not _GRAPH:
        _GRAPH.update(import_graph())
    return _GRAPH
