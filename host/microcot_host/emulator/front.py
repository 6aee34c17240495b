"""The emulator's public MQTT port: a small MQTT 3.1.1 front before Mosquitto.

Devices connect here (TLS with the emulator's server certificate); Mosquitto listens on loopback
only (broker.py), where the connector, the bootstrap relay and the admin client reach it directly.
The front reads each connection's CONNECT itself and then:

| CONNECT                                   | answer                                           |
| ----------------------------------------- | ------------------------------------------------ |
| not a CONNECT first, malformed, too big,  | the connection is closed, no CONNACK (MQTT 3.1.1)|
| or not whole within `connect_timeout`     |                                                  |
| protocol level other than 3.1 / 3.1.1     | CONNACK 1                                        |
| with a will                               | CONNACK 5 (see below)                            |
| no user name, or one of the emulator's    | CONNACK 5                                        |
| own users (connector, admin, relay)       |                                                  |
| the bootstrap user, wrong password        | CONNACK 5                                        |
| the bootstrap user, client id that is not | CONNACK 2 (identifier rejected)                  |
| a valid device ID                         |                                                  |
| the bootstrap user, broker away           | CONNACK 3                                        |
| the bootstrap user                        | a bootstrap session served here                  |
|                                           | (front_bootstrap.py)                             |
| a device user with a client id other than | CONNACK 5, as Mosquitto answers it (its own      |
| its user name                             | check, broker.py, stays behind this one)         |
| a device user                             | the CONNECT as received goes to Mosquitto, and   |
|                                           | the two streams are joined until either closes;  |
|                                           | CONNACK 3 when Mosquitto cannot be reached       |

Last will: refused. Seed 002 says "LastWill nicht unterstützt" without saying whether the platform
refuses the CONNECT or drops the will. Refusing is the stricter of the two, so a device that
connects here connects there whatever the platform does, while a device that relies on its will
learns at once that it has none; dropping it silently would let a device pass here that expects
a message the platform never sends. CONNACK 5 ("not authorized") is MQTT 3.1.1's only code for
"you may not do that" (1-4 name a protocol level, a client id, an outage, a password), and our
firmware never sends a will. Mosquitto 2.0.11 accepted a will even on a topic the user may not
publish to, and published it.

Bounds: at most `max_connections` connections (more are closed at once), the TLS handshake and
the CONNECT within `connect_timeout` each, a CONNECT of at most `max_connect` bytes. A joined
connection is two asyncio protocols that hand each other every chunk as it comes (no coroutine
per chunk: the front's latency is mostly TLS), with back-pressure: when one side's write buffer
is full (asyncio's high-water mark) the other side stops reading until it drained.

TLS is terminated by front_tls.py (an `ssl.SSLObject` over memory BIOs behind an
asyncio.Transport), not by asyncio's `create_server(ssl=...)`: Python 3.11's SSLProtocol gives
every connection a 256 KiB read buffer of its own, ~290 KB of RSS per connected device (1.45 GB
at 5,000); front_tls.py shares its buffers between connections, and an idle device costs the
front ~22 KB (tests/host/test_emulator_front_memory.py), most of it OpenSSL's own state.

Everything runs on one asyncio event loop in a thread of its own (start()/stop() from any other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import threading
from collections.abc import Callable, Iterable

from . import front_wire as wire
from .broker import RESERVED_USERS, valid_device_id
from .certs import TlsFiles, server_ssl_context
from .front_bootstrap import BootstrapConnection, BootstrapHub
from .front_tls import TlsServer

log = logging.getLogger(__name__)

_CLOSED = (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError)

# Mosquitto 2.0's own default list (its binary's string), with its server preference: a device
# negotiates the same cipher with the front as it did with Mosquitto's TLS listener, so its TLS
# heap figures stay what they were (Python's default list ranks AES-128-GCM above ChaCha20)
MOSQUITTO_CIPHERS = "DEFAULT:!aNULL:!eNULL:!LOW:!EXPORT:!SSLv2:@STRENGTH"


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The TLS server context of the front, as Mosquitto's listener had it: the server
    certificate, TLS 1.2+, Mosquitto's cipher preferences, and the CA in the handshake (OpenSSL
    builds the chain from the trust store, where Mosquitto's `cafile` put the CA; `microcot ca
    fetch` reads the CA from there). No client certificate is asked for."""
    ctx = server_ssl_context(files)
    ctx.set_ciphers(MOSQUITTO_CIPHERS)
    ctx.load_verify_locations(cafile=str(files.ca_cert))
    return ctx


class FrontError(RuntimeError):
    """The front could not start."""


