"""The echo server of bench/ws.py, in a process of its own: the `websockets` library's asyncio
server on 127.0.0.1, every message sent back as it came (binary stays binary). No compression, no
size limit, no pings (neither client answers them in the middle of a timed run).

    python bench/_ws_echo.py [--cert CERT --key KEY] [--corrupt N]

--corrupt N flips the last byte of every Nth echo of a connection: a check that the clients
compare what comes back.

Prints the port it listens on, then serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys

from websockets.asyncio.server import ServerConnection, serve

CORRUPT = 0


async def echo(ws: ServerConnection) -> None:
    i = 0
    async for m in ws:
        i += 1
        if CORRUPT and i % CORRUPT == 0 and len(m):
            last = m[-1] ^ 1 if isinstance(m, bytes) else chr(ord(m[-1]) ^ 1)
            m = m[:-1] + (bytes((last,)) if isinstance(m, bytes) else last)
        await ws.send(m)


async def main(cert: str | None, key: str | None) -> None:
    ctx = None
    if cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
    async with serve(echo, "127.0.0.1", 0, max_size=None, compression=None, ping_interval=None,
                     ssl=ctx) as srv:
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--corrupt", type=int, default=0)
    a = ap.parse_args()
    CORRUPT = a.corrupt
    asyncio.run(main(a.cert, a.key))
