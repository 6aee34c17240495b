"""Response templates (`11,<id>,<base>,<condition>,<value>...`) applied to platform JSON.

Rules (DESIGN.md "SmartREST (decisions)", and Cumulocity's SmartREST 1.0 where it is silent):
- the base selects the object the other paths are relative to; an empty base is `$`;
- a base whose value is a list yields one candidate per element, any other value one candidate;
  a base that matches nothing yields nothing;
- the condition, relative to the candidate, must match something (a JSON null counts: the key
  exists); an empty condition always holds;
- each value path, relative to the candidate, gives one field: a string as it is, a number in
  JSON spelling, true/false, an object or list as compact JSON, and nothing (missing or null) as an
  empty field.

templates.py already refuses what SmartREST forbids (`?` filters, wildcards, slices, paths not
starting with `$`); `invalid(path)` adds what only a real JSONPath parser can tell, and bounds a
path to MAX_PATH characters and MAX_STEPS steps (jsonpath-ng nests one object per step and
recurses through them: a path of thousands of steps would fail deep inside it), so that a
collection is never registered with a path the engine could not evaluate. A value that cannot
be written as text (JSON nested deeper than the interpreter's stack) gives an empty field.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

from jsonpath_ng import JSONPath
from jsonpath_ng import parse as _parse

from microcot.templates import Response

_MISSING = object()
MAX_PATH = 512
MAX_STEPS = 32


@lru_cache(maxsize=4096)
def compiled(path: str) -> JSONPath:
    # jsonpath-ng builds a parser per call (about a millisecond); templates reuse few paths
    return _parse(path or "$")


def invalid(path: str) -> str | None:
    """None when jsonpath-ng can evaluate path, else its complaint."""
    if len(path) > MAX_PATH:
        return "%d characters; at most %d" % (len(path), MAX_PATH)
    # every step starts with a dot or a bracket (a quoted name may hold more: counted too)
    steps = path.count(".") + path.count("[")
    if steps > MAX_STEPS:
        return "%d steps; at most %d" % (steps, MAX_STEPS)
    try:
        compiled(path)
    except Exception as e:  # jsonpath-ng raises JsonPathParserError, and Exception on lexing
        return str(e) or type(e).__name__
    return None


def _first(path: str, doc: Any) -> Any:
    found = compiled(path).find(doc)
    return found[0].value if found else _MISSING


def text(value: Any) -> str:
    """One extracted value as the text of a response field (before CSV quoting)."""
    if value is _MISSING or value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    try:
        if isinstance(value, (dict, list)):
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return str(value)
    except (RecursionError, ValueError):  # too deep, or an int over CPython's 4300 digits
        return ""


def extract(resp: Response, doc: Any) -> list[list[str]]:
    """The value rows (without id and line) that one response template yields for doc."""
    rows = []
    for match in compiled(resp.base).find(doc):
        candidates = match.value if isinstance(match.value, list) else [match.value]
        for c in candidates:
            if resp.condition and not compiled(resp.condition).find(c):
                continue
            rows.append([text(_first(p, c)) for p in resp.values])
    return rows
