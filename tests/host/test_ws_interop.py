"""microcot.ws against a peer nobody here wrote: the `websockets` library's server, in-process
(asyncio in a thread). On CPython all of it; on the MicroPython unix port (a subprocess running
MP_SCRIPT) the subset marked there. A few paths the library will not take (a server that never
answers, one that stops ponging) use raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path

import pytest
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
if str(FIRMWARE) not in sys.path:
    sys.path.insert(0, str(FIRMWARE))

from microcot import ws as W  # noqa: E402
from microcot.ws import WebSocketClient  # noqa: E402

MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or \
    shutil.which("micropython")
KiB = 1024
FRAG = 0x10000  # the server fragments its messages into frames of this size (the client's limit)


class Peer:
    """A websockets server in a thread; `log` gathers what it saw per connection."""

    def __init__(self, ssl_ctx: ssl.SSLContext | None = None, compression: str | None = None):
        self.ssl_ctx = ssl_ctx
        self.compression = compression
        self.log: list[dict] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Peer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def last(self, path: str, timeout: float = 3.0) -> dict:
        """The log entry of the latest connection to `path`, once it has ended."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            mine = [e for e in self.log if e["path"].split("?")[0] == path]
            if mine and "close_code" in mine[-1]:
                return mine[-1]
            time.sleep(0.01)
        raise AssertionError("no finished connection to %s: %s" % (path, self.log))

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, ssl=self.ssl_ctx, max_size=None,
                         compression=self.compression, ping_interval=None,
                         select_subprotocol=self._subprotocol,
                         process_request=self._process_request) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    @staticmethod
    def _subprotocol(connection, offered):
        return next((p for p in offered if p in ("chat", "superchat")), None)

    def _process_request(self, connection, request):
        if request.path.startswith("/auth") and \
                request.headers.get("Authorization") != "Bearer good-token":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad token\n")
        if request.path.startswith("/teapot"):
            return connection.respond(HTTPStatus.IM_A_TEAPOT, "no\n")
        return None

    async def _handler(self, ws) -> None:
        path = ws.request.path
        q = dict(p.split("=", 1) for p in path.partition("?")[2].split("&") if "=" in p)
        entry = {"path": path, "got": [], "subprotocol": ws.subprotocol,
                 "headers": {k: ws.request.headers.get(k) for k in
                             ("Authorization", "Origin", "Sec-WebSocket-Protocol")}}
        self.log.append(entry)
        try:
            if path.startswith("/send"):  # a message of n bytes, fragmented into frag bytes
                n, frag = int(q["n"]), int(q.get("frag", FRAG))
                data = bytes(i * 7 & 0x7F for i in range(n))
                msg = data.decode() if q.get("kind") == "text" else data
                await ws.send([msg[i:i + frag] for i in range(0, n, frag)] if n > frag else msg)
            if path.startswith("/close"):
                await ws.close(int(q["code"]), q.get("reason", ""))
            elif path.startswith("/abort"):
                ws.transport.abort()
            elif path.startswith("/badutf8"):
                await ws.send(b"ok \xc0\xaf", text=True)
            elif path.startswith("/ping"):
                t0 = time.monotonic()
                await asyncio.wait_for(await ws.ping(b"are you there"), 3)
                entry["pong_after"] = time.monotonic() - t0
                await ws.send("pong received")
            async for m in ws:
                entry["got"].append(m)
                step = FRAG // 4 if isinstance(m, str) else FRAG  # frames within the limit
                await ws.send([m[i:i + step] for i in range(0, len(m), step)]
                              if len(m) > step else m)
        except Exception as e:  # the client's failures are what several tests provoke
            entry["error"] = repr(e)
        finally:
            await ws.wait_closed()
            entry["close_code"] = ws.close_code
            entry["close_reason"] = ws.close_reason


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from microcot_host.emulator.certs import ensure_ca_and_server

    return ensure_ca_and_server(tmp_path_factory.mktemp("tls"))


