"""JSON in and out of the emulator's REST API, with the limits hostile input needs.

In (`loads`, `check`): what the platform cannot store faithfully is refused with `Refused`, which
Api answers 422 (Cumulocity's validationError) instead of failing later with a 500:
- nesting deeper than MAX_DEPTH (64) levels (deeper still would be a RecursionError in the
  parser);
- NaN, Infinity, -Infinity, and numbers that overflow to them (1e999): JSON has no such values,
  and a stored one made every later listing invalid JSON;
- integers outside SQLite's signed 64 bits (an id there is an OverflowError in the database; a
  string of 5000 digits is a ValueError in Python's int());
- strings with lone surrogates (`"\\ud800"`): not UTF-8, so SQLite and the answer could not
  encode them.
`check` applies the same to a body given as Python objects (internal callers).

Out (`dumps`): strict JSON. A value stored before these limits existed (an old database may hold
a NaN, or a lone surrogate) is written as null (and escaped), with a warning, instead of an
invalid document or an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

MAX_DEPTH = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_INT_CHARS = 20  # "-9223372036854775808"
_SURROGATE = re.compile("[\ud800-\udfff]")


class Refused(ValueError):
    """JSON the platform will not store; the message says what and where it is."""


def _constant(name: str) -> Any:
    raise Refused(f"{name} is not a JSON number; the platform stores finite numbers only")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise Refused(f"the number {text[:40]} is out of range (finite numbers only)")
    return v


def _int(text: str) -> int:
    if len(text) > _MAX_INT_CHARS:
        raise Refused(f"the integer {text[:24]}... is out of range (at most 64 bits)")
    v = int(text)
    if not INT64_MIN <= v <= INT64_MAX:
        raise Refused(f"the integer {text} is out of range (at most 64 bits)")
    return v


def loads(text: str) -> Any:
    """Parse `text` (json.JSONDecodeError for bad syntax, Refused for the limits above)."""
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise Refused(f"the JSON nests deeper than {MAX_DEPTH} levels") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Refused if `value` breaks a limit of the module docstring."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            if depth > MAX_DEPTH:
                raise Refused(f"the JSON nests deeper than {MAX_DEPTH} levels")
            for k, item in v.items():
                _check_str(k)
                stack.append((item, depth + 1))
        elif isinstance(v, list):
            if depth > MAX_DEPTH:
                raise Refused(f"the JSON nests deeper than {MAX_DEPTH} levels")
            stack += [(item, depth + 1) for item in v]
        elif isinstance(v, str):
            _check_str(v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise Refused(f"{v} is not a JSON number; the platform stores finite numbers "
                              "only")
        elif isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
            raise Refused("an integer is out of range (at most 64 bits)")


def _check_str(s: object) -> None:
    if isinstance(s, str) and not s.isascii() and _SURROGATE.search(s):
        raise Refused("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                      "text")


def dumps(value: Any) -> bytes:
    """UTF-8 JSON of `value`; never raises for values read back from the database."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        log.warning("a stored value is not finite (an old database?): answered as null")
        text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)
    # a lone surrogate can only be inside a string, where "\udxxx" is its JSON escape
    return text.encode("utf-8", "backslashreplace")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
