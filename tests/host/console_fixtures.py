"""Helpers for the web console's tests: the console on its own uvicorn server in a thread.

The console is mounted at /apps/console of a Starlette app as the emulator mounts it, so every
link the tests follow is the one a browser gets there.
"""

from __future__ import annotations

import re
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from microcot_host.emulator.api import Api
from microcot_host.emulator.console import MOUNT, create_app

WAIT = 10.0
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def mounted(api: Api, admin_user: str, admin_password: str) -> tuple[Starlette, Starlette]:
    """(the outer app, the console) with the console at MOUNT."""
    console = create_app(api, admin_user, admin_password)
    return Starlette(routes=[Mount(MOUNT, console)]), console


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)


class ConsoleServer:
    """`with ConsoleServer(api, user, password) as srv: srv.url` (the console's URL, ending in
    /apps/console/)."""

    def __init__(self, api: Api, admin_user: str, admin_password: str) -> None:
        self.app, self.console = mounted(api, admin_user, admin_password)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.url = ""

    def __enter__(self) -> ConsoleServer:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(WAIT / 0.02)):
            if self.server.started:
                break
            deadline.wait(0.02)
        assert self.server.started, "the console's server did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}{MOUNT}/"
        return self

    def __exit__(self, *exc: object) -> None:
        self.console.state.streams.close()  # the live streams end, the server can stop
        self.server.should_exit = True
        self.thread.join(WAIT)
