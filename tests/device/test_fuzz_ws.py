# Seeded fuzz of the decoders of what a WebSocket/SignalR/KICS server sends (issue 14): wsframe
# (Reader, handshake answer, close payload), wspmd (extension answer, inflate), signalr (records,
# messages, the hub state machine), kics (stream items, tag values, the session); the drivers are
# in test_fuzz_wsclient.py, the seeds and mutations in wsfuzz.py. Each fuzz_<name>(rng, n) feeds
# n random and mutated inputs (bit flips, truncation, splicing, huge declared lengths, deep
# nesting, 5000-digit integers, non-ASCII digits) and takes the module's documented errors (its ERRORS) as a rejection; anything else propagates. Each returns
# {"inputs", "accepted", "rejected"}. The tests below run a seeded subset on both runtimes;
# tools/fuzz.py runs the big counts.
import json
import sys

from dt import Rng, free
from wsfuzz import (
    _CONFIRMATION,
    _FRAME_TOKENS,
    _REPLACEMENTS,
    _SIGNALR,
    RS,
    H,
    _count,
    _deep_json,
    _frame_seeds,
    _item_record,
    _mutated_value,
    _pick,
    _tokens,
    inputs,
    mutate,
    text_of,
)


def _feed(r, data, rng):
    """Feed data in random pieces, sometimes straight into target(); True at its end."""
    mv = memoryview(data)
    i = 0
    n = len(data)
    while i < n:
        t = r.target() if rng.below(2) else None
        if t is not None and len(t):
            k = len(t) if len(t) < n - i else n - i
            k = 1 + rng.below(k)
            t[:k] = mv[i:i + k]
            i += k
            r.got(k)
            continue
        k = 1 + rng.below(n - i if n - i < 600 else 600)
        used, _ = r.feed(mv[i:i + k])
        i += used
    return True


_MP = sys.implementation.name == "micropython"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat")
_ODD_DIGITS = ["²²²".encode(), "１０１".encode(), "1٠1".encode(), b"+10", b" 10", b"1e2", b"-01"]
_RESP_TOKENS = [b"\r\n", b": ", b"\xc2\xb2\xc2\xb2\xc2\xb2", b"\xef\xbc\x91", b"\xff", b"101",
                b"HTTP/1.1 ", b"Sec-WebSocket-Accept: x", b"9" * 300]


def fuzz_wsframe(rng, n):
    from microcot import wsframe as F

    seeds = _frame_seeds()
    accepted = 0
    for i, data in enumerate(inputs(rng, n, seeds, _FRAME_TOKENS)):
        kind = i % 10
        try:
            if kind < 7:
                r = F.Reader(_pick(rng, (125, 4096, 0x10000)), _pick(rng, (250, 8192, 0x100000)),
                             bool(rng.below(2)))
                _feed(r, data, rng)
                assert len(r.buf) <= 0x10000 + F.Reader.GROW_MAX
            elif kind < 9:
                head = _RESPONSE
                if rng.below(3) == 0:  # a status that is digits only to str.isdigit()
                    head = head.replace(b"101", _pick(rng, _ODD_DIGITS))
                head = mutate(rng, head, [_RESPONSE], _RESP_TOKENS)
                st, _, hdrs = F.parse_response(head)
                F.check_response(st, hdrs, KEY, ["chat"])
            else:
                F.parse_close(data[:125])
            accepted += 1
        except F.ERRORS:
            pass
    return _count(n, accepted)


# -- wspmd -----------------------------------------------------------------------------------------

_EXT = b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=10"
_EXT_TOKENS = [b";", b",", b"=", b'"', b"\xc2\xb2", b"\xd9\xa3", b"server_no_context_takeover",
               b"client_max_window_bits", b"=99999999999999999999", b" ", b"permessage-deflate"]
_DEFLATED = [H("f248cdc9c90700"), H("000500faff48656c6c6f"), H("f348cdc9c9070000"),
             H("f200110000"), H("62601805a360140c770000"), H("f248050000" + "00ffffcac9c90700")]
_OPTS = ({"client_max_window_bits": True}, {"server_max_window_bits": 12},
         {"server_no_context_takeover": True, "client_no_context_takeover": True})


