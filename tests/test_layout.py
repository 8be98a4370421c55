"""The package's import graph: no cycles; the device side never imports the server side."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edge_runtime"


def import_graph() -> dict[str, set[str]]:
    """{module: edge_runtime modules it imports} (every import, lazy and TYPE_CHECKING too)."""
    mods: dict[str, Path] = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("edge_runtime"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    edges.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("edge_runtime")}
        # a package and its own submodules (re-exports) are one unit, not a cycle
        graph[m] = {t for t in edges if t in mods and t != m
                    and not t.startswith(m + ".") and not m.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_detector_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_device_side_never_imports_the_server_side() -> None:
    g = import_graph()
    for device in ("edge_runtime.fleet.agent", "edge_runtime.rounds.device",
                   "edge_runtime.fleet.outbox"):
        reach = closure(g, device)
        assert not reach & {"edge_runtime.rounds.server", "edge_runtime.fleet.server",
                            "edge_runtime.rounds.build"}, device
    assert "edge_runtime.rounds.device" not in closure(g, "edge_runtime.rounds.server")
