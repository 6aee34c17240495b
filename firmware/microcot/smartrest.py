"""SmartREST 1.0 text: request bodies, CSV quoting and response records.

Request body (published on ms/<ID>):  `15,<X-ID>\\n<TID>,<v1>,<v2>...\\n...`, no trailing newline.
Lines are counted from 1 over every line of the body, the `15,` line included, so the first
template row is line 2 (`15,X\\n600,ICCID` is answered with line number 2). A line here is a CSV
row: a line break inside a quoted value does not start a new one (errors of `request()` use that
numbering; the platform's own count for such rows is undocumented).
X-IDs (`check_xid`): the seed wants letters and digits with at least one letter; all-digit X-IDs
and characters that would break a row or a binary message (`,` `"` whitespace NUL) are refused, others
such as `_` `-` `.` are let through.

CSV rules (both directions): fields are separated by `,`, rows by `\\n` (`\\r\\n` tolerated when
parsing). A field is quoted when it holds `"` `,` `\\n` `\\r` tab or leading/trailing whitespace;
a quote inside is doubled. Quoted fields may hold commas and line breaks. Blank lines are skipped.
Parsing is strict, and every defect is an `Error` (a ValueError) naming the body's 1-based line
and column (in characters, also as `.line` and `.column`; for a defect inside a row `.field`
is its field, from 1): an unterminated quote, text after a
closing quote, a quote or a bare CR inside an unquoted field, a message identifier that is not an
unsigned integer, a line number field that is not one, bytes that are not UTF-8, and the limits:
a row of more than MAX_FIELDS fields, or (parse only, `max_rows`) a body of more than that many
rows. An unsigned integer (message identifier, line number) has at most MAX_DIGITS significant
digits: a longer one is refused by its length before int() sees it (CPython refuses int() over
4300 digits, MicroPython would build a bignum).

Errors (`ERRORS`): parse(), records() and parse_rows() raise `Error` and nothing else, for any
bytes or str. The encoders (quote, row, request, check_xid) raise plain ValueError for values a
caller passed.

Memory: records() yields one Record per row, holding one row's fields at a time (a caller that
keeps only some rows, as the agent does, needs no list of the whole body); parse() and
parse_rows() build the list, so their memory follows the body's size (the caller bounds that,
e.g. the MQTT client's max_packet) and `max_rows`.

Response records, `parse(body)` -> [Record(code, line, values)]. Whether the second field is the
line number of the request line being answered depends on the message identifier:

    20  <template collection MO id>                 no line number
    40  [text]                                      no line number
    41  [<line>,]<message>                          line number optional: taken when field 2 is an
                                                    unsigned integer, else all fields are values
    42, 43, 45  <line>,<message>                    line number
    50  <line>,<HTTP status>,<reason>               line number
    70  <line>,<device id>,<tenant>,<user>,<pass>   line number (bootstrap credentials)
    86  <timeout>,<interval>,<policy>               no line number
    87  <count>,<X-ID>                              no line number: values [count, X-ID]
    any other identifier                            a row of one of the device's response
                                                    templates: field 2 is the line number

The identifiers above are the platform's built-in messages; templates.py refuses template ids that
collide with them, so "any other identifier is a response-template row" is unambiguous. A response
row whose line field is empty gets line None. If the caller passes `response_ids` (the ids of its
response templates), a row whose identifier is neither built-in nor among them is kept with
line None and all of its fields as values, since nothing says what its second field means.
"""

MAX_FIELDS = 256  # fields of one row: a template has far fewer parameters or value paths
MAX_DIGITS = 10  # significant digits of an unsigned integer: template ids go up to 4294967295
MAX_ROWS = 64  # rows parse() takes from one body by default (records() has no such limit)


class Error(ValueError):
    """A defect of a SmartREST body: `.line` and `.column` (1-based, characters), `.field` (the
    1-based field of the row, or None where the defect is not in one) and `.what`."""

    def __init__(self, line, column, what, field=None):
        super().__init__("line %d column %d: %s" % (line, column, what))
        self.line = line
        self.column = column
        self.field = field
        self.what = what


ERRORS = (Error,)

# message id -> does field 2 hold a line number: 1 yes, 0 no, 2 optional
_BUILTIN = {20: 0, 40: 0, 41: 2, 42: 1, 43: 1, 45: 1, 50: 1, 70: 1, 86: 0, 87: 0}
_WS = " \t\n\r\v\f"
_SPECIAL = '",\n\r\t'


