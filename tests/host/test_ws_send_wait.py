"""microcot.ws's waiting and masking keys (the changes for bench/ws.py), against a raw-socket
server that records every frame: execute(wait_ms) hands over a message that arrives while it
waits in the same call, and every frame has its own masking key, fetched W.KEYS at a time."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from microcot import ws as W  # noqa: E402
from microcot import wsframe as F  # noqa: E402


class RawServer:
    """Answers the handshake, then collects the client's frames; send() writes a server frame."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.frames: list[tuple[int, bytes, bytes]] = []  # opcode, masking key, payload
        self.conn: socket.socket | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv_exact(self, n: int) -> bytes:
        assert self.conn is not None
        out = b""
        while len(out) < n:
            b = self.conn.recv(n - len(out))
            if not b:
                raise EOFError
            out += b
        return out

    def _run(self) -> None:
        self.conn, _ = self.lsock.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.conn.recv(4096)
        key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
               if ln.lower().startswith(b"sec-websocket-key:")][0]
        self.conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                          + F.accept_key(key).encode() + b"\r\n\r\n")
        self.ready.set()
        try:
            while True:
                b0, b1 = self._recv_exact(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(self._recv_exact(2), "big")
                elif n == 127:
                    n = int.from_bytes(self._recv_exact(8), "big")
                mkey = self._recv_exact(4)
                data = bytes(x ^ mkey[i & 3] for i, x in enumerate(self._recv_exact(n)))
                self.frames.append((b0 & 0x0F, mkey, data))
        except (EOFError, OSError):
            pass

    def send(self, payload: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(F.encode(F.OP_BINARY, payload))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)  # wakes the reading thread, sends FIN
            self.conn.close()
        self.lsock.close()
        self.thread.join(5)


class Client(W.WebSocketClient):
    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)
        self.got: list[bytes] = []

    def on_message(self, content: memoryview, content_type: int) -> int:
        self.got.append(bytes(content))
        return W.S_OK


@pytest.fixture
def pair():
    srv = RawServer()
    c = Client("127.0.0.1", srv.port, "/", keep_alive=False)
    c.connect()
    while c.state == W.WS_STATUS_BUSY:
        c.execute(50)
    assert c.connected, c.error_msg
    assert srv.ready.wait(5)
    yield c, srv
    srv.close()  # the client sees the connection end; no close handshake to wait for
    for _ in range(100):
        if not c.active:
            break
        c.execute(50)
    assert not c.active


def test_a_message_arriving_during_the_wait_is_delivered_by_that_call(pair) -> None:
    c, srv = pair
    c.execute(0)
    assert c.got == []
    timer = threading.Timer(0.05, srv.send, (b"late",))
    timer.start()
    c.execute(30000)  # returns as soon as the frame is there, not after 30 s
    timer.join()
    assert c.got == [b"late"]


def test_every_frame_has_its_own_masking_key_fetched_keys_at_a_time(pair, monkeypatch) -> None:
    c, srv = pair
    calls = []
    real = W.urandom

    def counted(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(W, "urandom", counted)
    for i in range(40):
        assert c.send_message(bytes((i,)) * 16, False)
    c.send_message(b"", False)
    for _ in range(500):
        if len(srv.frames) == 41:
            break
        c.execute(20)
    assert [f[2] for f in srv.frames[:40]] == [bytes((i,)) * 16 for i in range(40)]
    keys = [f[1] for f in srv.frames]
    assert len(set(keys)) == len(keys) == 41
    assert calls == [4 * W.KEYS] * ((41 + W.KEYS - 1) // W.KEYS)  # KEYS keys a call
