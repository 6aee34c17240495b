"""Who may use the console: the platform's administrator, logged in with a form.

- The login form posts the admin user and password; both are compared in constant time with the
  REST server's admin credentials. Nobody else gets in: a device user's credentials (bootstrap or
  bulk registration) open the REST API to that device's objects, never the console.
- A login makes a session: Starlette's signed cookie (SessionMiddleware, itsdangerous) holding a
  random session id, the user and a CSRF token; HttpOnly, SameSite=Strict, limited to the
  console's path, signed with a key drawn from `secrets` when the app is made (a restart logs
  everybody out). The id must also be in this process's table of live sessions (`Sessions`): a
  logout ends it on the server too, so a copied cookie is dead after the logout. The password is
  never stored, shown, put in a URL or logged.
- Every form that changes something carries the session's CSRF token (a hidden field) and is
  refused (403) without it; the SameSite=Strict cookie already keeps other sites' forms out, and
  a POST whose Origin or Sec-Fetch-Site names another site is refused before its body is read.
- Bodies are bounded (Content-Length required, at most `max_body`) before they are parsed.
- Wrong passwords cost the caller a pause (FAIL_DELAY) so that guessing is slow.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request

SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 256
FAIL_DELAY = 0.3
CSRF_FIELD = "csrf"


class Sessions:
    """The live logins of this process: session id -> expiry (monotonic seconds), at most
    `limit` of them (the oldest goes first)."""

    def __init__(self, ttl: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._live: dict[str, float] = {}

    def new(self) -> str:
        now = time.monotonic()
        self._live = {k: t for k, t in self._live.items() if t > now}
        while len(self._live) >= self.limit:
            del self._live[next(iter(self._live))]  # dicts keep insertion order: the oldest
        sid = secrets.token_urlsafe(24)
        self._live[sid] = now + self.ttl
        return sid

    def alive(self, sid: object) -> bool:
        if not isinstance(sid, str):
            return False
        t = self._live.get(sid)
        return t is not None and t > time.monotonic()

    def end(self, sid: object) -> None:
        if isinstance(sid, str):
            self._live.pop(sid, None)


class Auth:
    """Login, session and CSRF checks of one console app."""

    def __init__(self, admin_user: str, admin_password: str, max_body: int,
                 sessions: Sessions | None = None) -> None:
        if not admin_user or not admin_password:
            raise ValueError("the console needs the admin user and password")
        self.admin_user = admin_user
        self._user = admin_user.encode()
        self._password = admin_password.encode()
        self.max_body = max_body
        self.sessions = sessions or Sessions()

    def check_password(self, user: str, password: str) -> bool:
        # both compared every time: the answer's timing says nothing about which was wrong
        ok_user = hmac.compare_digest(user.encode(), self._user)
        ok_password = hmac.compare_digest(password.encode(), self._password)
        return ok_user and ok_password

    async def refuse_slowly(self) -> None:
        await asyncio.sleep(FAIL_DELAY)

    def user(self, conn: HTTPConnection) -> str | None:
        """The logged-in admin of this request, or None."""
        s = conn.session
        if s.get("user") == self.admin_user and self.sessions.alive(s.get("sid")):
            return self.admin_user
        return None

    def log_in(self, request: Request) -> None:
        """A new session for the admin: a fresh id and CSRF token (nothing of a session from
        before the login is kept: no fixation)."""
        self.sessions.end(request.session.get("sid"))
        request.session.clear()
        request.session.update({"sid": self.sessions.new(), "user": self.admin_user,
                                CSRF_FIELD: secrets.token_urlsafe(24)})

    def log_out(self, request: Request) -> None:
        self.sessions.end(request.session.get("sid"))
        request.session.clear()

    def csrf(self, conn: HTTPConnection) -> str:
        """The session's CSRF token (made for a visitor of the login form too)."""
        token = conn.session.get(CSRF_FIELD)
        if not isinstance(token, str) or not token:
            token = secrets.token_urlsafe(24)
            conn.session[CSRF_FIELD] = token
        return token

    def same_origin(self, request: Request) -> None:
        """403 for a POST that a browser says comes from another site."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise HTTPException(403, "cross-site request refused")
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            if urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
                raise HTTPException(403, "cross-origin request refused")
        elif origin == "null":
            raise HTTPException(403, "request from an opaque origin refused")

    async def form(self, request: Request, max_body: int | None = None) -> FormData:
        """The POSTed form, after the origin, size and CSRF checks (403, 411, 413)."""
        self.same_origin(request)
        limit = self.max_body if max_body is None else max_body
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "a form needs a Content-Length")
        if int(length) > limit:
            raise HTTPException(413, f"at most {limit} bytes")
        form = await request.form(max_files=1, max_fields=64)
        sent = form.get(CSRF_FIELD)
        token = request.session.get(CSRF_FIELD)
        if not (isinstance(sent, str) and isinstance(token, str) and token
                and hmac.compare_digest(sent.encode(), token.encode())):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
        return form
