"""The emulator's HTTP layer on its framework (webapp.py, http.py): the OpenAPI description of
what it serves (valid OpenAPI 3, every route with who may call it, served to authenticated
users), the validation it does before Api, chunked bodies, idle connections, and the web
console's mount point. Api, Model and RestServer in-process: no broker."""

from __future__ import annotations

import asyncio
import base64
import http.client
import importlib.machinery
import json
import logging
import socket
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fidelity_fixtures import unavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from microcot_host.emulator import authz, openapi, webapp
from microcot_host.emulator.api import _ROUTES, Api
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import Model

pytestmark = pytest.mark.timeout(60)

ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
DEV, DEV_PW = "89490200000000000011", "Device-Pass-1"


@pytest.fixture
def api(tmp_path: Path) -> Api:
    a = Api(Model(), binaries=BinaryStore(tmp_path / "binaries", max_size=1 << 16))
    a.issue_credentials(DEV, DEV_PW)
    return a


@pytest.fixture
def server(api: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[RestServer]:
    monkeypatch.setattr(webapp, "console_factory", lambda: None)  # as without the console
    with RestServer(api, ADMIN, ADMIN_PW) as srv:
        yield srv


def auth(user: str = ADMIN, password: str = ADMIN_PW) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def call(srv: RestServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, chunked: bool = False
         ) -> tuple[int, http.client.HTTPResponse, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    try:
        c.request(method, path, body=iter([body]) if chunked and body else body,
                  headers=headers or {}, encode_chunked=chunked)
        r = c.getresponse()
        return r.status, r, r.read()
    finally:
        c.close()


# -- OpenAPI ----------------------------------------------------------------------------------

def test_the_description_is_valid_openapi_and_covers_every_route() -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        unavailable("the openapi-spec-validator package (pip install -e '.[test]')")
    spec = openapi.spec()
    validate(spec)  # raises on any violation of the OpenAPI 3.0 schema
    described = {(rule.pattern, m.upper()) for rule in authz.RULES
                 for m in spec["paths"].get(rule.path, {}) if m.upper() == rule.method}
    assert described == openapi.served_routes()
    assert openapi.served_routes() == {(p, m) for p, methods in _ROUTES for m in methods}
    # who may call it: authz's access level, machine-readable and in words
    for rule in authz.RULES:
        op = spec["paths"][rule.path][rule.method.lower()]
        assert op["x-microcot-access"] == rule.access.name.lower()
        assert rule.access.value in op["description"]
    mos = spec["paths"]["/inventory/managedObjects"]
    assert {p["name"] for p in mos["get"]["parameters"]} >= {"pageSize", "currentPage", "type",
                                                             "fragmentType", "text"}
    assert "application/json" in mos["post"]["requestBody"]["content"]
    up = spec["paths"]["/inventory/binaries"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in up
    assert spec["paths"]["/devicecontrol/newDeviceRequests"]["get"]["x-microcot-access"] == "admin"


def test_openapi_json_is_served_to_authenticated_users(server: RestServer) -> None:
    status, r, raw = call(server, "GET", "/openapi.json")
    assert status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    for who in (auth(), auth(DEV, DEV_PW)):
        status, r, raw = call(server, "GET", "/openapi.json", headers=who)
        assert status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert json.loads(raw) == json.loads(json.dumps(openapi.spec(server.api.tenant)))


# -- validation before Api ----------------------------------------------------------------------

def test_requests_refused_before_api(server: RestServer, api: Api,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    handle = api.handle

    def spy(method: str, target: str, *args: Any, **kwargs: Any) -> Any:
        seen.append((method, target))
        return handle(method, target, *args, **kwargs)

    monkeypatch.setattr(api, "handle", spy)
    h = auth()
    # a JSON route with another body type: 415 from the framework
    status, _, raw = call(server, "POST", "/inventory/managedObjects", b"name=x",
                          {**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and json.loads(raw)["error"] == "inventory/Unsupported Media Type"
    # a malformed multipart upload: 400, nothing spooled
    status, _, raw = call(server, "POST", "/inventory/binaries", b"--b\r\nnot a part",
                          {**h, "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and "multipart" in json.loads(raw)["message"]
    status, _, raw = call(server, "POST", "/inventory/binaries", b"x",
                          {**h, "Content-Type": "multipart/form-data"})
    assert status == 400 and "boundary" in json.loads(raw)["message"]
    # a file part over the store's limit, streamed: 413 with the limit
    big = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
           + b"\0" * ((1 << 16) + 1) + b"\r\n--b--\r\n")
    status, _, raw = call(server, "POST", "/inventory/binaries", big,
                          {**h, "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 413 and "65536" in json.loads(raw)["message"]
    # an unknown method: 501
    status, _, raw = call(server, "BREW", "/inventory/managedObjects", headers=h)
    assert status == 501 and json.loads(raw)["error"] == "general/Not Implemented"
    assert seen == []
    assert [p for p in api.binaries.directory.iterdir()] == []
    # a vendor JSON type passes to Api
    status, _, _ = call(server, "POST", "/inventory/managedObjects", b'{"name":"x"}',
                        {**h, "Content-Type": "application/vnd.com.nsn.cumulocity."
                                              "managedObject+json;ver=0.9"})
    assert status == 201 and seen == [("POST", "/inventory/managedObjects")]


def test_chunked_bodies_are_read_within_the_limits(api: Api) -> None:
    with RestServer(api, ADMIN, ADMIN_PW, max_body=1000) as srv:
        h = {**auth(), "Content-Type": "application/json"}
        status, _, raw = call(srv, "POST", "/inventory/managedObjects", b'{"name":"chunked"}',
                              h, chunked=True)
        assert status == 201 and json.loads(raw)["name"] == "chunked"
        status, r, raw = call(srv, "POST", "/inventory/managedObjects",
                              b'{"name":"' + b"x" * 2000 + b'"}', h, chunked=True)
        assert status == 413 and "1000" in json.loads(raw)["message"]
        # an upload sent chunked is streamed to the store like any other
        status, _, raw = call(srv, "POST", "/inventory/binaries",
                              b"--b\r\nContent-Disposition: form-data; name=\"object\"\r\n\r\n"
                              b'{"name":"c"}\r\n--b\r\nContent-Disposition: form-data; '
                              b"name=\"file\"; filename=\"c\"\r\n\r\n" + b"y" * 5000
                              + b"\r\n--b--\r\n",
                              {**auth(), "Content-Type": "multipart/form-data; boundary=b"},
                              chunked=True)
        assert status == 201 and json.loads(raw)["length"] == 5000


def test_a_silent_connection_is_closed(api: Api) -> None:
    """A client that connects and sends nothing, or stops within its request's head, is not
    kept: the server closes the connection after its idle timeout (however long that takes,
    the test waits for the close, not for a time)."""
    with RestServer(api, ADMIN, ADMIN_PW, idle_timeout=0.3) as srv:
        for opening in (b"", b"GET /inventory/managedObjects HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
                s.sendall(opening)
                assert s.recv(100) == b""  # closed by the server, no answer
        # and a well-behaved client is served
        assert call(srv, "GET", "/tenant/currentTenant", headers=auth())[0] == 200


# -- the web console's mount point ------------------------------------------------------------

def test_root_without_the_console(server: RestServer) -> None:
    assert call(server, "GET", "/")[0] == 401
    status, _, raw = call(server, "GET", "/", headers=auth())
    assert status == 404 and json.loads(raw)["error"] == "general/Not Found"


def test_the_console_is_mounted_when_its_module_exists(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[tuple[Api, str, str]] = []

    def create_app(a: Api, user: str, password: str) -> Starlette:
        got.append((a, user, password))

        async def page(request: Request) -> PlainTextResponse:
            return PlainTextResponse(f"console at {request.url.path}")

        return Starlette(routes=[Route("/", page), Route("/devices", page)])

    module = types.ModuleType(webapp.CONSOLE_MODULE)
    module.__spec__ = importlib.machinery.ModuleSpec(webapp.CONSOLE_MODULE, None)
    module.create_app = create_app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, webapp.CONSOLE_MODULE, module)
    with RestServer(api, ADMIN, ADMIN_PW) as srv:
        assert got == [(api, ADMIN, ADMIN_PW)]
        status, r, _ = call(srv, "GET", "/")  # a browser: no credentials needed to get there
        assert status == 302 and r.headers["Location"] == "/apps/console/"
        status, _, raw = call(srv, "GET", "/apps/console/devices")
        assert status == 200 and raw == b"console at /apps/console/devices"
        # the REST API beside it is unchanged
        assert call(srv, "GET", "/inventory/managedObjects")[0] == 401
        assert call(srv, "GET", "/inventory/managedObjects", headers=auth())[0] == 200


class _Streams:
    """What the console offers a stopping server: close() ends its live streams."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_stopping_ends_the_consoles_live_streams(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An open Server-Sent Events stream of the console does not hold up stop(): the server
    closes the console's streams first (else uvicorn waits, then cancels it with an error)."""
    streams = _Streams()

    def create_app(a: Api, user: str, password: str) -> Starlette:
        async def live(request: Request) -> StreamingResponse:
            async def events() -> AsyncIterator[str]:
                yield "event: hello\ndata: 1\n\n"
                while not streams.closed.is_set():
                    await asyncio.sleep(0.02)
            return StreamingResponse(events(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/live", live)])
        app.state.streams = streams
        return app

    module = types.ModuleType(webapp.CONSOLE_MODULE)
    module.__spec__ = importlib.machinery.ModuleSpec(webapp.CONSOLE_MODULE, None)
    module.create_app = create_app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, webapp.CONSOLE_MODULE, module)
    caplog.set_level(logging.INFO)
    srv = RestServer(api, ADMIN, ADMIN_PW)
    srv.start()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(b"GET /apps/console/live HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"event: hello" not in got:
            got += s.recv(4096)
        srv.stop()
        assert streams.closed.is_set()
        while chunk := s.recv(4096):  # the stream ended, the connection with it
            got += chunk
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
