"""microcot.ws as a client of bench/ws.py: runs on MicroPython (the unix port, the i386 board
models) and on CPython, in a process of its own, driven over stdin/stdout one command a line:

    run SIZE COUNT   COUNT round trips of SIZE-byte binary messages, one in flight, after two
                     untimed ones; answers "RUN SIZE COUNT MICROSECONDS MISMATCHES"
    heap SIZE        (MicroPython) two round trips, gc.collect() and gc.mem_alloc() around them;
                     answers "HEAP SIZE HELD ALLOC" (see heap())
    quit             close the connection and exit

    micropython _ws_microcot.py FIRMWARE_DIR PORT MAX_FRAME WAIT_MS [CA_FILE]

Waiting is done where an application would: in execute(WAIT_MS), which sleeps in poll() until
the echo arrives, so the echo server keeps the other core. Every echo is compared byte for byte
with the message sent (a counter in its first bytes makes each message different).
"""

import gc
import sys

sys.path.insert(0, sys.argv[1])

from microcot import ws as W  # noqa: E402

try:
    from time import ticks_diff, ticks_us
except ImportError:  # CPython
    from time import perf_counter_ns

    def ticks_us():
        return perf_counter_ns() // 1000

    def ticks_diff(a, b):
        return a - b

_MP = sys.implementation.name == "micropython"
PORT = int(sys.argv[2])
MAX_FRAME = int(sys.argv[3])
WAIT = int(sys.argv[4])
CA = sys.argv[5] if len(sys.argv) > 5 else None
BINARY = W.WS_CONTENT_BINARY  # once: module __getattr__ is a function call on each use


def message(size):
    """SIZE bytes of a pattern with period 251 (no multiple of the mask's 4)."""
    p = bytes((i * 7 + 3) % 251 for i in range(251))
    m = bytearray(size)  # filled in place: no transient copies of a large message
    for i in range(0, size - 250, 251):
        m[i:i + 251] = p
    i = size - size % 251
    m[i:] = p[:size - i]
    return m


class Client(W.WebSocketClient):
    got = 0
    bad = 0
    expect = b""

    def on_message(self, content, content_type):
        self.got += 1
        if content_type != BINARY or content != self.expect:
            self.bad += 1


def alloc():
    gc.collect()
    return gc.mem_alloc()


base = alloc() if _MP else 0
# the client's settings are the defaults but for two: no keep-alive pings (websocket-client sends
# none either) and frames up to MAX_FRAME (the server echoes a message as one frame, which the
# default max_recv_frame_size of 64 KiB would refuse with 1009 above that)
c = Client("localhost" if CA else "127.0.0.1", PORT, "/", keep_alive=False,
           max_recv_frame_size=MAX_FRAME, max_recv_msg_size=max(MAX_FRAME, 0x100000),
           tls={"ca": CA} if CA else None)
c.connect()
while c.state == W.WS_STATUS_BUSY:
    c.execute(WAIT)
if not c.connected:
    print("FAIL connect", c.state, c.error_msg)
    sys.exit(1)
print("READY", "%d.%d.%d" % sys.implementation.version[:3], W.F.mask_variant())


def loop(msg, count):
    c.got = 0
    c.expect = msg
    for i in range(count):
        msg[0] = i & 0xFF
        msg[1] = (i >> 8) & 0xFF
        msg[2] = (i >> 16) & 0xFF
        if not c.send_message(msg, False):
            return False
        while c.got <= i:
            c.execute(WAIT)
            if not c.connected:
                return False
    return True


kept = [None]  # the message of the last run, reused: a 1 MiB allocation per run would
# fragment the heap until one fails


def run(size, count):
    msg = kept[0]
    if msg is None or len(msg) != size:
        kept[0] = msg = None
        gc.collect()
        kept[0] = msg = message(size)
    c.bad = 0
    ok = loop(msg, 2)
    t0 = ticks_us()
    ok = ok and loop(msg, count)
    t = ticks_diff(ticks_us(), t0)
    if not ok:
        print("FAIL", c.state, c.error_msg)
        sys.exit(1)
    print("RUN", size, count, t, c.bad)


def heap(size):
    """HELD: gc.mem_alloc() after gc.collect() while on_message has the echo, above the heap
    before connect(), the benchmark's own message not counted. ALLOC: bytes allocated during one
    more round trip with the GC off (garbage included); HELD + ALLOC bounds the peak."""
    m0 = alloc()
    msg = message(size)
    cost = alloc() - m0
    seen = []
    on_message = c.on_message

    def probe(content, content_type):
        if not seen:
            seen.append(alloc())
        return on_message(content, content_type)

    c.on_message = probe
    c.bad = 0
    loop(msg, 2)  # grows the buffers; the sample is taken on the first echo
    seen.clear()
    loop(msg, 1)
    c.on_message = on_message
    held = seen[0] - base - cost
    a0 = alloc()
    gc.disable()
    loop(msg, 1)
    a1 = gc.mem_alloc()
    gc.enable()
    print("HEAP", size, held, a1 - a0, c.bad)


while True:
    line = sys.stdin.readline()
    if not line:
        break
    cmd = line.split()
    if cmd[0] == "run":
        run(int(cmd[1]), int(cmd[2]))
    elif cmd[0] == "heap":
        heap(int(cmd[1]))
    elif cmd[0] == "quit":
        break
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()
c.disconnect()
while c.active:
    c.execute(WAIT)
