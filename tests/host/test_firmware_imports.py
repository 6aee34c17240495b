"""The firmware package has no import circle (DESIGN.md "The agent (decisions)"): every module's
imports, including those inside functions, parsed with ast; the orchestrator (agent.py) imports
the phases, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "firmware" / "microcot"
PHASES = ("session", "bootstrap", "create", "link")
# circles outside the agent, known and to be removed by their modules' owners (each side imports
# the other inside a function): identity.detect -> atmodem.AtModem, AtModem.iccid ->
# identity.normalize_iccid. Any other circle fails.
KNOWN: list[list[str]] = []


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    g: dict[str, set[str]] = {}
    for p in sorted(PKG.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and node.module
                                       and node.module.split(".")[0] == "microcot"):
                    base = node.module.split(".")[-1] if node.module and node.module != "microcot" \
                        else None
                    if base is not None and base in mods:
                        deps.add(base)
                    elif base is None:  # from . import a, b / from microcot import a
                        deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "microcot" and len(parts) > 1 and parts[1] in mods:
                        deps.add(parts[1])
        deps.discard(p.stem)
        g[p.stem] = deps
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected part of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_firmware_has_no_import_circle() -> None:
    g = graph()
    assert "agent" in g and g["agent"] >= {"session", "bootstrap", "create", "link", "state"}
    found = [c for c in cycles(g) if c not in KNOWN]
    assert not found, "import circles in firmware/microcot: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(g[m] & set(c))}" for m in c) + ")"
        for c in found)


def test_phases_never_import_the_orchestrator() -> None:
    g = graph()
    for m in PHASES + ("state", "ops", "tpl", "outq"):
        assert "agent" not in g[m], f"{m} imports agent"
