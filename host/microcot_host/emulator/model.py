"""The emulator's platform data: Cumulocity's entities in one SQLite file.

The REST layer (api.py) and through it the SmartREST engine and the MQTT connector all go through
this class, from different threads. One connection serves them all behind a lock: SQLite
serialises writers anyway, every call here is short, and a single connection keeps transactions
simple (no "database is locked" between our own threads). WAL mode with `synchronous=NORMAL`: a
crash of the emulator loses nothing committed; only a power cut may lose the last transactions,
which is the right trade for a test platform that must take thousands of rows per second.
`busy_timeout` covers a second process (a CLI) opening the same file. With worker processes
(workers.py) every process has its own Model with `shared=True`: writers of all processes queue
on a flock, and SQLite keeps their transactions apart as before.

The same class's logic runs on PostgreSQL (model_pg.PgModel, `open_model("postgresql://...")`):
its SQL is written for both, and the few forms that differ are class attributes and hooks here
(`_BEGIN`, `_FOR_UPDATE`, `_HAS_KEY`, `_next_id`, ...) that PgModel overrides. Keep new SQL to
what both accept (ON CONFLICT upserts, no INSERT OR IGNORE, no SQLite-only functions), and read
a row that is then written with `+ self._FOR_UPDATE`.

Shapes follow Cumulocity's REST API: ids are strings of digits drawn from one counter for every
kind of entity (as on the platform, an id never names two things), times are ISO 8601 with
milliseconds. Times given without a zone are taken as UTC. Every method returns plain dicts
without `self` links (the API adds them) and raises a ModelError subclass for bad input, each
naming the field at fault.

Entities: managed objects (fragments as JSON, `childDevices`/`deviceParents` references),
external IDs, measurements, events, alarms (de-duplicated by source and type while not CLEARED),
operations (status transitions checked), new device requests, device credentials (a salted
PBKDF2 hash, never the password), the time of each device's last message (availability.py), the
MQTT connector's applied messages (connector.py) and a key-value table for settings.

`atomic()` makes everything one thread writes in a block one transaction (the calls inside it
nest as savepoints), begun at the block's first write: the connector commits a device message's
rows together with its record that the message took effect, so a crash leaves both or neither.

Time comes from `clock` (Unix seconds, `time.time` by default): every creationTime, lastUpdated
and the availability computation use it, so tests can move time instead of sleeping.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..files import private_dir

JSON = dict[str, Any]

ALARM_STATUSES = ("ACTIVE", "ACKNOWLEDGED", "CLEARED")
ALARM_SEVERITIES = ("CRITICAL", "MAJOR", "MINOR", "WARNING")
OPERATION_STATUSES = ("PENDING", "EXECUTING", "SUCCESSFUL", "FAILED")
REQUEST_STATUSES = ("WAITING_FOR_CONNECTION", "PENDING_ACCEPTANCE", "ACCEPTED")

# Cumulocity lets a device report the result without passing through EXECUTING (the seed's
# example sends SUCCESSFUL straight away); a final status is final. Setting the current status
# again is accepted, since a QoS 1 status update may arrive twice.
OPERATION_TRANSITIONS = {
    "PENDING": {"PENDING", "EXECUTING", "SUCCESSFUL", "FAILED"},
    "EXECUTING": {"EXECUTING", "SUCCESSFUL", "FAILED"},
    "SUCCESSFUL": {"SUCCESSFUL"},
    "FAILED": {"FAILED"},
}
# ACCEPTED only from PENDING_ACCEPTANCE, as in Cumulocity's device registration: the device must
# have shown up (published its secret) before it can be accepted.
REQUEST_TRANSITIONS = {
    "WAITING_FOR_CONNECTION": {"WAITING_FOR_CONNECTION", "PENDING_ACCEPTANCE"},
    "PENDING_ACCEPTANCE": {"PENDING_ACCEPTANCE", "ACCEPTED"},
    "ACCEPTED": {"ACCEPTED"},
}

# Fields of a managed object that are not fragments: set by the platform or kept in columns.
MO_READ_ONLY = ("id", "self", "creationTime", "lastUpdated", "childDevices", "childAssets",
                "childAdditions", "deviceParents", "assetParents", "additionParents")

# The credentials record proves which password was issued and checks a device's password on the
# REST API (http.py). Against guessing over the network the rounds do not matter (each guess is a
# request); against guessing from a copy of the data folder, Mosquitto's file beside this one
# (0600 both) holds the same passwords as PBKDF2-HMAC-SHA512 with 101 rounds (the plugin's own
# format, broker.py), so rounds here beyond that would protect nothing: 1,000 rounds stay ~10x
# above it at 0.25 ms per password (10,000 took 2.5 ms, most of a device's setup after the
# broker's). Passwords the platform issues are random (bootstrap: 20 letters and digits, ~119
# bits); a bulk registration's may be chosen by people, hence a salted KDF at all. Each record
# keeps its round count, so records made with 10,000 rounds still verify.
PBKDF2_ITERATIONS = 1_000

_FIRST_ID = 10001
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_SCHEMA_V1 = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE managed_objects (
    id INTEGER PRIMARY KEY, name TEXT, type TEXT, owner TEXT,
    creation_time TEXT NOT NULL, creation_ms INTEGER NOT NULL, last_updated TEXT NOT NULL,
    fragments TEXT NOT NULL);
CREATE INDEX mo_type ON managed_objects(type);
CREATE INDEX mo_owner ON managed_objects(owner);
CREATE TABLE child_devices (
    parent INTEGER NOT NULL, child INTEGER NOT NULL, added_ms INTEGER NOT NULL,
    PRIMARY KEY (parent, child));
CREATE INDEX child_devices_child ON child_devices(child);
CREATE TABLE external_ids (
    type TEXT NOT NULL, value TEXT NOT NULL, mo INTEGER NOT NULL, PRIMARY KEY (type, value));
CREATE INDEX external_ids_mo ON external_ids(mo);
CREATE TABLE measurements (
    id INTEGER PRIMARY KEY, source INTEGER NOT NULL, type TEXT NOT NULL, time TEXT NOT NULL,
    time_ms INTEGER NOT NULL, fragments TEXT NOT NULL);
CREATE INDEX measurements_source_time ON measurements(source, time_ms);
CREATE INDEX measurements_time ON measurements(time_ms);
CREATE TABLE events (
    id INTEGER PRIMARY KEY, source INTEGER NOT NULL, type TEXT NOT NULL, text TEXT NOT NULL,
    time TEXT NOT NULL, time_ms INTEGER NOT NULL, creation_time TEXT NOT NULL,
    fragments TEXT NOT NULL);
CREATE INDEX events_source_time ON events(source, time_ms);
CREATE TABLE alarms (
    id INTEGER PRIMARY KEY, source INTEGER NOT NULL, type TEXT NOT NULL, text TEXT NOT NULL,
    time TEXT NOT NULL, time_ms INTEGER NOT NULL, status TEXT NOT NULL, severity TEXT NOT NULL,
    count INTEGER NOT NULL, first_occurrence_time TEXT NOT NULL, creation_time TEXT NOT NULL,
    fragments TEXT NOT NULL);
CREATE INDEX alarms_source_type ON alarms(source, type, status);
CREATE TABLE operations (
    id INTEGER PRIMARY KEY, device INTEGER NOT NULL, status TEXT NOT NULL,
    failure_reason TEXT, creation_time TEXT NOT NULL, creation_ms INTEGER NOT NULL,
    fragments TEXT NOT NULL);
CREATE INDEX operations_device_status ON operations(device, status);
CREATE TABLE device_requests (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, creation_time TEXT NOT NULL,
    creation_ms INTEGER NOT NULL, fragments TEXT NOT NULL);
CREATE TABLE device_credentials (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, source TEXT NOT NULL, salt BLOB NOT NULL,
    iterations INTEGER NOT NULL, hash BLOB NOT NULL);
"""
_SCHEMA_V2 = """
CREATE TABLE last_messages (mo INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL);
"""
# the MQTT connector's record of messages whose effect is committed but whose acknowledgement
# the broker may not have received (connector.py: "Exactly once")
_SCHEMA_V3 = """
CREATE TABLE applied_messages (mid INTEGER PRIMARY KEY, digest BLOB NOT NULL);
"""
# ... per MQTT session (client id): with several connector processes (workers.py) each session
# has its own packet ids; records from before are the single connector's
_SCHEMA_V4 = """
CREATE TABLE applied_messages_v4 (
    client TEXT NOT NULL, mid INTEGER NOT NULL, digest BLOB NOT NULL, PRIMARY KEY (client, mid));
INSERT INTO applied_messages_v4 SELECT 'microcot-connector', mid, digest FROM applied_messages;
DROP TABLE applied_messages;
ALTER TABLE applied_messages_v4 RENAME TO applied_messages;
"""
_MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)
# the client id of the single MQTT connector (connector.CLIENT_ID): the owner of the applied
# messages recorded before they had one
SINGLE_CONNECTOR = "microcot-connector"


