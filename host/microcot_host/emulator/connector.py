"""The platform side of the MQTT interface: one privileged client serving every device.

The connector logs in to the emulator's broker as its connector user (broker.py: may publish
`mr/+`, `br/+`, `sr/+` and subscribe `ms/+`, `bs/+`, `ss/+`) with paho-mqtt (TLS verified against
the emulator's CA when the listener has TLS), a fixed client id and a persistent session (MQTT 5:
clean start off, a session that never expires), and subscribes its three topics with QoS 1. The
broker therefore keeps the connector's subscriptions and queues the devices' messages while the
connector is away (a restart of the emulator, a broker restart). MQTT 5 rather than the devices'
3.1.1 for one reason: its Receive Maximum (see "The broker's window" below).

| in                | done                                        | answer (QoS 1, never retained)  |
| ----------------- | ------------------------------------------- | ------------------------------- |
| `ms/<ID>` text    | `Engine.process(payload, user=ID)`          | `mr/<ID>` unless empty          |
| `bs/<ID>` binary  | `Engine.process_binary(payload, user=ID)`   | `br/<ID>` unless empty          |
| `ss/<ID>` secret  | bootstrap.py (new device request)           | `sr/<ID>` after the acceptance  |
| new operation     | `Engine.render_operation(op, user=...)`     | `mr/<device user>`              |

One or several: with `--workers N` (N >= 2, workers.py) each worker process runs a Connector
with its own client id (`microcot-connector-<k>-of-<N>`), no wildcard topics, and the `ms/<ID>`
and `bs/<ID>` of its share of the devices (subscribe_devices); the main process's Connector
keeps `ss/+` and hands new operations to the device's worker (route_operation). Everything
below holds per connector; applied records are kept per client id. Sessions of an earlier
layout are served to their end with drain() and deleted (sessions.py).

Dispatch
--------
paho's network thread only sorts messages into lanes, one per device ID (text, binary and
bootstrap of one device share it); `workers` threads take the lanes in turn, one message of one
lane at a time. So a device's messages are answered in the order it sent them, a device that
floods gets one turn like every other, and a slow request occupies one worker, not the
connector. A request that runs longer than `time_budget` seconds is logged and its worker is
replaced (up to `workers` extra threads), so even `workers` stuck devices cannot stall the rest.
Every task runs under its own exception handler.

Bounds: a message over `max_message` bytes (64 KiB, below the broker's 256 KiB packet limit)
is not processed but answered like the engine answers an oversized body,
`42,1,Malformed request line: request of <n> bytes exceeds the limit of <max> bytes` on `mr/`
(`42,1,Malformed Request: payload of ...` on `br/`); an oversized secret is ignored with a
warning. A device with more than `max_lane` unanswered messages gets `50,1,429,Too Many
Requests` for each further one; when `max_queued` messages wait in all, paho's thread waits for
room, which slows the broker's delivery to the connector. Beyond its window of unacknowledged
messages (`max_inflight_messages`, see below) Mosquitto queues at most `max_queued_messages`
(broker.py) messages for the connector and drops the rest ("Outgoing messages are being dropped
for client microcot-connector" in its log). An answer too large for the broker is replaced by
`50,<line>,413,Payload Too Large` (logged).

Acknowledgement: exactly once
-----------------------------
paho runs with manual acknowledgement: a QoS 1 message is acknowledged to the broker (PUBACK)
only after its effect is committed. A device message runs in one model transaction
(`Model.atomic`: the rows of all its lines, the availability note, and a record in
`applied_messages` of the message's broker packet id (mid) with a digest of its topic and
payload); then the answer is rendered (the response templates, outside the transaction:
Engine.process_later), published, and the message acknowledged. The transaction begins at
the message's first write and takes the engine's lock first (the engine's own order of the two):
a request that hangs before it writes holds up nobody, while from its first write to its commit
other messages wait for the model, as they waited for each statement before. So `kill -9` at any
moment loses nothing the broker acknowledged to a device: what was not committed is still
unacknowledged in the connector's persistent session, and the broker delivers it again when the
connector is back. ss/ (bootstrap secrets) are acknowledged after bootstrap.py has handled them (no record:
a secret handled twice asks for the same acceptance); a message refused for its size or with 429
is acknowledged after the refusal is published.

What a crash between the commit and the PUBACK means: the broker delivers the message again. MQTT
(3.1.1 and 5, section 4.4) and Mosquitto agree on how: when the connector reconnects to its
session, the broker sends every unacknowledged message again with its original packet id and the
DUP flag; after a broker restart too (Mosquitto saves inflight messages with their mids on
SIGTERM; verified with 2.0.11 and both protocol versions: mids 2, 4, 5 unacknowledged came back as
2, 4, 5 with DUP set, after a reconnect and after a restart, and new messages went on from the next
mid, DUP clear). A packet id is reused only once the
broker has the PUBACK for it, and Mosquitto counts mids up (wrapping at 65535). Hence:

- a DUP message whose mid has a record with the same digest took effect already: it is only
  acknowledged (its answer is not sent again: a device that matches answers by arrival, as the
  agent's create.ask does, could take a second copy for the answer to its next request, while a
  missing answer is a timeout it handles);
- a message without DUP is new, and any record of its mid is out of date: that record is deleted
  before the message is executed (synchronously; otherwise a crash before its commit would leave
  the old record to match its redelivery);
- a DUP message that is still in a lane (the connection broke while it waited) is dropped: the
  original is acknowledged when it is done, on the connection that exists then.

A record may go once the broker surely has the PUBACK. MQTT does not confirm a PUBACK, but
Mosquitto handles one connection's packets in order and paho writes them in order: so when a QoS 1
message the connector published after a PUBACK is acknowledged on the same connection
(connection counted in on_connect), the broker had processed that PUBACK. The connector publishes
such a probe (empty, on `mr/-ack-probe`, a topic no device can have: device IDs start with a letter
or digit) about every 0.1 s while acknowledgements wait for proof, then deletes their records. An
acknowledgement sent on a connection that broke before its proof stays recorded: a redelivery or
the next message with that mid settles it. Records from before a crash are loaded at start() and
settled the same way. Limits: a Mosquitto killed with SIGKILL (not the emulator: the kernel sends
its broker SIGTERM, broker.py) restarts from its last autosave (5 s) and may deliver again what
was acknowledged since, or lose what it acknowledged to devices; QoS 1 also lets a device send a
message again whose PUBACK it did not get, which the broker forwards as a new message.

The broker's window: Mosquitto sends a client only so many unacknowledged messages, and the
messages waiting in lanes are unacknowledged now. With the window of an MQTT 3.1.1 client
(`max_inflight_messages`, 100 in broker.py, for every client alike) one device whose requests
hang with 100 messages waiting would hold up every other device's messages at the broker (tested:
150 hanging messages, another device unanswered for 8 s). So the connector speaks MQTT 5 and
announces a Receive Maximum of its own, what its lanes can hold (`max_queued` + `max_lane`, under
65535 so that Mosquitto, which counts mids up, never has one in use twice): the broker's window is
never smaller than the lanes' bounds, which treat devices fairly. Its own publishes keep within the
Receive Maximum that Mosquitto announces (`OUT_WINDOW`, its max_inflight_messages).

Answers while the broker is away
--------------------------------
Answers and operations are published QoS 1 through paho's queue, which keeps what could not be
sent while the connection is down (a broker restart) and sends it after the reconnect, along with
what was sent but not acknowledged; at most `max_pending` messages (then an answer is dropped
and logged). stop() first lets the lanes run dry and waits for the broker to acknowledge the
answers, then disconnects.

Operations
----------
An operation goes to `Api.device_user(deviceId)` (which walks from a child device up to its
parent), rendered with that device's response templates, in that device's lane, on `mr/<user>`
(DESIGN.md: operations are always delivered as text on `mr/`, also to devices that use binary
SmartREST, which therefore subscribe to `mr/` too). Store and forward: the operations table is the
store, nothing else; an operation is sent while it is PENDING, and is not sent any more once the
device has acknowledged it (EXECUTING, or a final status, through its own SmartREST update). It
is sent
- when it is created, if its device is known (a user, and a collection with template 500);
- at each connection of its device (seed 002: "Alle erstellten Operations werden bei der nächsten
  Verbindung an den Broker gesendet"): every PENDING operation of the device and its child
  devices, as the platform does, so a session lost to a clean-session login, a takeover or a
  broker that lost its data loses none. The device drops copies by operation id (the agent keeps
  the last 16 ids, link.py). A connection is seen in Mosquitto's log ("New client connected ...
  as <ID>", connection_messages) or told by `device_connected(user)`; the operations go out at
  the device's first message after it or `connect_grace` seconds later, whichever comes first
  (a device subscribes mr/ right after CONNACK; a new session has no subscription before);
- after a device's first message since the connector started, and, at most every
  `sync_interval` seconds after a message, while operations created for an unknown device wait
  or while one sent to this device is still PENDING after `redeliver_after` seconds: those not
  sent since the connector started, or not for `redeliver_after` seconds.
A device registered by bulk registration with SHELL 0 ("ob Operations an ein Gerät gesendet
werden sollen", seed 002) gets none: the API creates an operation for it (or one of its child
devices) FAILED, with a reason naming the flag (`Api.refuse_operation`); PENDING ones found at a
synchronisation are refused the same way.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import Api
from .bootstrap import Bootstrap, SecretStore
from .engine import Engine

log = logging.getLogger(__name__)

CLIENT_ID = "microcot-connector"
TOPICS = ("ms/+", "bs/+", "ss/+")  # what the single connector serves
SUB_CHUNK = 500        # topic filters per SUBSCRIBE of a worker's devices
MAX_MESSAGE = 64 * 1024
MAX_PENDING = 100_000  # answers and operations paho keeps while the broker is away
ORPHAN_TTL = 900.0     # seconds an undeliverable operation keeps triggering synchronisations
MAX_OP_PAGES = 20      # of 2000 pending operations per synchronisation
# a topic the connector may publish to (mr/+) that no device can subscribe: device IDs start with
# a letter or a digit (broker.py)
PROBE_TOPIC = "mr/-ack-probe"
# where a draining session publishes the marker that ends its queue (broker.py lets only the
# connector user publish, subscribe and receive there)
DRAIN_PREFIX = "microcot/drain/"
KEEP_STEP = 0.1        # seconds between two rounds of the keeper (log, connections, proofs)
PROBE_TIMEOUT = 5.0
OUT_WINDOW = 100       # answers and operations in flight to the broker

# Mosquitto's log line for a new connection (connection_messages true, broker.py)
_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(p\d+, c\d+, k\d+")
_STARTED = re.compile(rb"mosquitto version \S+ starting")


class ConnectorError(RuntimeError):
    """The connector could not log in to the broker or subscribe."""


@dataclass(frozen=True)
class Delivery:
    """One message from the broker as the connector acknowledges it: QoS 0 needs nothing."""
    mid: int = 0
    qos: int = 0
    digest: bytes = b""


def message_digest(topic: str, payload: bytes) -> bytes:
    """What a record of an applied message keeps of it (module docstring, "exactly once")."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()


