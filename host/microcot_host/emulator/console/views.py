"""What the console's pages and live regions show, read through the REST API.

Each loader makes the few REST calls a region needs and returns plain data for its template;
the pages (pages.py) and the live stream (live.py) use the same loaders, so a region looks the
same whether it came with the page or was pushed later. Sizes are bounded: a device page shows
the latest MEASUREMENTS measurements, OPERATIONS operations, ALARMS alarms and EVENTS events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import charts
from .operations import fragment_of, summary
from .platform import Platform, PlatformError, path

JSON = dict[str, Any]

DEVICES_PAGE = 50
MEASUREMENTS = charts.MAX_POINTS
OPERATIONS = 25
ALARMS = 25
EVENTS = 20
REQUESTS = 200


def availability(mo: JSON) -> tuple[str, str | None]:
    """(status, last message) from the platform's computed `c8y_Availability`; status
    NOT_MONITORED for an object without `c8y_RequiredAvailability`."""
    a = mo.get("c8y_Availability")
    if not isinstance(a, dict):
        return "NOT_MONITORED", None
    last = a.get("lastMessage")
    return str(a.get("status", "UNKNOWN")), last if isinstance(last, str) else None


def refs(mo: JSON, key: str) -> list[JSON]:
    """The managed objects of a reference collection (`childDevices`, `deviceParents`)."""
    coll = mo.get(key)
    if not isinstance(coll, dict):
        return []
    out = []
    for r in coll.get("references", []):
        if isinstance(r, dict) and isinstance(r.get("managedObject"), dict):
            out.append(r["managedObject"])
    return out


class _Device:
    """A managed object's id and name as the pages show them."""

    mo: JSON

    @property
    def id(self) -> str:
        return str(self.mo.get("id", ""))

    @property
    def name(self) -> str:
        return str(self.mo.get("name") or "(no name)")


@dataclass
class DeviceRow(_Device):
    mo: JSON
    external_ids: list[JSON]
    status: str
    last_message: str | None
    children: list[JSON]


@dataclass
class DeviceList:
    rows: list[DeviceRow]
    page: int
    pages: int
    text: str


async def external_ids(p: Platform, mo_id: str) -> list[JSON]:
    return await p.items(path("identity", "globalIds", mo_id, "externalIds", pageSize=100),
                         "externalIds")


async def device_page_list(p: Platform, page: int, text: str) -> list[JSON]:
    """The managed objects of one page of the device list (the live stream's probe too)."""
    return await p.items(path("inventory", "managedObjects", fragmentType="c8y_IsDevice",
                              text=text or None, pageSize=DEVICES_PAGE, currentPage=page),
                         "managedObjects")


