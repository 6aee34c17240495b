"""The SmartREST path in several processes: devices partitioned over connector workers.

`microcot emulator --workers N` (`Emulator(worker_processes=N)`) with N >= 2 runs N worker
processes, each an ordinary `Connector` (connector.py: lanes per device, manual acknowledgement
after the commit, exactly once through `applied_messages`, operations store-and-forward) over its
own Model, Api and Engine on the emulator's database, with its own persistent MQTT 5 session on
the same Mosquitto, client id `microcot-connector-<k>-of-<N>`. Why not shared subscriptions
(`$share`), and the measurements behind this: docs/guides/emulator-scaling.md.

Partition: device `<ID>` belongs to worker `partition(ID, N)` (blake2b of the ID, modulo N: the
same in every process and run). Its worker subscribes `ms/<ID>` and `bs/<ID>`; no other session
does. Mosquitto delivers one session's messages in order, and the worker's lanes run one
device's messages one at a time: per-device order as with one connector.

New devices: Mosquitto drops a message that no session subscribes to, and a device cannot
publish before it has a broker user. `SubscribingSink` (the main process's credential sink)
therefore has the device's worker subscribe its topics, and waits for the SUBACK, before it
creates the broker user. A worker subscribes all its devices (the broker's device users) when it
starts; its persistent session keeps them anyway.

The main process (the supervisor, `Workers`):
- starts the workers and waits until each has subscribed its devices; a worker that ends (kill -9
  included) is started again under the same client id, so its session's unacknowledged and queued
  messages come back to it (DUP set) and the applied records decide, as after a crash of the single
  connector; subscription requests it had not answered are sent again to its successor;
- keeps a connector of its own under `microcot-connector`, subscribed to `ss/+` only (bootstrap
  secrets: Bootstrap and its acceptance hook live in the main process), whose new operations go to
  their device's worker (`route_operation`) after the SHELL 0 check, which must answer the POST;
- takes the workers' reports: which devices sent something (availability, every ACTIVITY_STEP
  seconds) and which template collections a device deleted (forgotten in every process).

Pipe protocol (multiprocessing.Connection, pickled tuples). Main -> worker: ("subscribe", req,
[ids]), ("operation", user, op id), ("forget", xid), ("issued", user), ("stop",). Worker -> main:
("ready", pid), ("subscribed", req, error or None), ("active", [users]), ("forget", xid).
A worker whose pipe ends (the main process is gone) stops.

Secrets: the connector user's password reaches a worker inside its pickled configuration over
the pipe that multiprocessing's spawn sets up, never on a command line or in the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .broker import Credentials
from .certs import client_ssl_context
from .connector import CLIENT_ID, ConnectorError

log = logging.getLogger(__name__)

ACTIVITY_STEP = 0.2     # seconds between a worker's reports of active devices
READY_TIMEOUT = 60.0    # a worker's start: imports, connect, subscribe its devices
SUBSCRIBE_TIMEOUT = 30.0
RESTART_DELAY = (0.2, 5.0)  # first and longest pause before a dead worker is started again


def partition(device_id: str, n: int) -> int:
    """The worker (0 .. n-1) that serves device `device_id`."""
    digest = hashlib.blake2b(device_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def worker_client_id(k: int, n: int) -> str:
    """Client id of worker k (from 0) of n: the layout is part of the name, so sessions of
    different layouts never mix (sessions.py drains those of an earlier one)."""
    return f"{CLIENT_ID}-{k + 1}-of-{n}"


@dataclass(frozen=True)
class BrokerAccess:
    """What a connector needs of broker.Broker, picklable for a worker process."""
    local_host: str
    port: int
    user: str
    password: str = field(repr=False)
    log_file: str | None = None
    max_packet_size: int = 256 * 1024
    ca_cert: str | None = None

    @classmethod
    def of(cls, broker: Any) -> BrokerAccess:
        creds = broker.connector_credentials()
        ca = broker.ca_cert
        return cls(broker.local_host, broker.port, creds.user, creds.password,
                   str(broker.log_file), int(broker.max_packet_size),
                   str(ca) if ca is not None else None)

    def connector_credentials(self) -> Credentials:
        return Credentials(self.user, self.password)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        return client_ssl_context(self.ca_cert) if self.ca_cert else None


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process is started with."""
    index: int
    count: int
    database: str = field(repr=False)  # a PostgreSQL URL may carry a password
    binaries: str
    max_binary: int
    tenant: str
    admin_user: str
    max_message: int
    threads: int
    key_file: str
    broker: BrokerAccess
    devices: tuple[str, ...] = ()
    log_level: int = logging.INFO


