# microcot.httpget without a network: the response-head parser fed in every split, and the
# download state machine against fake sockets (drops, resume with Range, a server ignoring
# Range, redirects, chunked, bad checksums). Runs on CPython and on boards.
import hashlib
from binascii import hexlify

from dt import Rng, raises

from microcot import httpget as H

HEAD = (b"HTTP/1.1 206 Partial Content\r\nServer: x\r\nContent-Length: 100\r\n"
        b"Content-Range: bytes 100-199/200\r\nX-Long: " + b"a" * 700 + b"\r\n"
        b"Connection: close\r\n\r\nBODY")


def _feed_all(data, cut):
    h = H.Head()
    i = 0
    while not h.done:
        piece = bytearray(data[i:i + cut])
        assert piece, "head not complete"
        used = h.feed(piece, len(piece))
        i += used
        if not h.done:
            assert used == len(piece)
    return h, data[i:]


def test_head_parser_in_any_split():
    for cut in (1, 2, 3, 7, 64, 1024, 4096):
        h, rest = _feed_all(HEAD, cut)
        assert h.status == 206 and h.reason == "Partial Content"
        assert h.length == 100 and h.range == (100, 199, 200) and h.close
        assert not h.chunked and h.location is None
        assert rest == b"BODY"


def test_head_parser_refusals():
    def one(data, **kw):
        h = H.Head(**kw)
        h.feed(bytearray(data), len(data))
        return h

    raises(H.HTTPProtocolError, one, b"SSH-2.0-OpenSSH\r\n")
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 2000 OK\r\n")
    e = raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
               max_size=1000)
    assert "99999999" in str(e) and "1000" in str(e)
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n")
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
                                     b"Content-Length: 2\r\n\r\n")
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n")
    e = raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\nLocation: /" + b"x" * 600 + b"\r\n")
    assert "location" in str(e)
    raises(H.HTTPProtocolError, one, b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 70)
    h = one(b"HTTP/1.0 302 Found\nLocation: https://elsewhere/x\nTransfer-Encoding: chunked\n\n")
    assert h.done and h.status == 302 and h.location == "https://elsewhere/x" and h.chunked


def test_content_range_and_url():
    assert H.parse_content_range(b"bytes 0-0/1") == (0, 0, 1)
    assert H.parse_content_range(b"bytes 5-9/*") == (5, 9, None)
    for bad in (b"bytes 9-5/10", b"bytes 0-10/10", b"items 0-1/2", b"bytes 0-1", b"bytes x-1/2"):
        raises(H.HTTPProtocolError, H.parse_content_range, bad)
    assert H.parse_url("https://h.example/a/b?c=1") == (True, "h.example", 443, "/a/b?c=1")
    assert H.parse_url("http://h:8080") == (False, "h", 8080, "/")
    assert H.parse_url("https://[::1]:8443/x") == (True, "::1", 8443, "/x")
    raises(ValueError, H.parse_url, "ftp://h/x")
    raises(ValueError, H.parse_url, "https://u:p@h/x")
    raises(ValueError, H.parse_url, "https://h:x/")
    # credentials never travel over plain http
    raises(ValueError, H.Download, "http://h/x", None, user="u", password="p")


class FakeSock:
    """Serves `data` (one response), `cut` bytes at most per read; raises after `drop_at`."""

    def __init__(self, data, cut, drop_at=None):
        self.data = data
        self.cut = cut
        self.pos = 0
        self.drop_at = drop_at
        self.sent = b""
        self.closed = False

    def write(self, b):
        self.sent += bytes(b)
        return len(b)

    def readinto(self, buf, n):
        if self.drop_at is not None and self.pos >= self.drop_at:
            raise OSError(104)  # ECONNRESET
        n = min(n, self.cut, len(self.data) - self.pos)
        if self.drop_at is not None:
            n = min(n, self.drop_at - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self):
        self.closed = True


class Server:
    """An opener: each connection answers the next request like a file server would."""

    def __init__(self, body, cut=300, drops=(), ignore_range=False, auth=None):
        self.body = body
        self.cut = cut
        self.drops = list(drops)  # body bytes after which connection k breaks
        self.ignore_range = ignore_range
        self.socks = []

    def __call__(self, host, port, ctx, timeout):
        s = FakeSock(b"", self.cut)
        s.srv = self
        orig = s.readinto

        def readinto(buf, n):
            if not s.data:
                s.data, head_len = self.answer(s.sent)
                if self.drops:
                    s.drop_at = head_len + self.drops.pop(0)
            return orig(buf, n)

        s.readinto = readinto
        self.socks.append(s)
        return s

    def answer(self, req):
        assert req.endswith(b"\r\n\r\n")
        first = 0
        i = req.find(b"Range: bytes=")
        if i >= 0 and not self.ignore_range:
            first = int(req[i + 13:req.find(b"-", i + 13)])
        part = self.body[first:]
        if first:
            head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n" % (
                first, len(self.body) - 1, len(self.body))
        else:
            head = b"HTTP/1.1 200 OK\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(part)
        return head + part, len(head)


