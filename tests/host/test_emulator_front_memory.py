"""What an idle device connection costs the MQTT front in memory (its TLS, its join to the broker).

The front runs in a process of its own (so that nothing else in it allocates, and the figure is
its RSS growth), before a stub broker in this process that answers every CONNECT with CONNACK 0.
After a warm-up of WARM connections (the allocator's arenas, OpenSSL's and Python's lazily built
state), N more devices connect over TLS, send their CONNECT and get the stub's CONNACK through
the front, and stay connected; the front's RSS growth per connection must stay under
BOUND. asyncio's own TLS (SSLProtocol) allocated a 256 KiB read buffer per connection: ~290 KB
each, which this test caught; front_tls.py measured ~25 KB (the figure is printed).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from emulator_fixtures import WAIT

import microcot_host
from microcot_host.emulator.certs import client_ssl_context, ensure_ca_and_server

WARM = 30
N = 300
BOUND = 64 * 1024  # bytes per connection; generous: what OpenSSL keeps per connection is ~20-40 KB

FRONT = r"""
import sys, time
from pathlib import Path
from microcot_host.emulator.certs import TlsFiles
from microcot_host.emulator.front import Front, server_context
ca, cert, key, stub_port = sys.argv[1:5]
front = Front("127.0.0.1", 0, server_context(TlsFiles(Path(ca), Path(cert), Path(key))),
              lambda: ("127.0.0.1", int(stub_port)))
front.start()
print(front.port, flush=True)
sys.stdin.read()  # until the test closes our stdin
front.stop()
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def connect_packet(device: str) -> bytes:
    fields = b"".join(struct.pack(">H", len(s)) + s for s in (device.encode(),) * 2 + (b"pw",))
    body = struct.pack(">H", 4) + b"MQTT" + bytes([4, 0xC2]) + struct.pack(">H", 60) + fields
    return bytes([0x10, len(body)]) + body


class StubBroker(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if data[:1] == b"\x10":
            self.t.write(b"\x20\x02\x00\x00")


def test_an_idle_tls_device_connection_costs_the_front_little_memory(tmp_path):
    files = ensure_ca_and_server(tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stub = asyncio.run_coroutine_threadsafe(
        loop.create_server(StubBroker, "127.0.0.1", 0), loop).result(WAIT)
    stub_port = stub.sockets[0].getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(microcot_host.__file__).parents[1])] + sys.path))
    front = subprocess.Popen(
        [sys.executable, "-c", FRONT, str(files.ca_cert), str(files.server_cert),
         str(files.server_key), str(stub_port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    devices: list[socket.socket] = []
    try:
        assert front.stdout is not None
        port = int(front.stdout.readline())
        ctx = client_ssl_context(files.ca_cert)

        def connect(i: int) -> None:
            t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT),
                                server_hostname="localhost")
            devices.append(t)
            t.sendall(connect_packet(f"AABBCC{i:06d}"))
            assert t.recv(4) == b"\x20\x02\x00\x00"  # the stub's CONNACK, through the front

        for i in range(WARM):
            connect(i)
        before = rss(front.pid)
        for i in range(WARM, WARM + N):
            connect(i)
        after = rss(front.pid)
        per = (after - before) / N
        print(f"\nthe front's RSS: {before / 1e6:.1f} MB with {WARM} devices, "
              f"{after / 1e6:.1f} MB with {WARM + N}: {per / 1024:.1f} KiB per connection")
        assert per < BOUND, f"{per / 1024:.0f} KiB per idle connection"
    finally:
        for t in devices:
            t.close()
        if front.stdin is not None:
            front.stdin.close()
        try:
            front.wait(WAIT)
        except subprocess.TimeoutExpired:
            front.kill()
            front.wait()
        loop.call_soon_threadsafe(stub.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
