"""Binary SmartREST (topics bs/<ID> and br/<ID>).

One message is `<X-ID>\\0<TID:u16 BE><values>`; a payload is one or more messages back to back.
Value types, in the order of the template's parameters:

    STRING    UTF-8, NUL-terminated (a NUL inside the text cannot be sent)
    UNSIGNED  u32 big-endian
    INTEGER   i32 big-endian
    NUMBER    IEEE 754 binary32 big-endian (non-finite values are refused both ways, as the
              platform's NUMBER text has no spelling for them)
    DATE      u32 big-endian Unix seconds

NOW is a SmartREST parameter type without a value (the platform fills in the time), so it never
appears in a binary type list; templates.Collection.types_of() leaves it out. Passing NOW here is
a programming error (plain ValueError), not a payload error.

`encode` raises ValueError naming the parameter position (from 1) for values that do not fit.
`decode` raises `Error` (a ValueError) with the platform's code and message text:

    42 Malformed Request: no X-Id found in binary message '<i>' around byte '<pos>'
    42 Malformed Request: no Template ID found in binary message '<i>' around byte '<pos>'
    43 Invalid template identifier: template with X-ID '<xid>' and Template ID '<tid>' not found in cache
    45 Invalid parameter at position '<p>': Expected type '<TYPE>' in binary message '<i>' around byte '<pos>'

<i> counts messages from 1, <p> parameters from 1, and <pos> is the number of payload bytes
read successfully before the element that could not be read (so it is the offset where that
X-ID, TID or value starts). An empty X-ID, an X-ID without its NUL or not in UTF-8, and an empty
payload are 42 "no X-Id found"; a STRING without NUL or not in UTF-8, a value cut short and a
non-finite NUMBER are 45.

Errors (`ERRORS`): decode() raises `Error` and nothing else for any payload, given a lookup that
returns None or a list of TYPES (a type outside them is the lookup's bug: plain ValueError).
Nothing is allocated by a size read from the payload (there is none: strings end at their NUL);
the result holds every message, so its size follows the payload's, which the caller bounds (the
MQTT client's max_packet, the emulator's max_body).
"""

from struct import pack_into, unpack_from

STRING = "STRING"
UNSIGNED = "UNSIGNED"
INTEGER = "INTEGER"
NUMBER = "NUMBER"
DATE = "DATE"
TYPES = (STRING, UNSIGNED, INTEGER, NUMBER, DATE)

_FMT = {UNSIGNED: ">I", INTEGER: ">i", NUMBER: ">f", DATE: ">I"}
# 2**128 - 2**103: from here on a double rounds to infinity in binary32. Computed, not written as
# a float literal: MicroPython's freezer (mpy-tool.py) packs float constants as binary32 and
# raises for this one, so a literal here breaks every frozen build of the package.
_F32_LIM = float((1 << 128) - (1 << 103))


