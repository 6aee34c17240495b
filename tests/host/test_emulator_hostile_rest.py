"""Hostile input to the emulator's REST API, through `Api.handle` and over HTTP: every answer a
Cumulocity-shaped JSON error with the right status (never a 500), nothing stored that the
platform could not give back as JSON, and no error or traceback in the log. Api, Model and
RestServer in-process: no broker."""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microcot_host.emulator import jsonsafe
from microcot_host.emulator.api import Api, ApiResult
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import open_model

pytestmark = pytest.mark.timeout(60)

ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
DEV, DEV_PW = "89490200000000000011", "Device-Pass-1"
T = "2024-01-01T00:00:00Z"


@pytest.fixture
def api(tmp_path: Path, model_store: str) -> Iterator[Api]:
    """On both stores (`model_store`: SQLite in memory, and PostgreSQL)."""
    with open_model(model_store) as model:
        a = Api(model, base_url="http://emu:8080", admin_user=ADMIN,
                binaries=BinaryStore(tmp_path / "binaries", max_size=1 << 16))
        a.issue_credentials(DEV, DEV_PW)
        yield a


@pytest.fixture
def mo(api: Api) -> str:
    r = api.handle("POST", "/inventory/managedObjects", {"name": "d", "c8y_IsDevice": {}},
                   user=DEV)
    assert r.status == 201
    return str(r.body["id"])  # type: ignore[index]


@pytest.fixture
def quiet_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The test's log; at the end, no record may be an error or carry a traceback."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.levelname} {r.getMessage()}" for r in bad]


def shaped(r: ApiResult, status: int, *words: str) -> dict[str, Any]:
    """An error answer as Cumulocity's: error, message, info."""
    assert r.status == status, r
    assert isinstance(r.body, dict) and set(r.body) == {"error", "message", "info"}, r
    assert "/" in r.body["error"], r
    for w in words:
        assert w in r.body["message"], r
    return r.body


def nested(depth: int) -> str:
    return '{"a":' * (depth - 1) + "[1]" + "}" * (depth - 1)


def measurement(mo: str, value: str) -> str:
    return ('{"source":{"id":"%s"},"type":"c8y_T","time":"%s","c8y_T":{"T":{"value":%s}}}'
            % (mo, T, value))


# -- JSON -------------------------------------------------------------------------------------

def test_nesting_depth(api: Api, mo: str, quiet_log: pytest.LogCaptureFixture) -> None:
    assert api.handle("POST", "/inventory/managedObjects", nested(64)).status == 201
    shaped(api.handle("POST", "/inventory/managedObjects", nested(65)), 422, "64 levels")
    # deep enough for the parser's recursion limit, and far beyond
    for depth in (2000, 200_000):
        for target in ("/inventory/managedObjects", f"/inventory/managedObjects/{mo}",
                       "/event/events"):
            method = "PUT" if target.endswith(mo) else "POST"
            shaped(api.handle(method, target, "[" * depth + "]" * depth), 422, "64 levels")
    # as Python objects (internal callers) too
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(70):
        cur["a"] = cur = {}
    shaped(api.handle("POST", "/inventory/managedObjects", deep), 422, "64 levels")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_are_refused_everywhere(api: Api, mo: str, value: str,
                                                   quiet_log: pytest.LogCaptureFixture) -> None:
    ev = api.handle("POST", "/event/events", {"source": {"id": mo}, "type": "t", "text": "x",
                                              "time": T}).body["id"]  # type: ignore[index]
    al = api.handle("POST", "/alarm/alarms", {"source": {"id": mo}, "type": "t", "text": "x",
                                              "severity": "MAJOR", "time": T}).body["id"]  # type: ignore[index]
    op = api.handle("POST", "/devicecontrol/operations",
                    {"deviceId": mo, "c8y_Restart": {}}).body["id"]  # type: ignore[index]
    frag = '"c8y_X":{"v":%s}' % value
    src = '"source":{"id":"%s"},"type":"t","time":"%s"' % (mo, T)
    for method, target, body in (
            ("POST", "/measurement/measurements", measurement(mo, value)),
            ("POST", "/inventory/managedObjects", "{%s}" % frag),
            ("PUT", f"/inventory/managedObjects/{mo}", "{%s}" % frag),
            ("POST", "/event/events", '{%s,"text":"x",%s}' % (src, frag)),
            ("PUT", f"/event/events/{ev}", "{%s}" % frag),
            ("POST", "/alarm/alarms", '{%s,"text":"x","severity":"MAJOR",%s}' % (src, frag)),
            ("PUT", f"/alarm/alarms/{al}", "{%s}" % frag),
            ("POST", "/devicecontrol/operations", '{"deviceId":"%s",%s}' % (mo, frag)),
            ("PUT", f"/devicecontrol/operations/{op}", "{%s}" % frag),
            ("POST", f"/identity/globalIds/{mo}/externalIds",
             '{"type":"t","externalId":"e",%s}' % frag)):
        shaped(api.handle(method, target, body), 422, value.lstrip("-")[:3])
        shaped(api.handle(method, target, body, None, DEV), 422)
    # nothing of it was stored: the listings are strict JSON
    for target in ("/measurement/measurements", "/inventory/managedObjects", "/event/events",
                   "/alarm/alarms", "/devicecontrol/operations"):
        body = api.handle("GET", target + "?pageSize=2000").body
        json.dumps(body, allow_nan=False)


