"""The emulator's REST API over HTTP: a threaded standard-library server in front of `Api.handle`.

Bound to 127.0.0.1 (a given port or a free one). Every request needs HTTP Basic auth: the admin
user given at construction, optionally written `<tenant>/<user>` as Cumulocity allows, or (unless
`device_users=False`) a device whose credentials the platform issued (bootstrap or bulk
registration), checked against the recorded hash; the user name reaches `Api.handle`, which
fences device users in (authz.py) and takes the admin by its name: the server gives the Api its
`admin_user` (one admin per Api). Anything else gets 401 with `WWW-Authenticate`.

Bodies are JSON (`application/json` or Cumulocity's `application/vnd.com.nsn.cumulocity.*+json`;
Api answers 415 for other types), CSV or multipart for the bulk registration, at most `max_body`
bytes (1 MiB; larger: 413, after reading and dropping the body up to 64 MiB so that the client
sees the answer, and the connection is closed; a client sending `Expect: 100-continue` gets the 413
before it sends). `POST /s` goes to the
SmartREST engine's callable `smartrest(body, x_id, user) -> (status, body)` with the `X-Id`
header (None if absent); without one it is 501.

Binaries: the body of `POST /inventory/binaries`, `PUT /inventory/binaries/{id}` and of POST/PUT
`/event/events/{id}/binaries` (an event's attachment) is not held in memory but streamed to a file in the API's binary store (binaries.py) and handed to Api as its
Path; its limit is the store's `max_size` plus 64 KiB for the multipart framing (413 otherwise,
with the same draining and `Expect: 100-continue` handling). `GET /inventory/binaries/{id}`
(and an event's attachment) streams the file with `Content-Length`, `Content-Type`, `ETag`, `Accept-Ranges: bytes` and
`Content-Disposition`; a single `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` gets 206 with
`Content-Range`, a range that starts at or after the end 416 with `Content-Range: bytes */<size>`,
several ranges or a malformed header the whole file (200, as RFC 9110 allows); `If-Range` with
another ETag gets the whole file too, so a resumed download never mixes two versions. HEAD
answers any GET without the body.

TLS: with `tls` (an ssl.SSLContext for servers, see certs.server_ssl_context) the server speaks
HTTPS; the handshake runs on the connection's own thread (a slow client holds up nobody) within
`idle_timeout`. `url` then starts with https://. The emulator runs one plain and one TLS server
over the same Api (service.py).

`on_device(user)` is called (on the request's thread, before it is handled) for every request
authenticated with device credentials: the emulator counts it as a message of the device
(availability.py).

Keep-alive (HTTP/1.1) works; idle connections are closed after `idle_timeout` seconds, and all
of them by stop(). Request
lines are logged at DEBUG; headers (and so credentials) never are.

Every error is Cumulocity-shaped JSON (`{"error", "message", "info"}`), the standard library's
own refusals too (a malformed request line 400, one over 64 KiB 414, over 100 headers 431, an
unknown method 501); answers are strict JSON (jsonsafe.dumps: an old database's NaN goes out as
null). A client that breaks its connection or TLS session is logged at DEBUG, without a
traceback; a traceback in the log is always the emulator's own failure.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http.server
import logging
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from . import jsonsafe
from .api import ERROR_INFO, Api, ApiResult, BinaryContent

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
DRAIN_LIMIT = 64 << 20  # larger refused bodies are not read: the connection is closed
MULTIPART_SLACK = 64 << 10  # room for the object part and the framing of a binary upload
CHUNK = 1 << 16
SmartRestHandler = Callable[[bytes, str | None, str], tuple[int, bytes]]
_BINARY_UPLOAD = re.compile(r"^/(inventory/binaries(/[^/]+)?|event/events/[^/]+/binaries)$")
# ASCII digits, at most 18 (a 64-bit offset): longer is malformed (the whole file), not an
# error deep in int()
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*$", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """A Range header against a file of `size` bytes: (first, last) inclusive, None to send the
    whole file (no header, a malformed one, several ranges), or "unsatisfiable" (416)."""
    if not header:
        return None
    m = _RANGE.match(header)
    if m is None:
        return None
    a, b = m.group(1), m.group(2)
    if a == "" and b == "":
        return None
    if a == "":  # the last b bytes
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    first = int(a)
    last = int(b) if b else size - 1
    if b and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


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
        self._admin_password = admin_password.encode()
        self.smartrest = smartrest
        self.max_body = max_body
        self.device_users = device_users
        self._host = host
        self._public_host = public_host or host  # the name clients use (the certificate's)
        self._port = port
        self._idle_timeout = idle_timeout
        self._set_base_url = set_base_url
        self.tls = tls
        self.on_device = on_device
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the REST server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self._public_host}]" if ":" in self._public_host else self._public_host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            return
        handler = type("Handler", (_Handler,), {"rest": self, "timeout": self._idle_timeout})
        self._server = _Server((self._host, self._port), handler)
        self._server.tls = self.tls
        self._server.handshake_timeout = self._idle_timeout
        self._port = self.port  # a restart keeps the port
        if self._set_base_url:
            self.api.base_url = self.url
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name=f"emulator-http-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> RestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authenticate(self, header: str | None) -> str | None:
        """The user of a Basic Authorization header, or None if it does not check out."""
        found = self._authenticate(header)
        return found[0] if found else None

    def _authenticate(self, header: str | None) -> tuple[str, bool] | None:
        """(user, True if a device user) of a Basic Authorization header, or None."""
        if not header or header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        tenant, slash, bare = user.partition("/")
        if slash and tenant == self.api.tenant:
            user = bare
        if hmac.compare_digest(user.encode(), self.admin_user.encode()) and \
                hmac.compare_digest(password.encode(), self._admin_password):
            return user, False
        if self.device_users and user and self.api.model.check_credentials(user, password):
            return user, True
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up stop()
    allow_reuse_address = True

    tls: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # on this connection's thread: a slow or broken handshake holds up nobody else
        request.settimeout(self.handshake_timeout)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        # wrap_socket took over the descriptor: track and close the TLS socket instead
        with self._conns_lock:
            self._conns.discard(request)
            self._conns.add(conn)
        try:
            super().finish_request(conn, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def close_connections(self) -> None:
        """End the open keep-alive connections: a stopped server answers nobody."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            # a client that broke the connection or the TLS session: its trouble, not ours
            log.debug("emulator HTTP: connection with %s failed: %s", client_address, exc)
            return
        log.exception("emulator HTTP: error while serving %s", client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "microcot-emulator"
    rest: RestServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, too long a line or
        too many headers, an unknown method) as Cumulocity-shaped JSON, not HTML."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the default of an unreadable request line
            self.request_version = "HTTP/1.0"  # else no status line would be sent
        phrase = _phrase(code)
        with contextlib.suppress(OSError):  # the client is gone
            self._send_json(code, phrase, {"error": f"general/{phrase}",
                                           "message": message or explain or phrase,
                                           "info": ERROR_INFO}, {})

    def _serve(self) -> None:
        try:
            self._dispatch()
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _dispatch(self) -> None:
        rest = self.rest
        found = rest._authenticate(self.headers.get("Authorization"))
        if found is None:
            self._drain_small()
            self._send_json(401, "Unauthorized",
                            {"error": "security/Unauthorized",
                             "message": "Invalid credentials! : Bad credentials",
                             "info": ERROR_INFO},
                            {"WWW-Authenticate": 'Basic realm="Cumulocity"'})
            return
        user, is_device = found
        if is_device and rest.on_device is not None:
            try:
                rest.on_device(user)
            except Exception:
                log.exception("emulator HTTP: the device hook failed for %s", user)
        path = self.path.split("?", 1)[0].rstrip("/")
        if self._is_upload():
            self._upload(user)
            return
        body = self._body()
        if body is None:
            return
        if self.command == "POST" and path == "/s":
            self._smartrest(body, user)
            return
        method = "GET" if self.command == "HEAD" else self.command
        result = rest.api.handle(method, self.path, body, self.headers.get("Content-Type"), user)
        self._send_result(result)

    def _is_upload(self) -> bool:
        return self.command in ("POST", "PUT") and bool(
            _BINARY_UPLOAD.match(self.path.split("?", 1)[0].rstrip("/")))

    def _limit(self) -> int:
        if self._is_upload():
            return self.rest.api.binaries.max_size + MULTIPART_SLACK
        return self.rest.max_body

    def _upload(self, user: str) -> None:
        """A binary's body streamed to a file of the store, handed to Api as its Path."""
        length = self._length()
        if length is None:
            return
        spool = self.rest.api.binaries.spool_path()
        try:
            left = length
            with open(spool, "wb") as f:
                while left > 0:
                    chunk = self.rfile.read(min(left, CHUNK))
                    if not chunk:
                        break
                    f.write(chunk)
                    left -= len(chunk)
            if left:
                self.close_connection = True
                self._send_error(400, "inventory/badRequest",
                                 f"the body ended {left} bytes before its Content-Length")
                return
            result = self.rest.api.handle(self.command, self.path, spool,
                                          self.headers.get("Content-Type"), user)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spool)
        self._send_result(result)

    def _length(self) -> int | None:
        """The request's Content-Length, or None after answering 400/411/413 for it."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send_error(411, "general/Length Required",
                             "send the body with a Content-Length (no chunked encoding)")
            return None
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw else 0
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_error(400, "general/badRequest", f"bad Content-Length {raw!r}")
            return None
        if length > self._limit():
            # A client that is still sending does not read the answer (it sees a broken pipe):
            # swallow a moderately large body first, without keeping it.
            if length <= DRAIN_LIMIT:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            self._refuse_size(length)
            return None
        return length

    def _body(self) -> bytes | None:
        """The request body, or None after answering 400/411/413 for it."""
        length = self._length()
        if length is None:
            return None
        return self.rfile.read(length) if length else b""

    def _refuse_size(self, length: int) -> None:
        self.close_connection = True
        if self._is_upload():
            limit = self.rest.api.binaries.max_size
            self._send_error(413, "inventory/Request Entity Too Large",
                             f"the body has {length} bytes; this emulator accepts binaries of at "
                             f"most {limit} bytes (its max_binary setting) plus "
                             f"{MULTIPART_SLACK} bytes of multipart framing")
            return
        self._send_error(413, "general/Request Entity Too Large",
                         f"the body has {length} bytes; at most {self.rest.max_body} are accepted")

    def handle_expect_100(self) -> bool:
        # a client that asks first (curl does for large bodies) is told before it sends
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > self._limit():
            self._refuse_size(length)
            return False
        return super().handle_expect_100()

    def _drain_small(self) -> None:
        # keep a keep-alive connection usable after a 401 when the body is small
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if 0 < n <= self.rest.max_body:
            self.rfile.read(n)
        elif n != 0:
            self.close_connection = True

    def _smartrest(self, body: bytes, user: str) -> None:
        handler = self.rest.smartrest
        if handler is None:
            self._send_error(501, "smartrest/Not Implemented",
                             "this emulator runs without a SmartREST engine")
            return
        try:
            status, out = handler(body, self.headers.get("X-Id"), user)
        except Exception:
            log.exception("SmartREST engine failed on POST /s")
            self._send_error(500, "smartrest/Internal Server Error",
                             "the SmartREST engine failed; see the emulator's log")
            return
        self._send(status, _phrase(status), out, "text/plain; charset=utf-8", {})

    def _send_result(self, r: ApiResult) -> None:
        if r.content is not None:
            self._send_file(r.content, r.headers)
            return
        if r.body is None:
            self._send(r.status, r.reason, b"", None, r.headers)
        else:
            self._send_json(r.status, r.reason, r.body, r.headers)

    def _send_file(self, content: BinaryContent, extra: dict[str, str]) -> None:
        try:
            f = open(content.path, "rb")  # noqa: SIM115 - closed below, after streaming
        except FileNotFoundError:  # deleted since Api looked
            self._send_error(404, "inventory/Not Found", "the binary was deleted meanwhile")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            headers = {**extra, "ETag": content.etag, "Accept-Ranges": "bytes"}
            if content.name:
                headers["Content-Disposition"] = (
                    "attachment; filename*=UTF-8''" + quote(content.name, safe=""))
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and if_range is not None and if_range.strip() != content.etag:
                rng = None  # another version than the client has: the whole file
            wanted = parse_range(rng, size)
            if wanted == "unsatisfiable":
                self._send_json(416, "Range Not Satisfiable",
                                {"error": "inventory/Range Not Satisfiable",
                                 "message": f"{rng} is outside the file of {size} bytes",
                                 "info": ERROR_INFO},
                                {**headers, "Content-Range": f"bytes */{size}"})
                return
            status, first, last = 200, 0, size - 1
            if isinstance(wanted, tuple):
                status, (first, last) = 206, wanted
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            n = last - first + 1 if size else 0
            self.send_response(status, _phrase(status))
            self.send_header("Content-Type", content.content_type)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(n))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            f.seek(first)
            while n > 0:
                chunk = f.read(min(n, CHUNK))
                if not chunk:  # truncated meanwhile: the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                n -= len(chunk)

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, _phrase(status),
                        {"error": code, "message": message, "info": ERROR_INFO}, {})

    def _send_json(self, status: int, reason: str, body: Any, headers: dict[str, str]) -> None:
        self._send(status, reason, jsonsafe.dumps(body), "application/json; charset=utf-8",
                   headers)

    def _send(self, status: int, reason: str, data: bytes, content_type: str | None,
              headers: dict[str, str]) -> None:
        self.send_response(status, reason)
        if content_type and status != 204:
            self.send_header("Content-Type", content_type)
        for k, v in headers.items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data and status != 204 and self.command != "HEAD":
            self.wfile.write(data)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
