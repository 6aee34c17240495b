# WebSocket core vectors (RFC 6455, RFC 7692): microcot.wsframe and microcot.wspmd on CPython and
# on a board (`pytest --board virtual tests/device/test_ws.py`). Small data only: ~100 KB heap.
from dt import Rng, raises

from microcot import wsframe as F
from microcot import wspmd as P

H = bytes.fromhex


def test_accept_key_rfc6455_example():
    # RFC 6455 1.3 / 4.2.2
    assert F.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert F.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_key_is_16_random_bytes_base64():
    from binascii import a2b_base64

    a, b = F.make_key(), F.make_key()
    assert len(a) == 24 and len(a2b_base64(a)) == 16
    assert a != b


def _lines(req):
    text = req.decode()
    assert text.endswith("\r\n\r\n")
    return text[:-4].split("\r\n")


def test_request_headers():
    ls = _lines(F.request("example.com", 80, "/chat?x=1", "KEY==", "chat, superchat",
                          "http://example.com", "permessage-deflate",
                          {"Authorization": "Bearer abc"}))
    assert ls[0] == "GET /chat?x=1 HTTP/1.1"
    for h in ("Host: example.com", "Upgrade: websocket", "Connection: Upgrade",
              "Sec-WebSocket-Key: KEY==", "Sec-WebSocket-Version: 13",
              "Sec-WebSocket-Protocol: chat, superchat", "Origin: http://example.com",
              "Sec-WebSocket-Extensions: permessage-deflate", "Authorization: Bearer abc"):
        assert h in ls, h
    assert "Host: h:8080" in _lines(F.request("h", 8080, "/", "K"))
    assert "Host: h" in _lines(F.request("h", 443, "/", "K", tls=True))
    assert "Host: h:443" in _lines(F.request("h", 443, "/", "K"))
    assert "Host: [::1]:9000" in _lines(F.request("::1", 9000, "/", "K"))
    assert _lines(F.request("h", 80, "", "K"))[0] == "GET / HTTP/1.1"
    ls = _lines(F.request("h", 80, "/", "K"))
    assert not [x for x in ls if x.startswith(("Origin", "Sec-WebSocket-Protocol",
                                               "Sec-WebSocket-Extensions"))]


def test_request_refuses_header_injection():
    for bad in ({"X": "a\r\nEvil: 1"}, {"Bad Name": "v"}, {"X": "a\nb"}, {"": "v"}):
        e = raises(F.HandshakeError, F.request, "h", 80, "/", "K", headers=bad)
        assert e.status == F.WS_STATUS_CONNECT_REQ_INTERNAL_ERROR
    e = raises(F.HandshakeError, F.request, "h", 80, "/a b", "K")
    assert e.status == F.WS_STATUS_CONNECT_REQ_INTERNAL_ERROR
    raises(F.HandshakeError, F.request, "h", 80, "no-slash", "K")


KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACC = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _resp(status=101, extra=(), upgrade="websocket", connection="Upgrade", accept=ACC):
    ls = ["HTTP/1.1 %d Whatever" % status]
    if upgrade:
        ls.append("Upgrade: " + upgrade)
    if connection:
        ls.append("Connection: " + connection)
    if accept:
        ls.append("Sec-WebSocket-Accept: " + accept)
    ls.extend(extra)
    return "\r\n".join(ls).encode()


def _check(head, protocols=()):
    st, _, hdrs = F.parse_response(head)
    return F.check_response(st, hdrs, KEY, protocols)


def test_response_accepted():
    assert _check(_resp()) == ""
    assert _check(_resp(upgrade="WebSocket", connection="keep-alive, Upgrade")) == ""
    assert _check(_resp(extra=["Sec-WebSocket-Protocol: chat"]), ["chat", "x"]) == "chat"
    st, reason, hdrs = F.parse_response(_resp(extra=["X-A: 1", "x-a: 2"]))
    assert st == 101 and reason == "Whatever" and hdrs["x-a"] == "1, 2"


def _status(head, protocols=()):
    e = raises(F.HandshakeError, _check, head, protocols)
    return e.status, e.http


