# HTTP/1.1 GET into a sink, for MicroPython and CPython: the download half of firmware updates.
#
#   d = Download("https://host/inventory/binaries/42", sink, sha256=hexdigest,
#                user="t123/device_ID", password=pw, ca="/ca.pem")
#   while not d.step():        # one chunk per step: keep MQTT alive in between
#       client.poll(0)
#   d.size, d.received         # total size, bytes written to the sink
#
#   download(url, sink, ...)   # the same, run to the end; returns the Download
#
# - https:// verifies the server against `ca` (a file path, or the PEM/DER bytes) with
#   tlsctx.tls_context, or uses `ssl_context`; http:// only without credentials (they would travel
#   in clear text).
# - Basic auth with the device's own credentials; they are never printed or put in errors.
# - Bounded memory: one `chunk`-byte buffer (1 KiB) for the head and the body, header lines of
#   at most MAX_LINE bytes (longer lines of headers we do not use are skipped), at most MAX_LINES
#   of them; Content-Length is parsed as digits with a limit (max_size), nothing is allocated by
#   what the server says.
# - Content-Length is required; chunked transfer-encoding and redirects (3xx) are refused with
#   an error naming them.
# - A connection that breaks (error, timeout, early end) is opened again with
#   `Range: bytes=N-` where N is what the sink already holds: the answer must be 206 with a
#   Content-Range starting at N and the same total; a 200 means the server ignores ranges and
#   the download starts over (the sink is rewound with seek(0), the hash restarts). `retries`
#   reconnects in a row without a byte of progress are allowed.
# - sha256 (hex or 32 bytes) is checked over the whole body at the end (ChecksumError). With
#   offset > 0 (a download resumed after a reboot) the bytes before offset were not seen here:
#   the sink must then offer sha256_prefix(h, n) that feeds its first n bytes into h.
# - Errors are HTTPGetError subclasses naming what failed, the status and the byte offset.
from . import hal

_MP = hal.family() != "cpython"

MAX_LINE = 512
MAX_LINES = 64
CHUNK = 1024


class HTTPGetError(Exception):
    """A download failed; .offset is the number of body bytes the sink holds."""

    offset = 0


class HTTPStatusError(HTTPGetError):
    def __init__(self, status, msg, offset=0):
        super().__init__("HTTP %d: %s (at byte %d)" % (status, msg, offset))
        self.status = status
        self.offset = offset


class HTTPProtocolError(HTTPGetError):
    pass


class HTTPConnectionError(HTTPGetError):
    pass


class ChecksumError(HTTPGetError):
    pass


def parse_url(url):
    """'https://host[:port]/path' -> (tls, host, port, path)."""
    if url.startswith("https://"):
        tls, rest, port = True, url[8:], 443
    elif url.startswith("http://"):
        tls, rest, port = False, url[7:], 80
    else:
        raise ValueError("url must start with https:// or http://: %r" % url)
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    if "@" in hostport:
        raise ValueError("url: give credentials as user=/password=, not in the url")
    if hostport.startswith("["):
        j = hostport.find("]")
        host, tail = hostport[1:j], hostport[j + 1:]
    else:
        j = hostport.find(":")
        host, tail = (hostport, "") if j < 0 else (hostport[:j], hostport[j:])
    if tail:
        if tail[0] != ":" or not tail[1:].isdigit():
            raise ValueError("url: bad port in %r" % hostport)
        port = int(tail[1:])
    if not host:
        raise ValueError("url without a host: %r" % url)
    return tls, host, port, path


def _digits(v, what, limit):
    # a non-negative decimal of at most 12 digits, no sign, no spaces inside
    v = v.strip()
    if not v or len(v) > 12 or not v.isdigit():
        raise HTTPProtocolError("%s: not a number: %r" % (what, bytes(v[:40])))
    n = int(v)
    if n > limit:
        raise HTTPProtocolError("%s %d exceeds the limit of %d bytes" % (what, n, limit))
    return n