def _server_ctx(files) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.server_cert, files.server_key)
    return ctx


@pytest.fixture(scope="module")
def peer():
    p = Peer().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def zpeer():
    p = Peer(compression="deflate").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def tpeer(tls_files):
    p = Peer(_server_ctx(tls_files)).start()
    yield p
    p.stop()


class Client(WebSocketClient):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.msgs: list[tuple[bytes, int]] = []
        self.closes: list[tuple[int, bytes]] = []

    def on_message(self, content, content_type):
        self.msgs.append((bytes(content), content_type))

    def on_close(self, status_code, content):
        self.closes.append((status_code, bytes(content)))


def run(c: WebSocketClient, until, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        c.execute(5)
        if until():
            return True
    return False


def opened(port: int, uri: str = "/", **kw) -> Client:
    """A client whose opening handshake succeeded (the server may have acted since)."""
    c = Client("127.0.0.1", port, uri, **kw)
    c.connect()
    assert run(c, lambda: c.state != W.WS_STATUS_BUSY)
    assert c.http_status == 101 and c.state != W.WS_STATUS_BUSY, (c.state, c.error_msg)
    return c


def finish(c: WebSocketClient) -> None:
    if c.connected:
        c.disconnect()
    assert run(c, lambda: not c.active)


# --- echo, fragmentation, limits ------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 125, 126, 0xFFFF, 0x10000, 0x10001, 300 * KiB, 0x100000])
def test_echo_binary_and_text_up_to_the_message_limit(peer, size):
    c = opened(peer.port, "/echo")
    data = bytes((i * 31 + 7) & 0xFF for i in range(size))
    text = "".join(chr(0x41 + i % 26) for i in range(size))
    assert c.send_message(data, text=False)
    assert c.send_message(text)
    assert run(c, lambda: len(c.msgs) == 2), c.error_msg
    assert c.msgs == [(data, W.WS_CONTENT_BINARY), (text.encode(), W.WS_CONTENT_TEXT)]
    finish(c)
    e = peer.last("/echo")
    assert e["got"][-2:] == [data, text]
    assert e["close_code"] == 1000


def test_client_fragments_at_max_send_frame_size(peer):
    # websockets reassembles; a frame size of 1000 makes 101 frames of a 100 KB message
    c = opened(peer.port, "/echo", max_send_frame_size=1000)
    msg = "é" * 50_000
    assert c.send_message(msg)
    assert run(c, lambda: c.msgs)
    assert c.msgs[0] == (msg.encode(), W.WS_CONTENT_TEXT)
    finish(c)


def test_server_fragmented_message_reassembled(peer):
    c = opened(peer.port, "/send?n=200000&frag=777&kind=text")
    assert run(c, lambda: c.msgs)
    assert c.msgs[0] == (bytes(i * 7 & 0x7F for i in range(200000)), W.WS_CONTENT_TEXT)
    finish(c)


def test_message_over_the_limit_closes_1009(peer):
    c = opened(peer.port, "/send?n=%d&frag=%d" % (0x100001, FRAG))
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_INVALID_MSG_SIZE and c.error and c.error_code == 1009
    assert c.close_reason == 1009 and not c.msgs
    assert peer.last("/send")["close_code"] == 1009


def test_frame_over_the_limit_closes_1009_without_taking_it(peer):
    c = opened(peer.port, "/send?n=%d&frag=%d" % (0x10001, 0x10001), max_recv_msg_size=0x200000)
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_INVALID_MSG_SIZE and c.close_reason == 1009
    assert len(c._reader.buf) == 0  # the 64 KiB + 1 payload was never stored


def test_limits_are_configurable(peer):
    c = opened(peer.port, "/send?n=5000&frag=5000", max_recv_frame_size=4096)
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_INVALID_MSG_SIZE
    c = opened(peer.port, "/send?n=5000&frag=1000", max_recv_frame_size=1000,
               max_recv_msg_size=5000)
    assert run(c, lambda: c.msgs)
    assert len(c.msgs[0][0]) == 5000
    finish(c)


def test_redelivery_when_on_message_declines(peer):
    class Picky(Client):
        def on_message(self, content, content_type):
            self.msgs.append((bytes(content), content_type))
            return W.S_FALSE if len(self.msgs) < 3 else W.S_OK

    c = Picky("127.0.0.1", peer.port, "/echo")
    c.connect()
    run(c, lambda: c.connected)
    c.send_message("one")
    c.send_message("two")
    assert run(c, lambda: len(c.msgs) == 4)
    assert [m for m, _ in c.msgs] == [b"one", b"one", b"one", b"two"]
    finish(c)


def test_invalid_utf8_from_the_server_closes_1007(peer):
    c = opened(peer.port, "/badutf8")
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_PROTOCOL_ERROR and c.close_reason == 1007
    assert peer.last("/badutf8")["close_code"] == 1007


# --- compression ---------------------------------------------------------------------------------

def test_compressed_both_ways(zpeer):
    c = opened(zpeer.port, "/echo", per_message_deflate=True)
    assert c.extensions is not None and c.can_compress
    msgs = ['{"tag":"t%d","value":%d}' % (i, i * i) * 20 for i in range(20)] + ["x" * 300_000]
    for m in msgs:
        assert c.send_message(m, compress=True)
        assert c.sent_compressed
    assert run(c, lambda: len(c.msgs) == len(msgs))
    assert [m for m, _ in c.msgs] == [m.encode() for m in msgs]
    finish(c)
    assert zpeer.last("/echo")["got"] == msgs


def test_compression_not_negotiated_sends_plain(peer):
    c = opened(peer.port, "/echo", per_message_deflate=True)  # the server has no compression
    assert c.extensions is None and not c.can_compress
    assert c.send_message("plain", compress=True)
    assert not c.sent_compressed
    assert run(c, lambda: c.msgs)
    finish(c)


def test_server_context_takeover_and_window_options(zpeer):
    for opts in ({"server_no_context_takeover": True, "client_no_context_takeover": True},
                 {"server_max_window_bits": 10, "client_max_window_bits": 9},
                 {"server_no_context_takeover": False, "client_max_window_bits": True}):
        c = opened(zpeer.port, "/echo", per_message_deflate=opts)
        cfg = c.extensions
        assert cfg is not None
        if opts.get("server_no_context_takeover"):
            assert cfg["snct"] and cfg["cnct"]
        if opts.get("server_max_window_bits"):
            assert cfg["sbits"] <= 10 and cfg["cbits"] <= 9
        for i in range(5):
            c.send_message("repeated payload %d " % i * 50, compress=True)
        assert run(c, lambda c=c: len(c.msgs) == 5)
        assert c.msgs[4][0] == ("repeated payload 4 " * 50).encode()
        finish(c)


# --- ping / pong and keep-alive ------------------------------------------------------------------

def test_server_ping_answered(peer):
    c = opened(peer.port, "/ping")
    assert run(c, lambda: c.msgs)
    assert c.msgs[0][0] == b"pong received"
    finish(c)


def test_keep_alive_ping_keeps_the_connection(peer):
    c = opened(peer.port, "/echo", keep_alive_interval=0.1, keep_alive_close_timeout=0.3)
    pings = []
    orig = c._frame

    def spy(op, payload, fin=True, rsv1=False):
        if op == W.OP_PING:
            pings.append(time.monotonic())
        return orig(op, payload, fin, rsv1)

    c._frame = spy
    run(c, lambda: False, 1.0)
    assert c.connected and len(pings) >= 3
    finish(c)


class SilentServer:
    """Completes the opening handshake (or not) and then never says a thing."""

    def __init__(self, handshake: bool = True):
        self.handshake = handshake
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(s)
            if self.handshake:
                req = b""
                while b"\r\n\r\n" not in req:
                    req += s.recv(4096)
                key = [ln.split(b":", 1)[1].strip() for ln in req.split(b"\r\n")
                       if ln.lower().startswith(b"sec-websocket-key")][0]
                s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                          % W.F.accept_key(key).encode())

    def close(self) -> None:
        self.sock.close()
        for s in self.conns:
            s.close()