def fuzz_wspmd(rng, n):
    from microcot import wspmd as P

    accepted = 0
    inflate = P.inflate_available()
    for i, data in enumerate(inputs(rng, n, _DEFLATED, [b"\x00\x00\xff\xff", b"\xff" * 8,
                                                         bytes(12)])):
        try:
            if i % 2 or not inflate:
                text = _EXT
                if rng.below(3) == 0:
                    text = text.replace(b"=12", b"=" + _pick(rng, _ODD_DIGITS)[:2])
                text = text_of(mutate(rng, text, [_EXT], _EXT_TOKENS))
                P.accept(text, _pick(rng, _OPTS))
            else:
                # MicroPython's offer caps the server's window at 2**12 (wspmd.default_options)
                inf = P.Inflater(9 + rng.below(4 if _MP else 7), bool(rng.below(2)))
                out = inf.inflate(data, 2000)
                assert len(out) <= 2000
                if rng.below(2):  # a second message: context takeover
                    inf.inflate(_pick(rng, _DEFLATED), 2000)
            accepted += 1
        except P.ERRORS:
            pass
    return _count(n, accepted)


def fuzz_signalr(rng, n):
    from microcot import signalr as S

    accepted = 0
    tokens = _tokens()
    for i, rec in enumerate(inputs(rng, n, _SIGNALR, tokens)):
        if i % 7 == 3:
            rec = ('{"type":2,"invocationId":"1","item":%s}' % _deep_json(rng)).encode()
        try:
            S.parse(rec)
            accepted += 1
        except S.ERRORS:
            pass
        if i % 5 == 0:  # a stream of records, split anywhere, through the hub state machine
            h = S.HubConnection(max_record_size=_pick(rng, (64, 4096, 0x10000)))
            h.start(0)
            stream = b"{}" + RS + rec + RS + _pick(rng, _SIGNALR) + RS
            j = 0
            while j < len(stream):
                k = 1 + rng.below(len(stream) - j)
                for ev in h.receive(memoryview(stream)[j:j + k], j):
                    assert isinstance(ev, S.Message)
                j += k
            h.tick(10 ** 6)
    return _count(n, accepted)


def fuzz_kics(rng, n):
    from microcot import kics as K
    from microcot import signalr as S

    accepted = 0
    errors = []
    ses = None
    for i in range(n):
        text = _mutated_value(rng)
        try:
            if i % 3 == 0:
                K.decode_tag_value(text, 102)
            elif i % 3 == 1:
                K.parse_item({"value": {"tagId": 102, "tagValue": S.loads(text)}})
            else:
                conf = json.loads(json.dumps(_CONFIRMATION))
                c = conf["confirmation"]
                key = _pick(rng, ("result", "tagIdentifier", "tagId"))
                c[key] = _REPLACEMENTS[rng.below(len(_REPLACEMENTS))]
                K.parse_item(conf)
            accepted += 1
        except (K.ERRORS + S.ERRORS):
            pass
        # the session: the record in its stream, never an exception out of receive()
        if ses is None or ses.close_requested:
            ses = K.Session([("Asset 079", "Asdu_1_object_1001")], on_error=errors.append)
            ses.connection_made(0)
            ses.receive(b"{}" + RS, 1)
            ses.receive(S.stream_item("0", _CONFIRMATION), 2)
        ses.receive(_item_record(text), 3)
        assert ses.error is None or isinstance(ses.error, K.KicsError)
    assert all(isinstance(e, K.KicsError) for e in errors)
    return _count(n, accepted)


# -- the suite's seeded subset ---------------------------------------------------------------------

def test_fuzz_wsframe():
    free("wsframe")
    r = fuzz_wsframe(Rng(14001), 300)
    assert r["inputs"] == 300 and r["accepted"] and r["rejected"], r


def test_fuzz_wspmd():
    r = fuzz_wspmd(Rng(14002), 200)
    free("wspmd", "wsframe")
    assert r["accepted"] and r["rejected"], r


def test_fuzz_signalr():
    free("wsframe")
    r = fuzz_signalr(Rng(14003), 200)
    assert r["accepted"] and r["rejected"], r


def test_fuzz_kics():
    free("wsframe", "wspmd")
    r = fuzz_kics(Rng(14004), 120)
    assert r["accepted"] and r["rejected"], r