class ModelError(Exception):
    """Bad input or state; `field` names the field at fault when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ModelError):
    """No such entity (HTTP 404)."""


class Conflict(ModelError):
    """The entity exists already (HTTP 409)."""


class BadField(ModelError):
    """A field has the wrong JSON type (HTTP 400)."""


class Invalid(ModelError):
    """Valid JSON, but not acceptable data: a mandatory field is missing, a value is out of its
    set, a referenced object does not exist, a status transition is not allowed (HTTP 422)."""


# -- time -------------------------------------------------------------------------------------

def now(clock: Callable[[], float] = time.time) -> tuple[str, int]:
    """(ISO text in UTC with milliseconds, epoch milliseconds) of `clock()`, Unix seconds."""
    t = dt.datetime.fromtimestamp(clock(), dt.UTC)
    return _fmt(t), _ms(t)


def iso_ms(ms: int) -> str:
    """ISO text in UTC with milliseconds of epoch milliseconds."""
    return _fmt(_EPOCH + dt.timedelta(milliseconds=ms))


def parse_time(value: Any, field: str = "time") -> tuple[str, int]:
    """(normalised ISO text, epoch milliseconds) of an ISO 8601 time; Invalid names `field`."""
    if not isinstance(value, str):
        raise BadField(f"{field} must be a string with an ISO 8601 date and time, got "
                       f"{_json_type(value)}", field)
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise Invalid(f"{field}: {value!r} is not an ISO 8601 date and time such as "
                      "2017-09-14T12:37:00.000+02:00", field) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return _fmt(t), _ms(t)


def _fmt(t: dt.datetime) -> str:
    off = t.utcoffset() or dt.timedelta(0)
    if off == dt.timedelta(0):
        zone = "Z"
    else:
        sign = "-" if off < dt.timedelta(0) else "+"
        minutes = abs(int(off.total_seconds())) // 60
        zone = "%s%02d:%02d" % (sign, minutes // 60, minutes % 60)
    # the year by hand: strftime("%Y") does not pad years before 1000 on glibc ("1-01-01")
    return "%04d-" % t.year + t.strftime("%m-%dT%H:%M:%S.") + "%03d" % (t.microsecond // 1000) \
        + zone


def _ms(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(milliseconds=1)


# -- helpers ----------------------------------------------------------------------------------

def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _need_object(data: Any, what: str) -> JSON:
    if not isinstance(data, dict):
        raise BadField(f"the body must be a JSON object ({what}), got {_json_type(data)}")
    return data


def _opt_str(data: JSON, key: str) -> str | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadField(f"{key} must be a string, got {_json_type(v)}", key)
    return v


def _req_str(data: JSON, key: str, missing: list[str]) -> str:
    v = _opt_str(data, key)
    if v is None or v == "":
        missing.append(key)
        return ""
    return v


def _mandatory(missing: list[str]) -> None:
    if missing:
        raise Invalid("Following mandatory fields should be included: " + ",".join(missing),
                      missing[0])


def parse_id(value: Any, field: str = "id") -> int:
    """A platform id (digits, as string or number) as int; NotFound-free: Invalid if malformed."""
    if isinstance(value, bool):
        raise BadField(f"{field} must be an id (digits), got a boolean", field)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, str | int):
        raise Invalid(f"{field}: {value!r} is not a platform id (digits)", field)
    raise BadField(f"{field} must be an id (a string of digits), got {_json_type(value)}", field)


def _source_id(data: JSON, missing: list[str]) -> int | None:
    src = data.get("source")
    if src is None:
        missing.append("source")
        return None
    if not isinstance(src, dict):
        raise BadField(f"source must be an object {{\"id\": ...}}, got {_json_type(src)}",
                       "source")
    if src.get("id") in (None, ""):
        missing.append("source.id")
        return None
    return parse_id(src["id"], "source.id")


def _fragments(data: JSON, skip: tuple[str, ...]) -> JSON:
    return {k: v for k, v in data.items() if k not in skip}


def _merge(fragments: JSON, update: JSON, skip: tuple[str, ...]) -> JSON:
    out = dict(fragments)
    for k, v in update.items():
        if k in skip:
            continue
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Page:
    """Offset and size of one page, for the query methods."""

    def __init__(self, offset: int = 0, limit: int = 5) -> None:
        self.offset = offset
        self.limit = limit


# -- the model --------------------------------------------------------------------------------

DATABASE_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(where: str | os.PathLike[str]) -> bool:
    """A PostgreSQL URL rather than a SQLite file."""
    return str(where).startswith(DATABASE_SCHEMES)


def open_model(where: str | os.PathLike[str] = ":memory:", clock: Callable[[], float] = time.time,
               shared: bool = False) -> Model:
    """The Model at `where`: a PostgreSQL URL (model_pg.PgModel; several processes and hosts
    share it as they are, so `shared` means nothing there) or a SQLite file (Model)."""
    if is_database_url(where):
        from .model_pg import PgModel  # psycopg only when asked for

        return PgModel(str(where), clock=clock)
    return Model(where, clock=clock, shared=shared)


class Model:
    """The platform's data in SQLite (`path` a file, or ":memory:" for tests).

    The SQL below is written for both SQLite and PostgreSQL (model_pg.PgModel, which shares
    all of this class's logic): where the two differ, the class attributes and hook methods
    here hold SQLite's form and PgModel overrides them. `open_model` chooses by location."""

    # -- dialect: SQLite's forms (model_pg.PgModel has PostgreSQL's) ----------------------------
    _BEGIN = "BEGIN IMMEDIATE"
    # appended to a read whose row is then written (PostgreSQL's row lock; SQLite's writers
    # are serialised anyway)
    _FOR_UPDATE = ""
    # SQLite's LIKE ignores the case of ASCII letters; PostgreSQL's LIKE does not, its ILIKE
    # ignores the case of every letter
    _LIKE = "LIKE"
    _GREATEST = "max"
    # a condition with one parameter: the row's fragments have this top-level key
    _HAS_KEY = "EXISTS (SELECT 1 FROM json_each(fragments) WHERE key = ?)"
    # ... a fragment (named by the first parameter) has an object value with this key
    _HAS_SERIES_OF = ("EXISTS (SELECT 1 FROM json_each(fragments) f, json_each(f.value) s "
                      "WHERE f.key = ? AND f.type = 'object' AND s.key = ?)")
    _HAS_SERIES = ("EXISTS (SELECT 1 FROM json_each(fragments) f, json_each(f.value) s "
                   "WHERE f.type = 'object' AND s.key = ?)")

    def __init__(self, path: str | os.PathLike[str] = ":memory:",
                 clock: Callable[[], float] = time.time, shared: bool = False) -> None:
        """`shared`: other processes write to the file too (the emulator's worker processes):
        every write transaction then also holds an exclusive flock on `<path>.writers`, so a
        writer that finds another one busy waits in the kernel and runs as soon as it is done,
        instead of in SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms between tries.
        The flock (with a lock for this process's writers, since a flock does not exclude
        threads that share the file) is taken before the connection's lock: while a writer
        waits for another process, this process's other threads can still read."""
        if is_database_url(path):  # a file named after the URL would hold its password
            raise ValueError("Model is SQLite: open a database URL with open_model()")
        self.path = str(path)
        self.where = self.path  # for messages (PgModel: the URL without its password)
        self.clock = clock
        self._writers: Any = None
        if self.path != ":memory:":
            private_dir(Path(self.path).parent)
            if shared:
                fd = os.open(self.path + ".writers", os.O_RDWR | os.O_CREAT, 0o600)
                self._writers = os.fdopen(fd, "r+b")
        self._lock = threading.RLock()
        self._wlock = threading.Lock()   # this process's writers, with the flock (shared)
        self._local = threading.local()  # this thread's atomic() block
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=5.0)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA busy_timeout = 5000")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()

    @property
    def folder(self) -> Path | None:
        """The folder of the database file (binaries live beside it); None in memory."""
        return None if self.path == ":memory:" else Path(self.path).parent

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._writers is not None:
                self._writers.close()

    def _take_writer(self) -> None:
        """The writers' locks when shared (__init__), before self._lock; else nothing."""
        if self._writers is None:
            return
        self._wlock.acquire()
        try:
            fcntl.flock(self._writers, fcntl.LOCK_EX)
        except BaseException:
            self._wlock.release()
            raise

    def _drop_writer(self) -> None:
        if self._writers is not None:
            fcntl.flock(self._writers, fcntl.LOCK_UN)
            self._wlock.release()

    def _end(self, commit: bool) -> None:
        """COMMIT (ROLLBACK when that fails), or ROLLBACK when not `commit`; with self._lock."""
        if commit:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        else:
            self._db.execute("ROLLBACK")

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> tuple[str, int]:
        """(ISO text in UTC with milliseconds, epoch milliseconds) of the model's clock."""
        return now(self.clock)

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this "
                               f"emulator ({len(_MIGRATIONS)}); update microcot")
        for v in range(version, len(_MIGRATIONS)):
            with self._tx() as db:
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {v + 1}")
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO settings VALUES ('next_id', ?)", (str(_FIRST_ID),))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        self._begin_atomic()
        with self._lock:
            if self._db.in_transaction:
                # inside atomic() (this thread holds the lock, so the transaction is its own): a
                # savepoint, so a failing call undoes its own changes and the caller's others stay
                self._db.execute("SAVEPOINT nested")
                try:
                    yield _Cursor(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK TO nested")
                    self._db.execute("RELEASE nested")
                    raise
                self._db.execute("RELEASE nested")
                return
        # a transaction of its own: the writers' locks first (__init__), then the connection
        self._take_writer()
        try:
            with self._lock:
                self._db.execute(self._BEGIN)
                try:
                    yield _Cursor(self._db)
                except BaseException:
                    self._end(commit=False)
                    raise
                self._end(commit=True)
        finally:
            self._drop_writer()

    @contextlib.contextmanager
    def atomic(self, outer: _Lock | None = None) -> Iterator[None]:
        """Everything this thread writes to the model inside the block is one transaction:
        committed together at its end, or not at all (an exception rolls it back; a crash
        leaves nothing of it). A model call that fails inside the block undoes only its own
        changes (a savepoint). Blocks do not nest.

        The transaction begins with the block's first write, not before: what the block does
        until then (parsing, reading, waiting) holds up nobody. From its first write to its
        end the block holds the model's lock, so other threads wait for the model meanwhile:
        keep that part short. `outer` is a lock that callers inside the block take before
        calling the model (the SmartREST engine's): it is taken before the model's lock when
        the transaction begins and held to its end, so the two are always taken in the same
        order. The MQTT connector runs each device message in one, with its `applied` record.
        """
        if getattr(self._local, "atomic", None) is not None:
            raise RuntimeError("Model.atomic() blocks do not nest")
        state = _Atomic(outer)
        self._local.atomic = state
        try:
            yield
        except BaseException:
            self._local.atomic = None
            self._end_atomic(state, commit=False)
            raise
        self._local.atomic = None
        self._end_atomic(state, commit=True)

    def _begin_atomic(self) -> None:
        state: _Atomic | None = getattr(self._local, "atomic", None)
        if state is None or state.begun:
            return
        if state.outer is not None:
            state.outer.acquire()
        try:
            self._take_writer()
        except BaseException:
            if state.outer is not None:
                state.outer.release()
            raise
        self._lock.acquire()
        try:
            self._db.execute(self._BEGIN)
        except BaseException:
            self._lock.release()
            self._drop_writer()
            if state.outer is not None:
                state.outer.release()
            raise
        state.begun = True

    def _end_atomic(self, state: _Atomic, commit: bool) -> None:
        if not state.begun:
            return
        try:
            self._end(commit)
        finally:
            self._lock.release()
            self._drop_writer()
            if state.outer is not None:
                state.outer.release()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _next_id(self, db: Any) -> int:
        n = int(db.execute("SELECT value FROM settings WHERE key = 'next_id'").fetchone()[0])
        db.execute("UPDATE settings SET value = ? WHERE key = 'next_id'", (str(n + 1),))
        return n

    def _lock_children(self, db: Any) -> None:
        """Held to the transaction's end before child devices are added: the cycle check reads
        the whole graph (SQLite: the write transaction holds everything already)."""

    # -- settings ---------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value", (key, value))

    # -- managed objects ----------------------------------------------------------------------

    def create_managed_object(self, data: Any, owner: str | None = None) -> JSON:
        data = _need_object(data, "a managed object")
        name = _opt_str(data, "name")
        mtype = _opt_str(data, "type")
        owner = _opt_str(data, "owner") or owner
        frags = _fragments(data, MO_READ_ONLY + ("name", "type", "owner"))
        frags = {k: v for k, v in frags.items() if v is not None}
        text, ms = self.now()
        with self._tx() as db:
            mo_id = self._next_id(db)
            db.execute("INSERT INTO managed_objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (mo_id, name, mtype, owner, text, ms, text, _dump(frags)))
        return self.get_managed_object(mo_id)

    def get_managed_object(self, mo_id: Any) -> JSON:
        i = parse_id(mo_id)
        with self._lock:
            row = self._db.execute("SELECT * FROM managed_objects WHERE id = ?", (i,)).fetchone()
            if row is None:
                raise NotFound(f"Finding device data from database failed : No managedObject "
                               f"for id '{i}'!", "id")
            return self._mo_dict(row)

    def managed_object_exists(self, mo_id: Any) -> bool:
        try:
            i = parse_id(mo_id)
        except ModelError:
            return False
        return bool(self._read("SELECT 1 FROM managed_objects WHERE id = ?", (i,)))

    def _mo_dict(self, row: sqlite3.Row) -> JSON:
        i = row["id"]
        d: JSON = {"id": str(i)}
        if row["name"] is not None:
            d["name"] = row["name"]
        if row["type"] is not None:
            d["type"] = row["type"]
        if row["owner"] is not None:
            d["owner"] = row["owner"]
        d["creationTime"] = row["creation_time"]
        d["lastUpdated"] = row["last_updated"]
        d.update(json.loads(row["fragments"]))
        # children and parents in one statement (one round trip on a database server)
        refs = self._db.execute(
            "SELECT m.id, m.name, 0 AS k, c.added_ms AS t FROM child_devices c "
            "JOIN managed_objects m ON m.id = c.child WHERE c.parent = ? UNION ALL "
            "SELECT m.id, m.name, 1 AS k, c.added_ms AS t FROM child_devices c "
            "JOIN managed_objects m ON m.id = c.parent WHERE c.child = ? ORDER BY k, t, id",
            (i, i)).fetchall()
        d["childDevices"] = {"references": [_ref(r) for r in refs if r[2] == 0]}
        d["deviceParents"] = {"references": [_ref(r) for r in refs if r[2] == 1]}
        return d

    def update_managed_object(self, mo_id: Any, data: Any) -> JSON:
        """Merge top-level fragments; a fragment set to null is removed (Cumulocity's PUT)."""
        i = parse_id(mo_id)
        data = _need_object(data, "a managed object")
        for key in ("name", "type", "owner"):
            _opt_str(data, key)
        text, _ = self.now()
        with self._tx() as db:
            row = db.execute("SELECT * FROM managed_objects WHERE id = ?" + self._FOR_UPDATE,
                             (i,)).fetchone()
            if row is None:
                raise NotFound(f"Finding device data from database failed : No managedObject "
                               f"for id '{i}'!", "id")
            frags = _merge(json.loads(row["fragments"]), data,
                           MO_READ_ONLY + ("name", "type", "owner"))
            cols = {k: (data[k] if k in data else row[k]) for k in ("name", "type", "owner")}
            db.execute("UPDATE managed_objects SET name = ?, type = ?, owner = ?, "
                       "last_updated = ?, fragments = ? WHERE id = ?",
                       (cols["name"], cols["type"], cols["owner"], text, _dump(frags), i))
        return self.get_managed_object(i)

    def delete_managed_object(self, mo_id: Any) -> None:
        """Delete the object, its external IDs and its child and parent references (its
        measurements, events, alarms and operations stay, as in Cumulocity without cascade)."""
        i = parse_id(mo_id)
        with self._tx() as db:
            if db.execute("DELETE FROM managed_objects WHERE id = ?", (i,)).rowcount == 0:
                raise NotFound(f"Finding device data from database failed : No managedObject "
                               f"for id '{i}'!", "id")
            db.execute("DELETE FROM external_ids WHERE mo = ?", (i,))
            db.execute("DELETE FROM child_devices WHERE parent = ? OR child = ?", (i, i))
            db.execute("DELETE FROM last_messages WHERE mo = ?", (i,))

    def query_managed_objects(self, page: Page, type: str | None = None,
                              fragment_type: str | None = None, text: str | None = None,
                              ids: list[int] | None = None, owner: str | None = None
                              ) -> tuple[list[JSON], int]:
        where, args = [], []  # type: ignore[var-annotated]
        if type is not None:
            where.append("type = ?")
            args.append(type)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if fragment_type is not None:
            where.append(self._HAS_KEY)
            args.append(fragment_type)
        if text is not None:
            where.append(f"(name {self._LIKE} ? ESCAPE '\\' OR type {self._LIKE} ? ESCAPE "
                         "'\\')")
            args += [_like(text), _like(text)]
        if ids is not None:
            where.append("id IN (%s)" % ",".join("?" * len(ids)) if ids else "1 = 0")
            args += ids
        return self._page("managed_objects", where, args, "id", page, self._mo_dict)

    def _page(self, table: str, where: list[str], args: list[Any], order: str, page: Page,
              conv: Any) -> tuple[list[JSON], int]:
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM {table}{cond}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM {table}{cond} ORDER BY {order} "
                                    "LIMIT ? OFFSET ?", [*args, page.limit, page.offset]
                                    ).fetchall()
            return [conv(r) for r in rows], total

    # -- child devices ------------------------------------------------------------------------

    def add_child_device(self, parent: Any, child: Any) -> None:
        p, c = parse_id(parent), parse_id(child, "managedObject.id")
        if p == c:
            raise Invalid("a managed object cannot be its own child device", "managedObject.id")
        with self._tx() as db:
            self._lock_children(db)
            for i, field in ((p, "id"), (c, "managedObject.id")):
                if not db.execute("SELECT 1 FROM managed_objects WHERE id = ?", (i,)).fetchone():
                    err = NotFound if field == "id" else Invalid
                    raise err(f"Finding device data from database failed : No managedObject "
                              f"for id '{i}'!", field)
            if self._is_ancestor(db, c, p):
                raise Invalid(f"managed object {c} is a parent of {p}: child devices cannot "
                              "form a cycle", "managedObject.id")
            db.execute("INSERT INTO child_devices VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                       (p, c, self.now()[1]))

    def _is_ancestor(self, db: Any, candidate: int, of: int) -> bool:
        seen, todo = set(), [of]
        while todo:
            x = todo.pop()
            if x == candidate:
                return True
            if x in seen:
                continue
            seen.add(x)
            todo += [r[0] for r in db.execute("SELECT parent FROM child_devices WHERE child = ?",
                                              (x,))]
        return False

    def remove_child_device(self, parent: Any, child: Any) -> None:
        p, c = parse_id(parent), parse_id(child, "childId")
        with self._tx() as db:
            if db.execute("DELETE FROM child_devices WHERE parent = ? AND child = ?",
                          (p, c)).rowcount == 0:
                raise NotFound(f"Managed object {c} is not a child device of {p}", "childId")

    def child_devices(self, parent: Any) -> list[JSON]:
        return list(self.get_managed_object(parent)["childDevices"]["references"])

    def device_parents(self, mo_id: Any) -> list[str]:
        i = parse_id(mo_id)
        return [str(r[0]) for r in self._read(
            "SELECT parent FROM child_devices WHERE child = ? ORDER BY added_ms", (i,))]

    # -- external IDs -------------------------------------------------------------------------

    def add_external_id(self, mo_id: Any, data: Any) -> JSON:
        i = parse_id(mo_id)
        data = _need_object(data, "an external ID")
        missing: list[str] = []
        xtype = _req_str(data, "type", missing)
        value = _req_str(data, "externalId", missing)
        _mandatory(missing)
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM managed_objects WHERE id = ?", (i,)).fetchone():
                raise NotFound(f"Finding device data from database failed : No managedObject "
                               f"for id '{i}'!", "id")
            # insert first, then look: another process's insert of the same ID cannot slip in
            # between a look and an insert (PostgreSQL waits for its commit)
            if not db.execute("INSERT INTO external_ids VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                              (xtype, value, i)).rowcount:
                row = db.execute("SELECT mo FROM external_ids WHERE type = ? AND value = ?",
                                 (xtype, value)).fetchone()
                if row is not None and row[0] != i:
                    raise Conflict(f"External id [type={xtype}, value={value}] is already "
                                   f"assigned to managed object {row[0]}", "externalId")
        return {"externalId": value, "type": xtype, "managedObject": {"id": str(i)}}

    def get_external_id(self, xtype: str, value: str) -> JSON:
        rows = self._read("SELECT mo FROM external_ids WHERE type = ? AND value = ?",
                          (xtype, value))
        if not rows:
            raise NotFound(f"External id not found; external id = ID [type={xtype}, "
                           f"value={value}]", "externalId")
        return {"externalId": value, "type": xtype, "managedObject": {"id": str(rows[0][0])}}

    def delete_external_id(self, xtype: str, value: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM external_ids WHERE type = ? AND value = ?",
                          (xtype, value)).rowcount == 0:
                raise NotFound(f"External id not found; external id = ID [type={xtype}, "
                               f"value={value}]", "externalId")

    def external_ids_of(self, mo_id: Any) -> list[JSON]:
        i = parse_id(mo_id)
        if not self.managed_object_exists(i):
            raise NotFound(f"Finding device data from database failed : No managedObject for "
                           f"id '{i}'!", "id")
        return [{"externalId": r["value"], "type": r["type"], "managedObject": {"id": str(i)}}
                for r in self._read("SELECT type, value FROM external_ids WHERE mo = ? "
                                    "ORDER BY type, value", (i,))]

    def objects_named(self, value: str) -> list[int]:
        """The managed objects that have an external ID of this value, of any type."""
        return [int(r[0]) for r in self._read(
            "SELECT DISTINCT mo FROM external_ids WHERE value = ? ORDER BY mo", (value,))]

    # -- measurements -------------------------------------------------------------------------

    def create_measurement(self, data: Any) -> JSON:
        data = _need_object(data, "a measurement")
        missing: list[str] = []
        src = _source_id(data, missing)
        mtype = _req_str(data, "type", missing)
        if data.get("time") in (None, ""):
            missing.append("time")
        _mandatory(missing)
        time_text, time_ms = parse_time(data["time"])
        frags = _fragments(data, ("id", "self", "source", "type", "time"))
        with self._tx() as db:
            self._need_source(db, src)
            i = self._next_id(db)
            db.execute("INSERT INTO measurements VALUES (?, ?, ?, ?, ?, ?)",
                       (i, src, mtype, time_text, time_ms, _dump(frags)))
        return {"id": str(i), "source": {"id": str(src)}, "type": mtype, "time": time_text,
                **frags}

    def _need_source(self, db: Any, src: int | None) -> None:
        if not db.execute("SELECT 1 FROM managed_objects WHERE id = ?", (src,)).fetchone():
            raise Invalid(f"source.id: there is no managed object {src}", "source.id")

    @staticmethod
    def _measurement_dict(row: sqlite3.Row) -> JSON:
        return {"id": str(row["id"]), "source": {"id": str(row["source"])}, "type": row["type"],
                "time": row["time"], **json.loads(row["fragments"])}

    def get_measurement(self, mid: Any) -> JSON:
        return self._get_one("measurements", mid, "measurement", self._measurement_dict)

    def delete_measurement(self, mid: Any) -> None:
        self._delete_one("measurements", mid, "measurement")

    def _get_one(self, table: str, ident: Any, what: str, conv: Any) -> JSON:
        i = parse_id(ident)
        rows = self._read(f"SELECT * FROM {table} WHERE id = ?", (i,))
        if not rows:
            raise NotFound(f"Finding {what} from database failed : No {what} for id '{i}'!",
                           "id")
        return conv(rows[0])  # type: ignore[no-any-return]

    def _delete_one(self, table: str, ident: Any, what: str) -> None:
        i = parse_id(ident)
        with self._tx() as db:
            if db.execute(f"DELETE FROM {table} WHERE id = ?", (i,)).rowcount == 0:
                raise NotFound(f"Finding {what} from database failed : No {what} for id "
                               f"'{i}'!", "id")

    def query_measurements(self, page: Page, source: int | None = None, type: str | None = None,
                           value_fragment_type: str | None = None,
                           value_fragment_series: str | None = None,
                           date_from: int | None = None, date_to: int | None = None,
                           revert: bool = False) -> tuple[list[JSON], int]:
        where, args = self._time_filters(source, type, date_from, date_to)
        if value_fragment_type is not None:
            where.append(self._HAS_KEY)
            args.append(value_fragment_type)
        if value_fragment_series is not None:
            if value_fragment_type is not None:
                where.append(self._HAS_SERIES_OF)
                args += [value_fragment_type, value_fragment_series]
            else:
                where.append(self._HAS_SERIES)
                args.append(value_fragment_series)
        order = "time_ms DESC, id DESC" if revert else "time_ms, id"
        return self._page("measurements", where, args, order, page, self._measurement_dict)

    @staticmethod
    def _time_filters(source: int | None, type: str | None, date_from: int | None,
                      date_to: int | None, time_col: str = "time_ms",
                      source_col: str = "source") -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if source is not None:
            where.append(f"{source_col} = ?")
            args.append(source)
        if type is not None:
            where.append("type = ?")
            args.append(type)
        if date_from is not None:
            where.append(f"{time_col} >= ?")
            args.append(date_from)
        if date_to is not None:
            where.append(f"{time_col} < ?")
            args.append(date_to)
        return where, args

    # -- events -------------------------------------------------------------------------------

    def create_event(self, data: Any) -> JSON:
        data = _need_object(data, "an event")
        missing: list[str] = []
        src = _source_id(data, missing)
        etype = _req_str(data, "type", missing)
        text = _req_str(data, "text", missing)
        if data.get("time") in (None, ""):
            missing.append("time")
        _mandatory(missing)
        time_text, time_ms = parse_time(data["time"])
        frags = _fragments(data, ("id", "self", "source", "type", "text", "time",
                                  "creationTime"))
        created, _ = self.now()
        with self._tx() as db:
            self._need_source(db, src)
            i = self._next_id(db)
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (i, src, etype, text, time_text, time_ms, created, _dump(frags)))
        return self.get_event(i)

    @staticmethod
    def _event_dict(row: sqlite3.Row) -> JSON:
        return {"id": str(row["id"]), "source": {"id": str(row["source"])}, "type": row["type"],
                "text": row["text"], "time": row["time"], "creationTime": row["creation_time"],
                **json.loads(row["fragments"])}

    def get_event(self, eid: Any) -> JSON:
        return self._get_one("events", eid, "event", self._event_dict)

    def update_event(self, eid: Any, data: Any) -> JSON:
        """Text and fragments may change (Cumulocity's PUT on an event); null removes."""
        i = parse_id(eid)
        data = _need_object(data, "an event")
        text = _opt_str(data, "text")
        with self._tx() as db:
            row = db.execute("SELECT * FROM events WHERE id = ?" + self._FOR_UPDATE,
                             (i,)).fetchone()
            if row is None:
                raise NotFound(f"Finding event from database failed : No event for id '{i}'!",
                               "id")
            frags = _merge(json.loads(row["fragments"]), data,
                           ("id", "self", "source", "type", "text", "time", "creationTime"))
            db.execute("UPDATE events SET text = ?, fragments = ? WHERE id = ?",
                       (text if text is not None else row["text"], _dump(frags), i))
        return self.get_event(i)

    def delete_event(self, eid: Any) -> None:
        self._delete_one("events", eid, "event")

    def query_events(self, page: Page, source: int | None = None, type: str | None = None,
                     fragment_type: str | None = None, date_from: int | None = None,
                     date_to: int | None = None, revert: bool = False
                     ) -> tuple[list[JSON], int]:
        where, args = self._time_filters(source, type, date_from, date_to)
        if fragment_type is not None:
            where.append(self._HAS_KEY)
            args.append(fragment_type)
        # newest first, as Cumulocity lists events; revert gives oldest first
        order = "time_ms, id" if revert else "time_ms DESC, id DESC"
        return self._page("events", where, args, order, page, self._event_dict)

    # -- alarms -------------------------------------------------------------------------------

    def create_alarm(self, data: Any) -> tuple[JSON, bool]:
        """(the alarm, True if new). An alarm of the same source and type that is not CLEARED
        absorbs the new one: its count goes up and it takes the new time and text, as in
        Cumulocity. A new alarm posted as CLEARED clears that open alarm instead."""
        data = _need_object(data, "an alarm")
        missing: list[str] = []
        src = _source_id(data, missing)
        atype = _req_str(data, "type", missing)
        text = _req_str(data, "text", missing)
        severity = _req_str(data, "severity", missing)
        if data.get("time") in (None, ""):
            missing.append("time")
        _mandatory(missing)
        status = _opt_str(data, "status") or "ACTIVE"
        _check_enum(severity, ALARM_SEVERITIES, "severity")
        _check_enum(status, ALARM_STATUSES, "status")
        time_text, time_ms = parse_time(data["time"])
        frags = _fragments(data, ("id", "self", "source", "type", "text", "time", "status",
                                  "severity", "count", "firstOccurrenceTime", "creationTime"))
        created, _ = self.now()
        with self._tx() as db:
            self._need_source(db, src)
            while True:
                # the open alarm, locked (PostgreSQL) until the transaction ends; if another
                # transaction clears it meanwhile, the lock's re-check finds no open alarm
                open_row = db.execute("SELECT * FROM alarms WHERE source = ? AND type = ? AND "
                                      "status != 'CLEARED' ORDER BY id DESC LIMIT 1"
                                      + self._FOR_UPDATE, (src, atype)).fetchone()
                if open_row is not None:
                    i = open_row["id"]
                    merged = _merge(json.loads(open_row["fragments"]), frags, ())
                    if status == "CLEARED":
                        db.execute("UPDATE alarms SET status = 'CLEARED', fragments = ? "
                                   "WHERE id = ?", (_dump(merged), i))
                    else:
                        db.execute("UPDATE alarms SET count = count + 1, time = ?, time_ms = ?, "
                                   "text = ?, fragments = ? WHERE id = ?",
                                   (time_text, time_ms, text, _dump(merged), i))
                    new = False
                    break
                i = self._next_id(db)
                # PostgreSQL: a unique index on (source, type) of open alarms; when another
                # process inserted that alarm first, this insert waits for its commit and does
                # nothing, and the next round finds the alarm to count. SQLite: never a conflict
                # (writers are serialised), so one round.
                if db.execute("INSERT INTO alarms VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING",
                              (i, src, atype, text, time_text, time_ms, status, severity,
                               time_text, created, _dump(frags))).rowcount:
                    new = True
                    break
        return self.get_alarm(i), new

    @staticmethod
    def _alarm_dict(row: sqlite3.Row) -> JSON:
        return {"id": str(row["id"]), "source": {"id": str(row["source"])}, "type": row["type"],
                "text": row["text"], "time": row["time"], "status": row["status"],
                "severity": row["severity"], "count": row["count"],
                "firstOccurrenceTime": row["first_occurrence_time"],
                "creationTime": row["creation_time"], **json.loads(row["fragments"])}

    def get_alarm(self, aid: Any) -> JSON:
        return self._get_one("alarms", aid, "alarm", self._alarm_dict)

    def update_alarm(self, aid: Any, data: Any) -> JSON:
        """Status, severity, text and fragments may change. A CLEARED alarm stays cleared (a new
        alarm of its type would otherwise have two open alarms to merge into)."""
        i = parse_id(aid)
        data = _need_object(data, "an alarm")
        status = _opt_str(data, "status")
        severity = _opt_str(data, "severity")
        text = _opt_str(data, "text")
        if status is not None:
            _check_enum(status, ALARM_STATUSES, "status")
        if severity is not None:
            _check_enum(severity, ALARM_SEVERITIES, "severity")
        with self._tx() as db:
            row = db.execute("SELECT * FROM alarms WHERE id = ?" + self._FOR_UPDATE,
                             (i,)).fetchone()
            if row is None:
                raise NotFound(f"Finding alarm from database failed : No alarm for id '{i}'!",
                               "id")
            if row["status"] == "CLEARED" and status not in (None, "CLEARED"):
                raise Invalid(f"status: alarm {i} is CLEARED and cannot become {status}",
                              "status")
            frags = _merge(json.loads(row["fragments"]), data,
                           ("id", "self", "source", "type", "text", "time", "status", "severity",
                            "count", "firstOccurrenceTime", "creationTime"))
            db.execute("UPDATE alarms SET status = ?, severity = ?, text = ?, fragments = ? "
                       "WHERE id = ?", (status or row["status"], severity or row["severity"],
                                        text if text is not None else row["text"], _dump(frags),
                                        i))
        return self.get_alarm(i)

    def query_alarms(self, page: Page, source: int | None = None, type: str | None = None,
                     status: list[str] | None = None, severity: str | None = None,
                     resolved: bool | None = None, date_from: int | None = None,
                     date_to: int | None = None, revert: bool = False
                     ) -> tuple[list[JSON], int]:
        where, args = self._time_filters(source, type, date_from, date_to)
        if status:
            where.append("status IN (%s)" % ",".join("?" * len(status)))
            args += status
        if severity is not None:
            where.append("severity = ?")
            args.append(severity)
        if resolved is not None:
            where.append("status = 'CLEARED'" if resolved else "status != 'CLEARED'")
        order = "time_ms, id" if revert else "time_ms DESC, id DESC"
        return self._page("alarms", where, args, order, page, self._alarm_dict)

    # -- operations ---------------------------------------------------------------------------

    def create_operation(self, data: Any) -> JSON:
        data = _need_object(data, "an operation")
        if data.get("deviceId") in (None, ""):
            _mandatory(["deviceId"])
        device = parse_id(data["deviceId"], "deviceId")
        frags = _fragments(data, ("id", "self", "deviceId", "deviceName", "status",
                                  "failureReason", "creationTime"))
        frags = {k: v for k, v in frags.items() if v is not None}
        created, ms = self.now()
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM managed_objects WHERE id = ?", (device,)).fetchone():
                raise Invalid(f"deviceId: there is no managed object {device}", "deviceId")
            i = self._next_id(db)
            db.execute("INSERT INTO operations VALUES (?, ?, 'PENDING', NULL, ?, ?, ?)",
                       (i, device, created, ms, _dump(frags)))
        return self.get_operation(i)

    def _operation_dict(self, row: sqlite3.Row) -> JSON:
        d: JSON = {"id": str(row["id"]), "deviceId": str(row["device"])}
        name = self._db.execute("SELECT name FROM managed_objects WHERE id = ?",
                                (row["device"],)).fetchone()
        if name is not None and name[0] is not None:
            d["deviceName"] = name[0]
        d["status"] = row["status"]
        if row["failure_reason"] is not None:
            d["failureReason"] = row["failure_reason"]
        d["creationTime"] = row["creation_time"]
        d.update(json.loads(row["fragments"]))
        return d

    def get_operation(self, oid: Any) -> JSON:
        with self._lock:
            return self._get_one("operations", oid, "operation", self._operation_dict)

    def update_operation(self, oid: Any, data: Any) -> JSON:
        """Status (transitions of OPERATION_TRANSITIONS), failureReason, fragments (merged, null
        removes)."""
        i = parse_id(oid)
        data = _need_object(data, "an operation")
        status = _opt_str(data, "status")
        reason = _opt_str(data, "failureReason")
        if status is not None:
            _check_enum(status, OPERATION_STATUSES, "status")
        with self._tx() as db:
            row = db.execute("SELECT * FROM operations WHERE id = ?" + self._FOR_UPDATE,
                             (i,)).fetchone()
            if row is None:
                raise NotFound(f"Finding operation from database failed : No operation for id "
                               f"'{i}'!", "id")
            if status is not None and status not in OPERATION_TRANSITIONS[row["status"]]:
                raise Invalid(f"status: operation {i} is {row['status']} and cannot become "
                              f"{status}", "status")
            frags = _merge(json.loads(row["fragments"]), data,
                           ("id", "self", "deviceId", "deviceName", "status", "failureReason",
                            "creationTime"))
            db.execute("UPDATE operations SET status = ?, failure_reason = ?, fragments = ? "
                       "WHERE id = ?", (status or row["status"],
                                        reason if "failureReason" in data else
                                        row["failure_reason"], _dump(frags), i))
        return self.get_operation(i)

    def query_operations(self, page: Page, device: int | None = None,
                         status: list[str] | None = None, agent: int | None = None,
                         fragment_type: str | None = None, date_from: int | None = None,
                         date_to: int | None = None, revert: bool = False
                         ) -> tuple[list[JSON], int]:
        where, args = self._time_filters(device, None, date_from, date_to, "creation_ms",
                                         "device")
        if status:
            where.append("status IN (%s)" % ",".join("?" * len(status)))
            args += status
        if agent is not None:
            # the agent handles its own operations and those of its child devices
            where.append("(device = ? OR device IN (SELECT child FROM child_devices "
                         "WHERE parent = ?))")
            args += [agent, agent]
        if fragment_type is not None:
            where.append(self._HAS_KEY)
            args.append(fragment_type)
        order = "creation_ms DESC, id DESC" if revert else "creation_ms, id"
        return self._page("operations", where, args, order, page, self._operation_dict)

    # -- new device requests ------------------------------------------------------------------

    def create_device_request(self, request_id: str, status: str = "WAITING_FOR_CONNECTION",
                              extra: JSON | None = None) -> JSON:
        _check_request_id(request_id)
        _check_enum(status, REQUEST_STATUSES, "status")
        created, ms = self.now()
        with self._tx() as db:
            # one statement, so that two processes cannot both find no request and insert
            if not db.execute("INSERT INTO device_requests VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING",
                              (request_id, status, created, ms, _dump(extra or {}))).rowcount:
                raise Conflict(f"A new device request for {request_id} exists already", "id")
        return self.get_device_request(request_id)

    @staticmethod
    def _request_dict(row: sqlite3.Row) -> JSON:
        return {"id": row["id"], "status": row["status"], "creationTime": row["creation_time"],
                **json.loads(row["fragments"])}

    def get_device_request(self, request_id: str) -> JSON:
        rows = self._read("SELECT * FROM device_requests WHERE id = ?", (request_id,))
        if not rows:
            raise NotFound(f"New device request {request_id} not found", "id")
        return self._request_dict(rows[0])

    def find_device_request(self, request_id: str) -> JSON | None:
        try:
            return self.get_device_request(request_id)
        except NotFound:
            return None

    def set_device_request_status(self, request_id: str, status: str,
                                  force: bool = False, extra: JSON | None = None) -> JSON:
        """Change the status along REQUEST_TRANSITIONS (`force`: any status, for the emulator's
        own bootstrap and bulk registration); `extra` fragments are merged."""
        _check_enum(status, REQUEST_STATUSES, "status")
        with self._tx() as db:
            row = db.execute("SELECT * FROM device_requests WHERE id = ?" + self._FOR_UPDATE,
                             (request_id,)).fetchone()
            if row is None:
                raise NotFound(f"New device request {request_id} not found", "id")
            if not force and status not in REQUEST_TRANSITIONS[row["status"]]:
                raise Invalid(f"status: the request of {request_id} is {row['status']} and "
                              f"cannot become {status}", "status")
            frags = _merge(json.loads(row["fragments"]), extra or {}, ("id", "status"))
            db.execute("UPDATE device_requests SET status = ?, fragments = ? WHERE id = ?",
                       (status, _dump(frags), request_id))
        return self.get_device_request(request_id)

    def delete_device_request(self, request_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM device_requests WHERE id = ?",
                          (request_id,)).rowcount == 0:
                raise NotFound(f"New device request {request_id} not found", "id")

    def query_device_requests(self, page: Page, status: str | None = None
                              ) -> tuple[list[JSON], int]:
        where, args = [], []  # type: ignore[var-annotated]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        return self._page("device_requests", where, args, "creation_ms, id", page,
                          self._request_dict)

    # -- last messages (availability.py) ------------------------------------------------------

    def set_last_message(self, mo_id: Any, time_ms: int) -> None:
        """Record that the device `mo_id` sent a message at `time_ms` (never moves back)."""
        i = parse_id(mo_id)
        with self._tx() as db:
            db.execute("INSERT INTO last_messages VALUES (?, ?) ON CONFLICT(mo) DO UPDATE SET "
                       f"time_ms = {self._GREATEST}(last_messages.time_ms, excluded.time_ms)",
                       (i, time_ms))

    def last_message(self, mo_id: Any) -> int | None:
        """Epoch milliseconds of the device's last recorded message, or None."""
        rows = self._read("SELECT time_ms FROM last_messages WHERE mo = ?", (parse_id(mo_id),))
        return int(rows[0][0]) if rows else None

    # -- applied messages (connector.py) ------------------------------------------------------

    def note_applied(self, mid: int, digest: bytes, client: str = SINGLE_CONNECTOR) -> None:
        """Record that the broker's message `mid` of the session `client` (with this digest of
        topic and payload) took effect; call it inside the atomic() block that holds the
        effect."""
        with self._tx() as db:
            db.execute("INSERT INTO applied_messages VALUES (?, ?, ?) ON CONFLICT(client, mid) "
                       "DO UPDATE SET digest = excluded.digest", (client, mid, digest))

    def applied_messages(self, client: str = SINGLE_CONNECTOR) -> dict[int, bytes]:
        """Every recorded message of the session `client`: mid -> digest."""
        return {int(r[0]): bytes(r[1]) for r in self._read(
            "SELECT mid, digest FROM applied_messages WHERE client = ?", (client,))}

    def forget_applied(self, done: list[tuple[int, bytes | None]],
                       client: str = SINGLE_CONNECTOR) -> None:
        """Drop records of the session `client`: (mid, digest) drops it if it still has that
        digest, (mid, None) in any case."""
        if not done:
            return
        with self._tx() as db:
            for mid, digest in done:
                if digest is None:
                    db.execute("DELETE FROM applied_messages WHERE client = ? AND mid = ?",
                               (client, mid))
                else:
                    db.execute("DELETE FROM applied_messages WHERE client = ? AND mid = ? "
                               "AND digest = ?", (client, mid, digest))

    def forget_session(self, client: str) -> None:
        """Drop every record of the session `client` (it was deleted at the broker)."""
        with self._tx() as db:
            db.execute("DELETE FROM applied_messages WHERE client = ?", (client,))

    # -- device credentials -------------------------------------------------------------------

    def record_credentials(self, device_id: str, password: str, source: str) -> tuple[JSON, bool]:
        """Record that `device_id` got `password` (only a salted hash is kept);
        (record, True if new)."""
        new = self.record_credentials_many([(device_id, password)], source)[0]
        return self.get_credentials(device_id), new

    def record_credentials_many(self, pairs: list[tuple[str, str]], source: str) -> list[bool]:
        """record_credentials for many (ID, password) pairs in one transaction; per pair, True if
        the ID had no credentials before (a later pair of the same ID is not new)."""
        rows = []
        for device_id, password in pairs:
            _check_request_id(device_id)
            if not isinstance(password, str) or not password:
                raise Invalid("a device password must be a non-empty string", "password")
            salt = os.urandom(16)
            rows.append((device_id, salt, hashlib.pbkdf2_hmac(
                "sha256", password.encode(), salt, PBKDF2_ITERATIONS)))
        created, _ = self.now()
        out = []
        with self._tx() as db:
            for device_id, salt, digest in rows:
                out.append(db.execute("SELECT 1 FROM device_credentials WHERE id = ?",
                                      (device_id,)).fetchone() is None)
                db.execute("INSERT INTO device_credentials VALUES (?, ?, ?, ?, ?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET created = excluded.created, "
                           "source = excluded.source, salt = excluded.salt, "
                           "iterations = excluded.iterations, hash = excluded.hash",
                           (device_id, created, source, salt, PBKDF2_ITERATIONS, digest))
        return out

    def get_credentials(self, device_id: str) -> JSON:
        rows = self._read("SELECT id, created, source FROM device_credentials WHERE id = ?",
                          (device_id,))
        if not rows:
            raise NotFound(f"No device credentials for {device_id}", "id")
        r = rows[0]
        return {"id": r["id"], "username": r["id"], "created": r["created"],
                "source": r["source"]}

    def has_credentials(self, device_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM device_credentials WHERE id = ?", (device_id,)))

    def check_credentials(self, device_id: str, password: str) -> bool:
        rows = self._read("SELECT salt, iterations, hash FROM device_credentials WHERE id = ?",
                          (device_id,))
        if not rows:
            return False
        salt, iterations, digest = rows[0]
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        return hmac.compare_digest(got, digest)

    def delete_credentials(self, device_id: str) -> bool:
        with self._tx() as db:
            return bool(db.execute("DELETE FROM device_credentials WHERE id = ?",
                                   (device_id,)).rowcount)


class _Lock(Protocol):
    def acquire(self) -> bool: ...
    def release(self) -> None: ...


class _Atomic:
    """A thread's atomic() block: the lock to take first, whether its transaction began."""

    def __init__(self, outer: _Lock | None) -> None:
        self.outer = outer
        self.begun = False


class _Cursor:
    """The connection, inside a transaction (only execute is needed)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)


def _ref(row: sqlite3.Row) -> JSON:
    mo: JSON = {"id": str(row[0])}
    if row[1] is not None:
        mo["name"] = row[1]
    return {"managedObject": mo}


def _check_enum(value: str, allowed: tuple[str, ...], field: str) -> None:
    if value not in allowed:
        raise Invalid(f"{field}: {value!r} is not one of {', '.join(allowed)}", field)


def _check_request_id(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise BadField("id must be a non-empty string (the device's registration name)", "id")
    if len(value) > 1000 or any(ord(c) < 32 or c in "/+#" for c in value):
        raise Invalid(f"id: {value[:40]!r} cannot be a device's registration name (no '/', '+', "
                      "'#' or control characters, at most 1000 characters)", "id")
