"""The WebSocket/SignalR/KICS fuzz functions of tests/device/test_fuzz_ws*.py at big counts, on
CPython or on an i386 board model (issue 14). tools/fuzz.py runs every project fuzz function; this
runs only these, e.g. while working on them.

    python bench/ws_fuzz.py 100000                 # CPython, n per decoder (drivers: n / 10)
    python bench/ws_fuzz.py 5000 --board micropython-i386-rp2 --driver-n 5000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODERS = ("fuzz_wsframe", "fuzz_wspmd", "fuzz_signalr", "fuzz_kics")
DRIVERS = ("fuzz_ws_client", "fuzz_tagvalue_client")

BOARD = r"""
import sys, time
sys.path[:0] = [%(fw)r, %(dev)r]
from dt import Rng
import test_fuzz_ws, test_fuzz_wsclient, test_fuzz_kicsclient
mods = (test_fuzz_ws, test_fuzz_wsclient, test_fuzz_kicsclient)
for mod, name, n in %(jobs)r:
    t0 = time.ticks_ms()
    r = getattr(mods[mod], name)(Rng(%(seed)d), n)
    print(name, r, time.ticks_diff(time.ticks_ms(), t0) / 1000, "s")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--board", help="an i386 model of MICROCOT_FIDELITY_DIR")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--heap", default="1m")
    ap.add_argument("--driver-n", type=int, help="inputs per driver fuzz (default n / 10)")
    ap.add_argument("--only", help="comma-separated fuzz function names")
    a = ap.parse_args()
    dn = a.driver_n or max(1, a.n // 10)
    jobs = [(0, d, a.n) for d in DECODERS] + [(i + 1, d, dn) for i, d in enumerate(DRIVERS)]
    if a.only:
        jobs = [j for j in jobs if j[1] in a.only.split(",")]
    if a.board:
        fid = Path(os.environ.get("MICROCOT_FIDELITY_DIR", ROOT.parent / "shared" / "fidelity"))
        code = BOARD % {"fw": str(ROOT / "firmware"), "dev": str(ROOT / "tests" / "device"),
                        "jobs": jobs, "seed": a.seed}
        r = subprocess.run([str(fid / a.board), "-X", "heapsize=" + a.heap, "-c", code],
                           capture_output=True, text=True)
        sys.stdout.write(r.stdout + r.stderr)
        sys.exit(r.returncode)
    sys.path[:0] = [str(ROOT / "firmware"), str(ROOT / "tests" / "device")]
    import test_fuzz_kicsclient
    import test_fuzz_ws
    import test_fuzz_wsclient
    from dt import Rng

    mods = (test_fuzz_ws, test_fuzz_wsclient, test_fuzz_kicsclient)
    for mod, name, n in jobs:
        t0 = time.monotonic()
        r = getattr(mods[mod], name)(Rng(a.seed), n)
        print(name, r, "%.1f s" % (time.monotonic() - t0))


if __name__ == "__main__":
    main()
