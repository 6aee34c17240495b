"""Bootstrap sessions, served by the emulator's MQTT front (front.py) itself, not by Mosquitto.

Seed 002's bootstrap user is one login shared by every device; its rights follow the client id:
a session with client id `<ID>` reads `sr/<ID>` and writes `ss/<ID>`, nothing else. These
sessions live here, in a namespace of their own, so a bootstrap login with a device's ID can never
take over that device's Mosquitto session; it can only take over another bootstrap session with
the same client id (as any MQTT broker lets a new connection do).

What a bootstrap session may do (anything else in MQTT 3.1.1 closes the connection):

- SUBSCRIBE: `sr/<client id>` is granted with the QoS asked for; every other filter gets 0x80.
- PUBLISH on `ss/<client id>`: relayed to Mosquitto, where the connector takes it; a QoS 1 (2)
  PUBLISH is acknowledged (PUBREC) only once Mosquitto acknowledged the relayed copy, so an
  acknowledged secret is in the broker. Any other topic is acknowledged and dropped, as Mosquitto
  does with a denied PUBLISH. The retain flag closes the connection (`retain_available false`).
- UNSUBSCRIBE, PINGREQ, DISCONNECT; the keep-alive is enforced (1.5 times the CONNECT's value).

The relay is one paho client of the front's own (broker.RELAY_USER: publish `ss/+`, receive
`sr/+`) with a persistent session in Mosquitto, so what the connector answers while the front is
down waits there. It acknowledges an `sr/<ID>` message to Mosquitto only after the message was
handed to the session (and, for a persistent session, written to the session file).

Sessions with clean_session=0 persist as Mosquitto's did: the subscription and the QoS 1 answers
not yet acknowledged by the device are kept while it is away and across restarts, in
`sessions_file` (0600; the answers are XTEA ciphertext). At most `max_sessions` are kept (the
least recently used one without a connection goes first) and `max_queued` answers per session.
While the relay has no connection to Mosquitto (the broker is stopped), bootstrap CONNECTs are
answered with CONNACK 3 and open bootstrap connections are closed, as devices would see an outage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from microcot import mqttpkt

from ..files import write_private
from . import front_wire as wire
from .broker import Broker, BrokerError

log = logging.getLogger(__name__)

MAX_PACKET = 4096  # a bootstrap conversation is a few short packets: a secret, an answer
MAX_INFLIGHT = 10


class Link(Protocol):
    """What a session needs of its connection (front.py's): send() never blocks; a connection
    whose peer reads nothing is closed by it instead."""

    def send(self, data: bytes) -> None: ...
    def kick(self) -> None: ...
    def closing(self) -> bool: ...


@dataclass
class Session:
    client_id: str
    persistent: bool
    sub: int | None = None  # the QoS granted for sr/<ID>; None when not subscribed
    inflight: dict[int, bytes] = field(default_factory=dict)  # pid -> answer sent, not PUBACKed
    queue: deque[bytes] = field(default_factory=deque)       # QoS 1 answers not sent yet
    link: Link | None = None
    seen: float = field(default_factory=time.time)
    _pid: int = 0

    @property
    def topic(self) -> str:
        return "sr/" + self.client_id

    def next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self.inflight:
                return self._pid
        raise RuntimeError("no free packet id")  # MAX_INFLIGHT keeps this from happening

    def to_json(self) -> dict[str, Any]:
        pending = [[pid, _b64(m)] for pid, m in self.inflight.items()]
        pending += [[0, _b64(m)] for m in self.queue]
        return {"sub": self.sub, "pending": pending, "seen": self.seen}

    @classmethod
    def from_json(cls, client_id: str, d: dict[str, Any]) -> Session:
        s = cls(client_id, True, sub=d.get("sub"), seen=float(d.get("seen", 0)))
        for pid, m in d.get("pending", []):
            if pid:
                s.inflight[int(pid)] = base64.b64decode(m)
            else:
                s.queue.append(base64.b64decode(m))
        return s


class Relay:
    """The paho client that carries `ss/<ID>` into Mosquitto and `sr/<ID>` out of it.

    Its callbacks run on paho's thread and are handed to the front's event loop; publish()
    and ack() are called on that loop.
    """

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[str, bytes, int, int], None],
                 on_link: Callable[[bool], None], timeout: float = 5.0) -> None:
        self.broker = broker
        self.loop = loop
        self.on_message = on_message
        self.on_link = on_link
        self.timeout = timeout
        self.up = False
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()
        self._client: Any = None  # paho.mqtt.client.Client

    def start(self) -> None:
        """Connect and subscribe `sr/+`; return once Mosquitto granted it."""
        import paho.mqtt.client as mqtt

        creds = self.broker.relay_credentials()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=creds.user, protocol=mqtt.MQTTv311, clean_session=False,
                        manual_ack=True)
        c.username_pw_set(creds.user, creds.password)
        ctx = self.broker.client_ssl_context()
        if ctx is not None:
            c.tls_set_context(ctx)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 2.0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._client = c
        try:
            c.connect(self.broker.local_host, self.broker.port, keepalive=30)
        except OSError as e:
            self._client = None
            raise BrokerError(f"the bootstrap relay could not reach the broker: {e}") from None
        c.loop_start()
        if not self._ready.wait(self.timeout):
            self.stop()
            raise BrokerError("the broker did not grant the bootstrap relay sr/+ "
                              f"(see {self.broker.log_file})")

    def stop(self) -> None:
        c, self._client = self._client, None
        self.up = False
        if c is not None:
            with contextlib.suppress(Exception):
                c.disconnect()
            c.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None]:
        """Publish; the future is done once Mosquitto acknowledged it (QoS 1) or it was sent."""
        fut: asyncio.Future[None] = self.loop.create_future()
        c = self._client
        if c is None:
            fut.set_exception(ConnectionError("the relay is stopped"))
            return fut
        with self._lock:
            mid = c.publish(topic, payload, qos=qos).mid
            if mid in self._early:
                self._early.discard(mid)
                fut.set_result(None)
            else:
                self._waiting[mid] = fut
        return fut

    def ack(self, mid: int, qos: int) -> None:
        c = self._client
        if c is not None and qos:
            c.ack(mid, qos)

    # -- paho's thread ----------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None
                    ) -> None:
        if rc.is_failure:
            log.error("the broker refused the bootstrap relay (%s)", rc)
            return
        client.subscribe("sr/+", qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any = None
                      ) -> None:
        if any(r.is_failure for r in rcs):
            log.error("the broker refused the bootstrap relay sr/+")
            return
        self.up = True
        self._ready.set()
        self.loop.call_soon_threadsafe(self.on_link, True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None
                       ) -> None:
        was, self.up = self.up, False
        if was:
            log.warning("the bootstrap relay lost the broker (%s); reconnecting", rc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                self.loop.call_soon_threadsafe(self.on_link, False)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.on_message, msg.topic, bytes(msg.payload),
                                           msg.qos, msg.mid)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any = None,
                    props: Any = None) -> None:
        with self._lock:
            fut = self._waiting.pop(mid, None)
            if fut is None:  # acknowledged before publish() returned its mid
                self._early.add(mid)
                return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


class BootstrapHub:
    """The bootstrap user's credentials, its sessions and the relay (see the module docstring).

    Everything but the constructor runs on the front's event loop.
    """

    def __init__(self, broker: Broker, user: str, password: str, sessions_file: Path | None,
                 max_sessions: int = 10000, max_queued: int = 16,
                 relay_timeout: float = 10.0) -> None:
        self.broker = broker
        self.user = user
        self._password = password.encode()
        self.sessions_file = sessions_file
        self.max_sessions = max_sessions
        self.max_queued = max_queued
        self.relay_timeout = relay_timeout
        self.sessions: dict[str, Session] = {}
        self.relay: Relay | None = None
        self._acks: list[tuple[int, int]] = []  # relay messages to acknowledge after the save
        self._save_soon: asyncio.TimerHandle | None = None

    def password_ok(self, password: bytes | None) -> bool:
        return password is not None and secrets.compare_digest(password, self._password)

    @property
    def available(self) -> bool:
        return self.relay is not None and self.relay.up

    # -- lifecycle (start from any thread but the loop's; stop on the loop) -------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sessions = self._load()
        self.relay = Relay(self.broker, loop, self._on_relay_message, self._on_link)
        self.relay.start()

    def stop(self) -> None:
        for s in list(self.sessions.values()):
            if s.link is not None:
                s.link.kick()
        self._save()  # before the relay goes: the answers saved are acknowledged to Mosquitto
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.stop()

    # -- sessions ----------------------------------------------------------------------------------

    def attach(self, link: Link, client_id: str, clean: bool) -> tuple[Session, bool]:
        """The session for a new connection, and whether one was present (CONNACK's flag)."""
        old = self.sessions.get(client_id)
        if old is not None and old.link is not None:
            log.info("bootstrap session %s: taken over by a new connection", client_id)
            old.link.kick()
            old.link = None
        present = old is not None and old.persistent and not clean
        if present:
            assert old is not None
            s = old
        else:
            s = Session(client_id, persistent=not clean)
            if old is not None and old.persistent:
                self._dirty()
            self._evict()
        s.link = link
        s.seen = time.time()
        self.sessions[client_id] = s
        return s, present

    def detach(self, link: Link, s: Session) -> None:
        if s.link is not link:
            return  # taken over already
        s.link = None
        s.seen = time.time()
        if not s.persistent:
            if self.sessions.get(s.client_id) is s:
                del self.sessions[s.client_id]
        else:
            self._dirty()

    def resume(self, s: Session) -> None:
        """After the CONNACK: send again what the device did not acknowledge, then the queue."""
        if s.link is None:
            return
        for pid, m in s.inflight.items():
            s.link.send(wire.publish(s.topic, m, 1, pid, dup=True))
        self._pump(s)

    def subscribed(self, s: Session, qos: int | None) -> None:
        s.sub = qos
        if s.persistent:
            self._dirty()

    def puback(self, s: Session, pid: int) -> None:
        if s.inflight.pop(pid, None) is not None:
            self._pump(s)
            if s.persistent:
                self._dirty()

    def _pump(self, s: Session) -> None:
        while s.link is not None and s.queue and len(s.inflight) < MAX_INFLIGHT:
            m = s.queue.popleft()
            pid = s.next_pid()
            s.inflight[pid] = m
            s.link.send(wire.publish(s.topic, m, 1, pid))

    def _evict(self) -> None:
        if len(self.sessions) < self.max_sessions:
            return
        idle = [s for s in self.sessions.values() if s.link is None]
        for s in sorted(idle, key=lambda s: s.seen)[:len(self.sessions) - self.max_sessions + 1]:
            log.warning("bootstrap session %s dropped: more than %d sessions", s.client_id,
                        self.max_sessions)
            del self.sessions[s.client_id]
            self._dirty()

    # -- the relay -----------------------------------------------------------------------------------

    def relay_publish(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None]:
        if self.relay is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionError("the relay is stopped"))
            return fut
        return self.relay.publish(topic, payload, qos)

    def _on_link(self, up: bool) -> None:
        if up:
            log.info("the bootstrap relay is connected to the broker")
            return
        # the broker is away: bootstrap sessions see the outage as devices do
        for s in list(self.sessions.values()):
            if s.link is not None:
                s.link.kick()

    def _on_relay_message(self, topic: str, payload: bytes, qos: int, mid: int) -> None:
        s = self.sessions.get(topic[3:]) if topic.startswith("sr/") else None
        if s is None or s.sub is None:
            log.info("%s: no bootstrap session is subscribed to it: dropped (as a broker does)",
                     topic)
        else:
            self._deliver(s, payload, min(qos, s.sub, 1))
        if s is not None and s.persistent and self._save_soon is not None:
            self._acks.append((mid, qos))  # acknowledged once the session file holds it
        elif self.relay is not None:
            self.relay.ack(mid, qos)

    def _deliver(self, s: Session, payload: bytes, qos: int) -> None:
        if qos == 0:
            if s.link is not None:
                s.link.send(wire.publish(s.topic, payload, 0))
            return
        if len(s.queue) >= self.max_queued:
            log.warning("bootstrap session %s: more than %d answers waiting: the oldest is "
                        "dropped", s.client_id, self.max_queued)
            s.queue.popleft()
        s.queue.append(payload)
        self._pump(s)
        if s.persistent:
            self._dirty()

    # -- the session file ---------------------------------------------------------------------------

    def _dirty(self) -> None:
        # one write for a burst of changes; relay acknowledgements wait for it
        if self.sessions_file is None or self._save_soon is not None:
            return
        self._save_soon = asyncio.get_running_loop().call_later(0.05, self._save)

    def _save(self) -> None:
        if self._save_soon is not None:
            self._save_soon.cancel()
            self._save_soon = None
        if self.sessions_file is not None:
            doc = {"version": 1, "sessions": {k: s.to_json() for k, s in self.sessions.items()
                                              if s.persistent}}
            try:
                write_private(self.sessions_file, json.dumps(doc, separators=(",", ":")))
            except OSError as e:
                log.error("could not save the bootstrap sessions to %s: %s",
                          self.sessions_file, e)
        acks, self._acks = self._acks, []
        if self.relay is not None:
            for mid, qos in acks:
                self.relay.ack(mid, qos)

    def _load(self) -> dict[str, Session]:
        if self.sessions_file is None:
            return {}
        try:
            doc = json.loads(self.sessions_file.read_text())
            return {k: Session.from_json(k, v) for k, v in doc["sessions"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("%s is not a bootstrap session file (%s): starting without sessions",
                      self.sessions_file, e)
            return {}


class BootstrapConnection:
    """One device's connection as the bootstrap user, after its CONNECT was admitted: packets
    are read from `reader`, answers go out through `link` (the front's connection)."""

    def __init__(self, hub: BootstrapHub, reader: asyncio.StreamReader, link: Link,
                 connect: wire.Connect) -> None:
        self.hub = hub
        self.reader = reader
        self.link = link
        self.connect = connect
        self.id = connect.client_id
        self._qos2: set[int] = set()  # QoS 2 packet ids received, PUBREL not yet

    def send(self, data: bytes) -> None:
        self.link.send(data)

    async def serve(self) -> None:
        s, present = self.hub.attach(self.link, self.id, self.connect.clean)
        try:
            self.send(wire.connack(wire.ACCEPTED, present))
            self.hub.resume(s)
            keepalive = self.connect.keepalive * 1.5 or None
            while not self.link.closing():
                first, body, _ = await asyncio.wait_for(
                    wire.read_packet(self.reader, MAX_PACKET), keepalive)
                if not await self._packet(s, first, body):
                    return
        finally:
            self.hub.detach(self.link, s)

    async def _packet(self, s: Session, first: int, body: bytes) -> bool:
        """Handle one packet; False ends the connection (DISCONNECT)."""
        kind = first & 0xF0
        if kind == mqttpkt.PUBLISH:
            await self._publish(first, body)
        elif first == mqttpkt.PUBACK:
            self.hub.puback(s, wire.parse_pid("PUBACK", body))
        elif first == mqttpkt.PUBREL:
            pid = wire.parse_pid("PUBREL", body)
            self._qos2.discard(pid)
            self.send(wire.ack(mqttpkt.PUBCOMP, pid))
        elif first == mqttpkt.SUBSCRIBE:
            self._subscribe(s, body)
        elif first == mqttpkt.UNSUBSCRIBE:
            pid, topics = wire.parse_unsubscribe(body)
            if s.topic in topics:
                self.hub.subscribed(s, None)
            self.send(wire.unsuback(pid))
        elif first == mqttpkt.PINGREQ and not body:
            self.send(wire.PINGRESP)
        elif first == mqttpkt.DISCONNECT and not body:
            return False
        else:
            raise wire.WireError(f"packet 0x{first:02x} from a bootstrap client")
        return True

    def _subscribe(self, s: Session, body: bytes) -> None:
        pid, subs = wire.parse_subscribe(body)
        codes = []
        for topic, qos in subs:
            if topic == s.topic:
                self.hub.subscribed(s, qos)
                codes.append(qos)
            else:
                log.info("bootstrap session %s: SUBSCRIBE %r refused", self.id, topic[:80])
                codes.append(mqttpkt.SUBACK_FAILURE)
        self.send(wire.suback(pid, codes))

    async def _publish(self, first: int, body: bytes) -> None:
        if first & 0x01:
            raise wire.WireError("PUBLISH with the retain flag (retained messages are not "
                                 "available)")
        topic, qos, pid, message = wire.parse_publish(first, body)
        if qos == 2 and pid in self._qos2:
            self.send(wire.ack(mqttpkt.PUBREC, pid))  # a repeat before PUBREL: once is enough
            return
        if topic == "ss/" + self.id:
            fut = self.hub.relay_publish(topic, message, min(qos, 1))
            if qos:
                try:
                    await asyncio.wait_for(fut, self.hub.relay_timeout)
                except (TimeoutError, ConnectionError):
                    log.warning("bootstrap session %s: the broker did not take its message on "
                                "%s within %.0f s: closed unacknowledged", self.id, topic,
                                self.hub.relay_timeout)
                    raise ConnectionError("the broker did not take the bootstrap message") \
                        from None
        else:
            log.info("bootstrap session %s: PUBLISH on %r dropped", self.id, topic[:80])
        if qos == 1:
            self.send(wire.ack(mqttpkt.PUBACK, pid))
        elif qos == 2:
            self._qos2.add(pid)
            self.send(wire.ack(mqttpkt.PUBREC, pid))