class Front:
    """See the module docstring. `upstream()` gives Mosquitto's (host, port) at each connect."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 upstream: Callable[[], tuple[str, int]], bootstrap: BootstrapHub | None = None,
                 reserved: Iterable[str] = RESERVED_USERS, max_connections: int = 10000,
                 connect_timeout: float = 10.0, max_connect: int = 65536,
                 chunk: int = 65536) -> None:
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.upstream = upstream
        self.bootstrap = bootstrap
        self.reserved = frozenset(reserved)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.max_connect = max_connect
        self.chunk = chunk
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if not self._port:
            raise FrontError("the front has no port yet: start() it first")
        return self._port

    @property
    def connections(self) -> int:
        return len(self._clients)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on (host, port); OSError when the port is taken. The bootstrap hub's relay is
        connected first, so the first bootstrap CONNECT is served."""
        if self._loop is not None:
            return
        _raise_fd_limit(2 * self.max_connections + 1024)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._run, args=(loop, ready), name="emulator-front",
                                  daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        try:
            if self.bootstrap is not None:
                asyncio.run_coroutine_threadsafe(_call(self.bootstrap.start, loop), loop).result()
            self._server = asyncio.run_coroutine_threadsafe(self._listen(), loop).result()
        except BaseException:
            self.stop()
            raise
        sock = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])
        log.info("MQTT front on %s:%d (TLS %s)", self.host, self._port,
                 "on" if self.ssl_context else "off")

    def stop(self) -> None:
        """Close the port and every connection (bootstrap sessions are saved)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        self._server = None

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol] = lambda: _Client(self)  # noqa: E731
        if self.ssl_context is not None:  # not asyncio's TLS: see front_tls.py
            factory = TlsServer(self.ssl_context, lambda: _Client(self),
                                handshake_timeout=self.connect_timeout)
        return await loop.create_server(factory, self.host, self.requested_port or 0,
                                        reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.bootstrap is not None:
            self.bootstrap.stop()
        for c in list(self._clients):
            c.abort()
        if self._tasks:  # the bootstrap sessions see their connections end and detach
            await asyncio.wait(self._tasks, timeout=2)

    # -- after the CONNECT ---------------------------------------------------------------------------

    async def _route(self, c: _Client, first: int, body: bytes, raw: bytes) -> None:
        try:
            await self._converse(c, first, body, raw)
        except wire.WireError as e:
            log.info("MQTT front: %s broke the protocol: %s; closed", c.peer, e)
        except TimeoutError:
            log.info("MQTT front: %s missed its keep-alive; closed", c.peer)
        except _CLOSED:
            pass
        finally:
            if c.state != "join":
                c.close()

    async def _converse(self, c: _Client, first: int, body: bytes, raw: bytes) -> None:
        if first != 0x10:
            raise wire.WireError(f"packet 0x{first:02x} before CONNECT")
        try:
            connect = wire.parse_connect(body)
        except wire.UnsupportedLevel as e:
            log.info("MQTT front: %s: %s: CONNACK 1", c.peer, e)
            c.answer(wire.BAD_PROTOCOL)
            return
        code, route = self._admit(connect)
        if code != wire.ACCEPTED:
            log.info("MQTT front: %s (client id %r, user %r) refused: CONNACK %d, %s", c.peer,
                     connect.client_id[:64], (connect.user or "")[:64], code, route)
            c.answer(code)
        elif route == "bootstrap":
            assert self.bootstrap is not None
            await BootstrapConnection(self.bootstrap, c.to_reader(), c, connect).serve()
        else:
            await self._join(c, raw)

    def _admit(self, c: wire.Connect) -> tuple[int, str]:
        """(CONNACK code, route or reason)."""
        if c.will:
            return wire.NOT_AUTHORIZED, "a last will is not supported (seed 002)"
        if c.user is None:
            return wire.NOT_AUTHORIZED, "no user name"
        hub = self.bootstrap
        if hub is not None and c.user == hub.user:
            if not hub.password_ok(c.password):
                return wire.NOT_AUTHORIZED, "wrong bootstrap password"
            if not valid_device_id(c.client_id):
                return wire.ID_REJECTED, "the bootstrap client id must be a device ID"
            if not hub.available:
                return wire.UNAVAILABLE, "the broker is away"
            return wire.ACCEPTED, "bootstrap"
        if c.user in self.reserved:
            return wire.NOT_AUTHORIZED, "the emulator's own user"
        if c.client_id != c.user:
            return wire.NOT_AUTHORIZED, "a device connects with its own ID as client id"
        return wire.ACCEPTED, "device"

    async def _join(self, c: _Client, connect: bytes) -> None:
        """The device's CONNECT to Mosquitto, then every byte either way as it comes."""
        host, port = self.upstream()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(c), host, port), self.connect_timeout)
        except (OSError, TimeoutError) as e:
            log.warning("MQTT front: the broker at %s:%d cannot be reached (%s): CONNACK 3",
                        host, port, e)
            c.answer(wire.UNAVAILABLE)
            return
        transport.write(connect)
        c.join(transport)