def test_response_refused_or_invalid():
    assert _status(_resp(401)) == (F.WS_STATUS_CONNECT_RES_REJECT, 401)
    assert _status(_resp(503)) == (F.WS_STATUS_CONNECT_RES_REJECT, 503)
    assert _status(_resp(200)) == (F.WS_STATUS_CONNECT_RES_INVALID_STATUS, 200)
    assert _status(_resp(302)) == (F.WS_STATUS_CONNECT_RES_INVALID_STATUS, 302)
    assert _status(_resp(upgrade="h2c"))[0] == F.WS_STATUS_CONNECT_RES_INVALID
    assert _status(_resp(upgrade=None))[0] == F.WS_STATUS_CONNECT_RES_INVALID
    assert _status(_resp(connection="close"))[0] == F.WS_STATUS_CONNECT_RES_INVALID
    assert _status(_resp(accept=None))[0] == F.WS_STATUS_CONNECT_RES_ACCEPT_INVALID
    assert _status(_resp(accept="x3JJHMbDL1EzLkh9GBhXDw=="))[0] == \
        F.WS_STATUS_CONNECT_RES_ACCEPT_INVALID_HASH
    # a subprotocol the client did not offer
    assert _status(_resp(extra=["Sec-WebSocket-Protocol: other"]), ["chat"])[0] == \
        F.WS_STATUS_CONNECT_RES_INVALID
    for bad in (b"HTTP/1.1\r\n", b"SIP/2.0 101 x", b"HTTP/1.1 1x1 x", b"garbage",
                b"HTTP/1.1 101 OK\r\nno colon here", b"HTTP/1.1 101 OK\r\n: empty"):
        e = raises(F.HandshakeError, F.parse_response, bad)
        assert e.status == F.WS_STATUS_CONNECT_RES_PARSE_ERROR, bad


MASK = H("37fa213d")


def test_rfc6455_5_7_examples_encode():
    assert F.encode(F.OP_TEXT, b"Hello") == H("810548656c6c6f")
    assert F.encode(F.OP_TEXT, b"Hello", key=MASK) == H("818537fa213d7f9f4d5158")
    assert F.encode(F.OP_TEXT, b"Hel", fin=False) == H("010348656c")
    assert F.encode(F.OP_CONT, b"lo") == H("80026c6f")
    assert F.encode(F.OP_PING, b"Hello") == H("890548656c6c6f")
    assert F.encode(F.OP_PONG, b"Hello", key=MASK) == H("8a8537fa213d7f9f4d5158")
    assert F.encode(F.OP_BINARY, bytes(256))[:4] == H("827e0100")
    b, n = F.header(F.OP_BINARY, 65536)
    assert b[:n] == H("827f0000000000010000")
    b, n = F.header(F.OP_TEXT, 65536, key=MASK)
    assert b[:n] == H("81ff0000000000010000") + MASK
    b, n = F.header(F.OP_TEXT, 125, rsv1=True)
    assert b[:n] == H("c17d")
    b, n = F.header(F.OP_TEXT, 126, fin=False)
    assert b[:n] == H("017e007e")


def _feed_all(r, data, step=0):
    """Feed data (in `step`-byte pieces, 0: at once); return the events."""
    evs = []
    mv = memoryview(data)
    i = 0
    while i < len(data):
        end = len(data) if not step else min(len(data), i + step)
        used, ev = r.feed(mv[i:end])
        i += used
        if ev:
            if ev[0] == "msg":
                ev = ("msg", ev[1], bytes(r.buf[:ev[2]]), ev[3])
            evs.append(ev)
    return evs


def test_rfc6455_5_7_examples_decode():
    stream = H("810548656c6c6f") + H("010348656c") + H("890548656c6c6f") + H("80026c6f") + \
        H("8a0548656c6c6f") + H("827e0100") + bytes(range(256)) + H("880203e8")
    want = [("msg", 1, b"Hello", False), ("ping", b"Hello"), ("msg", 1, b"Hello", False),
            ("pong", b"Hello"), ("msg", 2, bytes(range(256)), False), ("close", 1000, b"")]
    for step in (0, 1, 3, 7):
        assert _feed_all(F.Reader(), stream, step) == want, step


def test_reader_direct_payload_reads():
    r = F.Reader()
    used, ev = r.feed(memoryview(H("827e0100")))
    assert (used, ev) == (4, None)
    t = r.target()
    assert len(t) == 256
    t[:100] = bytes(100)
    assert r.got(100) is None
    t = r.target()
    assert len(t) == 156
    t[:] = b"\x01" * 156
    ev = r.got(156)
    assert ev == ("msg", 2, 256, False)
    assert bytes(r.buf[:256]) == bytes(100) + b"\x01" * 156
    assert r.target() is None


def _perr(data, code=1002, status=None, **kw):
    e = raises(F.ProtocolError, _feed_all, F.Reader(**kw), data)
    assert e.code == code, (data, e.code, e.msg)
    if status is not None:
        assert e.status == status
    return e


