"""RFC 6455 WebSocket core without I/O: handshake, frames, masking, close codes, UTF-8.

No sockets and no clocks (DESIGN.md, principle 1); `microcot.ws` drives it. The status numbers are
those of the seed's `ETcIotWebSocketStatus` (`WS_STATUS_*`), the content types those of
`ETcIotWebSocketContentType`.

    make_key() / accept_key(key)            Sec-WebSocket-Key from os.urandom, its expected accept
    request(host, port, uri, key, ...)      the opening handshake request (bytes)
    parse_response(head) / check_response  the server's answer checked; HandshakeError(status, ...)
    header(op, n, fin, rsv1, key)           a client frame header; mask(buf, start, end, key)
    close_payload(code, reason) / parse_close(payload)
    Utf8                                    incremental UTF-8 validator (fragments, fail fast)
    Reader                                  incremental frame decoder and message assembler with
                                            the receive limits, decided from the header

Errors (ERRORS): these decoders of what a server sends raise only
    ProtocolError(close_code, status, message)   Reader, parse_close: a frame breaking RFC 6455
                                                 (1002), invalid UTF-8 (1007), over a limit (1009)
    HandshakeError(status, message, http)        parse_response, check_response
for any input (tests/device/test_fuzz_ws.py feeds them random and mutated bytes). MemoryError is
the runtime's, not theirs: the driver maps it to WS_STATUS_NOMEMORY.
"""

import sys
from binascii import b2a_base64
from hashlib import sha1
from os import urandom
from struct import pack_into, unpack_from

# ETcIotWebSocketStatus (seed 000, 5.2.1); 9 is not defined there either.
WS_STATUS_BUSY = -1
WS_STATUS_SUCCESS = 0
WS_STATUS_SOCK_NOMEM = 1
WS_STATUS_SOCK_ERR_CREATE_PROTOCOL = 2
WS_STATUS_SOCK_CONN_INVAL = 3
WS_STATUS_SOCK_NO_CONN = 4
WS_STATUS_SOCK_CONN_REFUSED = 5
WS_STATUS_SOCK_NOT_FOUND = 6
WS_STATUS_SOCK_CONN_LOST = 7
WS_STATUS_SOCK_ERR_TLS = 8
WS_STATUS_SOCK_NOT_SUPPORTED = 10
WS_STATUS_SOCK_ERR_AUTH = 11
WS_STATUS_SOCK_ERRACL_DENIED = 12
WS_STATUS_SOCK_ERR_UNKNOWN = 13
WS_STATUS_SOCK_ERRNO = 14
WS_STATUS_SOCK_ERR_EAI = 15
WS_STATUS_SOCK_ERR_PROXY = 16
WS_STATUS_TLS_CA_NOTFOUND = 17
WS_STATUS_TLS_CERT_NOTFOUND = 18
WS_STATUS_TLS_KEY_NOTFOUND = 19
WS_STATUS_TLS_CA_INVALID = 20
WS_STATUS_TLS_CERT_INVALID = 21
WS_STATUS_TLS_KEY_INVALID = 22
WS_STATUS_TLS_VERIFY_FAIL = 23
WS_STATUS_TLS_SETUP = 24
WS_STATUS_TLS_HANDSHAKE_FAIL = 25
WS_STATUS_TLS_CIPHER_INVALID = 26
WS_STATUS_TLS_VERSION_INVALID = 27
WS_STATUS_TLS_PSK_INVALID = 28
WS_STATUS_TLS_CRL_NOTFOUND = 29
WS_STATUS_TLS_CRL_INVALID = 30
WS_STATUS_FINALIZE_DISCONNECT = 31
WS_STATUS_SOCK_ERR_BIND = 32
WS_STATUS_SOCK_BIND_ADDR_INUSE = 33
WS_STATUS_SOCK_BIND_ADDR_INVAL = 34
WS_STATUS_SOCK_ERR_CREATE = 35
WS_STATUS_SOCK_ERR_CREATE_TYPE = 36
WS_STATUS_SOCK_CONN_FAILED = 37
WS_STATUS_SOCK_CONN_TIMEDOUT = 38
WS_STATUS_SOCK_CONN_HOSTUNREACH = 39
WS_STATUS_TLS_CERT_EXPIRED = 40
WS_STATUS_TLS_CN_MISMATCH = 41
WS_STATUS_INTERNAL_ERROR = 1000
WS_STATUS_CONNECT_REQ_INTERNAL_ERROR = 1001
WS_STATUS_CONNECT_REQ_SEND_ERROR = 1002
WS_STATUS_CONNECT_RES_PARSE_ERROR = 1003
WS_STATUS_CONNECT_RES_INVALID = 1004
WS_STATUS_CONNECT_RES_INVALID_STATUS = 1005
WS_STATUS_CONNECT_RES_ACCEPT_INVALID = 1006
WS_STATUS_CONNECT_RES_ACCEPT_INVALID_HASH = 1007
WS_STATUS_CONNECT_RES_INVALID_EXTENSION = 1008
WS_STATUS_CONNECT_RES_REJECT = 1009
WS_STATUS_CONNECT_RES_TIMEDOUT = 1010
WS_STATUS_KEEP_ALIVE_TIMEDOUT = 1011
WS_STATUS_NOMEMORY = 1012
WS_STATUS_INVALID_MSG_SIZE = 1013
WS_STATUS_PROTOCOL_ERROR = 1014
WS_STATUS_RCV_QUEUE_FULL = 1015
WS_STATUS_DECOMPRESS_ERROR = 1016

