"""The emulator's web console: the platform as a person would rather look at it than curl it.

`create_app(api, admin_user, admin_password)` is a Starlette app for the emulator to mount at
`/apps/console` (every link is built under the request's root_path, so any mount point works).
In the platform's terms: devices with availability, last message, external IDs and children;
new device requests with an Accept button; a device's page with a chart per measurement
series, its events, alarms (acknowledge, clear), operations (c8y_Command, c8y_Restart and the
microcot agent's others, watched from PENDING to SUCCESSFUL or FAILED) and identities; bulk
registration by CSV upload with the validator's line-precise answers. Pages update themselves
through Server-Sent Events (live.py). Server-rendered Jinja2 templates, one CSS and one small
script (static/), no build step and nothing fetched from elsewhere: it works offline.

Security (auth.py): a login form for the platform's admin only; a signed, HttpOnly,
SameSite=Strict session cookie with a per-process random key; CSRF tokens on every form;
every read and action is `Api.handle(..., user=admin_user)` (platform.py), so the REST API's
authorization and validation decide. Responses carry a Content-Security-Policy that allows only
the console's own script and style (no inline script), and are not cached.

Modules: auth (login, sessions, CSRF), platform (the API calls), views (what a region shows),
charts (SVG geometry), operations (the operation forms), pages (endpoints), live and regions
(the event streams), ui (templates, links, messages).
"""

from __future__ import annotations

import secrets

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import Api
from .auth import SESSION_SECONDS, Auth
from .live import Streams
from .pages import LoginRequired, Pages
from .platform import Platform
from .regions import Live
from .ui import HERE, Ui

__all__ = ["MOUNT", "create_app"]

MOUNT = "/apps/console"
COOKIE = "microcot_console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """Adds the console's security headers to every response (static files too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("Content-Security-Policy", CSP)
                h.setdefault("X-Content-Type-Options", "nosniff")
                h.setdefault("X-Frame-Options", "DENY")
                # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on
                # the console's own form posts, which auth.same_origin refuses
                h.setdefault("Referrer-Policy", "same-origin")
                h.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(api: Api, admin_user: str, admin_password: str, *, mount: str = MOUNT,
               https_only: bool = False) -> Starlette:
    """The console for `api`, logging in `admin_user` with `admin_password` (the REST admin's).

    `mount`: where it is served (the session cookie's path); `https_only`: mark the cookie
    Secure (only for a console served over HTTPS alone). `app.state.streams.close()` ends the
    live streams, for a server that shuts down."""
    auth = Auth(admin_user, admin_password, max_body=1 << 20)
    # as the REST server does: the Api tells its admin from device users by this name
    if api.admin_user is None:
        api.admin_user = admin_user
    elif api.admin_user != admin_user:
        raise ValueError(f"this Api serves the admin {api.admin_user!r} already")
    ui = Ui(auth)
    platform = Platform(api, admin_user)
    pages = Pages(platform, auth, ui)
    streams = Streams(auth)
    live = Live(platform, auth, ui, streams)
    routes = [
        Route("/", pages.home, name="home"),
        Route("/login", pages.login, name="login"),
        Route("/login", pages.login_post, methods=["POST"], name="login_post"),
        Route("/logout", pages.logout, methods=["POST"], name="logout"),
        Route("/devices", pages.devices, name="devices"),
        Route("/devices/{mo_id}", pages.device, name="device"),
        Route("/devices/{mo_id}/operations", pages.operation_create, methods=["POST"],
              name="operation_create"),
        Route("/alarms/{alarm_id}", pages.alarm_update, methods=["POST"], name="alarm_update"),
        Route("/requests", pages.requests, name="requests"),
        Route("/requests", pages.request_create, methods=["POST"], name="request_create"),
        Route("/requests/{request_id}/accept", pages.request_accept, methods=["POST"],
              name="request_accept"),
        Route("/requests/{request_id}/delete", pages.request_delete, methods=["POST"],
              name="request_delete"),
        Route("/bulk", pages.bulk, name="bulk"),
        Route("/bulk", pages.bulk_post, methods=["POST"], name="bulk_post"),
        Route("/live/devices", live.devices, name="live_devices"),
        Route("/live/devices/{mo_id}", live.device, name="live_device"),
        Route("/live/requests", live.requests, name="live_requests"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def login_required(request: Request, exc: Exception) -> Response:
        if request.method == "GET":  # back there after the login (pages.Pages._inside)
            query = request.url.query
            request.session["next"] = request.url.path + ("?" + query if query else "")
        return ui.redirect(request, "login")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if "session" not in request.scope:  # failed before the session middleware ran
            return Response(exc.detail, exc.status_code, media_type="text/plain")
        return ui.error(request, exc.status_code, exc.detail)

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32),
                       session_cookie=COOKIE, max_age=SESSION_SECONDS, path=mount or "/",
                       same_site="strict", https_only=https_only),
        ],
        exception_handlers={LoginRequired: login_required, HTTPException: http_error},
    )
    ui.router = app.router
    app.state.streams = streams
    return app