def test_reader_protocol_errors():
    P_ = F.WS_STATUS_PROTOCOL_ERROR
    _perr(H("818548656c6c6f00000000"), status=P_)  # masked server frame
    _perr(H("c10548656c6c6f"))  # RSV1 without an extension
    _perr(H("a10548656c6c6f"))  # RSV2
    _perr(H("910548656c6c6f"))  # RSV3
    for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15):
        _perr(bytes((0x80 | op, 0)))
    _perr(H("0900"))  # fragmented ping
    _perr(H("897e007e") + bytes(126))  # ping over 125 bytes
    _perr(H("80026c6f"))  # continuation without a message
    _perr(H("010348656c") + H("8103414243"))  # text inside a fragmented message
    _perr(H("827f8000000000000001") + b"x")  # 64-bit length with the top bit
    _perr(H("c9026869"), rsv1=True)  # RSV1 on a control frame, even with deflate
    _perr(H("410348656c") + H("c0026c6f"), rsv1=True)  # RSV1 on a continuation
    _perr(H("8801") + b"\x03")  # close with a 1-byte payload
    _perr(H("880203ed"))  # close code 1005 is never sent


def test_reader_limits_decided_from_the_header():
    S = F.WS_STATUS_INVALID_MSG_SIZE
    # a frame announcing 1 GiB: refused from the 10 header bytes, nothing allocated
    r = F.Reader(0x10000, 0x100000)
    e = raises(F.ProtocolError, r.feed, memoryview(H("827f0000000040000000")))
    assert e.code == 1009 and e.status == S and len(r.buf) == 0
    r = F.Reader(0x10000, 0x100000)
    e = raises(F.ProtocolError, r.feed, memoryview(H("827fffffffff00000000")[:2] +
                                                   H("0000000100000000")))
    assert e.code == 1009
    # frame limit
    _perr(H("827e0101") + bytes(257), 1009, S, max_frame=256)
    assert _feed_all(F.Reader(256, 1024), H("827e0100") + bytes(256))[0][2] == bytes(256)
    # message limit over fragments: 3 x 100 bytes > 250
    r = F.Reader(256, 250)
    frag = H("0264") + bytes(100) + H("0064") + bytes(100) + H("8064") + bytes(100)
    e = raises(F.ProtocolError, _feed_all, r, frag)
    assert e.code == 1009 and e.status == S
    assert len(r.buf) <= 250
    # the buffer grows only with the data, never past the frame's declared end
    r = F.Reader(0x10000, 0x100000)
    _feed_all(r, H("8205") + b"12345")
    assert len(r.buf) == 5
    _feed_all(r, H("827e0400") + bytes(1024))
    assert len(r.buf) == 1024


def test_response_status_must_be_ascii_digits():
    # "²²²" passed str.isdigit() and made int() raise ValueError (an undocumented error)
    for line in ("HTTP/1.1 ²²² x", "HTTP/1.1 １０１ OK", "HTTP/1.1 1٠1 x"):
        e = raises(F.HandshakeError, F.parse_response, line.encode())
        assert e.status == F.WS_STATUS_CONNECT_RES_PARSE_ERROR


def test_pmd_window_bits_must_be_ascii_digits():
    for v in ("²", "1²", "９"):
        e = raises(F.HandshakeError, P.accept, "permessage-deflate; server_max_window_bits=" + v,
                   {"client_max_window_bits": True})
        assert e.status == F.WS_STATUS_CONNECT_RES_INVALID_EXTENSION


def test_tls_any_value_but_none_or_false_means_tls():
    from microcot import wstls

    assert wstls.tls_of(None) is None and wstls.tls_of(False) is None
    for v in ({}, True, wstls.Tls(), {"ca": "/x.der"}):
        t = wstls.tls_of(v)
        assert t is not None and not t.no_server_cert_check, v


def test_fragmented_text_with_interleaved_controls_and_utf8_across_fragments():
    euro = "€".encode()  # e2 82 ac split over three frames
    data = bytes((0x01, 1)) + euro[:1] + H("8900") + bytes((0x00, 1)) + euro[1:2] + \
        H("8a0161") + bytes((0x80, 2)) + euro[2:] + b"!"
    assert _feed_all(F.Reader(), data, 1) == [("ping", b""), ("pong", b"a"),
                                              ("msg", 1, euro + b"!", False)]
    # an invalid sequence fails as soon as its bytes arrive, before the message ends
    r = F.Reader()
    r.feed(memoryview(bytes((0x01, 2)) + b"\xf4\x90"[:1]))
    e = raises(F.ProtocolError, r.feed, memoryview(b"\x90"))
    assert e.code == 1007
    # a message that ends inside a sequence
    _perr(bytes((0x81, 2)) + euro[:2], 1007)
    # binary messages are not checked
    assert _feed_all(F.Reader(), H("8202c0af"))[0][2] == H("c0af")


