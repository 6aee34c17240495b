"""The mass-registration CSV of seed 002: parse, validate and write it.

Seed 002 ("Massenregistrierung von Geräten", MQTT devices) prescribes the header
`ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL`:

| column      | meaning (seed 002)                                   | checked here                      |
| ----------- | ---------------------------------------------------- | --------------------------------- |
| ID          | the external device ID                               | present, no control characters    |
| CREDENTIALS | the password the device connects with                | at least 8 characters, see below  |
| TYPE        | "mqtt" for MQTT devices                              | exactly `mqtt`                    |
| NAME        | the display name in device management                | present                           |
| ICCID       | the registration name: the device's MQTT user        | ICCID (19-20 digits, Luhn) or MAC |
| SHELL       | 1: operations are sent to the device, 0: they are not| `0` or `1`                        |

Used by the emulator's bulk registration and by `microcot provision csv validate`, so it depends on
nothing of the emulator, only on `microcot.identity` for the ICCID rules the firmware applies to
itself: a row the device could never match (wrong check digit, lower-case MAC) is an error here,
not a device that silently fails to connect in the field.

Decisions where the seed is silent:
- Separators `;`, `,` and tab are accepted as by Cumulocity's bulk registration; the separator is
  the one that splits the header line into known column names. Header names are case-insensitive,
  columns may come in any order, unknown columns are kept in `FleetRow.extra` (Cumulocity treats
  them as custom properties).
- TYPE must be exactly `mqtt` (the seed quotes it in lower case and names no other spelling).
- ICCID holds an ICCID, or for a device without a SIM its MAC as 12 upper-case hex digits, since
  that is the ID such a device uses for its user and topics (seed 002, "MQTT Topics"; identity.py).
  Twelve characters that are all hex digits count as a MAC even when they are all decimal digits.
- CREDENTIALS need at least 8 characters (Cumulocity's password policy; its own bulk example uses
  8), no control characters and no leading or trailing white space (almost always a CSV slip, and
  the value is never shown back to say so). "Weak" credentials (fewer than three of lower case,
  upper case, digits and other characters, one repeated character, or equal to the row's ID or
  ICCID) are reported only with `check_weak=True`, as code `weak-credentials`.
- A byte order mark, CRLF line ends, blank lines and quoted fields (`"a;b"`, `""` for a quote) are
  accepted; values other than CREDENTIALS are stripped of surrounding white space.
- Messages never contain a credential.
- Validation is linear in the input, as the emulator runs it on any body it is sent: a duplicate
  ID or ICCID names the first line only; a row shorter than the header gets a problem per missing
  seed column and one for its missing extra columns together (it names the first and counts the
  rest), and its `extra` holds only the extra values it has.

Line numbers are 1-based over physical lines (the header is line 1); a quoted value spanning lines
is reported at the line where its row starts.
"""

from __future__ import annotations

import csv
import io
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from microcot import identity

from .files import write_private

COLUMNS = ("ID", "CREDENTIALS", "TYPE", "NAME", "ICCID", "SHELL")
SEPARATORS = (";", ",", "\t")
MIN_CREDENTIALS = 8
DEVICE_TYPE = "mqtt"
_SUSPECT_SEPARATORS = "|:#/ "
_SEP_NAMES = {";": "';'", ",": "','", "\t": "tab"}


@dataclass(frozen=True)
class Problem:
    """What is wrong, and where: `line` 1-based (0: the file as a whole), `column` a header name
    when there is one, `position` the 1-based column position when known."""

    line: int
    column: str | None
    message: str
    position: int | None = None
    code: str = "invalid"

    def __str__(self) -> str:
        return describe(self)


@dataclass(frozen=True)
class FleetRow:
    """One data row, as written (stripped); `line` is where the row starts."""

    line: int
    id: str
    credentials: str = field(repr=False)
    type: str
    name: str
    iccid: str
    shell: str
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def shell_enabled(self) -> bool:
        return self.shell == "1"


