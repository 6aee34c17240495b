"""The durable queue's cost (setting "durable", firmware/microcot/outlog.py) against the RAM queue:
flash writes per row and the time of one Agent.measure(), on the board models.

On each board (--boards: board files; each runs its runtime: `virtual` the 64-bit unix port,
`esp32-generic` the i386-esp32 build) the agent measures with no network (measure() only queues
a row), in two situations:
  offline   N rows queue up (the queue's flash bound is 500: nothing is dropped);
  online    each row is sent at once and acknowledged: after every measure() the bench does what
            link.flush does with a PUBACK (peek, pop, done(0)); only measure() is timed.
and on two filesystems:
  lfs       littlefs 2 (vfs.VfsLfs2, the ESP32 port's parameters: 4 KiB blocks, read and prog
            size 32) on a flash in RAM that counts block erases and programmed bytes, so the
            wear is littlefs's own; 64 blocks (256 KiB)
  dir       the board's own filesystem (the host folder of a virtual board)
--alt also measures the design not taken: one file per row on the same littlefs (N files of 96
bytes created in one folder, then removed): erases, bytes and time per row.
Runs of the two modes alternate (RAM, durable, RAM, ...; --reps of each); medians are reported.
The time is the median of N single measure() calls (time.ticks_us) in a run, then the median
over the runs. What real flash adds is not in these times: a NOR sector erase takes tens of ms
and a page program about a ms; the erase and program counts say how many there are.

    python bench/durable.py [--boards virtual,esp32-generic] [--n 200] [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "firmware")]

from microcot_host import boards, deploy, transport  # noqa: E402
from microcot_host.vboard.models import make_board  # noqa: E402

# one run on the board: prints RESULT {json}
RUN = """
import gc, os, time, json, vfs
from microcot.agent import Agent


