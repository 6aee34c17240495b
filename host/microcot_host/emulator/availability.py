"""Connection monitoring as Cumulocity does it: `c8y_RequiredAvailability` -> `c8y_Availability`.

A device whose managed object holds `c8y_RequiredAvailability: {"responseInterval": <minutes>}`
is monitored. Its `c8y_Availability: {"status": ..., "lastMessage": <ISO time>}` is computed when
the object is read (api.py adds it to every managed object it returns, single or listed):

- `lastMessage` is the time of the device's last message: every MQTT message it publishes on
  `ms/`/`bs/` (once the emulator knows its managed object, see engine.py) and every REST or
  `POST /s` request made with its credentials (`record(mo_id)`, called by service.py);
- `status` is `MAINTENANCE` when `responseInterval` <= 0 (not monitored, Cumulocity's
  maintenance mode), `UNAVAILABLE` when now - lastMessage > responseInterval, else `AVAILABLE`.
  A device that never sent anything is measured from its object's creationTime instead (and has
  no `lastMessage`), so a new object gets the interval's grace before it counts as unavailable.
  A responseInterval that is not a number counts as not monitored (no fragment is added).

`check()` (run periodically by service.py, or by a test) raises the MAJOR alarm
`c8y_UnavailabilityAlarm` ("No data received from device within required interval.") for each
monitored device that is UNAVAILABLE, once; `record()` clears it as soon as the device sends again,
as Cumulocity does. Devices in MAINTENANCE get no alarm.

Last-message times are kept in memory exactly and written to the model (table `last_messages`) at
most once per `persist_ms` per device, so a busy device costs no database write per message; the
stored time survives a restart.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .model import JSON, Model, ModelError, NotFound, Page, iso_ms, parse_id, parse_time

log = logging.getLogger(__name__)

REQUIRED = "c8y_RequiredAvailability"
FRAGMENT = "c8y_Availability"
ALARM_TYPE = "c8y_UnavailabilityAlarm"
ALARM_TEXT = "No data received from device within required interval."
AVAILABLE, UNAVAILABLE, MAINTENANCE = "AVAILABLE", "UNAVAILABLE", "MAINTENANCE"


def response_interval(mo: JSON) -> float | None:
    """The monitored interval in minutes, or None when the object is not monitored."""
    req = mo.get(REQUIRED)
    if not isinstance(req, dict):
        return None
    v = req.get("responseInterval")
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    return float(v) if isinstance(v, int | float) else None


class Availability:
    """See the module docstring; thread-safe."""

    def __init__(self, model: Model, persist_ms: int = 1000) -> None:
        self.model = model
        self.persist_ms = persist_ms
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}       # mo -> exact last message (ms)
        self._written: dict[int, int] = {}    # mo -> last value written to the model
        self._alarmed: set[int] | None = None  # sources with an open unavailability alarm

    def _now_ms(self) -> int:
        return self.model.now()[1]

    def last_message(self, mo_id: Any) -> int | None:
        i = parse_id(mo_id)
        with self._lock:
            hit = self._last.get(i)
        return hit if hit is not None else self.model.last_message(i)

    def record(self, mo_id: Any) -> None:
        """The device `mo_id` sent a message now."""
        try:
            i = parse_id(mo_id)
        except ModelError:
            return
        ms = self._now_ms()
        with self._lock:
            self._last[i] = max(ms, self._last.get(i, 0))
            write = ms - self._written.get(i, -self.persist_ms) >= self.persist_ms
            if write:
                self._written[i] = ms
        if write:
            self.model.set_last_message(i, ms)
        if i in self._open_alarms():
            self._clear_alarm(i)

    def fragment(self, mo: JSON) -> JSON | None:
        """The `c8y_Availability` of a managed object, or None if it is not monitored."""
        interval = response_interval(mo)
        if interval is None:
            return None
        last = self.last_message(mo["id"])
        out: JSON = {"status": self._status(mo, interval, last)}
        if last is not None:
            out["lastMessage"] = iso_ms(last)
        return out

    def _status(self, mo: JSON, interval: float, last: int | None) -> str:
        if interval <= 0:
            return MAINTENANCE
        since = last
        if since is None:
            try:
                since = parse_time(mo.get("creationTime"), "creationTime")[1]
            except ModelError:
                since = self._now_ms()
        return UNAVAILABLE if self._now_ms() - since > interval * 60_000 else AVAILABLE

    def check(self) -> list[str]:
        """Raise the unavailability alarm for every monitored device that became unavailable;
        returns the ids of the devices alarmed now."""
        raised = []
        page = 1
        while True:
            items, total = self.model.query_managed_objects(Page((page - 1) * 500, 500),
                                                            fragment_type=REQUIRED)
            for mo in items:
                frag = self.fragment(mo)
                if frag is None or frag["status"] != UNAVAILABLE:
                    continue
                i = int(mo["id"])
                if i in self._open_alarms():
                    continue
                self._raise_alarm(i)
                raised.append(mo["id"])
            if page * 500 >= total:
                return raised
            page += 1

    def _open_alarms(self) -> set[int]:
        with self._lock:
            if self._alarmed is not None:
                return self._alarmed
        found: set[int] = set()
        page = 0
        while True:
            items, total = self.model.query_alarms(Page(page * 500, 500), type=ALARM_TYPE,
                                                   status=["ACTIVE", "ACKNOWLEDGED"])
            found |= {int(a["source"]["id"]) for a in items}
            page += 1
            if page * 500 >= total:
                break
        with self._lock:
            if self._alarmed is None:
                self._alarmed = found
            return self._alarmed

    def _raise_alarm(self, i: int) -> None:
        text, _ = self.model.now()
        try:
            self.model.create_alarm({"source": {"id": str(i)}, "type": ALARM_TYPE,
                                     "text": ALARM_TEXT, "severity": "MAJOR", "time": text})
        except NotFound:
            return
        except Exception:
            log.exception("raising the unavailability alarm of %s failed", i)
            return
        with self._lock:
            if self._alarmed is not None:
                self._alarmed.add(i)
        log.info("device %s is unavailable: %s raised", i, ALARM_TYPE)

    def _clear_alarm(self, i: int) -> None:
        with self._lock:
            if self._alarmed is not None:
                self._alarmed.discard(i)
        try:
            items, _ = self.model.query_alarms(Page(0, 100), source=i, type=ALARM_TYPE,
                                               status=["ACTIVE", "ACKNOWLEDGED"])
            for a in items:
                self.model.update_alarm(a["id"], {"status": "CLEARED"})
        except Exception:
            log.exception("clearing the unavailability alarm of %s failed", i)
            return
        log.info("device %s sent again: %s cleared", i, ALARM_TYPE)
