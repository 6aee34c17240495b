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
the CONNECT within `connect_timeout` each, a CONNECT of at most `max_connect` bytes; a joined
connection copies through asyncio streams with back-pressure (at most `chunk` bytes read at a
time, drained before the next read), so a slow reader stalls only its own writer.

Everything runs on one asyncio event loop in a thread of its own (start()/stop() from any other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Iterable

from . import front_wire as wire
from .broker import RESERVED_USERS, valid_device_id
from .certs import TlsFiles, server_ssl_context
from .front_bootstrap import BootstrapConnection, BootstrapHub

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
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if not self._port:
            raise FrontError("the front has no port yet: start() it first")
        return self._port

    @property
    def connections(self) -> int:
        return len(self._writers)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on (host, port); OSError when the port is taken. The bootstrap hub's relay is
        connected first, so the first bootstrap CONNECT is served."""
        if self._loop is not None:
            return
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
        return await asyncio.start_server(
            self._serve, self.host, self.requested_port or 0, ssl=self.ssl_context,
            ssl_handshake_timeout=self.connect_timeout if self.ssl_context else None,
            limit=self.chunk, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.bootstrap is not None:
            self.bootstrap.stop()
        for w in list(self._writers):
            w.transport.abort()
        for _ in range(100):  # let the handlers see their connections end
            if not self._writers:
                break
            await asyncio.sleep(0.01)

    # -- one connection -----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            log.warning("MQTT front: %d connections, the limit: one more refused",
                        len(self._writers))
            writer.transport.abort()
            return
        self._writers.add(writer)
        peer = _peer(writer)
        try:
            await self._converse(reader, writer, peer)
        except wire.WireError as e:
            log.info("MQTT front: %s broke the protocol: %s; closed", peer, e)
        except TimeoutError:
            log.info("MQTT front: %s sent no whole CONNECT within %.0f s (or missed its "
                     "keep-alive); closed", peer, self.connect_timeout)
        except _CLOSED:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        peer: str) -> None:
        first, body, raw = await asyncio.wait_for(wire.read_packet(reader, self.max_connect),
                                                  self.connect_timeout)
        if first != 0x10:
            raise wire.WireError(f"packet 0x{first:02x} before CONNECT")
        try:
            c = wire.parse_connect(body)
        except wire.UnsupportedLevel as e:
            log.info("MQTT front: %s: %s: CONNACK 1", peer, e)
            await _answer(writer, wire.BAD_PROTOCOL)
            return
        code, route = self._admit(c)
        if code != wire.ACCEPTED:
            log.info("MQTT front: %s (client id %r, user %r) refused: CONNACK %d, %s", peer,
                     c.client_id[:64], (c.user or "")[:64], code, route)
            await _answer(writer, code)
        elif route == "bootstrap":
            assert self.bootstrap is not None
            await BootstrapConnection(self.bootstrap, reader, writer, c).serve()
        else:
            await self._join(reader, writer, raw)

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

    async def _join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    connect: bytes) -> None:
        """The device's CONNECT to Mosquitto, then both directions copied until one ends."""
        host, port = self.upstream()
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=self.chunk), self.connect_timeout)
        except (OSError, TimeoutError) as e:
            log.warning("MQTT front: the broker at %s:%d cannot be reached (%s): CONNACK 3",
                        host, port, e)
            await _answer(writer, wire.UNAVAILABLE)
            return
        try:
            up_writer.write(connect)
            tasks = {asyncio.create_task(self._copy(reader, up_writer)),
                     asyncio.create_task(self._copy(up_reader, writer))}
            try:
                _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            up_writer.transport.abort()

    async def _copy(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(*_CLOSED):
            while True:
                data = await src.read(self.chunk)
                if not data:
                    return
                dst.write(data)
                await dst.drain()


async def _answer(writer: asyncio.StreamWriter, code: int) -> None:
    writer.write(wire.connack(code))
    with contextlib.suppress(*_CLOSED):
        await writer.drain()


async def _call(fn: Callable[[asyncio.AbstractEventLoop], None],
                loop: asyncio.AbstractEventLoop) -> None:
    # the hub's start blocks until the relay is subscribed, while its callbacks need this loop
    await loop.run_in_executor(None, fn, loop)


def _peer(writer: asyncio.StreamWriter) -> str:
    p = writer.get_extra_info("peername")
    return f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p)