class Sink:
    def __init__(self):
        self.data = bytearray()
        self.seeks = 0

    def write(self, b):
        self.data.extend(b)
        return len(b)

    def seek(self, pos):
        self.seeks += 1
        self.data = self.data[:pos]


FAKE_TLS = "no TLS: the fake sockets are plain"


def _D(*a, **kw):
    kw.setdefault("ssl_context", FAKE_TLS)
    return H.Download(*a, **kw)


def _dl(*a, **kw):
    kw.setdefault("ssl_context", FAKE_TLS)
    return H.download(*a, **kw)


def _body(n, seed=7):
    return Rng(seed).bytes(n)


def _sha(b):
    return str(hexlify(hashlib.sha256(b).digest()), "ascii")


def test_download_whole_and_step_by_step():
    body = _body(5000)
    srv = Server(body, cut=333)
    sink = Sink()
    d = _D("https://dev.example/inventory/binaries/7", sink, sha256=_sha(body),
                   user="t1/device_x", password="s3cret", opener=srv)
    steps = 0
    while not d.step():
        steps += 1
        assert len(sink.data) == d.received
    assert bytes(sink.data) == body and d.size == 5000 and d.attempts == 1
    assert steps >= 5000 // 1024  # one chunk (at most 1 KiB) per step
    req = srv.socks[0].sent
    assert req.startswith(b"GET /inventory/binaries/7 HTTP/1.1\r\nHost: dev.example\r\n")
    assert b"Authorization: Basic dDEvZGV2aWNlX3g6czNjcmV0\r\n" in req and b"Range" not in req
    assert srv.socks[0].closed


def test_download_resumes_with_range_after_drops():
    body = _body(4000, 3)  # the ESP32 model: no 6 KB in one piece late in the suite
    srv = Server(body, cut=1024, drops=(2500, 100))
    sink = Sink()
    d = _dl("https://h/fw.bin", sink, sha256=hashlib.sha256(body).digest(), opener=srv)
    assert bytes(sink.data) == body and d.attempts == 3 and sink.seeks == 0
    assert b"Range" not in srv.socks[0].sent
    assert b"Range: bytes=2500-\r\n" in srv.socks[1].sent
    assert b"Range: bytes=2600-\r\n" in srv.socks[2].sent


def test_download_starts_over_when_range_is_ignored():
    body = _body(3000, 5)
    srv = Server(body, drops=(1000,), ignore_range=True)
    sink = Sink()
    d = _dl("https://h/fw.bin", sink, sha256=_sha(body), opener=srv)
    assert bytes(sink.data) == body and d.restarts == 1 and sink.seeks == 1


def test_download_gives_up_after_retries_without_progress():
    body = _body(3000, 9)
    srv = Server(body, drops=(1200, 0, 0, 0, 0))
    e = raises(H.HTTPConnectionError, _dl, "https://h/x", Sink(), opener=srv, retries=3)
    assert e.offset == 1200 and "at byte 1200" in str(e)


def test_download_refuses_a_wrong_checksum_and_bad_answers():
    body = _body(2000, 11)
    e = raises(H.ChecksumError, _dl, "https://h/x", Sink(), sha256="00" * 32,
               opener=Server(body))
    assert e.offset == 2000 and _sha(body) in str(e)

    def answering(resp):
        def opener(host, port, ctx, timeout):
            return FakeSock(resp, 100)
        return opener

    e = raises(H.HTTPStatusError, _dl, "https://h/x", Sink(),
               opener=answering(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"))
    assert e.status == 401 and "Unauthorized" in str(e)
    e = raises(H.HTTPStatusError, _dl, "https://h/x", Sink(), opener=answering(
        b"HTTP/1.1 302 Found\r\nLocation: https://evil/x\r\nContent-Length: 0\r\n\r\n"))
    assert e.status == 302 and "https://evil/x" in str(e)
    e = raises(H.HTTPStatusError, _dl, "https://h/x", Sink(), opener=answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
    assert "chunked" in str(e)
    e = raises(H.HTTPStatusError, _dl, "https://h/x", Sink(), opener=answering(
        b"HTTP/1.1 200 OK\r\n\r\nno length"))
    assert "Content-Length" in str(e)
    # a 206 whose range is not what was asked for
    e = raises(H.HTTPStatusError, _dl, "https://h/x", Sink(), offset=0, opener=answering(
        b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-1/2\r\nContent-Length: 2\r\n\r\nab"))
    assert e.status == 206


def test_resume_from_an_offset_hashes_what_the_sink_holds():
    body = _body(4000, 13)

    class Held(Sink):
        def sha256_prefix(self, h, n):
            h.update(bytes(self.data[:n]))

    sink = Held()
    sink.data.extend(body[:1500])
    srv = Server(body)
    d = _dl("https://h/x", sink, offset=1500, sha256=_sha(body), opener=srv)
    assert bytes(sink.data) == body and d.received == 4000
    assert b"Range: bytes=1500-\r\n" in srv.socks[0].sent
    raises(ValueError, H.Download, "https://h/x", Sink(), offset=10, sha256=_sha(body))