def test_keep_alive_timeout_without_pong():
    srv = SilentServer()
    try:
        c = opened(srv.port, "/", keep_alive_interval=0.1, keep_alive_close_timeout=0.2)
        assert run(c, lambda: not c.active, 3)
        assert c.state == W.WS_STATUS_KEEP_ALIVE_TIMEDOUT and c.error
        assert c.closes == [(1011, b"")]
    finally:
        srv.close()


def test_connect_response_timeout():
    srv = SilentServer(handshake=False)
    try:
        c = Client("127.0.0.1", srv.port, "/", connect_response_timeout=0.3)
        c.connect()
        assert run(c, lambda: not c.active, 3)
        assert c.state == W.WS_STATUS_CONNECT_RES_TIMEDOUT and c.error
    finally:
        srv.close()


# --- close code paths ----------------------------------------------------------------------------

def test_client_disconnect_normal_and_with_code(peer):
    c = opened(peer.port, "/echo")
    assert c.disconnect()
    assert c.state == W.WS_STATUS_FINALIZE_DISCONNECT and not c.connected
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_SOCK_NO_CONN and not c.error and c.close_reason == 1000
    assert c.closes == [(1000, b"")]
    assert peer.last("/echo")["close_code"] == 1000
    c = opened(peer.port, "/echo?going")
    c.disconnect(1001, "going away")
    assert run(c, lambda: not c.active)
    e = peer.last("/echo")
    assert (e["close_code"], e["close_reason"]) == (1001, "going away")
    assert not c.send_message("too late")


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 3000, 4999])
def test_server_closes_with_code(peer, code):
    c = opened(peer.port, "/close?code=%d&reason=bye" % code)
    assert run(c, lambda: not c.active)
    assert c.closes == [(code, b"bye")]
    assert c.close_reason == code and c.state == W.WS_STATUS_SOCK_NO_CONN and not c.error
    assert peer.last("/close")["close_code"] == code  # our Close echoed the code