def test_non_finite_numbers_in_python_bodies(api: Api, mo: str) -> None:
    body = json.loads(measurement(mo, "1"))
    body["c8y_T"]["T"]["value"] = math.nan
    shaped(api.handle("POST", "/measurement/measurements", body), 422, "finite")


def test_integers_beyond_64_bits(api: Api, mo: str, quiet_log: pytest.LogCaptureFixture) -> None:
    big = str(1 << 64)
    shaped(api.handle("POST", "/measurement/measurements", measurement(mo, "9" * 5000)), 422,
           "64 bits")
    shaped(api.handle("POST", "/measurement/measurements",
                      '{"source":{"id":%s},"type":"t","time":"%s"}' % (big, T)), 422, "64 bits")
    shaped(api.handle("POST", "/devicecontrol/operations", '{"deviceId":%s}' % big), 422)
    shaped(api.handle("POST", f"/inventory/managedObjects/{mo}/childDevices",
                      '{"managedObject":{"id":-%s}}' % big), 422)
    shaped(api.handle("POST", "/inventory/managedObjects", {"n": -(1 << 63) - 1}), 422)
    # the edges themselves are numbers like any other
    edge = api.handle("POST", "/measurement/measurements",
                      measurement(mo, str((1 << 63) - 1)))
    assert edge.status == 201 and edge.body["c8y_T"]["T"]["value"] == (1 << 63) - 1  # type: ignore[index]
    assert api.handle("POST", "/inventory/managedObjects", {"n": -(1 << 63)}).status == 201
    # a source id of the right size that names nothing: the model's 422, not a database error
    shaped(api.handle("POST", "/measurement/measurements",
                      '{"source":{"id":%d},"type":"t","time":"%s"}' % ((1 << 63) - 1, T)), 422)


def test_lone_surrogates(api: Api, quiet_log: pytest.LogCaptureFixture) -> None:
    shaped(api.handle("POST", "/inventory/managedObjects", '{"name":"\\ud800"}'), 422,
           "surrogate")
    shaped(api.handle("POST", "/inventory/managedObjects", '{"\\udfff":1}'), 422, "surrogate")
    # a pair is a character
    r = api.handle("POST", "/inventory/managedObjects", '{"name":"\\ud83d\\ude00"}')
    assert r.status == 201 and r.body["name"] == "\U0001F600"  # type: ignore[index]


# -- paging -----------------------------------------------------------------------------------

