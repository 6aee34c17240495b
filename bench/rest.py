"""Request throughput of the emulator's REST server: one device over one keep-alive connection.

    python bench/rest.py [--requests 2000] [--rounds 3] [--tls] [--compare OTHER_HOST_DIR]
                         [--nodelay-stdlib] [--admin]

A device user (credentials issued by the platform; `--admin`: the admin) alternates POST /measurement/measurements
and GET /inventory/managedObjects/{its id} over one HTTP/1.1 connection (http.client); the
figure is requests per second, the median of `rounds`. With `--compare DIR` the same bench
runs, interleaved round by round, against the emulator package found in DIR (e.g. another
checkout's host/ folder), each round in a fresh process, so before/after numbers share the
machine's state. The server runs in-process (a thread) as it does in the emulator; the client
runs in the same process too, so both share one GIL, as a test or `microcot demo` would.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEV, DEV_PW = "89490200000000000099", "Device-Pass-99"


def _nodelay_stdlib() -> None:
    """Give http.server's accepted sockets TCP_NODELAY (the old server lacked it, so its
    numbers measured Nagle against delayed ACKs: about 40 ms a request)."""
    import socket
    import socketserver

    accept = socketserver.TCPServer.get_request

    def get_request(self: socketserver.TCPServer) -> tuple[socket.socket, object]:
        conn, addr = accept(self)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr

    socketserver.TCPServer.get_request = get_request  # type: ignore[method-assign]


def one_round(requests: int, tls: bool, admin: bool = False) -> float:
    """Requests per second of one round in this process."""
    from microcot_host.emulator.api import Api
    from microcot_host.emulator.binaries import BinaryStore
    from microcot_host.emulator.http import RestServer
    from microcot_host.emulator.model import Model

    tmp = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    api = Api(Model(tmp / "p.sqlite"), binaries=BinaryStore(tmp / "binaries"))
    api.issue_credentials(DEV, DEV_PW)
    ctx = None
    server_tls = None
    if tls:
        from microcot_host.emulator.certs import (
            client_ssl_context,
            ensure_ca_and_server,
            server_ssl_context,
        )
        files = ensure_ca_and_server(tmp / "tls")
        server_tls, ctx = server_ssl_context(files), client_ssl_context(files.ca_cert)
    with RestServer(api, "admin", "Admin-Pass-1", tls=server_tls) as srv:
        if tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "localhost", srv.port, context=ctx or ssl.create_default_context(), timeout=30)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        user, password = ("admin", "Admin-Pass-1") if admin else (DEV, DEV_PW)
        h = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
             "Content-Type": "application/json"}
        conn.request("POST", "/inventory/managedObjects",
                     json.dumps({"name": "bench", "c8y_IsDevice": {}}), h)
        r = conn.getresponse()
        mo = json.loads(r.read())["id"]
        body = json.dumps({"source": {"id": mo}, "type": "c8y_T", "time": "2024-01-01T00:00:00Z",
                           "c8y_T": {"T": {"value": 1.5}}})
        t0 = time.perf_counter()
        for i in range(requests):
            if i % 2:
                conn.request("GET", f"/inventory/managedObjects/{mo}", headers=h)
            else:
                conn.request("POST", "/measurement/measurements", body, h)
            r = conn.getresponse()
            r.read()
            if r.status >= 300:
                raise SystemExit(f"unexpected {r.status}")
        elapsed = time.perf_counter() - t0
        conn.close()
    api.model.close()
    return requests / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--admin", action="store_true",
                    help="as the admin (no password hash per request) instead of a device")
    ap.add_argument("--compare", type=Path, help="the host/ folder of the other version")
    ap.add_argument("--nodelay-stdlib", action="store_true",
                    help="give a http.server-based version TCP_NODELAY (a fairer comparison)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.nodelay_stdlib:
            _nodelay_stdlib()
        print(one_round(args.requests, args.tls, args.admin))
        return
    here = Path(__file__).resolve().parent.parent / "host"
    variants = {"this": here}
    if args.compare:
        variants["other"] = args.compare.resolve()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, host in variants.items():
            env = {**os.environ, "PYTHONPATH": f"{host}{os.pathsep}{here.parent / 'firmware'}"}
            flags = [*(["--tls"] if args.tls else []), *(["--admin"] if args.admin else []),
                     *(["--nodelay-stdlib"] if args.nodelay_stdlib else [])]
            out = subprocess.run([sys.executable, __file__, "--one", "--requests",
                                  str(args.requests), *flags],
                                 env=env, check=True, capture_output=True, text=True).stdout
            rates[name].append(float(out.strip().splitlines()[-1]))
    for name, rs in rates.items():
        print(f"{name:6} {variants[name]}: median {statistics.median(rs):7.0f} req/s "
              f"(rounds: {', '.join(f'{r:.0f}' for r in rs)})")


if __name__ == "__main__":
    main()
