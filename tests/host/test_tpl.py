"""The agent's template ids (firmware/microcot/tpl.py, the one table every agent module uses)
against firmware/templates.csv: request ids name 10 rows, response ids (R_*) 11 rows, and every
template of the csv is named in the table."""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

FW = Path(__file__).resolve().parents[2] / "firmware"


def table() -> dict[str, int]:
    out = {}
    for node in ast.parse((FW / "microcot" / "tpl.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            v = node.value
            if isinstance(v, ast.Call) and getattr(v.func, "id", "") == "const":
                out[node.targets[0].id] = v.args[0].value
    return out


def rows() -> dict[str, set[int]]:
    got: dict[str, set[int]] = {"10": set(), "11": set()}
    text = (FW / "templates.csv").read_text()
    for r in csv.reader(io.StringIO(text)):
        if r and r[0] in got:
            got[r[0]].add(int(r[1]))
    return got


def test_every_id_in_the_table_is_a_template_of_its_kind() -> None:
    t = table()
    csvrows = rows()
    assert len(t) > 20
    for name, tid in t.items():
        kind = "11" if name.startswith("R_") else "10"
        assert tid in csvrows[kind], f"tpl.{name} = {tid}: no {kind},{tid} row in templates.csv"
    assert len(set(t.values())) == len(t), "an id named twice"


def test_every_template_of_the_csv_is_named_in_the_table() -> None:
    named = {("11" if n.startswith("R_") else "10", v) for n, v in table().items()}
    missing = [f"{k},{tid}" for k, ids in rows().items() for tid in sorted(ids)
               if (k, tid) not in named]
    assert not missing, "templates.csv rows not named in tpl.py: " + ", ".join(missing)


def test_agent_modules_name_no_template_id_of_their_own() -> None:
    """The former per-module consts (_T_..., _R_...) are gone: tpl.py is the one place."""
    for m in ("agent", "session", "bootstrap", "create", "link", "ops", "state"):
        src = (FW / "microcot" / f"{m}.py").read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                n = node.targets[0].id
                assert not (n.startswith("_T_") or n.startswith("_R_")), f"{m}.{n}"
