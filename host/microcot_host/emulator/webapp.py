"""The emulator's HTTP application: Starlette in front of `Api.handle` (http.py serves it).

The framework does HTTP only; what a request means on Cumulocity is Api's (api.py), which the
SmartREST engine and the MQTT connector call the same way. Here:

- Authentication: HTTP Basic, the admin given to `RestConfig` (optionally `<tenant>/<user>`) or,
  unless `device_users` is off, a device whose credentials the platform issued (checked against
  the recorded hash). Anything else: 401 with `WWW-Authenticate`. The user name reaches Api,
  which fences device users in (authz.py). `on_device(user)` is called for every request
  authenticated with device credentials (availability.py counts it as a message).
- Validation before Api: methods (GET, HEAD, POST, PUT, DELETE, PATCH; else 501), body sizes
  (`max_body`, 1 MiB; uploads the store's `max_size` plus 64 KiB of multipart framing; 413 from
  the Content-Length before anything is read, so a client that sent `Expect: 100-continue` is
  told before it sends, and a client that sends anyway is drained by the server), the body's
  type for the route (openapi.body_of: a JSON route takes JSON, else 415), multipart bodies
  parsed by python-multipart (forms.py; malformed: 400). The protocol's own refusals (a
  malformed request, a request line over 64 KiB: 414, a head over 64 KiB or more than 100
  header fields: 431) are http.py's, in the same JSON shape.
- Uploads (`POST /inventory/binaries`, `PUT /inventory/binaries/{id}`, POST/PUT
  `/event/events/{id}/binaries`) are streamed: a multipart body's file part to a file of the
  binaries' store with its SHA-256 (forms.FormReader), a raw body to a spooled file; Api gets the
  Form or the Path, and whatever it did not commit is removed afterwards.
- Downloads (Api's `content`) are streamed from the file with `Content-Length`, `ETag`,
  `Accept-Ranges: bytes` and `Content-Disposition`; one `Range: bytes=a-b`, `a-` or `-n` gets
  206 with `Content-Range`, a range starting at or after the end 416 (`Content-Range: bytes
  */size`), several ranges or a malformed header the whole file (RFC 9110 allows it); `If-Range`
  with another ETag the whole file too, so a resumed download never mixes two versions. HEAD
  answers any GET without the body.
- `POST /s` goes to the SmartREST engine's callable `smartrest(body, x_id, user)`; without one
  it is 501.
- `GET /openapi.json`: the OpenAPI 3 description of what is served (openapi.py), for any
  authenticated user (it holds no secret, but nothing here answers strangers).
- The web console, when its module exists (`microcot_host.emulator.console.create_app`), is
  mounted at `/apps/console` with its own login (its session cookie marked Secure on an HTTPS
  listener), and `GET /` redirects there (302, no credentials needed: a browser's way in);
  without it `GET /` is an ordinary (authenticated) request that Api answers 404.
  `close_console(app)` ends its live streams for a server that stops.

Api runs in Starlette's thread pool (it blocks on SQLite and, for credentials, on the broker),
never on the event loop. Every error is Cumulocity-shaped JSON (`{"error", "message", "info"}`);
answers are strict JSON (jsonsafe.dumps: an old database's NaN goes out as null). Request lines
are logged at DEBUG; headers (and so credentials) never are.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import importlib.util
import inspect
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from . import jsonsafe, openapi
from .api import ERROR_INFO, Api, ApiResult, BinaryContent, match_route, path_segments
from .forms import Form, FormError, FormReader, FormTooLarge

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
DRAIN_LIMIT = 64 << 20  # a refused body up to this size is read and dropped by the server
MULTIPART_SLACK = 64 << 10  # room for the object part and the framing of a binary upload
CHUNK = 1 << 16
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})
CONSOLE_MODULE = "microcot_host.emulator.console"
CONSOLE_PATH = "/apps/console"
JSON_TYPE = "application/json; charset=utf-8"
SmartRestHandler = Callable[[bytes, str | None, str], tuple[int, bytes]]
# ASCII digits, at most 18 (a 64-bit offset): longer is malformed (the whole file), not an
# error deep in int()
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*$", re.IGNORECASE)


@dataclass
class RestConfig:
    """What the application needs of its server (http.RestServer builds it)."""

    api: Api
    admin_user: str
    admin_password: bytes = field(repr=False)
    smartrest: SmartRestHandler | None = None
    max_body: int = MAX_BODY
    device_users: bool = True
    on_device: Callable[[str], None] | None = None

    def _credentials(self, header: str | None) -> tuple[str, str] | None:
        """(user, password) of a Basic header; `<tenant>/<user>` of this tenant is the user, as
        Cumulocity allows."""
        creds = _basic(header)
        if creds is None:
            return None
        user, password = creds
        tenant, slash, bare = user.partition("/")
        return (bare if slash and tenant == self.api.tenant else user), password

    def authenticate(self, header: str | None) -> tuple[str, bool] | None | bool:
        """(user, False) for the admin; True if the header may be a device's (to be checked
        with `check_device`, which touches the database); None if it does not check out."""
        creds = self._credentials(header)
        if creds is None:
            return None
        user, password = creds
        if hmac.compare_digest(user.encode(), self.admin_user.encode()) and \
                hmac.compare_digest(password.encode(), self.admin_password):
            return user, False
        return bool(self.device_users and user)

    def check_device(self, header: str | None, notify: bool = True) -> str | None:
        """The device user of a Basic header whose credentials the platform issued (on a
        worker thread: the check reads the database and hashes); with `notify`, after calling
        the `on_device` hook."""
        creds = self._credentials(header)
        if creds is None:
            return None
        user, password = creds
        if not self.api.model.check_credentials(user, password):
            return None
        if notify and self.on_device is not None:
            try:
                self.on_device(user)
            except Exception:
                log.exception("emulator HTTP: the device hook failed for %s", user)
        return user


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


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


# -- answers ----------------------------------------------------------------------------------

def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message, "info": ERROR_INFO}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None,
                  close: bool = False) -> Response:
    h = dict(headers or {})
    if close:
        h["Connection"] = "close"  # h11 then ends the connection after this answer
    return Response(jsonsafe.dumps(body), status, h, media_type=JSON_TYPE)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
          close: bool = False) -> Response:
    return json_response(status, error_body(code, message), headers, close)


def _unauthorized() -> Response:
    return error(401, "security/Unauthorized", "Invalid credentials! : Bad credentials",
                 {"WWW-Authenticate": 'Basic realm="Cumulocity"'})


def result_response(request: Request, r: ApiResult) -> Response:
    if r.content is not None:
        return _file_response(request, r.content, r.headers)
    if r.body is None:
        return Response(b"", r.status, r.headers, media_type=None)
    return json_response(r.status, r.body, r.headers)


def _file_response(request: Request, content: BinaryContent, extra: dict[str, str]) -> Response:
    try:
        f = open(content.path, "rb")  # noqa: SIM115 - closed by the stream, or below
    except FileNotFoundError:  # deleted since Api looked
        return error(404, "inventory/Not Found", "the binary was deleted meanwhile")
    size = os.fstat(f.fileno()).st_size
    headers = {**extra, "ETag": content.etag, "Accept-Ranges": "bytes"}
    if content.name:
        headers["Content-Disposition"] = (
            "attachment; filename*=UTF-8''" + quote(content.name, safe=""))
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if rng and if_range is not None and if_range.strip() != content.etag:
        rng = None  # another version than the client has: the whole file
    wanted = parse_range(rng, size)
    if wanted == "unsatisfiable":
        f.close()
        return error(416, "inventory/Range Not Satisfiable",
                     f"{rng} is outside the file of {size} bytes",
                     {**headers, "Content-Range": f"bytes */{size}"})
    status, first, last = 200, 0, size - 1
    if isinstance(wanted, tuple):
        status, (first, last) = 206, wanted
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    n = last - first + 1 if size else 0
    headers["Content-Length"] = str(n)
    # as stored: Starlette would add a charset to a text/ media type
    headers["Content-Type"] = content.content_type
    if request.method == "HEAD" or n == 0:
        f.close()
        return Response(b"", status, headers)
    return StreamingResponse(_read_file(f, first, n), status, headers)


async def _read_file(f: IO[bytes], first: int, n: int) -> AsyncIterator[bytes]:
    try:
        await run_in_threadpool(f.seek, first)
        while n > 0:
            chunk = await run_in_threadpool(f.read, min(n, CHUNK))
            if not chunk:  # cannot happen to a file replaced by rename; the client sees it short
                raise OSError("the binary's file got shorter while it was sent")
            yield chunk
            n -= len(chunk)
    finally:
        f.close()


# -- bodies -----------------------------------------------------------------------------------

class Refused(Exception):
    """A request refused before Api: its answer."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    # h11 accepted only ASCII digits (at most 20) for it
    return int(raw) if raw else None