# -- the worker process ---------------------------------------------------------------------------

class _Sender:
    """Sends on the pipe from several threads; a pipe whose other end is gone sends nothing."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __call__(self, msg: tuple[Any, ...]) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(msg)


class _Activity:
    """The devices that sent something, reported in batches."""

    def __init__(self, send: _Sender) -> None:
        self._send = send
        self._users: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-activity", daemon=True)
        self._thread.start()

    def note(self, user: str) -> None:
        with self._lock:
            self._users.add(user)

    def _run(self) -> None:
        while not self._stop.wait(ACTIVITY_STEP):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            users, self._users = self._users, set()
        if users:
            self._send(("active", sorted(users)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.flush()


def worker_main(conn: Connection, cfg: WorkerConfig) -> None:
    """A worker process: serve the devices of partition `cfg.index` until told to stop or the
    main process is gone."""
    from .api import Api
    from .binaries import BinaryStore
    from .connector import Connector
    from .engine import Engine
    from .model import open_model

    logging.basicConfig(level=cfg.log_level,
                        format=f"%(asctime)s %(levelname)s worker {cfg.index + 1}/{cfg.count} "
                               "%(name)s: %(message)s")
    send = _Sender(conn)
    model = open_model(cfg.database, shared=True)
    api = Api(model, credentials=None, tenant=cfg.tenant, admin_user=cfg.admin_user,
              binaries=BinaryStore(Path(cfg.binaries), cfg.max_binary))
    engine = Engine(api, max_body=cfg.max_message, shared=True)
    engine.on_forget = lambda xid: send(("forget", xid))
    connector = Connector(cfg.broker, api, engine, client_id=worker_client_id(cfg.index,
                                                                              cfg.count),
                          key_file=Path(cfg.key_file) if cfg.key_file else None,
                          max_message=cfg.max_message,
                          workers=cfg.threads, topics=(),
                          owns=lambda user: partition(user, cfg.count) == cfg.index)
    activity = _Activity(send)
    connector.on_device_message = activity.note
    try:
        connector.start()
        connector.subscribe_devices(list(cfg.devices), SUBSCRIBE_TIMEOUT)
        send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                log.warning("the emulator's main process is gone: stopping")
                break
            if msg[0] == "stop":
                break
            try:
                _serve(msg, connector, engine, send)
            except Exception:  # one request's failure must not end the worker
                log.exception("request %r from the main process failed", msg[0])
                if msg[0] == "subscribe":
                    send(("subscribed", msg[1], "failed; see the worker's log"))
    finally:
        connector.stop()
        activity.stop()
        model.close()


def _serve(msg: tuple[Any, ...], connector: Any, engine: Any, send: _Sender) -> None:
    kind = msg[0]
    if kind == "subscribe":
        _, req, ids = msg
        try:
            connector.subscribe_devices(list(ids), SUBSCRIBE_TIMEOUT)
        except ConnectorError as e:
            send(("subscribed", req, str(e)))
        else:
            send(("subscribed", req, None))
    elif kind == "operation":
        connector.operation_for(msg[1], str(msg[2]))
    elif kind == "forget":
        engine.forget(msg[1])
    elif kind == "issued":
        connector.forget_delivered(msg[1])
    else:
        log.warning("unknown request %r from the main process", kind)


# -- the supervisor (main process) ----------------------------------------------------------------

class WorkerError(RuntimeError):
    """A worker could not be started, or did not answer in time."""


class _Slot:
    """One worker's place: its process, pipe and reader thread, restarted in place."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.ready = threading.Event()
        self.send_lock = threading.Lock()
        self.restarts = 0


