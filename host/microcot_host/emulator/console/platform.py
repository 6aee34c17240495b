"""The console's only way to the platform: `Api.handle` as the administrator, off the event loop.

Every page and action of the console is a REST call of the admin user, so the API's
authorization (authz.py) and validation apply exactly as to a curl of the same request; the
console holds no platform state and reads nothing behind the API's back. `Api.handle` is
synchronous (it takes the model's lock), so it runs in Starlette's thread pool: a slow query
never stalls the event loop that serves the live streams.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool

from ..api import Api, ApiResult

JSON = dict[str, Any]


class PlatformError(Exception):
    """The API refused a console call: its status and Cumulocity-shaped message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def path(*segs: str, **params: str | int | None) -> str:
    """A REST target from path segments (each quoted) and query parameters (None: left out)."""
    target = "/" + "/".join(quote(s, safe="") for s in segs)
    query = {k: str(v) for k, v in params.items() if v is not None}
    return target + ("?" + urlencode(query) if query else "")


class Platform:
    """`Api.handle` for the admin user, awaitable; errors become PlatformError."""

    def __init__(self, api: Api, admin_user: str) -> None:
        self.api = api
        self.admin_user = admin_user

    async def call(self, method: str, target: str, body: JSON | list[Any] | bytes | None = None,
                   content_type: str | None = None) -> ApiResult:
        """The API's answer, whatever its status."""
        if body is not None and content_type is None and not isinstance(body, bytes):
            content_type = "application/json"
        return await run_in_threadpool(self.api.handle, method, target, body, content_type,
                                       self.admin_user)

    async def ok(self, method: str, target: str, body: JSON | list[Any] | bytes | None = None,
                 content_type: str | None = None) -> JSON:
        """The answer's JSON object for a 2xx status (an empty dict for 204), else PlatformError
        with the API's message."""
        r = await self.call(method, target, body, content_type)
        if r.status >= 300:
            msg = r.body.get("message") if isinstance(r.body, dict) else None
            raise PlatformError(r.status, str(msg or r.reason))
        return r.body if isinstance(r.body, dict) else {}

    async def get(self, target: str) -> JSON:
        return await self.ok("GET", target)

    async def items(self, target: str, key: str) -> list[JSON]:
        """The `key` list of a collection page."""
        return [x for x in (await self.get(target)).get(key, []) if isinstance(x, dict)]