async def devices(p: Platform, page: int, text: str, mos: list[JSON] | None = None,
                  xid_cache: dict[str, list[JSON]] | None = None) -> DeviceList:
    """A page of devices with their external IDs, availability and children. `xid_cache` keeps
    external IDs across calls (the live stream redraws the list often; IDs rarely change)."""
    head = await p.get(path("inventory", "managedObjects", fragmentType="c8y_IsDevice",
                            text=text or None, pageSize=1, withTotalPages="true"))
    total = int(head.get("statistics", {}).get("totalPages") or 0)
    pages = max(1, -(-total // DEVICES_PAGE))
    if mos is None:
        mos = await device_page_list(p, page, text)
    rows = []
    for mo in mos:
        mid = str(mo.get("id"))
        xids = xid_cache.get(mid) if xid_cache is not None else None
        if xids is None:
            try:
                xids = await external_ids(p, mid)
            except PlatformError:
                xids = []  # deleted meanwhile: the row goes at the next redraw
            if xid_cache is not None:
                xid_cache[mid] = xids
        status, last = availability(mo)
        rows.append(DeviceRow(mo, xids, status, last, refs(mo, "childDevices")))
    return DeviceList(rows, page, pages, text)


@dataclass
class DeviceHead(_Device):
    mo: JSON
    external_ids: list[JSON]
    status: str
    last_message: str | None
    children: list[JSON]
    parents: list[JSON]
    supported: list[str] = field(default_factory=list)

    def facts(self) -> list[tuple[str, str]]:
        """The device's descriptive fragments, one line each."""
        mo, out = self.mo, []
        out.append(("type", str(mo.get("type") or "—")))
        out.append(("owner", str(mo.get("owner") or "—")))
        out.append(("created", str(mo.get("creationTime", "—"))))
        out.append(("updated", str(mo.get("lastUpdated", "—"))))
        hw = mo.get("c8y_Hardware")
        if isinstance(hw, dict):
            out.append(("hardware", " ".join(f"{k} {v}" for k, v in hw.items())))
        fw = mo.get("c8y_Firmware")
        if isinstance(fw, dict):
            out.append(("firmware", " ".join(str(fw.get(k, "")) for k in ("name", "version"))))
        mob = mo.get("c8y_Mobile")
        if isinstance(mob, dict):
            out.append(("mobile", " ".join(f"{k} {v}" for k, v in mob.items())))
        return out


async def device_head(p: Platform, mo_id: str) -> DeviceHead:
    mo = await p.get(path("inventory", "managedObjects", mo_id))
    status, last = availability(mo)
    ops = mo.get("c8y_SupportedOperations")
    supported = [str(o) for o in ops] if isinstance(ops, list) else []
    return DeviceHead(mo, await external_ids(p, mo_id), status, last, refs(mo, "childDevices"),
                      refs(mo, "deviceParents"), supported)


async def latest_measurement(p: Platform, mo_id: str) -> str | None:
    """The id of the device's newest measurement: the live charts' cheap probe."""
    ms = await p.items(path("measurement", "measurements", source=mo_id, revert="true",
                            pageSize=1), "measurements")
    return str(ms[0].get("id")) if ms else None


async def device_charts(p: Platform, mo_id: str) -> list[charts.Chart]:
    ms = await p.items(path("measurement", "measurements", source=mo_id, revert="true",
                            pageSize=MEASUREMENTS), "measurements")
    ms.reverse()  # the newest MEASUREMENTS, oldest first
    return charts.charts(ms)


@dataclass(frozen=True)
class OperationRow:
    op: JSON
    fragment: str
    summary: str

    @property
    def id(self) -> str:
        return str(self.op.get("id", ""))

    @property
    def status(self) -> str:
        return str(self.op.get("status", ""))


async def device_operations(p: Platform, mo_id: str) -> list[OperationRow]:
    """The device's latest operations (its child devices' too), newest first."""
    ops = await p.items(path("devicecontrol", "operations", agentId=mo_id, revert="true",
                             pageSize=OPERATIONS), "operations")
    return [OperationRow(o, fragment_of(o), summary(o)) for o in ops]


async def device_alarms(p: Platform, mo_id: str) -> list[JSON]:
    """Open alarms first (newest first within each group), then cleared ones."""
    al = await p.items(path("alarm", "alarms", source=mo_id, pageSize=ALARMS), "alarms")
    return sorted(al, key=lambda a: a.get("status") == "CLEARED")


async def device_events(p: Platform, mo_id: str) -> list[JSON]:
    return await p.items(path("event", "events", source=mo_id, pageSize=EVENTS), "events")


async def latest_event(p: Platform, mo_id: str) -> str | None:
    ev = await p.items(path("event", "events", source=mo_id, pageSize=1), "events")
    return str(ev[0].get("id")) if ev else None


async def requests(p: Platform) -> list[JSON]:
    """New device requests: those waiting for a decision first, then by id."""
    rs = await p.items(path("devicecontrol", "newDeviceRequests", pageSize=REQUESTS),
                       "newDeviceRequests")
    order = {"PENDING_ACCEPTANCE": 0, "WAITING_FOR_CONNECTION": 1, "ACCEPTED": 2}
    return sorted(rs, key=lambda r: (order.get(str(r.get("status")), 3), str(r.get("id"))))


async def pending_requests(p: Platform) -> list[JSON]:
    """The requests of devices that wait for an acceptance."""
    return await p.items(path("devicecontrol", "newDeviceRequests", status="PENDING_ACCEPTANCE",
                              pageSize=REQUESTS), "newDeviceRequests")


async def pending_count(p: Platform) -> int:
    """How many devices wait for an acceptance (the navigation's badge)."""
    page = await p.get(path("devicecontrol", "newDeviceRequests", status="PENDING_ACCEPTANCE",
                            pageSize=1, withTotalPages="true"))
    return int(page.get("statistics", {}).get("totalPages") or 0)
