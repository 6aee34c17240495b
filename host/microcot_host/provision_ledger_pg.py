"""The provisioning ledger and vault in PostgreSQL, shared by several provisioning stations
(`microcot provision --ledger postgresql://...`; provision_ledger.py has the semantics).

Tables (made when missing, under an advisory lock so that stations starting together do not race
on CREATE): `meta`, `devices` and `events` as in the SQLite ledger, plus

  - a unique index on `devices.external_id`: a CSV row's ID can be one device's only, which the
    check in the transaction alone cannot promise under READ COMMITTED (two stations both check,
    both insert); with the index the second insert waits for the first and then fails;
  - `secrets`: the vault, the same Fernet tokens as the SQLite vault file (a password is never
    stored or sent in the clear: it is encrypted on the station with the key file, which stays
    on the stations and never goes into the database). Grant an auditor SELECT on `devices`
    and `events` only: they hold no password, only keyed hashes;
  - `claims`: one row per device ID ever claimed, the target of the row lock that holds the ID
    for one board (`SELECT ... FOR UPDATE SKIP LOCKED` in a transaction of its own connection,
    open while the board is provisioned). A station that finds the row locked fails that board
    at once (LedgerBusy). The lock ends with the transaction or with the connection, so a
    crashed or unplugged station never leaves a device claimed; its `pending` record is resumed
    by the next run, as with the SQLite ledger.

Connections: one per Books, shared by a station's worker threads under a lock (a statement
takes milliseconds; a board takes seconds), and one per board being provisioned for its claim,
kept for the next board when it is released (a new connection is a new server process).

TLS: a URL without `sslmode` to a host that is not this machine gets `sslmode=verify-full`
(libpq's own default, `prefer`, neither requires TLS nor checks the server), with the system's
CA certificates unless `sslrootcert` (or PGSSLROOTCERT, or ~/.postgresql/root.crt) names
others. A Unix socket and 127.0.0.1/::1/localhost keep libpq's default.

Passwords of the database itself: best from ~/.pgpass or PGPASSFILE (libpq reads them), not in
the URL; a URL's password is never printed (`display()`).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .provision_ledger import STATUSES, Claim, LedgerBusy, LedgerError

if TYPE_CHECKING:
    import psycopg

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS devices (
        device_id    TEXT PRIMARY KEY,
        external_id  TEXT NOT NULL,
        name         TEXT NOT NULL,
        shell        TEXT NOT NULL CHECK (shell IN ('0', '1')),
        id_source    TEXT,
        board_serial TEXT,
        port         TEXT,
        status       TEXT NOT NULL CHECK (status IN {STATUSES!r}),
        cred_hash    TEXT,
        cred_origin  TEXT,
        generation   INTEGER NOT NULL DEFAULT 1,
        error        TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS devices_external_id ON devices (external_id)",
    """CREATE TABLE IF NOT EXISTS events (
        seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time         TEXT NOT NULL,
        device_id    TEXT,
        port         TEXT,
        board_serial TEXT,
        status       TEXT NOT NULL,
        detail       TEXT)""",
    "CREATE INDEX IF NOT EXISTS events_device ON events (device_id)",
    """CREATE TABLE IF NOT EXISTS secrets (
        device_id  TEXT PRIMARY KEY,
        token      TEXT NOT NULL,
        previous   TEXT,
        updated_at TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS claims (device_id TEXT PRIMARY KEY)",
)
# pg_advisory_xact_lock's key for "the schema is being made": any constant of our own
_SCHEMA_LOCK = 0x6D6963726F636F74  # "microcot"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}
_INSTALL_HINT = "install the PostgreSQL driver: pip install 'microcot[postgres]' (psycopg 3)"


def _psycopg() -> ModuleType:
    """The driver, imported when a PostgreSQL ledger is used (an optional extra)."""
    try:
        import psycopg
    except ImportError:
        raise LedgerError(f"a PostgreSQL ledger needs psycopg: {_INSTALL_HINT}") from None
    return psycopg


def display(url: str) -> str:
    """The URL without its password (in the user part or as a `password` parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostport}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query,
                                                                     keep_blank_values=True)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="/*"),
                       parts.fragment))


def _is_local(host: str) -> bool:
    # a Unix socket's folder (absolute path, or an abstract socket: @name) or loopback
    return host in _LOCAL_HOSTS or host.startswith(("/", "@"))


def secure_conninfo(url: str) -> str:
    """`url` with verify-full TLS added where it goes to another machine and says nothing of
    TLS itself (see the module docstring)."""
    psycopg = _psycopg()
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise LedgerError(f"{display(url)}: not a PostgreSQL URL: {exc}") from None
    if "sslmode" in params or os.environ.get("PGSSLMODE"):
        return make_conninfo(**params)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    addrs = str(params.get("hostaddr") or os.environ.get("PGHOSTADDR") or "").split(",")
    if all(_is_local(h.strip()) for h in hosts) and all(_is_local(a.strip()) for a in addrs):
        return make_conninfo(**params)
    params["sslmode"] = "verify-full"
    if ("sslrootcert" not in params and not os.environ.get("PGSSLROOTCERT")
            and not (Path.home() / ".postgresql" / "root.crt").exists()):
        params["sslrootcert"] = "system"  # libpq 16+: the system's CA store
    return make_conninfo(**params)


_PLACEHOLDER = re.compile(r"\?")


def _sql(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (the ledger's SQL has no other ? or %)."""
    if "%" in sql:
        raise ValueError("a ledger statement with % would need escaping for psycopg")
    return _PLACEHOLDER.sub("%s", sql)