class Head:
    """Sans-I/O parser of an HTTP/1.x response head, fed in pieces.

    feed(buf, n) consumes from buf[:n] up to the end of the head and returns how many bytes it
    took; once .done, buf[taken:n] is the start of the body. Keeps the status, Content-Length
    (.length), Content-Range (.range = (first, last, total or None)), Transfer-Encoding
    (.chunked), Location and Connection: close. Lines longer than MAX_LINE are an error for
    those headers and skipped for others; more than MAX_LINES lines are an error."""

    def __init__(self, max_size=1 << 30):
        self.max_size = max_size
        self.status = None
        self.reason = ""
        self.length = None
        self.range = None
        self.chunked = False
        self.location = None
        self.close = False
        self.done = False
        self._line = bytearray()
        self._long = False  # the current line overflowed MAX_LINE
        self._lines = 0

    def feed(self, buf, n):
        i = 0
        while i < n and not self.done:
            j = buf.find(b"\n", i, n)
            end = n if j < 0 else j
            if not self._long:
                if len(self._line) + end - i > MAX_LINE:
                    self._long = True
                    self._line.extend(buf[i:i + 16])  # enough to name the header
                else:
                    self._line.extend(buf[i:end])
            if j < 0:
                return n
            i = j + 1
            self._end_line()
        return i

    def _end_line(self):
        line = self._line
        if line and line[-1] == 13:
            line = line[:-1]
        long, self._long = self._long, False
        self._lines += 1
        if self._lines > MAX_LINES:
            raise HTTPProtocolError("response head has more than %d lines" % MAX_LINES)
        try:
            if self.status is None:
                if long:
                    raise HTTPProtocolError("status line longer than %d bytes" % MAX_LINE)
                self._status(line)
            elif not line:
                self.done = True
            else:
                self._header(line, long)
        finally:
            self._line = bytearray()

    def _status(self, line):
        p = bytes(line).split(None, 2)
        if len(p) < 2 or not p[0].startswith(b"HTTP/1.") or len(p[1]) != 3 or not p[1].isdigit():
            raise HTTPProtocolError("not an HTTP/1.x status line: %r" % bytes(line[:60]))
        self.status = int(p[1])
        self.reason = str(p[2], "latin-1") if len(p) > 2 else ""

    def _header(self, line, long):
        k = line.find(b":")
        if k <= 0:
            raise HTTPProtocolError("bad header line: %r" % bytes(line[:60]))
        name = bytes(line[:k]).strip().lower()
        if name not in (b"content-length", b"content-range", b"transfer-encoding",
                        b"location", b"connection"):
            return
        if long:
            raise HTTPProtocolError("%s header longer than %d bytes" % (str(name, "ascii"),
                                                                        MAX_LINE))
        v = bytes(line[k + 1:]).strip()
        if name == b"content-length":
            n = _digits(v, "Content-Length", self.max_size)
            if self.length is not None and self.length != n:
                raise HTTPProtocolError("two different Content-Length headers")
            self.length = n
        elif name == b"content-range":
            self.range = parse_content_range(v, self.max_size)
        elif name == b"transfer-encoding":
            if v.lower() != b"identity":
                self.chunked = True
        elif name == b"location":
            self.location = str(v, "latin-1")
        elif v.lower() == b"close":
            self.close = True


def parse_content_range(v, limit=1 << 30):
    """b'bytes 100-199/200' -> (100, 199, 200); a total of '*' gives None."""
    if not v.startswith(b"bytes "):
        raise HTTPProtocolError("Content-Range: not a byte range: %r" % v[:60])
    v = v[6:]
    s = v.find(b"/")
    d = v.find(b"-")
    if s < 0 or d < 0 or d > s:
        raise HTTPProtocolError("Content-Range: expected first-last/total: %r" % v[:60])
    first = _digits(v[:d], "Content-Range start", limit)
    last = _digits(v[d + 1:s], "Content-Range end", limit)
    total = None if v[s + 1:].strip() == b"*" else _digits(v[s + 1:], "Content-Range total",
                                                           limit)
    if last < first or (total is not None and last >= total):
        raise HTTPProtocolError("Content-Range: inconsistent range %r" % v[:60])
    return first, last, total


def _basic(user, password):
    from binascii import b2a_base64

    return b"Basic " + b2a_base64(("%s:%s" % (user, password)).encode()).strip()


def _sha_bytes(sha256):
    if sha256 is None:
        return None
    if isinstance(sha256, str):
        from binascii import unhexlify

        if len(sha256) != 64:
            raise ValueError("sha256: expected 64 hex digits")
        return unhexlify(sha256)
    if len(sha256) != 32:
        raise ValueError("sha256: expected 32 bytes")
    return bytes(sha256)


