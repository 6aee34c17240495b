"""Live updates: Server-Sent Events that push re-rendered regions of the page shown.

A page names its stream in `<body data-live=...>`; console.js opens it with EventSource and puts
each `region` event's HTML into the element with the event's `target` id. The server polls the
platform through the REST API every POLL seconds with a cheap probe per region (the id of the
newest measurement or event, the short list of operations, alarms or requests) and renders a
region only when its probe changed, so a quiet device costs a few indexed queries a second and
nothing on the wire but a keep-alive comment every KEEPALIVE seconds.

Bounded: at most MAX_STREAMS streams at once (more get 503), each lives at most LIFETIME
seconds (EventSource reconnects by itself after `retry`, and the new stream checks the login
again), ends when the client goes away, when its login ends (logout: event `bye`) and when the
app is closed (`Streams.close()`, for a server that shuts down: a stream never ends by itself
otherwise before LIFETIME).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from markupsafe import escape
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from .auth import Auth
from .platform import PlatformError

log = logging.getLogger(__name__)

POLL = 0.75
KEEPALIVE = 15.0
LIFETIME = 300.0
RETRY_MS = 2000
MAX_STREAMS = 32


@dataclass
class Region:
    """An element of the page (`target` id): `probe()` is cheap and changes when the element must
    be redrawn; `render(probe value)` makes its new inner HTML."""

    target: str
    probe: Callable[[], Awaitable[object]]
    render: Callable[[object], Awaitable[str]]


def event(name: str, data: object) -> str:
    # JSON on one line: an SSE data line cannot hold a newline
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Streams:
    def __init__(self, auth: Auth, max_streams: int = MAX_STREAMS, poll: float = POLL,
                 lifetime: float = LIFETIME) -> None:
        self.auth = auth
        self.max_streams = max_streams
        self.poll = poll
        self.lifetime = lifetime
        self.count = 0  # changed on the event loop only
        self._closed = threading.Event()  # set from any thread

    def close(self) -> None:
        """End every stream (within POLL seconds) and refuse new ones."""
        self._closed.set()

    def response(self, request: Request, regions: list[Region]) -> Response:
        if self._closed.is_set() or self.count >= self.max_streams:
            return PlainTextResponse("too many live streams", 503, {"Retry-After": "5"})
        return StreamingResponse(self._events(request, regions), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def _events(self, request: Request, regions: list[Region]) -> AsyncIterator[str]:
        if self.count >= self.max_streams:  # raced with another stream since response()
            yield event("bye", {"reason": "busy"})
            return
        self.count += 1
        try:
            yield f"retry: {RETRY_MS}\n\n"
            shown: dict[str, object] = {}
            started = sent = time.monotonic()
            while not self._closed.is_set() and time.monotonic() - started < self.lifetime:
                if await request.is_disconnected():
                    return
                if self.auth.user(request) is None:
                    yield event("bye", {"reason": "logged out"})
                    return
                for r in regions:
                    try:
                        probe = await r.probe()
                        if probe == shown.get(r.target, _NOTHING):
                            continue
                        html = await r.render(probe)
                    except PlatformError as e:
                        # the object went away (deleted device): say so once, keep the rest
                        probe, html = ("error", e.status), _gone(e)
                        if shown.get(r.target) == probe:
                            continue
                    shown[r.target] = probe
                    sent = time.monotonic()
                    yield event("region", {"target": r.target, "html": html})
                if time.monotonic() - sent > KEEPALIVE:
                    sent = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(self.poll)
        finally:
            self.count -= 1


_NOTHING = object()


def _gone(e: PlatformError) -> str:
    return f'<p class="muted">{escape(e.message)} ({e.status})</p>'
