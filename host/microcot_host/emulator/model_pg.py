"""The emulator's platform data in PostgreSQL: `microcot emulator --database postgresql://...`
(`Emulator(database_url=...)`), for many worker processes and for several hosts.

PgModel is model.Model with another connection layer and the few SQL forms that differ (the
dialect attributes at the top of Model); every method's logic is Model's. What differs:

Connections: a pool instead of one connection behind a lock. The Model's `_lock` becomes a
checkout (`_Checkout`): a thread that takes it gets a connection of its own from the pool for as
long as it holds it (re-entrant, as the RLock it replaces), so threads and processes run their
transactions side by side and PostgreSQL's row locks keep them apart. Connections are in
autocommit mode; Model's own BEGIN/COMMIT/SAVEPOINT statements make its transactions, as on
SQLite. A connection found broken (the server restarted) is replaced at its next checkout.

Transactions: READ COMMITTED, PostgreSQL's default, stated in BEGIN so that a server with another
default does not change it. Why not SERIALIZABLE: the connector's atomic() block spans the
engine's work for a whole device message; a serialization failure at its COMMIT would have to
re-run that work, which the Model cannot do for its caller. READ COMMITTED with explicit locks
gives what the SQLite flock gave for every read-modify-write the Model does:
- ids: a SEQUENCE (`ids`, from 10001 as on SQLite): unique across processes and hosts without a
  row that every writer would queue on. A process draws ID_BLOCK at a time and hands them out
  in rising order (not the sequence's CACHE, which would give each pooled connection a block of
  its own), so a device's rows, stored by one process one after the other, get rising ids;
  between processes ids rise per block (SQLite's follow the commits);
- alarms: a partial unique index on (source, type) of alarms not CLEARED; `create_alarm` locks
  the open alarm (FOR UPDATE) or inserts with ON CONFLICT DO NOTHING, and when another process
  inserted first, it waits for that commit and counts into the alarm it made (count 2);
- updates of managed objects, events, alarms, operations and device requests read the row FOR
  UPDATE, so two merges of fragments do not lose one another;
- new device requests and external IDs insert first (ON CONFLICT DO NOTHING) and look after;
- child devices: a transaction-scoped advisory lock around the cycle check;
- applied_messages, last_messages, settings, credentials: upserts (ON CONFLICT), as on SQLite.

Schema: the same numbered migrations as SQLite (model._MIGRATIONS), in PostgreSQL's types
(INTEGER -> BIGINT, BLOB -> BYTEA; fragments stay TEXT holding the JSON as the Model wrote it, cast
to `json` where a query looks inside), plus the sequence and the alarms' index with version 1.
The version is kept in `schema_version`; migrations run in one transaction under an advisory lock,
so processes starting together do not race. Use a database of the emulator's own (the
provisioning ledger's tables include `events` too).

The URL: its password is never logged or printed (`where` is the URL without it). A URL to
another machine without `sslmode` gets TLS with the server's certificate verified
(provision_ledger_pg.secure_conninfo, the ledger's rule). A password is best kept in ~/.pgpass.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .model import _MIGRATIONS, Invalid, Model

if TYPE_CHECKING:
    import psycopg

_INSTALL_HINT = "install the PostgreSQL driver: pip install 'microcot[postgres]' (psycopg 3)"
# pg_advisory_xact_lock keys of our own: the schema being made, the child-device graph
_SCHEMA_LOCK = 0x6D6963726F656D31  # "microem1"
_CHILDREN_LOCK = 0x6D6963726F656D32
_IDLE_KEPT = 32  # idle connections kept for the next checkout; more are closed
# ids drawn from the sequence at once by a process (one round trip per block, not per row)
ID_BLOCK = 32

# PostgreSQL's additions to a migration of model._MIGRATIONS (index: version - 1)
_PG_EXTRA: dict[int, tuple[str, ...]] = {
    0: (f"CREATE SEQUENCE ids START {10001}",
        "CREATE UNIQUE INDEX alarms_open ON alarms (source, type) WHERE status <> 'CLEARED'"),
}


class StoreError(RuntimeError):
    """The database cannot be reached or used; the message names it without its password."""


def _psycopg() -> ModuleType:
    try:
        import psycopg
    except ImportError:
        raise StoreError(f"a PostgreSQL database needs psycopg: {_INSTALL_HINT}") from None
    return psycopg


def display(url: str) -> str:
    """The URL without its password."""
    from ..provision_ledger_pg import display as ledger_display

    return ledger_display(url)


def _conninfo(url: str) -> str:
    from ..provision_ledger import LedgerError
    from ..provision_ledger_pg import secure_conninfo

    try:
        return secure_conninfo(url)
    except LedgerError as exc:
        raise StoreError(str(exc)) from None


def migration(version: int) -> list[str]:
    """The statements of schema version `version` (from 1) in PostgreSQL."""
    stmts = [s.strip() for s in _MIGRATIONS[version - 1].split(";") if s.strip()]
    out = [_pg_types(s) for s in stmts]
    return out + list(_PG_EXTRA.get(version - 1, ()))


def _pg_types(stmt: str) -> str:
    import re

    stmt = re.sub(r"\bINTEGER\b", "BIGINT", stmt)
    return re.sub(r"\bBLOB\b", "BYTEA", stmt)


@functools.lru_cache(maxsize=512)
def _sql(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (the Model's SQL has no ? in literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Row:
    """A row readable by position and by column name, as sqlite3.Row."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = values
        self._names = names

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)


