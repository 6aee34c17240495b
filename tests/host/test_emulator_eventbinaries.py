"""The emulator's event attachments, /event/events/{id}/binaries, as Cumulocity's: upload
(multipart or raw), one per event (409), download with its type, replace, delete, gone with the
event; a device user reaches only the events of managed objects it serves, the admin all; over
HTTPS a device's upload is streamed like a binary's. Api and RestServer only: no Mosquitto."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from microcot_host.emulator.api import Api
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.certs import ensure_ca_and_server, server_ssl_context
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import Model

pytestmark = pytest.mark.timeout(60)

ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
DEV, DEV_PW = "89490200000000000011", "Device-Pass-1"
OTHER, OTHER_PW = "89490200000000000029", "Device-Pass-2"
LOG = b"2024-01-01T00:00:00Z one\n2024-01-01T00:00:01Z two\n"


def multipart(data: bytes, obj: dict[str, str] | None = None, ctype: str = "text/plain",
              boundary: str = "mcb0123") -> tuple[bytes, str]:
    out = b""
    if obj is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"object\"\r\n\r\n"
                + json.dumps(obj) + "\r\n").encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"agent.log\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data
    return out + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def store(tmp_path: Path) -> BinaryStore:
    return BinaryStore(tmp_path / "binaries", max_size=1 << 20)


@pytest.fixture
def api(store: BinaryStore) -> Api:
    a = Api(Model(), base_url="http://emu:8080", binaries=store)
    a.issue_credentials(DEV, DEV_PW)
    a.issue_credentials(OTHER, OTHER_PW)
    return a


def device_event(api: Api, user: str) -> tuple[str, str]:
    """(managed object, event id): a device created by `user` (its owner) and an event of it."""
    mo = api.handle("POST", "/inventory/managedObjects", {"name": user, "c8y_IsDevice": {}},
                    user=user).body
    assert isinstance(mo, dict)
    ev = api.handle("POST", "/event/events", {"source": {"id": mo["id"]}, "type": "c8y_Logfile",
                                              "text": "log", "time": "2024-01-01T00:00:00Z"},
                    user=user)
    assert ev.status == 201 and isinstance(ev.body, dict)
    return mo["id"], ev.body["id"]


def test_attach_read_replace_delete(api: Api, store: BinaryStore) -> None:
    _, eid = device_event(api, DEV)
    url = f"/event/events/{eid}/binaries"
    assert api.handle("GET", url).status == 404  # nothing attached yet
    body, ct = multipart(LOG, {"name": "agent.log", "type": "text/plain"})
    r = api.handle("POST", url, body, ct, DEV)
    assert r.status == 201, r
    assert r.body == {"self": "http://emu:8080" + url, "id": eid, "source": eid,
                      "name": "agent.log", "type": "text/plain", "length": len(LOG)}
    ev = api.handle("GET", f"/event/events/{eid}").body
    assert isinstance(ev, dict)
    assert ev["c8y_IsBinary"] == {"name": "agent.log", "length": len(LOG), "type": "text/plain"}
    got = api.handle("GET", url, user=DEV)
    assert got.status == 200 and got.content is not None
    assert got.content.read() == LOG and got.content.content_type == "text/plain"
    assert got.content.name == "agent.log"
    # one attachment per event: a second POST is a conflict, PUT replaces (raw content here)
    again = api.handle("POST", url, body, ct, DEV)
    assert again.status == 409 and isinstance(again.body, dict)
    assert again.body["error"] == "event/Duplicate"
    r = api.handle("PUT", url, b"\x00\x01binary", "application/octet-stream", DEV)
    assert r.status == 201 and isinstance(r.body, dict) and r.body["length"] == 8
    got = api.handle("GET", url)
    assert got.content is not None and got.content.read() == b"\x00\x01binary"
    assert got.content.content_type == "application/octet-stream"
    # DELETE: file and fragment go; a second DELETE finds nothing
    assert api.handle("DELETE", url, user=DEV).status == 204
    assert not store.path(eid).exists()
    assert "c8y_IsBinary" not in api.handle("GET", f"/event/events/{eid}").body  # type: ignore
    assert api.handle("GET", url).status == 404
    assert api.handle("DELETE", url).status == 404
    # attached again (POST allowed now), then the event is deleted: its file goes with it
    assert api.handle("POST", url, body, ct, DEV).status == 201
    assert store.path(eid).exists()
    assert api.handle("DELETE", f"/event/events/{eid}").status == 204
    assert not store.path(eid).exists()
    assert api.handle("GET", url).status == 404


def test_name_and_type_without_an_object_part(api: Api) -> None:
    _, eid = device_event(api, DEV)
    body, ct = multipart(LOG, None, "text/csv")
    r = api.handle("POST", f"/event/events/{eid}/binaries", body, ct, DEV)
    assert r.status == 201 and isinstance(r.body, dict)
    assert (r.body["name"], r.body["type"]) == ("agent.log", "text/csv")  # the file part's


def test_refusals(api: Api) -> None:
    _, eid = device_event(api, DEV)
    url = f"/event/events/{eid}/binaries"
    body, ct = multipart(LOG)
    # another device may neither attach to nor read nor delete this device's event
    r = api.handle("POST", url, body, ct, OTHER)
    assert r.status == 403 and isinstance(r.body, dict) and r.body["error"] == "security/Forbidden"
    assert api.handle("POST", url, body, ct, ADMIN).status == 201  # the admin may
    assert api.handle("GET", url, user=OTHER).status == 403
    assert api.handle("DELETE", url, user=OTHER).status == 403
    assert api.handle("GET", url, user=DEV).status == 200
    # unknown event, malformed bodies, JSON, too large
    assert api.handle("POST", "/event/events/99999/binaries", body, ct).status == 404
    _, e2 = device_event(api, DEV)
    url2 = f"/event/events/{e2}/binaries"
    r = api.handle("POST", url2, b"--x\r\nno end", "multipart/form-data; boundary=x")
    assert r.status == 400 and isinstance(r.body, dict) and r.body["error"] == "event/badRequest"
    bad, bct = multipart(LOG, None)
    r = api.handle("POST", url2, bad.replace(b'name="file"; filename="agent.log"', b'name="x"'),
                   bct)
    assert r.status == 422
    assert api.handle("POST", url2, {"a": 1}).status == 415
    big, bigct = multipart(b"x" * ((1 << 20) + 1))
    r = api.handle("POST", url2, big, bigct)
    assert r.status == 413 and isinstance(r.body, dict)
    assert r.body["error"] == "event/Request Entity Too Large"
    assert api.handle("GET", url2).status == 404  # nothing stored by the refusals
    assert api.handle("PATCH", url2).status == 405


@pytest.fixture
def https(api: Api, tmp_path: Path) -> Iterator[tuple[RestServer, ssl.SSLContext]]:
    files = ensure_ca_and_server(tmp_path / "tls-home")
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    # JSON bodies limited to 64 KiB: an attachment beyond that must take the streamed path
    with RestServer(api, ADMIN, ADMIN_PW, tls=server_ssl_context(files),
                    max_body=64 << 10) as srv:
        yield srv, ctx


def _call(srv: RestServer, ctx: ssl.SSLContext, method: str, path: str, user: str,
          password: str, body: bytes | None = None, ctype: str | None = None
          ) -> tuple[int, Message, bytes]:
    c = http.client.HTTPSConnection("localhost", srv.port, context=ctx, timeout=20)
    try:
        headers = {"Authorization": "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()}
        if ctype:
            headers["Content-Type"] = ctype
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def test_over_https_a_device_uploads_and_the_admin_downloads(api: Api, https) -> None:
    srv, ctx = https
    _, eid = device_event(api, DEV)
    path = f"/event/events/{eid}/binaries"
    data = LOG * 2000  # 100 KB: over the server's max_body, streamed to the store's disk
    body, ct = multipart(data, {"name": "agent.log", "type": "text/plain"})
    st, _, out = _call(srv, ctx, "POST", path, DEV, DEV_PW, body, ct)
    assert st == 201, out
    assert json.loads(out)["length"] == len(data)
    st, headers, got = _call(srv, ctx, "GET", path, ADMIN, ADMIN_PW)
    assert st == 200 and got == data
    assert headers["Content-Type"] == "text/plain"
    assert headers["Content-Length"] == str(len(data))
    assert "agent.log" in headers["Content-Disposition"]
    st, _, _ = _call(srv, ctx, "GET", path, OTHER, OTHER_PW)
    assert st == 403
    st, _, _ = _call(srv, ctx, "GET", path, DEV, "wrong")
    assert st == 401
