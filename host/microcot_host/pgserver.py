"""A throwaway PostgreSQL server: Debian's `postgresql` binaries run on a free port in a folder of
their own, as the emulator runs Mosquitto (emulator/broker.py). For the tests of the PostgreSQL
provisioning ledger, and for whatever else wants a real server for a while.

    with PgServer() as pg:
        url = pg.create_database("ledger")   # postgresql://microcot:...@127.0.0.1:PORT/ledger
        ...

What it sets up, in a folder made for it (`base_dir`, else a new one in the system's temporary
folder, removed again by stop()):

  data/        the cluster, made by `initdb` (UTF-8, locale C, superuser `microcot`)
  server.log   what the server says (start-up errors are quoted from it)
  .s.PGSQL.N   the Unix socket; the folder is 0700, so only its owner (and root) get that far

Access: `trust` over the Unix socket (the folder is the protection), a password over TCP
(SCRAM-SHA-256) on 127.0.0.1 only; nothing listens on another address. The superuser's password
is random per PgServer object and never written anywhere but the server's own catalogue (initdb
reads it from a 0600 file that is removed at once; a `base_dir` kept from an earlier object gets
the new one over the socket at start).

Root: PostgreSQL refuses to run as root ("root execution of the PostgreSQL server is not
permitted"), and so does initdb. Run as root (containers, this project's CI), the server runs as
the `postgres` system user that Debian's package creates, in a folder owned by that user. That
folder's parents must let that user through, which a pytest `tmp_path` under a 0700
`/tmp/pytest-of-root` does not: the default folder (system temporary folder) does, and a
`base_dir` that does not is refused up front, saying which parent is in the way.

The server is sent SIGINT (fast shutdown: sessions are ended, not waited for) when the thread
that started it ends (Linux PR_SET_PDEATHSIG), so no server outlives a killed test run; start it
from a thread that lives as long as it should, normally the main thread. For speed the throwaway
server does not fsync: it is for tests, not for a ledger anyone keeps.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import quote

from .childproc import die_with_parent, free_port, log_since, stop

if TYPE_CHECKING:
    from psycopg.sql import Composable

SUPERUSER = "microcot"
RUN_AS_WHEN_ROOT = "postgres"  # the system user of Debian's postgresql-common
_INSTALL_HINT = "run `make setup`, or `apt-get install postgresql` (Debian/Ubuntu)"
# Debian: /usr/lib/postgresql/<major>/bin; others: initdb on PATH (Homebrew, Fedora's /usr/bin)
_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# sun_path is 108 bytes on Linux; ".s.PGSQL.<port>" and the NUL take up to 21 of them
_MAX_SOCKET_DIR = 86


class PgServerError(RuntimeError):
    """The server could not be found, set up or started."""


def find_bindir() -> Path:
    """The folder with `initdb` and `postgres`: MICROCOT_POSTGRES_BIN, else the newest of
    Debian's /usr/lib/postgresql/<major>/bin, else where `initdb` is on PATH."""
    env = os.environ.get("MICROCOT_POSTGRES_BIN")
    if env:
        candidates = [Path(env)]
    else:
        def major(p: str) -> int:
            m = re.search(r"/(\d+)/bin$", p)
            return int(m.group(1)) if m else 0

        candidates = [Path(p) for p in sorted(glob.glob(_BIN_GLOB), key=major, reverse=True)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in ("initdb", "postgres")):
            return d
    where = f"MICROCOT_POSTGRES_BIN={env}" if env else f"{_BIN_GLOB} or PATH"
    raise PgServerError(f"PostgreSQL's initdb and postgres were not found in {where}: "
                        f"{_INSTALL_HINT}")


