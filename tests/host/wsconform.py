"""An Autobahn|Testsuite-style conformance server for WebSocket *clients*, written for microcot.

Autobahn's fuzzingserver runs on Python 2 only; this plays its client-relevant case groups 1-7
(framing, pings/pongs, reserved bits, opcodes, fragmentation, UTF-8, close handling) and 12-13
(permessage-deflate) from an asyncio server on raw streams, so that it can misbehave on purpose.
Cases carry Autobahn's numbers and descriptions. The protocol is Autobahn's too: a client asks
`/getCaseCount` (one text message), then runs `/runCase?case=N&agent=A` for N = 1..count (echoing
every message it gets, as the same type, compressed when it can), then `/updateReports?agent=A`.

Verdicts as in Autobahn's report: OK, NON-STRICT (a failing client that echoed only part of what
came before the fault, or failed only at the end of a message instead of at the first invalid
byte), INFORMATIONAL (cases whose outcome the RFC leaves open), FAILED; all but FAILED pass.
The close behaviour is part of every verdict: the client's Close code must be one of those the
case expects.

Deliberate differences from Autobahn (to keep a suite run within a minute, on MicroPython too):
delays of 1 s are 0.1-0.25 s; groups 12/13 send 10/5/2 messages per case (by size) instead of
1000, generated payloads instead of Autobahn's sample files, sizes 16 B..64 KiB; 7.9.10 (code
1015) is ours; group 13's server answers also vary the server's own window and context takeover.

    server = ConformanceServer().start()          # a thread with its own event loop
    run_client_cpython(server.port, "agent")      # our client in-process, or CLIENT_SCRIPT
    print(server.report("agent"))                 # per group: passed / total
    server.stop()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import struct
import threading
import zlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10
NO_CODE = 1005  # the client's Close had no payload
NONE = 0  # the client sent no Close at all

GROUPS = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved Bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 Handling", "7": "Close Handling",
    "12": "WebSocket Compression (different payloads)",
    "13": "WebSocket Compression (different parameters)",
}


def frame(op: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A server frame (unmasked)."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload)
    if n < 126:
        h = struct.pack(">BB", b0, n)
    elif n < 0x10000:
        h = struct.pack(">BBH", b0, 126, n)
    else:
        h = struct.pack(">BBQ", b0, 127, n)
    return h + payload


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack(">H", code) + reason)


@dataclass
class Case:
    id: str
    desc: str
    steps: list  # ("send", bytes) ("chop", n) ("sleep", s) ("msg", op, payload, frag)
    #              ("checkpoint",) ("close", code, reason)
    expect: list  # ("msg", op, payload) / ("pong", payload), in order
    close: tuple = (1000,)  # acceptable codes of the client's Close
    fail: bool = False  # the client must fail the connection
    info: bool = False  # informational
    pmd: dict | None = None  # our permessage-deflate answer; None declines
    server_closes: bool = True  # append Close(1000) after the steps


@dataclass
class Observed:
    items: list = field(default_factory=list)
    close_code: int = NONE
    close_reason: bytes = b""
    errors: list = field(default_factory=list)
    missed_checkpoint: bool = False
    offer: str = ""


@dataclass
class Result:
    case: Case
    verdict: str
    detail: str
    seconds: float = 0.0


# --- the cases -----------------------------------------------------------------------------------

def _cases_1() -> list[Case]:
    out = []
    for sub, op, fill, name in ((1, TEXT, b"*", "text"), (2, BINARY, b"\xfe", "binary")):
        sizes = [0, 125, 126, 127, 128, 65535, 65536]
        for i, n in enumerate(sizes, 1):
            p = fill * n
            out.append(Case("1.%d.%d" % (sub, i), "Send %s message with payload length %d" %
                            (name, n), [("send", frame(op, p))], [("msg", op, p)]))
        p = fill * 65536
        out.append(Case("1.%d.8" % sub, "Send %s message message with payload of length 65536. "
                        "Sent out data in chops of 997 octets." % name,
                        [("chop", 997), ("send", frame(op, p))], [("msg", op, p)]))
    return out


def _cases_2() -> list[Case]:
    hello = b"Hello, world!"
    binp = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
    p125 = b"\xfe" * 125
    c = [
        Case("2.1", "Send ping without payload", [("send", frame(PING))], [("pong", b"")]),
        Case("2.2", "Send ping with small text payload", [("send", frame(PING, hello))],
             [("pong", hello)]),
        Case("2.3", "Send ping with small binary (non UTF-8) payload",
             [("send", frame(PING, binp))], [("pong", binp)]),
        Case("2.4", "Send ping with binary payload of 125 octets", [("send", frame(PING, p125))],
             [("pong", p125)]),
        Case("2.5", "Send ping with binary payload of 126 octets",
             [("send", frame(PING, b"\xfe" * 126))], [], (1002,), fail=True),
        Case("2.6", "Send ping with binary payload of 125 octets, send in octet-wise chops",
             [("chop", 1), ("send", frame(PING, p125))], [("pong", p125)]),
        Case("2.7", "Send unsolicited pong without payload", [("send", frame(PONG))], []),
        Case("2.8", "Send unsolicited pong with payload",
             [("send", frame(PONG, b"unsolicited pong payload"))], []),
        Case("2.9", "Send unsolicited pong with payload. Send ping with payload",
             [("send", frame(PONG, b"unsolicited pong payload")),
              ("send", frame(PING, b"ping payload"))], [("pong", b"ping payload")]),
    ]
    pings = [b"payload-%d" % i for i in range(10)]
    c.append(Case("2.10", "Send 10 Pings with payload",
                  [("send", frame(PING, p)) for p in pings], [("pong", p) for p in pings]))
    c.append(Case("2.11", "Send 10 Pings with payload. Send out octets in octet-wise chops",
                  [("chop", 1)] + [("send", frame(PING, p)) for p in pings],
                  [("pong", p) for p in pings]))
    return c


def _cases_3() -> list[Case]:
    h = b"Hello, world!"
    t = frame(TEXT, h)
    pg = frame(PING)
    e = [("msg", TEXT, h)]
    return [
        Case("3.1", "Send small text message with RSV = 1", [("send", frame(TEXT, h, rsv=1))],
             [], (1002,), fail=True),
        Case("3.2", "Send small text message, then send again with RSV = 2, then send Ping",
             [("send", t), ("send", frame(TEXT, h, rsv=2)), ("send", pg)], e, (1002,),
             fail=True),
        Case("3.3", "Send small text message, then send again with RSV = 3, then send Ping. "
             "Octets are sent in frame-wise chops", [("send", t + frame(TEXT, h, rsv=3) + pg)],
             e, (1002,), fail=True),
        Case("3.4", "Send small text message, then send again with RSV = 4, then send Ping. "
             "Octets are sent in octet-wise chops",
             [("chop", 1), ("send", t), ("send", frame(TEXT, h, rsv=4)), ("send", pg)], e,
             (1002,), fail=True),
        Case("3.5", "Send small binary message with RSV = 5",
             [("send", frame(BINARY, b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff", rsv=5))], [], (1002,),
             fail=True),
        Case("3.6", "Send Ping with RSV = 6", [("send", frame(PING, h, rsv=6))], [], (1002,),
             fail=True),
        Case("3.7", "Send Close with RSV = 7", [("send", frame(CLOSE, b"", rsv=7))], [],
             (1002,), fail=True),
    ]


def _cases_4() -> list[Case]:
    out = []
    h = b"Hello, world!"
    for sub, ops in ((1, (3, 4, 5, 6, 7)), (2, (11, 12, 13, 14, 15))):
        kind = "non-control" if sub == 1 else "control"
        for i, op in enumerate(ops, 1):
            payload = b"reserved opcode payload" if i in (2, 4, 5) else b""
            bad = frame(op, payload)
            if i <= 2:
                steps = [("send", bad)]
                exp = []
                desc = "Send frame with reserved %s Opcode = %d%s" % (
                    kind, op, " and non-empty payload" if payload else "")
            else:
                steps = [("send", frame(TEXT, h)), ("send", bad), ("send", frame(PING))]
                if i == 5:
                    steps.insert(0, ("chop", 1))
                exp = [("msg", TEXT, h)]
                desc = "Send small text message, then send frame with reserved %s Opcode = %d" \
                       "%s, then send Ping%s" % (kind, op, " and non-empty payload" if payload
                                                  else "", ", octet-wise chops" if i == 5 else "")
            out.append(Case("4.%d.%d" % (sub, i), desc, steps, exp, (1002,), fail=True))
    return out


def _cases_5() -> list[Case]:
    f1, f2 = b"fragment1", b"fragment2"
    two = [frame(TEXT, f1, fin=False), frame(0, f2)]
    ping = frame(PING, b"ping payload")
    c = [
        Case("5.1", "Send Ping fragmented into 2 fragments",
             [("send", frame(PING, f1, fin=False) + frame(0, f2))], [], (1002,), fail=True),
        Case("5.2", "Send Pong fragmented into 2 fragments",
             [("send", frame(PONG, f1, fin=False) + frame(0, f2))], [], (1002,), fail=True),
        Case("5.3", "Send text Message fragmented into 2 fragments", [("send", b"".join(two))],
             [("msg", TEXT, f1 + f2)]),
        Case("5.4", "Same as 5.3, but send in frame-wise chops",
             [("send", two[0]), ("sleep", 0.05), ("send", two[1])], [("msg", TEXT, f1 + f2)]),
        Case("5.5", "Same as 5.3, but send in octet-wise chops",
             [("chop", 1), ("send", b"".join(two))], [("msg", TEXT, f1 + f2)]),
        Case("5.6", "Send text Message fragmented into 2 fragments, one ping with payload "
             "in-between", [("send", two[0] + ping + two[1])],
             [("pong", b"ping payload"), ("msg", TEXT, f1 + f2)]),
        Case("5.7", "Same as 5.6, but send in frame-wise chops",
             [("send", two[0]), ("send", ping), ("send", two[1])],
             [("pong", b"ping payload"), ("msg", TEXT, f1 + f2)]),
        Case("5.8", "Same as 5.6, but send in octet-wise chops",
             [("chop", 1), ("send", two[0] + ping + two[1])],
             [("pong", b"ping payload"), ("msg", TEXT, f1 + f2)]),
    ]
    n = 9
    for fin in (True, False):
        bad = [frame(0, b"non-continuation payload", fin=fin), frame(TEXT, b"Hello, world!")]
        for mode in ("one", "frame", "octet"):
            if mode == "one":
                steps = [("send", b"".join(bad))]
            elif mode == "frame":
                steps = [("send", bad[0]), ("send", bad[1])]
            else:
                steps = [("chop", 1), ("send", b"".join(bad))]
            c.append(Case("5.%d" % n, "Send unfragmented Text Message after Continuation Frame "
                          "with FIN = %s, where there is nothing to continue, sent in %s chops"
                          % (fin, mode), steps, [], (1002,), fail=True))
            n += 1
    c.append(Case("5.15", "Send text Message fragmented into 2 fragments, then Continuation "
                  "Frame with FIN = false where there is nothing to continue, then unfragmented "
                  "Text Message, all sent in one chop",
                  [("send", b"".join(two) + frame(0, b"fragment3", fin=False) +
                    frame(TEXT, b"fragment4"))], [("msg", TEXT, f1 + f2)], (1002,), fail=True))
    for n, fin in ((16, False), (17, True)):
        one = frame(0, b"fragment1", fin=fin) + frame(TEXT, b"fragment2", fin=False) + \
            frame(0, b"fragment3")
        c.append(Case("5.%d" % n, "Repeated 2x: Continuation Frame with FIN = %s (where there is "
                      "nothing to continue), then text Message fragmented into 2 fragments"
                      % fin, [("send", one * 2)], [], (1002,), fail=True))
    c.append(Case("5.18", "Send text Message fragmented into 2 fragments, with both frame "
                  "opcodes set to text, sent in one chop",
                  [("send", frame(TEXT, f1, fin=False) + frame(TEXT, f2))], [], (1002,),
                  fail=True))
    for n, sync in ((19, False), (20, True)):
        fr = [frame(TEXT, b"fragment1", fin=False), frame(0, b"fragment2", fin=False),
              frame(0, b"fragment3", fin=False), frame(PING, b"pongme 1!"),
              frame(0, b"fragment4", fin=False), frame(PING, b"pongme 2!"),
              frame(0, b"fragment5")]
        steps = []
        for i, x in enumerate(fr):
            steps.append(("send", x))
            if i in (2, 4):
                steps.append(("sleep", 0.1))
        if sync:
            steps.insert(0, ("chop", 3))
        c.append(Case("5.%d" % n, "A fragmented text message is sent in multiple frames. After "
                      "sending the first 2 frames of the text message, a Ping is sent. Then we "
                      "wait 0.1s, then we send 2 more text fragments, another Ping and then the "
                      "final text fragment%s" % (" (in 3-octet chops)" if sync else ""),
                      steps, [("pong", b"pongme 1!"), ("pong", b"pongme 2!"),
                              ("msg", TEXT, b"fragment1fragment2fragment3fragment4fragment5")]))
    return c


KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"  # "κόσμε" with U+1F79
HELLO = "Hello-µ@ßöäüàá-UTF-8!!".encode()


def _utf8_sequences() -> list[tuple[str, list[tuple[bytes, bool]]]]:
    """(subgroup description, [(payload, valid)]) for 6.5-6.23 (Markus Kuhn's UTF-8 test)."""
    seq = []
    seq.append(("Valid UTF-8", [(KOSME, True), (HELLO, True), (b"a\x00b", True),
                                (b"\xf0\x90\x80\x80", True),
                                (b"a\xc2\xa2\xe2\x82\xac\xf0\x9d\x84\x9e", True)]))
    seq.append(("Prefixes of 'kosme'",
                [(KOSME[:n], n in (2, 5, 7, 9, 11)) for n in range(1, 12)]))
    seq.append(("First possible sequence of a certain length",
                [(b"\x00", True), (b"\xc2\x80", True), (b"\xe0\xa0\x80", True),
                 (b"\xf0\x90\x80\x80", True)]))
    seq.append(("First possible sequence length 5/6 (invalid codepoints)",
                [(b"\xf8\x88\x80\x80\x80", False), (b"\xfc\x84\x80\x80\x80\x80", False)]))
    seq.append(("Last possible sequence of a certain length",
                [(b"\x7f", True), (b"\xdf\xbf", True), (b"\xef\xbf\xbf", True),
                 (b"\xf4\x8f\xbf\xbf", True)]))
    seq.append(("Last possible sequence length 4/5/6 (invalid codepoints)",
                [(b"\xf7\xbf\xbf\xbf", False), (b"\xfb\xbf\xbf\xbf\xbf", False),
                 (b"\xfd\xbf\xbf\xbf\xbf\xbf", False)]))
    seq.append(("Other boundary conditions",
                [(b"\xed\x9f\xbf", True), (b"\xee\x80\x80", True), (b"\xef\xbf\xbd", True),
                 (b"\xf4\x8f\xbf\xbf", True), (b"\xf4\x90\x80\x80", False)]))
    cont = [b"\x80", b"\xbf", b"\x80\xbf", b"\x80\xbf\x80", b"\x80\xbf\x80\xbf",
            b"\x80\xbf\x80\xbf\x80", b"\x80\xbf\x80\xbf\x80\xbf", bytes(range(0x80, 0xC0))]
    seq.append(("Unexpected continuation bytes", [(x, False) for x in cont]))
    lonely = [b"".join(bytes((b, 0x20)) for b in range(lo, hi))
              for lo, hi in ((0xC0, 0xE0), (0xE0, 0xF0), (0xF0, 0xF8), (0xF8, 0xFC),
                             (0xFC, 0xFE))]
    seq.append(("Lonely start characters", [(x, False) for x in lonely]))
    missing = [b"\xc0", b"\xe0\x80", b"\xf0\x80\x80", b"\xf8\x80\x80\x80",
               b"\xfc\x80\x80\x80\x80", b"\xdf", b"\xef\xbf", b"\xf7\xbf\xbf",
               b"\xfb\xbf\xbf\xbf", b"\xfd\xbf\xbf\xbf\xbf"]
    seq.append(("Sequences with last continuation byte missing", [(x, False) for x in missing]))
    seq.append(("Concatenation of incomplete sequences", [(b"".join(missing), False)]))
    seq.append(("Impossible bytes", [(b"\xfe", False), (b"\xff", False),
                                     (b"\xfe\xfe\xff\xff", False)]))
    seq.append(("Examples of an overlong ASCII character",
                [(x, False) for x in (b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf",
                                      b"\xf8\x80\x80\x80\xaf", b"\xfc\x80\x80\x80\x80\xaf")]))
    seq.append(("Maximum overlong sequences",
                [(x, False) for x in (b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf",
                                      b"\xf8\x87\xbf\xbf\xbf", b"\xfc\x83\xbf\xbf\xbf\xbf")]))
    seq.append(("Overlong representation of the NUL character",
                [(x, False) for x in (b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
                                      b"\xf8\x80\x80\x80\x80", b"\xfc\x80\x80\x80\x80\x80")]))
    sur = [b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf", b"\xed\xb0\x80",
           b"\xed\xbe\x80", b"\xed\xbf\xbf"]
    seq.append(("Single UTF-16 surrogates", [(x, False) for x in sur]))
    pairs = [a + b for a in (b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf")
             for b in (b"\xed\xb0\x80", b"\xed\xbf\xbf")]
    seq.append(("Paired UTF-16 surrogates", [(x, False) for x in pairs]))
    nonch = [chr(0xFFFE).encode(), chr(0xFFFF).encode()]
    for plane in range(1, 17):
        nonch += [chr(plane << 16 | 0xFFFE).encode(), chr(plane << 16 | 0xFFFF).encode()]
    seq.append(("Non-character code points (valid UTF-8)", [(x, True) for x in nonch]))
    seq.append(("Unicode specials (i.e. replacement char)",
                [(chr(c).encode(), True) for c in range(0xFFF9, 0x10000)]))
    return seq


def _cases_6() -> list[Case]:
    c = [
        Case("6.1.1", "Send text message of length 0", [("send", frame(TEXT))],
             [("msg", TEXT, b"")]),
        Case("6.1.2", "Send fragmented text message, 3 fragments each of length 0",
             [("send", frame(TEXT, fin=False) + frame(0, fin=False) + frame(0))],
             [("msg", TEXT, b"")]),
        Case("6.1.3", "Send fragmented text message, 3 fragments, first and last of length 0, "
             "middle non-empty", [("send", frame(TEXT, fin=False) +
                                   frame(0, b"middle frame payload", fin=False) + frame(0))],
             [("msg", TEXT, b"middle frame payload")]),
        Case("6.2.1", "Send a valid UTF-8 text message in one fragment",
             [("send", frame(TEXT, HELLO))], [("msg", TEXT, HELLO)]),
        Case("6.2.2", "Send a valid UTF-8 text message in two fragments, fragmented on UTF-8 "
             "code point boundary", [("send", frame(TEXT, HELLO[:9], fin=False) +
                                      frame(0, HELLO[9:]))], [("msg", TEXT, HELLO)]),
        Case("6.2.3", "Send a valid UTF-8 text message in fragments of 1 octet, resulting in "
             "frames ending on positions which are not code point ends",
             [("send", _octet_frames(HELLO))], [("msg", TEXT, HELLO)]),
        Case("6.2.4", "Send a valid UTF-8 text message in fragments of 1 octet, resulting in "
             "frames ending on positions which are not code point ends ('kosme')",
             [("send", _octet_frames(KOSME))], [("msg", TEXT, KOSME)]),
    ]
    bad = KOSME + b"\xed\xa0\x80edited"
    c.append(Case("6.3.1", "Send invalid UTF-8 text message unfragmented",
                  [("send", frame(TEXT, bad))], [], (1007,), fail=True))
    c.append(Case("6.3.2", "Send invalid UTF-8 text message in fragments of 1 octet",
                  [("send", _octet_frames(bad))], [], (1007,), fail=True))
    d = 0.25
    c.append(Case("6.4.1", "Send invalid UTF-8 text message in 3 fragments (frames). First frame "
                  "payload is valid, then wait, then 2nd frame which contains the payload making "
                  "the sequence invalid, then wait, then 3rd frame with rest. Fail fast: the "
                  "client must fail before the 3rd frame",
                  [("send", frame(TEXT, KOSME, fin=False)), ("sleep", d),
                   ("send", frame(0, b"\xf4\x90\x80\x80", fin=False)), ("sleep", d),
                   ("checkpoint",), ("send", frame(0, b"edited"))], [], (1007,), fail=True))
    c.append(Case("6.4.2", "Same as 6.4.1, but in 2nd frame, we send only up to and including "
                  "the octet making the complete payload invalid",
                  [("send", frame(TEXT, KOSME + b"\xf4", fin=False)), ("sleep", d),
                   ("send", frame(0, b"\x90", fin=False)), ("sleep", d), ("checkpoint",),
                   ("send", frame(0, b"\x80\x80edited"))], [], (1007,), fail=True))
    whole = frame(TEXT, KOSME + b"\xf4\x90\x80\x80edited")
    k = len(whole) - len(b"\xf4\x90\x80\x80edited")
    c.append(Case("6.4.3", "Same as 6.4.1, but we send message not in 3 frames, but in 3 chops "
                  "of the same message frame",
                  [("send", whole[:k]), ("sleep", d), ("send", whole[k:k + 4]), ("sleep", d),
                   ("checkpoint",), ("send", whole[k + 4:])], [], (1007,), fail=True))
    c.append(Case("6.4.4", "Same as 6.4.2, but we send message not in 3 frames, but in 3 chops "
                  "of the same message frame",
                  [("send", whole[:k]), ("sleep", d), ("send", whole[k:k + 2]), ("sleep", d),
                   ("checkpoint",), ("send", whole[k + 2:])], [], (1007,), fail=True))
    for sub, (desc, items) in enumerate(_utf8_sequences(), 5):
        for i, (p, ok) in enumerate(items, 1):
            c.append(Case("6.%d.%d" % (sub, i), "%s: send text message with payload %s (%s)"
                          % (desc, p[:16].hex(), "valid" if ok else "invalid"),
                          [("send", frame(TEXT, p))], [("msg", TEXT, p)] if ok else [],
                          (1000,) if ok else (1007,), fail=not ok))
    return c


def _octet_frames(p: bytes) -> bytes:
    out = []
    for i in range(len(p)):
        out.append(frame(TEXT if i == 0 else 0, p[i:i + 1], fin=i == len(p) - 1))
    return b"".join(out)


def _cases_7() -> list[Case]:
    h = b"Hello World!"
    c = [
        Case("7.1.1", "Send a message followed by a close frame", [("send", frame(TEXT, h))],
             [("msg", TEXT, h)]),
        Case("7.1.2", "Send two close frames", [("send", close_frame()), ("send", close_frame())],
             [], server_closes=False),
        Case("7.1.3", "Send a ping after close message",
             [("send", close_frame()), ("send", frame(PING))], [], server_closes=False),
        Case("7.1.4", "Send text message after sending a close frame",
             [("send", close_frame()), ("send", frame(TEXT, h))], [], server_closes=False),
        Case("7.1.5", "Send message fragment1 followed by close then fragment",
             [("send", frame(TEXT, b"fragment1", fin=False)), ("send", close_frame()),
              ("send", frame(0, b"fragment2"))], [], server_closes=False),
        Case("7.1.6", "Send 256K message followed by close then a ping",
             [("send", frame(TEXT, b"BAsd7&jh23" * 26214 + b"BAsd")), ("send", close_frame()),
              ("send", frame(PING))], [], (1000, 1009), info=True, server_closes=False),
        Case("7.3.1", "Send a close frame with payload length 0 (no close code, no close "
             "reason)", [("send", close_frame(None))], [], (NO_CODE, 1000),
             server_closes=False),
        Case("7.3.2", "Send a close frame with payload length 1",
             [("send", frame(CLOSE, b"\x03"))], [], (1002,), fail=True, server_closes=False),
        Case("7.3.3", "Send a close frame with payload length 2 (regular close with a code)",
             [("send", close_frame(1000))], [], server_closes=False),
        Case("7.3.4", "Send a close frame with close code and close reason",
             [("send", close_frame(1000, b"Hello World!"))], [], server_closes=False),
        Case("7.3.5", "Send a close frame with close code and close reason of maximum length "
             "(123)", [("send", close_frame(1000, b"*" * 123))], [], server_closes=False),
        Case("7.3.6", "Send a close frame with close code and close reason which is too long "
             "(124) - total frame payload 126 octets",
             [("send", close_frame(1000, b"*" * 124))], [], (1002,), fail=True,
             server_closes=False),
        Case("7.5.1", "Send a close frame with invalid UTF-8 payload",
             [("send", close_frame(1000, KOSME + b"\xed\xa0\x80edited"))], [], (1007,),
             fail=True, server_closes=False),
    ]
    valid = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)
    for i, code in enumerate(valid, 1):
        c.append(Case("7.7.%d" % i, "Send close with valid close code %d" % code,
                      [("send", close_frame(code))], [], (code,), server_closes=False))
    invalid = (0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 1015)
    for i, code in enumerate(invalid, 1):
        c.append(Case("7.9.%d" % i, "Send close with invalid close code %d" % code,
                      [("send", close_frame(code))], [], (1002,), fail=True,
                      server_closes=False))
    for i, code in enumerate((5000, 65535), 1):
        c.append(Case("7.13.%d" % i, "Send close with close code %d" % code,
                      [("send", close_frame(code))], [], (1002,), fail=True, info=True,
                      server_closes=False))
    return c


_CORPUS: dict[str, bytes] = {}


def _corpus(kind: str) -> bytes:
    """About 200 KB of sample data per kind (Autobahn uses sample files), generated once."""
    if kind in _CORPUS:
        return _CORPUS[kind]
    r = random.Random(kind)
    n = 200_000
    if kind == "json":
        data = "".join('{"tag":"sensor/%d","value":%.3f,"ok":%s},' % (
            r.randrange(100), r.random() * 1000, "true" if r.random() < .5 else "false")
            for _ in range(n // 40)).encode()
    elif kind == "bitmap":
        data = b"".join(bytes([r.choice((0, 0, 0, 255))]) * r.randrange(1, 40)
                        for _ in range(n // 20))
    elif kind == "faust":
        words = ["Habe", "nun,", "ach!", "Philosophie,", "Juristerei", "und", "Medizin,",
                 "Größe", "Übel", "Bücher", "weiß", "Tür", "schön", "Heiße", "Magister", "Doktor"]
        data = " ".join(r.choice(words) for _ in range(n // 6)).encode()
    elif kind == "html":
        words = ['<div class="row">', "<p>", "</p>", '<a href="/x">', "</a>", "</div>",
                 "text", "&amp;", "<span>", "</span>", "\n"]
        data = " ".join(r.choice(words) for _ in range(n // 6)).encode()
    else:
        data = r.randbytes(n)
    _CORPUS[kind] = data
    return data


def _payload(kind: str, n: int, seed: int) -> tuple[int, bytes]:
    """An n-byte slice of the kind's sample data; text slices cut at character boundaries and
    padded with spaces, so that they stay valid UTF-8."""
    data = _corpus(kind)
    off = (seed * 7919) % (len(data) - n)
    p = data[off:off + n]
    if kind in ("bitmap", "random"):
        return BINARY, p
    p = p.decode("utf-8", "ignore").encode()
    return TEXT, p + b" " * (n - len(p))


SIZES = (16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)


def _count(n: int) -> int:
    return 10 if n <= 1024 else 5 if n <= 16384 else 2


def _cases_compression() -> list[Case]:
    c = []
    kinds = (("json", "Large JSON-like data (utf8)"), ("bitmap", "Bitmap-like data (binary)"),
             ("faust", "Human readable text, German (utf8)"), ("html", "HTML-like data (utf8)"),
             ("random", "Random data, incompressible like a PDF (binary)"))
    for sub, (kind, kdesc) in enumerate(kinds, 1):
        i = 1
        for frag in (0, 256):
            for n in SIZES:
                msgs = [_payload(kind, n, sub * 1000 + i * 10 + k) for k in range(_count(n))]
                c.append(Case("12.%d.%d" % (sub, i), "%s: send %d compressed messages each of "
                              "payload size %d, auto-fragment to %d octets. Use default "
                              "permessage-deflate offer" % (kdesc, len(msgs), n, frag),
                              [("msg", op, p, frag) for op, p in msgs],
                              [("msg", op, p) for op, p in msgs], pmd={}))
                i += 1
    params = [
        ("(requestNoContextTakeover, requestMaxWindowBits) = (False, 0)", {}),
        ("(True, 0)", {"client_no_context_takeover": True, "server_no_context_takeover": True}),
        ("(False, 8)", {"client_max_window_bits": 8, "server_max_window_bits": 9}),
        ("(False, 15)", {"client_max_window_bits": 15, "server_max_window_bits": 15}),
        ("(True, 8)", {"client_no_context_takeover": True, "client_max_window_bits": 8,
                       "server_no_context_takeover": True, "server_max_window_bits": 9}),
        ("(True, 15)", {"client_no_context_takeover": True, "client_max_window_bits": 15,
                        "server_no_context_takeover": True, "server_max_window_bits": 15}),
        ("[(True, 8), (True, 0), (False, 0)]", {"client_no_context_takeover": True,
                                                "client_max_window_bits": 8,
                                                "server_max_window_bits": 10}),
    ]
    for sub, (pdesc, pmd) in enumerate(params, 1):
        i = 1
        for frag in (0, 256):
            for n in SIZES:
                msgs = [_payload("json", n, 13000 + sub * 100 + i * 10 + k)
                        for k in range(_count(n))]
                c.append(Case("13.%d.%d" % (sub, i), "Send %d compressed messages each of "
                              "payload size %d, auto-fragment to %d octets. Server answer %s: %s"
                              % (len(msgs), n, frag, pdesc, pmd or "defaults"),
                              [("msg", op, p, frag) for op, p in msgs],
                              [("msg", op, p) for op, p in msgs], pmd=pmd))
                i += 1
    return c


def all_cases() -> list[Case]:
    return (_cases_1() + _cases_2() + _cases_3() + _cases_4() + _cases_5() + _cases_6() +
            _cases_7() + _cases_compression())


# --- the server ----------------------------------------------------------------------------------

class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r = reader
        self.w = writer
        self.chop = 0
        self.closed_sent = False
        self.client_closed = asyncio.Event()
        self.got_item = asyncio.Event()
        self.obs = Observed()
        self.pmd: dict | None = None
        self.comp = None
        self.decomp = None

    async def write(self, data: bytes) -> None:
        try:
            if self.chop:
                for i in range(0, len(data), self.chop):
                    self.w.write(data[i:i + self.chop])
                    await self.w.drain()
                    await asyncio.sleep(0.0005 if self.chop < 16 else 0)
            else:
                self.w.write(data)
                await self.w.drain()
        except (ConnectionError, OSError):
            pass

    def compress(self, payload: bytes) -> bytes:
        p = self.pmd or {}
        if self.comp is None or p.get("server_no_context_takeover"):
            self.comp = zlib.compressobj(6, zlib.DEFLATED, -p.get("server_max_window_bits", 15))
        out = self.comp.compress(payload) + self.comp.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4]

    async def message(self, op: int, payload: bytes, frag: int) -> None:
        rsv = 0
        if self.pmd is not None:
            payload = self.compress(payload)
            rsv = 4
        if not frag or len(payload) <= frag:
            await self.write(frame(op, payload, rsv=rsv))
            return
        parts = [payload[i:i + frag] for i in range(0, len(payload), frag)]
        out = []
        for i, p in enumerate(parts):
            out.append(frame(op if i == 0 else 0, p, fin=i == len(parts) - 1,
                             rsv=rsv if i == 0 else 0))
        await self.write(b"".join(out))

    async def read_frames(self) -> None:
        """Collect the client's frames until its Close (answered) or EOF."""
        msg_op, parts, comp = 0, [], False
        try:
            while True:
                h = await self.r.readexactly(2)
                fin, rsv, op = h[0] & 0x80, (h[0] >> 4) & 7, h[0] & 15
                masked, n = h[1] & 0x80, h[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", await self.r.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", await self.r.readexactly(8))[0]
                if not masked:
                    self.obs.errors.append("client frame not masked")
                    key = b"\0\0\0\0"
                else:
                    key = await self.r.readexactly(4)
                data = await self.r.readexactly(n)
                if masked and n:
                    k = (key * (n // 4 + 1))[:n]
                    data = (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")) \
                        .to_bytes(n, "little")
                if rsv & 3 or (rsv & 4 and (self.pmd is None or op == 0 or op >= 8)):
                    self.obs.errors.append("client frame with RSV bits %d (opcode %d)" % (rsv, op))
                if op == CLOSE:
                    if n == 1 or n > 125:
                        self.obs.errors.append("client close payload of %d bytes" % n)
                    self.obs.close_code = struct.unpack(">H", data[:2])[0] if n >= 2 else NO_CODE
                    self.obs.close_reason = data[2:]
                    self.client_closed.set()
                    if not self.closed_sent:
                        self.closed_sent = True
                        await self.write(close_frame(
                            None if self.obs.close_code == NO_CODE else self.obs.close_code))
                    self.w.close()
                    return
                if op == PING:
                    await self.write(frame(PONG, data))
                    continue
                if op == PONG:
                    self.obs.items.append(("pong", data))
                    self.got_item.set()
                    continue
                if op in (TEXT, BINARY):
                    if msg_op:
                        self.obs.errors.append("new message inside a fragmented one")
                    msg_op, parts, comp = op, [data], bool(rsv & 4)
                elif op == 0:
                    if not msg_op:
                        self.obs.errors.append("continuation without a message")
                        continue
                    parts.append(data)
                else:
                    self.obs.errors.append("client sent opcode %d" % op)
                    continue
                if fin:
                    p = b"".join(parts)
                    if comp:
                        p = self.inflate(p)
                    if msg_op == TEXT:
                        try:
                            p.decode("utf-8")
                        except UnicodeDecodeError:
                            self.obs.errors.append("client text message is not UTF-8")
                    self.obs.items.append(("msg", msg_op, p))
                    self.got_item.set()
                    msg_op, parts = 0, []
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.client_closed.set()
        except zlib.error as e:
            self.obs.errors.append("client compressed message does not inflate: %s" % e)
            self.client_closed.set()

    def inflate(self, p: bytes) -> bytes:
        resp = self.pmd or {}
        if self.decomp is None or resp.get("client_no_context_takeover"):
            self.decomp = zlib.decompressobj(-15)
        return self.decomp.decompress(p + b"\x00\x00\xff\xff")


class ConformanceServer:
    """The case server in a thread of its own: start(), port, results[agent], report(agent)."""

    def __init__(self, cases: list[Case] | None = None, host: str = "127.0.0.1",
                 case_timeout: float = 10.0):
        self.cases = cases if cases is not None else all_cases()
        self.host = host
        self.port = 0
        self.case_timeout = case_timeout
        self.results: dict[str, list[Result]] = {}
        self.done: dict[str, threading.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    def start(self) -> ConformanceServer:
        self._thread = threading.Thread(target=self._run, name="wsconform", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("conformance server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        srv = await asyncio.start_server(self._handle, self.host, 0)
        self.port = srv.sockets[0].getsockname()[1]
        self._ready.set()
        async with srv:
            await self._stop.wait()

    def agent_done(self, agent: str) -> threading.Event:
        return self.done.setdefault(agent, threading.Event())

    async def _handshake(self, conn: _Conn) -> tuple[str, dict] | None:
        head = await conn.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        hdrs: dict[str, str] = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                k = k.strip().lower()
                hdrs[k] = (hdrs[k] + ", " + v.strip()) if k in hdrs else v.strip()
        key = hdrs.get("sec-websocket-key", "")
        if method != "GET" or hdrs.get("sec-websocket-version") != "13" or not key or \
                "websocket" not in hdrs.get("upgrade", "").lower():
            conn.w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await conn.w.drain()
            conn.w.close()
            return None
        return target, hdrs

    def _accept(self, conn: _Conn, hdrs: dict, pmd: dict | None) -> bytes:
        key = hdrs["sec-websocket-key"]
        acc = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Accept: " + acc]
        offer = hdrs.get("sec-websocket-extensions", "")
        conn.obs.offer = offer
        if pmd is not None and "permessage-deflate" in offer:
            first = [x for x in offer.split(",") if x.strip().startswith("permessage-deflate")][0]
            oparams = {p.split("=")[0].strip(): (p.split("=")[1].strip() if "=" in p else True)
                       for p in first.split(";")[1:]}
            resp = dict(pmd)
            if "server_no_context_takeover" in oparams:
                resp["server_no_context_takeover"] = True
            if "server_max_window_bits" in oparams and oparams["server_max_window_bits"] is not \
                    True:
                resp["server_max_window_bits"] = min(
                    resp.get("server_max_window_bits", 15), int(oparams["server_max_window_bits"]))
            if "client_max_window_bits" not in oparams:
                resp.pop("client_max_window_bits", None)
            conn.pmd = resp
            parts = ["permessage-deflate"]
            for k, v in resp.items():
                parts.append(k if v is True else "%s=%d" % (k, v))
            lines.append("Sec-WebSocket-Extensions: " + "; ".join(parts))
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hs = await asyncio.wait_for(self._handshake(conn), 10)
            if hs is None:
                return
            target, hdrs = hs
            url = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            agent = q.get("agent", "?")
            if url.path == "/getCaseCount":
                writer.write(self._accept(conn, hdrs, None))
                await conn.write(frame(TEXT, str(len(self.cases)).encode()))
                await conn.write(close_frame())
                conn.closed_sent = True
                await asyncio.wait_for(conn.read_frames(), 5)
            elif url.path == "/updateReports":
                writer.write(self._accept(conn, hdrs, None))
                await conn.write(close_frame())
                conn.closed_sent = True
                await asyncio.wait_for(conn.read_frames(), 5)
                self.agent_done(agent).set()
            elif url.path == "/runCase":
                case = self.cases[int(q["case"]) - 1]
                writer.write(self._accept(conn, hdrs, case.pmd))
                t0 = asyncio.get_running_loop().time()
                await self._play(conn, case)
                res = judge(case, conn.obs)
                res.seconds = asyncio.get_running_loop().time() - t0
                self.results.setdefault(agent, []).append(res)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError, IndexError, KeyError):
            pass
        finally:
            writer.close()

    async def _play(self, conn: _Conn, case: Case) -> None:
        rd = asyncio.ensure_future(conn.read_frames())
        for st in case.steps:
            if conn.client_closed.is_set() and st[0] != "checkpoint":
                break
            kind = st[0]
            if kind == "send":
                if st[1][:1] and st[1][0] & 0x0F == CLOSE:
                    conn.closed_sent = True
                await conn.write(st[1])
            elif kind == "chop":
                conn.chop = st[1]
            elif kind == "sleep":
                await asyncio.sleep(st[1])
            elif kind == "checkpoint":
                if not conn.client_closed.is_set():
                    conn.obs.missed_checkpoint = True
            elif kind == "msg":
                await conn.message(st[1], st[2], st[3])
        conn.chop = 0
        if case.server_closes and not case.fail and not conn.client_closed.is_set():
            # let the echoes arrive before closing
            want = len(case.expect)
            loop = asyncio.get_running_loop()
            end = loop.time() + self.case_timeout
            while len(conn.obs.items) < want and not conn.client_closed.is_set() and \
                    loop.time() < end:
                conn.got_item.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.got_item.wait(), 0.05)
            if not conn.client_closed.is_set():
                conn.closed_sent = True
                await conn.write(close_frame())
        try:
            await asyncio.wait_for(rd, self.case_timeout)
        except TimeoutError:
            conn.obs.errors.append("client did not close within %ss" % self.case_timeout)

    def report(self, agent: str) -> str:
        return format_table({agent: summary(self.results.get(agent, []), self.cases)})


def judge(case: Case, obs: Observed) -> Result:
    notes = []
    verdict = "OK"
    if obs.errors:
        verdict = "FAILED"
        notes += obs.errors
    exp = case.expect
    if obs.items != exp:
        if case.fail and obs.items == exp[:len(obs.items)]:
            verdict = "NON-STRICT" if verdict == "OK" else verdict
            notes.append("echoed %d of %d items before failing" % (len(obs.items), len(exp)))
        else:
            verdict = "FAILED"
            notes.append("items differ: got %s, expected %s" % (_short(obs.items), _short(exp)))
    if obs.close_code not in case.close:
        verdict = "FAILED"
        notes.append("client close code %s, expected one of %s" % (obs.close_code, case.close))
    if obs.missed_checkpoint and verdict == "OK":
        verdict = "NON-STRICT"
        notes.append("did not fail fast")
    if case.info:
        verdict = "INFORMATIONAL"
    return Result(case, verdict, "; ".join(notes))


def _short(items: list) -> str:
    return "[" + ", ".join("%s(%d bytes)" % (i[0], len(i[-1])) for i in items[:4]) + \
        (", ..." if len(items) > 4 else "") + "]"


def group_of(case_id: str) -> str:
    return case_id.split(".")[0]


def summary(results: list[Result], cases: list[Case]) -> dict[str, tuple[int, int]]:
    """{group: (passed, total)}; a case without a result (the client never ran it) fails."""
    by_id = {r.case.id: r for r in results}
    out: dict[str, list[int]] = {}
    for c in cases:
        g = out.setdefault(group_of(c.id), [0, 0])
        g[1] += 1
        r = by_id.get(c.id)
        if r is not None and r.verdict != "FAILED":
            g[0] += 1
    return {g: (p, t) for g, (p, t) in out.items()}


def format_table(columns: dict[str, dict[str, tuple[int, int]]]) -> str:
    names = list(columns)
    w = max(len("%s %s" % (g, d)) for g, d in GROUPS.items())
    lines = ["%-*s  %s" % (w, "case group", "  ".join("%14s" % n for n in names))]
    for g, d in GROUPS.items():
        cells = []
        for n in names:
            pt = columns[n].get(g)
            cells.append("%14s" % ("%d / %d" % pt if pt else "-"))
        lines.append("%-*s  %s" % (w, "%s %s" % (g, d), "  ".join(cells)))
    tot = []
    for n in names:
        p = sum(v[0] for v in columns[n].values())
        t = sum(v[1] for v in columns[n].values())
        tot.append("%14s" % ("%d / %d" % (p, t)))
    lines.append("%-*s  %s" % (w, "total", "  ".join(tot)))
    return "\n".join(lines)


# --- the client side -----------------------------------------------------------------------------
# An echo client on microcot.ws, the same source for CPython (exec'd in-process) and MicroPython
# (run as a script: micropython script.py FIRMWARE_DIR HOST PORT AGENT [PMD_JSON]).

CLIENT_SCRIPT = r'''
import sys


def main(host, port, agent, pmd=True, limit=0):
    from microcot import ws

    class Echo(ws.WebSocketClient):
        def on_message(self, content, content_type):
            self.got = bytes(content)
            self.send_message(content, content_type == ws.WS_CONTENT_TEXT, self.can_compress)

    def run(uri, timeout_ms=15000):
        c = Echo(host, port, uri, per_message_deflate=pmd, keep_alive=False, close_timeout=2)
        c.got = None
        c.connect()
        t0 = ws.ticks_ms()
        while c.active and ws.ticks_diff(ws.ticks_ms(), t0) < timeout_ms:
            c.execute(5)
        if c.active:
            c.disconnect()
        return c

    c = run("/getCaseCount")
    n = int(c.got)
    if limit:
        n = min(n, limit)
    for i in range(1, n + 1):
        run("/runCase?case=%d&agent=%s" % (i, agent))
    run("/updateReports?agent=%s" % agent)
    return n


if __name__ == "__main__" and len(sys.argv) > 4:
    sys.path.insert(0, sys.argv[1])
    pmd = True
    if len(sys.argv) > 5:
        import json
        pmd = json.loads(sys.argv[5])
    print("cases", main(sys.argv[2], int(sys.argv[3]), sys.argv[4], pmd))
'''


def run_client_cpython(port: int, agent: str, host: str = "127.0.0.1", pmd=True,
                       limit: int = 0) -> int:
    """Run the echo client in this process (microcot must be importable)."""
    g: dict = {"__name__": "wsconform_client"}
    exec(CLIENT_SCRIPT, g)
    return g["main"](host, port, agent, pmd, limit)