def test_connection_dropped_without_close(peer):
    c = opened(peer.port, "/abort")
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_SOCK_CONN_LOST and c.error
    assert c.close_reason == 1006 and c.closes == [(1006, b"")]


@pytest.mark.parametrize("exc", [RuntimeError, OSError])
def test_on_message_exception_closes_1011_and_execute_goes_on(peer, exc):
    class Broken(Client):
        def on_message(self, content, content_type):
            raise exc("handler bug")

    c = Broken("127.0.0.1", peer.port, "/echo")
    c.connect()
    run(c, lambda: c.connected)
    c.send_message("x")
    run(c, lambda: c.error, 2)  # execute() does not raise (issue 14)
    # even an OSError is the handler's, not a lost connection
    assert isinstance(c.handler_error, exc) and "handler bug" in c.error_msg
    assert c.state == W.WS_STATUS_INTERNAL_ERROR and c.close_reason == 1011
    run(c, lambda: not c.active)
    assert peer.last("/echo")["close_code"] == 1011


def test_tls_empty_dict_is_tls_never_plaintext():
    # issue 14: tls={} was taken as "no TLS": the request, Authorization included, went out in
    # plaintext. A plaintext server must only ever see a TLS ClientHello.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(2)
        with contextlib.suppress(OSError):
            while len(got) < 4096:
                d = conn.recv(4096)
                if not d:
                    break
                got.extend(d)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = Client("127.0.0.1", srv.getsockname()[1], "/", tls={},
               headers={"Authorization": "Bearer secret-token"}, connect_response_timeout=1)
    c.connect()
    run(c, lambda: c.error, 3)
    t.join(3)
    srv.close()
    assert got[:1] == b"\x16" and b"secret-token" not in got and b"GET " not in got, bytes(got[:40])
    assert c.error and c.state in (W.WS_STATUS_TLS_HANDSHAKE_FAIL, W.WS_STATUS_SOCK_CONN_LOST,
                                   W.WS_STATUS_SOCK_ERR_TLS, W.WS_STATUS_TLS_VERIFY_FAIL), c.state