class _RunAs:
    """Who the server's processes run as: ourselves, or (as root) the `postgres` user."""

    def __init__(self) -> None:
        self.root = os.geteuid() == 0
        if not self.root:
            self.uid, self.gid, self.name = os.geteuid(), os.getegid(), None
            return
        try:
            pw = pwd.getpwnam(RUN_AS_WHEN_ROOT)
        except KeyError:
            raise PgServerError(f"running as root, and there is no `{RUN_AS_WHEN_ROOT}` user to "
                                f"run PostgreSQL as (it refuses root): {_INSTALL_HINT}, which "
                                "creates it, or run as another user") from None
        self.uid, self.gid, self.name = pw.pw_uid, pw.pw_gid, pw.pw_name

    def can_reach(self, path: Path) -> None:
        """PgServerError naming the first folder on the way to `path` (its parents) that this
        user may not search (as root we can enter anything; the `postgres` user cannot)."""
        if not self.root:
            return
        groups = {g.gr_gid for g in grp.getgrall() if self.name in g.gr_mem} | {self.gid}
        for p in reversed(path.parents):
            st = p.stat()
            if st.st_uid == self.uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid in groups:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                raise PgServerError(
                    f"{path}: the `{self.name}` user that runs PostgreSQL (it refuses root) "
                    f"cannot enter {p} (mode {stat.S_IMODE(st.st_mode):04o}); leave out the "
                    "folder to get one in the system's temporary folder")

    def own(self, path: Path) -> None:
        if self.root:
            os.chown(path, self.uid, self.gid)

    def child_setup(self, parent_pid: int) -> Callable[[], None]:
        """Runs in the child before exec: become the server's user, private files, and end with
        the thread that started us (after the user change: changing credentials clears the
        parent-death signal)."""
        root, uid, gid = self.root, self.uid, self.gid

        def setup() -> None:
            os.umask(0o077)
            if root:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            die_with_parent(parent_pid, signal.SIGINT)  # SIGINT: a fast shutdown
        return setup


