"""Firmware download and OTA update on the device side, against a real HTTPS file server (TLS with
the emulator's CA from microcot_host.emulator.certs, Basic auth, Range support, connections it
breaks on purpose): microcot.httpget on CPython in-process and ON the ESP32 model (a virtual board
of the i386-esp32 build at esp32-generic's heap budget), and the virtual board's emulated OTA
partitions: an image downloaded into the next partition, set_boot, reset, the new version runs;
no mark_app_valid_cancel_rollback before the next reset -> rollback; with it, no rollback; an
image that crashes at boot -> rollback; set_boot refuses what is not an app image."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fidelity_fixtures import need_runtime

from microcot import httpget
from microcot_host import boards, transport
from microcot_host.deploy import compile_module
from microcot_host.emulator.certs import ensure_ca_and_server
from microcot_host.paths import firmware_dir
from microcot_host.vboard import VirtualBoard
from microcot_host.vboard.board import OTA_CRASH_PROJECT, app_image
from microcot_host.vboard.models import heap_for, micropython_for

pytestmark = pytest.mark.timeout(240)
USER, PASSWORD = "t100/device_fw1", "s3cret-pw"
SIZE = 200 * 1024
MODULES = ("__init__", "hal", "mqttpkt", "tlsctx", "mqtt", "httpget", "ota")


class FileServer:
    """HTTPS (or HTTP) server of in-memory files with Range, Basic auth and planned drops."""

    def __init__(self, tls_dir: Path | None, files: dict[str, bytes], ranges: bool = True) -> None:
        self.files = dict(files)
        self.ranges = ranges
        self.drops: list[int] = []  # the next responses break after this many body bytes
        self.log: list[tuple[str, str | None, bool]] = []
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                ok = self.headers.get("Authorization") == srv.auth
                srv.log.append((self.path, rng, ok))
                if not ok:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="c8y"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = srv.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and srv.ranges:
                    first = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = memoryview(body)[first:]
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if srv.drops:
                    part = part[:srv.drops.pop(0)]
                    self.close_connection = True
                for i in range(0, len(part), 16384):
                    self.wfile.write(part[i:i + 16384])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls_dir is not None:
            tls = ensure_ca_and_server(tls_dir)
            self.ca = tls.ca_cert
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.server_cert, tls.server_key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://localhost:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _blob(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    h = hashlib.sha256(seed.to_bytes(4, "big"))
    while len(out) < n:
        h = hashlib.sha256(h.digest())
        out += h.digest() * 32
    return bytes(out[:n])


BODY = _blob(SIZE)
IMAGE = app_image("2.1.0", "microcot-fw", size=150 * 1024, fill=_blob(4096, 2))
CRASH = app_image("9.9.9", OTA_CRASH_PROJECT, size=8192)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tls")


@pytest.fixture
def server(tls_dir):
    s = FileServer(tls_dir, {"/fw.bin": BODY, "/image.bin": IMAGE, "/crash.bin": CRASH,
                             "/junk.bin": b"\x00" * 9000})
    yield s
    s.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return ensure_ca_and_server(tmp_path_factory.mktemp("other-tls")).ca_cert


# -- CPython in-process -------------------------------------------------------------------------

class FileSink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b
        return len(b)

    def seek(self, pos):
        del self.data[pos:]


def test_cpython_download_with_a_drop_resumes_with_range(server):
    server.drops = [70_000]
    sink = FileSink()
    d = httpget.download(server.url("/fw.bin"), sink, sha256=hashlib.sha256(BODY).hexdigest(),
                         user=USER, password=PASSWORD, ca=server.ca.read_bytes(), timeout=10)
    assert bytes(sink.data) == BODY and d.attempts == 2 and d.size == SIZE
    assert [r[1] for r in server.log] == [None, "bytes=70000-"]
    assert all(r[2] for r in server.log)


def test_cpython_refusals(server, other_ca):
    ca = server.ca.read_bytes()
    e = httpget.HTTPStatusError
    err = pytest.raises(e, httpget.download, server.url("/fw.bin"), FileSink(), ca=ca,
                        user=USER, password="wrong").value
    assert err.status == 401 and "wrong" not in str(err)
    assert pytest.raises(e, httpget.download, server.url("/nope"), FileSink(), ca=ca, user=USER,
                         password=PASSWORD).value.status == 404
    err = pytest.raises(httpget.ChecksumError, httpget.download, server.url("/fw.bin"),
                        FileSink(), sha256="ab" * 32, ca=ca, user=USER, password=PASSWORD).value
    assert err.offset == SIZE
    err = pytest.raises(httpget.HTTPConnectionError, httpget.download, server.url("/fw.bin"),
                        FileSink(), ca=other_ca.read_bytes(), user=USER, password=PASSWORD).value
    assert "TLS handshake" in str(err) and server.log[-1][0] != "/fw.bin" or len(server.log) == 3


def test_cpython_server_without_ranges_starts_over(tls_dir):
    s = FileServer(tls_dir, {"/fw.bin": BODY}, ranges=False)
    try:
        s.drops = [50_000]
        sink = FileSink()
        d = httpget.download(s.url("/fw.bin"), sink, sha256=hashlib.sha256(BODY).digest(),
                             user=USER, password=PASSWORD, ca=str(s.ca), timeout=10)
        assert bytes(sink.data) == BODY and d.restarts == 1
    finally:
        s.close()


# -- ON the ESP32 model ---------------------------------------------------------------------------

def _lib(flash: Path) -> None:
    (flash / "lib" / "microcot").mkdir(parents=True, exist_ok=True)
    for m in MODULES:
        compile_module(firmware_dir() / "microcot" / f"{m}.py", f"microcot/{m}.py", None,
                       flash / "lib" / "microcot")


def esp32_board(tmp_path: Path, name: str, ota: bool | None = None) -> VirtualBoard:
    bdef = boards.load("esp32-generic")
    need_runtime(bdef.runtime)
    flash = tmp_path / "flash"
    _lib(flash)
    (flash / "board.json").write_text(json.dumps({"name": "esp32-generic", "family": "esp32",
                                                  "chip": "esp32"}))
    return VirtualBoard(name, heap=heap_for(bdef, bdef.runtime), flash_dir=flash, ota=ota,
                        micropython=micropython_for(bdef.runtime)).start()


def run(vb: VirtualBoard, code: str, timeout: float = 120) -> str:
    t = transport.open_board(vb.port)
    try:
        return transport.run(t, code, timeout=timeout).decode()
    finally:
        transport.close(t)


BOARD_DL = """
import gc, time, hashlib, binascii
gc.collect()
free0 = gc.mem_free()
from microcot import httpget
gc.collect()
fmod = gc.mem_free()
from microcot import mqtt  # the agent has it loaded while it downloads (tls_context)
gc.collect()
free1 = gc.mem_free()
low = free1
class Sink:
    def __init__(self):
        self.f = open('/dl.bin', 'wb')
        self.n = 0
    def write(self, b):
        self.n += len(b)
        return self.f.write(b)
    def seek(self, p):
        self.f.seek(p)
