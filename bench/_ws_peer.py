"""The peer of bench/ws.py: the `websocket-client` library (PyPI) with its defaults, in a CPython
process of its own, driven over stdin/stdout exactly like bench/_ws_microcot.py:

    run SIZE COUNT   COUNT round trips (send_binary, recv), one in flight, after two untimed ones;
                     answers "RUN SIZE COUNT MICROSECONDS MISMATCHES"
    heap SIZE        (with --trace) answers "HEAP SIZE HELD PEAK MISMATCHES" (see heap())
    quit             close the connection and exit

    python bench/_ws_peer.py PORT [--ca CA_FILE] [--trace]

--trace runs tracemalloc from before connecting, for the heap figures; it slows every allocation,
so timed runs go to a process without it.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
import tracemalloc

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("--ca")
ap.add_argument("--trace", action="store_true")
args = ap.parse_args()
if args.trace:
    tracemalloc.start()

import websocket  # noqa: E402  (after tracemalloc.start: its import is not counted either way)


def message(size: int) -> bytearray:
    """SIZE bytes of a pattern with period 251 (the same as bench/_ws_microcot.py's)."""
    p = bytes((i * 7 + 3) % 251 for i in range(251))
    m = bytearray(size)  # filled in place: no transient copies of a large message
    for i in range(0, size - 250, 251):
        m[i:i + 251] = p
    i = size - size % 251
    m[i:] = p[:size - i]
    return m


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


def connect() -> websocket.WebSocket:
    if args.ca:
        return websocket.create_connection(
            f"wss://localhost:{args.port}/",
            sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": args.ca})
    return websocket.create_connection(f"ws://127.0.0.1:{args.port}/")


if args.trace:
    # a first connection imports what websocket-client imports lazily (as the MicroPython
    # client's imports are outside its figures); the second one is measured
    connect().close()
base = traced() if args.trace else 0
ws = connect()
print("READY", websocket.__version__, "python", flush=True)


def loop(msg: bytearray, count: int) -> int:
    bad = 0
    for i in range(count):
        msg[0] = i & 0xFF
        msg[1] = (i >> 8) & 0xFF
        msg[2] = (i >> 16) & 0xFF
        ws.send_binary(msg)
        if ws.recv() != msg:
            bad += 1
    return bad


def run(size: int, count: int) -> None:
    msg = message(size)
    bad = loop(msg, 2)
    t0 = time.perf_counter_ns()
    bad += loop(msg, count)
    t = (time.perf_counter_ns() - t0) // 1000
    print("RUN", size, count, t, bad, flush=True)


def heap(size: int) -> None:
    """HELD: tracemalloc's current size while recv()'s echo is held, above the size before
    connecting, the benchmark's own message not counted. PEAK: tracemalloc's peak during one
    round trip on the same terms (transient copies included)."""
    m0 = traced()
    msg = message(size)
    cost = traced() - m0
    bad = loop(msg, 2)
    tracemalloc.reset_peak()
    ws.send_binary(msg)
    echo = ws.recv()
    held = traced() - base - cost
    peak = tracemalloc.get_traced_memory()[1] - base - cost
    bad += echo != msg
    del echo
    print("HEAP", size, held, peak, bad, flush=True)


for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "run":
        run(int(cmd[1]), int(cmd[2]))
    elif cmd[0] == "heap":
        heap(int(cmd[1]))
    elif cmd[0] == "quit":
        break
ws.close()