class Record:
    """One response row: `code` (int), `line` (int or None) and `values` (list of str)."""

    __slots__ = ("code", "line", "values")

    def __init__(self, code, line, values):
        self.code = code
        self.line = line
        self.values = values

    def __eq__(self, other):
        return (
            isinstance(other, Record)
            and self.code == other.code
            and self.line == other.line
            and self.values == other.values
        )

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "Record(%d, %r, %r)" % (self.code, self.line, self.values)


def _digits(s):
    # int() would also take ' 5', '+5', '5_0' and non-ASCII digits; the wire format has none of them
    return bool(s) and all("0" <= c <= "9" for c in s)


def _uint(s):
    """s as an int when it is ASCII digits with at most MAX_DIGITS significant ones, else None:
    counted before int() sees it, so no input makes a bignum or hits CPython's digit limit."""
    if not _digits(s):
        return None
    i = 0
    n = len(s) - 1
    while i < n and s[i] == "0":
        i += 1
    if n + 1 - i > MAX_DIGITS:
        return None
    return int(s[i:]) if i else int(s)


def quote(value):
    """One CSV field for a SmartREST row: None -> '', bools -> true/false, numbers -> str/repr,
    text quoted when it has to be."""
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value - value != 0:  # inf and nan: no NUMBER the platform could parse
            raise ValueError("cannot send non-finite number %r" % value)
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode()
    elif not isinstance(value, str):
        value = str(value)
    need = False
    for c in _SPECIAL:
        if c in value:
            need = True
            break
    if not need and value and (value[0] in _WS or value[-1] in _WS):
        need = True
    if need:
        return '"' + value.replace('"', '""') + '"'
    return value


def check_xid(xid):
    """Raise ValueError unless xid can name a template collection in a text or binary request."""
    if not isinstance(xid, str) or not xid:
        raise ValueError("X-ID must be a non-empty string, got %r" % (xid,))
    for c in xid:
        if c in _WS or c in ',"\0':
            raise ValueError("X-ID %r holds %r, which a SmartREST row or binary message cannot carry" % (xid, c))
    if _digits(xid):
        raise ValueError("X-ID %r is all digits; it needs at least one letter" % xid)


def row(values):
    """A CSV line (str, no newline) from a list/tuple of values."""
    return ",".join([quote(v) for v in values])


def request(xid, rows):
    """The request body (bytes) `15,<xid>\\n<row>\\n<row>...`; each row a list/tuple whose first
    value is the template id."""
    check_xid(xid)
    out = ["15," + xid]
    line = 1
    for r in rows:
        line += 1
        if not isinstance(r, (list, tuple)) or not r:
            raise ValueError("line %d: a row must be a non-empty list or tuple, got %r" % (line, r))
        tid = r[0]
        if isinstance(tid, bool) or not (
            (isinstance(tid, int) and tid >= 0) or (isinstance(tid, str) and _uint(tid) is not None)
        ):
            raise ValueError("line %d: template id %r is not an unsigned integer" % (line, tid))
        out.append(row(r))
    return "\n".join(out).encode()


_err = Error


def _clip(v):
    # a field quoted in an error message: a hostile one could be 16 KiB long
    return v if len(v) <= 40 else v[:37] + "..."


def _text(body):
    if isinstance(body, str):
        return body
    body = bytes(body)
    try:
        s = body.decode()
    except Exception:  # UnicodeError on both runtimes, named differently
        s = None
    if s is not None and len(s) == len(body):
        return s  # ASCII: nothing to check
    from .utf8 import bad  # only for a body that is not ASCII

    off = bad(body)
    if off < 0:
        return s
    line = body.count(b"\n", 0, off) + 1
    col = off - body.rfind(b"\n", 0, off)
    raise _err(line, col, "byte 0x%02x is not valid UTF-8" % body[off])


