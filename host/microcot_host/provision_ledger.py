"""The provisioning ledger and the password vault of `microcot provision`.

Three files, by default under `state_dir()`:

  provisioning.db          the ledger (SQLite): which device got credentials when, on which board
                           and port, with which result. It never holds a password, only a keyed
                           hash of it, so it can be read, copied and audited like any log.
  provisioning.secrets.db  the vault (SQLite): each device's password, Fernet-encrypted. It is
                           what lets a re-run write the same CSV again for passwords that were
                           generated here (they exist nowhere else), and `export` without the
                           input CSV.
  provisioning.key         32 random bytes, owner-only. The ledger's hash key and the vault's
                           encryption key are both derived from it, so the ledger and the vault
                           alone are useless to whoever finds a copy of them (a backup, an
                           attachment); with --key-file it can live elsewhere (a removable
                           medium, a secrets mount).

All three are created owner-only (0600, directory 0700); SQLite gives its journal the mode of
the database file.

Several stations, one ledger: `--ledger postgresql://...` (or MICROCOT_LEDGER) keeps the ledger
and the vault in one PostgreSQL database instead (provision_ledger_pg.py); the key stays a file on
each station. What a shared ledger must add, both backends do the same way where it applies:

  - a claim per device ID while a board is being provisioned (`Ledger.claim`): a row lock in
    PostgreSQL, so a second station that meets the same ID at the same moment fails that board
    instead of writing other credentials beside the first; with SQLite one run's own check
    (provision.py) is all there is, as before;
  - a CSV row's ID goes to one device only (`LedgerConflict`): two stations with overlapping CSVs
    that disagree cannot give one ID to two ICCIDs (checked in the transaction, and in PostgreSQL
    also by a unique index, which is what holds under concurrent transactions);
  - the key is bound to the ledger (a keyed check value in `meta`): a station with another key
    (or a new one made because the file was not copied) is refused before it writes anything,
    instead of writing hashes and vault entries no other station can use.

Why a keyed hash (HMAC-SHA256 over "<device ID>\\n<password>") in the ledger rather than a plain
one: a plain SHA-256 of a password is a dictionary-attack target; without the key it is not.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken

from .files import private_dir
from .paths import state_dir

PENDING, WRITTEN, VERIFIED, FAILED = "pending", "written", "verified", "failed"
STATUSES = (PENDING, WRITTEN, VERIFIED, FAILED)
SCHEMA_VERSION = 1

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id    TEXT PRIMARY KEY,  -- the MQTT user: ICCID, MAC or configured ID (CSV ICCID)
    external_id  TEXT NOT NULL,     -- the CSV's ID column
    name         TEXT NOT NULL,
    shell        TEXT NOT NULL CHECK (shell IN ('0', '1')),
    id_source    TEXT,              -- iccid | mac | configured
    board_serial TEXT,              -- machine.unique_id() hex, else the USB serial number
    port         TEXT,
    status       TEXT NOT NULL CHECK (status IN {STATUSES!r}),
    cred_hash    TEXT,              -- hmac-sha256:<hex>, never the password
    cred_origin  TEXT,              -- csv | generated
    generation   INTEGER NOT NULL DEFAULT 1,  -- +1 for every new password (--rotate)
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    time         TEXT NOT NULL,
    device_id    TEXT,              -- NULL when the board failed before it told its ID
    port         TEXT,
    board_serial TEXT,
    status       TEXT NOT NULL,     -- a device status, or 'unchanged'
    detail       TEXT
);
CREATE INDEX IF NOT EXISTS events_device ON events (device_id);
"""

_SECRETS_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    device_id  TEXT PRIMARY KEY,
    token      TEXT NOT NULL,       -- Fernet(password)
    previous   TEXT,                -- the password before the last change (rotation), Fernet
    updated_at TEXT NOT NULL
);
"""


class LedgerError(RuntimeError):
    pass


class LedgerBusy(LedgerError):
    """Another station is provisioning this device ID right now."""


class LedgerConflict(LedgerError):
    """What was asked would give one CSV row's ID to a second device."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_ledger() -> Path:
    return state_dir() / "provisioning.db"


