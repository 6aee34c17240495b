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


class _Db:
    def __init__(self, path: Path, schema: str) -> None:
        _touch_private(path)
        self.path = path
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

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Ledger:
    """What was provisioned where (no passwords). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self._db = _Db(Path(path), _SCHEMA)
        with self._db.tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise LedgerError(f"{path}: ledger schema {row[0]}, this microcot reads "
                                  f"{SCHEMA_VERSION}")
        self.path = Path(path)

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

    def begin(self, device_id: str, *, external_id: str, name: str, shell: str,
              id_source: str | None, board_serial: str | None, port: str, cred_hash: str,
              cred_origin: str, new_password: bool) -> None:
        """Record that `device_id` is about to get these credentials (status pending)."""
        t = now()
        with self._db.tx() as c:
            old = c.execute("SELECT generation FROM devices WHERE device_id=?",
                            (device_id,)).fetchone()
            if old is None:
                c.execute("INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,1,NULL,?,?)",
                          (device_id, external_id, name, shell, id_source, board_serial, port,
                           PENDING, cred_hash, cred_origin, t, t))
            else:
                c.execute("UPDATE devices SET external_id=?, name=?, shell=?, id_source=?, "
                          "board_serial=?, port=?, status=?, cred_hash=?, cred_origin=?, "
                          "generation=generation+?, error=NULL, updated_at=? WHERE device_id=?",
                          (external_id, name, shell, id_source, board_serial, port, PENDING,
                           cred_hash, cred_origin, 1 if new_password else 0, t, device_id))
            self._event(c, t, device_id, port, board_serial, PENDING, None)

    def describe(self, device_id: str, *, external_id: str, name: str, shell: str) -> None:
        """New CSV columns for a device whose credentials stay as they are."""
        t = now()
        with self._db.tx() as c:
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
    def _event(c: sqlite3.Connection, t: str, device_id: str | None, port: str | None,
               serial: str | None, status: str, detail: str | None) -> None:
        c.execute("INSERT INTO events (time, device_id, port, board_serial, status, detail) "
                  "VALUES (?,?,?,?,?,?)", (t, device_id, port, serial, status, detail))

    def close(self) -> None:
        self._db.close()


class Vault:
    """Each device's password, encrypted (see the module docstring). Thread-safe."""

    def __init__(self, path: Path, keys: Keys) -> None:
        self._db = _Db(Path(path), _SECRETS_SCHEMA)
        self._keys = keys
        self.path = Path(path)

    def get(self, device_id: str) -> str | None:
        rows = self._db.query("SELECT token FROM secrets WHERE device_id=?", (device_id,))
        if not rows:
            return None
        try:
            return self._keys.open(rows[0][0])
        except InvalidToken:
            raise LedgerError(f"{self.path}: the password of {device_id} does not decrypt with "
                              "this key (was the key file replaced?)") from None

    def put(self, device_id: str, password: str) -> None:
        t = now()
        token = self._keys.seal(password)
        with self._db.tx() as c:
            old = c.execute("SELECT token FROM secrets WHERE device_id=?",
                            (device_id,)).fetchone()
            if old is None:
                c.execute("INSERT INTO secrets VALUES (?,?,NULL,?)", (device_id, token, t))
            elif self._keys.open(old[0]) != password:
                c.execute("UPDATE secrets SET previous=token, token=?, updated_at=? "
                          "WHERE device_id=?", (token, t, device_id))

    def close(self) -> None:
        self._db.close()


class Books:
    """Ledger, vault and keys opened together (what a provisioning run needs)."""

    def __init__(self, ledger: Path | None = None, key_file: Path | None = None) -> None:
        self.paths = Paths.beside(ledger, key_file)
        self.keys = Keys(load_key(self.paths.key))
        self.ledger = Ledger(self.paths.ledger)
        self.vault = Vault(self.paths.secrets, self.keys)

    def close(self) -> None:
        self.ledger.close()
        self.vault.close()

    def __enter__(self) -> Books:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