def test_close_payloads():
    assert F.parse_close(b"") == (1005, b"")
    assert F.parse_close(H("03e8")) == (1000, b"")
    assert F.parse_close(H("0fa0") + b"bye") == (4000, b"bye")
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000,
                 3999, 4000, 4999):
        assert F.valid_close_code(code)
        assert F.parse_close(bytes((code >> 8, code & 255)))[0] == code
        assert F.close_payload(code) == bytes((code >> 8, code & 255))
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        assert not F.valid_close_code(code)
        e = raises(F.ProtocolError, F.parse_close, bytes((code >> 8, code & 255)))
        assert e.code == 1002
        raises(ValueError, F.close_payload, code)
    e = raises(F.ProtocolError, F.parse_close, H("03e8") + b"\xed\xa0\x80")
    assert e.code == 1007
    raises(F.ProtocolError, F.parse_close, b"\x03")
    assert F.close_payload(1000, "x" * 123)[2:] == b"x" * 123
    raises(ValueError, F.close_payload, 1000, "x" * 124)
    assert F.close_payload(None) == b""


VALID = [b"", b"Hello", "κόσμε".encode(), H("00"), H("7f"), H("c280"), H("dfbf"), H("e0a080"),
         H("ed9fbf"), H("ee8080"), H("efbfbf"), H("efbfbd"), H("f0908080"), H("f48fbfbf"),
         "€𝄞".encode()]
INVALID = [H("80"), H("bf"), H("c0af"), H("c1bf"), H("e080af"), H("e09fbf"), H("f08080af"),
           H("f08fbfbf"), H("eda080"), H("edbfbf"), H("eda080edb080"), H("f4908080"),
           H("f7bfbfbf"), H("f888808080"), H("fe"), H("ff"), H("c2"), H("e282"), H("f09d84"),
           H("c220"), H("e28220")]


def test_utf8_vectors_on_every_variant():
    for v in (F.utf8_variant(), "python"):
        for s in VALID:
            u = F.Utf8(v)
            assert u.feed(s) and u.done(), (v, s)
        for s in INVALID:
            u = F.Utf8(v)
            assert not (u.feed(s) and u.done()), (v, s)
    assert F.valid_utf8("Grüße".encode()) and not F.valid_utf8(H("c0"))


def test_utf8_incremental_fail_fast_and_split():
    for v in (F.utf8_variant(), "python"):
        u = F.Utf8(v)
        s = "a€𝄞b".encode()
        for i in range(len(s)):
            assert u.feed(s, i, i + 1), (v, i)
        assert u.done()
        u = F.Utf8(v)
        assert u.feed(H("f4"))  # could still become valid
        assert not u.feed(H("90"))  # U+110000 and up: rejected at once
        assert not u.feed(b"a")  # stays rejected
        u = F.Utf8(v)
        assert u.feed(H("e282")) and not u.done()


def test_utf8_dfa_agrees_with_the_reference_on_random_input():
    r = Rng(5)
    alphabet = H("00417f80bfc0c1c2dfe0e1ecedeeeff0f1f3f4f5ff")
    for _ in range(300):
        s = bytes(alphabet[r.below(len(alphabet))] for _ in range(r.below(8)))
        a = F.Utf8("python")
        b = F.Utf8()
        assert (a.feed(s) and a.done()) == (b.feed(s) and b.done()), s


def test_masking():
    r = Rng(9)
    for n in (0, 1, 3, 4, 5, 255, 256, 257, 1000):
        data = r.bytes(n)
        key = r.bytes(4)
        for start in (0, 1, 14):
            buf = bytearray(start) + bytearray(data)
            F.mask(buf, start, start + n, key)
            ref = bytearray(start) + bytearray(data)
            F.mask_py(ref, start, start + n, key)
            assert buf == ref, (n, start)
            assert bytes(buf[start:]) == bytes(data[i] ^ key[i & 3] for i in range(n))
            F.mask(buf, start, start + n, key)
            assert bytes(buf[start:]) == data
    assert F.mask_variant() in ("viper", "python")