@dataclass(frozen=True)
class Paths:
    ledger: Path
    secrets: Path
    key: Path

    @classmethod
    def beside(cls, ledger: Path | None = None, key: Path | None = None) -> Paths:
        """The vault and the key next to the ledger (`x.db` -> `x.secrets.db`, `x.key`)."""
        ledger = Path(ledger) if ledger else default_ledger()
        stem = ledger.name[:-3] if ledger.name.endswith(".db") else ledger.name
        return cls(ledger, ledger.with_name(stem + ".secrets.db"),
                   Path(key) if key else ledger.with_name(stem + ".key"))


def _private_dir(path: Path) -> None:
    # every folder made on the way is 0700, not only the last; an existing folder the user
    # named (--ledger, --key-file) keeps its mode, the default one (state_dir) is narrowed there
    private_dir(path)


def _touch_private(path: Path) -> None:
    # create the database file owner-only before SQLite does, with the process umask
    _private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def load_key(path: Path) -> bytes:
    """The 32-byte master key; made (owner-only, race-free) when the file does not exist."""
    with contextlib.suppress(FileNotFoundError):
        return _decode_key(path)
    _private_dir(path.parent)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run made it first: use theirs
        return _decode_key(path)
    with os.fdopen(fd, "w") as f:
        f.write(base64.urlsafe_b64encode(key).decode() + "\n")
    return key


