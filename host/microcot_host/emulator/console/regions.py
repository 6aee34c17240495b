"""The live streams of the pages: which regions each page keeps up to date, and how.

| page     | regions (element ids)                                                    |
| -------- | ------------------------------------------------------------------------ |
| device   | device-head, charts, operations-table, alarms, events, pending-badge     |
| devices  | devices-table, pending-requests, pending-badge                           |
| requests | requests-table, pending-badge                                            |

Each region's fragment template (`_<name>.html`) is the one the page includes, so a pushed
region is exactly what a reload would show.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from . import views
from .auth import Auth
from .live import Region, Streams
from .platform import Platform
from .ui import Ui


class Live:
    def __init__(self, platform: Platform, auth: Auth, ui: Ui, streams: Streams) -> None:
        self.p = platform
        self.auth = auth
        self.ui = ui
        self.streams = streams

    def _badge(self, request: Request) -> Region:
        async def probe() -> object:
            return await views.pending_count(self.p)

        async def render(n: object) -> str:
            return self.ui.fragment(request, "_badge.html", {"pending_count": n})
        return Region("pending-badge", probe, render)

    def _open(self, request: Request, regions: list[Region]) -> Response:
        if self.auth.user(request) is None:
            return PlainTextResponse("log in first", 401)
        return self.streams.response(request, [*regions, self._badge(request)])

    async def device(self, request: Request) -> Response:
        mo_id = request.path_params["mo_id"]
        p, ui = self.p, self.ui

        async def head() -> object:
            return await views.device_head(p, mo_id)

        async def head_html(h: object) -> str:
            return ui.fragment(request, "_device_head.html", {"head": h})

        async def newest_measurement() -> object:
            return await views.latest_measurement(p, mo_id)

        async def charts_html(_: object) -> str:
            return ui.fragment(request, "_charts.html",
                               {"charts": await views.device_charts(p, mo_id)})

        async def ops() -> object:
            return await views.device_operations(p, mo_id)

        async def ops_html(rows: object) -> str:
            return ui.fragment(request, "_operations.html", {"operations": rows})

        async def alarms() -> object:
            return await views.device_alarms(p, mo_id)

        async def alarms_html(rows: object) -> str:
            return ui.fragment(request, "_alarms.html", {"alarms": rows, "device_id": mo_id})

        async def newest_event() -> object:
            return await views.latest_event(p, mo_id)

        async def events_html(_: object) -> str:
            return ui.fragment(request, "_events.html",
                               {"events": await views.device_events(p, mo_id)})

        return self._open(request, [
            Region("device-head", head, head_html),
            Region("charts", newest_measurement, charts_html),
            Region("operations-table", ops, ops_html),
            Region("alarms", alarms, alarms_html),
            Region("events", newest_event, events_html)])

    async def devices(self, request: Request) -> Response:
        page = request.query_params.get("page", "1")
        page_no = int(page) if page.isdigit() and 0 < int(page) < 100_000 else 1
        text = request.query_params.get("text", "")[:200]
        p, ui = self.p, self.ui
        xids: dict[str, list[dict[str, object]]] = {}

        async def listing() -> object:
            return await views.device_page_list(p, page_no, text)

        async def listing_html(mos: object) -> str:
            assert isinstance(mos, list)
            data = await views.devices(p, page_no, text, mos, xids)
            return ui.fragment(request, "_devices.html", {"listing": data})

        async def pending() -> object:
            return await views.pending_requests(p)

        async def pending_html(rows: object) -> str:
            return ui.fragment(request, "_pending.html", {"pending": rows})

        return self._open(request, [Region("devices-table", listing, listing_html),
                                    Region("pending-requests", pending, pending_html)])

    async def requests(self, request: Request) -> Response:
        p, ui = self.p, self.ui

        async def rows() -> object:
            return await views.requests(p)

        async def rows_html(rs: object) -> str:
            return ui.fragment(request, "_requests.html", {"requests": rs})

        return self._open(request, [Region("requests-table", rows, rows_html)])
