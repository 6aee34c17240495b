"""SmartREST 1.0 request values on the platform side: type checks, time, template filling.

What each parameter type accepts as text (the rules the platform applies before it substitutes
the value; DESIGN.md "SmartREST (decisions)" names the types, the grammar is ours where Cumulocity
documents none):

    STRING    any text, also empty
    UNSIGNED  ASCII digits, at most 2**63 - 1 (the platform parses integers as Java longs)
    INTEGER   an optional `-` and ASCII digits, within -2**63 .. 2**63 - 1
    NUMBER    a JSON number (`-12`, `3.5`, `1e-3`; not `+1`, `.5`, `1.`, `NaN`), finite, at most
              64 characters; without a fraction or exponent within the range of INTEGER
    DATE      ISO 8601 extended date and time, `YYYY-MM-DDThh:mm[:ss[.fff...]]` with an optional
              `Z` or `±hh[:mm]` offset (seed 002 uses `2017-09-14T12:37:00.000` and
              `2011-09-06T12:03:27.845+02:00`); it must be a real calendar time
    NOW       takes no value: the platform puts in the current time

Digits are counted before any is converted (CPython refuses to convert over 4300 digits).

How values are substituted (`fill`)
-----------------------------------
A value never changes the structure of the request it is put into:
- in the URI it is percent-encoded whole (`quote(value, safe="")`), so it stays inside its path
  segment or query value (`1/childDevices` or `x?y` cannot choose another resource;
  engine_access.py relies on it);
- in a JSON body (content type empty or naming JSON) each placeholder's place is read from the
  template (`holes`): inside a JSON string a value is JSON-escaped as `json.dumps` would, unless
  it already is valid JSON string text, which is kept as it is: devices escape their own values
  (our firmware's `state.js`, written when substitution was raw text, as DESIGN.md said), and
  such text cannot end the string. So `n","owner":"admin` is a name holding those characters,
  while the firmware's `say \\"hi\\"` still reads `say "hi"`. A STRING (or DATE) outside a JSON
  string must be JSON itself: one JSON value where a value goes (`"x":%%`), a comma-separated
  run of values inside a list (`[%%]`, how the firmware sends its supported operations); else
  the row is refused with 45. NaN, Infinity and integers beyond the Java long range are refused
  there too. The numeric types are already JSON numbers and go in as they are;
- any other body (an attachment as text/plain) takes the values as raw text.

Binary SmartREST values become the same text: DATE (Unix seconds) the ISO 8601 UTC time with
milliseconds, NUMBER (binary32) its shortest decimal that reads back as the same binary32 (what
Java's Float.toString gives), the integers their decimal digits.

Why filling lives here and not in firmware/microcot/templates.py: only the platform fills request
templates, and a `Request.fill` there (about 20 lines) pushed the import of templates.py from
source over the device tests' 100 KB heap budget (measured with the unix port: the module's compile
peak is already about 85 KB).
"""

from __future__ import annotations

import json
import re
import struct
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

from microcot import binrest
from microcot.templates import Request

_LONG = 2**63
_LONG_DIGITS = 19  # 2**63 has 19 digits
MAX_NUMBER = 64  # characters of a NUMBER value: a double needs at most 24
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


def _long(text: str, signed: bool) -> bool:
    if not (_INTEGER if signed else _UNSIGNED).match(text):
        return False
    digits = text.lstrip("-").lstrip("0") or "0"
    if len(digits) > _LONG_DIGITS:  # before int(): 5000 digits are a ValueError in CPython
        return False
    v = -int(digits) if text.startswith("-") else int(digits)
    return -_LONG <= v < _LONG


def _number(text: str) -> bool:
    if len(text) > MAX_NUMBER or not _NUMBER.match(text):
        return False
    if not any(c in text for c in ".eE"):  # an integer in JSON: it must fit a long
        return _long(text, True)
    # 1e999 is valid JSON but no number
    return float(text) - float(text) == 0


def check(ptype: str, text: str) -> str | None:
    """None when text is a valid value of ptype, else why not (for the 45 message)."""
    if ptype == "STRING":
        return None
    if ptype == "UNSIGNED":
        ok = _long(text, False)
    elif ptype == "INTEGER":
        ok = _long(text, True)
    elif ptype == "NUMBER":
        ok = _number(text)
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


class BadValue(ValueError):
    """A value that cannot go where its template puts it (answered with 45)."""


# where a placeholder stands in a JSON body
IN_STRING = "string"  # inside a JSON string
AFTER_ESCAPE = "escape"  # inside a JSON string, right after the template's own backslash
IN_LIST = "list"  # where list elements go
AS_VALUE = "value"  # where one JSON value goes (an object member, the whole body, ...)


