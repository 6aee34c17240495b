"""The emulator's REST API over HTTP(S): uvicorn serving webapp.py's Starlette application.

`with RestServer(api, "admin", pw) as srv: srv.url` serves until the block ends. Bound to
127.0.0.1 by default (a given port or a free one; a restart keeps the port). What a request may
be and how it is answered is webapp.py's; this module runs the server and owns the protocol.

Why a thread: the emulator is threads around blocking parts (Mosquitto's client, SQLite, the
connector's workers), and tests start and stop servers in-process. Each RestServer runs one
`uvicorn.Server` on its own event loop in a daemon thread, on a socket bound in `start()` (so a
taken port is an OSError there, as before, and the port is known at once); `stop()` sets the
server's exit flag and joins the thread: uvicorn stops listening, closes idle keep-alive
connections and lets running requests finish (at most `SHUTDOWN_GRACE` seconds; the web
console's live streams are ended first). No signal handlers are installed (uvicorn does so only
on the main thread). `app` is the Starlette application served (webapp.create_app).

TLS: with `tls` (an ssl.SSLContext for servers, see certs.server_ssl_context) the server speaks
HTTPS with that context (uvicorn's `ssl_context_factory`); `url` then starts with https://. The
emulator runs one plain and one TLS server over the same Api (service.py).

The protocol is uvicorn's h11 implementation with the emulator's limits and error shape: a
request line over 64 KiB is 414, a head over 64 KiB or with more than 100 header fields 431,
anything h11 refuses (a malformed request line, header or Content-Length) 400 (501 for a
transfer coding it does not know), each as Cumulocity-shaped JSON with `Connection: close`.
A connection idle for `idle_timeout` seconds, before its first request, between requests or
within a request's head, is closed. A client that breaks its connection or TLS session is
logged at DEBUG at most; a traceback in the log is always the emulator's own failure.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import jsonsafe
from .api import Api
from .webapp import (
    MAX_BODY,
    MULTIPART_SLACK,
    RestConfig,
    SmartRestHandler,
    close_console,
    create_app,
    error_body,
    parse_range,
    phrase,
)

__all__ = ["MAX_BODY", "MULTIPART_SLACK", "RestServer", "SmartRestHandler", "parse_range"]

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
MAX_HEAD = 64 << 10
MAX_HEADERS = 100
SHUTDOWN_GRACE = 3
_HEAD_END = (b"\r\n\r\n", b"\n\n")


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused the peer's bytes (for the answer)."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.refusal = e
            raise


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with the emulator's limits, idle timeout and JSON refusals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # larger than MAX_HEAD: our own check below answers first, with the right status
        self.conn = _Connection(h11.SERVER, MAX_HEAD + 1024)
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle()  # a client that connects and says nothing is not kept forever

    def _arm_idle(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        self.conn.receive_data(data)
        if self.conn.their_state is h11.IDLE:
            refusal = self._check_head(self.conn.trailing_data[0])
            if refusal is not None:
                self._refuse(*refusal)
                return
        self.handle_events()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete):
            self._arm_idle()  # within a request's head: idle for too long is the end

    @staticmethod
    def _check_head(buf: bytes) -> tuple[int, str] | None:
        """The refusal of a (partial) request head over our limits, if any."""
        line_end = buf.find(b"\n")
        if line_end < 0:
            if len(buf) > MAX_LINE:
                return 414, f"the request line is longer than {MAX_LINE} bytes"
            return None
        ends = [i for i in (buf.find(e) for e in _HEAD_END) if i >= 0]
        head_len = min(ends) if ends else len(buf)
        if line_end > MAX_LINE:
            return 414, f"the request line is longer than {MAX_LINE} bytes"
        if buf.count(b"\n", 0, head_len) > MAX_HEADERS + 1:
            return 431, f"the request has more than {MAX_HEADERS} header fields"
        if not ends and len(buf) > MAX_HEAD:
            return 431, f"the request head is longer than {MAX_HEAD} bytes"
        return None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what h11 refused, in our shape and with h11's status hint."""
        e = self.conn.refusal
        status = e.error_status_hint if e is not None else 400
        if status not in (400, 431, 501):
            status = 400
        self._refuse(status, f"malformed HTTP request: {e}" if e is not None else msg)

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        log.debug("emulator HTTP: refused a request from %s: %d %s", self.client, status,
                  message)
        body = jsonsafe.dumps(error_body(f"general/{phrase(status)}", message))
        head = (f"HTTP/1.1 {status} {phrase(status)}\r\n"
                "Content-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        # h11's state is past caring (ERROR, or a request it never parsed): the bytes directly
        self.transport.write(head + body)
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, telling its starter when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class RestServer:
    """`with RestServer(api, "admin", pw) as srv: srv.url` serves until the block ends."""

    def __init__(self, api: Api, admin_user: str, admin_password: str, port: int = 0,
                 host: str = "127.0.0.1", smartrest: SmartRestHandler | None = None,
                 max_body: int = MAX_BODY, device_users: bool = True,
                 idle_timeout: float = 30.0, set_base_url: bool = True,
                 tls: ssl.SSLContext | None = None,
                 on_device: Callable[[str], None] | None = None,
                 public_host: str | None = None) -> None:
        if not admin_user or not admin_password:
            raise ValueError("the REST API needs an admin user and password")
        if api.admin_user is None:
            api.admin_user = admin_user  # Api tells the admin from device users by this name
        elif api.admin_user != admin_user:
            raise ValueError(f"this Api serves the admin {api.admin_user!r} already")
        self.api = api
        self.admin_user = admin_user
        self.config = RestConfig(api, admin_user, admin_password.encode(), smartrest, max_body,
                                 device_users, on_device)
        self._host = host
        self._public_host = public_host or host  # the name clients use (the certificate's)
        self._port = port
        self._idle_timeout = idle_timeout
        self._set_base_url = set_base_url
        self.tls = tls
        self._server: _Server | None = None
        self._app: Starlette | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # the settings tests and the emulator change after construction live in the app's config
    @property
    def smartrest(self) -> SmartRestHandler | None:
        return self.config.smartrest

    @smartrest.setter
    def smartrest(self, handler: SmartRestHandler | None) -> None:
        self.config.smartrest = handler

    @property
    def on_device(self) -> Callable[[str], None] | None:
        return self.config.on_device

    @on_device.setter
    def on_device(self, hook: Callable[[str], None] | None) -> None:
        self.config.on_device = hook

    @property
    def app(self) -> Starlette | None:
        """The Starlette application being served (None before start); with the web console,
        `app.state.console` is the console's."""
        return self._app

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the REST server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self._public_host}]" if ":" in self._public_host else self._public_host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # proto given: asyncio sets TCP_NODELAY on accepted sockets only when it says TCP,
        # and without it a response's head and body meet Nagle and a delayed ACK (40 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart keeps it
            sock.bind((self._host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> None:
        if self._server is not None:
            return
        sock = self._bind()
        self._socket = sock
        self._port = self.port  # a restart keeps the port
        tls = self.tls
        self._app = create_app(self.config, tls=tls is not None)
        config = uvicorn.Config(
            self._app, http=_Protocol, loop="asyncio", lifespan="off",
            log_config=None, log_level=logging.WARNING, access_log=False,
            server_header=False, headers=[("Server", "microcot-emulator")],
            timeout_keep_alive=self._idle_timeout,  # type: ignore[arg-type]  # a float works
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            ssl_context_factory=(lambda _config, _default: tls) if tls is not None else None)
        server = _Server(config)
        self._server = server
        if self._set_base_url:
            self.api.base_url = self.url
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name=f"emulator-http-{self.port}", daemon=True)
        self._thread.start()
        while not server.ready.wait(0.05):
            if not self._thread.is_alive():
                self._server = self._socket = None
                sock.close()
                raise RuntimeError("the REST server did not start; see the log")

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._app is not None:
            close_console(self._app)  # its live streams would hold the shutdown
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_GRACE + 5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()  # uvicorn closed it; harmless again
            self._socket = None

    def __enter__(self) -> RestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authenticate(self, header: str | None) -> str | None:
        """The user of a Basic Authorization header, or None if it does not check out."""
        found = self.config.authenticate(header)
        if isinstance(found, tuple):
            return found[0]
        return self.config.check_device(header, notify=False) if found is True else None
