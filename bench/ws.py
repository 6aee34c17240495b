"""WebSocket echo throughput and memory: microcot.ws on the MicroPython unix port (a subprocess)
against `websocket-client` on CPython, both talking to one `websockets` echo server started in
this process, in the same run. microcot.ws on CPython is shown too.

For 16 B, 1 KiB and 64 KiB binary messages: each client sends a message and waits for its echo,
COUNT times (one message in flight: round trips, not pipelining). msgs/s = echoes per second;
MB/s = payload bytes sent plus received per second (10**6 bytes). ratio = the row's msgs/s over
websocket-client's. Best of REPEAT runs.

Memory, on the unix port (imports as .py from firmware/, 64-bit, so larger than on a 32-bit
board): the heap a connected client holds (gc.mem_alloc() after gc.collect(), connection minus
before, imports excluded), the heap held while on_message has a 64 KiB message (the receive buffer grown to 64 KiB), and
the growth of
micropython.mem_peak() over a 64 KiB round trip (everything allocated at once, garbage included).
Masking: MB/s of wsframe.mask() on 64 KiB (viper and the pure-Python fallback) and its share of a
64 KiB round trip.

    python bench/ws.py [--count N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIRMWARE = ROOT / "firmware"
# this script is named ws.py: keep its directory off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(FIRMWARE))

MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or \
    shutil.which("micropython")
SIZES = (16, 1024, 65536)

# Runs on the unix port; prints one JSON line. The same client loop as CLIENT_LOOP below.
MP_SCRIPT = r"""
import sys, gc, json, micropython
sys.path.insert(0, %(fw)r)
from microcot import ws as W
from microcot import wsframe as F
port, count, repeat = %(port)d, %(count)d, %(repeat)d
gc.collect()
base = gc.mem_alloc()

class C(W.WebSocketClient):
    got = 0
    held = 0
    def on_message(self, content, content_type):
        self.got += 1
        if len(content) == 65536 and not self.held:
            gc.collect()
            self.held = gc.mem_alloc() - base

c = C("127.0.0.1", port, "/", keep_alive=False)
c.connect()
while c.state == W.WS_STATUS_BUSY:
    c.execute()
gc.collect()
out = {"conn": gc.mem_alloc() - base, "version": "%%d.%%d.%%d" %% sys.implementation.version[:3],
       "mask": F.mask_variant(), "utf8": F.utf8_variant(), "rows": {}}
# the 64 KiB round trip's peak, first of all (mem_peak cannot be reset)
def send64():  # in a function: no stale reference keeps the message alive for the GC
    c.send_message(bytes(65536), False)

gc.collect()
p0 = micropython.mem_peak()
send64()
while c.got < 1:
    c.execute()
out["peak64"] = micropython.mem_peak() - p0
out["held64"] = c.held
for size in %(sizes)r:
    msg = bytes(i & 0xFF for i in range(size))
    best = None
    for _ in range(repeat):
        c.got = 0
        t0 = W.ticks_ms()
        for i in range(count):
            c.send_message(msg, False)
            while c.got <= i:
                c.execute()
        t = W.ticks_diff(W.ticks_ms(), t0) / 1000
        best = t if best is None or t < best else best
    out["rows"][str(size)] = best
c.disconnect()
while c.active:
    c.execute()
buf = bytearray(65536)
key = b"\x01\x02\x03\x04"
for name, fn in (("viper", F.mask), ("python", F.mask_py)):
    if name == "viper" and F.mask_variant() != "viper":
        continue
    import time
    t0 = time.ticks_us()
    for _ in range(10):
        fn(buf, 0, 65536, key)
    out["mask_" + name] = time.ticks_diff(time.ticks_us(), t0) / 1e6 / 10
print("JSON" + json.dumps(out))
"""


SERVER = r"""
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for m in ws:
        await ws.send(m)

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None, compression=None,
                     ping_interval=None) as srv:
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class EchoServer:
    """The websockets echo server in a child process: no client shares its interpreter (and
    GIL) with it, so every client meets the same server."""

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def bench_websocket_client(port: int, count: int, repeat: int) -> dict:
    import websocket

    ws = websocket.create_connection("ws://127.0.0.1:%d/" % port)
    rows = {}
    for size in SIZES:
        msg = bytes(i & 0xFF for i in range(size))
        best = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(count):
                ws.send_binary(msg)
                if len(ws.recv()) != size:
                    raise SystemExit("websocket-client: wrong echo")
            t = time.perf_counter() - t0
            best = t if best is None or t < best else best
        rows[str(size)] = best
    ws.close()
    return {"rows": rows, "version": websocket.__version__}


