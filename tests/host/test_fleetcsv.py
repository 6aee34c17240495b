"""fleetcsv: seed 002's mass-registration CSV, parsed, validated and written back."""

from __future__ import annotations

import io
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microcot import identity
from microcot_host import fleetcsv
from microcot_host.fleetcsv import FleetRow, Problem


def iccid(payload: str = "894920000012345678") -> str:
    return payload + identity.luhn_check_digit(payload)


ICCID1 = iccid("894920000012345678")
ICCID2 = iccid("894920000012345679")
ICCID3 = iccid("8949200000123456790")  # 20 digits
BAD_LUHN = ICCID1[:-1] + str((int(ICCID1[-1]) + 1) % 10)
HEADER = "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL"
PASSWORD = "Secret-123x"


def csv_text(*rows: str, header: str = HEADER, end: str = "\n") -> str:
    return end.join((header, *rows)) + end


def only(result: fleetcsv.FleetCsv) -> Problem:
    assert len(result.problems) == 1, result.messages()
    return result.problems[0]


def test_the_seed_example_parses() -> None:
    r = fleetcsv.parse(csv_text(f"dev-1;{PASSWORD};mqtt;Kessel 1;{ICCID1};1",
                                f"dev-2;{PASSWORD};mqtt;Kessel 2;{ICCID2};0"))
    assert r.ok and r.separator == ";" and r.header_ok
    assert [(x.line, x.id, x.name, x.iccid, x.shell_enabled) for x in r.rows] == [
        (2, "dev-1", "Kessel 1", ICCID1, True), (3, "dev-2", "Kessel 2", ICCID2, False)]
    assert r.rows[0].credentials == PASSWORD
    assert PASSWORD not in repr(r.rows[0])
    assert r.valid_rows() == r.rows


@pytest.mark.parametrize("sep", [";", ",", "\t"])
def test_separators_are_detected_from_the_header(sep: str) -> None:
    text = csv_text(sep.join(["d1", PASSWORD, "mqtt", "N", ICCID1, "1"]), header=sep.join(
        fleetcsv.COLUMNS))
    r = fleetcsv.parse(text)
    assert r.ok, r.messages()
    assert r.separator == sep and r.rows[0].iccid == ICCID1


def test_header_case_and_order_and_extra_columns() -> None:
    text = csv_text(f"{ICCID1};1;Name;d1;mqtt;{PASSWORD};x/y",
                    header="iccid;Shell;name;Id;TYPE;credentials;PATH")
    r = fleetcsv.parse(text)
    assert r.ok, r.messages()
    row = r.rows[0]
    assert (row.id, row.credentials, row.iccid, row.shell, row.extra) == (
        "d1", PASSWORD, ICCID1, "1", (("PATH", "x/y"),))


def test_bom_crlf_blank_and_trailing_lines_and_quotes() -> None:
    text = ("\ufeff" + HEADER + "\r\n"
            f"\"d;1\";\"pa\"\"ss;word9\";mqtt;\"Kessel; Halle 2\";{ICCID1};1\r\n"
            "\r\n"
            f"d2;{PASSWORD};mqtt;N2;{ICCID2};0\r\n\r\n\r\n")
    r = fleetcsv.parse(text)
    assert r.ok, r.messages()
    assert [x.line for x in r.rows] == [2, 4]
    assert r.rows[0].id == "d;1" and r.rows[0].credentials == 'pa"ss;word9'
    assert r.rows[0].name == "Kessel; Halle 2"


def test_bytes_in_and_not_utf8() -> None:
    assert fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID1};1").encode()).ok
    p = only(fleetcsv.parse(b"ID;CREDENTIALS\n\xff\xfe;x\n"))
    assert p.code == "encoding" and "UTF-8" in p.message


def test_a_quoted_value_over_two_lines_is_reported_where_its_row_starts() -> None:
    r = fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;\"two\nlines\";{ICCID1};1",
                                f"d1;{PASSWORD};mqtt;N;{ICCID2};1"))
    assert [x.line for x in r.rows] == [2, 4]
    msgs = r.messages()
    assert "line 2, column NAME: contains a control character" in msgs[0]
    assert msgs[1] == "line 4, column ID: duplicate ID 'd1', first on line 2"


@pytest.mark.parametrize("text, needle", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    ("hello world\n", "no header"),
    ("ID|CREDENTIALS|TYPE|NAME|ICCID|SHELL\nx|y\n", "unknown separator '|'"),
    ("ID;CREDENTIALS;TYPE\n", "missing columns NAME, ICCID, SHELL"),
    ("ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL;ID\n", "column ID appears twice"),
])
def test_unusable_headers(text: str, needle: str) -> None:
    r = fleetcsv.parse(text)
    assert not r.header_ok and not r.rows
    assert any(needle in m for m in r.messages()), r.messages()
    assert all(m.startswith("line 1") for m in r.messages())