class _Client(asyncio.Protocol):
    """One device's connection to the front.

    States: "connect" (gathering the CONNECT, under the deadline), "route" (deciding; reading
    paused), "join" (bytes go to Mosquitto's transport as they come, with back-pressure both
    ways), "bootstrap" (bytes go to a StreamReader that BootstrapConnection reads), "closed".
    """

    def __init__(self, front: Front) -> None:
        self.front = front
        self.state = "connect"
        self.peer = "?"
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.reader: asyncio.StreamReader | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _peer(transport)
        front = self.front
        if len(front._clients) >= front.max_connections:
            log.warning("MQTT front: %d connections, the limit: one more refused",
                        len(front._clients))
            self.state = "closed"
            transport.abort()
            return
        front._clients.add(self)
        self._deadline = asyncio.get_running_loop().call_later(front.connect_timeout,
                                                              self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.state == "join":
            assert self.upstream is not None
            self.upstream.write(data)
        elif self.state == "bootstrap":
            assert self.reader is not None
            self.reader.feed_data(data)
        elif self.state in ("connect", "route"):
            self.buf += data
            if self.state == "connect":
                self._gather()

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.feed_eof()
        else:
            self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.front._clients.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
        if self.reader is not None:
            self.reader.feed_eof()
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:  # the device reads slower than Mosquitto sends
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- the front's side --------------------------------------------------------------------------

    def _gather(self) -> None:
        try:
            pkt = wire.take_packet(self.buf, self.front.max_connect)
        except wire.WireError as e:
            log.info("MQTT front: %s broke the protocol: %s; closed", self.peer, e)
            self.abort()
            return
        if pkt is None:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self.state = "route"
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.front._route(self, *pkt))
        self.front._tasks.add(task)
        task.add_done_callback(self.front._tasks.discard)

    def _too_slow(self) -> None:
        if self.state == "connect":
            log.info("MQTT front: %s sent no whole CONNECT within %.0f s; closed", self.peer,
                     self.front.connect_timeout)
            self.abort()

    def join(self, upstream: asyncio.Transport) -> None:
        if self.state == "closed":
            upstream.close()
            return
        self.state, self.upstream = "join", upstream
        if self.buf:  # what the device sent after its CONNECT, before the join
            upstream.write(bytes(self.buf))
            self.buf.clear()
        assert self.transport is not None
        self.transport.resume_reading()

    def to_reader(self) -> asyncio.StreamReader:
        """Hand the connection to a bootstrap session: what comes from now on, and what came
        after the CONNECT, goes to a StreamReader."""
        self.reader = asyncio.StreamReader(limit=self.front.chunk)
        if self.buf:
            self.reader.feed_data(bytes(self.buf))
            self.buf.clear()
        if self.state == "closed":
            self.reader.feed_eof()
        else:
            self.state = "bootstrap"
            assert self.transport is not None
            self.transport.resume_reading()
        return self.reader

    # Link (front_bootstrap.py), and the answers of the front itself
    def send(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > 256 * 1024:  # a bootstrap client that reads nothing
            log.warning("MQTT front: %s reads nothing: closed", self.peer)
            t.abort()
            return
        t.write(data)

    def answer(self, code: int) -> None:
        self.send(wire.connack(code))
        self.close()

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def kick(self) -> None:
        self.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what is buffered was sent

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Upstream(asyncio.Protocol):
    """Mosquitto's side of a joined connection."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        t = self.client.transport
        if t is not None:
            t.write(data)

    def eof_received(self) -> bool:
        self.client.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def pause_writing(self) -> None:  # Mosquitto reads slower than the device sends
        t = self.client.transport
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None:
            t.resume_reading()


async def _call(fn: Callable[[asyncio.AbstractEventLoop], None],
                loop: asyncio.AbstractEventLoop) -> None:
    # the hub's start blocks until the relay is subscribed, while its callbacks need this loop
    await loop.run_in_executor(None, fn, loop)


def _raise_fd_limit(want: int) -> None:
    """Two descriptors per joined device (Mosquitto had one, in its own process): raise this
    process's soft limit towards `want`, as far as the hard limit allows (1024 is a common soft
    limit, about 500 devices)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _peer(transport: asyncio.BaseTransport) -> str:
    p = transport.get_extra_info("peername")
    return f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p)