@dataclass
class FleetCsv:
    rows: list[FleetRow]
    problems: list[Problem]
    separator: str | None
    header: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def header_ok(self) -> bool:
        """False when the file as a whole is unusable (not text, no header, unknown separator, a
        missing column): then no row was read at all."""
        return not any(p.code in ("header", "encoding") for p in self.problems)

    def problems_at(self, line: int) -> list[Problem]:
        return [p for p in self.problems if p.line == line]

    def valid_rows(self, ignore: Iterable[str] = ("weak-credentials",)) -> list[FleetRow]:
        """Rows without problems, problems whose code is in `ignore` not counting."""
        skip = set(ignore)
        bad = {p.line for p in self.problems if p.code not in skip}
        return [r for r in self.rows if r.line not in bad]

    def messages(self) -> list[str]:
        return [describe(p) for p in self.problems]


def describe(p: Problem) -> str:
    """`line 3, column TYPE: ...`, the form the CLI prints."""
    where = "file" if p.line <= 0 else f"line {p.line}"
    if p.column:
        where += f", column {p.column}"
    elif p.position:
        where += f", column {p.position}"
    return f"{where}: {p.message}"


def messages(problems: Iterable[Problem]) -> list[str]:
    return [describe(p) for p in problems]


# -- parsing ----------------------------------------------------------------------------------