class Body:
    """A request's body as it arrives (the ASGI messages themselves: a refused body is read on
    to its end, which Starlette's one-shot stream() cannot do after a partial read)."""

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self._receive()
            if message["type"] != "http.request":
                self.done = True
                raise ClientDisconnect()
            self.done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            if chunk:
                yield chunk

    async def drain(self) -> None:
        """Read and drop the rest: a client that sends its whole body before it reads
        (urllib, http.client) would otherwise see a broken pipe instead of the answer."""
        async for _ in self.chunks():
            pass


async def _check_length(request: Request, body: Body, limit: int,
                        too_large: Callable[[int], Response]) -> None:
    """Refuse a declared length over `limit`: a client waiting for 100 Continue is told before
    it sends; a body up to DRAIN_LIMIT is read and dropped first; a larger one is not read (the
    connection is closed after the answer)."""
    length = _declared_length(request)
    if length is None or length <= limit:
        return
    response = too_large(length)
    if length > DRAIN_LIMIT or "100-continue" in request.headers.get("expect", "").lower():
        response.headers["Connection"] = "close"
    else:
        await body.drain()
    raise Refused(response)


async def read_body(request: Request, limit: int,
                    too_large: Callable[[int], Response]) -> bytes:
    stream = Body(request)
    await _check_length(request, stream, limit, too_large)
    body = bytearray()
    async for chunk in stream.chunks():
        body += chunk
        if len(body) > limit:  # chunked: no length was declared
            raise Refused(_closing(too_large(len(body))))
    return bytes(body)


