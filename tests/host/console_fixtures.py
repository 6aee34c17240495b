"""Helpers for the web console's tests.

The console is mounted at /apps/console of a Starlette app as the emulator mounts it, so every
link the tests follow is the one a browser gets there.
"""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.routing import Mount

from microcot_host.emulator.api import Api
from microcot_host.emulator.console import MOUNT, create_app

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def mounted(api: Api, admin_user: str, admin_password: str) -> tuple[Starlette, Starlette]:
    """(the outer app, the console) with the console at MOUNT."""
    console = create_app(api, admin_user, admin_password)
    return Starlette(routes=[Mount(MOUNT, console)]), console


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)
