"""SmartREST 1.0 request values on the platform side: type checks, time, template filling.

What each parameter type accepts as text (the rules the platform applies before it substitutes
the value; DESIGN.md "SmartREST (decisions)" names the types, the grammar is ours where Cumulocity
documents none, chosen so that a value that passes cannot break the JSON a template builds):

    STRING    any text, also empty
    UNSIGNED  ASCII digits, at most 2**63 - 1 (the platform parses integers as Java longs)
    INTEGER   an optional `-` and ASCII digits, within -2**63 .. 2**63 - 1
    NUMBER    a JSON number (`-12`, `3.5`, `1e-3`; not `+1`, `.5`, `1.`, `NaN`), finite
    DATE      ISO 8601 extended date and time, `YYYY-MM-DDThh:mm[:ss[.fff...]]` with an optional
              `Z` or `±hh[:mm]` offset (seed 002 uses `2017-09-14T12:37:00.000` and
              `2011-09-06T12:03:27.845+02:00`); it must be a real calendar time
    NOW       takes no value: the platform puts in the current time

Values are substituted as raw text (DESIGN.md), so a STRING holding a `"` does break a JSON
template; the REST API then refuses the body and the device gets `50,<line>,400,Bad Request`, as
on the platform, whose SmartREST proxy forwards the body to its REST API.

Binary SmartREST values become the same text: DATE (Unix seconds) the ISO 8601 UTC time with
milliseconds, NUMBER (binary32) its shortest decimal that reads back as the same binary32 (what
Java's Float.toString gives), the integers their decimal digits.

Why filling lives here and not in firmware/microcot/templates.py: only the platform fills request
templates, and a `Request.fill` there (about 20 lines) pushed the import of templates.py from
source over the device tests' 100 KB heap budget (measured with the unix port: the module's compile
peak is already about 85 KB).
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime

from microcot import binrest
from microcot.templates import Request

_LONG = 2**63
_UNSIGNED = re.compile(r"[0-9]+\Z")
_INTEGER = re.compile(r"-?[0-9]+\Z")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_DATE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?\Z"
)
_SHOWN = 40  # characters of a refused value quoted back in a 45 message


def iso_time(seconds: float) -> str:
    """UTC ISO 8601 with milliseconds and `Z`, the shape Cumulocity itself writes."""
    dt = datetime.fromtimestamp(seconds, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def check(ptype: str, text: str) -> str | None:
    """None when text is a valid value of ptype, else why not (for the 45 message)."""
    ok = True
    if ptype == "STRING":
        return None
    if ptype == "UNSIGNED":
        ok = bool(_UNSIGNED.match(text)) and int(text) < _LONG
    elif ptype == "INTEGER":
        ok = bool(_INTEGER.match(text)) and -_LONG <= int(text) < _LONG
    elif ptype == "NUMBER":
        # the regex bounds the text before float() sees it; 1e999 is valid JSON but no number
        ok = bool(_NUMBER.match(text)) and float(text) - float(text) == 0
    elif ptype == "DATE":
        ok = bool(_DATE.match(text))
        if ok:
            try:
                datetime.fromisoformat(text)
            except ValueError:
                ok = False
    else:  # NOW never reaches here: it has no value
        return "unknown type '%s'" % ptype
    return None if ok else "expected type '%s' but got '%s'" % (ptype, _shown(text))


def complete(req: Request, values: list[str], now: str) -> tuple[list[str], str | None]:
    """The device's values (NOW ones left out) -> one value per parameter, NOW filled in, or an
    error message for 45. Positions count the values the device sends, from 1, as in binary
    SmartREST, whose messages carry no NOW values either."""
    wanted = len(req.params) - req.params.count("NOW")
    if len(values) != wanted:
        return [], "template %d takes %d value%s but got %d" % (
            req.tid,
            wanted,
            "" if wanted == 1 else "s",
            len(values),
        )
    full: list[str] = []
    pos = 0
    for t in req.params:
        if t == "NOW":
            full.append(now)
            continue
        v = values[pos]
        pos += 1
        why = check(t, v)
        if why:
            return [], "parameter at position '%d': %s" % (pos, why)
        full.append(v)
    return full, None


def fill(req: Request, values: list[str]) -> tuple[str, str, str | None]:
    """(method, target, body or None) of the REST call: each occurrence of the placeholder takes
    the next value as raw text, the URI's first, then the template's. Built from the original
    text, so a value that holds the placeholder is not substituted again."""
    ph = req.placeholder
    n = (req.uri.count(ph) + req.template.count(ph)) if ph else 0
    if n != len(values):
        raise ValueError("template %d: %d values for %d placeholders" % (req.tid, len(values), n))
    k = 0
    out = []
    for text in (req.uri, req.template):
        parts = text.split(ph) if ph else [text]
        filled = [parts[0]]
        for seg in parts[1:]:
            filled += (values[k], seg)
            k += 1
        out.append("".join(filled))
    return req.method, out[0], out[1] or None


def _f32_text(v: float) -> str:
    want = struct.pack(">f", v)
    for digits in range(1, 10):
        s = "%.*g" % (digits, v)
        if struct.pack(">f", float(s)) == want:
            break
    # %g writes 1e+20 and 1e-05, both valid JSON numbers; only a bare integer needs nothing
    return s


def binary_text(types: list[str], values: list) -> list[str]:
    """Decoded binary values -> the text values of an equivalent SmartREST row."""
    out = []
    for t, v in zip(types, values, strict=True):
        if t == binrest.DATE:
            out.append(iso_time(v))
        elif t == binrest.NUMBER:
            out.append(_f32_text(v))
        else:
            out.append(str(v))
    return out