@lru_cache(maxsize=256)  # templates are few; each may be up to a body's size
def holes(template: str, placeholder: str) -> tuple[str, ...]:
    """The place of each placeholder in a JSON template, in order (see the module docstring).
    A lenient scan: a template that is no JSON still gets places, and the REST API refuses the
    body it makes."""
    out: list[str] = []
    in_str = esc = False
    stack: list[str] = []
    for i, part in enumerate(template.split(placeholder)):
        if i:
            if in_str:
                out.append(AFTER_ESCAPE if esc else IN_STRING)
                esc = False  # the value's first character takes the template's backslash
            else:
                out.append(IN_LIST if stack and stack[-1] == "[" else AS_VALUE)
        for c in part:
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                stack.append(c)
            elif c in "}]" and stack:
                stack.pop()
    return tuple(out)


def _no_constant(name: str) -> float:
    raise ValueError("%s is no JSON number" % name)


def _json_int(text: str) -> int:
    if not _long(text, True):
        raise ValueError("integer beyond the Java long range")
    return int(text)


def _json_float(text: str) -> float:
    v = float(text)
    if v - v != 0:
        raise ValueError("number out of range")
    return v


def _strict_json(text: str) -> object:
    """json.loads without NaN, Infinity and integers beyond a long; ValueError otherwise."""
    try:
        return json.loads(
            text, parse_constant=_no_constant, parse_int=_json_int, parse_float=_json_float
        )
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise ValueError("nested too deeply") from None


def _string_text(value: str) -> str:
    """value as the inside of a JSON string: kept when it already is valid JSON string text
    (see the module docstring), else escaped."""
    if not any(c in value for c in '"\\') and all(c >= " " for c in value):
        return value
    try:
        kept = json.loads('"%s"' % value)
        kept.encode("utf-8")  # an escaped lone surrogate could not be stored
        return value
    except (ValueError, UnicodeEncodeError):
        return json.dumps(value, ensure_ascii=False)[1:-1]


def _bare(value: str, place: str) -> str | None:
    """None when value is JSON that fits place (IN_LIST or AS_VALUE), else why not."""
    try:
        _strict_json("[%s]" % value if place == IN_LIST else value)
    except ValueError as e:
        what = "JSON list elements" if place == IN_LIST else "one JSON value"
        return "the template takes %s here; got '%s' (%s)" % (what, _shown(value), e)
    return None


def _body_value(ptype: str, value: str, place: str) -> str:
    if place == IN_STRING:
        return _string_text(value)
    if place == AFTER_ESCAPE:  # the template's backslash escapes a backslash of ours instead
        return "\\" + _string_text(value)
    if ptype in ("STRING", "DATE"):
        why = _bare(value, place)
        if why:
            raise BadValue(why)
    return value  # a checked number, or NOW's time


def _is_json(content_type: str) -> bool:
    # api.py reads a body as JSON when its type is empty or names JSON
    return not content_type or "json" in content_type.lower()


def fill(req: Request, values: list[str]) -> tuple[str, str, str | None]:
    """(method, target, body or None) of the REST call: each occurrence of the placeholder takes
    the next value, the URI's first (percent-encoded), then the template's (JSON-escaped as the
    module docstring says). Built from the original text, so a value that holds the placeholder
    is not substituted again. BadValue names the parameter whose value cannot go where it
    would go."""
    ph = req.placeholder
    if not ph:
        if values:
            raise ValueError("template %d: %d values for no placeholder" % (req.tid, len(values)))
        return req.method, req.uri, req.template or None
    uri = req.uri.split(ph)
    body = req.template.split(ph)
    n = len(uri) - 1 + len(body) - 1
    if n != len(values):
        raise ValueError("template %d: %d values for %d placeholders" % (req.tid, len(values), n))
    k = len(uri) - 1
    target = [uri[0]]
    for v, seg in zip(values[:k], uri[1:], strict=True):
        target += (quote(v, safe=""), seg)
    places = holes(req.template, ph) if _is_json(req.content_type) else ()
    text = [body[0]]
    for i, seg in enumerate(body[1:]):
        ptype = req.params[k + i]
        v = values[k + i]
        if places:
            try:
                v = _body_value(ptype, v, places[i])
            except BadValue as e:
                pos = sum(1 for t in req.params[: k + i + 1] if t != "NOW")
                raise BadValue("parameter at position '%d': %s" % (pos, e)) from None
        text += (v, seg)
    return req.method, "".join(target), "".join(text) or None


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
