"""Rendering: Jinja2 templates (autoescaped) with the console's links, CSRF token and messages.

Links are paths built from the console's own routes under the request's `root_path`, so the
app works wherever it is mounted (`/apps/console` in the emulator) and never writes a host name
taken from a request header into a page. Messages for the next page (a "flash": the outcome of a
form) live in the session, short and free of secrets.
"""

from __future__ import annotations

import datetime as dt
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Router
from starlette.templating import Jinja2Templates

from .auth import Auth

HERE = Path(__file__).parent
MAX_FLASH = 300


def short_time(value: object) -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS` in UTC; anything else as it is."""
    if not isinstance(value, str):
        return "—" if value is None else str(value)
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S")


class Ui:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                 autoescape=True,
                                 trim_blocks=True, lstrip_blocks=True)
        env.filters["time"] = short_time
        self.templates = Jinja2Templates(env=env)
        self.router: Router | None = None  # set by create_app once the routes exist

    def url(self, conn: HTTPConnection, name: str, **params: str) -> str:
        assert self.router is not None
        # ids are quoted (a request id may hold `?`, `%` or spaces); a static path keeps its `/`
        quoted = {k: quote(str(v), safe="/" if k == "path" else "") for k, v in params.items()}
        return conn.scope.get("root_path", "") + str(self.router.url_path_for(name, **quoted))

    def context(self, conn: HTTPConnection) -> dict[str, Any]:
        return {"url": partial(self.url, conn), "csrf": self.auth.csrf(conn),
                "user": self.auth.user(conn)}

    def page(self, request: Request, name: str, ctx: dict[str, Any] | None = None,
             status: int = 200) -> Response:
        full = {**self.context(request), "flashes": request.session.pop("flash", []),
                "live": None, "nav": None, **(ctx or {})}
        return self.templates.TemplateResponse(request, name, full, status_code=status)

    def fragment(self, conn: HTTPConnection, name: str, ctx: dict[str, Any]) -> str:
        return self.templates.get_template(name).render({**self.context(conn), **ctx})

    def redirect(self, request: Request, name: str, anchor: str = "", **params: str) -> Response:
        # 303: the browser GETs the page after a POST (no resubmission on reload)
        return RedirectResponse(self.url(request, name, **params) + anchor, status_code=303)

    @staticmethod
    def flash(request: Request, kind: str, text: str) -> None:
        msgs = list(request.session.get("flash", []))[-3:]
        msgs.append([kind, text[:MAX_FLASH]])
        request.session["flash"] = msgs

    def error(self, request: Request, status: int, message: str) -> Response:
        return self.page(request, "error.html", {"title": str(status), "status": status,
                                                 "message": message},
                         status)