# ETcIotWebSocketContentType (seed 000, 5.2.2)
WS_CONTENT_CONTINUATION = 0
WS_CONTENT_TEXT = 1
WS_CONTENT_BINARY = 2

OP_CONT = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

# RFC 6455 7.4.1 close codes (1012-1014 registered later with IANA)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # never sent: on_close's code when a Close frame had no payload
CLOSE_ABNORMAL = 1006  # never sent: on_close's code when the connection ended without a Close
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_MANDATORY_EXT = 1010
CLOSE_INTERNAL_ERROR = 1011

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 4096  # largest handshake response head accepted


class ProtocolError(Exception):
    """The peer broke RFC 6455/7692: close with `code`, report `status`."""

    def __init__(self, code, status, msg):
        super().__init__(msg)
        self.code = code
        self.status = status
        self.msg = msg


class ConnectError(Exception):
    """Connecting failed: `status` is the WS_STATUS_*, `code` an errno, HTTP status or 0."""

    def __init__(self, status, msg, code=0):
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.code = code


class HandshakeError(Exception):
    """The opening handshake failed: `status` is the WS_STATUS_*, `http` the HTTP status or 0."""

    def __init__(self, status, msg, http=0):
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.http = http


# what the decoders of server input raise (see the module docstring)
ERRORS = (ProtocolError, HandshakeError)


def _b64(data):
    return b2a_base64(data)[:-1].decode()


def make_key():
    """A fresh Sec-WebSocket-Key: 16 bytes from os.urandom, base64."""
    return _b64(urandom(16))


def accept_key(key):
    """The Sec-WebSocket-Accept a server must answer to `key` (RFC 6455 4.2.2)."""
    if isinstance(key, str):
        key = key.encode()
    return _b64(sha1(key + GUID).digest())