class PgServer:
    """One PostgreSQL server process, owned by this object; a context manager.

    base_dir: the server's folder (made 0700; kept by stop()); None: a new folder in the system's
    temporary folder, removed by stop(). port 0: a free one, chosen at start.
    """

    def __init__(self, base_dir: Path | str | None = None, port: int = 0,
                 start_timeout: float = 30.0, settings: dict[str, str] | None = None) -> None:
        self._given_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.base_dir: Path | None = self._given_dir
        self.host = "127.0.0.1"
        self._requested_port = port
        self._port = port
        self.start_timeout = start_timeout
        self.settings = dict(settings or {})
        self.password = secrets.token_urlsafe(24)
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: _RunAs | None = None
        self.start_seconds: float | None = None

    def __repr__(self) -> str:  # the password stays out of reprs (test reports, logs)
        return f"PgServer(base_dir={self.base_dir}, port={self._port or None})"

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise PgServerError("the server has no port yet: start() it first")
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base()

    @property
    def log_file(self) -> Path:
        return self._base() / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, dbname: str = "postgres") -> str:
        """A URL over TCP with the superuser's password, as another host would use it."""
        return (f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:"
                f"{self.port}/{quote(dbname, safe='')}")

    def socket_url(self, dbname: str = "postgres") -> str:
        """A URL over the Unix socket (no password: the socket's folder is the protection)."""
        return (f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}")

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """initdb on the first start, then the server; returns once it accepts connections."""
        if self.running:
            return
        t0 = time.monotonic()
        bindir = find_bindir()
        self._run_as = run_as = _RunAs()
        try:
            self._make_base(run_as)
            existed = (self.data_dir / "PG_VERSION").exists()
            if not existed:
                self._initdb(bindir, run_as)
            attempts = 1 if self._requested_port else 5
            for attempt in range(attempts):
                if not self._requested_port:
                    self._port = free_port(self.host)
                try:
                    self._spawn(bindir, run_as)
                    break
                except _PortTaken:
                    if attempt == attempts - 1:
                        raise PgServerError(f"port {self._port} on {self.host} is in use; see "
                                            f"{self.log_file}") from None
            if existed:  # a cluster of an earlier PgServer: it gets this object's password
                self._admin_sql(lambda sql: sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(self.password)))
        except BaseException:
            self._kill()
            if self._given_dir is None and self.base_dir is not None:
                self._remove(self.base_dir)
                self.base_dir = None
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it; a folder made for it goes too."""
        self._kill()
        if self._given_dir is None and self.base_dir is not None:
            self._remove(self.base_dir)
            self.base_dir = None

    # -- databases ----------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a fresh, empty one per test); its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        self._admin_sql(lambda sql: sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        self._admin_sql(lambda sql: sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))

    def _admin_sql(self, build: Callable[[ModuleType], Composable]) -> None:
        """Run `build(psycopg.sql)` as the superuser over the Unix socket (psycopg is imported
        here: only what talks to the server needs the driver)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.socket_url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(build(sql))

    # -- internals ----------------------------------------------------------------------------

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PgServerError("the server has no folder yet: start() it first")
        return self.base_dir

    def _make_base(self, run_as: _RunAs) -> Path:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="microcot-pg-"))  # 0700
        else:
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = self.base_dir
        if len(str(base)) > _MAX_SOCKET_DIR:
            raise PgServerError(f"{base}: too long a path for the server's Unix socket "
                                f"(at most {_MAX_SOCKET_DIR} characters)")
        run_as.can_reach(base)
        run_as.own(base)
        os.chmod(base, 0o700)
        return base

    def _initdb(self, bindir: Path, run_as: _RunAs) -> None:
        base = self._base()
        pwfile = base / ".pwfile"
        # the password reaches initdb through a file, never a command line (ps shows those)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.password.encode() + b"\n")
            os.close(fd)
            run_as.own(pwfile)
            proc = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                 f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                cwd=base, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                preexec_fn=run_as.child_setup(os.getpid()), timeout=self.start_timeout)
        except OSError as exc:
            raise PgServerError(f"could not run initdb: {exc}; {_INSTALL_HINT}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                pwfile.unlink()
        if proc.returncode != 0:
            raise PgServerError(f"initdb failed ({proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()[-800:]}")

    def _spawn(self, bindir: Path, run_as: _RunAs) -> None:
        base = self._base()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        out = os.fdopen(os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                        "ab")
        run_as.own(self.log_file)
        settings = {"listen_addresses": self.host, "port": str(self._port),
                    "unix_socket_directories": str(base), "fsync": "off",
                    "synchronous_commit": "off", "full_page_writes": "off",
                    **self.settings}
        args = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for k, v in settings.items():
            args += ["-c", f"{k}={v}"]
        try:
            self._proc = subprocess.Popen(args, cwd=base, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, start_new_session=True,
                                          preexec_fn=run_as.child_setup(os.getpid()))
        except OSError as exc:
            raise PgServerError(f"could not run postgres: {exc}; {_INSTALL_HINT}") from None
        finally:
            out.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = self._log_since(offset)
                self._proc = None
                if "Address already in use" in tail or "could not bind" in tail:
                    raise _PortTaken()
                raise PgServerError(f"postgres exited at start: {tail.strip()[-800:] or 'no log'}"
                                    f" (log: {self.log_file})")
            if self._accepts(offset):
                return
            if time.monotonic() > deadline:
                self._kill()
                raise PgServerError(f"postgres did not accept connections on {self.host}:"
                                    f"{self._port} within {self.start_timeout:.0f} s "
                                    f"(log: {self.log_file})")
            time.sleep(0.02)

    def _accepts(self, log_offset: int) -> bool:
        # ready when this start's log says so: a TCP connect alone succeeds during recovery too
        if "database system is ready to accept connections" not in self._log_since(log_offset):
            return False
        try:
            with socket.create_connection((self.host, self._port), timeout=1.0):
                return True
        except OSError:
            return False

    def _log_since(self, offset: int) -> str:
        return log_since(self.log_file, offset)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # we may not signal the `postgres` user's process as another user, but root may; as
        # ourselves it is our own child. SIGINT: a fast shutdown, open sessions are ended
        stop(proc, signal.SIGINT, 15)

    @staticmethod
    def _remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class _PortTaken(Exception):
    pass
