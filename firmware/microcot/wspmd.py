"""permessage-deflate (RFC 7692) without I/O: the offer, the server's answer checked, and the
per-message inflate/deflate for `microcot.ws`.

Incoming messages are inflated with `zlib` on CPython and with `deflate.DeflateIO(stream, RAW,
wbits)` on MicroPython. DeflateIO cannot keep one inflater across messages: its source must end
at each message, and the EOFError it raises there loses the count of bytes it produced. Context
takeover (the server referring back into earlier messages) is instead rebuilt per message: the
last 2**wbits bytes of output are kept and fed to a fresh DeflateIO as a stored block before the
new message, whose output starts after them. That costs 2**wbits bytes of history, and DeflateIO
allocates a 2**wbits window per message, so MicroPython's default offer asks for
`server_no_context_takeover` and `server_max_window_bits=12`; a dict such as
{"server_no_context_takeover": False} enables takeover (see default_options()).

Outgoing messages are compressed with zlib on CPython; on MicroPython only where the port was
built with MICROPY_PY_DEFLATE_COMPRESS (DeflateIO has `write`). Its stream always ends with a
final block, which only a server that resets its inflater per message can take, so there it is
used only when `client_no_context_takeover` was agreed. Where compression is not available the
client sends uncompressed (RFC 7692 allows either per message).

Errors (ERRORS, the only ones raised for any server input; tests/device/test_fuzz_ws.py):
HandshakeError(WS_STATUS_CONNECT_RES_INVALID_EXTENSION) for a bad answer (parse_extensions,
accept), ProtocolError(1007, WS_STATUS_DECOMPRESS_ERROR) for a bad compressed payload,
ProtocolError(1009, WS_STATUS_INVALID_MSG_SIZE) when inflating would exceed the message limit
(the output grows with what inflates, up to that limit plus one byte). offer() raises ValueError
for our own settings out of range.
"""

import sys

from microcot.wsframe import (
    CLOSE_INVALID_DATA,
    CLOSE_TOO_BIG,
    WS_STATUS_CONNECT_RES_INVALID_EXTENSION,
    WS_STATUS_DECOMPRESS_ERROR,
    WS_STATUS_INVALID_MSG_SIZE,
    HandshakeError,
    ProtocolError,
)

ERRORS = (HandshakeError, ProtocolError)

NAME = "permessage-deflate"
TAIL = b"\x00\x00\xff\xff"
_FINAL = b"\x01\x00\x00\xff\xff"  # an empty final stored block: DeflateIO then ends cleanly
_MP = sys.implementation.name == "micropython"

try:
    import zlib
except ImportError:
    zlib = None
try:
    import deflate
except ImportError:
    deflate = None


def inflate_available():
    return zlib is not None or deflate is not None


def compress_available():
    """True when this runtime can compress: zlib, or DeflateIO built with compression."""
    return zlib is not None or (deflate is not None and hasattr(deflate.DeflateIO, "write"))


def default_options():
    """The offer made for per_message_deflate=True on this runtime."""
    if zlib is not None:
        return {"client_max_window_bits": True}
    # MicroPython: no history kept, a 4 KiB inflate window instead of 32 KiB, and the server
    # need not keep a context for us (we compress rarely, each message on its own)
    return {"server_no_context_takeover": True, "client_no_context_takeover": True,
            "server_max_window_bits": 12}


def offer(opts=None):
    """The Sec-WebSocket-Extensions value of our offer; `opts` as in default_options()."""
    if opts is None or opts is True:
        opts = default_options()
    out = [NAME]
    for k in ("server_no_context_takeover", "client_no_context_takeover"):
        if opts.get(k):
            out.append(k)
    for k in ("server_max_window_bits", "client_max_window_bits"):
        v = opts.get(k)
        if v is True:
            out.append(k)
        elif v:
            if not 8 <= v <= 15:
                raise ValueError("%s must be 8..15, not %r" % (k, v))
            out.append("%s=%d" % (k, v))
    return "; ".join(out)


def _bad(msg):
    return HandshakeError(WS_STATUS_CONNECT_RES_INVALID_EXTENSION, msg, 101)


def parse_extensions(value):
    """[(name, {param: value or True}), ...] of a Sec-WebSocket-Extensions value."""
    out = []
    for ext in value.split(","):
        parts = [p.strip() for p in ext.split(";")]
        if not parts[0]:
            raise _bad("empty extension in %r" % value)
        params = {}
        for p in parts[1:]:
            i = p.find("=")
            k, v = (p, True) if i < 0 else (p[:i].strip(), p[i + 1:].strip())
            if v is not True and len(v) > 1 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            if not k or k in params:
                raise _bad("repeated or empty parameter %r in %r" % (k, ext.strip()))
            params[k] = v
        out.append((parts[0].lower(), params))
    return out


def _bits(k, v):
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses
    if v is True or not 1 <= len(v) <= 2 or not ("0" <= v[0] <= "9" and "0" <= v[-1] <= "9") \
            or not 8 <= int(v) <= 15:
        raise _bad("%s=%r is not 8..15" % (k, v))
    return int(v)