def _rows(cursor: Any) -> Callable[[Sequence[Any]], _Row]:
    """psycopg row factory: _Row objects sharing one name map per result."""
    names = {d.name: i for i, d in enumerate(cursor.description or ())}
    return lambda values: _Row(values, names)


class _NoResult:
    """What a deferred statement returns: nobody reads it."""
    rowcount = -1


class _Conn:
    """A pooled connection as the Model uses one: execute (with `?`), in_transaction.

    Round trips: every statement is one, and on a busy machine each costs a wake-up of the
    server's process and of ours (0.2-1 ms measured here under load). The Model's transaction
    control whose answer nobody reads (BEGIN, SAVEPOINT, RELEASE: 6 of the 10 statements of a
    device message with its applied record) is therefore not sent on its own but in front of the
    next statement, in one query (client-side binding, psycopg's ClientCursor, which allows
    several statements in one); its result is the last statement's."""

    _DEFERRED = ("BEGIN", "SAVEPOINT", "RELEASE")

    def __init__(self, conn: psycopg.Connection[Any], errors: ModuleType) -> None:
        self.conn = conn
        self._data_error = errors.DataError
        self._pending: list[str] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if not args and sql.startswith(self._DEFERRED):
            self._pending.append(sql)
            return _NoResult()
        several = bool(self._pending)
        if several:
            sql = "; ".join([*self._pending, sql])
            self._pending.clear()
        try:
            cur = self.conn.execute(_sql(sql), args if args else None)
        except self._data_error as exc:
            # a value PostgreSQL cannot hold that SQLite could (a NUL in a text): the request's
            # fault, answered as such (422) instead of a server error; the first line only (the
            # rest quotes the statement)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise Invalid(f"the database cannot store this value: {first}") from None
        if several:
            while cur.nextset():  # to the last statement's result
                pass
        return cur

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return (self.conn.info.transaction_status != TransactionStatus.IDLE
                or any(s.startswith("BEGIN") for s in self._pending))

    def discard_pending(self) -> None:
        self._pending.clear()

    @property
    def usable(self) -> bool:
        return not (self.conn.closed or self.conn.broken)

    def close(self) -> None:
        self.conn.close()


