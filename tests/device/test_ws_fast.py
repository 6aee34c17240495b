# The WebSocket receive and send paths' fast cases (issue 14, bench/ws.py at 16 B): Reader.take()
# with its shortcut for a whole small frame must decode exactly as feed() byte by byte; the
# driver stops reading once a delivered message has emptied its buffer; and on MicroPython an
# echo of a small message (execute + send_message) allocates nothing, since a heap-allocated
# call frame next to per-call garbage makes MicroPython's allocator scan ever further.
import gc
import sys

import wsfake
from dt import Rng, raises

from microcot import ws as W
from microcot import wsframe as F

_MP = sys.implementation.name == "micropython"


def _events_take(r, data):
    """The events of take() over data handed over whole, the message bytes copied out."""
    evs = []
    i = 0
    while i < len(data):
        i = r.take(data, i, len(data))
        if r.ev:
            ev = r.event(r.ev)
            if ev[0] == "msg":
                ev = ("msg", ev[1], bytes(r.buf[:ev[2]]), ev[3])
            evs.append(ev)
    return evs


def _events_bytewise(r, data):
    evs = []
    mv = memoryview(data)
    for i in range(len(data)):
        used, ev = r.feed(mv[i:i + 1])
        assert used == 1
        if ev:
            if ev[0] == "msg":
                ev = ("msg", ev[1], bytes(r.buf[:ev[2]]), ev[3])
            evs.append(ev)
    return evs


def _stream(rng, n):
    """n seeded server frames: mostly whole small text/binary messages (the shortcut), with
    fragmented messages, control frames and 126-byte lengths in between (the general path)."""
    out = []
    for _ in range(n):
        kind = rng.below(8)
        size = rng.below(126)
        if kind < 4:
            out.append(F.encode(F.OP_BINARY, rng.bytes(size)))
        elif kind < 6:
            out.append(F.encode(F.OP_TEXT, b"a\xc3\xa9" * (size // 3)))
        elif kind == 6:
            out.append(F.encode(F.OP_TEXT, b"ab", fin=False) + F.encode(F.OP_PING, b"p")
                       + F.encode(F.OP_CONT, b"c\xc3", fin=False) + F.encode(F.OP_CONT, b"\xa9"))
        else:
            out.append(F.encode(F.OP_BINARY, rng.bytes(126 + rng.below(40))))
    return b"".join(out)


def test_take_decodes_as_feed_byte_by_byte():
    rng = Rng(14)
    ra = F.Reader()
    rb = F.Reader()
    for _ in range(4):  # in rounds: the esp32-generic model's heap is small and cut up
        gc.collect()
        data = _stream(rng, 8)
        a = _events_take(ra, data)
        assert a == _events_bytewise(rb, data)
        assert len(a) >= 8


def test_take_shortcut_keeps_the_limits_and_utf8_check():
    # text with invalid UTF-8, whole in the buffer: 1007 as on the general path
    e = raises(F.ProtocolError, F.Reader().take, F.encode(F.OP_TEXT, b"a\xff"), 0, 4)
    assert e.code == F.CLOSE_INVALID_DATA
    # a whole small frame over max_frame / max_msg: 1009 from the header, nothing stored
    for kw in ({"max_frame": 10}, {"max_msg": 10}):
        r = F.Reader(**kw)
        e = raises(F.ProtocolError, r.take, F.encode(F.OP_BINARY, bytes(11)), 0, 13)
        assert e.code == F.CLOSE_TOO_BIG
        assert len(r.buf) == 0
    # a continuation frame after a shortcut message is a protocol error (no message open)
    r = F.Reader()
    data = F.encode(F.OP_BINARY, b"x") + F.encode(F.OP_CONT, b"y")
    i = r.take(data, 0, len(data))
    assert (i, r.ev, r.ev_n) == (3, F.EV_MSG, 1)
    e = raises(F.ProtocolError, r.take, data, i, len(data))
    assert e.code == F.CLOSE_PROTOCOL_ERROR


class _Counting(wsfake.Sock):
    reads = 0

    def recv_into(self, mv):
        self.reads += 1
        return wsfake.Sock.recv_into(self, mv)

    readinto = recv_into


def _open(sock):
    c = W.WebSocketClient("fast.invalid", 80, "/", keep_alive=False)
    c.got = []
    c.on_message = lambda content, ctype: c.got.append(bytes(content))
    with wsfake.Patched(sock):
        c.connect()
        for _ in range(10):
            if c.connected:
                break
            c.execute(0)
    assert c.connected, (c.state, c.error_msg)
    return c


def test_no_read_after_a_message_that_emptied_the_buffer():
    sock = _Counting([], eof=False)
    c = _open(sock)
    sock.chunks = wsfake.frames([b"one", b"two"], F.OP_BINARY)  # one frame a read from now on
    while sock.pending or sock.chunks:  # one message a read, each read delivers one
        n = sock.reads
        c.execute(0)
        assert sock.reads == n + 1
    assert c.got == [b"one", b"two"]
    n = sock.reads
    c.execute(0)  # nothing there: one read finds nothing
    assert sock.reads == n + 1 and c.connected


class _Echo:
    """A socket that answers every frame written with a 16-byte binary frame, without
    allocating (the bytes copied one by one)."""

    def __init__(self, frame):
        self.frame = frame
        self.due = False

    def readinto(self, mv):
        if not self.due:
            return None
        self.due = False
        f = self.frame
        i = 0
        n = len(f)
        while i < n:
            mv[i] = f[i]
            i += 1
        return n

    recv_into = readinto

    def write(self, mv):
        self.due = True
        return len(mv)

    send = write


def test_a_small_echo_allocates_nothing_on_micropython():
    if not _MP:
        return  # CPython allocates anyway; what matters is MicroPython's heap
    sock = wsfake.Sock([], eof=False)
    c = _open(sock)
    echo = _Echo(F.encode(F.OP_BINARY, bytes(range(16))))
    c._s = c._raw = echo
    msg = bytearray(16)
    seen = [0]

    def on_message(content, ctype):
        seen[0] += 1

    c.on_message = on_message
    for _ in range(20):  # buffers grown, keys fetched, views kept
        c.send_message(msg, False)
        c.execute(0)
    c._ki = 0  # no urandom() for masking keys during the measured round trips
    gc.collect()
    gc.disable()
    try:
        a = gc.mem_alloc()
        c.send_message(msg, False)
        c.execute(0)
        c.send_message(msg, False)
        c.execute(0)
        b = gc.mem_alloc()
    finally:
        gc.enable()
    assert seen[0] == 22 and c.connected
    assert b - a == 0, b - a