def accept(value, opts=None):
    """Check the server's Sec-WebSocket-Extensions answer to our offer; return the agreed
    parameters {"snct", "cnct", "sbits", "cbits"} or None when it declined."""
    if opts is None or opts is True:
        opts = default_options()
    if not value:
        return None
    exts = parse_extensions(value)
    if len(exts) != 1 or exts[0][0] != NAME:
        raise _bad("server answered extensions %r; only %s was offered" % (value, NAME))
    p = exts[0][1]
    cfg = {"snct": False, "cnct": bool(opts.get("client_no_context_takeover")),
           "sbits": 15, "cbits": 15}
    for k, v in p.items():
        if k in ("server_no_context_takeover", "client_no_context_takeover"):
            if v is not True:
                raise _bad("%s takes no value" % k)
            cfg["snct" if k[0] == "s" else "cnct"] = True
        elif k == "server_max_window_bits":
            b = _bits(k, v)
            mx = opts.get(k)
            if mx and mx is not True and b > mx:
                raise _bad("server_max_window_bits=%d over the offered %d" % (b, mx))
            cfg["sbits"] = b
        elif k == "client_max_window_bits":
            if not opts.get(k):
                raise _bad("client_max_window_bits answered but not offered")
            cfg["cbits"] = _bits(k, v)
        else:
            raise _bad("unknown permessage-deflate parameter %r" % k)
    mx = opts.get("server_max_window_bits")
    if mx and mx is not True and "server_max_window_bits" not in p:
        raise _bad("server did not confirm server_max_window_bits=%d" % mx)
    mx = opts.get("client_max_window_bits")
    if mx and mx is not True and cfg["cbits"] > mx:
        cfg["cbits"] = mx
    return cfg


def _derr(e):
    return ProtocolError(CLOSE_INVALID_DATA, WS_STATUS_DECOMPRESS_ERROR,
                         "compressed message does not inflate: %r" % (e,))


def _too_big(limit):
    return ProtocolError(CLOSE_TOO_BIG, WS_STATUS_INVALID_MSG_SIZE,
                         "message inflates to more than max_recv_msg_size %d" % limit)


class Inflater:
    """Inflates one message at a time; `takeover` keeps the server's context between messages."""

    def __init__(self, wbits=15, takeover=True):
        self.wbits = wbits
        self.takeover = takeover
        self.z = None
        self.out = bytearray(0)  # MicroPython: output buffer (history, then the message)
        self.hist = b""  # MicroPython: the last 2**wbits bytes of output, with takeover

    def inflate(self, data, limit):
        """The inflated message (bytes or memoryview, valid until the next call)."""
        if zlib is not None:
            return self._zlib(data, limit)
        return self._deflateio(data, limit)

    def _zlib(self, data, limit):
        z = self.z
        if z is None or not self.takeover or z.eof:
            z = self.z = zlib.decompressobj(-15)
        try:
            out = z.decompress(bytes(data) + TAIL, limit + 1)
        except zlib.error as e:
            raise _derr(e)
        if len(out) > limit:
            raise _too_big(limit)
        return out

    def _deflateio(self, data, limit):
        hist = self.hist if self.takeover else b""
        self.hist = b""
        h = len(hist)
        top = h + limit + 1  # one byte over the limit tells "too big"
        try:
            got = self._run(hist, data, top, True)
        except (OSError, EOFError, ValueError):
            # The payload did not end on a block boundary, as RFC 7692 7.2.3.3's example (a
            # stored block without the flush): inflate it as zlib streams do, byte by byte up to
            # the end of the input, since DeflateIO's EOFError hides how much it wrote.
            try:
                got = self._run(hist, data, top, False)
            except (OSError, ValueError) as e:
                raise _derr(e)
        if got >= top:
            raise _too_big(limit)
        if got < h:
            raise _derr("history not reproduced")
        out = self.out
        if self.takeover:
            w = 1 << self.wbits
            self.hist = bytes(memoryview(out)[got - w if got > w else 0:got])
        return memoryview(out)[h:got]

    def _run(self, hist, data, top, final):
        import io

        h = len(hist)
        n = len(data)
        src = io.BytesIO(h + 5 + n + 9)
        if h:
            src.write(bytes((0, h & 0xFF, h >> 8, ~h & 0xFF, (~h >> 8) & 0xFF)))
            src.write(hist)
        src.write(data)
        src.write(TAIL)
        if final:
            src.write(_FINAL)
        src.seek(0)
        out = self.out
        d = deflate.DeflateIO(src, deflate.RAW, self.wbits)
        got = 0
        while True:
            if got == len(out):
                if got >= top:
                    break
                cap = got * 2 if got else 1024
                if cap < h + n * 2:
                    cap = h + n * 2
                nb = bytearray(cap if cap < top else top)
                nb[:got] = memoryview(out)[:got]
                out = self.out = nb
            try:
                k = d.readinto(memoryview(out)[got:] if final else memoryview(out)[got:got + 1])
            except EOFError:
                if final:
                    raise
                break
            if not k:
                break
            got += k
        return got


class Deflater:
    """Compresses outgoing messages where this runtime can; `ok` tells whether it can."""

    def __init__(self, wbits=15, takeover=True):
        self.wbits = wbits
        self.takeover = takeover
        self.z = None
        if zlib is not None:
            self.ok = wbits >= 9  # zlib has no raw 256-byte window
        else:
            self.ok = compress_available() and not takeover

    def deflate(self, data):
        if zlib is not None:
            z = self.z
            if z is None or not self.takeover:
                z = self.z = zlib.compressobj(6, zlib.DEFLATED, -self.wbits)
            out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
            return out[:-4] if out[-4:] == TAIL else out
        import io

        b = io.BytesIO()
        d = deflate.DeflateIO(b, deflate.RAW, self.wbits)
        d.write(data)
        d.close()  # ends with a final block; the server resets its inflater (takeover False)
        return b.getvalue()