def _scan(s, max_fields, max_rows):
    # yields (fields, line, cols) per row: the physical line it starts on and each field's column;
    # Error where a row beyond max_rows (None: no limit) starts
    rows = 0
    n = len(s)
    pos = 0
    line = 1
    ls = 0  # index where the current physical line starts
    nl = -1  # index of the next '\n' at or after pos (n if none), refreshed when passed
    while pos < n:
        c = s[pos]
        if c == "\n":
            pos += 1
            line += 1
            ls = pos
            continue
        if c == "\r" and (pos + 1 == n or s[pos + 1] == "\n"):
            pos += 1
            continue
        if max_rows is not None and rows >= max_rows:
            raise _err(line, 1, "more than %d rows" % max_rows)
        rows += 1
        fields = []
        cols = []
        row_line = line
        while True:
            if len(cols) >= max_fields:
                raise _err(line, pos - ls + 1, "more than %d fields in a row" % max_fields,
                           max_fields + 1)
            cols.append(pos - ls + 1)
            if pos < n and s[pos] == '"':
                qline = line
                qcol = pos - ls + 1
                pos += 1
                seg = pos
                parts = []
                while True:
                    q = s.find('"', pos)
                    if q < 0:
                        raise _err(qline, qcol, "unterminated quoted field", len(cols))
                    k = s.find("\n", pos, q)
                    while k >= 0:
                        line += 1
                        ls = k + 1
                        k = s.find("\n", k + 1, q)
                    if q + 1 < n and s[q + 1] == '"':
                        parts.append(s[seg : q + 1])
                        pos = q + 2
                        seg = pos
                        continue
                    parts.append(s[seg:q])
                    pos = q + 1
                    break
                fields.append("".join(parts) if len(parts) != 1 else parts[0])
                if pos >= n:
                    break
                c = s[pos]
                if c == ",":
                    pos += 1
                    continue
                if c == "\n":
                    pos += 1
                    line += 1
                    ls = pos
                    break
                if c == "\r" and (pos + 1 == n or s[pos + 1] == "\n"):
                    pos += 2
                    line += 1
                    ls = pos
                    break
                raise _err(line, pos - ls + 1, "text after closing quote", len(cols))
            if nl < pos:
                nl = s.find("\n", pos)
                if nl < 0:
                    nl = n
            k = s.find(",", pos, nl)
            end = k if k >= 0 else nl
            f = s[pos:end]
            if k < 0 and f and f[-1] == "\r":
                f = f[:-1]
            q = f.find('"')
            if q >= 0:
                raise _err(line, pos - ls + 1 + q, "quote inside an unquoted field", len(cols))
            q = f.find("\r")
            if q >= 0:
                raise _err(line, pos - ls + 1 + q, "carriage return inside an unquoted field",
                           len(cols))
            fields.append(f)
            if k >= 0:
                pos = k + 1
                continue
            pos = nl + 1
            line += 1
            ls = pos
            break
        yield fields, row_line, cols


def parse_rows(body, max_rows=None, max_fields=MAX_FIELDS):
    """Plain CSV split of a body (bytes or str) -> list of rows, each a list of str; Error for a
    defect, or for more than max_rows rows (None: no limit) or max_fields fields in a row."""
    return [r[0] for r in _scan(_text(body), max_fields, max_rows)]


def parse(body, response_ids=None, max_rows=MAX_ROWS):
    """Response body (bytes or str) -> list of Record, all or nothing; see the module docstring
    for which codes carry a line number. Error for any defect, or for more than max_rows rows
    (None: no limit)."""
    return list(records(body, response_ids, MAX_FIELDS, max_rows))


def records(body, response_ids=None, max_fields=MAX_FIELDS, max_rows=None):
    """The Records of a response body one by one (a generator): Error at the first defect, after
    the rows before it were yielded."""
    for fields, line, cols in _scan(_text(body), max_fields, max_rows):
        code = _uint(fields[0])
        if code is None:
            raise _err(line, cols[0], "message identifier %r is not an unsigned integer of at "
                       "most %d digits" % (_clip(fields[0]), MAX_DIGITS), 1)
        kind = _BUILTIN.get(code)
        if kind is None:
            kind = 1 if response_ids is None or code in response_ids else 0
        if kind == 0:
            yield Record(code, None, fields[1:])
            continue
        if len(fields) < 2:
            if kind == 2:
                yield Record(code, None, [])
                continue
            raise _err(line, cols[0] + len(fields[0]), "message %d lacks its line number" % code,
                       2)
        num = _uint(fields[1])
        if num is None:
            if kind == 2:
                yield Record(code, None, fields[1:])
                continue
            if fields[1] or code in _BUILTIN:
                raise _err(line, cols[1], "line number %r is not an unsigned integer of at most "
                           "%d digits" % (_clip(fields[1]), MAX_DIGITS), 2)
        yield Record(code, num, fields[2:])