def valid_close_code(code):
    """True for a code an endpoint may send in a Close frame (RFC 6455 7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _token_ok(s):
    for c in s:
        if c <= " " or c > "~" or c in '"(),/:;<=>?@[\\]{}':
            return False
    return len(s) > 0


def _value_ok(s):
    return all(c >= " " and c != "\x7f" or c == "\t" for c in s)


def request(host, port, uri="/", key=None, protocol=None, origin=None, extensions=None,
            headers=None, tls=False):
    """The opening handshake request as bytes. `headers` is a dict or a list of pairs.

    Raises HandshakeError(WS_STATUS_CONNECT_REQ_INTERNAL_ERROR) for a value that would break the
    request (control characters, an invalid header name): no header injection.
    """
    if not uri:
        uri = "/"
    if uri[0] != "/" or not _value_ok(uri) or " " in uri:
        raise HandshakeError(WS_STATUS_CONNECT_REQ_INTERNAL_ERROR, "invalid uri %r" % uri)
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host  # an IPv6 address
    hp = host if port == (443 if tls else 80) else "%s:%d" % (host, port)
    h = [("Host", hp), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
         ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
    if protocol:
        h.append(("Sec-WebSocket-Protocol", protocol))
    if origin:
        h.append(("Origin", origin))
    if extensions:
        h.append(("Sec-WebSocket-Extensions", extensions))
    if headers:
        h.extend(headers.items() if isinstance(headers, dict) else headers)
    out = ["GET %s HTTP/1.1\r\n" % uri]
    for name, value in h:
        value = str(value)
        if not _token_ok(name) or not _value_ok(value):
            raise HandshakeError(WS_STATUS_CONNECT_REQ_INTERNAL_ERROR,
                                 "invalid header %r" % name)
        out.append("%s: %s\r\n" % (name, value))
    out.append("\r\n")
    return "".join(out).encode()


def _digits(s):
    # ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses
    for c in s:
        if c < "0" or c > "9":
            return False
    return len(s) > 0


def parse_response(head):
    """Split a response head (bytes up to and without the blank line) into
    (status, reason, {lower-case name: value}); repeated headers are joined with ", "."""
    try:
        text = bytes(head).decode()
    except UnicodeError:
        raise HandshakeError(WS_STATUS_CONNECT_RES_PARSE_ERROR, "response head is not UTF-8")
    lines = text.split("\r\n")
    first = lines[0].split(" ", 2)
    if len(first) < 2 or not first[0].startswith("HTTP/1.") or len(first[1]) != 3 \
            or not _digits(first[1]):
        raise HandshakeError(WS_STATUS_CONNECT_RES_PARSE_ERROR,
                             "bad status line %r" % lines[0][:80])
    status = int(first[1])
    hdrs = {}
    for ln in lines[1:]:
        i = ln.find(":")
        if i <= 0 or not _token_ok(ln[:i]):
            raise HandshakeError(WS_STATUS_CONNECT_RES_PARSE_ERROR,
                                 "bad header line %r" % ln[:80], status)
        name = ln[:i].lower()
        value = ln[i + 1:].strip()
        hdrs[name] = hdrs[name] + ", " + value if name in hdrs else value
    return status, (first[2] if len(first) > 2 else ""), hdrs


def _tokens(value):
    return [t.strip().lower() for t in value.split(",")]


def check_response(status, hdrs, key, protocols=()):
    """Check a parsed response against our request; return the negotiated subprotocol ("" if
    none). The extension header is left to the caller (`microcot.wspmd`)."""
    if status != 101:
        if 400 <= status < 600:
            raise HandshakeError(WS_STATUS_CONNECT_RES_REJECT,
                                 "server refused the upgrade: HTTP %d" % status, status)
        raise HandshakeError(WS_STATUS_CONNECT_RES_INVALID_STATUS,
                             "HTTP status %d instead of 101" % status, status)
    if "websocket" not in _tokens(hdrs.get("upgrade", "")):
        raise HandshakeError(WS_STATUS_CONNECT_RES_INVALID,
                             "Upgrade header is %r, not websocket" % hdrs.get("upgrade"), 101)
    if "upgrade" not in _tokens(hdrs.get("connection", "")):
        raise HandshakeError(WS_STATUS_CONNECT_RES_INVALID,
                             "Connection header %r lacks upgrade" % hdrs.get("connection"), 101)
    acc = hdrs.get("sec-websocket-accept")
    if acc is None:
        raise HandshakeError(WS_STATUS_CONNECT_RES_ACCEPT_INVALID,
                             "no Sec-WebSocket-Accept header", 101)
    if acc != accept_key(key):
        raise HandshakeError(WS_STATUS_CONNECT_RES_ACCEPT_INVALID_HASH,
                             "Sec-WebSocket-Accept %r does not match the key" % acc, 101)
    proto = hdrs.get("sec-websocket-protocol", "")
    if proto and proto not in protocols:
        raise HandshakeError(WS_STATUS_CONNECT_RES_INVALID,
                             "server chose subprotocol %r, which was not offered" % proto, 101)
    return proto


def header(op, n, fin=True, rsv1=False, key=None, buf=None):
    """A frame header for an n-byte payload; masked with the 4-byte `key` when given (a client
    frame). Written into `buf` (at least 14 bytes) when given; returns (buf, header length)."""
    if buf is None:
        buf = bytearray(14)
    return buf, put_header(buf, op, n, fin, rsv1, key)


def put_header(buf, op, n, fin, rsv1, key):
    """header() written into buf; returns its length (no tuple: the send path allocates
    nothing)."""
    buf[0] = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | op
    m = 0x80 if key else 0
    if n < 126:
        buf[1] = m | n
        i = 2
    elif n < 0x10000:
        buf[1] = m | 126
        pack_into(">H", buf, 2, n)
        i = 4
    else:
        buf[1] = m | 127
        pack_into(">II", buf, 2, n >> 32, n & 0xFFFFFFFF)
        i = 10
    if key:
        buf[i:i + 4] = key
        i += 4
    return i


def encode(op, payload=b"", fin=True, rsv1=False, key=None):
    """A whole frame as bytes (tests and small control frames); the payload masked with `key`."""
    n = len(payload)
    hb, h = header(op, n, fin, rsv1, key)
    out = bytearray(h + n)
    out[:h] = hb[:h]
    out[h:] = payload
    if key:
        mask(out, h, h + n, key)
    return bytes(out)


# --- masking -------------------------------------------------------------------------------------
# XOR in place with the 4-byte key repeated from `start`. MicroPython: a viper loop compiled at
# first use from source (see microcot.xtea for why exec); else whole chunks as big integers.

_MASK_VIPER = """
@micropython.viper
def vmask(buf: ptr8, start: int, end: int, key: ptr8):
    i = start
    j = 0
    while i < end and ((uint(buf) + uint(i)) & 3):
        buf[i] ^= key[j & 3]
        i += 1
        j += 1
    kw = uint(key[j & 3]) | (uint(key[(j + 1) & 3]) << 8) | (uint(key[(j + 2) & 3]) << 16) | \\
        (uint(key[(j + 3) & 3]) << 24)
    w = ptr32(uint(buf) + uint(i))
    n = (end - i) >> 2
    k = 0
    while k < n:
        w[k] ^= kw
        k += 1
    i += n << 2
    j += n << 2
    while i < end:
        buf[i] ^= key[j & 3]
        i += 1
        j += 1