def parse(text: str | bytes, check_weak: bool = False) -> FleetCsv:
    """Parse and validate a mass-registration CSV; never raises for bad content."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            return FleetCsv([], [Problem(0, None, f"not UTF-8 text (byte {exc.start}): save the "
                                                  "file as UTF-8", code="encoding")], None)
    if text.startswith("\ufeff"):
        text = text[1:]
    problems: list[Problem] = []
    header_line, header_text = _first_nonblank(text)
    if header_text is None:
        return FleetCsv([], [Problem(1, None, "empty file: expected the header "
                                              + ";".join(COLUMNS), code="header")], None)
    sep, why = _detect_separator(header_text)
    if sep is None:
        return FleetCsv([], [Problem(header_line, None, why, code="header")], None)

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quotechar='"',
                        strict=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for rec in reader:
            if rec and any(v.strip() for v in rec):
                records.append((start, rec))
            start = reader.line_num + 1
    except csv.Error as exc:
        problems.append(Problem(start, None, f"unreadable CSV ({exc}); check the quotes",
                                code="syntax"))
    if not records:
        return FleetCsv([], problems or [Problem(1, None, "no header", code="header")], sep)

    hline, raw_header = records[0]
    header = [h.strip().upper() for h in raw_header]
    index: dict[str, int] = {}
    for pos, name in enumerate(header, 1):
        if not name:
            problems.append(Problem(hline, None, "empty column name in the header",
                                    position=pos, code="header"))
        elif name in index:
            problems.append(Problem(hline, name, f"column {name} appears twice (positions "
                                                 f"{index[name] + 1} and {pos})",
                                    position=pos, code="header"))
        else:
            index[name] = pos - 1
    missing = [c for c in COLUMNS if c not in index]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        problems.append(Problem(hline, None, f"missing column{plural} {', '.join(missing)}; "
                                             f"expected {sep.join(COLUMNS)!r}", code="header"))
    if any(p.line == hline for p in problems):
        return FleetCsv([], problems, sep, header)

    parsed = [_row(line, rec, header, index, problems) for line, rec in records[1:]]
    rows = [row for row, _ in parsed]
    _check_rows(parsed, problems, check_weak)
    problems.sort(key=lambda p: (p.line, p.position or 0))
    return FleetCsv(rows, problems, sep, header)


def _first_nonblank(text: str) -> tuple[int, str | None]:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            return n, line
    return 1, None


def _detect_separator(header: str) -> tuple[str | None, str]:
    best: tuple[int, str] | None = None
    for sep in SEPARATORS:
        names = {h.strip().strip('"').upper() for h in header.split(sep)}
        known = len(names & set(COLUMNS))
        if known >= 2 and (best is None or known > best[0]):
            best = (known, sep)
    if best:
        return best[1], ""
    upper = header.upper()
    if "ID" in upper and "CREDENTIALS" in upper:
        odd = sorted({c for c in header if c in _SUSPECT_SEPARATORS})
        if odd:
            shown = ", ".join(repr(c) for c in odd)
            return None, (f"unknown separator {shown}: use ';' (or ',' or tab) between "
                          f"{';'.join(COLUMNS)}")
    return None, f"no header: the first line must be {';'.join(COLUMNS)} (';', ',' or tab)"


def _row(line: int, rec: list[str], header: list[str], index: dict[str, int],
         problems: list[Problem]) -> tuple[FleetRow, frozenset[str]]:
    """The row, and the seed's columns it has no value for (already reported).

    A row costs what it holds plus the seed's six columns, never the header's width: a short
    row under a header of thousands of extra columns gets one problem for all of them, and its
    `extra` holds only the values it has."""
    width = len(header)
    if len(rec) > width:
        problems.append(Problem(line, None, f"{len(rec)} values but the header has "
                                            f"{width} columns (an unquoted separator?)",
                                position=width + 1, code="columns"))
    values: dict[str, str] = {}
    missing: set[str] = set()
    for name in COLUMNS:
        i = index[name]
        if i >= len(rec):
            problems.append(Problem(line, name, f"missing value (the row has {len(rec)} of "
                                                f"{width} columns)", position=i + 1,
                                    code="columns"))
            values[name] = ""
            missing.add(name)
        else:
            values[name] = rec[i] if name == "CREDENTIALS" else rec[i].strip()
    seed_at = {index[c] for c in COLUMNS}
    extra = tuple((header[i], rec[i].strip()) for i in range(min(len(rec), width))
                  if i not in seed_at)
    _report_missing_extra(line, rec, header, seed_at, problems)
    row = FleetRow(line, values["ID"], values["CREDENTIALS"], values["TYPE"], values["NAME"],
                   values["ICCID"], values["SHELL"], extra)
    return row, frozenset(missing)


def _report_missing_extra(line: int, rec: list[str], header: list[str], seed_at: set[int],
                          problems: list[Problem]) -> None:
    # one problem for the first missing extra column, however many follow it; the seed's
    # columns are at most six, so finding the first extra one past the row's end is bounded
    first = next((i for i in range(len(rec), len(header)) if i not in seed_at), None)
    if first is None:
        return
    after = len(header) - first - 1 - sum(1 for i in seed_at if i > first)
    more = f", and the {after} column{'s' if after != 1 else ''} after it" if after else ""
    problems.append(Problem(line, header[first], f"missing value{more} (the row has "
                                                 f"{len(rec)} of {len(header)} columns)",
                            position=first + 1, code="columns"))


def _check_rows(rows: list[tuple[FleetRow, frozenset[str]]], problems: list[Problem],
                check_weak: bool) -> None:
    """Each row's values, in one pass: duplicates are found through the first line of each ID
    and ICCID, so a file of rows sharing one ICCID costs as much as any other file."""
    pos = {c: i + 1 for i, c in enumerate(COLUMNS)}
    seen_id: dict[str, int] = {}
    seen_iccid: dict[str, int] = {}

    def add(row: FleetRow, col: str, msg: str, code: str = "invalid") -> None:
        problems.append(Problem(row.line, col, msg, position=pos.get(col), code=code))

    for r, missing in rows:
        # ID
        if not r.id:
            if "ID" not in missing:
                add(r, "ID", "empty: the external device ID is required", "empty")
        elif _has_control(r.id):
            add(r, "ID", "contains a control character")
        elif r.id in seen_id:
            add(r, "ID", f"duplicate ID {r.id!r}, first on line {seen_id[r.id]}", "duplicate")
        else:
            seen_id[r.id] = r.line
        # CREDENTIALS: never quote the value in a message
        c = r.credentials
        if not c:
            if "CREDENTIALS" not in missing:
                add(r, "CREDENTIALS", "empty: the device's password is required", "empty")
        elif len(c) < MIN_CREDENTIALS:
            n = f"{len(c)} character" + ("" if len(c) == 1 else "s")
            add(r, "CREDENTIALS", f"too short: {n}, at least {MIN_CREDENTIALS} are required",
                "short-credentials")
        elif _has_control(c):
            add(r, "CREDENTIALS", "contains a control character")
        elif c != c.strip():
            add(r, "CREDENTIALS", "leading or trailing white space (a CSV slip?)")
        elif check_weak:
            weak = _weakness(c, r)
            if weak:
                add(r, "CREDENTIALS", f"weak: {weak}", "weak-credentials")
        # TYPE
        if r.type != DEVICE_TYPE and "TYPE" not in missing:
            got = f"got {r.type!r}" if r.type else "it is empty"
            add(r, "TYPE", f"must be {DEVICE_TYPE!r} for MQTT devices (seed 002); {got}",
                "empty" if not r.type else "invalid")
        # NAME
        if not r.name and "NAME" not in missing:
            add(r, "NAME", "empty: the display name is required", "empty")
        elif _has_control(r.name):
            add(r, "NAME", "contains a control character (a line break inside quotes?)")
        # ICCID
        if not r.iccid:
            if "ICCID" not in missing:
                add(r, "ICCID", "empty: the registration name (ICCID, or the MAC of a device "
                                "without SIM) is required", "empty")
        else:
            err = iccid_problem(r.iccid)
            if err:
                add(r, "ICCID", err, "iccid")
            elif r.iccid in seen_iccid:
                add(r, "ICCID", f"duplicate ICCID {r.iccid}, first on line "
                                f"{seen_iccid[r.iccid]}", "duplicate")
            else:
                seen_iccid[r.iccid] = r.line
        # SHELL
        if r.shell not in ("0", "1") and "SHELL" not in missing:
            got = f"got {r.shell!r}" if r.shell else "it is empty"
            add(r, "SHELL", f"must be 0 or 1; {got}", "empty" if not r.shell else "invalid")


def iccid_problem(value: str) -> str | None:
    """Why `value` cannot be a registration name, or None: an ICCID as the firmware reads it
    (identity.normalize_iccid), or a MAC as 12 upper-case hex digits (identity.mac_id)."""
    if len(value) == 12 and all(c in "0123456789abcdefABCDEF" for c in value):
        if value != value.upper():
            return (f"a MAC must be upper case, as the device uses it: {value.upper()}")
        if value in ("000000000000", "FFFFFFFFFFFF"):
            return "not a device MAC address"
        return None
    if not all("0" <= c <= "9" for c in value):
        bad = next(c for c in value if not "0" <= c <= "9")
        return (f"not an ICCID (decimal digits only; found {bad!r}) nor a MAC "
                "(12 hex digits)")
    if not 19 <= len(value) <= 20:
        return f"an ICCID has 19 or 20 digits, this one has {len(value)}"
    if not identity.luhn_ok(value):
        expected = identity.luhn_check_digit(value[:-1])
        return (f"Luhn check failed: the last digit is {value[-1]} but the check digit of "
                f"{value[:-1]} is {expected}")
    return None


def _has_control(s: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in s)


def _weakness(c: str, row: FleetRow) -> str | None:
    if len(set(c)) == 1:
        return "one character repeated"
    if c in (row.id, row.iccid):
        return "equal to the device's ID or ICCID"
    classes = sum((any(ch.islower() for ch in c), any(ch.isupper() for ch in c),
                   any(ch.isdigit() for ch in c), any(not ch.isalnum() for ch in c)))
    if classes < 3:
        return (f"{classes} of 4 character classes (lower case, upper case, digits, others); "
                "use at least 3")
    return None


# -- writing ----------------------------------------------------------------------------------

def dumps(rows: Iterable[FleetRow], separator: str = ";") -> str:
    """The CSV text for `rows`: the seed's header, then extra columns in first-seen order."""
    if separator not in SEPARATORS:
        raise ValueError(f"separator must be one of ';', ',' or tab, got {separator!r}")
    rows = list(rows)
    # a dict keeps first-seen order and looks a name up in constant time
    extra = list(dict.fromkeys(name for r in rows for name, _ in r.extra))
    lines = [_line(list(COLUMNS) + extra, separator)]
    for r in rows:
        ex = dict(r.extra)
        lines.append(_line([r.id, r.credentials, r.type, r.name, r.iccid, r.shell]
                           + [ex.get(n, "") for n in extra], separator))
    return "".join(lines)


def _line(values: list[str], sep: str) -> str:
    # by hand: the csv module leaves a lone CR unquoted when the line end is LF, and reading
    # would take it for a line end; leading or trailing blanks are quoted to show they are meant
    out = []
    for v in values:
        if any(c in v for c in (sep, '"', "\r", "\n")) or v != v.strip():
            v = '"' + v.replace('"', '""') + '"'
        out.append(v)
    return sep.join(out) + "\n"


def write(rows: Iterable[FleetRow], path_or_file: str | os.PathLike[str] | IO[str],
          separator: str = ";") -> None:
    """Write the CSV; a path is written atomically and readable by its owner only (it holds
    passwords)."""
    text = dumps(rows, separator)
    if hasattr(path_or_file, "write"):
        path_or_file.write(text)  # type: ignore[union-attr]
        return
    path = Path(path_or_file)  # type: ignore[arg-type]
    write_private(path, text)