def _decode_key(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = base64.urlsafe_b64decode(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise LedgerError(f"{path}: not a provisioning key (expected 32 bytes, base64)")
    return key


def _subkey(master: bytes, purpose: str) -> bytes:
    return hmac.new(master, purpose.encode(), hashlib.sha256).digest()


class Keys:
    """The ledger's hash key and the vault's cipher, both derived from one master key."""

    def __init__(self, master: bytes) -> None:
        self._mac = _subkey(master, "microcot provisioning ledger hash v1")
        self._fernet = Fernet(base64.urlsafe_b64encode(_subkey(master, "microcot vault v1")))
        # what the ledger records to recognise its key again: a keyed value, so it says
        # nothing about the key itself
        self.check = "hmac-sha256:" + hmac.new(_subkey(master, "microcot ledger key check v1"),
                                               b"key check", hashlib.sha256).hexdigest()

    def cred_hash(self, device_id: str, password: str) -> str:
        msg = f"{device_id}\n{password}".encode()
        return "hmac-sha256:" + hmac.new(self._mac, msg, hashlib.sha256).hexdigest()

    def matches(self, stored: str | None, device_id: str, password: str) -> bool:
        return bool(stored) and hmac.compare_digest(stored, self.cred_hash(device_id, password))

    def seal(self, password: str) -> str:
        return self._fernet.encrypt(password.encode()).decode("ascii")

    def open(self, token: str) -> str:
        return self._fernet.decrypt(token.encode("ascii")).decode()


@dataclass
class DeviceRecord:
    device_id: str
    external_id: str
    name: str
    shell: str
    id_source: str | None
    board_serial: str | None
    port: str | None
    status: str
    cred_hash: str | None
    cred_origin: str | None
    generation: int
    error: str | None
    created_at: str
    updated_at: str


# -- the databases: what Ledger and Vault need of SQLite and of PostgreSQL ----------------------

class Rows(Protocol):
    def fetchone(self) -> tuple | None: ...

    def fetchall(self) -> list[tuple]: ...


class Tx(Protocol):
    """One transaction: statements with `?` placeholders (SQLite's; the PostgreSQL adapter
    translates them)."""

    def execute(self, sql: str, args: tuple = ()) -> Rows: ...


class Claim(Protocol):
    """A device ID held for one board while it is provisioned; release() always."""

    def check(self) -> None:
        """LedgerError when the claim was lost (its connection broke): stop writing."""

    def release(self) -> None: ...


class Database(Protocol):
    where: str  # for messages: a path, or a URL without its password
    for_update: str  # appended to a SELECT whose rows the transaction will change
    integrity_errors: tuple[type[Exception], ...]

    def tx(self) -> contextlib.AbstractContextManager[Tx]: ...

    def query(self, sql: str, args: tuple = ()) -> list[tuple]: ...

    def claim(self, device_id: str) -> Claim: ...

    def close(self) -> None: ...


class NoClaim:
    """SQLite: one station per ledger file, whose run checks its own boards (provision.py)."""

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class _SqliteDb:
    for_update = ""  # BEGIN IMMEDIATE takes the write lock for the whole transaction
    integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, schema: str) -> None:
        _touch_private(path)
        self.path = path
        self.where = str(path)
        # one connection shared by the worker threads, serialised by our lock; SQLite's own
        # locking (busy timeout) covers another process using the same file
        self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.RLock()
        # executescript commits whatever is pending itself, so it runs outside tx()
        self._conn.executescript(schema)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def claim(self, device_id: str) -> Claim:
        return NoClaim()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- ledger and vault ---------------------------------------------------------------------------

class Ledger:
    """What was provisioned where (no passwords). Thread-safe."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.where = db.where
        with db.tx() as c:
            # ON CONFLICT: two stations opening a new shared ledger at once
            c.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING",
                      (str(SCHEMA_VERSION),))
            (version,) = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.where}: ledger schema {version}, this microcot reads "
                              f"{SCHEMA_VERSION}")

    def key_check(self) -> str | None:
        rows = self._db.query("SELECT value FROM meta WHERE key='key_check'")
        return rows[0][0] if rows else None

    def bind_key(self, check: str, key_path: Path) -> None:
        """Record the key's check value in a ledger that has none; LedgerError when the ledger
        was made with another key."""
        with self._db.tx() as c:
            c.execute("INSERT INTO meta VALUES ('key_check', ?) ON CONFLICT (key) DO NOTHING",
                      (check,))
            (stored,) = c.execute("SELECT value FROM meta WHERE key='key_check'").fetchone()
        if not hmac.compare_digest(stored, check):
            raise LedgerError(f"{key_path} is not the key of the ledger {self.where}: it was "
                              "made with another one (copy the key file of the station that "
                              "made the ledger, or name it with --key-file)")

    def claim(self, device_id: str) -> Claim:
        """Hold `device_id` for one board; LedgerBusy when another station holds it."""
        return self._db.claim(device_id)

    def get(self, device_id: str) -> DeviceRecord | None:
        rows = self._db.query("SELECT * FROM devices WHERE device_id=?", (device_id,))
        return DeviceRecord(*rows[0]) if rows else None

    def all(self) -> list[DeviceRecord]:
        return [DeviceRecord(*r) for r in
                self._db.query("SELECT * FROM devices ORDER BY device_id")]

    def events(self, device_id: str | None = None) -> list[tuple]:
        if device_id is None:
            return self._db.query("SELECT * FROM events ORDER BY seq")
        return self._db.query("SELECT * FROM events WHERE device_id=? ORDER BY seq", (device_id,))

    def owner_of(self, external_id: str, device_id: str) -> str | None:
        """The other device that has this CSV ID already, if any."""
        rows = self._db.query("SELECT device_id FROM devices WHERE external_id=? AND "
                              "device_id<>? ORDER BY device_id", (external_id, device_id))
        return rows[0][0] if rows else None

    def check_external_id(self, device_id: str, external_id: str) -> None:
        """LedgerConflict when `external_id` is another device's (a check before anything is
        written; begin() and describe() check again in their transaction)."""
        other = self.owner_of(external_id, device_id)
        if other is not None:
            raise self._conflict(external_id, device_id, other)

    def _conflict(self, external_id: str, device_id: str, other: str) -> LedgerConflict:
        return LedgerConflict(f"the CSV ID {external_id!r} is the ID of device {other} already, "
                              f"not of {device_id}: one row for two devices (two CSVs that "
                              "disagree?)")

    @contextlib.contextmanager
    def _unique_external_id(self, device_id: str, external_id: str) -> Iterator[None]:
        # the unique index of a shared ledger: a station that checked while another's insert
        # was not yet committed learns of it here
        try:
            yield
        except self._db.integrity_errors:
            other = self.owner_of(external_id, device_id)
            if other is None:
                raise
            raise self._conflict(external_id, device_id, other) from None

    def _check_in_tx(self, c: Tx, device_id: str, external_id: str) -> None:
        row = c.execute("SELECT device_id FROM devices WHERE external_id=? AND device_id<>?",
                        (external_id, device_id)).fetchone()
        if row is not None:
            raise self._conflict(external_id, device_id, row[0])

    def begin(self, device_id: str, *, external_id: str, name: str, shell: str,
              id_source: str | None, board_serial: str | None, port: str, cred_hash: str,
              cred_origin: str, new_password: bool) -> None:
        """Record that `device_id` is about to get these credentials (status pending)."""
        t = now()
        with self._unique_external_id(device_id, external_id), self._db.tx() as c:
            self._check_in_tx(c, device_id, external_id)
            # one statement for a new and a known device: atomic in both databases
            c.execute("INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,1,NULL,?,?) "
                      "ON CONFLICT (device_id) DO UPDATE SET external_id=excluded.external_id, "
                      "name=excluded.name, shell=excluded.shell, id_source=excluded.id_source, "
                      "board_serial=excluded.board_serial, port=excluded.port, "
                      "status=excluded.status, cred_hash=excluded.cred_hash, "
                      "cred_origin=excluded.cred_origin, "
                      "generation=devices.generation+?, error=NULL, "
                      "updated_at=excluded.updated_at",
                      (device_id, external_id, name, shell, id_source, board_serial, port,
                       PENDING, cred_hash, cred_origin, t, t, 1 if new_password else 0))
            self._event(c, t, device_id, port, board_serial, PENDING, None)

    def describe(self, device_id: str, *, external_id: str, name: str, shell: str) -> None:
        """New CSV columns for a device whose credentials stay as they are."""
        t = now()
        with self._unique_external_id(device_id, external_id), self._db.tx() as c:
            self._check_in_tx(c, device_id, external_id)
            c.execute("UPDATE devices SET external_id=?, name=?, shell=?, updated_at=? "
                      "WHERE device_id=?", (external_id, name, shell, t, device_id))
            self._event(c, t, device_id, None, None, "updated",
                        f"ID {external_id!r}, NAME {name!r}, SHELL {shell}")

    def set_status(self, device_id: str, status: str, *, port: str | None = None,
                   board_serial: str | None = None, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        t = now()
        with self._db.tx() as c:
            c.execute("UPDATE devices SET status=?, error=?, updated_at=?, "
                      "port=COALESCE(?, port), board_serial=COALESCE(?, board_serial) "
                      "WHERE device_id=?", (status, error, t, port, board_serial, device_id))
            self._event(c, t, device_id, port, board_serial, status, error)

    def note(self, device_id: str | None, port: str | None, board_serial: str | None,
             status: str, detail: str | None = None) -> None:
        """An event only (a board that failed before telling its ID, an unchanged device)."""
        t = now()
        with self._db.tx() as c:
            self._event(c, t, device_id, port, board_serial, status, detail)

    @staticmethod
    def _event(c: Tx, t: str, device_id: str | None, port: str | None,
               serial: str | None, status: str, detail: str | None) -> None:
        c.execute("INSERT INTO events (time, device_id, port, board_serial, status, detail) "
                  "VALUES (?,?,?,?,?,?)", (t, device_id, port, serial, status, detail))

    def close(self) -> None:
        self._db.close()


class Vault:
    """Each device's password, encrypted (see the module docstring). Thread-safe."""

    def __init__(self, db: Database, keys: Keys) -> None:
        self._db = db
        self._keys = keys
        self.where = db.where

    def get(self, device_id: str) -> str | None:
        rows = self._db.query("SELECT token FROM secrets WHERE device_id=?", (device_id,))
        if not rows:
            return None
        try:
            return self._keys.open(rows[0][0])
        except InvalidToken:
            raise LedgerError(f"{self.where}: the password of {device_id} does not decrypt with "
                              "this key (was the key file replaced?)") from None

    def put(self, device_id: str, password: str) -> None:
        t = now()
        token = self._keys.seal(password)
        with self._db.tx() as c:
            old = c.execute("SELECT token FROM secrets WHERE device_id=?" + self._db.for_update,
                            (device_id,)).fetchone()
            if old is None:
                # ON CONFLICT: a concurrent first put (the claim normally rules it out) counts
                # as a change, so neither password is lost
                c.execute("INSERT INTO secrets VALUES (?,?,NULL,?) ON CONFLICT (device_id) DO "
                          "UPDATE SET previous=secrets.token, token=excluded.token, "
                          "updated_at=excluded.updated_at", (device_id, token, t))
            elif self._keys.open(old[0]) != password:
                c.execute("UPDATE secrets SET previous=token, token=?, updated_at=? "
                          "WHERE device_id=?", (token, t, device_id))

    def close(self) -> None:
        self._db.close()


