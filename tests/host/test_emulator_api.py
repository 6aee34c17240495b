"""The emulator's platform model and REST API: every resource through `Api.handle` on an in-memory
SQLite and on PostgreSQL (the `model_store` fixture), durability on a file, and the HTTP layer
through urllib with Basic auth."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microcot import identity
from microcot_host.emulator import api as api_mod
from microcot_host.emulator.api import Api, ApiResult
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import Model, open_model

pytestmark = pytest.mark.timeout(60)

ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"


class FakeSink:
    """Records what the API asks of the broker."""

    def __init__(self) -> None:
        self.devices: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def add_device(self, device_id: str, password: str) -> None:
        self.calls.append(("add", device_id))
        if device_id in self.refuse:
            raise RuntimeError(f"bad device ID {device_id!r}")
        self.devices[device_id] = password

    def remove_device(self, device_id: str) -> bool:
        self.calls.append(("remove", device_id))
        return self.devices.pop(device_id, None) is not None


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def api(sink: FakeSink, model_store: str) -> Iterator[Api]:
    with open_model(model_store) as model:
        yield Api(model, sink, base_url="http://emu:8080")


def ok(r: ApiResult, status: int = 200) -> Any:
    assert r.status == status, r
    return r.body


def err(r: ApiResult, status: int, needle: str = "") -> dict[str, Any]:
    assert r.status == status, r
    assert isinstance(r.body, dict) and set(r.body) == {"error", "message", "info"}, r.body
    assert needle in r.body["message"], r.body
    return r.body


def device(api: Api, name: str = "dev", **frags: Any) -> str:
    body = ok(api.handle("POST", "/inventory/managedObjects",
                         {"name": name, "c8y_IsDevice": {}, **frags}), 201)
    return str(body["id"])


def iccid(n: int) -> str:
    payload = "8949200000%08d" % n
    return payload + identity.luhn_check_digit(payload)


# -- inventory --------------------------------------------------------------------------------

def test_managed_object_lifecycle(api: Api) -> None:
    r = api.handle("POST", "/inventory/managedObjects",
                   json.dumps({"name": "Kessel", "type": "c8y_Boiler", "c8y_IsDevice": {},
                               "c8y_Hardware": {"serialNumber": "42"}, "id": "999"}),
                   "application/vnd.com.nsn.cumulocity.managedObject+json", user="8949")
    mo = ok(r, 201)
    assert mo["id"].isdigit() and mo["id"] != "999"
    assert r.reason == "Created" and r.headers["Location"] == mo["self"]
    assert mo["self"] == f"http://emu:8080/inventory/managedObjects/{mo['id']}"
    assert (mo["owner"], mo["c8y_IsDevice"], mo["childDevices"]["references"]) == ("8949", {}, [])
    assert mo["creationTime"].endswith("Z")

    got = ok(api.handle("GET", f"/inventory/managedObjects/{mo['id']}"))
    assert got == mo
    upd = ok(api.handle("PUT", f"/inventory/managedObjects/{mo['id']}",
                        {"c8y_Hardware": None, "c8y_SupportedOperations": ["c8y_Command"],
                         "name": "Kessel 2", "creationTime": "bogus"}))
    assert "c8y_Hardware" not in upd and upd["c8y_SupportedOperations"] == ["c8y_Command"]
    assert upd["name"] == "Kessel 2" and upd["creationTime"] == mo["creationTime"]
    assert upd["lastUpdated"] >= mo["lastUpdated"] and upd["c8y_IsDevice"] == {}

    assert ok(api.handle("DELETE", f"/inventory/managedObjects/{mo['id']}"), 204) is None
    r = api.handle("GET", f"/inventory/managedObjects/{mo['id']}")
    assert (r.status, r.reason) == (404, "Not Found")
    assert r.body["error"] == "inventory/Not Found"  # type: ignore[index]
    err(api.handle("PUT", f"/inventory/managedObjects/{mo['id']}", {}), 404)
    err(api.handle("DELETE", "/inventory/managedObjects/abc"), 404)


def test_request_errors(api: Api) -> None:
    e = err(api.handle("POST", "/inventory/managedObjects", b'{"name": '), 400, "Invalid JSON")
    assert e["error"] == "inventory/badRequest"
    err(api.handle("POST", "/inventory/managedObjects", b"\xff\xfe"), 400, "UTF-8")
    err(api.handle("POST", "/inventory/managedObjects", "[1, 2]"), 400, "JSON object")
    err(api.handle("POST", "/inventory/managedObjects", {"name": 5}), 400, "name must be a string")
    err(api.handle("POST", "/inventory/managedObjects"), 400, "needs a JSON body")
    err(api.handle("POST", "/inventory/managedObjects", "x=1",
                   "application/x-www-form-urlencoded"), 415)
    r = api.handle("PATCH", "/inventory/managedObjects")
    err(r, 405)
    assert r.headers["Allow"] == "GET, POST" and r.reason == "Method Not Allowed"
    err(api.handle("GET", "/inventory/nothing"), 404, "no resource")
    err(api.handle("GET", "/"), 404)
    err(api.handle("GET", "/inventory/managedObjects?pageSize=0"), 400, "pageSize")
    err(api.handle("GET", "/inventory/managedObjects?currentPage=x"), 400, "currentPage")
    err(api.handle("GET", "/inventory/managedObjects?ids=1,x"), 400, "ids")
    err(api.handle("GET", "/inventory/managedObjects?withTotalPages=maybe"), 400,
        "withTotalPages")


def test_managed_object_filters(api: Api) -> None:
    a = device(api, "Alpha", type="t1")
    b = device(api, "Beta", type="t2", c8y_Position={"lat": 1})
    c = ok(api.handle("POST", "/inventory/managedObjects", {"name": "gamma_%", "type": "t1"},
                      user="u2"), 201)["id"]

    def ids(query: str) -> list[str]:
        body = ok(api.handle("GET", "/inventory/managedObjects?pageSize=100&" + query))
        return [m["id"] for m in body["managedObjects"]]

    assert ids("type=t1") == [a, c]
    assert ids("fragmentType=c8y_IsDevice") == [a, b]
    assert ids("fragmentType=c8y_Position") == [b]
    assert ids("text=alp") == [a] and ids("text=_%25") == [c] and ids("text=t2") == [b]
    assert ids(f"ids={c},{a}") == [a, c]
    assert ids("owner=u2") == [c]
    assert ids("type=t1&owner=u2") == [c]
    assert ids("type=none") == []


def test_paging(api: Api) -> None:
    made = [device(api, f"d{i}") for i in range(12)]
    first = ok(api.handle("GET", "/inventory/managedObjects?withTotalPages=true"))
    assert [m["id"] for m in first["managedObjects"]] == made[:5]
    assert first["statistics"] == {"currentPage": 1, "pageSize": 5, "totalPages": 3}
    assert "prev" not in first
    nxt = first["next"].removeprefix("http://emu:8080")
    second = ok(api.handle("GET", nxt))
    assert [m["id"] for m in second["managedObjects"]] == made[5:10]
    assert "withTotalPages=true" in nxt and second["prev"].endswith("currentPage=1")
    last = ok(api.handle("GET", "/inventory/managedObjects?pageSize=5&currentPage=3"))
    assert [m["id"] for m in last["managedObjects"]] == made[10:] and "next" not in last
    beyond = ok(api.handle("GET", "/inventory/managedObjects?currentPage=9"))
    assert beyond["managedObjects"] == []
    capped = ok(api.handle("GET", "/inventory/managedObjects?pageSize=5000"))
    assert capped["statistics"]["pageSize"] == 2000 and len(capped["managedObjects"]) == 12
    assert "totalPages" not in capped["statistics"]


def test_child_devices(api: Api) -> None:
    gw, child, other = device(api, "gw"), device(api, "child"), device(api, "other")
    base = f"/inventory/managedObjects/{gw}/childDevices"
    r = api.handle("POST", base, {"managedObject": {"id": child}})
    ref = ok(r, 201)
    assert ref["managedObject"] == {"id": child, "name": "child",
                                    "self": f"http://emu:8080/inventory/managedObjects/{child}"}
    assert ref["self"] == f"http://emu:8080{base}/{child}" == r.headers["Location"]
    ok(api.handle("POST", base, {"managedObject": {"id": child}}), 201)  # idempotent

    listed = ok(api.handle("GET", base))
    assert [x["managedObject"]["id"] for x in listed["references"]] == [child]
    mo = ok(api.handle("GET", f"/inventory/managedObjects/{gw}"))
    assert mo["childDevices"]["references"][0]["managedObject"]["id"] == child
    assert mo["childDevices"]["self"] == f"http://emu:8080{base}"
    kid = ok(api.handle("GET", f"/inventory/managedObjects/{child}"))
    assert [x["managedObject"]["id"] for x in kid["deviceParents"]["references"]] == [gw]
    ok(api.handle("GET", f"{base}/{child}"))
    err(api.handle("GET", f"{base}/{other}"), 404)

    err(api.handle("POST", base, {"managedObject": {}}), 422, "managedObject.id")
    err(api.handle("POST", base, {"managedObject": {"id": "77777"}}), 422, "77777")
    err(api.handle("POST", f"/inventory/managedObjects/{child}/childDevices",
                   {"managedObject": {"id": gw}}), 422, "cycle")
    err(api.handle("POST", f"/inventory/managedObjects/{gw}/childDevices",
                   {"managedObject": {"id": gw}}), 422, "own child")
    err(api.handle("POST", "/inventory/managedObjects/77777/childDevices",
                   {"managedObject": {"id": child}}), 404)

    ok(api.handle("DELETE", f"{base}/{child}"), 204)
    err(api.handle("DELETE", f"{base}/{child}"), 404)
    assert ok(api.handle("GET", base))["references"] == []
    # deleting a parent drops the references
    ok(api.handle("POST", base, {"managedObject": {"id": child}}), 201)
    ok(api.handle("DELETE", f"/inventory/managedObjects/{gw}"), 204)
    kid = ok(api.handle("GET", f"/inventory/managedObjects/{child}"))
    assert kid["deviceParents"]["references"] == []


# -- identity ---------------------------------------------------------------------------------

def test_external_ids(api: Api) -> None:
    mo, other = device(api), device(api, "other")
    ic = iccid(1)
    err(api.handle("GET", f"/identity/externalIds/c8y_Serial/{ic}"), 404, "External id not found")
    r = api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                   {"type": "c8y_Serial", "externalId": ic})
    x = ok(r, 201)
    assert x == {"externalId": ic, "type": "c8y_Serial",
                 "self": f"http://emu:8080/identity/externalIds/c8y_Serial/{ic}",
                 "managedObject": {"id": mo,
                                   "self": f"http://emu:8080/inventory/managedObjects/{mo}"}}
    assert ok(api.handle("GET", f"/identity/externalIds/c8y_Serial/{ic}")) == x
    # the same pair again for the same object is fine; for another object a conflict
    ok(api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                  {"type": "c8y_Serial", "externalId": ic}), 201)
    e = err(api.handle("POST", f"/identity/globalIds/{other}/externalIds",
                       {"type": "c8y_Serial", "externalId": ic}), 409, mo)
    assert e["error"] == "identity/Duplicate"
    err(api.handle("POST", f"/identity/globalIds/{mo}/externalIds", {"type": "c8y_Serial"}),
        422, "externalId")
    err(api.handle("POST", "/identity/globalIds/77777/externalIds",
                   {"type": "c8y_Serial", "externalId": "x"}), 404)

    # values with blanks and slashes travel percent-encoded
    ok(api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                  {"type": "my type", "externalId": "a/b c"}), 201)
    got = ok(api.handle("GET", "/identity/externalIds/my%20type/a%2Fb%20c"))
    assert got["managedObject"]["id"] == mo
    assert got["self"].endswith("/identity/externalIds/my%20type/a%2Fb%20c")
    listed = ok(api.handle("GET", f"/identity/globalIds/{mo}/externalIds"))
    assert sorted(x["externalId"] for x in listed["externalIds"]) == sorted(["a/b c", ic])

    ok(api.handle("DELETE", f"/identity/externalIds/c8y_Serial/{ic}"), 204)
    err(api.handle("DELETE", f"/identity/externalIds/c8y_Serial/{ic}"), 404)
    ok(api.handle("DELETE", f"/inventory/managedObjects/{mo}"), 204)
    err(api.handle("GET", "/identity/externalIds/my%20type/a%2Fb%20c"), 404)
    err(api.handle("GET", f"/identity/globalIds/{mo}/externalIds"), 404)


# -- measurements, events ---------------------------------------------------------------------

def _measurement(src: str, time: str, mtype: str = "c8y_Temperature", series: str = "T",
                 value: float = 21.5) -> dict[str, Any]:
    return {"source": {"id": src}, "time": time, "type": mtype,
            mtype: {series: {"value": value, "unit": "C"}}}


def test_measurements(api: Api) -> None:
    a, b = device(api), device(api)
    r = api.handle("POST", "/measurement/measurements",
                   _measurement(a, "2017-09-14T12:37:00.000+02:00"))
    m = ok(r, 201)
    assert m["time"] == "2017-09-14T12:37:00.000+02:00" and m["type"] == "c8y_Temperature"
    assert m["source"] == {"id": a, "self": f"http://emu:8080/inventory/managedObjects/{a}"}
    assert m["c8y_Temperature"]["T"]["value"] == 21.5 and r.headers["Location"] == m["self"]
    assert ok(api.handle("GET", f"/measurement/measurements/{m['id']}")) == m
    ok(api.handle("POST", "/measurement/measurements",
                  _measurement(a, "2017-09-14T10:38:00Z", "c8y_Signal", "rssi")), 201)
    ok(api.handle("POST", "/measurement/measurements", _measurement(b, "2017-09-14T10:36:00")),
       201)

    def times(query: str) -> list[str]:
        body = ok(api.handle("GET", "/measurement/measurements?pageSize=50&" + query))
        return [x["time"] for x in body["measurements"]]

    assert times("") == ["2017-09-14T10:36:00.000Z", "2017-09-14T12:37:00.000+02:00",
                         "2017-09-14T10:38:00.000Z"]
    assert times("revert=true")[0] == "2017-09-14T10:38:00.000Z"
    assert times(f"source={a}") == times("")[1:]
    assert times("type=c8y_Signal") == ["2017-09-14T10:38:00.000Z"]
    assert times("valueFragmentType=c8y_Signal") == ["2017-09-14T10:38:00.000Z"]
    assert times("valueFragmentType=c8y_Temperature&valueFragmentSeries=T") == times("")[:2]
    assert times("valueFragmentSeries=rssi") == ["2017-09-14T10:38:00.000Z"]
    assert times("dateFrom=2017-09-14T10:37:00Z&dateTo=2017-09-14T10:38:00Z") == [
        "2017-09-14T12:37:00.000+02:00"]
    err(api.handle("GET", "/measurement/measurements?dateFrom=yesterday"), 400, "dateFrom")
    err(api.handle("GET", "/measurement/measurements?source=abc"), 400, "source")

    e = err(api.handle("POST", "/measurement/measurements", {"source": {"id": a}}), 422,
            "Following mandatory fields should be included: type,time")
    assert e["error"] == "measurement/validationError"
    err(api.handle("POST", "/measurement/measurements", _measurement("77777", "2020-01-01")),
        422, "source.id")
    err(api.handle("POST", "/measurement/measurements", _measurement(a, "14.09.2017")), 422,
        "time")
    err(api.handle("POST", "/measurement/measurements", {**_measurement(a, "2020-01-01"),
                                                         "source": "x"}), 400, "source")
    ok(api.handle("DELETE", f"/measurement/measurements/{m['id']}"), 204)
    err(api.handle("GET", f"/measurement/measurements/{m['id']}"), 404)
    err(api.handle("DELETE", "/measurement/measurements/x"), 404)


def test_events(api: Api) -> None:
    a = device(api)
    base = {"source": {"id": a}, "type": "c8y_LocationUpdate", "text": "moved"}
    e1 = ok(api.handle("POST", "/event/events", {**base, "time": "2020-01-01T00:00:00Z",
                                                  "c8y_Position": {"lat": 1, "lng": 2}}), 201)
    e2 = ok(api.handle("POST", "/event/events", {**base, "time": "2020-01-02T00:00:00Z",
                                                  "type": "other"}), 201)
    assert e1["c8y_Position"] == {"lat": 1, "lng": 2} and "creationTime" in e1
    listed = ok(api.handle("GET", f"/event/events?source={a}"))["events"]
    assert [x["id"] for x in listed] == [e2["id"], e1["id"]]  # newest first
    assert [x["id"] for x in ok(api.handle("GET", "/event/events?revert=true"))["events"]] == [
        e1["id"], e2["id"]]
    assert [x["id"] for x in ok(api.handle("GET", "/event/events?type=other"))["events"]] == [
        e2["id"]]
    assert [x["id"] for x in ok(api.handle(
        "GET", "/event/events?fragmentType=c8y_Position"))["events"]] == [e1["id"]]
    assert ok(api.handle("GET", "/event/events?dateTo=2020-01-01T12:00:00Z"))["events"][0][
        "id"] == e1["id"]
    err(api.handle("POST", "/event/events", {"source": {"id": a}, "type": "t"}), 422,
        "text,time")
    upd = ok(api.handle("PUT", f"/event/events/{e1['id']}", {"text": "moved again",
                                                             "c8y_Position": None}))
    assert upd["text"] == "moved again" and "c8y_Position" not in upd
    ok(api.handle("DELETE", f"/event/events/{e1['id']}"), 204)
    err(api.handle("GET", f"/event/events/{e1['id']}"), 404)


# -- alarms -----------------------------------------------------------------------------------

def test_alarm_deduplication(api: Api) -> None:
    a, b = device(api), device(api)
    alarm = {"source": {"id": a}, "type": "Kesseltemperatur", "time": "2017-09-14T12:37:00.000",
             "text": "Kesseltemperatur stark erhoeht", "status": "ACTIVE", "severity": "MAJOR"}
    first = ok(api.handle("POST", "/alarm/alarms", alarm), 201)
    assert (first["count"], first["status"], first["firstOccurrenceTime"]) == (
        1, "ACTIVE", "2017-09-14T12:37:00.000Z")
    again = ok(api.handle("POST", "/alarm/alarms", {**alarm, "time": "2017-09-14T12:40:00Z",
                                                    "text": "noch heisser"}), 201)
    assert again["id"] == first["id"] and again["count"] == 2
    assert (again["time"], again["text"]) == ("2017-09-14T12:40:00.000Z", "noch heisser")
    assert again["firstOccurrenceTime"] == first["firstOccurrenceTime"]
    # another type or another source is another alarm
    assert ok(api.handle("POST", "/alarm/alarms", {**alarm, "type": "Druck"}), 201)["id"] != \
        first["id"]
    assert ok(api.handle("POST", "/alarm/alarms", {**alarm, "source": {"id": b}}), 201)["id"] \
        != first["id"]
    # acknowledged still absorbs; cleared does not
    ack = ok(api.handle("PUT", f"/alarm/alarms/{first['id']}", {"status": "ACKNOWLEDGED"}))
    assert ack["status"] == "ACKNOWLEDGED"
    assert ok(api.handle("POST", "/alarm/alarms", alarm), 201)["count"] == 3
    cleared = ok(api.handle("POST", "/alarm/alarms", {**alarm, "status": "CLEARED"}), 201)
    assert cleared["id"] == first["id"] and cleared["status"] == "CLEARED"
    fresh = ok(api.handle("POST", "/alarm/alarms", alarm), 201)
    assert fresh["id"] != first["id"] and fresh["count"] == 1
    err(api.handle("PUT", f"/alarm/alarms/{first['id']}", {"status": "ACTIVE"}), 422, "CLEARED")


def test_alarm_queries_and_validation(api: Api) -> None:
    a = device(api)
    base = {"source": {"id": a}, "time": "2020-01-01T00:00:00Z", "text": "x"}
    major = ok(api.handle("POST", "/alarm/alarms", {**base, "type": "t1", "severity": "MAJOR"}),
               201)
    minor = ok(api.handle("POST", "/alarm/alarms", {**base, "type": "t2", "severity": "MINOR",
                                                    "status": "ACKNOWLEDGED"}), 201)
    gone = ok(api.handle("POST", "/alarm/alarms", {**base, "type": "t3", "severity": "WARNING",
                                                   "status": "CLEARED"}), 201)

    def ids(query: str) -> set[str]:
        return {x["id"] for x in ok(api.handle("GET", "/alarm/alarms?" + query))["alarms"]}

    assert ids("status=ACTIVE") == {major["id"]}
    assert ids("status=ACTIVE,ACKNOWLEDGED") == {major["id"], minor["id"]}
    assert ids("resolved=true") == {gone["id"]}
    assert ids("resolved=false") == {major["id"], minor["id"]}
    assert ids("severity=MINOR") == {minor["id"]}
    assert ids(f"source={a}&type=t3") == {gone["id"]}
    e = err(api.handle("POST", "/alarm/alarms", {**base, "type": "t", "severity": "HUGE"}), 422,
            "severity")
    assert "CRITICAL, MAJOR, MINOR, WARNING" in e["message"]
    err(api.handle("POST", "/alarm/alarms", {**base, "type": "t", "severity": "MAJOR",
                                             "status": "OPEN"}), 422, "status")
    err(api.handle("POST", "/alarm/alarms", {"source": {"id": a}, "type": "t"}), 422,
        "text,severity,time")
    upd = ok(api.handle("PUT", f"/alarm/alarms/{major['id']}",
                        {"severity": "CRITICAL", "text": "worse"}))
    assert (upd["severity"], upd["text"], upd["status"]) == ("CRITICAL", "worse", "ACTIVE")
    err(api.handle("PUT", f"/alarm/alarms/{major['id']}", {"severity": "low"}), 422)
    err(api.handle("PUT", "/alarm/alarms/77777", {"status": "CLEARED"}), 404)
    err(api.handle("DELETE", f"/alarm/alarms/{major['id']}"), 405)


# -- operations -------------------------------------------------------------------------------

def test_operations(api: Api) -> None:
    gw, child, other = device(api, "gw"), device(api, "child"), device(api, "other")
    ok(api.handle("POST", f"/inventory/managedObjects/{gw}/childDevices",
                  {"managedObject": {"id": child}}), 201)
    seen: list[dict[str, Any]] = []
    api.on_operation_created(seen.append)
    api.on_operation_created(lambda op: 1 / 0)  # a broken listener changes nothing

    r = api.handle("POST", "/devicecontrol/operations",
                   {"deviceId": gw, "status": "SUCCESSFUL", "description": "ls",
                    "c8y_Command": {"text": "ls -l"}})
    op = ok(r, 201)
    assert (op["status"], op["deviceId"], op["deviceName"]) == ("PENDING", gw, "gw")
    assert op["c8y_Command"] == {"text": "ls -l"} and r.headers["Location"] == op["self"]
    assert seen == [op]
    op2 = ok(api.handle("POST", "/devicecontrol/operations",
                        {"deviceId": child, "c8y_Restart": {}}), 201)
    op3 = ok(api.handle("POST", "/devicecontrol/operations",
                        {"deviceId": other, "c8y_Command": {"text": "x"}}), 201)
    assert len(seen) == 3
    err(api.handle("POST", "/devicecontrol/operations", {"c8y_Restart": {}}), 422, "deviceId")
    err(api.handle("POST", "/devicecontrol/operations", {"deviceId": "77777"}), 422, "77777")
    assert len(seen) == 3

    def ids(query: str) -> list[str]:
        body = ok(api.handle("GET", "/devicecontrol/operations?pageSize=20&" + query))
        return [o["id"] for o in body["operations"]]

    assert ids("") == [op["id"], op2["id"], op3["id"]]  # creation order
    assert ids("revert=true") == [op3["id"], op2["id"], op["id"]]
    assert ids(f"deviceId={gw}") == [op["id"]]
    assert ids(f"agentId={gw}") == [op["id"], op2["id"]]
    assert ids("fragmentType=c8y_Command") == [op["id"], op3["id"]]

    url = f"/devicecontrol/operations/{op['id']}"
    assert ok(api.handle("PUT", url, {"status": "EXECUTING"}))["status"] == "EXECUTING"
    ok(api.handle("PUT", url, {"status": "EXECUTING"}))  # a QoS 1 duplicate
    assert ids("status=PENDING") == [op2["id"], op3["id"]]
    assert ids("status=EXECUTING,PENDING") == ids("")
    err(api.handle("PUT", url, {"status": "PENDING"}), 422, "EXECUTING and cannot become PENDING")
    done = ok(api.handle("PUT", url, {"status": "SUCCESSFUL",
                                      "c8y_Command": {"text": "ls -l", "result": "total 0"}}))
    assert done["c8y_Command"]["result"] == "total 0" and done["description"] == "ls"
    err(api.handle("PUT", url, {"status": "FAILED"}), 422, "SUCCESSFUL")
    err(api.handle("PUT", url, {"status": "DONE"}), 422, "PENDING, EXECUTING")
    failed = ok(api.handle("PUT", f"/devicecontrol/operations/{op2['id']}",
                           {"status": "FAILED", "failureReason": "no such file"}))
    assert (failed["status"], failed["failureReason"]) == ("FAILED", "no such file")
    assert ok(api.handle("GET", f"/devicecontrol/operations/{op2['id']}")) == failed
    err(api.handle("GET", "/devicecontrol/operations/77777"), 404)
    err(api.handle("PUT", "/devicecontrol/operations/77777", {"status": "FAILED"}), 404)


# -- new device requests ----------------------------------------------------------------------

def test_new_device_request_flow(api: Api) -> None:
    accepted: list[dict[str, Any]] = []
    api.on_request_accepted(accepted.append)
    ic = iccid(7)
    r = ok(api.handle("POST", "/devicecontrol/newDeviceRequests", {"id": ic}), 201)
    assert (r["id"], r["status"]) == (ic, "WAITING_FOR_CONNECTION")
    assert r["self"] == f"http://emu:8080/devicecontrol/newDeviceRequests/{ic}"
    err(api.handle("POST", "/devicecontrol/newDeviceRequests", {"id": ic}), 409)
    err(api.handle("POST", "/devicecontrol/newDeviceRequests", {}), 422, "id")
    err(api.handle("POST", "/devicecontrol/newDeviceRequests", {"id": "a/b"}), 422, "'/'")
    url = f"/devicecontrol/newDeviceRequests/{ic}"
    # the device has not shown up yet: it cannot be accepted
    err(api.handle("PUT", url, {"status": "ACCEPTED"}), 422, "WAITING_FOR_CONNECTION")
    assert api.bootstrap_request(ic)["status"] == "PENDING_ACCEPTANCE"
    assert api.bootstrap_request(ic)["status"] == "PENDING_ACCEPTANCE"
    err(api.handle("PUT", url, {"status": "NOPE"}), 422)
    err(api.handle("PUT", url, {}), 422, "status")
    assert accepted == []
    done = ok(api.handle("PUT", url, {"status": "ACCEPTED"}))
    assert done["status"] == "ACCEPTED" and accepted == [done]
    ok(api.handle("PUT", url, {"status": "ACCEPTED"}))
    assert len(accepted) == 1
    assert api.bootstrap_request(ic)["status"] == "ACCEPTED"

    # a device that shows up unannounced gets a request of its own
    other = iccid(8)
    assert api.bootstrap_request(other)["status"] == "PENDING_ACCEPTANCE"
    listed = ok(api.handle("GET", "/devicecontrol/newDeviceRequests"))
    assert [x["id"] for x in listed["newDeviceRequests"]] == [ic, other]
    pending = ok(api.handle("GET", "/devicecontrol/newDeviceRequests?status=PENDING_ACCEPTANCE"))
    assert [x["id"] for x in pending["newDeviceRequests"]] == [other]
    ok(api.handle("DELETE", f"/devicecontrol/newDeviceRequests/{other}"), 204)
    err(api.handle("GET", f"/devicecontrol/newDeviceRequests/{other}"), 404)
    err(api.handle("DELETE", f"/devicecontrol/newDeviceRequests/{other}"), 404)


def test_issue_and_delete_credentials(api: Api, sink: FakeSink) -> None:
    ic = iccid(9)
    api.bootstrap_request(ic)
    ok(api.handle("PUT", f"/devicecontrol/newDeviceRequests/{ic}", {"status": "ACCEPTED"}))
    api.issue_credentials(ic, "Fresh-Password-1")
    assert sink.devices == {ic: "Fresh-Password-1"}
    assert api.model.check_credentials(ic, "Fresh-Password-1")
    assert not api.model.check_credentials(ic, "wrong")
    got = ok(api.handle("GET", f"/devicecontrol/deviceCredentials/{ic}"))
    assert got["id"] == got["username"] == ic and got["source"] == "bootstrap"
    assert "Fresh-Password-1" not in json.dumps(got) and "password" not in got

    ok(api.handle("DELETE", f"/devicecontrol/deviceCredentials/{ic}"), 204)
    assert sink.calls[-1] == ("remove", ic) and ic not in sink.devices
    err(api.handle("GET", f"/devicecontrol/deviceCredentials/{ic}"), 404)
    # the accepted request went with them: a re-bootstrap must be accepted again
    assert api.bootstrap_request(ic)["status"] == "PENDING_ACCEPTANCE"
    err(api.handle("DELETE", f"/devicecontrol/deviceCredentials/{ic}"), 404)
    # credentials only the broker knows are removed too
    sink.devices["stray"] = "x"
    ok(api.handle("DELETE", "/devicecontrol/deviceCredentials/stray"), 204)


# -- bulk registration ------------------------------------------------------------------------

FLEET_OK = [("dev-1", "Secret-Pass-1", "mqtt", "Kessel 1", iccid(11), "1"),
            ("dev-2", "Secret-Pass-2", "mqtt", "Kessel 2", iccid(12), "0")]


def _csv(rows: list[tuple[str, ...]], sep: str = ";", end: str = "\r\n") -> str:
    return end.join([sep.join(("ID", "CREDENTIALS", "TYPE", "NAME", "ICCID", "SHELL"))]
                    + [sep.join(r) for r in rows]) + end


def _multipart(payload: str, boundary: str = "myBoundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"comment\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"file\"; filename=\"fleet.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n"
            f"{payload}\r\n--{boundary}--\r\n").encode()
    return body, f'multipart/form-data; boundary="{boundary}"'


def test_bulk_registration_multipart(api: Api, sink: FakeSink) -> None:
    body, ct = _multipart(_csv(FLEET_OK))
    r = api.handle("POST", "/devicecontrol/bulkNewDeviceRequests", body, ct)
    assert ok(r, 201) == {"numberOfAll": 2, "numberOfCreated": 2, "numberOfFailed": 0,
                          "numberOfSuccessful": 2, "credentialUpdatedList": [],
                          "failedCreationList": []}
    assert sink.devices == {iccid(11): "Secret-Pass-1", iccid(12): "Secret-Pass-2"}
    req = ok(api.handle("GET", f"/devicecontrol/newDeviceRequests/{iccid(11)}"))
    assert req["status"] == "ACCEPTED"
    assert req[api_mod.BULK_FRAGMENT] == {"externalId": "dev-1", "name": "Kessel 1",
                                          "type": "mqtt", "shell": True}
    cred = ok(api.handle("GET", f"/devicecontrol/deviceCredentials/{iccid(12)}"))
    assert cred["source"] == "bulk"
    assert api.model.check_credentials(iccid(12), "Secret-Pass-2")
    # no managed object: the devices create themselves after connecting
    assert ok(api.handle("GET", "/inventory/managedObjects"))["managedObjects"] == []

    # the same file again updates the credentials
    r = api.handle("POST", "/devicecontrol/bulkNewDeviceRequests", body, ct)
    again = ok(r, 201)
    assert (again["numberOfCreated"], again["numberOfSuccessful"]) == (0, 2)
    assert again["credentialUpdatedList"] == [
        {"bulkNewDeviceStatus": "CREDENTIAL_UPDATED", "creationStatus": "CREDENTIAL_UPDATED",
         "deviceId": "dev-1"},
        {"bulkNewDeviceStatus": "CREDENTIAL_UPDATED", "creationStatus": "CREDENTIAL_UPDATED",
         "deviceId": "dev-2"}]


@pytest.mark.parametrize("sep", [";", ",", "\t"])
def test_bulk_registration_raw_csv(api: Api, sink: FakeSink, sep: str) -> None:
    r = api.handle("POST", "/devicecontrol/bulkNewDeviceRequests", _csv(FLEET_OK, sep, "\n"),
                   "text/csv")
    assert ok(r, 201)["numberOfCreated"] == 2
    assert set(sink.devices) == {iccid(11), iccid(12)}


def test_bulk_registration_reports_every_bad_row(api: Api, sink: FakeSink) -> None:
    accepted: list[Any] = []
    api.on_request_accepted(accepted.append)
    sink.refuse.add(iccid(30))
    api.bootstrap_request(iccid(31))  # a device waiting in bootstrap gets accepted by the file
    rows = [
        ("good-1", "Secret-Pass-1", "mqtt", "N", iccid(20), "1"),                 # 2
        ("bad-type", "Secret-Pass-1", "MQTT", "N", iccid(21), "1"),               # 3
        ("bad-shell", "Secret-Pass-1", "mqtt", "N", iccid(22), "2"),              # 4
        ("good-1", "Secret-Pass-1", "mqtt", "N", iccid(23), "1"),                 # 5 dup ID
        ("dup-iccid", "Secret-Pass-1", "mqtt", "N", iccid(20), "1"),              # 6 dup ICCID
        ("short", "Tiny-1", "mqtt", "N", iccid(24), "1"),                         # 7
        ("empty", "", "mqtt", "N", iccid(25), "1"),                               # 8
        ("luhn", "Secret-Pass-1", "mqtt", "N", iccid(26)[:-1] + "X", "1"),        # 9
        ("missing", "Secret-Pass-1", "mqtt", "N", iccid(27)),                     # 10
        ("refused", "Secret-Pass-1", "mqtt", "N", iccid(30), "0"),                # 11
        ("waiting", "Secret-Pass-3", "mqtt", "N", iccid(31), "0"),                # 12
    ]
    r = api.handle("POST", "/devicecontrol/bulkNewDeviceRequests", _csv(rows))
    body = ok(r, 201)
    assert (body["numberOfAll"], body["numberOfCreated"], body["numberOfFailed"],
            body["numberOfSuccessful"]) == (11, 2, 9, 2)
    failed = {f["line"]: f for f in body["failedCreationList"]}
    assert sorted(failed) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert all(f["bulkNewDeviceStatus"] == "FAILED" == f["creationStatus"]
               for f in failed.values())
    assert failed[3]["deviceId"] == "bad-type" and failed[3]["failureReason"].startswith("TYPE:")
    assert "SHELL: must be 0 or 1" in failed[4]["failureReason"]
    assert "duplicate ID 'good-1', first on line 2" in failed[5]["failureReason"]
    assert "first on line 2" in failed[6]["failureReason"] and "ICCID" in failed[6][
        "failureReason"]
    assert "CREDENTIALS: too short" in failed[7]["failureReason"]
    assert "CREDENTIALS: empty" in failed[8]["failureReason"]
    assert "ICCID" in failed[9]["failureReason"]
    assert "SHELL: missing value" in failed[10]["failureReason"]
    assert "broker refused" in failed[11]["failureReason"]
    assert "Secret-Pass" not in json.dumps(body) and "Tiny-1" not in json.dumps(body)
    assert set(sink.devices) == {iccid(20), iccid(31)}
    assert ok(api.handle("GET", f"/devicecontrol/newDeviceRequests/{iccid(31)}"))[
        "status"] == "ACCEPTED"
    assert accepted == []  # these devices have their password: nobody must issue another
    err(api.handle("GET", f"/devicecontrol/deviceCredentials/{iccid(30)}"), 404)


def test_bulk_registration_refuses_unusable_files(api: Api, sink: FakeSink) -> None:
    url = "/devicecontrol/bulkNewDeviceRequests"
    err(api.handle("POST", url, "ID|CREDENTIALS|TYPE\nx|y|z\n", "text/csv"), 422,
        "unknown separator")
    err(api.handle("POST", url, "ID;CREDENTIALS\nx;y\n", "text/csv"), 422,
        "missing columns TYPE, NAME, ICCID, SHELL")
    err(api.handle("POST", url, None, "text/csv"), 400, "CSV file")
    err(api.handle("POST", url, {"id": 1}), 415)
    err(api.handle("POST", url, b"{}", "application/json"), 415)
    err(api.handle("POST", url, b"\xff\xfe\x00", "text/csv"), 400, "UTF-8")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"c\"\r\n\r\ny\r\n--b--\r\n")
    err(api.handle("POST", url, body, "multipart/form-data; boundary=b"), 400, "file")
    err(api.handle("POST", url, b"hello", "multipart/form-data"), 400, "boundary")
    err(api.handle("GET", url), 405)
    assert sink.calls == []


# -- tenant, SmartREST collections, connector helpers -----------------------------------------

def test_internal_failures_are_500(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    api.model.close()
    e = err(api.handle("GET", "/inventory/managedObjects"), 500, "see its log")
    assert e["error"] == "inventory/Internal Server Error"
    assert "GET /inventory/managedObjects failed" in caplog.text


def test_tenant_and_s(api: Api) -> None:
    t = ok(api.handle("GET", "/tenant/currentTenant"))
    assert (t["name"], t["domainName"]) == ("t-emulator", "emu:8080")
    assert t["self"] == "http://emu:8080/tenant/currentTenant"
    err(api.handle("POST", "/s", "15,X"), 501, "SmartREST")


def test_template_collections(api: Api) -> None:
    frag = {"requestTemplates": [{"msgId": "100", "method": "GET"}], "responseTemplates": [],
            "registration": "10,100,GET,/x,,,,,"}
    assert api_mod.find_template_collection(api, "XID-1") is None
    made = ok(api_mod.create_template_collection(api, "XID-1", frag, user="8949"), 201)
    assert made["name"] == "XID-1" and made["type"] == api_mod.SMARTREST_MO_TYPE
    found = api_mod.find_template_collection(api, "XID-1")
    assert found is not None and found[0] == made["id"]
    assert found[1][api_mod.SMARTREST_FRAGMENT] == frag
    x = ok(api.handle("GET", f"/identity/externalIds/{api_mod.SMARTREST_XID_TYPE}/XID-1"))
    assert x["managedObject"]["id"] == made["id"]
    listed = ok(api.handle("GET", "/inventory/managedObjects?fragmentType="
                                  + api_mod.SMARTREST_FRAGMENT))
    assert [m["id"] for m in listed["managedObjects"]] == [made["id"]]
    err(api_mod.create_template_collection(api, "XID-1", frag), 409)
    ok(api.handle("DELETE", f"/inventory/managedObjects/{made['id']}"), 204)
    assert api_mod.find_template_collection(api, "XID-1") is None
    ok(api_mod.create_template_collection(api, "XID-1", frag), 201)


def test_template_collection_race_leaves_nothing_behind(api: Api) -> None:
    # the second registration loses at the external ID: its managed object must go again
    ok(api_mod.create_template_collection(api, "XID-R", {}), 201)
    ext = api.handle

    def no_find(method: str, target: str, *a: Any, **kw: Any) -> ApiResult:
        if method == "GET" and target.startswith("/identity/externalIds/"):
            return ApiResult(404, None, "Not Found", {})
        return ext(method, target, *a, **kw)

    api.handle = no_find  # type: ignore[method-assign]
    err(api_mod.create_template_collection(api, "XID-R", {}), 409)
    api.handle = ext  # type: ignore[method-assign]
    listed = ok(api.handle("GET", "/inventory/managedObjects?type=" + api_mod.SMARTREST_MO_TYPE))
    assert len(listed["managedObjects"]) == 1


def test_device_user(api: Api) -> None:
    ic = iccid(40)
    api.issue_credentials(ic, "Device-Pass-1")
    gw = ok(api.handle("POST", "/inventory/managedObjects", {"name": "gw", "c8y_IsDevice": {}},
                       user=ic), 201)["id"]
    child = device(api, "child")
    grandchild = device(api, "grandchild")
    ok(api.handle("POST", f"/inventory/managedObjects/{gw}/childDevices",
                  {"managedObject": {"id": child}}), 201)
    ok(api.handle("POST", f"/inventory/managedObjects/{child}/childDevices",
                  {"managedObject": {"id": grandchild}}), 201)
    assert api.device_user(gw) == ic and api.device_user(grandchild) == ic
    # by external ID when the owner is the admin
    other_ic = iccid(41)
    api.issue_credentials(other_ic, "Device-Pass-2")
    other = device(api, "other")
    ok(api.handle("POST", f"/identity/globalIds/{other}/externalIds",
                  {"type": "c8y_Serial", "externalId": other_ic}), 201)
    assert api.device_user(other) == other_ic
    assert api.device_user(device(api, "orphan")) is None
    assert api.device_user("77777") is None and api.device_user("x") is None


# -- durability and threads -------------------------------------------------------------------

def test_data_survives_reopening(tmp_path: Path, sink: FakeSink) -> None:
    path = tmp_path / "data" / "platform.sqlite"
    api = Api(Model(path), sink)
    mo = device(api, "kept", c8y_Hardware={"serialNumber": "1"})
    ok(api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                  {"type": "c8y_Serial", "externalId": "S1"}), 201)
    ok(api.handle("POST", "/measurement/measurements", _measurement(mo, "2020-01-01")), 201)
    ok(api.handle("POST", "/alarm/alarms", {"source": {"id": mo}, "type": "t", "text": "x",
                                            "severity": "MAJOR", "time": "2020-01-01"}), 201)
    op = ok(api.handle("POST", "/devicecontrol/operations",
                       {"deviceId": mo, "c8y_Command": {"text": "ls"}}), 201)
    api.bootstrap_request("dev-9")
    api.issue_credentials("dev-9", "Kept-Pass-9")
    api.model.close()

    again = Api(Model(path), sink)
    assert ok(again.handle("GET", f"/inventory/managedObjects/{mo}"))["c8y_Hardware"] == {
        "serialNumber": "1"}
    assert ok(again.handle("GET", "/identity/externalIds/c8y_Serial/S1"))["managedObject"][
        "id"] == mo
    assert len(ok(again.handle("GET", "/measurement/measurements"))["measurements"]) == 1
    assert ok(again.handle("GET", "/alarm/alarms"))["alarms"][0]["count"] == 1
    assert ok(again.handle("GET", "/devicecontrol/operations?status=PENDING"))["operations"][0][
        "id"] == op["id"]
    assert again.model.check_credentials("dev-9", "Kept-Pass-9")
    assert ok(again.handle("GET", "/devicecontrol/newDeviceRequests/dev-9"))["status"] == \
        "PENDING_ACCEPTANCE"
    assert int(device(again, "new")) > int(op["id"])  # ids are never reused
    assert again.model.get_setting("next_id") is not None
    mode = again.model._read("PRAGMA journal_mode")[0][0]
    assert mode == "wal"
    again.model.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    Model(path).close()
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Model(path)


def test_concurrent_writers(api: Api) -> None:
    src = device(api)
    errors: list[Any] = []

    def work(n: int) -> None:
        for i in range(40):
            r = api.handle("POST", "/measurement/measurements",
                           _measurement(src, f"2020-01-01T00:{n:02d}:{i:02d}Z"))
            if r.status != 201:
                errors.append(r)
            api.handle("GET", f"/inventory/managedObjects/{src}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    body = ok(api.handle("GET", "/measurement/measurements?pageSize=2000&withTotalPages=true"))
    ids = [m["id"] for m in body["measurements"]]
    assert len(ids) == len(set(ids)) == 320


# -- HTTP -------------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, method: str, path: str, body: Any = None,
                 auth: tuple[str, str] | None = (ADMIN, ADMIN_PW),
                 headers: dict[str, str] | None = None) -> tuple[int, str, Any, Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if isinstance(body, dict):
            req.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", "Basic " + token)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, resp.reason, resp.headers, _decode(raw, resp.headers)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, e.reason, e.headers, _decode(raw, e.headers)


def _decode(raw: bytes, headers: Any) -> Any:
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(raw)
    return raw


@pytest.fixture
def server(api: Api) -> Any:
    calls: list[tuple[bytes, str | None, str]] = []

    def smartrest(body: bytes, xid: str | None, user: str) -> tuple[int, bytes]:
        calls.append((body, xid, user))
        return 200, b"20,10001\n"

    with RestServer(api, ADMIN, ADMIN_PW, smartrest=smartrest) as srv:
        srv.calls = calls  # type: ignore[attr-defined]
        yield srv


def test_http_auth(server: RestServer, api: Api) -> None:
    c = Client(server.url)
    assert api.base_url == server.url
    status, reason, headers, body = c("GET", "/inventory/managedObjects", auth=None)
    assert (status, reason) == (401, "Unauthorized")
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert body["error"] == "security/Unauthorized"
    assert c("GET", "/inventory/managedObjects", auth=(ADMIN, "wrong"))[0] == 401
    assert c("GET", "/inventory/managedObjects", auth=("nobody", ADMIN_PW))[0] == 401
    assert c("GET", "/inventory/managedObjects",
             headers={"Authorization": "Basic !!!"}, auth=None)[0] == 401
    assert c("GET", "/inventory/managedObjects", auth=(f"t-emulator/{ADMIN}", ADMIN_PW))[0] == 200
    status, _, _, body = c("GET", "/inventory/managedObjects")
    assert status == 200 and body["managedObjects"] == []
    assert body["self"].startswith(server.url)

    # a device with issued credentials may use the API; what it creates is its own
    ic = iccid(50)
    api.issue_credentials(ic, "Device-Pass-50")
    status, _, headers, mo = c("POST", "/inventory/managedObjects", {"name": "me"},
                               auth=(ic, "Device-Pass-50"))
    assert status == 201 and mo["owner"] == ic and headers["Location"] == mo["self"]
    assert c("GET", "/inventory/managedObjects", auth=(ic, "wrong"))[0] == 401


def test_http_device_users_can_be_switched_off(api: Api) -> None:
    api.issue_credentials("dev-x", "Device-Pass-X")
    with RestServer(api, ADMIN, ADMIN_PW, device_users=False) as srv:
        assert Client(srv.url)("GET", "/tenant/currentTenant",
                               auth=("dev-x", "Device-Pass-X"))[0] == 401


def test_http_resources_and_errors(server: RestServer) -> None:
    c = Client(server.url)
    status, _, headers, mo = c("POST", "/inventory/managedObjects", json.dumps(
        {"name": "d", "c8y_IsDevice": {}}).encode(), headers={
        "Content-Type": "application/vnd.com.nsn.cumulocity.managedObject+json;ver=0.9",
        "Accept": "application/vnd.com.nsn.cumulocity.managedObject+json"})
    assert status == 201 and headers["Content-Type"].startswith("application/json")
    status, reason, _, body = c("GET", "/inventory/managedObjects/77777")
    assert (status, reason) == (404, "Not Found") and body["error"] == "inventory/Not Found"
    status, _, _, body = c("POST", "/inventory/managedObjects", b"{oops",
                           headers={"Content-Type": "application/json"})
    assert status == 400 and "Invalid JSON" in body["message"]
    status, _, _, body = c("POST", "/measurement/measurements", {"source": {"id": mo["id"]}})
    assert status == 422 and "mandatory" in body["message"]
    status, _, headers, body = c("PATCH", "/alarm/alarms")
    assert status == 405 and headers["Allow"] == "GET, POST"
    status, _, headers, body = c("DELETE", f"/inventory/managedObjects/{mo['id']}")
    assert status == 204 and body == b"" and "Content-Type" not in headers
    status, _, _, body = c("GET", "/tenant/currentTenant?x=1")
    assert status == 200 and body["domainName"] == server.url.removeprefix("http://")

    fleet, ct = _multipart(_csv(FLEET_OK))
    status, _, _, body = c("POST", "/devicecontrol/bulkNewDeviceRequests", fleet,
                           headers={"Content-Type": ct})
    assert status == 201 and body["numberOfCreated"] == 2


def test_http_body_limit(api: Api) -> None:
    with RestServer(api, ADMIN, ADMIN_PW, max_body=1000) as srv:
        c = Client(srv.url)
        status, reason, _, body = c("POST", "/inventory/managedObjects", b"x" * 5000,
                                    headers={"Content-Type": "application/json"})
        assert status == 413 and body["error"] == "general/Request Entity Too Large"
        assert "1000" in body["message"]
        # the server still serves
        assert c("POST", "/inventory/managedObjects", {"name": "fine"})[0] == 201
        # a client asking first is refused before it sends
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        token = base64.b64encode(f"{ADMIN}:{ADMIN_PW}".encode()).decode()
        conn.putrequest("POST", "/inventory/managedObjects")
        conn.putheader("Authorization", "Basic " + token)
        conn.putheader("Content-Length", "100000")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        conn.close()


def test_http_keep_alive(server: RestServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    token = base64.b64encode(f"{ADMIN}:{ADMIN_PW}".encode()).decode()
    for _ in range(3):
        conn.request("GET", "/tenant/currentTenant", headers={"Authorization": "Basic " + token})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "t-emulator"
    conn.request("POST", "/inventory/managedObjects", body=b'{"name":"x"}',
                 headers={"Content-Type": "application/json"})  # no auth: 401, still usable
    resp = conn.getresponse()
    assert resp.status == 401
    resp.read()
    conn.request("GET", "/tenant/currentTenant", headers={"Authorization": "Basic " + token})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    server.stop()  # ends the open connection too
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/tenant/currentTenant", headers={"Authorization": "Basic " + token})
        conn.getresponse()
    conn.close()


def test_http_smartrest(server: RestServer, api: Api) -> None:
    c = Client(server.url)
    status, _, headers, body = c("POST", "/s", b"15,XID-1\n100,8949", headers={"X-Id": "XID-1"})
    assert (status, body) == (200, b"20,10001\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert server.calls == [(b"15,XID-1\n100,8949", "XID-1", ADMIN)]  # type: ignore[attr-defined]
    c("POST", "/s", b"15,X")
    assert server.calls[-1][1] is None  # type: ignore[attr-defined]
    assert c("POST", "/s", b"15,X", auth=None)[0] == 401

    with RestServer(api, ADMIN, ADMIN_PW) as bare:
        status, _, _, body = Client(bare.url)("POST", "/s", b"15,X")
        assert status == 501 and body["error"] == "smartrest/Not Implemented"

    def broken(body: bytes, xid: str | None, user: str) -> tuple[int, bytes]:
        raise RuntimeError("boom")

    with RestServer(api, ADMIN, ADMIN_PW, smartrest=broken) as bad:
        status, _, _, body = Client(bad.url)("POST", "/s", b"15,X")
        assert status == 500 and "boom" not in body["message"]


def test_http_server_restarts_on_its_port(api: Api) -> None:
    srv = RestServer(api, ADMIN, ADMIN_PW)
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()  # harmless
    with pytest.raises(RuntimeError):
        srv.port  # noqa: B018
    srv.start()
    try:
        assert srv.port == port
        assert Client(srv.url)("GET", "/tenant/currentTenant")[0] == 200
    finally:
        srv.stop()
    with pytest.raises(ValueError):
        RestServer(api, ADMIN, "")


def test_an_early_year_is_stored_and_read_back(api: Api) -> None:
    """Years before 1000 keep four digits (glibc's strftime("%Y") writes "1-01-01"), so what is
    stored parses again and sorts with the rest."""
    a = device(api)
    m = ok(api.handle("POST", "/measurement/measurements",
                      _measurement(a, "0001-01-01T00:00:00Z")), 201)
    assert m["time"] == "0001-01-01T00:00:00.000Z"
    again = ok(api.handle("GET", "/measurement/measurements/" + m["id"]), 200)
    assert again["time"] == m["time"]
    listed = ok(api.handle("GET", f"/measurement/measurements?source={a}&dateTo=1000-01-01T00:00:00Z"),
                200)
    assert [x["id"] for x in listed["measurements"]] == [m["id"]]