"""
# (32-bit words XORed in place once the address is aligned; the key word is little-endian, so the
# viper variant is used only where sys.byteorder is "little")

_MP = sys.implementation.name == "micropython"
_vm = None  # None: not tried; False: unavailable


def _viper(src, name):
    try:
        g = {}
        exec(src, g)
        return g[name]
    except Exception:  # no native emitter or no exec: the Python path stays
        return False


def mask_variant():
    """'viper' when mask() runs the viper loop, else 'python'."""
    global _vm
    if _vm is None:
        _vm = _viper(_MASK_VIPER, "vmask") if _MP and sys.byteorder == "little" else False
    return "viper" if _vm else "python"


_CH = 256 if _MP else 4096  # bytes per big-integer XOR
try:
    _BIG = (1 << 80) > 0
except OverflowError:  # a port without big integers: byte by byte
    _BIG = False


def mask_py(buf, start, end, key):
    """The pure-Python masking (the reference for the viper loop)."""
    n = end - start
    if n <= 0:
        return
    i = start
    if _BIG:
        mv = memoryview(buf)
        c = _CH if n > _CH else n & ~3
        if c:
            k = int.from_bytes(bytes(key) * (c // 4), "little")
            while i + c <= end:
                mv[i:i + c] = (int.from_bytes(mv[i:i + c], "little") ^ k).to_bytes(c, "little")
                i += c
    j = 0
    while i < end:
        buf[i] ^= key[j & 3]
        i += 1
        j += 1


_COPY_VIPER = """
@micropython.viper
def vcopy(dst: ptr8, d: int, src: ptr8, s: int, n: int):
    i = 0
    while i < n:
        dst[d + i] = src[s + i]
        i += 1