d = httpget.Download(%(url)r, Sink(), sha256=%(sha)r, user=%(user)r, password=%(pw)r,
                     ca='/ca.pem', timeout=10)
t0 = time.ticks_ms()
k = 0
try:
    while not d.step():
        k += 1
        if %(measure)r and k %% 8 == 0:
            gc.collect()
            low = min(low, gc.mem_free())
    ms = time.ticks_diff(time.ticks_ms(), t0)
    d.sink.f.close()
    print('OK', d.received, d.attempts, ms, free0, fmod, free1, low)
except Exception as e:
    d.sink.f.close()
    print('ERR', type(e).__name__, e)
"""


def board_download(vb, server, path="/fw.bin", sha=None, measure=False, ca=None):
    (vb.flash_dir / "ca.pem").write_bytes((ca or server.ca).read_bytes())
    out = run(vb, BOARD_DL % {"url": server.url(path), "user": USER, "pw": PASSWORD,
                              "sha": sha, "measure": measure})
    return out.strip().splitlines()[-1].split(None, 1 if "ERR" in out else 8)


def test_board_download_resumes_checks_sha_and_ca(server, other_ca, tmp_path):
    vb = esp32_board(tmp_path, "t-httpget-dl")
    try:
        server.drops = [SIZE // 2]
        res = board_download(vb, server, sha=hashlib.sha256(BODY).hexdigest(), measure=True)
        assert res[0] == "OK", res
        received, attempts, _ms, free0, fmod, free1, low = map(int, res[1:])
        assert received == SIZE and attempts == 2
        assert (vb.flash_dir / "dl.bin").read_bytes() == BODY
        assert [r[1] for r in server.log] == [None, f"bytes={SIZE // 2}-"]
        # the whole download, TLS included (outside the GC heap on the ESP32 model), fits in
        # what the board has; the client's own objects and buffer take a few KB
        print(f"heap: {free0} free before, httpget import {free0 - fmod} B, mqtt import "
              f"{fmod - free1} B, {free1} free then, {low} lowest during (download needs "
              f"{free1 - low} B)")
        assert free1 - low < 16_000
        res = board_download(vb, server, sha="00" * 32)
        assert res[0] == "ERR" and res[1].startswith("ChecksumError"), res
        res = board_download(vb, server, ca=other_ca)
        assert res[0] == "ERR" and "TLS handshake" in res[1], res
    finally:
        vb.stop()


OTA_UPDATE = """
from microcot import httpget, ota
w = ota.Writer(%(size)d)
d = httpget.download(%(url)r, w, sha256=%(sha)r, user=%(user)r, password=%(pw)r,
                     ca='/ca.pem', timeout=10)
