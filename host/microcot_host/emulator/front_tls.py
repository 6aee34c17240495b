"""TLS for the emulator's MQTT front (front.py), terminated with the ssl module's memory BIOs.

Why not asyncio's own TLS (`loop.create_server(ssl=...)`): Python 3.11's `SSLProtocol` allocates
and zero-fills a 256 KiB read buffer per connection in its constructor (asyncio/sslproto.py,
`max_size`), so every connected device cost the front ~290 KB of RSS: 349 MB at 1,000 devices,
1.45 GB at 5,000. Here a connection is a plain TCP protocol holding an `ssl.SSLObject` over two
`ssl.MemoryBIO`s (`SSLContext.wrap_bio`, the public API asyncio uses itself); the buffers that
ciphertext and plaintext pass through are two scratch buffers per listening socket, shared by all
its connections. Sharing them is safe because the event loop runs one callback at a time and
every callback copies out of them (into the BIO, into the bytes handed to the application) before
it returns.

    TlsServer     the protocol factory for `loop.create_server` (plain TCP): the context, the
                  timeouts, the application protocol's factory, the scratch buffers
    TlsProtocol   one TCP connection: the socket transport's BufferedProtocol, and the TLS state
    TlsTransport  what the application protocol sees once the handshake is done: an
                  asyncio.Transport

What the application sees is what asyncio's TLS gave it, for everything the front uses:

- connection_made only after a completed handshake; a handshake not done within
  `handshake_timeout`, failing (a client that sends something else than a ClientHello, a
  version or cipher it cannot agree on), or cut by the peer (EOF, reset) aborts the TCP
  connection, and the application never hears of it.
- data_received with what one TCP read decrypted (one bytes, read out of OpenSSL one TLS record,
  16 KiB, at a time); pause_reading()/resume_reading() pause and resume the socket, and what the
  incoming BIO still holds is handed over on resume.
- write() encrypts at once (a memory BIO is never full) and hands the records to the socket
  transport, whose buffer is the write buffer: set_write_buffer_limits(), get_write_buffer_size()
  and the application's pause_writing()/resume_writing() are the socket transport's.
- The peer's close_notify, or a TCP EOF: what was still decrypted is delivered, then
  eof_received(), then the connection closes as with close() (TLS has no half-close; asyncio
  ignores eof_received's answer with TLS too).
- close(): writes after it are dropped; close_notify is sent after what was written, then the
  connection waits for the peer's close_notify (or EOF) at most `shutdown_timeout`, reading and
  dropping whatever else comes, before the socket is closed. Closing at once would let the
  kernel answer data still arriving with a reset, which can destroy the last records (a CONNACK
  refusing the device) in the peer's receive queue before it read them. abort(): at once.
- connection_lost(exc) once the socket is gone, if connection_made was called.
- get_extra_info(): the socket's (peername, socket, ...) and "ssl_object", "cipher",
  "peercert", "sslcontext".
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Literal

log = logging.getLogger(__name__)

RECORD = 16 * 1024         # the largest plaintext of one TLS record (RFC 8446 5.1, RFC 5246 6.2.1)
SCRATCH = 4 * RECORD       # the shared buffers: one socket read; the plaintext of one read
WRITE_PIECE = 4 * RECORD   # write() encrypts this much at a time: the outgoing BIO's memory grows
                           # to its largest write and keeps it, a large message must not stay

State = Literal["handshake", "open", "closing", "closed"]


class TlsServer:
    """The protocol factory for `loop.create_server(server, host, port)` with no `ssl=`."""

    def __init__(self, context: ssl.SSLContext, app_factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float = 10.0, shutdown_timeout: float = 30.0) -> None:
        self.context = context
        self.app_factory = app_factory
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.received = memoryview(bytearray(SCRATCH))  # ciphertext, recv_into() here
        self.plain = memoryview(bytearray(SCRATCH))     # plaintext, SSLObject.read() here

    def __call__(self) -> TlsProtocol:
        return TlsProtocol(self)


class TlsProtocol(asyncio.BufferedProtocol):
    """One TCP connection; see the module docstring. The `app_*` methods are TlsTransport's."""

    __slots__ = ("server", "tls", "incoming", "outgoing", "sock", "app", "transport", "state",
                 "_timer", "_reading_paused", "_writing_paused", "_tcp_eof", "_close_notify",
                 "_told_eof")

    def __init__(self, server: TlsServer) -> None:
        self.server = server
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = server.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.sock: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.transport: TlsTransport | None = None
        self.state: State = "handshake"
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False  # by the application
        self._writing_paused = False  # the application was told to pause writing
        self._tcp_eof = False         # the peer shut down its side of the TCP connection
        self._close_notify = False    # the peer's close_notify was read
        self._told_eof = False        # the application had its eof_received()

    # -- the socket transport's protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.sock = transport
        self._timer = asyncio.get_running_loop().call_later(self.server.handshake_timeout,
                                                            self._handshake_too_slow)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.received

    def buffer_updated(self, nbytes: int) -> None:
        self.incoming.write(self.server.received[:nbytes])
        if self.state == "handshake":
            self._handshake()
        elif self.state == "open":
            self._read()
        elif self.state == "closing":
            self._await_close_notify()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self.state == "handshake":
            log.info("TLS: %s closed its connection during the handshake", self.peer)
            self.app_abort()
        elif self.state == "open":
            self._read()  # what is left, then the application's eof_received, then close
        elif self.state == "closing":
            self._closed(gracefully=True)  # no close_notify can come any more
        return True  # the socket stays open until this class closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self._cancel_timer()
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:  # the socket's write buffer is over its high-water mark
        if self.app is not None and not self._writing_paused:
            self._writing_paused = True
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None and self._writing_paused:
            self._writing_paused = False
            self.app.resume_writing()

    # -- handshake --------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()  # the server's flight, if this step made one
            return
        except ssl.SSLError as e:
            log.info("TLS: handshake with %s failed: %s", self.peer, e.reason or e)
            self._flush()  # OpenSSL's alert, which tells the peer why
            self._closed(gracefully=True)
            return
        self._cancel_timer()
        self.state = "open"
        self._flush()  # the last flight, TLS 1.3 session tickets
        self.transport = TlsTransport(self)
        self.app = self.server.app_factory()
        self.app.connection_made(self.transport)
        self._read()  # application data that came with the client's Finished

    def _handshake_too_slow(self) -> None:
        if self.state == "handshake":
            log.info("TLS: no handshake with %s within %.0f s; closed", self.peer,
                     self.server.handshake_timeout)
            self.app_abort()

    # -- reading ---------------------------------------------------------------------------------------

    def _read(self) -> None:
        """Hand the application what the incoming BIO holds, then the peer's end if it came."""
        while self.state == "open" and not self._reading_paused:
            n, more = self._decrypt()
            if n:
                assert self.app is not None
                self.app.data_received(bytes(self.server.plain[:n]))
            if not more:
                break
        if (self.state == "open" and not self._reading_paused
                and (self._tcp_eof or self._close_notify)):
            self._end_of_input()

    def _decrypt(self) -> tuple[int, bool]:
        """Plaintext into the shared buffer, a record at a time: (bytes, whether more may wait)."""
        buf, n = self.server.plain, 0
        incoming, tls = self.incoming, self.tls
        try:
            # ends when the BIO is empty rather than at SSLWantReadError, which costs ~3 us a
            # message: OpenSSL reads no more from the BIO than the record it decrypts (Python
            # leaves read-ahead off), and a record is never larger than what is asked for here
            while n < len(buf) and (incoming.pending or tls.pending()):
                got = tls.read(min(RECORD, len(buf) - n), buf[n:])
                if not got:  # the peer's close_notify
                    self._close_notify = True
                    break
                n += got
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify, should OpenSSL say it this way
            self._close_notify = True
        except ssl.SSLError as e:
            log.info("TLS: %s sent what is not TLS: %s; closed", self.peer, e.reason or e)
            self.app_abort()
            return 0, False
        self._flush()  # reading can make records to send (a TLS 1.3 KeyUpdate's answer)
        return n, n == len(buf)

    def _end_of_input(self) -> None:
        if self._told_eof:
            return
        self._told_eof = True
        assert self.app is not None
        self.app.eof_received()
        self.app_close()

    # -- closing ---------------------------------------------------------------------------------------

    def _await_close_notify(self) -> None:
        # after our close_notify: the peer's. What else comes is read and dropped (the
        # application closed); SSLObject.unwrap() would fail on it ("application data after
        # close notify") and leave only an abort, whose reset can destroy our last records
        incoming, tls, buf = self.incoming, self.tls, self.server.plain
        try:
            while incoming.pending or tls.pending():
                if not tls.read(RECORD, buf):
                    break
            else:
                return  # the BIO is empty: the close_notify is still to come
        except ssl.SSLWantReadError:
            return
        except ssl.SSLZeroReturnError:
            pass  # the close_notify
        except ssl.SSLError:
            self.app_abort()
            return
        self._closed(gracefully=True)

    def _closed(self, gracefully: bool) -> None:
        self.state = "closed"
        self._cancel_timer()
        if self.sock is not None:
            if gracefully:
                self.sock.close()  # after what its buffer holds
            else:
                self.sock.abort()

    def _shutdown_too_slow(self) -> None:
        if self.state == "closing":
            self.app_abort()

    # -- TlsTransport's side ---------------------------------------------------------------------------

    def app_write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != "open" or not data:
            return  # after close(), as asyncio's TLS transport: dropped
        try:
            if len(data) <= WRITE_PIECE:
                self.tls.write(data)
            else:
                view = memoryview(data)
                for i in range(0, len(view), WRITE_PIECE):
                    self.tls.write(view[i:i + WRITE_PIECE])
                    self._flush()
            self._flush()
        except ssl.SSLError as e:
            log.info("TLS: writing to %s failed: %s; closed", self.peer, e.reason or e)
            self.app_abort()

    def app_close(self) -> None:
        if self.state == "handshake":
            self.app_abort()
        if self.state != "open":
            return
        self.state = "closing"
        try:
            self.tls.unwrap()  # our close_notify, after what was written
        except ssl.SSLWantReadError:
            pass  # sent; the peer's has not come yet
        except ssl.SSLError:
            self.app_abort()
            return
        else:
            self._close_notify = True
        self._flush()
        if self._close_notify or self._tcp_eof:
            self._closed(gracefully=True)
            return
        assert self.sock is not None
        self.sock.resume_reading()  # the peer's close_notify is to be read
        self._timer = asyncio.get_running_loop().call_later(self.server.shutdown_timeout,
                                                            self._shutdown_too_slow)
        if self.incoming.pending:
            self._await_close_notify()

    def app_abort(self) -> None:
        self._closed(gracefully=False)

    def app_pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self.state == "open" and self.sock is not None:
                self.sock.pause_reading()

    def app_resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self.state == "open" and self.sock is not None:
            self.sock.resume_reading()
            # what the BIO holds, from a callback of its own: the caller may be another
            # connection's protocol, in the middle of its own callback
            asyncio.get_running_loop().call_soon(self._read)

    def write_buffer_size(self) -> int:
        size = self.outgoing.pending
        if self.sock is not None:
            size += self.sock.get_write_buffer_size()
        return size

    def extra(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self.tls
        if name == "sslcontext":
            return self.server.context
        if name == "cipher":
            return self.tls.cipher()
        if name == "peercert":
            return self.tls.getpeercert()
        return default if self.sock is None else self.sock.get_extra_info(name, default)

    # -- helpers ---------------------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        p = None if self.sock is None else self.sock.get_extra_info("peername")
        return f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p)

    def _flush(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            if self.sock is not None and not self.sock.is_closing():
                self.sock.write(data)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TlsTransport(asyncio.Transport):
    """The application's transport over one TlsProtocol (see the module docstring)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: TlsProtocol) -> None:
        super().__init__()
        self._conn = conn

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._conn.extra(name, default)

    def is_closing(self) -> bool:
        return self._conn.state != "open"

    def close(self) -> None:
        self._conn.app_close()

    def abort(self) -> None:
        self._conn.app_abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.app_write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._conn.app_write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS 1.2 has no half-close; close_notify ends both directions

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def is_reading(self) -> bool:
        return self._conn.state == "open" and not self._conn._reading_paused

    def pause_reading(self) -> None:
        self._conn.app_pause_reading()

    def resume_reading(self) -> None:
        self._conn.app_resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._conn.sock is not None:
            self._conn.sock.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        sock = self._conn.sock
        return (0, 0) if sock is None else sock.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        return self._conn.write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._conn.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._conn.app is not None
        return self._conn.app