class Error(ValueError):
    """A decoding error as the platform reports it: code 42, 43 or 45 and its message text."""

    def __init__(self, code, message, index=None, position=None, param=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.index = index  # message index in the payload, from 1
        self.position = position  # bytes read before the failing element
        self.param = param  # parameter position, from 1 (45 only)

    def __str__(self):
        return "%d %s" % (self.code, self.message)


ERRORS = (Error,)


def _bad_type(p, t):
    if t == "NOW":
        return ValueError(
            "parameter %d: NOW takes no value; leave it out of binary type lists "
            "(templates.Collection.types_of does)" % p
        )
    return ValueError("parameter %d: unknown type %r" % (p, t))


def _xid_bytes(xid):
    b = xid.encode() if isinstance(xid, str) else bytes(xid)
    if not b:
        raise ValueError("X-ID must not be empty")
    if b.find(b"\0") >= 0:
        raise ValueError("X-ID must not contain a NUL byte")
    return b


def _int(p, t, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("parameter %d (%s): expected an int, got %r" % (p, t, v))
    if v < lo or v > hi:
        raise ValueError("parameter %d (%s): %d is out of range %d..%d" % (p, t, v, lo, hi))


def _sizes(xid, tid, types, values):
    # validates one message; -> (size, xid bytes, encoded strings)
    xb = _xid_bytes(xid)
    if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0 or tid > 0xFFFF:
        raise ValueError("template id %r is not an integer 0..65535" % (tid,))
    if len(types) != len(values):
        raise ValueError("%d types but %d values" % (len(types), len(values)))
    size = len(xb) + 3
    strs = []
    for i in range(len(types)):
        t = types[i]
        v = values[i]
        p = i + 1
        if t == STRING:
            if not isinstance(v, str):
                raise ValueError("parameter %d (STRING): expected a str, got %r" % (p, v))
            b = v.encode()
            if b.find(b"\0") >= 0:
                raise ValueError("parameter %d (STRING): NUL inside the string" % p)
            strs.append(b)
            size += len(b) + 1
        elif t in (UNSIGNED, DATE):
            _int(p, t, v, 0, 0xFFFFFFFF)
            size += 4
        elif t == INTEGER:
            _int(p, t, v, -0x80000000, 0x7FFFFFFF)
            size += 4
        elif t == NUMBER:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError("parameter %d (NUMBER): expected a number, got %r" % (p, v))
            if v - v != 0 or v >= _F32_LIM or v <= -_F32_LIM:  # v - v: nan and inf are not 0
                raise ValueError("parameter %d (NUMBER): %r does not fit a finite float32" % (p, v))
            size += 4
        else:
            raise _bad_type(p, t)
    return size, xb, strs


def _pack(buf, off, xb, tid, types, values, strs):
    n = len(xb)
    buf[off : off + n] = xb
    off += n + 1  # the NUL is already there: buffers start zeroed
    pack_into(">H", buf, off, tid)
    off += 2
    s = 0
    for i in range(len(types)):
        t = types[i]
        if t == STRING:
            b = strs[s]
            s += 1
            n = len(b)
            buf[off : off + n] = b
            off += n + 1
        else:
            pack_into(_FMT[t], buf, off, values[i])
            off += 4
    return off


def encode(xid, tid, types, values):
    """One binary message (bytes) for template tid of collection xid."""
    size, xb, strs = _sizes(xid, tid, types, values)
    buf = bytearray(size)
    _pack(buf, 0, xb, tid, types, values, strs)
    return bytes(buf)


def encode_many(messages):
    """One payload from an iterable of (xid, tid, types, values); ValueError names the message."""
    checked = []
    total = 0
    for i, (xid, tid, types, values) in enumerate(messages, 1):
        try:
            size, xb, strs = _sizes(xid, tid, types, values)
        except ValueError as e:
            raise ValueError("message %d: %s" % (i, e)) from None
        checked.append((xb, tid, types, values, strs))
        total += size
    if not checked:
        raise ValueError("no messages to encode")
    buf = bytearray(total)
    off = 0
    for xb, tid, types, values, strs in checked:
        off = _pack(buf, off, xb, tid, types, values, strs)
    return bytes(buf)


def _utf8(mv, a, b):
    try:
        s = str(mv[a:b], "utf-8")
    except Exception:  # UnicodeError on both runtimes, named differently
        return None
    if len(s) != b - a:
        from .utf8 import bad  # only for text that is not ASCII

        if bad(mv[a:b]) >= 0:
            return None  # MicroPython's decoder lets surrogates through; CPython's does not
    return s


def decode(payload, lookup):
    """Payload (bytes-like) -> list of (xid, tid, values); lookup(xid, tid) returns the type list
    of that template or None when it is unknown. Raises Error for every defect of the payload."""
    data = payload if isinstance(payload, bytes) else bytes(payload)
    mv = memoryview(data)
    n = len(data)
    out = []
    pos = 0
    index = 1
    while True:
        z = data.find(b"\0", pos)
        xid = _utf8(mv, pos, z) if z > pos else None
        if xid is None:
            raise Error(
                42,
                "Malformed Request: no X-Id found in binary message '%d' around byte '%d'"
                % (index, pos),
                index,
                pos,
            )
        pos = z + 1
        if pos + 2 > n:
            raise Error(
                42,
                "Malformed Request: no Template ID found in binary message '%d' around byte '%d'"
                % (index, pos),
                index,
                pos,
            )
        tid = (data[pos] << 8) | data[pos + 1]
        pos += 2
        types = lookup(xid, tid)
        if types is None:
            raise Error(
                43,
                "Invalid template identifier: template with X-ID '%s' and Template ID '%d' "
                "not found in cache" % (xid, tid),
                index,
                pos,
            )
        values = []
        for p, t in enumerate(types, 1):
            v = None
            if t == STRING:
                z = data.find(b"\0", pos)
                if z >= 0:
                    v = _utf8(mv, pos, z)
                    end = z + 1
            elif t in _FMT:
                end = pos + 4
                if end <= n:
                    v = unpack_from(_FMT[t], data, pos)[0]
                    if t == NUMBER and v - v != 0:
                        v = None
            else:
                raise _bad_type(p, t)
            if v is None:
                raise Error(
                    45,
                    "Invalid parameter at position '%d': Expected type '%s' in binary message "
                    "'%d' around byte '%d'" % (p, t, index, pos),
                    index,
                    pos,
                    p,
                )
            values.append(v)
            pos = end
        out.append((xid, tid, values))
        if pos >= n:
            return out
        index += 1