def test_bad_settings_fail_at_connect():
    c = Client("127.0.0.1", 1, per_message_deflate={"server_max_window_bits": 7})
    assert not c.connect() and c.state == W.WS_STATUS_CONNECT_REQ_INTERNAL_ERROR
    c = Client("127.0.0.1", 1, tls={"no_such_option": 1})
    assert not c.connect() and c.state == W.WS_STATUS_TLS_SETUP
    c = Client("127.0.0.1", 1, uri="/a\r\nX: y")
    assert not c.connect() and c.state == W.WS_STATUS_CONNECT_REQ_INTERNAL_ERROR


# --- handshake -----------------------------------------------------------------------------------

def test_401_is_a_reject_with_the_status_kept(peer):
    c = Client("127.0.0.1", peer.port, "/auth", headers={"Authorization": "Bearer wrong"})
    c.connect()
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_CONNECT_RES_REJECT and c.http_status == 401
    assert c.error_code == 401 and "401" in c.error_msg
    c = Client("127.0.0.1", peer.port, "/teapot")
    c.connect()
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_CONNECT_RES_REJECT and c.http_status == 418


def test_authorization_origin_and_subprotocol_sent(peer):
    c = opened(peer.port, "/auth?x", headers={"Authorization": "Bearer good-token"},
               origin="https://plc.example", protocol="superchat, chat")
    assert c.protocol_selected == "superchat"
    finish(c)
    h = peer.last("/auth")["headers"]
    assert h["Authorization"] == "Bearer good-token" and h["Origin"] == "https://plc.example"
    assert h["Sec-WebSocket-Protocol"] == "superchat, chat"


def test_check_protocol_refusal(peer):
    class Strict(Client):
        def check_protocol(self, protocol):
            return protocol == "v2"

    c = Strict("127.0.0.1", peer.port, "/", protocol="chat")
    c.connect()
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_CONNECT_RES_INVALID and "chat" in c.error_msg


def test_connection_refused_and_bad_port():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = Client("127.0.0.1", port)
    c.connect()
    run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_SOCK_CONN_REFUSED and c.error
    c = Client("127.0.0.1", 70000)
    assert not c.connect()
    assert c.state == W.WS_STATUS_SOCK_CONN_INVAL


def test_reconfig(peer, zpeer):
    c = opened(peer.port, "/echo")
    c.port = zpeer.port
    c.per_message_deflate = True
    assert c.connect()  # no reconfig: the open connection stays
    assert c.connected and c.extensions is None
    assert c.connect(reconfig=True)
    assert run(c, lambda: c.connected)
    assert c.extensions is not None
    finish(c)


# --- TLS -----------------------------------------------------------------------------------------

def test_tls_verified(tpeer, tls_files):
    c = opened(tpeer.port, "/echo", tls={"ca": str(tls_files.ca_cert)})
    assert c.send_message("over tls")
    assert run(c, lambda: c.msgs)
    finish(c)
    # the seed's names, and the CA as PEM text
    c = opened(tpeer.port, "/echo", tls={"sCA": tls_files.ca_cert.read_text()})
    finish(c)


def test_tls_wrong_hostname_fails(tmp_path):
    from microcot_host.emulator.certs import ensure_ca_and_server

    files = ensure_ca_and_server(tmp_path, hostnames=("other.example",), ips=())
    p = Peer(_server_ctx(files)).start()
    try:
        c = Client("127.0.0.1", p.port, "/", tls={"ca": str(files.ca_cert)})
        c.connect()
        assert run(c, lambda: not c.active)
        assert c.state == W.WS_STATUS_TLS_CN_MISMATCH and c.error, (c.state, c.error_msg)
        # the check can be switched off explicitly
        c = opened(p.port, "/", tls={"no_server_cert_check": True})
        finish(c)
    finally:
        p.stop()


