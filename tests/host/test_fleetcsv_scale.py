"""fleetcsv's validation is linear in its input: a hostile or careless file (every row sharing one
ICCID, a body of bad rows, a header thousands of columns wide) costs the CLI and the emulator's
bulk registration time in proportion to its size, not to its square.

Linearity is measured without a clock: the number of Python lines fleetcsv executes (a trace
count, deterministic for a given input) for an input and for one twice its size. A linear parser
doubles it; the quadratic one before this test roughly quadrupled it. The 100k-row runs have a
hang guard only (pytest-timeout), no timed assertion.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner

from microcot import identity
from microcot_host import fleetcsv
from microcot_host.cli import main as cli

HEADER = "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n"
# doubling the input may cost up to this factor: a linear parser is near 2 (the constant part
# of a parse shrinks the ratio), a quadratic one near 4
MAX_RATIO = 2.5


def iccid(n: int) -> str:
    payload = f"894900{n:012d}"
    return payload + identity.luhn_check_digit(payload)


def same_iccid(n: int) -> str:
    one = iccid(1)
    return HEADER + "".join(f"dev{i};Pa55word!x{i};mqtt;Dev {i};{one};1\n" for i in range(n))


def valid(n: int) -> str:
    return HEADER + "".join(f"dev{i};Pa55word!x{i};mqtt;Dev {i};{iccid(i)};1\n"
                            for i in range(n))


def short_rows(n: int) -> str:
    """Rows that lack most values: a missing-value problem per column and row."""
    return HEADER + "".join(f"d{i};x;\n" for i in range(n))


def wide_header(n: int) -> str:
    """n extra columns and n rows with one value each: the header's width times the rows is
    quadratic unless a row costs only what it holds."""
    extra = ";".join(f"X{i}" for i in range(n))
    return HEADER.rstrip("\n") + ";" + extra + "\n" + "".join(f"d{i}\n" for i in range(n))


def duplicate_ids(n: int) -> str:
    return HEADER + "".join(f"same;Pa55word!x{i};mqtt;Dev;{iccid(i)};1\n" for i in range(n))


def steps(text: str) -> int:
    """Lines of fleetcsv.py executed by parse(text, check_weak=True)."""
    here = fleetcsv.__file__
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        return local if frame.f_code.co_filename == here else None

    sys.settrace(tracer)
    try:
        fleetcsv.parse(text, check_weak=True)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(("make", "n"), [(same_iccid, 400), (duplicate_ids, 400),
                                         (valid, 400), (short_rows, 400), (wide_header, 200)],
                         ids=["same-iccid", "same-id", "valid", "short-rows", "wide-header"])
def test_validation_steps_grow_linearly(make: Callable[[int], str], n: int) -> None:
    small, big = steps(make(n)), steps(make(2 * n))
    assert big <= MAX_RATIO * small, (small, big)


def test_duplicates_name_the_first_line_only() -> None:
    r = fleetcsv.parse(same_iccid(50))
    dups = [p for p in r.problems if p.code == "duplicate"]
    assert len(dups) == 49 and all(p.column == "ICCID" for p in dups)
    assert {p.message.rsplit(" ", 1)[1] for p in dups} == {"2"}  # "first on line 2"


def test_a_short_row_in_a_wide_file_gets_one_problem_for_its_extra_columns() -> None:
    r = fleetcsv.parse(wide_header(30))
    first = r.problems_at(2)
    assert [p.column for p in first] == ["CREDENTIALS", "TYPE", "NAME", "ICCID", "SHELL", "X0"]
    assert "and the 29 columns after it" in first[-1].message
    assert r.rows[0].extra == ()


@pytest.mark.timeout(60)
def test_cli_validates_100k_rows_sharing_one_iccid(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(same_iccid(100_000))
    res = CliRunner().invoke(cli, ["provision", "csv", "validate", "--json", str(path)])
    assert res.exit_code == 1, res.output
    out = json.loads(res.output)
    assert out["rows"] == 100_000 and len(out["problems"]) == 99_999


@pytest.mark.timeout(60)
def test_100k_valid_rows_and_a_200kb_body_of_bad_rows() -> None:
    assert fleetcsv.parse(valid(100_000)).ok
    body = short_rows(25_000).encode()
    assert len(body) > 200_000
    r = fleetcsv.parse(body)
    assert len(r.rows) == 25_000 and not r.valid_rows()