def bench_microcot_cpython(port: int, count: int, repeat: int) -> dict:
    from microcot import ws as W

    class C(W.WebSocketClient):
        got = 0

        def on_message(self, content, content_type):
            self.got += 1

    c = C("127.0.0.1", port, "/", keep_alive=False)
    c.connect()
    while c.state == W.WS_STATUS_BUSY:
        c.execute()
    rows = {}
    for size in SIZES:
        msg = bytes(i & 0xFF for i in range(size))
        best = None
        for _ in range(repeat):
            c.got = 0
            t0 = time.perf_counter()
            for i in range(count):
                c.send_message(msg, False)
                while c.got <= i:
                    c.execute()
            t = time.perf_counter() - t0
            best = t if best is None or t < best else best
        rows[str(size)] = best
    c.disconnect()
    while c.active:
        c.execute()
    from microcot import wsframe as F

    buf = bytearray(65536)
    t0 = time.perf_counter()
    for _ in range(10):
        F.mask(buf, 0, 65536, b"\x01\x02\x03\x04")
    return {"rows": rows, "mask_python": (time.perf_counter() - t0) / 10}


def bench_micropython(port: int, count: int, repeat: int) -> dict | None:
    if not MICROPYTHON:
        return None
    code = MP_SCRIPT % {"fw": str(FIRMWARE), "port": port, "count": count, "repeat": repeat,
                        "sizes": SIZES}
    r = subprocess.run([MICROPYTHON, "-c", code], capture_output=True, text=True, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:])
    raise SystemExit("micropython run failed:\n" + r.stdout + r.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300, help="round trips per size and run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size, best taken")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args()

    with EchoServer() as srv:
        ref = bench_websocket_client(srv.port, args.count, args.repeat)
        cpy = bench_microcot_cpython(srv.port, args.count, args.repeat)
        mp = bench_micropython(srv.port, args.count, args.repeat)
    if args.json:
        print(json.dumps({"count": args.count, "websocket-client": ref, "microcot-cpython": cpy,
                          "microcot-micropython": mp}, indent=2))
        return 0

    pyv = "CPython %d.%d" % sys.version_info[:2]
    rows = []
    if mp:
        rows.append(("microcot.ws, MicroPython %s unix" % mp["version"], mp["rows"]))
    rows.append(("microcot.ws, %s" % pyv, cpy["rows"]))
    rows.append(("websocket-client %s, %s" % (ref["version"], pyv), ref["rows"]))
    print("WebSocket echo round trips against one websockets server, %d per size, best of %d\n"
          % (args.count, args.repeat))
    w = max(len(k) for k, _ in rows)
    head = "  ".join("%8s %8s %6s" % ("msgs/s", "MB/s", "ratio") for _ in SIZES)
    print("%-*s  %s" % (w, "", "  ".join("%-24s" % ("%d B" % s if s < 1024 else "%d KiB" %
                                                    (s // 1024)) for s in SIZES)))
    print("%-*s  %s" % (w, "client", head))
    for name, r in rows:
        cells = []
        for s in SIZES:
            t = r[str(s)]
            mps = args.count / t
            ratio = mps / (args.count / ref["rows"][str(s)])
            cells.append("%8.0f %8.2f %5.2fx" % (mps, 2 * s * args.count / t / 1e6, ratio))
        print("%-*s  %s" % (w, name, "  ".join(cells)))
    print("\nratio: msgs/s over websocket-client's (CPython) for the same size")
    if mp:
        rt64 = mp["rows"]["65536"] / args.count
        print("\nMicroPython %s unix port, memory (64-bit; imports excluded):" % mp["version"])
        print("  heap held by a connected client          %7d bytes" % mp["conn"])
        print("  heap held while on_message has 64 KiB    %7d bytes" % mp["held64"])
        print("  mem_peak growth over a 64 KiB round trip %7d bytes" % mp["peak64"])
        print("masking 64 KiB (variant in use: %s; UTF-8 check: %s):" % (mp["mask"], mp["utf8"]))
        for name in ("viper", "python"):
            t = mp.get("mask_" + name)
            if t:
                print("  MicroPython %-6s %8.1f MB/s, %5.1f%% of a 64 KiB round trip"
                      % (name, 65536 / t / 1e6, 100 * t / rt64))
        print("  CPython (big-int XOR) %8.1f MB/s" % (65536 / cpy["mask_python"] / 1e6))
    else:
        print("(no micropython binary next to %s: MicroPython rows skipped)" % sys.executable)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