def test_tls_unknown_ca_fails(tpeer, tmp_path):
    from microcot_host.emulator.certs import ensure_ca_and_server

    other = ensure_ca_and_server(tmp_path)
    c = Client("127.0.0.1", tpeer.port, "/", tls={"ca": str(other.ca_cert)})
    c.connect()
    assert run(c, lambda: not c.active)
    assert c.state == W.WS_STATUS_TLS_VERIFY_FAIL, (c.state, c.error_msg)


def _client_cert(tls_files, out: Path, password: bytes | None = None) -> tuple[Path, Path]:
    """A client certificate signed by the test CA: (cert.pem, key.pem)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir = tls_files.ca_cert.parent
    ca = x509.load_pem_x509_certificate(tls_files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-0001")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    enc = serialization.BestAvailableEncryption(password) if password else \
        serialization.NoEncryption()
    cp, kp = out / "client.pem", out / ("client-enc.key" if password else "client.key")
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8, enc))
    return cp, kp


@pytest.fixture(scope="module")
def mtls_peer(tls_files):
    ctx = _server_ctx(tls_files)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tls_files.ca_cert)
    p = Peer(ctx).start()
    yield p
    p.stop()


def test_tls_client_certificate(mtls_peer, tls_files, tmp_path):
    cert, key = _client_cert(tls_files, tmp_path)
    c = opened(mtls_peer.port, "/echo", tls={"ca": str(tls_files.ca_cert), "cert": str(cert),
                                             "key_file": key.read_text()})
    assert c.connected
    c.send_message("mutual")
    assert run(c, lambda: c.msgs)
    finish(c)
    # an encrypted key with its password (CPython's ssl takes key_pwd)
    cert, key = _client_cert(tls_files, tmp_path, b"secret")
    c = opened(mtls_peer.port, "/echo", tls={"sCA": str(tls_files.ca_cert), "sCert": str(cert),
                                             "sKeyFile": str(key), "sKeyPwd": "secret"})
    assert c.connected
    finish(c)
    c = Client("127.0.0.1", mtls_peer.port, "/", tls={"ca": str(tls_files.ca_cert),
                                                      "cert": str(cert), "key_file": str(key),
                                                      "key_pwd": "wrong"})
    assert not c.connect() and c.state == W.WS_STATUS_TLS_KEY_INVALID
    # without a certificate the server refuses
    c = Client("127.0.0.1", mtls_peer.port, "/", tls={"ca": str(tls_files.ca_cert)})
    c.connect()
    assert run(c, lambda: not c.active)
    assert c.error and not c.msgs


def test_tls_settings_that_cannot_work_fail_at_connect(tls_files, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    ca = str(tls_files.ca_cert)
    cases = [
        ({"ca": str(tmp_path / "missing.pem")}, W.WS_STATUS_TLS_CA_NOTFOUND),
        ({"ca": str(bad)}, W.WS_STATUS_TLS_CA_INVALID),
        ({"ca": ca, "cert": str(tmp_path / "nope.pem"), "key_file": str(bad)},
         W.WS_STATUS_TLS_CERT_NOTFOUND),
        ({"ca": ca, "psk_identity": "id", "psk_key": b"k" * 16}, W.WS_STATUS_TLS_PSK_INVALID),
        ({"ca": ca, "version": "sslv3"}, W.WS_STATUS_TLS_VERSION_INVALID),
        ({"ca": ca, "ciphers": "NO-SUCH-CIPHER"}, W.WS_STATUS_TLS_CIPHER_INVALID),
        ({"ca": ca, "crl": str(tmp_path / "missing.crl")}, W.WS_STATUS_TLS_CRL_NOTFOUND),
    ]
    for tls, status in cases:
        c = Client("127.0.0.1", 1, "/", tls=tls)
        assert not c.connect(), tls
        assert c.state == status and c.error and c.error_msg, (tls, c.state, c.error_msg)


# --- the same client on MicroPython --------------------------------------------------------------

MP_SCRIPT = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
from microcot import ws as W
port, zport, tport, badport, ca = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
mport, ccert, ckey = int(sys.argv[7]), sys.argv[8], sys.argv[9]
out = {}


class C(W.WebSocketClient):
    def on_message(self, content, content_type):
        self.msgs.append((bytes(content), content_type))

    def on_close(self, code, content):
        self.closes.append((code, bytes(content).decode()))


def run(c, until, ms=5000):
    t0 = W.ticks_ms()
    while W.ticks_diff(W.ticks_ms(), t0) < ms:
        c.execute(5)
        if until():
            return True
    return False


def client(p, uri, **kw):
    c = C("127.0.0.1", p, uri, **kw)
    c.msgs = []
    c.closes = []
    c.connect()
    run(c, lambda: c.state != W.WS_STATUS_BUSY)
    return c


def done(c):
    if c.connected:
        c.disconnect()
    run(c, lambda: not c.active)


c = client(port, "/echo")
big = bytes(i & 0xFF for i in range(100000))
c.send_message(big, False)
c.send_message("hello €")
run(c, lambda: len(c.msgs) == 2)
out["echo"] = c.msgs == [(big, 2), ("hello €".encode(), 1)]
done(c)
out["disconnect"] = [c.state, c.close_reason, c.closes]

c = client(port, "/send?n=200000&frag=777&kind=text")
run(c, lambda: c.msgs)
out["fragmented"] = len(c.msgs) == 1 and len(c.msgs[0][0]) == 200000
done(c)

c = client(port, "/send?n=200001&frag=65536", max_recv_msg_size=200000)
run(c, lambda: not c.active)
out["too_big"] = [c.state, c.close_reason]

c = client(zport, "/echo", per_message_deflate=True)
out["pmd"] = [c.extensions, c.can_compress]
for i in range(5):
    c.send_message("compressible " * 200 + str(i), compress=True)
run(c, lambda: len(c.msgs) == 5)
out["pmd_echo"] = [m[0] == ("compressible " * 200 + str(i)).encode() for i, m in enumerate(c.msgs)]
out["pmd_sent_compressed"] = c.sent_compressed
done(c)

c = client(port, "/ping")
run(c, lambda: c.msgs)
out["ping"] = c.msgs[:1] == [(b"pong received", 1)]
done(c)

c = client(port, "/close?code=4001&reason=bye")
run(c, lambda: not c.active)
out["server_close"] = [c.closes, c.state, c.close_reason]

c = client(port, "/abort")
run(c, lambda: not c.active)
out["abort"] = [c.state, c.close_reason]

c = client(port, "/auth", headers={"Authorization": "Bearer wrong"})
run(c, lambda: not c.active)
out["401"] = [c.state, c.http_status]
c = client(port, "/auth", headers={"Authorization": "Bearer good-token"})
out["auth_ok"] = c.connected
done(c)

c = client(tport, "/echo", tls={"ca": ca})
c.send_message("tls")
run(c, lambda: c.msgs)
out["tls"] = [c.state if not c.connected else 0, c.msgs[:1] == [(b"tls", 1)]]
done(c)

c = client(badport, "/", tls={"ca": ca})
run(c, lambda: not c.active)
out["tls_wrong_host"] = c.state

c = client(mport, "/echo", tls={"ca": ca, "cert": ccert, "key_file": ckey})
c.send_message("mutual")
run(c, lambda: c.msgs)
out["tls_client_cert"] = [c.state if not c.connected else 0, c.msgs[:1] == [(b"mutual", 1)]]
done(c)

for name, tls in (("crl", {"ca": ca, "crl": "x.crl"}), ("psk", {"ca": ca, "psk_identity": "i"}),
                  ("key_pwd", {"ca": ca, "cert": ca, "key_file": ca, "key_pwd": "secret"}),
                  ("ciphers", {"ca": ca, "ciphers": "AES128-SHA"}),
                  ("version", {"ca": ca, "version": "tlsv1.3"}), ("no_ca", True)):
    c = C("127.0.0.1", tport, "/", tls=tls)
    c.connect()
    out["tls_" + name] = [c.state, c.error_msg]
print("JSON" + json.dumps(out))
'''


def test_micropython_subset(peer, zpeer, tpeer, mtls_peer, tls_files, tmp_path):
    if not MICROPYTHON:
        pytest.skip("no micropython executable")
    from microcot_host.emulator.certs import ensure_ca_and_server

    wrong = ensure_ca_and_server(tmp_path / "wrong", hostnames=("other.example",), ips=())
    # the wrong-host server must be signed by the CA the client trusts: reuse the CA key
    for name in ("ca.pem", "ca.key"):
        (tmp_path / "wrong" / "tls" / name).write_bytes(
            (tls_files.ca_cert.parent / name).read_bytes())
    wrong = ensure_ca_and_server(tmp_path / "wrong", hostnames=("other.example",), ips=())
    bad = Peer(_server_ctx(wrong)).start()
    script = tmp_path / "mp_interop.py"
    script.write_text(MP_SCRIPT)
    ccert, ckey = _client_cert(tls_files, tmp_path)
    try:
        r = subprocess.run([MICROPYTHON, str(script), str(FIRMWARE), str(peer.port),
                            str(zpeer.port), str(tpeer.port), str(bad.port),
                            str(tls_files.ca_cert), str(mtls_peer.port), str(ccert), str(ckey)],
                           capture_output=True, text=True, timeout=120)
    finally:
        bad.stop()
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("JSON")]
    assert line, r.stdout + r.stderr
    out = json.loads(line[0][4:])
    assert out["echo"] is True
    assert out["disconnect"] == [W.WS_STATUS_SOCK_NO_CONN, 1000, [[1000, ""]]]
    assert out["fragmented"] is True
    assert out["too_big"] == [W.WS_STATUS_INVALID_MSG_SIZE, 1009]
    ext, can_compress = out["pmd"]
    assert ext["snct"] and ext["sbits"] <= 12
    assert can_compress is False and out["pmd_sent_compressed"] is False  # no deflate compression
    assert out["pmd_echo"] == [True] * 5
    assert out["ping"] is True
    assert out["server_close"] == [[[4001, "bye"]], W.WS_STATUS_SOCK_NO_CONN, 4001]
    assert out["abort"] == [W.WS_STATUS_SOCK_CONN_LOST, 1006]
    assert out["401"] == [W.WS_STATUS_CONNECT_RES_REJECT, 401]
    assert out["auth_ok"] is True
    assert out["tls"] == [0, True]
    assert out["tls_wrong_host"] == W.WS_STATUS_TLS_CN_MISMATCH
    assert out["tls_client_cert"] == [0, True]
    assert out["tls_crl"][0] == W.WS_STATUS_TLS_CRL_INVALID
    assert out["tls_psk"][0] == W.WS_STATUS_TLS_PSK_INVALID
    assert out["tls_key_pwd"][0] == W.WS_STATUS_TLS_KEY_INVALID
    assert out["tls_ciphers"][0] == W.WS_STATUS_TLS_CIPHER_INVALID
    assert out["tls_version"][0] == W.WS_STATUS_TLS_VERSION_INVALID
    assert out["tls_no_ca"][0] == W.WS_STATUS_TLS_CA_NOTFOUND
    assert all(v[1] for k, v in out.items() if k.startswith("tls_") and
               k not in ("tls_wrong_host", "tls_client_cert"))