def test_missing_and_extra_values() -> None:
    r = fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID1}",
                                f"d2;{PASSWORD};mqtt;N;{ICCID2};1;surplus"))
    assert r.messages() == [
        "line 2, column SHELL: missing value (the row has 5 of 6 columns)",
        "line 3, column 7: 7 values but the header has 6 columns (an unquoted separator?)"]
    assert r.problems[0].position == 6
    assert r.valid_rows() == []


@pytest.mark.parametrize("row, column, needle, code", [
    (f"d1;{PASSWORD};MQTT;N;{ICCID1};1", "TYPE", "must be 'mqtt'", "invalid"),
    (f"d1;{PASSWORD};nbiot;N;{ICCID1};1", "TYPE", "got 'nbiot'", "invalid"),
    (f"d1;{PASSWORD};;N;{ICCID1};1", "TYPE", "it is empty", "empty"),
    (f"d1;{PASSWORD};mqtt;N;{ICCID1};2", "SHELL", "must be 0 or 1; got '2'", "invalid"),
    (f"d1;{PASSWORD};mqtt;N;{ICCID1};yes", "SHELL", "got 'yes'", "invalid"),
    (f"d1;{PASSWORD};mqtt;N;{ICCID1};", "SHELL", "it is empty", "empty"),
    (f";{PASSWORD};mqtt;N;{ICCID1};1", "ID", "external device ID is required", "empty"),
    (f"d1;{PASSWORD};mqtt;;{ICCID1};1", "NAME", "display name is required", "empty"),
    (f"d1;;mqtt;N;{ICCID1};1", "CREDENTIALS", "password is required", "empty"),
    ("d1;Ab1!xyz;mqtt;N;" + ICCID1 + ";1", "CREDENTIALS", "too short: 7 characters, at least 8",
     "short-credentials"),
    (f"d1; {PASSWORD};mqtt;N;{ICCID1};1", "CREDENTIALS", "white space", "invalid"),
    (f"d1;{PASSWORD};mqtt;N;;1", "ICCID", "registration name", "empty"),
    (f"d1;{PASSWORD};mqtt;N;{BAD_LUHN};1", "ICCID",
     f"the last digit is {BAD_LUHN[-1]} but the check digit of {ICCID1[:-1]} is {ICCID1[-1]}",
     "iccid"),
    (f"d1;{PASSWORD};mqtt;N;89492000001234;1", "ICCID", "has 14", "iccid"),
    (f"d1;{PASSWORD};mqtt;N;8949x000001234567;1", "ICCID", "found 'x'", "iccid"),
    (f"d1;{PASSWORD};mqtt;N;aabbccddeeff;1", "ICCID", "upper case, as the device uses it: "
     "AABBCCDDEEFF", "iccid"),
    (f"d1;{PASSWORD};mqtt;N;000000000000;1", "ICCID", "not a device MAC", "iccid"),
])
def test_row_problems(row: str, column: str, needle: str, code: str) -> None:
    p = only(fleetcsv.parse(csv_text(row)))
    assert (p.line, p.column, p.code) == (2, column, code)
    assert p.position == fleetcsv.COLUMNS.index(column) + 1
    assert needle in p.message
    assert str(p).startswith(f"line 2, column {column}: ")


def test_a_mac_is_a_registration_name() -> None:
    assert fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;AABBCC001122;0")).ok
    assert fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;001122334455;0")).ok
    assert fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID3};0")).ok


def test_duplicates_name_the_earlier_line() -> None:
    r = fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID1};1",
                                f"d2;{PASSWORD};mqtt;N;{ICCID2};1",
                                f"d2;{PASSWORD};mqtt;N;{ICCID1};1"))
    assert r.messages() == ["line 4, column ID: duplicate ID 'd2', first on line 3",
                            f"line 4, column ICCID: duplicate ICCID {ICCID1}, first on line 2"]
    assert [x.line for x in r.valid_rows()] == [2, 3]


@pytest.mark.parametrize("password, needle", [
    ("aaaaaaaaaa", "one character repeated"),
    ("abcdefgh12", "2 of 4 character classes"),
    ("ALLUPPERlower", "2 of 4"),
])
def test_weak_credentials_only_when_asked(password: str, needle: str) -> None:
    text = csv_text(f"d1;{password};mqtt;N;{ICCID1};1")
    assert fleetcsv.parse(text).ok
    r = fleetcsv.parse(text, check_weak=True)
    p = only(r)
    assert p.code == "weak-credentials" and needle in p.message and p.column == "CREDENTIALS"
    assert r.valid_rows() == r.rows  # weak is advice; valid_rows ignores it by default
    assert r.valid_rows(ignore=()) == []


def test_credentials_equal_to_the_id_are_weak() -> None:
    r = fleetcsv.parse(csv_text(f"Dev-1234x;Dev-1234x;mqtt;N;{ICCID1};1"), check_weak=True)
    assert "equal to the device's ID" in only(r).message


