"""The emulator's /inventory/binaries: upload (multipart, streamed to disk, size-limited), download
with Range and resume, replace, delete, who may do what, over HTTP and HTTPS (the REST API's TLS
listener with the emulator's CA). Api and RestServer only: no Mosquitto needed."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from microcot_host.emulator.api import Api, ApiResult
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.certs import (
    client_ssl_context,
    ensure_ca_and_server,
    server_ssl_context,
)
from microcot_host.emulator.forms import FormError, FormReader, FormTooLarge, parse_form
from microcot_host.emulator.http import RestServer, parse_range
from microcot_host.emulator.model import Model

pytestmark = pytest.mark.timeout(60)

ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
DEV, DEV_PW = "89490200000000000011", "Device-Pass-1"


def multipart(obj: dict[str, Any] | None, data: bytes | None, ctype: str = "application/zip",
              boundary: str = "b0undary") -> tuple[bytes, str]:
    out = b""
    if obj is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"object\"\r\n"
                "Content-Type: application/json\r\n\r\n").encode() + json.dumps(obj).encode()
        out += b"\r\n"
    if data is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"fw.bin\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data
        out += b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def store(tmp_path: Path) -> BinaryStore:
    return BinaryStore(tmp_path / "binaries", max_size=4 << 20)


@pytest.fixture
def api(store: BinaryStore) -> Api:
    a = Api(Model(), base_url="http://emu:8080", binaries=store)
    a.issue_credentials(DEV, DEV_PW)
    return a


def upload(api: Api, data: bytes, name: str = "fw.bin", user: str | None = None,
           **obj: Any) -> ApiResult:
    body, ct = multipart({"name": name, "type": "c8y_Firmware", **obj}, data)
    return api.handle("POST", "/inventory/binaries", body, ct, user)


# -- Api level --------------------------------------------------------------------------------

def test_upload_get_list_replace_delete(api: Api, store: BinaryStore) -> None:
    data = os.urandom(5000) + b"\r\n--b0undarX\r\n\r\n" + os.urandom(100)  # almost a boundary
    r = upload(api, data, version="1.2.3")
    assert r.status == 201, r
    mo = r.body
    assert isinstance(mo, dict)
    assert mo["c8y_IsBinary"] == "" and mo["name"] == "fw.bin" and mo["type"] == "c8y_Firmware"
    assert mo["length"] == len(data) and mo["contentType"] == "application/zip"
    assert mo["c8y_Checksum"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert mo["version"] == "1.2.3"
    assert mo["self"] == f"http://emu:8080/inventory/binaries/{mo['id']}"
    assert r.headers["Location"] == mo["self"]
    assert store.path(mo["id"]).read_bytes() == data
    assert [p.name for p in store.directory.iterdir()] == [mo["id"]]  # no temporary left

    got = api.handle("GET", f"/inventory/binaries/{mo['id']}", user=DEV)
    assert got.status == 200 and got.content is not None and got.body is None
    assert got.content.read() == data and got.content.length == len(data)
    assert got.content.etag == '"%s"' % hashlib.sha256(data).hexdigest()
    # the managed object is an ordinary one too
    assert api.handle("GET", f"/inventory/managedObjects/{mo['id']}").body["length"] == len(data)

    other = upload(api, b"second", name="cfg.txt").body
    api.handle("POST", "/inventory/managedObjects", {"name": "not a binary"})
    listed = api.handle("GET", "/inventory/binaries?pageSize=10").body
    assert [m["id"] for m in listed["managedObjects"]] == [mo["id"], other["id"]]
    assert api.handle("GET", "/inventory/binaries?text=cfg").body["managedObjects"][0][
        "id"] == other["id"]

    # PUT replaces with the raw body (or a multipart file part)
    r = api.handle("PUT", f"/inventory/binaries/{mo['id']}", b"v2 content", "text/plain")
    assert r.status == 201 and r.body["length"] == 10 and r.body["contentType"] == "text/plain"
    assert r.body["c8y_Checksum"]["sha256"] == hashlib.sha256(b"v2 content").hexdigest()
    assert store.path(mo["id"]).read_bytes() == b"v2 content"
    body, ct = multipart(None, b"v3")
    assert api.handle("PUT", f"/inventory/binaries/{mo['id']}", body, ct).body["length"] == 2
    assert store.path(mo["id"]).read_bytes() == b"v3"

    assert api.handle("DELETE", f"/inventory/binaries/{mo['id']}").status == 204
    assert not store.path(mo["id"]).exists()
    assert api.handle("GET", f"/inventory/binaries/{mo['id']}").status == 404
    # deleting the managed object removes the file as well
    assert api.handle("DELETE", f"/inventory/managedObjects/{other['id']}").status == 204
    assert not store.path(other["id"]).exists()


def test_who_may_and_bad_uploads(api: Api, store: BinaryStore) -> None:
    mo = upload(api, b"abc").body
    # a device reads, but does not write
    for method, target in (("POST", "/inventory/binaries"),
                           ("PUT", f"/inventory/binaries/{mo['id']}"),
                           ("DELETE", f"/inventory/binaries/{mo['id']}")):
        body, ct = multipart({"name": "x"}, b"x")
        r = api.handle(method, target, body, ct, user=DEV)
        assert r.status == 403 and r.body["error"] == "security/Forbidden", r
    assert api.handle("GET", f"/inventory/binaries/{mo['id']}", user=DEV).status == 200
    assert api.handle("GET", "/inventory/binaries", user=DEV).status == 200
    assert upload(api, b"by admin", user=ADMIN).status == 201

    # size limit: a clear 413
    big = upload(api, b"\0" * ((4 << 20) + 1))
    assert big.status == 413 and "at most 4194304 bytes" in big.body["message"]
    # no multipart, no boundary, no file part, no name, JSON
    assert api.handle("POST", "/inventory/binaries", b"raw", "text/plain").status == 400
    assert api.handle("POST", "/inventory/binaries", b"--x--", "multipart/form-data").status == 400
    body, ct = multipart({"name": "n"}, None)
    r = api.handle("POST", "/inventory/binaries", body, ct)
    assert r.status == 422 and "file" in r.body["message"]
    body, ct = multipart({"type": "t"}, b"x")
    assert api.handle("POST", "/inventory/binaries", body, ct).status == 422
    assert api.handle("POST", "/inventory/binaries", {"name": "x"}).status == 400
    assert api.handle("PUT", f"/inventory/binaries/{mo['id']}", {"name": "x"}).status == 415
    # a managed object that is no binary is not served as one
    plain = api.handle("POST", "/inventory/managedObjects", {"name": "p"}).body
    assert api.handle("GET", f"/inventory/binaries/{plain['id']}").status == 404
    assert api.handle("PUT", "/inventory/binaries/99999", b"x", "text/plain").status == 404
    names = sorted(p.name for p in store.directory.iterdir())
    assert all(not n.startswith(".") for n in names)  # failed uploads leave nothing


def test_multipart_parser_and_ranges() -> None:
    body, ct = multipart({"name": "n"}, b"\r\n--b0undar\r\n")
    parts = parse_form(body, ct).parts
    assert [(p.name, p.filename, p.content_type) for p in parts] == [
        ("object", None, "application/json"), ("file", "fw.bin", "application/zip")]
    assert parts[1].data() == b"\r\n--b0undar\r\n"
    for bad_ct in ("multipart/form-data", "text/plain", "multipart/form-data; boundary=x"):
        with pytest.raises(FormError):
            parse_form(body, bad_ct)
    with pytest.raises(FormError, match="not closed"):
        parse_form(body[:-20], ct)
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=7-", 10) == (7, 9)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=-0", 10) == "unsatisfiable"
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=4-2", 10) is None       # malformed: the whole file
    assert parse_range("bytes=0-1,3-4", 10) is None   # several ranges: the whole file
    assert parse_range("items=0-1", 10) is None


def test_streamed_form_spools_its_file_part(store: BinaryStore) -> None:
    """Fed in small chunks, the file part goes to a file of the store with its SHA-256; the
    object part stays in memory; limits are kept and a refused form leaves no file."""
    data = os.urandom(100_000)
    body, ct = multipart({"name": "n"}, data)
    reader = FormReader(ct, store, max_file=len(data))
    for i in range(0, len(body), 777):
        reader.feed(body[i:i + 777])
    form = reader.finish()
    f = form.file()
    assert f is not None and not isinstance(f.content, bytes)
    assert f.content.sha256 == hashlib.sha256(data).hexdigest() and f.data() == data
    assert form.named("object").content == b'{"name": "n"}'  # type: ignore[union-attr]
    form.discard()
    assert list(store.directory.iterdir()) == []

    reader = FormReader(ct, store, max_file=len(data) - 1)
    with pytest.raises(FormTooLarge):
        reader.feed(body)
    reader.abort()
    big_obj, ct = multipart({"name": "x" * 70_000}, b"x")
    with pytest.raises(FormError, match="object"):
        FormReader(ct, store).feed(big_obj)
    many = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i
                    for i in range(20)) + b"--b--\r\n"
    with pytest.raises(FormError, match="parts"):
        parse_form(many, "multipart/form-data; boundary=b")


# -- over HTTP and HTTPS ----------------------------------------------------------------------

def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None, user: str = ADMIN, password: str = ADMIN_PW,
         ctx: ssl.SSLContext | None = None) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", _auth(user, password))
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=20, context=ctx) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture
def servers(api: Api, tmp_path: Path) -> Iterator[tuple[RestServer, RestServer, Path]]:
    files = ensure_ca_and_server(tmp_path / "tls-home")
    seen: list[str] = []
    with RestServer(api, ADMIN, ADMIN_PW, on_device=seen.append) as plain, \
            RestServer(api, ADMIN, ADMIN_PW, tls=server_ssl_context(files),
                       set_base_url=False) as tls:
        plain.seen = seen  # type: ignore[attr-defined]
        yield plain, tls, files.ca_cert


def test_streamed_upload_download_and_range_resume(servers: Any, store: BinaryStore) -> None:
    plain, tls, ca = servers
    data = os.urandom(3 << 20)  # larger than the 1 MiB limit of JSON bodies
    body, ct = multipart({"name": "fw.bin", "type": "c8y_Firmware"}, data)
    status, headers, raw = call(plain.url + "/inventory/binaries", "POST", body,
                                {"Content-Type": ct})
    assert status == 201, raw
    mo = json.loads(raw)
    assert mo["self"] == f"{plain.url}/inventory/binaries/{mo['id']}"
    url = f"/inventory/binaries/{mo['id']}"
    sha = hashlib.sha256(data).hexdigest()

    # the device downloads over HTTPS, verifying the emulator's CA, with its own credentials
    ctx = client_ssl_context(ca)
    assert tls.url.startswith("https://")
    status, h, got = call(tls.url + url, user=DEV, password=DEV_PW, ctx=ctx)
    assert status == 200 and got == data
    assert h["Content-Length"] == str(len(data)) and h["Content-Type"] == "application/zip"
    assert h["ETag"] == f'"{sha}"' and h["Accept-Ranges"] == "bytes"
    assert "fw.bin" in h["Content-Disposition"]
    assert plain.seen == []  # the hook is the plain server's; the TLS one has none here
    call(plain.url + url, user=DEV, password=DEV_PW)
    assert plain.seen == [DEV]

    # a partial read, the connection dropped, then resumed with Range (and If-Range)
    host, port = tls.url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
    conn.request("GET", url, headers={"Authorization": _auth(DEV, DEV_PW)})
    resp = conn.getresponse()
    first = resp.read(1_000_000)
    conn.close()
    assert len(first) == 1_000_000
    status, h, rest = call(tls.url + url, headers={"Range": f"bytes={len(first)}-",
                                                   "If-Range": f'"{sha}"'},
                           user=DEV, password=DEV_PW, ctx=ctx)
    assert status == 206
    assert h["Content-Range"] == f"bytes {len(first)}-{len(data) - 1}/{len(data)}"
    assert hashlib.sha256(first + rest).hexdigest() == sha

    status, h, part = call(plain.url + url, headers={"Range": "bytes=10-19"})
    assert (status, part, h["Content-Length"]) == (206, data[10:20], "10")
    status, h, part = call(plain.url + url, headers={"Range": "bytes=-5"})
    assert (status, part) == (206, data[-5:])
    status, h, raw = call(plain.url + url, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{len(data)}"
    # another version than the client holds: the whole file, not a mix
    status, h, part = call(plain.url + url, headers={"Range": "bytes=10-", "If-Range": '"old"'})
    assert status == 200 and part == data
    # HEAD: the headers alone
    status, h, part = call(plain.url + url, "HEAD")
    assert status == 200 and part == b"" and h["Content-Length"] == str(len(data))

    # a device may not upload; replacing over HTTP with a raw body
    status, _, raw = call(plain.url + "/inventory/binaries", "POST", body,
                          {"Content-Type": ct}, user=DEV, password=DEV_PW)
    assert status == 403
    status, _, raw = call(tls.url + url, "PUT", b"new", {"Content-Type": "text/plain"}, ctx=ctx)
    assert status == 201 and json.loads(raw)["length"] == 3
    assert call(plain.url + url)[2] == b"new"
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".")]


def test_upload_over_the_limit_is_a_clear_413(servers: Any, store: BinaryStore) -> None:
    plain, _, _ = servers
    data = b"\0" * ((4 << 20) + (128 << 10))  # beyond the limit and the framing slack
    body, ct = multipart({"name": "big"}, data)
    status, h, raw = call(plain.url + "/inventory/binaries", "POST", body, {"Content-Type": ct})
    assert status == 413
    err = json.loads(raw)
    assert err["error"] == "inventory/Request Entity Too Large"
    assert "4194304 bytes" in err["message"] and "max_binary" in err["message"]
    # within the framing slack but over the limit: the API's own 413
    body, ct = multipart({"name": "big"}, b"\0" * ((4 << 20) + 10))
    status, h, raw = call(plain.url + "/inventory/binaries", "POST", body, {"Content-Type": ct})
    assert status == 413 and "at most 4194304 bytes" in json.loads(raw)["message"]
    assert list(store.directory.iterdir()) == []
    # JSON bodies keep their 1 MiB limit
    status, _, _ = call(plain.url + "/inventory/managedObjects", "POST", b"{" * (2 << 20),
                        {"Content-Type": "application/json"})
    assert status == 413


def test_https_refuses_an_untrusting_client(servers: Any) -> None:
    _, tls, _ = servers
    with pytest.raises(urllib.error.URLError):
        call(tls.url + "/inventory/binaries", ctx=ssl.create_default_context())
    # and still serves the next client
    status, _, _ = call(tls.url + "/inventory/binaries", ctx=client_ssl_context(servers[2]))
    assert status == 200
