"""The platform side of the MQTT interface: one privileged client serving every device.

The connector logs in to the emulator's broker as its connector user (broker.py: may publish
`mr/+`, `br/+`, `sr/+` and subscribe `ms/+`, `bs/+`, `ss/+`) with paho-mqtt, MQTT 3.1.1, TLS
verified against the emulator's CA, a fixed client id and clean_session=False, and subscribes its
three topics with QoS 1. The broker therefore keeps the connector's subscriptions and queues the
devices' messages while the connector is away (a restart of the emulator, a broker restart).

| in                | done                                        | answer (QoS 1, never retained)  |
| ----------------- | ------------------------------------------- | ------------------------------- |
| `ms/<ID>` text    | `Engine.process(payload, user=ID)`          | `mr/<ID>` unless empty          |
| `bs/<ID>` binary  | `Engine.process_binary(payload, user=ID)`   | `br/<ID>` unless empty          |
| `ss/<ID>` secret  | bootstrap.py (new device request)           | `sr/<ID>` after the acceptance  |
| new operation     | `Engine.render_operation(op, user=...)`     | `mr/<device user>`              |

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
room, which slows the broker's delivery to the connector. Mosquitto itself queues at most
`max_queued_messages` (1000, broker.py) messages for the connector beyond the 20 in flight and
drops the rest ("Outgoing messages are being dropped for client microcot-connector" in its log):
a burst of more than about a thousand messages from all devices together, faster than the
connector drains them (some 2000-3500 per second), loses messages at the broker. An answer too large for the broker is replaced by
`50,<line>,413,Payload Too Large` (logged).

Messages are acknowledged to the broker when they reach a lane (paho's automatic PUBACK), not
after they are answered: with manual acknowledgement Mosquitto's window of 20 unacknowledged
messages per client would let one slow device hold up everybody's messages. The price: a crash of
the emulator loses what is queued in lanes. stop() first lets the lanes run dry and waits for the
broker to acknowledge the answers, then disconnects; messages arriving in the last milliseconds
are still executed, but their answers cannot be sent (logged with their number).

Operations
----------
A new operation (the `Api.on_operation_created` hook) goes to `Api.device_user(deviceId)` (which
walks from a child device up to its parent), rendered with that device's response templates, in
that device's lane, on `mr/<user>`: the broker's persistent session keeps it while the device is
offline (DESIGN.md: operations are always delivered as text on `mr/`, also to devices that use
binary SmartREST, which therefore subscribe to `mr/` too).

An operation cannot be delivered at once when its device is not known yet (no device user, or
the device has not yet used a collection with template 500). Besides, a publish can be lost
(emulator crash). So the connector also *synchronises*: after the first request of each device
since the connector started (and, while undelivered operations exist, at most every
`sync_interval` seconds after a request), it lists the PENDING operations of the device and its
child devices and sends those it has not sent yet. "Sent" is a set of operation ids per device in
the model's settings (`connector.sent.<user>`, trimmed to the operations still PENDING), so a
restart of the emulator sends nothing twice. A device that bootstrapped again (it may have lost
its session) gets all its PENDING operations again.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bootstrap import Bootstrap, SecretStore

log = logging.getLogger(__name__)

CLIENT_ID = "microcot-connector"
MAX_MESSAGE = 64 * 1024
SENT_KEY = "connector.sent."
MAX_SENT = 5000      # operation ids remembered per device
PRUNE_SENT = 200     # ... trimmed to the PENDING ones when a new operation finds this many
ORPHAN_TTL = 900.0   # seconds an undeliverable operation keeps triggering synchronisations
MAX_OP_PAGES = 20    # of 2000 pending operations per synchronisation


class ConnectorError(RuntimeError):
    """The connector could not log in to the broker or subscribe."""


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


# -- the connector ------------------------------------------------------------------------------

class Connector:
    """See the module docstring. `broker` is a started broker.Broker, `api` the Api (whose
    credential sink is that broker), `engine` the SmartREST Engine over that Api."""

    def __init__(self, broker: Any, api: Any, engine: Any, *, auto_accept: bool = False,
                 key_file: Path | None = None, client_id: str = CLIENT_ID,
                 max_message: int = MAX_MESSAGE, workers: int = 4, time_budget: float = 10.0,
                 max_lane: int = 2000, max_queued: int = 20000, sync_interval: float = 2.0,
                 connect_timeout: float = 10.0) -> None:
        self.broker = broker
        self.api = api
        self.engine = engine
        self.client_id = client_id
        self.max_message = max_message
        self.sync_interval = sync_interval
        self.connect_timeout = connect_timeout
        # room for the topic and the header in the broker's packet limit
        self.max_answer = int(getattr(broker, "max_packet_size", 256 * 1024)) - 1024
        self.lanes = Lanes(workers, time_budget, max_lane, max_queued, name="connector")
        self.bootstrap = Bootstrap(api, self._publish, self._schedule,
                                   SecretStore(api.model, key_file), auto_accept)
        self.bootstrap.on_issued = self._forget_sent
        self._client: Any = None
        self._ready = threading.Event()
        self._failure: str | None = None
        self._lock = threading.Lock()
        self._infos: collections.deque[Any] = collections.deque()  # answers not yet PUBACKed
        self._synced: dict[str, float] = {}        # user -> time of its last synchronisation
        self._orphans: dict[str, float] = {}       # undelivered operation id -> creation time
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
        self.lanes.start()
        creds = self.broker.connector_credentials()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=self.client_id, protocol=mqtt.MQTTv311, clean_session=False)
        c.username_pw_set(creds.user, creds.password)
        ctx = self.broker.client_ssl_context()
        if ctx is not None:
            c.tls_set_context(ctx)
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 2.0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self._ready.clear()
        self._failure = None
        self._synced.clear()
        # known before connecting: a persistent session delivers what waited for us at once,
        # possibly before the SUBACK, and those answers must go out
        self._client = c
        try:
            c.connect(self.broker.local_host, self.broker.port, keepalive=30)
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
        self._started = True
        log.info("connector serving ms/+, bs/+ and ss/+ on %s:%d", self.broker.local_host,
                 self.broker.port)

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued, wait for the broker's acknowledgements, disconnect."""
        if not self._started:
            return
        self._started = False
        self.lanes.wait_idle(timeout)
        self._wait_acked(timeout / 2)
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
        # paho leaves Nagle on: each answer would wait ~40 ms behind our own PUBACK for the
        # broker's delayed TCP acknowledgement (bench/emulator.py: p50 44 ms at one device)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a persistent session keeps them, but the first start (or a broker that lost its
        # database) needs them, and subscribing again costs nothing
        client.subscribe([("ms/+", 1), ("bs/+", 1), ("ss/+", 1)])
        if flags.session_present:
            log.info("connector reconnected; the broker kept its session")

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, rcs: Any,
                      props: Any = None) -> None:
        refused = [str(r) for r in rcs if r.is_failure]
        if refused:
            self._failure = "SUBACK " + ", ".join(refused)
            log.error("the broker refused the connector's subscriptions: %s", refused)
        self._ready.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        if self._started and rc.is_failure:
            log.warning("connector lost the broker (%s); reconnecting", rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind, _, device = msg.topic.partition("/")
        payload = bytes(msg.payload)
        if not device or kind not in ("ms", "bs", "ss"):
            log.warning("message on unexpected topic %r ignored", msg.topic[:200])
            return
        if kind == "ss":
            if len(payload) > self.max_message:
                log.warning("ss/%s: %d bytes is no bootstrap secret: ignored", device,
                            len(payload))
                return
            if not self.lanes.submit(device, functools.partial(self.bootstrap.on_secret, device,
                                                               payload)):
                log.warning("ss/%s: over %d messages waiting: ignored", device,
                            self.lanes.max_lane)
            return
        binary = kind == "bs"
        if len(payload) > self.max_message:
            log.warning("%s/%s: a message of %d bytes exceeds the limit of %d: refused",
                        kind, device, len(payload), self.max_message)
            # the payload itself is not kept
            task = functools.partial(self._refuse_size, device, binary, len(payload))
        else:
            task = functools.partial(self._request, device, payload, binary)
        if not self.lanes.submit(device, task):
            log.warning("%s has over %d requests waiting: answered 429", device,
                        self.lanes.max_lane)
            self._publish(("br/" if binary else "mr/") + device, b"50,1,429,Too Many Requests")

    # -- tasks (worker threads, in the device's order) -----------------------------------------

    def _schedule(self, device: str, task: Callable[[], None]) -> None:
        self.lanes.submit(device, task, force=True)

    def _request(self, device: str, payload: bytes, binary: bool) -> None:
        if binary:
            out = self.engine.process_binary(payload, user=device)
        else:
            out = self.engine.process(payload, user=device)
        if out:
            self._publish(("br/" if binary else "mr/") + device, self._bounded(device, out))
        hook = self.on_device_message
        if hook is not None:
            try:
                hook(device)
            except Exception:
                log.exception("the device message hook failed for %s", device)
        self._maybe_sync(device)

    def _refuse_size(self, device: str, binary: bool, n: int) -> None:
        why = f"request of {n} bytes exceeds the limit of {self.max_message} bytes"
        if binary:
            self._publish("br/" + device, f"42,1,Malformed Request: payload of {n} bytes "
                          f"exceeds the limit of {self.max_message} bytes".encode())
        else:
            self._publish("mr/" + device, f"42,1,Malformed request line: {why}".encode())

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
        # No lock of ours is held here: paho calls back under its own locks.
        info = c.publish(topic, payload, qos=1, retain=False)
        if info.rc not in (0, 4):  # 4: not connected, paho sends it after reconnecting
            log.error("publishing %d bytes on %s failed: rc %s", len(payload), topic, info.rc)
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
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(Exception):
                info.wait_for_publish(left)

    # -- operations ---------------------------------------------------------------------------

    def _operation_created(self, op: dict[str, Any]) -> None:
        """Api hook (the REST caller's thread): route the operation to its device's lane."""
        op_id = str(op.get("id"))
        user = self.api.device_user(str(op.get("deviceId")))
        if user is None or self.engine.collection_for_device(user) is None:
            with self._lock:
                self._orphans[op_id] = time.monotonic()
            log.info("operation %s for %s waits: its device has no user or no collection with "
                     "template 500 yet; it is sent after the device's next request", op_id,
                     op.get("deviceId"))
            return
        self._schedule(user, lambda: self._deliver(user, [op]))

    def _deliver(self, user: str, ops: list[dict[str, Any]], pending: set[str] | None = None
                 ) -> None:
        sent = self._sent(user)
        if pending is None and len(sent) >= PRUNE_SENT:
            # many operations since the last synchronisation: forget those no longer PENDING
            listed = self._pending_ops(user)
            if listed is not None:
                pending = {str(o.get("id")) for o in listed} | {str(o.get("id")) for o in ops}
        if pending is not None:
            sent &= pending
        chunks: list[bytes] = []
        size = 0
        new: list[str] = []
        for op in ops:
            op_id = str(op.get("id"))
            if op_id in sent:
                continue
            rows = self.engine.render_operation(op, user=user)
            sent.add(op_id)
            new.append(op_id)
            if not rows:
                log.info("operation %s matches no response template of %s: not sent", op_id,
                         user)
                continue
            if chunks and size + len(rows) + 1 > self.max_answer:
                self._publish("mr/" + user, b"\n".join(chunks))
                chunks, size = [], 0
            chunks.append(self._bounded(user, rows))
            size += len(rows) + 1
        if chunks:
            self._publish("mr/" + user, b"\n".join(chunks))
        if new or pending is not None:
            self._save_sent(user, sent)
        if new:
            with self._lock:
                for op_id in new:
                    self._orphans.pop(op_id, None)
            log.info("operations %s sent to %s", ",".join(new), user)

    def _maybe_sync(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._synced.get(user)
            for op_id, t in list(self._orphans.items()):
                if now - t > ORPHAN_TTL:
                    del self._orphans[op_id]
                    log.warning("operation %s could not be sent to any device within %.0f s; "
                                "stopped trying", op_id, ORPHAN_TTL)
            due = last is None or (self._orphans and now - last >= self.sync_interval)
            if due:
                self._synced[user] = now
        if due:
            self._sync(user)

    def _sync(self, user: str) -> None:
        if self.engine.collection_for_device(user) is None:
            return
        ops = self._pending_ops(user)
        if ops is not None:
            self._deliver(user, ops, {str(o.get("id")) for o in ops})

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

    def _sent(self, user: str) -> set[str]:
        raw = self.api.model.get_setting(SENT_KEY + user)
        try:
            return set(json.loads(raw)) if raw else set()
        except ValueError:
            return set()

    def _save_sent(self, user: str, sent: set[str]) -> None:
        keep = sorted(sent, key=lambda s: int(s) if s.isdigit() else 0)[-MAX_SENT:]
        self.api.model.set_setting(SENT_KEY + user, json.dumps(keep))

    def _forget_sent(self, user: str) -> None:
        # a device that bootstrapped again may have lost its session: send everything again
        self.api.model.set_setting(SENT_KEY + user, "[]")
        with self._lock:
            self._synced.pop(user, None)
