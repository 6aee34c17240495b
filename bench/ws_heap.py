"""Heap of the WebSocket and SignalR/KICS clients at their default limits, on the i386 board
models of fidelity/ (micropython-i386-esp32 and -rp2): gc.mem_free() deltas for honest traffic
and for a hostile frame header, through a scripted fake socket (tests/device/wsfake.py), so the
numbers are the client's own (no TLS, no network stack). "peak" is the most the client held at
the end of an execute() cycle (garbage collected), "held" what it holds after the run; the
transient copy while the message buffer grows (old + new buffer) comes on top of the peak.

    python bench/ws_heap.py [HEAP]     # both models (heap 256k); MICROCOT_FIDELITY_DIR: where
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import gc, sys
sys.path[:0] = [%(fw)r, %(dev)r]
import wsfake
from microcot import wsframe as F
from microcot import ws as W
H = bytes.fromhex
def run(chunks, after=False, make=None):
    gc.collect(); f0 = gc.mem_free()
    sock = wsfake.Sock(chunks, after_client=after, eof=False)
    with wsfake.Patched(sock):
        c = make() if make else W.WebSocketClient("bench.invalid", 80, "/", keep_alive=False)
        c.connect()
        low = f0
        for _ in range(30):
            c.execute(0)
            gc.collect()  # what the client holds between cycles (garbage aside)
            f = gc.mem_free()
            low = f if f < low else low
    gc.collect()
    return c, f0 - low, f0 - gc.mem_free()
def msg(n):
    return F.encode(F.OP_BINARY, bytes(n))
gc.collect(); base = gc.mem_free()
print("free after importing ws", base)
c, peak, held = run([msg(16)]); print("ws honest 16 B message: peak %%d held %%d" %% (peak, held))
c = None
c, peak, held = run([msg(4096)]); print("ws honest 4 KiB message: peak %%d held %%d" %% (peak, held))
c = None
c, peak, held = run([H("827f0000000000010000") + b"abcd"])
print("ws hostile header 64 KiB + 4 B: peak %%d held %%d (message buffer %%d B, state %%d %%s)" %% (peak, held, len(c._reader.buf) if c._reader else 0, c.state, c.error_msg))
c = None
c, peak, held = run([H("827e8000") + b"abcd"])
print("ws hostile header 32 KiB + 4 B: peak %%d held %%d (state %%d %%s)" %% (peak, held, c.state, c.error_msg))
c = None
try:
    c, peak, held = run([msg(0x8000)])
    print("ws honest 32 KiB message: peak %%d held %%d (state %%d %%s)" %% (peak, held, c.state, c.error_msg))
except MemoryError:
    print("ws honest 32 KiB message: MemoryError (the scripted server's own copy included)")
c = None
gc.collect()
from microcot import kics as K, signalr as S
RS = b"\x1e"
gc.collect(); print("free after importing kics+signalr", gc.mem_free())
conf = S.stream_item("0", {"confirmation": {"result": "ok", "tagIdentifier": {"tagName": "T", "assetName": "A"}, "tagId": 1}})
val = S.stream_item("0", {"value": {"tagId": 1, "tagValue": {"n": "x", "d": {"v": {"t": "d", "v": 1.5, "x": 1}}}}})
mk = lambda: K.TagValueClient("bench.invalid", "tok", [("A", "T")], port=80, tls=None)
c, peak, held = run([F.encode(1, b"{}" + RS), F.encode(1, conf), F.encode(1, val)], True, mk)
print("kics subscribed, one value: peak %%d held %%d (state %%s)" %% (peak, held, c.state_name))
c = None
c, peak, held = run([F.encode(1, b"{}" + RS), H("817f0000000000010000") + b"{}"], True, mk)
print("kics hostile header 64 KiB + 2 B: peak %%d held %%d (state %%s)" %% (peak, held, c.state_name))
"""


def main() -> None:
    fid = Path(os.environ.get("MICROCOT_FIDELITY_DIR", ROOT.parent / "shared" / "fidelity"))
    code = SCRIPT % {"fw": str(ROOT / "firmware"), "dev": str(ROOT / "tests" / "device")}
    heap = sys.argv[1] if len(sys.argv) > 1 else "256k"
    for board in ("micropython-i386-esp32", "micropython-i386-rp2"):
        print("==", board, "(heap %s, modules from source)" % heap)
        r = subprocess.run([str(fid / board), "-X", "heapsize=" + heap, "-c", code],
                           capture_output=True, text=True, timeout=300)
        sys.stdout.write(r.stdout + r.stderr[-2000:])


if __name__ == "__main__":
    main()
