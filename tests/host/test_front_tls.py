"""The MQTT front's TLS layer (emulator/front_tls.py): SSLObject over memory BIOs behind an
asyncio.Transport, with what asyncio's own TLS gave the front kept.

- handshakes: one not begun or stalled halfway is aborted after the handshake timeout; garbage
  instead of a ClientHello, and a reset halfway, end the connection at once; the application
  protocol never hears of any of them, and the server keeps serving;
- data: megabytes both ways byte for byte, handed over in pieces of at most one socket read;
  records that arrive together are all handed over at once;
- back-pressure: a peer that reads nothing pauses the application's writing (resumed once it
  reads); an application that pauses reading stops the socket, so a flooding peer blocks and the
  memory held is bounded, and everything arrives once it resumes;
- ends: close() sends close_notify (the client sees a clean TLS end, not a truncation) after what
  was written, drops later writes, and waits for the peer's close_notify, dropping what comes
  before it; the peer's close_notify or TCP EOF gives eof_received,
  then the connection closes; abort() and a reset after the handshake give connection_lost;
- the front itself (Front with TLS, a stub broker that echoes): a 2 MB message through a joined
  connection and back, byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from emulator_fixtures import QUIET, WAIT, wait_for

from microcot_host.emulator.certs import TlsFiles, client_ssl_context, ensure_ca_and_server
from microcot_host.emulator.front import Front, server_context
from microcot_host.emulator.front_tls import SCRATCH, TlsProtocol, TlsServer

SEED = 13


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_ca_and_server(tmp_path_factory.mktemp("front-tls"))


class Loop:
    """An asyncio event loop in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):  # noqa: ANN001, ANN201 - any coroutine, its result
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def call(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class App(asyncio.Protocol):
    """The application protocol: records what it is told, does what the test configured."""

    def __init__(self, echo: bool = False, pause_at_start: bool = False) -> None:
        self.echo = echo
        self.pause_at_start = pause_at_start
        self.events: list[str] = []
        self.chunks: list[int] = []
        self.digest = hashlib.sha256()
        self.received = 0
        self.transport: asyncio.Transport | None = None
        self.writing_paused = False
        self.flood_left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")
        if self.pause_at_start:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.chunks.append(len(data))
        self.received += len(data)
        self.digest.update(data)
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost" if exc is None else "lost:" + type(exc).__name__)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.writing_paused = False
        self.flood()

    def flood(self) -> None:
        """Write pattern() until the transport says pause or flood_left is spent."""
        assert self.transport is not None
        while self.flood_left and not self.writing_paused:
            n = min(RECORD_PIECE, self.flood_left)
            self.transport.write(PATTERN[:n])
            self.flood_left -= n


RECORD_PIECE = 16 * 1024
PATTERN = bytes(range(256)) * (RECORD_PIECE // 256)


class Server:
    """A TlsServer on 127.0.0.1 with App protocols; every TlsProtocol and App it made is kept."""

    def __init__(self, files: TlsFiles, app: Callable[[], App], handshake_timeout: float = 60.0,
                 shutdown_timeout: float = 30.0) -> None:
        self.loop = Loop()
        self.apps: list[App] = []
        self.conns: list[TlsProtocol] = []

        def make_app() -> App:
            a = app()
            self.apps.append(a)
            return a

        tls = TlsServer(server_context(files), make_app, handshake_timeout, shutdown_timeout)

        def make_conn() -> TlsProtocol:
            c = tls()
            self.conns.append(c)
            return c

        async def listen() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(make_conn, "127.0.0.1", 0)

        self.server = self.loop.run(listen())
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.ca = files.ca_cert

    def tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)

    def tls(self) -> ssl.SSLSocket:
        """A client that tells close_notify from a bare TCP end (suppress_ragged_eofs off)."""
        ctx = client_ssl_context(self.ca)
        return ctx.wrap_socket(self.tcp(), server_hostname="localhost",
                               suppress_ragged_eofs=False)

    def close(self) -> None:
        self.loop.call(self.server.close)  # on its loop: asyncio.Server is not thread-safe
        self.loop.close()


@pytest.fixture
def server(tls_files: TlsFiles) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(app: Callable[[], App] = App, **kw: float) -> Server:
        s = Server(tls_files, app, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def client_hello(ca: Path) -> bytes:
    """The first flight of a real client (an SSLObject with memory BIOs, nothing sent)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ssl_context(ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def ends(sock: socket.socket) -> bytes:
    """What the server still sends until it closes (b"" or an alert); raises on WAIT."""
    out = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def exchange(port: int, ca: Path, payload: bytes, expect: int) -> bytes:
    """Send payload while reading `expect` bytes, over TLS, on one thread (asyncio's client):
    an SSLSocket read on one thread while another writes is one OpenSSL object used by two
    threads at once, which OpenSSL does not support (it failed here, now and then)."""

    async def run() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(ca),
                                             server_hostname="localhost")
        w.write(payload)
        got = await asyncio.wait_for(r.readexactly(expect), WAIT)
        w.close()
        await w.wait_closed()
        return got

    return asyncio.run(run())


def still_serves(srv: Server) -> None:
    with srv.tls() as t:
        t.sendall(b"ping")
        assert t.recv(4) == b"ping"


# -- handshakes -----------------------------------------------------------------------------------

def test_a_handshake_not_begun_or_stalled_halfway_is_aborted_after_the_timeout(server, tls_files):
    srv = server(lambda: App(echo=True), handshake_timeout=0.5)
    hello = client_hello(tls_files.ca_cert)
    with srv.tcp() as silent, srv.tcp() as half:
        half.sendall(hello[:len(hello) // 2])
        assert ends(silent) == b""
        assert ends(half) == b""
    assert srv.apps == []  # the application never heard of them
    wait_for(lambda: len(srv.conns) == 2 and all(c.state == "closed" for c in srv.conns))


def test_garbage_instead_of_a_client_hello_ends_the_connection(server):
    srv = server(lambda: App(echo=True))  # a handshake timeout of 60 s: not what ends it here
    for garbage in (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x00",  # MQTT without TLS
                    random.Random(SEED).randbytes(3000)):
        with srv.tcp() as s:
            s.sendall(garbage)
            rest = ends(s)
            assert rest == b"" or rest[0] == 0x15  # nothing, or a TLS alert saying why
    assert srv.apps == []
    wait_for(lambda: all(c.state == "closed" for c in srv.conns))
    still_serves(srv)


def test_a_reset_during_the_handshake_or_after_it(server, tls_files):
    srv = server(lambda: App(echo=True))
    hello = client_hello(tls_files.ca_cert)
    s = srv.tcp()
    s.sendall(hello[:40])
    wait_for(lambda: len(srv.conns) == 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, with the handshake half done and its timeout 60 s away
    wait_for(lambda: srv.conns[0].state == "closed")
    assert srv.apps == []

    t = srv.tls()
    t.sendall(b"x")
    assert t.recv(1) == b"x"
    t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t.close()
    wait_for(lambda: srv.apps[0].events[-1].startswith("lost"))
    assert srv.apps[0].events[-1] == "lost:ConnectionResetError"
    still_serves(srv)


def test_peer_address_tls_details_and_write_buffer_limits(server):
    srv = server()
    with srv.tls() as t:
        wait_for(lambda: srv.apps and srv.apps[0].transport is not None)
        tr = srv.apps[0].transport
        assert tr.get_extra_info("peername") == t.getsockname()
        assert tr.get_extra_info("cipher")[0] == t.cipher()[0]
        assert isinstance(tr.get_extra_info("ssl_object"), ssl.SSLObject)
        assert tr.get_extra_info("no such thing", "dflt") == "dflt"
        assert not tr.can_write_eof()

        async def limits() -> tuple[int, int]:
            tr.set_write_buffer_limits(high=4096, low=1024)  # the socket transport's
            return tr.get_write_buffer_limits()

        assert srv.loop.run(limits()) == (1024, 4096)


# -- data ------------------------------------------------------------------------------------------

def test_megabytes_both_ways_byte_for_byte(server):
    srv = server(lambda: App(echo=True))
    data = random.Random(SEED).randbytes(3_000_000)
    assert exchange(srv.port, srv.ca, data, len(data)) == data  # the echo read while sending
    app = srv.apps[0]
    assert app.digest.digest() == hashlib.sha256(data).digest()
    assert max(app.chunks) <= SCRATCH  # handed over a socket read at a time, not gathered


def test_records_that_arrive_in_one_read_are_all_handed_over(server, tls_files):
    """Several TLS records in one TCP segment: every one is decrypted at once (the read loop
    stops on an empty BIO, so a record left inside OpenSSL would wait for the next segment)."""
    srv = server(lambda: App(echo=True))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ssl_context(tls_files.ca_cert).wrap_bio(incoming, outgoing,
                                                         server_hostname="localhost")
    with srv.tcp() as s:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                incoming.write(s.recv(65536))
        # first with the client's Finished in the same segment, then alone
        for words in ([b"one", b"two"], [b"three", b"four" * 5000, b"five"]):
            for w in words:
                obj.write(w)  # a record each (20,000 bytes are two)
            s.sendall(outgoing.read())
            got = b""
            while len(got) < len(b"".join(words)):
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    incoming.write(s.recv(65536))
            assert got == b"".join(words)


# -- back-pressure ---------------------------------------------------------------------------------

def test_a_peer_that_reads_nothing_pauses_the_writer_until_it_reads(server):
    srv = server()
    total = 16 * 1024 * 1024
    with srv.tls() as t:
        t.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # so that 16 MB cannot fit
        wait_for(lambda: srv.apps and srv.apps[0].transport is not None)
        app = srv.apps[0]

        def start() -> None:
            app.flood_left = total
            app.flood()

        srv.loop.call(start)
        wait_for(lambda: app.writing_paused)
        assert app.flood_left > 0  # it stopped: the socket and the transport hold the rest
        assert app.transport.get_write_buffer_size() <= 2 * 65536 + RECORD_PIECE
        got = 0
        digest, expected = hashlib.sha256(), hashlib.sha256()
        while got < total:
            chunk = t.recv(1 << 20)
            assert chunk
            got += len(chunk)
            digest.update(chunk)
    for _ in range(total // len(PATTERN)):
        expected.update(PATTERN)
    assert digest.digest() == expected.digest()
    assert "resume_writing" in app.events
    assert app.flood_left == 0


def test_a_paused_reader_stops_the_socket_and_gets_everything_on_resume(server):
    srv = server(lambda: App(pause_at_start=True))
    data = random.Random(SEED).randbytes(16 * 1024 * 1024)
    with srv.tls() as t:
        wait_for(lambda: srv.apps)
        app, conn = srv.apps[0], srv.conns[0]
        # a small receive buffer on the server's socket, so that the kernel cannot take 16 MB
        # (Linux grows it up to net.ipv4.tcp_rmem's maximum otherwise, often 6-32 MB)
        assert conn.sock is not None
        conn.sock.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      65536)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sender = threading.Thread(target=t.sendall, args=(data,), daemon=True)
        sender.start()
        sender.join(QUIET)
        assert sender.is_alive()  # blocked: the front reads nothing while paused
        assert app.received == 0
        assert conn.incoming.pending <= SCRATCH  # what is held while paused is bounded
        srv.loop.call(lambda: app.transport.resume_reading())
        sender.join(WAIT)
        assert not sender.is_alive()
        wait_for(lambda: app.received == len(data))
    assert app.digest.digest() == hashlib.sha256(data).digest()


# -- ends ------------------------------------------------------------------------------------------

def test_close_sends_close_notify_after_what_was_written_and_drops_later_writes(server):
    srv = server()
    with srv.tls() as t:
        wait_for(lambda: srv.apps and srv.apps[0].transport is not None)
        app = srv.apps[0]

        def bye() -> None:
            assert app.transport is not None
            app.transport.write(b"bye")
            app.transport.close()
            app.transport.write(b"late")  # dropped, as asyncio's TLS transport does
            app.events.append(f"closing={app.transport.is_closing()}")

        srv.loop.call(bye)
        got = b""
        while True:
            chunk = t.recv(100)  # a truncated stream would raise SSLEOFError here
            if not chunk:
                break
            got += chunk
        assert got == b"bye"
        wait_for(lambda: len(app.events) > 1)  # bye() has returned on the loop's thread
        assert app.events == ["made", "closing=True"]  # it waits for our close_notify
        t.sendall(b"said before it saw the close_notify")  # read and dropped by the server
        t.unwrap()  # ours: the server can close now
        wait_for(lambda: app.events[-1] == "lost")
    assert app.received == 0


@pytest.mark.parametrize("how", ["close_notify", "tcp_eof"])
def test_the_peer_ends_eof_received_then_the_connection_closes(server, how):
    srv = server()
    t = srv.tls()
    try:
        t.sendall(b"last words")
        if how == "close_notify":
            raw = t.unwrap()  # returns once the server answered with its close_notify
            assert raw.recv(10) == b""  # then it closed the TCP connection
        else:
            socket.socket.shutdown(t, socket.SHUT_WR)  # TCP FIN, no close_notify
            assert t.recv(10) == b""  # the server answers with close_notify all the same
        wait_for(lambda: srv.apps and srv.apps[0].events[-1] == "lost")
        assert srv.apps[0].events == ["made", "data", "eof", "lost"]
        assert srv.apps[0].received == len(b"last words")
    finally:
        t.close()


def test_abort_ends_at_once(server):
    srv = server()
    with srv.tls() as t:
        wait_for(lambda: srv.apps and srv.apps[0].transport is not None)
        app = srv.apps[0]
        srv.loop.call(lambda: app.transport.abort())
        with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
            t.recv(10)  # no close_notify
        wait_for(lambda: app.events[-1] == "lost")


# -- the front ---------------------------------------------------------------------------------------

def test_a_large_message_through_a_joined_connection_both_ways(tls_files):
    """Front with TLS before a stub broker that echoes every byte (CONNECT included)."""
    loop = Loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    async def listen() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)

    stub = loop.run(listen())
    stub_port = int(stub.sockets[0].getsockname()[1])
    front = Front("127.0.0.1", 0, server_context(tls_files), lambda: ("127.0.0.1", stub_port))
    front.start()
    try:
        dev = "AABBCCDDEE13"
        body = (struct.pack(">H", 4) + b"MQTT" + bytes([4, 0xC2]) + struct.pack(">H", 30)
                + b"".join(struct.pack(">H", len(s)) + s for s in (dev.encode(),) * 2 + (b"pw",)))
        connect = bytes([0x10, len(body)]) + body
        data = connect + random.Random(SEED).randbytes(2_000_000)
        assert exchange(front.port, tls_files.ca_cert, data, len(data)) == data
    finally:
        front.stop()
        loop.call(stub.close)
        loop.close()