def _text(e):
    s = str(e).strip()
    return s or type(e).__name__


def open_socket(host, port, ctx, timeout):
    """A blocking socket to host:port with `timeout` seconds per operation, TLS through ctx
    (server_hostname = host) when ctx is not None."""
    import socket

    where = "%s:%d" % (host, port)
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    except OSError as e:
        raise HTTPConnectionError("cannot resolve %s: %s" % (host, _text(e)))
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(ai[-1])
    except OSError as e:
        s.close()
        raise HTTPConnectionError("connect to %s failed: %s" % (where, _text(e)))
    if ctx is None:
        return s
    try:
        return ctx.wrap_socket(s, server_hostname=host)
    except (OSError, ValueError, MemoryError) as e:
        s.close()
        m = hal.tls_oom(e, where)
        if m:
            raise MemoryError(m)
        err = HTTPConnectionError("TLS handshake with %s failed: %s" % (where, _text(e)))
        err.tls = True
        raise err


class Download:
    """One download, run by step(); see the module comment. `opener(host, port, ctx, timeout)`
    replaces open_socket (tests). The sink needs write(buf); seek(0) to start over after a 200
    to a range request; sha256_prefix(h, n) for sha256 with offset > 0."""

    def __init__(self, url, sink, offset=0, sha256=None, user=None, password=None, ca=None,
                 timeout=30, ssl_context=None, chunk=CHUNK, max_size=1 << 24, retries=3,
                 opener=None):
        self.tls, self.host, self.port, self.path = parse_url(url)
        if user is not None and not self.tls:
            raise ValueError("credentials over plain http:// refused (use https://)")
        self.sink = sink
        self.timeout = timeout
        self.max_size = max_size
        self.retries = retries
        self.size = None  # total body size once known
        self.received = offset  # body bytes the sink holds
        self.done = False
        self.attempts = 0  # connections opened
        self.restarts = 0  # times the server ignored Range and we started over
        self._auth = _basic(user, password) if user is not None else None
        self._want = _sha_bytes(sha256)
        self._h = None
        if self._want is not None:
            import hashlib

            self._h = hashlib.sha256()
            if offset:
                f = getattr(sink, "sha256_prefix", None)
                if f is None:
                    raise ValueError("sha256 with offset %d: the sink cannot hash the %d bytes "
                                     "it holds (no sha256_prefix)" % (offset, offset))
                f(self._h, offset)
        self._ctx = ssl_context
        self._ca = ca
        self._open = opener or open_socket
        self._buf = bytearray(chunk)
        self._mv = memoryview(self._buf)
        self._s = None
        self._head = None
        self._fails = 0  # connection failures since the last progress
        self._ranged = False  # the request of this connection asked for a range

    # -- driving ---------------------------------------------------------------------------------

    def step(self):
        """Do one piece of work (connect and send, or read one chunk); True when done."""
        if self.done:
            return True
        try:
            if self._s is None:
                self._connect()
            elif self._head is not None and not self._head.done:
                self._read_head()
            else:
                self._read_body()
        except HTTPConnectionError as e:
            self._drop()
            if getattr(e, "tls", False):
                raise
            self._fails += 1
            if self._fails > self.retries:
                err = HTTPConnectionError("%s (at byte %d, after %d attempts)" % (
                    e.args[0], self.received, self.attempts))
                err.offset = self.received
                raise err
        except BaseException:
            self._drop()
            raise
        return self.done

    def run(self):
        while not self.step():
            pass
        return self

    def close(self):
        self._drop()

    # -- internals ----------------------------------------------------------------------------

    def _drop(self):
        s, self._s = self._s, None
        self._head = None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def _context(self):
        if self._ctx is None and self.tls:
            from .tlsctx import tls_context

            ca = self._ca
            if ca is None:
                self._ctx = tls_context()
            elif isinstance(ca, str):
                self._ctx = tls_context(cafile=ca)
            else:
                self._ctx = tls_context(cadata=ca)
        return self._ctx

    def _connect(self):
        ctx = self._context() if self.tls else None
        self.attempts += 1
        s = self._open(self.host, self.port, ctx, self.timeout)
        self._s = s
        self._head = Head(self.max_size)
        self._ranged = self.received > 0
        host = self.host if self.port == (443 if self.tls else 80) else "%s:%d" % (self.host,
                                                                                  self.port)
        req = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: microcot\r\nConnection: close\r\n" % (
            self.path.encode(), host.encode())
        if self._ranged:
            req += b"Range: bytes=%d-\r\n" % self.received
        if self._auth is not None:
            req += b"Authorization: " + self._auth + b"\r\n"
        req += b"\r\n"
        self._send(s, req)
        req = None

    def _send(self, s, data):
        mv = memoryview(data)
        try:
            while mv:
                n = s.write(mv) if _MP or not hasattr(s, "send") else s.send(mv)
                if n is None:
                    continue
                mv = mv[n:]
        except OSError as e:
            raise HTTPConnectionError("sending the request to %s failed: %s" % (self.host,
                                                                                _text(e)))

    def _recv(self, n):
        s = self._s
        try:
            got = s.recv_into(self._buf, n) if hasattr(s, "recv_into") else s.readinto(self._buf, n)
        except OSError as e:  # CPython's timeouts and ssl errors are OSErrors too
            raise HTTPConnectionError("reading from %s failed: %s" % (self.host, _text(e)))
        if not got:
            raise HTTPConnectionError("%s closed the connection" % self.host)
        return got

    def _read_head(self):
        n = self._recv(len(self._buf))
        h = self._head
        used = h.feed(self._buf, n)
        if not h.done:
            return
        self._check(h)
        if used < n:
            self._body(self._mv[used:n])

    def _check(self, h):
        st = h.status
        at = self.received
        if 300 <= st < 400:
            raise HTTPStatusError(st, "redirect to %s not followed" % (h.location or "?"), at)
        if st not in (200, 206):
            raise HTTPStatusError(st, h.reason or "unexpected status", at)
        if h.chunked:
            raise HTTPStatusError(st, "chunked transfer-encoding is not supported", at)
        if st == 206:
            if not self._ranged or h.range is None:
                raise HTTPStatusError(st, "partial content without a matching request or "
                                          "Content-Range", at)
            first, last, total = h.range
            if first != at:
                raise HTTPStatusError(st, "Content-Range starts at %d, asked for %d" % (first, at),
                                      at)
            if total is None or (self.size is not None and total != self.size):
                raise HTTPStatusError(st, "Content-Range total %r, expected %r (the file "
                                          "changed?)" % (total, self.size), at)
            if h.length is not None and h.length != last + 1 - first:
                raise HTTPStatusError(st, "Content-Length does not match Content-Range", at)
            self.size = total
        else:
            if h.length is None:
                raise HTTPStatusError(st, "no Content-Length", at)
            if self.size is not None and h.length != self.size:
                raise HTTPStatusError(st, "size %d, expected %d (the file changed?)"
                                      % (h.length, self.size), at)
            if at:
                # the server ignored the range: start over
                seek = getattr(self.sink, "seek", None)
                if seek is None:
                    raise HTTPStatusError(st, "server ignored Range and the sink cannot "
                                              "start over", at)
                seek(0)
                self.received = 0
                self.restarts += 1
                if self._h is not None:
                    import hashlib

                    self._h = hashlib.sha256()
            self.size = h.length
        if self.received >= self.size:
            self._finish()

    def _read_body(self):
        left = self.size - self.received
        n = self._recv(min(left, len(self._buf)))
        self._body(self._mv[:n])

    def _body(self, mv):
        left = self.size - self.received
        if len(mv) > left:
            mv = mv[:left]  # a server sending more than it announced: the rest is ignored
        self.sink.write(mv)
        if self._h is not None:
            self._h.update(mv)
        self.received += len(mv)
        self._fails = 0
        if self.received >= self.size:
            self._finish()

    def _finish(self):
        self._drop()
        if self._h is not None:
            got = self._h.digest()
            if got != self._want:
                from binascii import hexlify

                e = ChecksumError("SHA-256 mismatch over %d bytes: got %s" % (
                    self.received, str(hexlify(got), "ascii")))
                e.offset = self.received
                raise e
        self.done = True


def download(url, sink, offset=0, sha256=None, user=None, password=None, ca=None, timeout=30,
             **kw):
    """Download url into sink to the end (see Download); returns the Download."""
    d = Download(url, sink, offset, sha256, user, password, ca, timeout, **kw)
    try:
        return d.run()
    finally:
        d.close()