class _Tx:
    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: tuple = ()) -> psycopg.Cursor:
        return self._conn.execute(_sql(sql), args)


class PgClaim:
    """The row lock on `claims(device_id)`, held in an open transaction of its own connection;
    release() ends the transaction and gives the connection back to the PgDb's idle ones."""

    def __init__(self, db: PgDb, conn: psycopg.Connection, device_id: str) -> None:
        self._db = db
        self._conn: psycopg.Connection | None = conn
        self.device_id = device_id

    def check(self) -> None:
        try:
            if self._conn is None:
                raise LedgerError("released")
            self._conn.execute("SELECT 1")
        except Exception as exc:
            raise LedgerError(f"the claim of device ID {self.device_id} was lost ({exc}); "
                              "nothing more is written for it in this run") from None

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.rollback()  # the lock ends here
        except Exception:  # a broken connection has released it already
            with contextlib.suppress(Exception):
                conn.close()
            return
        self._db.give_back(conn)


class PgDb:
    """The ledger's and the vault's database (provision_ledger.Database) in PostgreSQL."""

    for_update = " FOR UPDATE"

    def __init__(self, url: str, create: bool = True) -> None:
        psycopg = _psycopg()
        self.where = display(url)
        self._conninfo = secure_conninfo(url)
        self.integrity_errors: tuple[type[Exception], ...] = (psycopg.errors.UniqueViolation,)
        self._lock = threading.RLock()
        self._idle: list[psycopg.Connection] = []  # claim connections between two boards
        self._closed = False
        self._conn = self._connect()
        try:
            if create:
                self._make_schema()
            elif not self._has_schema():
                raise LedgerError(f"{self.where} holds no provisioning ledger: nothing was "
                                  "provisioned with it (see --ledger)")
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg.Connection:
        psycopg = _psycopg()
        try:
            return psycopg.connect(self._conninfo, connect_timeout=15,
                                   application_name="microcot provision")
        except psycopg.Error as exc:
            # libpq's messages name host and user, never the password
            raise LedgerError(f"{self.where}: {str(exc).strip()}") from None

    def _make_schema(self) -> None:
        with self.tx() as c:
            c.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            for stmt in _SCHEMA:
                c.execute(stmt)

    def _has_schema(self) -> bool:
        rows = self.query("SELECT to_regclass('meta') IS NOT NULL AND "
                          "to_regclass('devices') IS NOT NULL")
        return bool(rows[0][0])

    @contextlib.contextmanager
    def tx(self) -> Iterator[_Tx]:
        with self._lock:
            if self._conn.broken or self._conn.closed:
                self._conn = self._connect()  # the server restarted: the next statement works
            with self._conn.transaction():
                yield _Tx(self._conn)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.tx() as c:
            return c.execute(sql, args).fetchall()

    def _claim_connection(self) -> psycopg.Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not (conn.broken or conn.closed):
                    return conn
        conn = self._connect()
        try:
            # a board takes seconds; a server's idle-in-transaction limit must not end the claim
            conn.execute("SET idle_in_transaction_session_timeout = 0")
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def give_back(self, conn: psycopg.Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    def claim(self, device_id: str) -> Claim:
        psycopg = _psycopg()
        conn = self._claim_connection()
        try:
            conn.execute("INSERT INTO claims VALUES (%s) ON CONFLICT DO NOTHING", (device_id,))
            conn.commit()
            held = conn.execute("SELECT device_id FROM claims WHERE device_id=%s "
                                "FOR UPDATE SKIP LOCKED", (device_id,)).fetchone()
        except psycopg.Error as exc:  # a connection kept from before a server restart, say
            conn.close()
            raise LedgerError(f"{self.where}: claiming device ID {device_id}: "
                              f"{str(exc).strip()}") from None
        except BaseException:
            conn.close()
            raise
        if held is None:
            conn.rollback()
            self.give_back(conn)
            raise LedgerBusy(f"device ID {device_id} is being provisioned by another station "
                             "right now: two boards report this ID, or one board is on two "
                             "stations")
        return PgClaim(self, conn, device_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in [self._conn, *self._idle]:
                conn.close()
            self._idle.clear()