class _Pool:
    """Connections to one database, made on demand and kept for the next thread."""

    def __init__(self, conninfo: str, where: str) -> None:
        self._psycopg = _psycopg()
        self._conninfo = conninfo
        self.where = where
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def connect(self) -> _Conn:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, row_factory=_rows,
                                   cursor_factory=psycopg.ClientCursor, connect_timeout=15,
                                   application_name="microcot emulator")
        except psycopg.Error as exc:
            # libpq's messages name host and user, never the password
            raise StoreError(f"{self.where}: {str(exc).strip()}") from None
        return _Conn(conn, psycopg)

    def take(self) -> _Conn:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.where}: the model is closed")
            while self._idle:
                conn = self._idle.pop()
                if conn.usable:
                    return conn
                conn.close()
        return self.connect()

    def give(self, conn: _Conn) -> None:
        if conn.usable and conn.in_transaction:  # a transaction left open by an error path
            try:
                conn.execute("ROLLBACK")
            except Exception:
                conn.close()
        conn.discard_pending()
        with self._lock:
            if self._closed or not conn.usable or len(self._idle) >= _IDLE_KEPT:
                conn.close()
            else:
                self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Checkout:
    """The Model's lock on PostgreSQL: whoever holds it has a connection of its own (`conn`),
    taken from the pool at the first acquire and given back at the last release (re-entrant)."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._local = threading.local()

    def acquire(self) -> bool:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._local.conn = self._pool.take()
        self._local.depth = depth + 1
        return True

    def release(self) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            conn, self._local.conn = self._local.conn, None
            self._pool.give(conn)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def conn(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            raise RuntimeError("the model's database is used without its lock")
        return conn


class PgModel(Model):
    """The platform's data in a PostgreSQL database (`url`: postgresql://...)."""

    _BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
    _FOR_UPDATE = " FOR UPDATE"
    _LIKE = "ILIKE"
    _GREATEST = "GREATEST"
    _HAS_KEY = "EXISTS (SELECT 1 FROM json_each(fragments::json) f WHERE f.key = ?)"
    # json_each fails on a value that is not an object, and a WHERE clause's order is not an
    # evaluation order: non-objects are looked into as empty objects
    _SERIES = ("json_each(fragments::json) f, json_each(CASE WHEN json_typeof(f.value) = "
               "'object' THEN f.value ELSE '{}'::json END) s")
    _HAS_SERIES_OF = f"EXISTS (SELECT 1 FROM {_SERIES} WHERE f.key = ? AND s.key = ?)"
    _HAS_SERIES = f"EXISTS (SELECT 1 FROM {_SERIES} WHERE s.key = ?)"

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        # Model.__init__ opens SQLite: set up what its methods use instead
        self.where = display(url)
        self.path = self.where
        self.clock = clock
        self._writers = None  # no flock: PostgreSQL keeps processes apart
        self._wlock = threading.Lock()
        self._local = threading.local()
        self._pool = _Pool(_conninfo(url), self.where)
        self._checkout = _Checkout(self._pool)
        self._ids: list[int] = []
        self._ids_lock = threading.Lock()
        self._lock = self._checkout  # type: ignore[assignment]
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @contextlib.contextmanager
    def atomic(self, outer: Any = None) -> Iterator[None]:
        """Model.atomic without `outer`: that lock (the SmartREST engine's) is held across the
        transaction on SQLite only so that it and the model's one lock are always taken in the
        same order. Here the model's lock is a connection of the thread's own, which waits for
        no other thread, so there is no order to keep, and holding the engine's lock across
        the transaction's round trips would serialise every lane of the process on it (it
        stays what it is for: the engine's own records, taken by the engine where it needs it)."""
        with super().atomic():
            yield

    @property  # type: ignore[override]
    def _db(self) -> _Conn:  # the connection of the thread that holds the lock
        return self._checkout.conn

    @property
    def folder(self) -> None:
        return None  # a server's: nothing beside it on this machine

    def close(self) -> None:
        self._pool.close()

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > len(_MIGRATIONS):
                raise StoreError(f"{self.where}: schema version {version} is newer than this "
                                 f"emulator ({len(_MIGRATIONS)}); update microcot")
            for v in range(version + 1, len(_MIGRATIONS) + 1):
                for stmt in migration(v):
                    db.execute(stmt)
            db.execute("UPDATE schema_version SET version = ?", (len(_MIGRATIONS),))

    def _next_id(self, db: Any) -> int:
        # a block at a time: one round trip per ID_BLOCK rows. Ids stay unique (the sequence)
        # and rise within this process, so a device's rows, which one process stores one after
        # the other, are in order; between processes they rise per block, not per row
        with self._ids_lock:
            if not self._ids:
                self._ids = [int(r[0]) for r in db.execute(
                    f"SELECT nextval('ids') FROM generate_series(1, {ID_BLOCK})").fetchall()]
                self._ids.sort(reverse=True)
            return self._ids.pop()

    def _lock_children(self, db: Any) -> None:
        db.execute(f"SELECT pg_advisory_xact_lock({_CHILDREN_LOCK})")