def is_url(ledger: Path | str | None) -> bool:
    """A PostgreSQL ledger's URL rather than a file (`postgresql://` or `postgres://`)."""
    return ledger is not None and str(ledger).startswith(("postgresql://", "postgres://"))


def default_key() -> Path:
    return state_dir() / "provisioning.key"


class Books:
    """Ledger, vault and keys opened together (what a provisioning run needs).

    ledger: a SQLite file (default: under the state folder), or a PostgreSQL URL (both the
    ledger and the vault live in that database). key_file: default beside a ledger file, and
    `<state dir>/provisioning.key` for a PostgreSQL ledger. create=False: LedgerError instead of
    making new books (export, status).
    """

    def __init__(self, ledger: Path | str | None = None, key_file: Path | None = None, *,
                 create: bool = True) -> None:
        self.paths: Paths | None = None
        dbs: list[Database] = []
        if is_url(ledger):
            from .provision_ledger_pg import PgDb

            self.key_path = Path(key_file) if key_file else default_key()
            if not create and not self.key_path.exists():
                raise LedgerError(f"{self.key_path} does not exist: the key of this ledger is "
                                  "needed (see --key-file)")
            ledger_db = secrets_db = PgDb(str(ledger), create=create)
            dbs.append(ledger_db)
        else:
            self.paths = Paths.beside(Path(ledger) if ledger else None, key_file)
            self.key_path = self.paths.key
            if not create:
                for p in (self.paths.ledger, self.paths.key):
                    if not p.exists():
                        raise LedgerError(f"{p} does not exist: nothing was provisioned with it "
                                          "(see --ledger and --key-file)")
            ledger_db = _SqliteDb(self.paths.ledger, _SCHEMA)
            dbs.append(ledger_db)
            secrets_db = _SqliteDb(self.paths.secrets, _SECRETS_SCHEMA)
            dbs.append(secrets_db)
        self._dbs = dbs
        self.where = ledger_db.where
        try:
            self.ledger = Ledger(ledger_db)
            self.keys = Keys(self._master_key())
            self.ledger.bind_key(self.keys.check, self.key_path)
            self.vault = Vault(secrets_db, self.keys)
        except BaseException:
            self.close()
            raise

    def _master_key(self) -> bytes:
        if not self.key_path.exists() and self.ledger.key_check() is not None:
            # a new key here would write hashes and passwords no other station can use
            raise LedgerError(f"{self.key_path} does not exist, but the ledger {self.where} was "
                              "made with a key: copy that key file here from the station that "
                              "made the ledger (or name it with --key-file)")
        return load_key(self.key_path)

    def close(self) -> None:
        for db in self._dbs:
            db.close()

    def __enter__(self) -> Books:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