@pytest.mark.parametrize("query,status,words", [
    ("currentPage=100000000000000000000", 400, "too large"),
    ("currentPage=" + "9" * 5000, 400, "too large"),
    ("currentPage=1e20", 400, "positive whole number"),
    ("currentPage=-1", 400, "positive whole number"),
    ("currentPage=0", 400, "positive whole number"),
    ("currentPage=1_0", 400, "positive whole number"),
    ("currentPage=%D9%A3", 400, "positive whole number"),  # an Arabic-Indic 3
    ("currentPage=+2", 400, "positive whole number"),
    ("pageSize=-5", 400, "positive whole number"),
    ("pageSize=1e3", 400, "positive whole number"),
    ("pageSize=99999999999999999999", 400, "too large"),
    ("pageSize=2000&currentPage=999999999999999999", 400, "too large"),
])
def test_paging_bounds(api: Api, query: str, status: int, words: str,
                       quiet_log: pytest.LogCaptureFixture) -> None:
    for target in ("/inventory/managedObjects", "/measurement/measurements", "/event/events",
                   "/alarm/alarms", "/devicecontrol/operations",
                   "/devicecontrol/newDeviceRequests", "/inventory/binaries"):
        shaped(api.handle("GET", f"{target}?{query}"), status, words)
        if target != "/devicecontrol/newDeviceRequests":
            shaped(api.handle("GET", f"{target}?{query}", user=DEV), status, words)


def test_paging_at_the_edges(api: Api, mo: str) -> None:
    r = api.handle("GET", "/inventory/managedObjects?pageSize=999999999&currentPage=000002")
    assert r.status == 200 and r.body["statistics"] == {"currentPage": 2, "pageSize": 2000}  # type: ignore[index]
    far = api.handle("GET", "/measurement/measurements?currentPage=999999999999999999")
    assert far.status == 200 and far.body["measurements"] == []  # type: ignore[index]
    mine = api.handle("GET", "/measurement/measurements?currentPage=999999999999999999",
                      user=DEV)
    assert mine.status == 200 and mine.body["measurements"] == []  # type: ignore[index]


# -- over HTTP --------------------------------------------------------------------------------

def refuse(name: str) -> None:
    raise AssertionError(f"{name} in an answer: not JSON")


def raw_http(srv: RestServer, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send `data` as it is; the status and (strict) JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    return status, json.loads(body, parse_constant=refuse)


def auth(user: str = ADMIN, password: str = ADMIN_PW) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()) + b"\r\n"


def request(method: str, path: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode() \
        + auth() + extra + b"\r\n" + body


def test_hostile_requests_over_http(api: Api, mo: str,
                                    quiet_log: pytest.LogCaptureFixture) -> None:
    cases: list[tuple[bytes, int]] = [
        (request("POST", "/inventory/managedObjects", b"[" * 500_000 + b"]" * 500_000), 422),
        (request("POST", "/measurement/measurements", measurement(mo, "NaN").encode()), 422),
        (request("GET", "/inventory/managedObjects?currentPage=100000000000000000000"), 400),
        (request("POST", "/inventory/managedObjects", b"x" * ((1 << 20) + 1)), 413),
        (b"POST /inventory/managedObjects HTTP/1.1\r\nContent-Length: 1e3\r\n" + auth()
         + b"\r\n{}", 400),
        (b"POST /inventory/managedObjects HTTP/1.1\r\nContent-Length: " + b"9" * 5000
         + b"\r\n" + auth() + b"\r\n{}", 400),
        (b"GET / HTTP/x.y\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW /inventory/managedObjects HTTP/1.1\r\nHost: x\r\n" + auth() + b"\r\n", 501),
        (b"GET /x HTTP/1.1\r\n" + b"X-A: b\r\n" * 120 + b"\r\n", 431),
        (b"GARBAGE\r\n\r\n", 400),
        (request("POST", "/inventory/managedObjects", b'{"name":"\\ud800"}'), 422),
    ]
    with RestServer(api, ADMIN, ADMIN_PW) as srv:
        for data, status in cases:
            got, body = raw_http(srv, data)
            assert got == status, (data[:60], got, body)
            assert set(body) == {"error", "message", "info"}, body
        # a Range header of 5000 digits is a malformed one: the whole file, as RFC 9110 allows
        boundary = "b0"
        up = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"object\"\r\n\r\n"
              '{"name":"f"}\r\n'
              f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n"
              "Content-Type: application/octet-stream\r\n\r\nabc\r\n"
              f"--{boundary}--\r\n").encode()
        r = api.handle("POST", "/inventory/binaries", up,
                       f"multipart/form-data; boundary={boundary}")
        path = f"/inventory/binaries/{r.body['id']}"  # type: ignore[index]
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(request("GET", path, extra=b"Range: bytes=" + b"1" * 5000 + b"-\r\n"))
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\nabc"), got[:200]