"""
_vc = None


def copy(dst, d, src, s, n):
    """dst[d:d + n] = src[s:s + n] for a short run, without the slice object (MicroPython:
    a viper loop; the slices elsewhere)."""
    global _vc
    if _vc is None:
        _vc = _viper(_COPY_VIPER, "vcopy") if _MP else False
    if _vc:
        _vc(dst, d, src, s, n)
    else:
        dst[d:d + n] = src[s:s + n]


def mask(buf, start, end, key):
    """XOR buf[start:end] in place with the repeated 4-byte key (masking = unmasking)."""
    if _vm is None:
        mask_variant()
    if _vm:
        _vm(buf, start, end, key)
    else:
        mask_py(buf, start, end, key)


# --- close frames --------------------------------------------------------------------------------

def close_payload(code=None, reason=b""):
    """The payload of a Close frame; ValueError for a code that may not be sent or a reason over
    123 bytes."""
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    if not valid_close_code(code):
        raise ValueError("close code %d may not be sent" % code)
    if len(reason) > 123:
        raise ValueError("close reason is %d bytes, at most 123 fit" % len(reason))
    return bytes((code >> 8, code & 0xFF)) + reason


def parse_close(payload):
    """(code, reason bytes) of a received Close frame; (1005, b"") for an empty one."""
    n = len(payload)
    if n == 0:
        return CLOSE_NO_STATUS, b""
    if n == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, WS_STATUS_PROTOCOL_ERROR,
                            "close frame with a 1-byte payload")
    code = payload[0] << 8 | payload[1]
    if not valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, WS_STATUS_PROTOCOL_ERROR,
                            "invalid close code %d" % code)
    u = Utf8()
    if not u.feed(payload, 2, n) or not u.done():
        raise ProtocolError(CLOSE_INVALID_DATA, WS_STATUS_PROTOCOL_ERROR,
                            "close reason is not valid UTF-8")
    return code, bytes(payload[2:])


# --- UTF-8 ---------------------------------------------------------------------------------------
# Bjoern Hoehrmann's DFA: 256 byte classes, then transitions (state + class -> state), states are
# multiples of 12, 0 accepts and 12 rejects. One table for the viper and the Python loop; CPython
# uses its own strict incremental decoder, which rejects the same sequences.

_CLS = bytearray(256)
for _i in range(0x80, 0x90):
    _CLS[_i] = 1
for _i in range(0x90, 0xA0):
    _CLS[_i] = 9
for _i in range(0xA0, 0xC0):
    _CLS[_i] = 7
for _i in range(0xC0, 0xC2):
    _CLS[_i] = 8
for _i in range(0xC2, 0xE0):
    _CLS[_i] = 2
for _i in range(0xE1, 0xF0):
    _CLS[_i] = 3
for _i in range(0xF5, 0x100):
    _CLS[_i] = 8
_CLS[0xE0] = 10
_CLS[0xED] = 4
_CLS[0xF0] = 11
_CLS[0xF1] = _CLS[0xF2] = _CLS[0xF3] = 6
_CLS[0xF4] = 5
_UTF8 = bytes(_CLS) + bytes((
    0, 12, 24, 36, 60, 96, 84, 12, 12, 12, 48, 72,
    12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
    12, 0, 12, 12, 12, 12, 12, 0, 12, 0, 12, 12,
    12, 24, 12, 12, 12, 12, 12, 24, 12, 24, 12, 12,
    12, 12, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12,
    12, 24, 12, 12, 12, 12, 12, 12, 12, 24, 12, 12,
    12, 12, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
    12, 36, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
    12, 36, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
))
del _CLS, _i

_UTF8_VIPER = """
@micropython.viper
def vutf8(buf: ptr8, start: int, end: int, s: int, t: ptr8) -> int:
    i = start
    while i < end:
        s = t[256 + s + t[buf[i]]]
        if s == 12:
            return 12
        i += 1
    return s