print(w.label, w.finish(sha256=%(sha)r)['version'])
w.activate()
print(ota.status())
"""


def reset_and_wait(vb: VirtualBoard) -> None:
    before = vb.hard_resets
    t = transport.open_board(vb.port)
    try:
        t.exec_raw_no_follow("import machine\nmachine.reset()")
    finally:
        transport.close(t)
    deadline = time.monotonic() + 20
    while vb.hard_resets == before:
        assert time.monotonic() < deadline, "no hard reset"
        time.sleep(0.05)
    assert vb.wait_ready(20)


def running(vb: VirtualBoard) -> dict:
    out = run(vb, "from microcot import ota\nimport json\nprint(json.dumps(ota.running()))")
    return json.loads(out.strip().splitlines()[-1])


def update(vb, server, path, body):
    (vb.flash_dir / "ca.pem").write_bytes(server.ca.read_bytes())
    return run(vb, OTA_UPDATE % {"size": len(body), "url": server.url(path), "user": USER,
                                 "pw": PASSWORD, "sha": hashlib.sha256(body).hexdigest()})


def test_board_ota_update_rollback_and_confirm(server, tmp_path):
    vb = esp32_board(tmp_path, "t-ota-update")
    try:
        assert running(vb) == {"label": "ota_0", "version": "factory", "project": "micropython"}
        server.drops = [60_000]
        out = update(vb, server, "/image.bin", IMAGE)
        assert "ota_1 2.1.0" in out and "'boot': 'ota_1'" in out and "'running': 'ota_0'" in out
        assert (vb.ota_dir / "ota_1.bin").read_bytes()[:len(IMAGE)] == IMAGE
        # a soft reset keeps the running app, as on an ESP32
        run(vb, "import machine\nprint(1)")
        assert running(vb)["version"] == "factory"
        reset_and_wait(vb)
        assert running(vb) == {"label": "ota_1", "version": "2.1.0", "project": "microcot-fw"}
        # not confirmed before the next reset: the bootloader rolls back
        reset_and_wait(vb)
        assert running(vb)["version"] == "factory" and vb.ota_rollbacks == 1
        # again, confirmed this time: it stays
        update(vb, server, "/image.bin", IMAGE)
        reset_and_wait(vb)
        assert run(vb, "from microcot import ota\nprint(ota.mark_valid())").strip() == "True"
        reset_and_wait(vb)
        assert running(vb)["version"] == "2.1.0" and vb.ota_rollbacks == 1
        # an image that crashes at boot: back to 2.1.0 at once
        out = update(vb, server, "/crash.bin", CRASH)
        assert "ota_0 9.9.9" in out
        reset_and_wait(vb)
        assert running(vb) == {"label": "ota_1", "version": "2.1.0", "project": "microcot-fw"}
        assert vb.ota_rollbacks == 2
        # set_boot refuses what is not an app image
        out = run(vb, "from microcot import ota\nw = ota.Writer()\nw.write(bytes(5000))\n"
                      "try:\n w.activate()\nexcept ota.OTAError as e:\n print(e)")
        assert "ESP_ERR_OTA_VALIDATE_FAILED" in out
    finally:
        vb.stop()


def test_board_without_ota_partitions_says_so(tmp_path):
    vb = esp32_board(tmp_path, "t-ota-none", ota=False)
    try:
        out = run(vb, "from microcot import ota\ntry:\n ota.Writer()\nexcept ota.OTAUnsupported "
                      "as e:\n print(e)")
        assert "this board has no OTA partitions" in out
    finally:
        vb.stop()
