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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulator  # noqa: E402  (bench/emulator.py)

from microcot_host.pgserver import PgServer  # noqa: E402


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
        return emulator.main([*argv, "--database", url])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