"""

_vu = None


def utf8_py(buf, start, end, s=0):
    """The pure-Python DFA: the state after buf[start:end] from state s (12 = rejected)."""
    t = _UTF8
    for i in range(start, end):
        s = t[256 + s + t[buf[i]]]
        if s == 12:
            return 12
    return s


def utf8_variant():
    """'viper', 'codecs' (CPython) or 'python': how Utf8 validates on this runtime."""
    global _vu
    if _vu is None:
        _vu = _viper(_UTF8_VIPER, "vutf8") if _MP else False
    return "viper" if _vu else "python" if _MP else "codecs"


class Utf8:
    """Incremental UTF-8 validation: feed() the fragments as they come (False as soon as the
    bytes cannot start valid UTF-8), done() at the end (False when a sequence is cut off)."""

    def __init__(self, variant=None):
        self.v = variant or utf8_variant()
        self.reset()

    def reset(self):
        self.s = 0
        if self.v == "codecs":
            import codecs

            self.d = codecs.getincrementaldecoder("utf-8")()

    def feed(self, buf, start=0, end=None):
        if end is None:
            end = len(buf)
        if self.s == 12:
            return False
        if self.v == "codecs":
            try:
                self.d.decode(bytes(memoryview(buf)[start:end]))
            except UnicodeError:
                self.s = 12
        elif self.v == "viper":
            self.s = _vu(buf, start, end, self.s, _UTF8)
        else:
            self.s = utf8_py(buf, start, end, self.s)
        return self.s != 12

    def done(self):
        if self.v == "codecs" and self.s != 12:
            try:
                self.d.decode(b"", True)
            except UnicodeError:
                self.s = 12
            return self.s != 12
        return self.s == 0


def valid_utf8(data):
    """True when the whole of `data` is valid UTF-8."""
    u = Utf8()
    return u.feed(data) and u.done()


# --- receiving -----------------------------------------------------------------------------------

# event kinds of Reader.take() and Reader.put()
EV_MSG = 1
EV_PING = 2
EV_PONG = 3
EV_CLOSE = 4


def _perr(msg, code=CLOSE_PROTOCOL_ERROR):
    return ProtocolError(code, WS_STATUS_PROTOCOL_ERROR, msg)


def _size_err(msg):
    return ProtocolError(CLOSE_TOO_BIG, WS_STATUS_INVALID_MSG_SIZE, msg)


class Reader:
    """Decodes server frames and assembles messages within the limits.

    feed(mv) consumes bytes and returns (used, event); event is None or one of
        ("msg", opcode, n, compressed)  a whole message in buf[:n] (still compressed if so)
        ("ping", payload) ("pong", payload) ("close", code, reason)
    Payload bytes may also be read straight into the message buffer: target() is the free
    slice for the current data frame (None otherwise), then got(k) accounts for k bytes.
    The driver uses take(buf, i, end) and put(k) instead: the same, but the event is a kind
    in `ev` (EV_MSG, EV_PING, EV_PONG, EV_CLOSE; 0 for none) with its fields in ev_op, ev_n,
    ev_comp, ev_payload, ev_code, ev_reason, so that receiving a message allocates nothing;
    take() decodes a whole unfragmented frame of under 126 bytes in one step.

    The limits are checked from the header alone: a frame over max_frame or a message that
    would grow over max_msg raises ProtocolError(1009, WS_STATUS_INVALID_MSG_SIZE) before any
    of its payload is stored. The length a header declares is never allocated on trust: the
    message buffer (the only buffer of a connection that grows) grows as the payload arrives,
    doubling but by at most GROW_MAX bytes ahead of what has been stored, and never past the
    declared end of the frame. A header declaring 64 KiB followed by nothing costs 256 bytes.
    The buffer keeps its size for the next messages. `rsv1` tells that permessage-deflate was
    negotiated (RSV1 marks a compressed message).
    """

    GROW_MAX = 0x4000

    def __init__(self, max_frame=0x10000, max_msg=0x100000, rsv1=False):
        self.max_frame = max_frame
        self.max_msg = max_msg
        self.rsv1 = rsv1
        self.buf = bytearray(0)
        self.view = None  # the driver's view of a message in buf, dropped with buf
        self.h = bytearray(14)
        self.ctl = bytearray(125)
        self.utf8 = Utf8()
        self.clear()

    def clear(self):
        self.hn = 0  # header bytes collected
        self.need = 2  # header bytes needed
        self.rem = -1  # payload bytes still to come; -1 while reading a header
        self.op = 0  # opcode of the frame in progress
        self.fin = False
        self.mop = 0  # opcode of the message in progress, 0 for none
        self.comp = False
        self.n = 0  # message bytes stored
        self.cn = 0  # control payload bytes stored

    def _room(self, k):
        """Capacity for k more payload bytes of the current frame (k <= rem)."""
        n = self.n
        cap = len(self.buf)
        if n + k <= cap:
            return
        new = cap + (cap if cap < self.GROW_MAX else self.GROW_MAX)
        if new < 256:
            new = 256
        if new > n + self.rem:  # not past the frame's declared end (within max_msg)
            new = n + self.rem
        if new < n + k:
            new = n + k
        self.view = None  # before the new buffer: the old one is not held twice
        b = bytearray(new)
        b[:n] = memoryview(self.buf)[:n]
        self.buf = b

    def _head2(self):
        b0 = self.h[0]
        b1 = self.h[1]
        op = b0 & 0x0F
        self.op = op
        self.fin = b0 & 0x80
        if b1 & 0x80:
            raise _perr("server frame is masked")
        if b0 & 0x30:
            raise _perr("RSV2/RSV3 set without a negotiated extension")
        if op >= 8:
            if op > OP_PONG:
                raise _perr("reserved control opcode %d" % op)
            if not self.fin:
                raise _perr("fragmented control frame")
            if b1 & 0x7F > 125:
                raise _perr("control frame payload over 125 bytes")
            if b0 & 0x40:
                raise _perr("RSV1 set on a control frame")
        else:
            if op > OP_BINARY:
                raise _perr("reserved data opcode %d" % op)
            if op == OP_CONT:
                if not self.mop:
                    raise _perr("continuation frame without a message to continue")
                if b0 & 0x40:
                    raise _perr("RSV1 set on a continuation frame")
            else:
                if self.mop:
                    raise _perr("new data frame inside a fragmented message")
                if b0 & 0x40 and not self.rsv1:
                    raise _perr("RSV1 set without a negotiated extension")
        ln = b1 & 0x7F
        self.need = 4 if ln == 126 else 10 if ln == 127 else 2

    def _head(self):
        ln = self.h[1] & 0x7F
        if ln == 126:
            ln = unpack_from(">H", self.h, 2)[0]
        elif ln == 127:
            hi, ln = unpack_from(">II", self.h, 2)
            if hi & 0x80000000:
                raise _perr("64-bit payload length with the top bit set")
            if hi:  # 4 GiB or more: over any limit, and kept out of big integers
                raise _size_err("frame of %d * 2**32 bytes or more over max_recv_frame_size %d"
                                % (hi, self.max_frame))
        op = self.op
        if op >= 8:
            self.cn = 0
        else:
            if ln > self.max_frame:
                raise _size_err("frame of %d bytes over max_recv_frame_size %d"
                                % (ln, self.max_frame))
            if op != OP_CONT:
                self.mop = op
                self.comp = bool(self.h[0] & 0x40)
                self.n = 0
                self.utf8.reset()
            if self.n + ln > self.max_msg:
                raise _size_err("message of at least %d bytes over max_recv_msg_size %d"
                                % (self.n + ln, self.max_msg))
        self.rem = ln
        return self._end() if ln == 0 else 0

    def _end(self):
        # the current frame's payload is complete: the event kind, its fields set
        self.rem = -1
        self.hn = 0
        self.need = 2
        op = self.op
        if op >= 8:
            p = bytes(memoryview(self.ctl)[:self.cn])
            if op == OP_CLOSE:
                self.ev_code, self.ev_reason = parse_close(p)
                return EV_CLOSE
            self.ev_payload = p
            return EV_PING if op == OP_PING else EV_PONG
        if not self.fin:
            return 0
        mop = self.mop
        self.mop = 0
        if mop == OP_TEXT and not self.comp and not self.utf8.done():
            raise _perr("text message is not valid UTF-8", CLOSE_INVALID_DATA)
        self.ev_op = mop
        self.ev_n = self.n
        self.ev_comp = self.comp
        return EV_MSG

    def event(self, kind):
        """The tuple feed() and got() return for an event kind of take() and put()."""
        if kind == EV_MSG:
            return ("msg", self.ev_op, self.ev_n, self.ev_comp)
        if kind == EV_CLOSE:
            return ("close", self.ev_code, self.ev_reason)
        if kind:
            return ("ping" if kind == EV_PING else "pong", self.ev_payload)
        return None

    def target(self):
        """The free part of the message buffer for the current data frame's payload (None when
        no data payload is due): at most `rem` bytes, grown by one step when it is full."""
        if self.rem > 0 and self.op < 8:
            n = self.n
            if n == len(self.buf):
                self._room(1)
            end = n + self.rem
            if end > len(self.buf):
                end = len(self.buf)
            return memoryview(self.buf)[n:end]
        return None

    def got(self, k):
        """k payload bytes were placed at buf[n:n+k] (by target()); the event or None."""
        return self.event(self.put(k))

    def put(self, k):
        """As got(), but returns the event kind (0 for none), its fields in ev_*."""
        if self.mop == OP_TEXT and not self.comp and not self.utf8.feed(self.buf, self.n,
                                                                          self.n + k):
            raise _perr("text message is not valid UTF-8", CLOSE_INVALID_DATA)
        self.n += k
        self.rem -= k
        return self._end() if self.rem == 0 else 0

    def feed(self, mv):
        """Consume bytes of mv; (bytes used, the event or None)."""
        used = self.take(mv, 0, len(mv))
        return used, self.event(self.ev)

    def take(self, b, i, end):
        """Consume b[i:end] up to the end of it or of the first event; returns the index
        reached, the event kind in `ev` (0 for none) and its fields in ev_*. The driver's
        form of feed(): no slices, no tuples."""
        self.ev = 0
        if self.rem < 0 and self.hn == 0 and end - i >= 2 and not self.mop:
            # the usual case first: a whole unmasked, unfragmented text or binary frame of
            # under 126 bytes without RSV bits, all of it in b
            b0 = b[i]
            ln = b[i + 1]
            if (b0 == 0x82 or b0 == 0x81) and ln < 126 and i + 2 + ln <= end \
                    and ln <= self.max_frame and ln <= self.max_msg:
                if len(self.buf) < ln:
                    self.n = 0
                    self.rem = ln
                    self._room(ln)
                    self.rem = -1
                j = i + 2
                copy(self.buf, 0, b, j, ln)
                if b0 == 0x81:
                    u = self.utf8
                    u.reset()
                    if not u.feed(self.buf, 0, ln) or not u.done():
                        raise _perr("text message is not valid UTF-8", CLOSE_INVALID_DATA)
                self.op = b0 & 0x0F
                self.fin = 0x80
                self.n = ln
                self.comp = False
                self.ev_op = b0 & 0x0F
                self.ev_n = ln
                self.ev_comp = False
                self.ev = EV_MSG
                return j + ln
        h = self.h
        while i < end:
            if self.rem < 0:
                k = self.need - self.hn
                if k > end - i:
                    k = end - i
                h[self.hn:self.hn + k] = b[i:i + k]
                self.hn += k
                i += k
                if self.hn == 2 and self.need == 2:
                    self._head2()
                if self.hn == self.need:
                    ev = self._head()
                    if ev:
                        self.ev = ev
                        return i
                continue
            k = self.rem if self.rem < end - i else end - i
            if self.op >= 8:
                self.ctl[self.cn:self.cn + k] = b[i:i + k]
                self.cn += k
                i += k
                self.rem -= k
                if self.rem == 0:
                    self.ev = self._end()
                    return i
                continue
            self._room(k)
            self.buf[self.n:self.n + k] = b[i:i + k]
            i += k
            ev = self.put(k)
            if ev:
                self.ev = ev
                return i
        return i