class Flash:
    # NOR flash in RAM for littlefs: counts erases and programmed bytes
    def __init__(self, blocks, size=4096):
        self.size = size
        self.n = blocks
        self.data = bytearray(blocks * size)
        self.erases = 0
        self.prog = 0

    def readblocks(self, b, buf, off=0):
        a = b * self.size + off
        buf[:] = memoryview(self.data)[a:a + len(buf)]

    def writeblocks(self, b, buf, off=None):
        if off is None:  # the simple interface: a whole block, erased first
            self.erases += 1
            off = 0
        a = b * self.size + off
        self.data[a:a + len(buf)] = buf
        self.prog += len(buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.size
        if op == 6:
            self.erases += 1
            return 0
        return 0


where = %(where)r
durable = %(durable)r
online = %(online)r
N = %(n)d
fl = None
if where == "lfs":
    try:
        vfs.umount("/lfs")
    except OSError:
        pass
    fl = Flash(64)
    vfs.VfsLfs2.mkfs(fl)
    vfs.mount(vfs.VfsLfs2(fl), "/lfs")
    st = "/lfs/store"
else:
    st = "/bench-durable"
    try:
        for f in os.listdir(st):
            os.remove(st + "/" + f)
    except OSError:
        pass
a = Agent(config={"store": st, "durable": durable, "queue": [16, 500], "log": False,
                  "reserve": 0, "manage": [], "log_ring": 0})
q = a.q
gc.collect()
e0 = fl.erases if fl else 0
p0 = fl.prog if fl else 0
w0 = getattr(q, "writes", 0)
us = []
for k in range(N):
    t = time.ticks_us()
    a.measure("c8y_Temperature", "T", 20 + k %% 50 / 10, "C", t=1767225600 + k)
    us.append(time.ticks_diff(time.ticks_us(), t))
    if online:
        q.peek()
        q.pop()
        q.done(0)
us.sort()
r = {"us": us[N // 2], "us_max": us[-1], "rows": len(q),
     "erases": (fl.erases - e0) if fl else None, "prog": (fl.prog - p0) if fl else None,
     "file_ops": getattr(q, "writes", 0) - w0}
a.close()
if where == "lfs":
    vfs.umount("/lfs")
print("RESULT", json.dumps(r))
"""


ALT = """
import os, time, vfs
""" + RUN.split("where = ")[0].split("from microcot.agent import Agent")[1] + """
try:
    vfs.umount("/lfs")
except OSError:
    pass
fl = Flash(64)
vfs.VfsLfs2.mkfs(fl)
vfs.mount(vfs.VfsLfs2(fl), "/lfs")
os.mkdir("/lfs/q")
rec = b"x" * 95 + b"\\n"
N = %(n)d
t = time.ticks_us()
for i in range(N):
    f = open("/lfs/q/%%d" %% i, "wb")
    f.write(rec)
    f.close()
us = time.ticks_diff(time.ticks_us(), t) // N
e, p = fl.erases, fl.prog
for i in range(N):
    os.remove("/lfs/q/%%d" %% i)
vfs.umount("/lfs")
print("RESULT", '{"us": %%d, "erases": %%d, "prog": %%d, "rm_erases": %%d, "rm_prog": %%d}'
      %% (us, e, p, fl.erases - e, fl.prog - p))
"""


def alt(t: Any, board: str, n: int, reps: int) -> dict[str, float]:
    rs = []
    for _ in range(reps):
        out = transport.run(t, ALT % {"n": n}, timeout=300).decode(errors="replace")
        rs.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][0][7:]))
    med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    print(f"{board:14} lfs file per row          create {med['us']:7.0f} us, erases/row "
          f"{med['erases'] / n:.3f}, programmed B/row {med['prog'] / n:.0f}; remove: erases/row "
          f"{med['rm_erases'] / n:.3f}, programmed B/row {med['rm_prog'] / n:.0f}", flush=True)
    return med


def run(t: Any, where: str, durable: bool, online: bool, n: int) -> dict[str, Any]:
    out = transport.run(t, RUN % {"where": where, "durable": durable, "online": online, "n": n},
                        timeout=300).decode(errors="replace")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(out[-2000:])
    return json.loads(line[0][7:])


def bench_board(board: str, n: int, reps: int, alternative: bool) -> dict[str, Any]:
    import tempfile

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vb = make_board(board, name="bench-durable", heap="2m", flash_dir=Path(tmp)).start()
        try:
            t = transport.open_board(vb.port)
            try:
                deploy.deploy_transport(t, boards.load(board))
                if alternative:
                    results["lfs file per row"] = alt(t, board, n, reps)
                for where in ("lfs", "dir"):
                    for online in (False, True):
                        runs: dict[str, list[dict[str, Any]]] = {"ram": [], "durable": []}
                        for _ in range(reps):  # interleaved
                            for mode in ("ram", "durable"):
                                runs[mode].append(run(t, where, mode == "durable", online, n))
                        for mode, rs in runs.items():
                            key = f"{where} {'online' if online else 'offline'} {mode}"
                            med = {k: statistics.median(r[k] for r in rs)
                                   for k in ("us", "us_max", "file_ops")}
                            if where == "lfs":
                                med["erases_per_row"] = statistics.median(
                                    r["erases"] for r in rs) / n
                                med["prog_bytes_per_row"] = statistics.median(
                                    r["prog"] for r in rs) / n
                            med["file_ops_per_row"] = med.pop("file_ops") / n
                            med["runs_us"] = [r["us"] for r in rs]
                            results[key] = med
                            print(f"{board:14} {key:24} measure() {med['us']:7.0f} us "
                                  f"(max {med['us_max']:.0f})"
                                  + (f", erases/row {med['erases_per_row']:.3f}, programmed "
                                     f"B/row {med['prog_bytes_per_row']:.0f}"
                                     if where == "lfs" else "")
                                  + f", queue file ops/row {med['file_ops_per_row']:.2f}",
                                  flush=True)
            finally:
                transport.close(t)
        finally:
            vb.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boards", default="virtual,esp32-generic")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--alt", action="store_true", help="also one file per row (not taken)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {b: bench_board(b, a.n, a.reps, a.alt) for b in a.boards.split(",")}
    if a.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