def test_an_old_databases_nan_is_answered_as_null(api: Api, mo: str,
                                                  quiet_log: pytest.LogCaptureFixture) -> None:
    # stored before the limits existed: straight into the model
    body = json.loads(measurement(mo, "1"))
    body["c8y_T"]["T"]["value"] = math.nan
    api.model.create_measurement(body)
    assert jsonsafe.dumps({"v": math.inf, "s": "\ud800"}) == b'{"v": null, "s": "\\ud800"}'
    with RestServer(api, ADMIN, ADMIN_PW) as srv:
        status, got = raw_http(srv, request("GET", "/measurement/measurements"))
    assert status == 200 and got["measurements"][0]["c8y_T"]["T"]["value"] is None
    assert any("not finite" in r.getMessage() for r in quiet_log.records)


# -- a seeded walk over every route with bad values --------------------------------------------

_VALUES = ['"x"', "1", "-1", "1.5", "true", "null", "[]", "{}", '"2024-01-01T00:00:00Z"',
           '"0001-01-01T00:00:00Z"', '"9999-12-31T23:59:59.999-23:59"', '"ACTIVE"',
           '"CLEARED"', '"PENDING"', '"EXECUTING"', '"MAJOR"', '{"id":"abc"}', '{"id":[]}',
           '"\\u0000"', "1e308", "-0", '"' + "x" * 3000 + '"', "9223372036854775807"]
_KEYS = ["source", "type", "time", "text", "severity", "status", "name", "owner", "id",
         "deviceId", "externalId", "managedObject", "c8y_X", "creationTime", "failureReason"]
_PARAMS = ["source", "dateFrom", "dateTo", "status", "ids", "deviceId", "agentId", "pageSize",
           "currentPage", "revert", "withTotalPages", "fragmentType", "resolved"]
_PVALUES = ["", "1", "abc", "-1", "0", "2024-01-01T00:00:00Z", "0001-01-01T00:00:00%2B14:00",
            "true", "x,y", ",,,", "%00", "%FF", "9" * 25, "1,2,3"]


def test_every_route_with_bad_values_is_answered(api: Api, mo: str,
                                                 quiet_log: pytest.LogCaptureFixture) -> None:
    from microcot_host.emulator.api import _ROUTES

    rnd = random.Random(12)
    routes = [(pattern, m) for pattern, methods in _ROUTES for m in methods]
    ids = [mo, "1", "abc", "9" * 40, "%00", "-5"]
    values = [*_VALUES, '"%s"' % mo, '{"id":"%s"}' % mo]
    for _ in range(3000):
        pattern, method = rnd.choice(routes)
        path = "/" + "/".join(rnd.choice(ids) if s == "*" else s for s in pattern)
        query = "&".join(f"{rnd.choice(_PARAMS)}={rnd.choice(_PVALUES)}"
                         for _ in range(rnd.randint(0, 3)))
        body: str | None = None
        if method in ("POST", "PUT"):
            keys = rnd.sample(_KEYS, rnd.randint(0, 6))
            body = "{" + ",".join(f'"{k}":{rnd.choice(values)}' for k in keys) + "}"
        r = api.handle(method, path + "?" + query, body,
                       rnd.choice([None, "application/json", "text/csv"]),
                       rnd.choice([None, ADMIN, DEV]))
        assert r.status < 500 or r.status == 501, (method, path, query, body, r)
        if r.status >= 400:
            shaped(r, r.status)
        if r.body is not None:
            json.dumps(r.body, allow_nan=False)