def test_pmd_offer_and_accept():
    assert P.offer({"client_max_window_bits": True}) == \
        "permessage-deflate; client_max_window_bits"
    assert P.offer({"server_no_context_takeover": True, "server_max_window_bits": 10}) == \
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
    raises(ValueError, P.offer, {"server_max_window_bits": 7})
    opts = {"client_max_window_bits": True}
    assert P.accept("", opts) is None
    cfg = P.accept("permessage-deflate; server_max_window_bits=12; client_max_window_bits=10;"
                   " server_no_context_takeover", opts)
    assert cfg == {"snct": True, "cnct": False, "sbits": 12, "cbits": 10}
    cfg = P.accept('permessage-deflate; client_no_context_takeover', {})
    assert cfg == {"snct": False, "cnct": True, "sbits": 15, "cbits": 15}
    cfg = P.accept('permessage-deflate; server_max_window_bits=9', {"server_max_window_bits": 12})
    assert cfg["sbits"] == 9
    E = F.WS_STATUS_CONNECT_RES_INVALID_EXTENSION
    for bad, o in (("x-webkit-deflate-frame", opts), ("permessage-deflate, permessage-deflate",
                                                     opts),
                   ("permessage-deflate; foo", opts), ("permessage-deflate; client_max_window_bits=10",
                                                      {}),
                   ("permessage-deflate; server_max_window_bits=16", opts),
                   ("permessage-deflate; server_max_window_bits", opts),
                   ("permessage-deflate; server_max_window_bits=12", {"server_max_window_bits": 10}),
                   ("permessage-deflate", {"server_max_window_bits": 10}),
                   ("permessage-deflate; server_no_context_takeover=1", opts),
                   ("permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                    opts)):
        e = raises(F.HandshakeError, P.accept, bad, o)
        assert e.status == E, bad


HELLO_C = H("f248cdc9c90700")  # RFC 7692 7.2.3.1


def test_pmd_inflate_rfc7692_examples():
    if not P.inflate_available():
        return
    for v in (HELLO_C, H("0005 00faff48656c6c6f".replace(" ", "")), H("f348cdc9c9070000"),
              H("f248050000 00ffffcac9c90700".replace(" ", ""))):
        assert bytes(P.Inflater(9, False).inflate(v, 100)) == b"Hello", v
    # 7.2.3.2: the second message refers back into the first (context takeover)
    i = P.Inflater(9, True)
    assert bytes(i.inflate(HELLO_C, 100)) == b"Hello"
    assert bytes(i.inflate(H("f200110000"), 100)) == b"Hello"
    assert bytes(i.inflate(H("f200110000"), 100)) == b"Hello"
    # without takeover that back-reference cannot be resolved
    i = P.Inflater(9, False)
    i.inflate(HELLO_C, 100)
    try:
        out = bytes(i.inflate(H("f200110000"), 100))
    except F.ProtocolError as e:
        assert e.status == F.WS_STATUS_DECOMPRESS_ERROR
    else:
        assert out != b"Hello"


def test_pmd_inflate_errors_and_limit():
    if not P.inflate_available():
        return
    e = raises(F.ProtocolError, P.Inflater(9).inflate, H("ffffffff"), 100)
    assert e.status == F.WS_STATUS_DECOMPRESS_ERROR and e.code == 1007
    # 1000 zero bytes deflate to 11 bytes: a limit of 999 refuses them, 1000 takes them
    zeros = H("62601805a360140c770000")
    assert bytes(P.Inflater(9).inflate(zeros, 1000)) == bytes(1000)
    e = raises(F.ProtocolError, P.Inflater(9).inflate, zeros, 999)
    assert e.status == F.WS_STATUS_INVALID_MSG_SIZE and e.code == 1009


def test_pmd_deflate_roundtrip_where_available():
    d = P.Deflater(9, True)
    if not d.ok:
        # MicroPython compresses only without context takeover, and only with compression built in
        assert P.Deflater(9, False).ok == P.compress_available()
        return
    i = P.Inflater(9, True)
    for msg in (b"Hello", b"Hello", b"abc" * 100, b""):
        assert bytes(i.inflate(d.deflate(msg), 1000)) == msg


def test_status_numbers_are_the_seeds():
    assert (F.WS_STATUS_BUSY, F.WS_STATUS_SUCCESS, F.WS_STATUS_SOCK_ERR_TLS) == (-1, 0, 8)
    assert (F.WS_STATUS_SOCK_NOT_SUPPORTED, F.WS_STATUS_TLS_CA_NOTFOUND,
            F.WS_STATUS_FINALIZE_DISCONNECT, F.WS_STATUS_TLS_CN_MISMATCH) == (10, 17, 31, 41)
    assert (F.WS_STATUS_INTERNAL_ERROR, F.WS_STATUS_CONNECT_RES_REJECT,
            F.WS_STATUS_KEEP_ALIVE_TIMEDOUT, F.WS_STATUS_DECOMPRESS_ERROR) == \
        (1000, 1009, 1011, 1016)
    assert (F.WS_CONTENT_CONTINUATION, F.WS_CONTENT_TEXT, F.WS_CONTENT_BINARY) == (0, 1, 2)