async def spool_upload(request: Request, api: Api,
                       too_large: Callable[[int], Response]) -> Form | Path:
    """An upload's body streamed to disk: a multipart body through forms.FormReader (its file
    part spooled into the store with its hash), any other body to a spooled file."""
    store = api.binaries
    stream = Body(request)
    await _check_length(request, stream, store.max_size + MULTIPART_SLACK, too_large)
    ctype = request.headers.get("content-type") or ""
    if ctype.split(";")[0].strip().lower().startswith("multipart/"):
        try:
            reader = FormReader(ctype, store, max_file=store.max_size)
        except FormError as e:
            raise Refused(error(400, f"{_domain(request)}/badRequest", str(e))) from None
        try:
            async for chunk in stream.chunks():
                reader.feed(chunk)
            return reader.finish()
        except FormTooLarge as e:
            reader.abort()
            await stream.drain()  # at most the declared length, within the limit
            raise Refused(error(413, f"{_domain(request)}/Request Entity Too Large",
                                f"{e}; this emulator accepts binaries of at most "
                                f"{store.max_size} bytes (its max_binary setting)")) from None
        except FormError as e:
            reader.abort()
            await stream.drain()
            raise Refused(error(400, f"{_domain(request)}/badRequest", str(e))) from None
        except BaseException:
            reader.abort()
            raise
    spool = store.spool_path()
    try:
        n = 0
        with open(spool, "wb") as f:
            async for chunk in stream.chunks():
                n += len(chunk)
                if n > store.max_size:  # chunked: no length was declared
                    raise Refused(_closing(too_large(n)))
                f.write(chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(spool)
        raise
    return spool


def _closing(response: Response) -> Response:
    response.headers["Connection"] = "close"
    return response


def _domain(request: Request) -> str:
    segs = request.url.path.strip("/").split("/")
    return segs[0] if segs and segs[0] else "general"


def _type_refusal(request: Request, kind: openapi.Body) -> Response | None:
    """A JSON route refuses another body type before Api (which would refuse it too)."""
    if kind is not openapi.Body.JSON:
        return None
    ct = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ct and "json" not in ct:
        return error(415, f"{_domain(request)}/Unsupported Media Type",
                     f"the body must be JSON (application/json), not {ct}")
    return None


# -- the application --------------------------------------------------------------------------

class RestApp:
    """The endpoints, over one RestConfig."""

    def __init__(self, config: RestConfig) -> None:
        self.config = config
        self._spec: bytes | None = None

    async def _user(self, request: Request) -> str | None:
        header = request.headers.get("authorization")
        found = self.config.authenticate(header)
        if isinstance(found, tuple):
            return found[0]
        if found is True:
            return await run_in_threadpool(self.config.check_device, header)
        return None

    async def rest(self, request: Request) -> Response:
        method = request.method
        log.debug("%s %s", method, request.url.path)
        if method not in METHODS:
            return error(501, "general/Not Implemented", f"the method {method[:32]!r} is not "
                                                         "supported", close=True)
        header = request.headers.get("authorization")
        found = self.config.authenticate(header)
        if found is None or found is False:
            return _unauthorized()
        try:
            if isinstance(found, tuple):  # the admin: checked here, no database involved
                return await self._serve(request, method, found[0], None)
            if self._small(request):
                # a device with a small body: its credentials are checked on the worker thread
                # that then runs its request (one trip to the thread pool, not two)
                return await self._serve(request, method, None, header)
            user = await run_in_threadpool(self.config.check_device, header)
            if user is None:
                return _unauthorized()
            return await self._serve(request, method, user, None)
        except Refused as r:
            return r.response
        except ClientDisconnect:  # nobody reads this answer
            log.debug("emulator HTTP: the client left during its request's body")
            return Response(b"", 400, {"Connection": "close"})

    def _small(self, request: Request) -> bool:
        """True for a request whose body may be read before its user is known: at most
        `max_body` bytes declared, not an upload (those are checked before they are spooled)."""
        if request.headers.get("transfer-encoding"):
            return False
        length = _declared_length(request)
        if length is not None and length > self.config.max_body:
            return False
        found = match_route(path_segments(request.url.path))
        return found is None or openapi.body_of(found[0], request.method) \
            is not openapi.Body.UPLOAD

    async def _serve(self, request: Request, method: str, user: str | None,
                     header: str | None) -> Response:
        """Answer a request of `user`, or (user None) of the device whose Basic `header` is
        checked first, on the worker thread."""
        cfg = self.config
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1")
        query = request.scope.get("query_string", b"").decode("latin-1")
        target = f"{path}?{query}" if query else path
        found = match_route(path_segments(path))
        kind = openapi.body_of(found[0], method) if found is not None else openapi.Body.NONE
        ctype = request.headers.get("content-type")
        refusal = _type_refusal(request, kind)
        if refusal is not None and user is not None:
            return refusal
        if kind is openapi.Body.UPLOAD:
            body: bytes | Form | Path = await spool_upload(request, cfg.api, self._upload_too_large)
        else:
            body = await read_body(request, cfg.max_body, self._body_too_large)
        x_id = request.headers.get("x-id")

        def job() -> ApiResult | Response | None:
            who = user if user is not None else cfg.check_device(header)
            if who is None:
                return None  # 401 (after the body: a small one, and the connection is kept)
            if refusal is not None:
                return refusal
            if kind is openapi.Body.SMARTREST:
                return self._smartrest(body, x_id, who)  # type: ignore[arg-type]
            return cfg.api.handle("GET" if method == "HEAD" else method, target, body, ctype,
                                  who)

        try:
            out = await run_in_threadpool(job)
        finally:
            if isinstance(body, Form):
                body.discard()
            elif isinstance(body, Path):
                with contextlib.suppress(OSError):
                    os.unlink(body)
        if out is None:
            return _unauthorized()
        if isinstance(out, Response):
            return out
        return result_response(request, out)

    def _upload_too_large(self, length: int) -> Response:
        limit = self.config.api.binaries.max_size
        return error(413, "inventory/Request Entity Too Large",
                     f"the body has {length} bytes; this emulator accepts binaries of at most "
                     f"{limit} bytes (its max_binary setting) plus {MULTIPART_SLACK} bytes of "
                     "multipart framing")

    def _body_too_large(self, length: int) -> Response:
        return error(413, "general/Request Entity Too Large",
                     f"the body has {length} bytes; at most {self.config.max_body} are accepted")

    def _smartrest(self, body: bytes, x_id: str | None, user: str) -> Response:
        """`POST /s` by the SmartREST engine (on a worker thread)."""
        handler = self.config.smartrest
        if handler is None:
            return error(501, "smartrest/Not Implemented",
                         "this emulator runs without a SmartREST engine")
        try:
            status, out = handler(body, x_id, user)
        except Exception:
            log.exception("SmartREST engine failed on POST /s")
            return error(500, "smartrest/Internal Server Error",
                         "the SmartREST engine failed; see the emulator's log")
        return Response(out, status, media_type="text/plain; charset=utf-8")

    async def openapi_json(self, request: Request) -> Response:
        if await self._user(request) is None:
            return _unauthorized()
        if self._spec is None:
            self._spec = jsonsafe.dumps(openapi.spec(self.config.api.tenant))
        return Response(self._spec, media_type=JSON_TYPE)

    async def home(self, request: Request) -> Response:
        return RedirectResponse(CONSOLE_PATH + "/", status_code=302)


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette logs nothing itself here; uvicorn then logs the traceback: our own failure
    return error(500, "general/Internal Server Error",
                 "the emulator failed on this request; see its log", close=True)


class _AnyMethod:
    """An endpoint for every method: Starlette limits a function endpoint to the methods it
    is given (GET by default), an ASGI endpoint to none; Api answers 405 itself, with Allow."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def console_factory() -> Callable[..., Starlette] | None:
    """The web console's `create_app` if its module is installed (branch i13-console)."""
    if importlib.util.find_spec(CONSOLE_MODULE) is None:
        return None
    module = importlib.import_module(CONSOLE_MODULE)
    factory: Callable[..., Starlette] = module.create_app
    return factory


def create_app(config: RestConfig, console: bool = True, tls: bool = False) -> Starlette:
    """The Starlette application of the REST API (and the console, when it exists: then
    `app.state.console` is its app). `tls`: the application is served over HTTPS only (the
    console's session cookie is then marked Secure, so a browser never sends it over HTTP)."""
    app = RestApp(config)
    routes: list[BaseRoute] = [Route("/openapi.json", app.openapi_json, methods=["GET"])]
    factory = console_factory() if console else None
    console_app: Starlette | None = None
    if factory is not None:
        extra = {"https_only": True} if tls and "https_only" in inspect.signature(
            factory).parameters else {}
        console_app = factory(config.api, config.admin_user, config.admin_password.decode(),
                              **extra)
        routes += [Mount(CONSOLE_PATH, app=console_app), Route("/", app.home, methods=["GET"])]
    routes.append(Route("/{path:path}", _AnyMethod(app.rest)))  # Api routes the rest
    starlette = Starlette(routes=routes, exception_handlers={Exception: _server_error})
    starlette.state.console = console_app
    return starlette


def close_console(app: Starlette) -> None:
    """End the console's live streams (Server-Sent Events), for a server that stops: else
    they hold its shutdown. Any thread."""
    console_app = getattr(app.state, "console", None)
    streams = getattr(console_app.state, "streams", None) if console_app is not None else None
    if streams is not None:
        streams.close()