def test_messages_never_show_credentials() -> None:
    secrets = ["Tiny1!", " Leading-Space9", "Ctl\x01Char-12", "aaaaaaaaaaaa"]
    rows = [f"d{i};\"{s}\";mqtt;N;{iccid('89492000001234567' + str(i))};1"
            for i, s in enumerate(secrets)]
    r = fleetcsv.parse(csv_text(*rows), check_weak=True)
    assert len(r.problems) == len(secrets)
    text = "\n".join(r.messages())
    for s in secrets:
        assert s.strip() not in text


def test_describe_formats() -> None:
    assert fleetcsv.describe(Problem(3, "TYPE", "bad")) == "line 3, column TYPE: bad"
    assert fleetcsv.describe(Problem(3, None, "bad", position=7)) == "line 3, column 7: bad"
    assert fleetcsv.describe(Problem(0, None, "bad")) == "file: bad"
    assert fleetcsv.messages([Problem(1, None, "x")]) == ["line 1: x"]


def test_write_to_a_path_is_owner_only_and_atomic(tmp_path: os.PathLike[str]) -> None:
    rows = fleetcsv.parse(csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID1};1")).rows
    path = os.path.join(tmp_path, "fleet.csv")
    with open(path, "w") as f:
        f.write("old")
    os.chmod(path, 0o644)
    fleetcsv.write(rows, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, newline="") as f:
        assert f.read() == csv_text(f"d1;{PASSWORD};mqtt;N;{ICCID1};1")
    assert os.listdir(tmp_path) == ["fleet.csv"]  # no temporary file left


def test_write_to_a_file_object_with_a_separator() -> None:
    rows = [FleetRow(2, "a,b", "x\"y,z12345", "mqtt", "N", ICCID1, "0", (("PATH", "g"),))]
    buf = io.StringIO()
    fleetcsv.write(rows, buf, separator=",")
    assert buf.getvalue() == ("ID,CREDENTIALS,TYPE,NAME,ICCID,SHELL,PATH\n"
                              f"\"a,b\",\"x\"\"y,z12345\",mqtt,N,{ICCID1},0,g\n")
    with pytest.raises(ValueError, match="separator"):
        fleetcsv.dumps(rows, separator="|")


# -- properties -------------------------------------------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff"),
                min_size=1, max_size=20)
_STRIPPED = _TEXT.filter(lambda s: s == s.strip())
_SAFE_CHARS = st.characters(min_codepoint=33, max_codepoint=0x24F,
                            blacklist_categories=("Cs", "Cc", "Zs"))
_PASSWORD = st.text(_SAFE_CHARS, min_size=8, max_size=24)
_ICCID = st.text(st.sampled_from("0123456789"), min_size=18, max_size=19).map(
    lambda p: p + identity.luhn_check_digit(p))


@st.composite
def _valid_rows(draw: st.DrawFn) -> list[FleetRow]:
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(st.text(_SAFE_CHARS, min_size=1, max_size=12), min_size=n, max_size=n,
                        unique=True))
    iccids = draw(st.lists(_ICCID, min_size=n, max_size=n, unique=True))
    return [FleetRow(0, ids[i], draw(_PASSWORD), "mqtt",
                     draw(st.text(_SAFE_CHARS | st.just(" "), min_size=1).filter(
                         lambda s: s == s.strip())),
                     iccids[i], draw(st.sampled_from("01"))) for i in range(n)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_valid_rows(), sep=st.sampled_from(fleetcsv.SEPARATORS))
def test_valid_rows_round_trip_without_problems(rows: list[FleetRow], sep: str) -> None:
    r = fleetcsv.parse(fleetcsv.dumps(rows, sep))
    assert r.ok, r.messages()
    assert r.separator == sep
    key = [(x.id, x.credentials, x.type, x.name, x.iccid, x.shell) for x in rows]
    assert [(x.id, x.credentials, x.type, x.name, x.iccid, x.shell) for x in r.rows] == key


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(_STRIPPED, _TEXT.filter(lambda s: s.strip()), _STRIPPED,
                                 _STRIPPED, _STRIPPED, _STRIPPED), min_size=1, max_size=5),
       sep=st.sampled_from(fleetcsv.SEPARATORS))
def test_any_values_round_trip(values: list[tuple[str, ...]], sep: str) -> None:
    """Whatever is written (separators, quotes, line breaks in values) reads back unchanged;
    validation may complain, but never raises."""
    rows = [FleetRow(0, *v) for v in values]
    r = fleetcsv.parse(fleetcsv.dumps(rows, sep), check_weak=True)
    assert r.header_ok
    assert [(x.id, x.credentials, x.type, x.name, x.iccid, x.shell) for x in r.rows] == values


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_garbage_never_raises(text: str | bytes) -> None:
    r = fleetcsv.parse(text, check_weak=True)
    for m in r.messages():
        assert m.startswith(("line ", "file"))