class Workers:
    """The worker processes of the main process (see the module docstring).

    `config(k, devices)` makes worker k's configuration; `devices()` lists every device user
    (asked again at each restart); `on_active(user)` and `on_forget(xid)` take the workers'
    reports (in a reader thread).
    """

    def __init__(self, count: int, config: Callable[[int, tuple[str, ...]], WorkerConfig],
                 devices: Callable[[], list[str]], on_active: Callable[[str], None],
                 on_forget: Callable[[str], None]) -> None:
        if count < 2:
            raise ValueError("worker processes are for two or more; one is the plain connector")
        self.count = count
        self._config = config
        self._devices = devices
        self._on_active = on_active
        self._on_forget = on_forget
        self._slots = [_Slot(k) for k in range(count)]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._reqs = itertools.count(1)
        # subscription requests awaiting their worker's answer: req -> (worker, ids, event, box)
        self._pending: dict[int, tuple[int, list[str], threading.Event, list[str | None]]] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker and return once each has subscribed its devices."""
        self._stopping.clear()
        devices = self._devices()
        for slot in self._slots:
            self._spawn(slot, devices)
        deadline = time.monotonic() + READY_TIMEOUT
        for slot in self._slots:
            if not slot.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise WorkerError(f"worker {slot.index + 1} of {self.count} did not start "
                                  f"within {READY_TIMEOUT:.0f} s (see its log lines)")

    def stop(self, timeout: float = 15.0) -> None:
        """Ask every worker to finish what it has and end; kill what does not end in time."""
        self._stopping.set()
        for slot in self._slots:
            self._send(slot, ("stop",))
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            p = slot.proc
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killed", slot.index + 1)
                p.kill()
                p.wait(5)
            if slot.conn is not None:
                slot.conn.close()

    def pids(self) -> list[int | None]:
        """The workers' process ids (None while one is being started again)."""
        return [s.pid if s.ready.is_set() else None for s in self._slots]

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker is up (after a restart, say)."""
        deadline = time.monotonic() + timeout
        return all(s.ready.wait(max(0.0, deadline - time.monotonic())) for s in self._slots)

    def _spawn(self, slot: _Slot, devices: list[str]) -> None:
        mine = tuple(d for d in devices if partition(d, self.count) == slot.index)
        cfg = self._config(slot.index, mine)
        # a process of its own (`python -m`), not multiprocessing's spawn, which would import
        # the caller's main module again; the pipe is a socket pair passed as a descriptor,
        # and the configuration (with the connector's password) its first message
        parent, child = mp.Pipe()
        fd = child.fileno()
        # the parent's import path as the child's: a parent that found this package through a
        # path it inserted itself (bench/*.py, a checkout beside an installed copy) must not
        # get workers running another copy of the code (an editable install's, say)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(fd)], pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, env=env)
        child.close()
        parent.send(cfg)
        slot.ready.clear()
        slot.conn, slot.proc = parent, proc
        threading.Thread(target=self._read, args=(slot, parent, proc),
                         name=f"workers-read-{slot.index + 1}", daemon=True).start()

    def _read(self, slot: _Slot, conn: Connection, proc: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._take(slot, msg)
            except Exception:
                log.exception("a report of worker %d failed", slot.index + 1)
        slot.ready.clear()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if self._stopping.is_set():
            return
        log.error("worker %d of %d ended (exit code %s): starting it again under the same "
                  "client id", slot.index + 1, self.count, proc.returncode)
        self._restart(slot)

    def _restart(self, slot: _Slot) -> None:
        slot.restarts += 1
        delay = min(RESTART_DELAY[1], RESTART_DELAY[0] * 2 ** min(slot.restarts - 1, 5))
        if self._stopping.wait(delay):
            return
        try:
            self._spawn(slot, self._devices())
        except Exception:
            log.exception("worker %d could not be started again", slot.index + 1)
            threading.Thread(target=self._restart, args=(slot,), daemon=True).start()

    def _take(self, slot: _Slot, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.pid = int(msg[1])
            slot.ready.set()
            slot.restarts = 0  # a worker that dies before it is ready is started more slowly
            log.info("worker %d of %d serving (pid %d)", slot.index + 1, self.count, slot.pid)
            # what its predecessor had not answered
            with self._lock:
                again = [(req, ids) for req, (k, ids, ev, _) in self._pending.items()
                         if k == slot.index and not ev.is_set()]
            for req, ids in again:
                self._send(slot, ("subscribe", req, ids))
        elif kind == "subscribed":
            with self._lock:
                entry = self._pending.get(int(msg[1]))
            if entry is not None:
                entry[3].append(msg[2])
                entry[2].set()
        elif kind == "active":
            for user in msg[1]:
                self._on_active(str(user))
        elif kind == "forget":
            xid = str(msg[1])
            self._on_forget(xid)
            for other in self._slots:
                if other is not slot:
                    self._send(other, ("forget", xid))
        else:
            log.warning("unknown report %r from worker %d", kind, slot.index + 1)

    def _send(self, slot: _Slot, msg: tuple[Any, ...]) -> bool:
        conn = slot.conn
        if conn is None:
            return False
        with slot.send_lock:
            try:
                conn.send(msg)
                return True
            except (OSError, ValueError):
                return False  # it died: its successor gets what matters (module docstring)

    # -- requests -------------------------------------------------------------------------------

    def subscribe(self, device_id: str, timeout: float = SUBSCRIBE_TIMEOUT) -> None:
        """Have the device's worker subscribe its topics; return once the broker granted them
        (WorkerError otherwise). Waits for a worker that is being started again."""
        self.subscribe_many([device_id], timeout)

    def subscribe_many(self, device_ids: list[str], timeout: float = SUBSCRIBE_TIMEOUT) -> None:
        """subscribe() for many devices: one request per worker holding all of its devices (one
        SUBSCRIBE each), sent at once and waited for together."""
        groups: dict[int, list[str]] = {}
        for device_id in device_ids:
            groups.setdefault(partition(device_id, self.count), []).append(device_id)
        waits: list[tuple[int, int, threading.Event, list[str | None]]] = []
        try:
            for k, ids in groups.items():
                req = next(self._reqs)
                event = threading.Event()
                box: list[str | None] = []
                with self._lock:
                    self._pending[req] = (k, ids, event, box)
                waits.append((req, k, event, box))
                slot = self._slots[k]
                if slot.ready.is_set():
                    self._send(slot, ("subscribe", req, ids))
                # else: sent when the worker reports ready (_take)
            deadline = time.monotonic() + timeout
            for _, k, event, box in waits:
                what = f"device {groups[k][0]}" if len(groups[k]) == 1 else \
                    f"{len(groups[k])} devices"
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    raise WorkerError(f"worker {k + 1} did not subscribe {what} within "
                                      f"{timeout:.0f} s")
                if box and box[0] is not None:
                    raise WorkerError(f"worker {k + 1} could not subscribe {what}: {box[0]}")
        finally:
            with self._lock:
                for req, *_ in waits:
                    self._pending.pop(req, None)

    def operation(self, user: str | None, op_id: str) -> None:
        """A new operation for device `user`: to its worker (a worker that is down gets it from
        the database at the device's next connection or message)."""
        if user is None:
            log.info("operation %s has no device user yet: it is sent at its device's next "
                     "connection", op_id)
            return
        slot = self._slots[partition(user, self.count)]
        if not self._send(slot, ("operation", user, op_id)):
            log.info("operation %s: worker %d is away; %s gets it at its next connection",
                     op_id, slot.index + 1, user)

    def issued(self, user: str) -> None:
        """The device got new credentials (bootstrap): its worker sends it everything again."""
        self._send(self._slots[partition(user, self.count)], ("issued", user))

    def forget(self, xid: str) -> None:
        """A template collection is gone: every worker drops its cached copy."""
        for slot in self._slots:
            self._send(slot, ("forget", xid))


class SubscribingSink:
    """The credential sink (api.CredentialSink) of the main process with workers: the device's
    worker subscribes its topics before the broker user exists (module docstring)."""

    def __init__(self, broker: Any, workers: Workers) -> None:
        self.broker = broker
        self.workers = workers
        # granted subscriptions stay in the workers' persistent sessions (and a restarted worker
        # subscribes every broker user): a device is subscribed once
        self._subscribed: set[str] = set()
        self._lock = threading.Lock()

    def subscribe(self, device_ids: list[str]) -> None:
        """Have the workers subscribe these devices' topics (those not subscribed before); a
        caller that stops the broker to add users does this first (Emulator.add_devices)."""
        for device_id in device_ids:
            # the broker's rules first: an ID that cannot be a user cannot be a topic level
            self.broker.check_new_device(device_id)
        with self._lock:
            todo = [d for d in dict.fromkeys(device_ids) if d not in self._subscribed]
        if todo:
            self.workers.subscribe_many(todo)
            with self._lock:
                self._subscribed.update(todo)

    def add_device(self, device_id: str, password: str) -> None:
        self.subscribe([device_id])
        self.broker.add_device(device_id, password)

    def add_devices(self, devices: list[tuple[str, str]]) -> None:
        """add_device for many: every worker subscribes its share in one request, then the
        broker gets the users in its batched way (Broker.add_devices)."""
        pairs = list(devices)
        self.subscribe([device_id for device_id, _ in pairs])
        self.broker.add_devices(pairs)

    def remove_device(self, device_id: str) -> bool:
        with self._lock:
            self._subscribed.discard(device_id)
        return bool(self.broker.remove_device(device_id))


def default_count() -> int:
    """The machine's cores (the issue's default for --workers)."""
    return max(1, os.cpu_count() or 1)


def _main(argv: list[str]) -> int:
    """`python -m microcot_host.emulator.workers FD`: a worker on the pipe at descriptor FD."""
    # run as __main__: the configuration unpickles as the package module's classes
    from microcot_host.emulator import workers

    conn = Connection(int(argv[1]))
    try:
        cfg = conn.recv()
    except (EOFError, OSError):
        return 1
    if not isinstance(cfg, workers.WorkerConfig):
        return 2
    workers.worker_main(conn, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