def _queued(info: Any) -> Any:
    """paho's MQTTMessageInfo of a QoS 1 publish, usable while the broker is away: with rc 4 (not
    connected) paho keeps the message and sends it after the reconnect, but is_published() would
    raise for ever ("The client is not currently connected") even once it is acknowledged."""
    if info.rc == 4:
        info.rc = 0
    return info


# -- lanes ------------------------------------------------------------------------------------

class Lanes:
    """Tasks per key (device), run in order per key, keys served round-robin by worker threads.

    `submit` returns False (and runs nothing) when the key already has `max_lane` tasks waiting;
    with `max_queued` tasks waiting in all it blocks until there is room (`force` skips both
    bounds: the connector's own small tasks). A task running longer than `budget` seconds gets
    its worker replaced, at most `extra` times over.
    """

    def __init__(self, workers: int = 4, budget: float = 10.0, max_lane: int = 2000,
                 max_queued: int = 20000, extra: int | None = None, name: str = "lane") -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self.workers = workers
        self.budget = budget
        self.max_lane = max_lane
        self.max_queued = max_queued
        self.extra = workers if extra is None else extra
        self.name = name
        self._cv = threading.Condition()
        self._queues: dict[str, collections.deque[Callable[[], None]]] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._running: set[str] = set()
        self._busy: dict[int, tuple[str, float]] = {}   # worker number -> (key, start)
        self._stuck: set[int] = set()
        self._threads: dict[int, threading.Thread] = {}
        self._queued = 0
        self._stopping = False
        self._numbers = itertools.count(1)
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        with self._cv:
            self._stopping = False
            while len(self._threads) < self.workers:
                self._spawn()
        self._monitor = threading.Thread(target=self._watch, name=f"{self.name}-watch",
                                         daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:  # with self._cv held
        n = next(self._numbers)
        t = threading.Thread(target=self._work, args=(n,), name=f"{self.name}-{n}", daemon=True)
        self._threads[n] = t
        t.start()

    def submit(self, key: str, task: Callable[[], None], force: bool = False) -> bool:
        with self._cv:
            q = self._queues.get(key)
            if not force:
                if q is not None and len(q) >= self.max_lane:
                    return False
                while self._queued >= self.max_queued and not self._stopping:
                    self._cv.wait(1.0)
                q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = collections.deque()
            q.append(task)
            self._queued += 1
            if key not in self._running and len(q) == 1:
                self._ready.append(key)
            self._cv.notify_all()
            return True

    @property
    def queued(self) -> int:
        with self._cv:
            return self._queued

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing waits or runs (False after `timeout` seconds)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._queued == 0, timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """Run what is queued (up to `timeout`), then end the workers; the number left undone."""
        self.wait_idle(timeout)
        with self._cv:
            self._stopping = True
            left = self._queued
            self._cv.notify_all()
            threads = list(self._threads.values())
        for t in threads:
            t.join(max(0.1, timeout / 4))
        if self._monitor is not None:
            self._monitor.join(2)
        return left

    def _work(self, n: int) -> None:
        while True:
            with self._cv:
                while not self._ready and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._ready:
                    self._threads.pop(n, None)
                    return
                key = self._ready.popleft()
                task = self._queues[key].popleft()
                self._running.add(key)
                self._busy[n] = (key, time.monotonic())
            t0 = time.monotonic()
            try:
                task()
            except Exception:  # one device's failure is logged, the others go on
                log.exception("task of %s failed", key)
            took = time.monotonic() - t0
            if took > self.budget:
                log.warning("a request of %s took %.1f s (budget %.1f s)", key, took, self.budget)
            with self._cv:
                self._running.discard(key)
                self._queued -= 1
                self._busy.pop(n, None)
                if self._queues[key]:
                    self._ready.append(key)  # to the back: every device gets its turn
                else:
                    del self._queues[key]
                self._cv.notify_all()
                if n in self._stuck:
                    self._stuck.discard(n)
                    if len(self._threads) > self.workers:  # its replacement works on
                        self._threads.pop(n, None)
                        return

    def _watch(self) -> None:
        step = max(0.05, min(1.0, self.budget / 4))
        while True:
            with self._cv:
                if self._cv.wait_for(lambda: self._stopping, step):
                    return
                now = time.monotonic()
                for n, (key, start) in list(self._busy.items()):
                    if n in self._stuck or now - start <= self.budget:
                        continue
                    self._stuck.add(n)
                    if len(self._threads) < self.workers + self.extra:
                        self._spawn()
                        log.warning("a request of %s has run for over %.1f s: another worker "
                                    "serves the other devices meanwhile", key, self.budget)
                    else:
                        log.error("a request of %s has run for over %.1f s and %d workers are "
                                  "busy that long: no more are started", key, self.budget,
                                  len(self._stuck))


# -- connections seen in the broker's log ------------------------------------------------------

class LogFollower:
    """The lines appended to a text file (Mosquitto's log) since the last `lines()` call. It
    starts at the end of the file, or at the last line matching `since` within its last MiB
    (Mosquitto's start: devices may connect before the connector does); a file that shrank or
    was replaced is read from its start."""

    def __init__(self, path: Path, since: re.Pattern[bytes] | None = None) -> None:
        self.path = path
        self._ino: int | None = None
        self._pos = 0
        self._rest = b""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            st = os.fstat(f.fileno())
            self._ino, self._pos = st.st_ino, st.st_size
            if since is not None:
                tail = max(0, st.st_size - (1 << 20))
                f.seek(tail)
                data = f.read(st.st_size - tail)
                found = [m.start() for m in since.finditer(data)]
                if found:
                    self._pos = tail + data.rfind(b"\n", 0, found[-1]) + 1

    def lines(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        if st.st_ino != self._ino or st.st_size < self._pos:
            self._ino, self._pos, self._rest = st.st_ino, 0, b""
        if st.st_size == self._pos:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read(min(st.st_size - self._pos, 1 << 20))
        except OSError:
            return []
        self._pos += len(data)
        *done, self._rest = (self._rest + data).split(b"\n")
        return [line.decode(errors="replace") for line in done]


def connected_clients(lines: list[str]) -> list[str]:
    """Client ids of the connections that Mosquitto's log `lines` report."""
    return [m.group(1) for m in map(_CONNECTED.search, lines) if m]


# -- the connector ------------------------------------------------------------------------------

class Connector:
    """See the module docstring. `broker` is a started broker.Broker, `api` the Api (whose
    credential sink is that broker), `engine` the SmartREST Engine over that Api."""

    def __init__(self, broker: Any, api: Api, engine: Engine, *, auto_accept: bool = False,
                 key_file: Path | None = None, client_id: str = CLIENT_ID,
                 max_message: int = MAX_MESSAGE, workers: int = 4, time_budget: float = 10.0,
                 max_lane: int = 2000, max_queued: int = 20000, sync_interval: float = 2.0,
                 redeliver_after: float = 60.0, connect_grace: float = 0.5,
                 max_pending: int = MAX_PENDING, connect_timeout: float = 10.0,
                 topics: tuple[str, ...] = TOPICS, owns: Callable[[str], bool] | None = None,
                 route_operation: Callable[[str | None, str], None] | None = None) -> None:
        """`topics`, `owns` and `route_operation` are for several connector processes
        (workers.py): the wildcard filters subscribed at every connection (devices' own topics
        are added with subscribe_devices), which devices' connections in the broker's log are
        this connector's to serve (default: all), and where a new operation goes instead of this
        connector's lanes (called with its device user, None if unknown, and its id)."""
        self.broker = broker
        self.api = api
        self.engine = engine
        self.client_id = client_id
        self.topics = tuple(topics)
        self.owns = owns
        self.route_operation = route_operation
        self.max_message = max_message
        self.sync_interval = sync_interval
        self.redeliver_after = redeliver_after
        self.connect_grace = connect_grace
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        # room for the topic and the header in the broker's packet limit
        self.max_answer = int(getattr(broker, "max_packet_size", 256 * 1024)) - 1024
        self.lanes = Lanes(workers, time_budget, max_lane, max_queued, name="connector")
        self.bootstrap = Bootstrap(api, self._publish, self._schedule,
                                   SecretStore(api.model, key_file), auto_accept)
        self.bootstrap.on_issued = self._forget_delivered
        self._client: Any = None
        self._ready = threading.Event()
        self._failure: str | None = None
        # subscriptions: the one made at each connection, SUBACKs awaited by subscribe_devices,
        # the devices subscribed one by one (made again on a connection without the session)
        self._connect_subs: set[int] = set()
        self._sub_cv = threading.Condition()
        self._subacks: dict[int, list[str]] = {}
        self._devices: set[str] = set()
        self._drained = threading.Event()
        self._lock = threading.Lock()
        self._infos: collections.deque[Any] = collections.deque()  # answers not yet PUBACKed
        # acknowledgement (module docstring, "exactly once")
        self._gen = 0                               # connections so far (on_connect)
        self._inflight: dict[int, bytes] = {}       # mid -> digest: in a lane, not acknowledged
        self._applied: dict[int, bytes] = {}        # mid -> digest: recorded in the model
        self._unproven: list[tuple[int, int, bytes]] = []  # (connection, mid, digest) acked
        # operations
        self._synced: dict[str, float] = {}         # user -> time of its last synchronisation
        self._orphans: dict[str, float] = {}        # undelivered operation id -> creation time
        self._delivered: dict[str, dict[str, float]] = {}  # user -> op id -> time sent
        self._connects: dict[str, float] = {}       # user -> when its new connection was seen
        self._log: LogFollower | None = None
        self._keeper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = False
        # called with the device ID after each of its ms/ and bs/ messages (availability)
        self.on_device_message: Callable[[str], None] | None = None
        api.on_operation_created(self._operation_created)

    @property
    def auto_accept(self) -> bool:
        return self.bootstrap.auto_accept

    @auto_accept.setter
    def auto_accept(self, value: bool) -> None:
        self.bootstrap.auto_accept = value

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, and return once the subscriptions are granted."""
        import paho.mqtt.client as mqtt

        if self._started:
            return
        # the records of a previous run, before the broker delivers anything again
        self._applied = self.api.model.applied_messages(self.client_id)
        self._inflight.clear()
        self._unproven.clear()
        self.lanes.start()
        creds = self.broker.connector_credentials()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        c.username_pw_set(creds.user, creds.password)
        ctx = self.broker.client_ssl_context()
        if ctx is not None:
            c.tls_set_context(ctx)
        # within the Receive Maximum Mosquitto announces (its max_inflight_messages, broker.py)
        c.max_inflight_messages_set(OUT_WINDOW)
        c.max_queued_messages_set(self.max_pending)
        c.reconnect_delay_set(0.1, 2.0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self._ready.clear()
        self._failure = None
        self._synced.clear()
        self._delivered.clear()
        self._connects.clear()
        log_file = getattr(self.broker, "log_file", None)
        self._log = LogFollower(Path(log_file), _STARTED) if log_file else None
        self._drained.clear()
        # known before connecting: a persistent session delivers what waited for us at once,
        # possibly before the SUBACK, and those answers must go out
        self._client = c
        try:
            c.connect(self.broker.local_host, self.broker.port, keepalive=30,
                      clean_start=False, properties=self._connect_properties())
        except (OSError, ssl.SSLError) as e:
            self._client = None
            self.lanes.stop(0)
            raise ConnectorError(f"the connector could not reach the broker: {e}") from None
        c.loop_start()
        if not self._ready.wait(self.connect_timeout) or self._failure:
            c.loop_stop()
            with contextlib.suppress(Exception):
                c.disconnect()
            self._client = None
            self.lanes.stop(0)
            raise ConnectorError(f"the connector could not subscribe: "
                                 f"{self._failure or 'no answer from the broker'}")
        self._stopping.clear()
        self._keeper = threading.Thread(target=self._keep, name="connector-keeper", daemon=True)
        self._keeper.start()
        self._started = True
        log.info("connector %s serving %s on %s:%d", self.client_id,
                 ", ".join(self.topics) or "its devices' topics", self.broker.local_host,
                 self.broker.port)

    def _connect_properties(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0xFFFFFFFF  # persistent: never expires
        # our window: what the lanes can hold, so the broker never waits for room in it while
        # the lanes have some (and below 65535: a mid is never in use twice)
        props.ReceiveMaximum = min(60000, self.lanes.max_queued + self.lanes.max_lane)
        return props

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued, wait for the broker's acknowledgements, disconnect."""
        if not self._started:
            return
        self._started = False
        self.lanes.wait_idle(timeout)
        self._wait_acked(timeout / 2)
        self._stopping.set()
        if self._keeper is not None:
            self._keeper.join(PROBE_TIMEOUT + 1)
        self._prove()  # what the last messages' acknowledgements leave
        c, self._client = self._client, None
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
        left = self.lanes.stop(timeout / 2)
        if left:
            log.warning("connector stopped with %d requests that arrived during shutdown: "
                        "executed, but their answers could not be sent", left)

    def __enter__(self) -> Connector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho callbacks (paho's network thread: nothing slow here) -----------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            self._failure = f"CONNACK {rc}"
            self._ready.set()
            log.error("the broker refused the connector: %s", rc)
            return
        with self._lock:
            self._gen += 1
        # paho leaves Nagle on: each answer would wait ~40 ms behind our own PUBACK for the
        # broker's delayed TCP acknowledgement (bench/emulator.py: p50 44 ms at one device)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a persistent session keeps them, but the first start (or a broker that lost its
        # database) needs them, and subscribing again costs nothing
        filters = list(self.topics)
        if not flags.session_present:
            with self._lock:
                filters += [f"{k}/{d}" for d in sorted(self._devices) for k in ("ms", "bs")]
        else:
            log.info("connector %s reconnected; the broker kept its session", self.client_id)
        if not filters:
            self._ready.set()
            return
        # paho handles the SUBACKs in this thread after this callback: the mids are known first
        for i in range(0, len(filters), SUB_CHUNK):
            _, mid = client.subscribe([(f, 1) for f in filters[i:i + SUB_CHUNK]])
            self._connect_subs.add(mid)

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, rcs: Any,
                      props: Any = None) -> None:
        refused = [str(r) for r in rcs if r.is_failure]
        if mid not in self._connect_subs:
            with self._sub_cv:
                self._subacks[mid] = refused
                self._sub_cv.notify_all()
            if refused:
                log.error("the broker refused subscriptions of %s: %s", self.client_id, refused)
            return
        self._connect_subs.discard(mid)
        if refused:
            self._failure = "SUBACK " + ", ".join(refused)
            log.error("the broker refused the connector's subscriptions: %s", refused)
        if refused or not self._connect_subs:
            self._ready.set()

    def subscribe_devices(self, devices: list[str], timeout: float = 10.0) -> None:
        """Subscribe these devices' ms/ and bs/ topics (for a connector that serves some
        devices only, workers.py) and return once the broker granted them: from then on their
        messages queue in this connector's session. ConnectorError if refused or unanswered."""
        c = self._client
        if c is None:
            raise ConnectorError("the connector is not running")
        with self._lock:
            self._devices.update(devices)
        filters = [f"{k}/{d}" for d in devices for k in ("ms", "bs")]
        deadline = time.monotonic() + timeout
        for i in range(0, len(filters), SUB_CHUNK):
            rc, mid = c.subscribe([(f, 1) for f in filters[i:i + SUB_CHUNK]])
            if rc != 0:
                raise ConnectorError(f"subscribing {len(devices)} devices failed: rc {rc} (is "
                                     "the broker away?)")
            with self._sub_cv:
                if not self._sub_cv.wait_for(lambda m=mid: m in self._subacks,
                                             max(0.0, deadline - time.monotonic())):
                    raise ConnectorError("the broker did not answer a subscription in time")
                refused = self._subacks.pop(mid)
            if refused:
                raise ConnectorError(f"the broker refused subscriptions: {refused}")

    def drain(self, timeout: float = 60.0) -> bool:
        """Serve what the broker queued for this session before now, then stop: a marker is
        published on a topic of this session's own (DRAIN_PREFIX + client id) after
        everything queued for it, so once the marker is back every earlier message has been
        delivered; then the lanes run dry and the acknowledgements are proven (stop()). True if
        all that happened within `timeout` seconds and every message was acknowledged, i.e.
        the session holds nothing any more and may be deleted."""
        c = self._client
        if c is None:
            raise ConnectorError("the connector is not running")
        topic = DRAIN_PREFIX + self.client_id
        deadline = time.monotonic() + timeout
        self.subscribe_filters([topic], timeout)
        info = _queued(c.publish(topic, b"", qos=1))
        ok = self._drained.wait(timeout)
        if not ok:
            log.error("session %s: its queue did not end within %.0f s (marker mid %s)",
                      self.client_id, timeout, info.mid)
        elif not self.lanes.wait_idle(max(0.0, deadline - time.monotonic())):
            log.error("session %s: its messages were not all served within %.0f s",
                      self.client_id, timeout)
            ok = False
        self.stop(timeout)
        with self._lock:
            left = len(self._inflight)
        if left:  # could not be stored (logged): still the broker's, in this session
            log.error("session %s: %d messages are not acknowledged", self.client_id, left)
        return ok and not left

    def subscribe_filters(self, filters: list[str], timeout: float = 10.0) -> None:
        """Subscribe these topic filters now (QoS 1) and wait for the SUBACK."""
        c = self._client
        if c is None:
            raise ConnectorError("the connector is not running")
        rc, mid = c.subscribe([(f, 1) for f in filters])
        if rc != 0:
            raise ConnectorError(f"subscribing {filters} failed: rc {rc}")
        with self._sub_cv:
            if not self._sub_cv.wait_for(lambda: mid in self._subacks, timeout):
                raise ConnectorError("the broker did not answer a subscription in time")
            refused = self._subacks.pop(mid)
        if refused:
            raise ConnectorError(f"the broker refused {filters}: {refused}")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        if self._started and rc.is_failure:
            log.warning("connector lost the broker (%s); reconnecting", rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == DRAIN_PREFIX + self.client_id:
            # everything queued before it has been delivered (drain()); not a device message
            client.ack(msg.mid, msg.qos)
            self._drained.set()
            return
        kind, _, device = msg.topic.partition("/")
        payload = bytes(msg.payload)
        if not device or kind not in ("ms", "bs", "ss"):
            log.warning("message on unexpected topic %r ignored", msg.topic[:200])
            self._ack(Delivery(msg.mid, msg.qos))
            return
        d = self._admit(msg, payload)
        if d is None:
            return
        if kind == "ss":
            if len(payload) > self.max_message:
                log.warning("ss/%s: %d bytes is no bootstrap secret: ignored", device,
                            len(payload))
                self._ack(d)
                return
            if not self.lanes.submit(device, functools.partial(self._secret, device, payload,
                                                               d)):
                log.warning("ss/%s: over %d messages waiting: ignored", device,
                            self.lanes.max_lane)
                self._ack(d)
            return
        binary = kind == "bs"
        if len(payload) > self.max_message:
            log.warning("%s/%s: a message of %d bytes exceeds the limit of %d: refused",
                        kind, device, len(payload), self.max_message)
            # the payload itself is not kept
            task = functools.partial(self._refuse_size, device, binary, len(payload), d)
        else:
            task = functools.partial(self._request, device, payload, binary, d)
        if not self.lanes.submit(device, task):
            log.warning("%s has over %d requests waiting: answered 429", device,
                        self.lanes.max_lane)
            self._publish(("br/" if binary else "mr/") + device, b"50,1,429,Too Many Requests")
            self._ack(d)

    def _admit(self, msg: Any, payload: bytes) -> Delivery | None:
        """The message to run, or None when it is a copy of one that is running or ran (module
        docstring, "exactly once")."""
        if msg.qos == 0:
            return Delivery()
        d = Delivery(msg.mid, msg.qos, message_digest(msg.topic, payload))
        with self._lock:
            if d.mid in self._inflight:
                if msg.dup and self._inflight[d.mid] == d.digest:
                    return None  # still in its lane: acknowledged when it is done
                log.error("the broker reused packet id %d while message %s waits in a lane",
                          d.mid, msg.topic[:200])
            recorded = self._applied.get(d.mid)
            if recorded is not None and msg.dup and recorded == d.digest:
                log.info("%s: message %d took effect before; acknowledged again", msg.topic[:200],
                         d.mid)
                self._ack_locked(d, proven=False)
                return None
            if recorded is not None:
                del self._applied[d.mid]
            self._inflight[d.mid] = d.digest
        if recorded is not None:
            # a new message under a recorded mid: the broker had our acknowledgement; the old
            # record must be gone before this one could be delivered again after a crash
            self.api.model.forget_applied([(d.mid, None)], self.client_id)
        return d

    # -- acknowledgements ----------------------------------------------------------------------

    def _ack(self, d: Delivery, applied: bool = False) -> None:
        if d.qos == 0:
            return
        with self._lock:
            self._inflight.pop(d.mid, None)
            if applied:
                self._applied[d.mid] = d.digest
            self._ack_locked(d, proven=not applied)

    def _ack_locked(self, d: Delivery, proven: bool) -> None:
        # under self._lock, so a copy delivered meanwhile is either dropped as running or found
        # recorded; paho's ack only queues the packet (its network thread writes it)
        c = self._client
        if c is None:
            return
        rc = c.ack(d.mid, d.qos)
        if rc == 0 and not proven:
            self._unproven.append((self._gen, d.mid, d.digest))

    def _keep(self) -> None:
        """The keeper thread: connections from the broker's log, proofs of acknowledgements."""
        while not self._stopping.wait(KEEP_STEP):
            try:
                self._watch_connections()
                self._prove()
            except Exception:  # the next round tries again
                log.exception("the connector's keeper failed")

    def _prove(self) -> None:
        """Publish a probe after the waiting acknowledgements; once the broker acknowledges it
        on the same connection, it had processed them: forget their records."""
        with self._lock:
            batch, self._unproven = self._unproven, []
            gen = self._gen
        current = [e for e in batch if e[0] == gen]
        if len(current) < len(batch):
            # sent on a connection that broke: a redelivery or the mid's next message settles it
            log.debug("%d acknowledgements of a lost connection stay recorded",
                      len(batch) - len(current))
        c = self._client
        if not current or c is None:
            return
        info = _queued(c.publish(PROBE_TOPIC, b"", qos=1))
        deadline = time.monotonic() + PROBE_TIMEOUT
        while not info.is_published() and time.monotonic() < deadline:
            with self._lock:
                if self._gen != gen:
                    break
            time.sleep(0.002)
        done: list[tuple[int, bytes | None]] = []
        with self._lock:
            if not info.is_published() or self._gen != gen:
                if self._gen == gen:  # slow: try again with the next probe
                    self._unproven[:0] = current
                return
            for _, mid, digest in current:
                if self._applied.get(mid) == digest:
                    del self._applied[mid]
                    done.append((mid, digest))
        self.api.model.forget_applied(done, self.client_id)

    # -- tasks (worker threads, in the device's order) -----------------------------------------

    def _schedule(self, device: str, task: Callable[[], None]) -> None:
        self.lanes.submit(device, task, force=True)

    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        # The engine calls the model while it holds its own lock (it stores its sessions under
        # it). The transaction holds the model's lock from its first write to its end, so it
        # takes the engine's lock first, in the engine's order; else a device message and
        # another one (or a POST /s) could each wait for the other's lock forever.
        return self.api.model.atomic(outer=self.engine.lock)

    def _request(self, device: str, payload: bytes, binary: bool, d: Delivery) -> None:
        try:
            with self._atomic():
                if binary:
                    answer = self.engine.process_binary_later(payload, user=device)
                else:
                    answer = self.engine.process_later(payload, user=device)
                self._device_message(device)
                if d.qos:
                    self.api.model.note_applied(d.mid, d.digest, self.client_id)
            # the response templates are rendered after the commit: the transaction (which
            # other threads and processes wait for) holds only the requests
            out = answer()
        except Exception:
            # nothing of it is stored: left unacknowledged, the broker delivers it again after
            # the connector's next reconnect
            log.exception("%s: a message of %s could not be stored; it stays unacknowledged",
                          "bs" if binary else "ms", device)
            with self._lock:
                self._inflight.pop(d.mid, None)
            return
        if out:
            self._publish(("br/" if binary else "mr/") + device, self._bounded(device, out))
        self._ack(d, applied=bool(d.qos))
        self._maybe_sync(device)

    def _device_message(self, device: str) -> None:
        hook = self.on_device_message
        if hook is not None:
            try:
                hook(device)
            except Exception:
                log.exception("the device message hook failed for %s", device)

    def _secret(self, device: str, payload: bytes, d: Delivery) -> None:
        try:
            self.bootstrap.on_secret(device, payload)
        finally:
            self._ack(d)

    def _refuse_size(self, device: str, binary: bool, n: int, d: Delivery) -> None:
        why = f"request of {n} bytes exceeds the limit of {self.max_message} bytes"
        if binary:
            self._publish("br/" + device, f"42,1,Malformed Request: payload of {n} bytes "
                          f"exceeds the limit of {self.max_message} bytes".encode())
        else:
            self._publish("mr/" + device, f"42,1,Malformed request line: {why}".encode())
        self._ack(d)

    def _bounded(self, device: str, out: bytes) -> bytes:
        if len(out) <= self.max_answer:
            return out
        log.error("the answer to %s has %d bytes, more than the broker carries: replaced by 413",
                  device, len(out))
        return b"50,1,413,Payload Too Large"

    def _publish(self, topic: str, payload: bytes) -> None:
        c = self._client
        if c is None:
            log.warning("not connected: %d bytes for %s dropped", len(payload), topic)
            return
        # retain is never set: seed 002's broker does not support it (and ours refuses it).
        # No lock of ours is held here: paho calls back under its own locks. While the broker
        # is away, paho keeps the message (rc 4, "not connected") and sends it after the
        # reconnect.
        info = _queued(c.publish(topic, payload, qos=1, retain=False))
        if info.rc != 0:
            log.error("publishing %d bytes on %s failed: rc %s (%d messages wait for the broker)",
                      len(payload), topic, info.rc, self.max_pending)
            return
        with self._lock:
            self._infos.append(info)
            while self._infos and self._infos[0].is_published():
                self._infos.popleft()

    def _wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            infos = list(self._infos)
            self._infos.clear()
        for info in infos:
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.005)

    # -- operations ---------------------------------------------------------------------------

    def device_connected(self, user: str) -> None:
        """A device's connection is ready (connected and subscribed to mr/): send it all its
        PENDING operations. For a front that sees connections; start() also follows the
        broker's log."""
        with self._lock:
            self._connects.pop(user, None)
        self._schedule(user, functools.partial(self._sync, user, True))

    def _watch_connections(self) -> None:
        follower = self._log
        seen = connected_clients(follower.lines()) if follower is not None else []
        # device users only (not the connector, the admin's clients, the bootstrap relay)
        seen = [c for c in seen if c != self.client_id and (self.owns is None or self.owns(c))
                and self.api.model.has_credentials(c)]
        now = time.monotonic()
        with self._lock:
            for client in seen:
                self._connects[client] = now
            due = [u for u, t in self._connects.items() if now - t >= self.connect_grace]
            for user in due:  # taken here: its first message cannot sync it a second time
                del self._connects[user]
        for user in due:
            self._schedule(user, functools.partial(self._sync, user, True))

    def _operation_created(self, op: dict[str, Any]) -> None:
        """Api hook (the REST caller's thread): route a new PENDING operation to its device's
        lane (route_operation: the lane of another process)."""
        if op.get("status") != "PENDING":
            return  # refused by the platform (a SHELL 0 device): nothing to deliver
        op_id = str(op.get("id"))
        user = self.api.device_user(str(op.get("deviceId")))
        if self.route_operation is not None:
            self.route_operation(user, op_id)
            return
        self.operation_for(user, op_id, op.get("deviceId"))

    def operation_for(self, user: str | None, op_id: str, device_id: Any = None) -> None:
        """Send the new operation `op_id` to its device user's lane, or keep it for the device's
        next request when the device is not known yet."""
        if user is None or self.engine.collection_for_device(user) is None:
            with self._lock:
                self._orphans[op_id] = time.monotonic()
            log.info("operation %s for %s waits: its device has no user or no collection with "
                     "template 500 yet; it is sent after the device's next request", op_id,
                     device_id if device_id is not None else user)
            return
        self._schedule(user, functools.partial(self._deliver_new, user, op_id))

    def _refuse_operations(self, ops: list[dict[str, Any]], user: str) -> None:
        for op in ops:
            try:
                self.api.refuse_operation(str(op.get("id")), user)
            except Exception:
                log.exception("operation %s for SHELL=0 device %s could not be set FAILED",
                              op.get("id"), user)

    def _deliver_new(self, user: str, op_id: str) -> None:
        try:
            op = self.api.model.get_operation(op_id)
        except Exception:
            return  # gone
        if op.get("status") == "PENDING":
            self._send(user, [op])

    def _send(self, user: str, ops: list[dict[str, Any]]) -> None:
        """Render and publish these operations on mr/<user>, in as few messages as fit."""
        chunks: list[bytes] = []
        size = 0
        sent: list[str] = []
        for op in ops:
            rows = self.engine.render_operation(op, user=user)
            if not rows:
                log.info("operation %s matches no response template of %s: not sent",
                         op.get("id"), user)
                continue
            if chunks and size + len(rows) + 1 > self.max_answer:
                self._publish("mr/" + user, b"\n".join(chunks))
                chunks, size = [], 0
            chunks.append(self._bounded(user, rows))
            size += len(rows) + 1
            sent.append(str(op.get("id")))
        if chunks:
            self._publish("mr/" + user, b"\n".join(chunks))
        now = time.monotonic()
        with self._lock:
            mine = self._delivered.setdefault(user, {})
            for op_id in [str(o.get("id")) for o in ops]:
                mine[op_id] = now
                self._orphans.pop(op_id, None)
        if sent:
            log.info("operations %s sent to %s", ",".join(sent), user)

    def _maybe_sync(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            if user in self._connects:  # its first message after a new connection
                connect = True
                due = True
            else:
                connect = False
                last = self._synced.get(user)
                for op_id, t in list(self._orphans.items()):
                    if now - t > ORPHAN_TTL:
                        del self._orphans[op_id]
                        log.warning("operation %s could not be sent to any device within %.0f s;"
                                    " stopped trying", op_id, ORPHAN_TTL)
                stale = any(now - t >= self.redeliver_after
                            for t in self._delivered.get(user, {}).values())
                due = last is None or ((self._orphans or stale)
                                       and now - last >= self.sync_interval)
            if due:
                self._synced[user] = now
                self._connects.pop(user, None)
        if due:
            self._sync(user, connect)

    def _sync(self, user: str, connect: bool = False) -> None:
        """Send the device's PENDING operations: all of them after a new connection (`connect`),
        else those not sent by this connector or not for `redeliver_after` seconds."""
        with self._lock:
            self._synced[user] = time.monotonic()
        if self.engine.collection_for_device(user) is None:
            return
        ops = self._pending_ops(user)
        if ops is None:
            return
        if ops and self.api.shell_off(user):
            self._refuse_operations(ops, user)
            return
        now = time.monotonic()
        with self._lock:
            before = self._delivered.get(user, {})
            # what is no longer PENDING is forgotten: it is never sent again
            mine = {str(o.get("id")): before[str(o.get("id"))] for o in ops
                    if str(o.get("id")) in before}
            self._delivered[user] = mine
        todo = [o for o in ops if connect or str(o.get("id")) not in mine
                or now - mine[str(o.get("id"))] >= self.redeliver_after]
        if todo:
            self._send(user, todo)

    def _pending_ops(self, user: str) -> list[dict[str, Any]] | None:
        """The PENDING operations of the device and its child devices (None: unknown)."""
        mo = self.engine.device_mo_id(user)
        if mo is None:
            return None
        ops: list[dict[str, Any]] = []
        target = f"/devicecontrol/operations?agentId={mo}&status=PENDING&pageSize=2000"
        for page in range(1, MAX_OP_PAGES + 1):
            r = self.api.handle("GET", f"{target}&currentPage={page}")
            if r.status != 200 or not isinstance(r.body, dict):
                log.warning("pending operations of %s: %s %s", user, r.status, r.reason)
                return None
            got = r.body.get("operations") or []
            ops += got
            if "next" not in r.body or not got:
                break
        return ops

    def forget_delivered(self, user: str) -> None:
        """The device bootstrapped again (in another process): send it everything again."""
        self._forget_delivered(user)

    def _forget_delivered(self, user: str) -> None:
        # a device that bootstrapped again may have lost its session: send everything again
        with self._lock:
            self._delivered.pop(user, None)
            self._synced.pop(user, None)
