"""bench/emulator.py with the emulator's storage on PostgreSQL: a throwaway server (Debian's
`postgresql`, microcot_host.pgserver) for the run, a fresh database in it, its URL passed as
--database; every other argument goes to bench/emulator.py as it is.

    python bench/emulator_pg.py --devices 100,1000 --workers 2 --kinds emulator,relay-c

The server runs with fsync on and synchronous_commit off: a commit is not waited for on disk,
which is the durability of the emulator's SQLite (WAL, synchronous=NORMAL: a crash of the machine
may lose the last transactions), so the two stores are compared at the same guarantee.
--sync-commit waits for each commit on disk instead (PostgreSQL's default).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulator  # noqa: E402  (bench/emulator.py)

from microcot_host.pgserver import PgServer  # noqa: E402


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of the server so far: the postmaster, its live processes, and those ended
    (reaped children's time is in the postmaster's cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str]:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    total = 0.0
    top = stat(postmaster)
    total += sum(int(x) for x in top[11:15]) / tick  # utime stime cutime cstime
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != postmaster:
            try:
                st = stat(int(name))
            except OSError:
                continue
            if int(st[1]) == postmaster:  # ppid
                total += (int(st[11]) + int(st[12])) / tick
    return total


def main(argv: list[str]) -> int:
    sync = "--sync-commit" in argv
    argv = [a for a in argv if a != "--sync-commit"]
    if any(a == "--database" or a.startswith("--database=") for a in argv):
        raise SystemExit("--database is this script's: it starts the server")
    settings = {"fsync": "on", "full_page_writes": "on",
                "synchronous_commit": "on" if sync else "off",
                "max_connections": "200"}
    with PgServer(settings=settings) as pg:
        url = pg.create_database("bench")
        print(f"PostgreSQL: throwaway server on port {pg.port}, synchronous_commit "
              f"{settings['synchronous_commit']}", file=sys.stderr, flush=True)
        assert pg._proc is not None
        cpu0, t0 = server_cpu_seconds(pg._proc.pid), time.monotonic()
        rc = emulator.main([*argv, "--database", url])
        cpu = server_cpu_seconds(pg._proc.pid) - cpu0
        print(f"PostgreSQL server CPU over the whole run: {cpu:.1f} s in {time.monotonic() - t0:.0f}"
              f" s of wall time ({100 * cpu / (time.monotonic() - t0):.0f}% of one core on "
              "average, setup and relay phases included)")
        return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
