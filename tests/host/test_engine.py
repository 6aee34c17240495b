"""The emulator's SmartREST 1.0 engine: seed 002's conversations at the engine level, every error
code with its exact text, binary SmartREST, operations, persistence, and fuzzing.

Every conversation runs twice: against a small in-memory fake of api.Api (what the engine
assumes of the REST API, nothing more) and against the real Api over an in-memory Model.
"""

from __future__ import annotations

import json
import struct
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seed_templates import TEMPLATES

from microcot import binrest, smartrest
from microcot.templates import Collection
from microcot_host.emulator import engine_values
from microcot_host.emulator.api import Api, ApiResult
from microcot_host.emulator.engine import Engine
from microcot_host.emulator.engine_store import MemoryStore
from microcot_host.emulator.model import Model

ICCID = "89490200001234567890"
XID = "mcX1"
T0 = 1505392620.0  # 2017-09-14T12:37:00Z, the engine's clock in these tests

REG = "\n".join(["15," + XID, *TEMPLATES])


# -- a fake of api.Api: the little the engine relies on, in dicts ---------------------------------


class FakeModel:
    def __init__(self) -> None:
        self.settings: dict[str, str] = {}

    def get_setting(self, key: str) -> str | None:
        return self.settings.get(key)

    def set_setting(self, key: str, value: str) -> None:
        self.settings[key] = value


def _res(status: int, body: Any = None) -> ApiResult:
    from http import HTTPStatus

    return ApiResult(status, body, HTTPStatus(status).phrase)


class FakeApi:
    """Cumulocity's shapes for what the engine tests touch; errors as status codes only."""

    def __init__(self) -> None:
        self.model = FakeModel()
        self.next = 100
        self.mos: dict[str, dict] = {}
        self.xids: dict[tuple[str, str], str] = {}
        self.measurements: dict[str, dict] = {}
        self.events: dict[str, dict] = {}
        self.alarms: dict[str, dict] = {}
        self.ops: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []

    def _id(self) -> str:
        self.next += 1
        return str(self.next)

    def handle(
        self,
        method: str,
        target: str,
        body: Any = None,
        content_type: str | None = None,
        user: str | None = None,
    ) -> ApiResult:
        self.calls.append((method, target))
        parts = urlsplit(target)
        segs = [unquote(s) for s in parts.path.strip("/").split("/")]
        q = dict(parse_qsl(parts.query))
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                return _res(400)
        if method == "GET" and segs[:2] == ["identity", "externalIds"] and len(segs) == 4:
            key = (segs[2], segs[3])
            return _res(200, self._xid(*key)) if key in self.xids else _res(404)
        route = "/".join("*" if s.isdigit() else s for s in segs)
        return getattr(
            self,
            "_" + method.lower() + "_" + route.replace("/", "_").replace("*", "N"),
            lambda *a: _res(404),
        )(segs, q, body, user)

    def _mo(self, mo_id: str) -> dict:
        mo = dict(self.mos[mo_id])
        mo["childDevices"] = {
            "references": [{"managedObject": {"id": c}} for c in mo.pop("_children", [])]
        }
        return mo

    def _post_inventory_managedObjects(self, segs, q, body, user):
        i = self._id()
        self.mos[i] = {**body, "id": i, "owner": user, "_children": []}
        return _res(201, self._mo(i))

    def _get_inventory_managedObjects_N(self, segs, q, body, user):
        return _res(200, self._mo(segs[2])) if segs[2] in self.mos else _res(404)

    def _put_inventory_managedObjects_N(self, segs, q, body, user):
        if segs[2] not in self.mos:
            return _res(404)
        self.mos[segs[2]].update(body)
        return _res(200, self._mo(segs[2]))

    def _delete_inventory_managedObjects_N(self, segs, q, body, user):
        if self.mos.pop(segs[2], None) is None:
            return _res(404)
        self.xids = {k: v for k, v in self.xids.items() if v != segs[2]}
        return _res(204)

    def _post_inventory_managedObjects_N_childDevices(self, segs, q, body, user):
        child = body["managedObject"]["id"]
        if segs[2] not in self.mos or child not in self.mos:
            return _res(404)
        self.mos[segs[2]]["_children"].append(child)
        return _res(201, {"managedObject": self._mo(child)})

    def _xid(self, t: str, v: str) -> dict:
        return {"externalId": v, "type": t, "managedObject": {"id": self.xids[(t, v)]}}

    def _post_identity_globalIds_N_externalIds(self, segs, q, body, user):
        key = (body["type"], body["externalId"])
        if segs[2] not in self.mos:
            return _res(404)
        if key in self.xids:
            return _res(409)
        self.xids[key] = segs[2]
        return _res(201, self._xid(*key))

    def _post_measurement_measurements(self, segs, q, body, user):
        if body.get("source", {}).get("id") not in self.mos:
            return _res(422)
        i = self._id()
        self.measurements[i] = {**body, "id": i}
        return _res(201, self.measurements[i])

    def _post_event_events(self, segs, q, body, user):
        i = self._id()
        self.events[i] = {**body, "id": i}
        return _res(201, self.events[i])

    def _post_alarm_alarms(self, segs, q, body, user):
        if body.get("status") not in ("ACTIVE", "ACKNOWLEDGED", "CLEARED"):
            return _res(422)
        for a in self.alarms.values():
            if (a["source"]["id"], a["type"]) == (body["source"]["id"], body["type"]) and a[
                "status"
            ] != "CLEARED":
                a.update(count=a["count"] + 1, time=body["time"], text=body["text"])
                return _res(201, a)
        i = self._id()
        self.alarms[i] = {**body, "id": i, "count": 1}
        return _res(201, self.alarms[i])

    def _post_devicecontrol_operations(self, segs, q, body, user):
        i = self._id()
        self.ops[i] = {**body, "id": i, "status": "PENDING"}
        return _res(201, self.ops[i])

    def _get_devicecontrol_operations(self, segs, q, body, user):
        def agent_of(op):
            d = op["deviceId"]
            return {d} | {p for p, mo in self.mos.items() if d in mo["_children"]}

        ops = [
            o
            for o in self.ops.values()
            if ("status" not in q or o["status"] == q["status"])
            and ("agentId" not in q or q["agentId"] in agent_of(o))
        ]
        return _res(200, {"operations": ops, "self": "http://fake/devicecontrol/operations"})

    def _put_devicecontrol_operations_N(self, segs, q, body, user):
        if segs[2] not in self.ops:
            return _res(404)
        op = self.ops[segs[2]]
        for k, v in body.items():
            op[k] = {**op.get(k, {}), **v} if isinstance(v, dict) else v
        return _res(200, op)

    def _get_tenant_currentTenant(self, segs, q, body, user):
        return _res(200, {"name": "t-emulator", "domainName": "127.0.0.1"})


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(params=["fake", "real"])
def api(request):
    if request.param == "fake":
        return FakeApi()
    return Api(Model(":memory:"))


def _engine(api) -> Engine:
    return Engine(api, clock=lambda: T0)


@pytest.fixture
def eng(api) -> Engine:
    e = _engine(api)
    assert e.process(REG, ICCID).startswith(b"20,")
    return e


def ask(e: Engine, *rows: str, xid: str = XID, user: str | None = ICCID) -> str:
    return e.process("\n".join(["15," + xid, *rows]), user).decode()


def _get(api, target: str) -> Any:
    r = api.handle("GET", target)
    assert r.status == 200, (target, r)
    return r.body


def create_device(e: Engine) -> str:
    """Seed 002's self-creation up to the external ID; -> the device's MO id."""
    assert ask(e, "100," + ICCID) == "50,2,404,Not Found"
    out = ask(e, "101,%s,microcot device" % ICCID)
    head, row = out.split("\n")
    assert head == "87,1," + XID
    rtid, line, mo = row.split(",")
    assert (rtid, line) == ("201", "2")
    assert ask(e, "102,%s,%s" % (mo, ICCID)) == "87,1,%s\n200,2,%s,%s" % (XID, ICCID, mo)
    return mo


# -- registration and the X-ID check -------------------------------------------------------------


def test_registration_and_check(api):
    e = _engine(api)
    assert e.process("15," + XID, ICCID) == b"40,Template not found."
    out = e.process(REG, ICCID).decode()
    assert out.startswith("20,") and "\n" not in out
    mo = out[3:]
    assert e.process("15," + XID, ICCID) == ("20," + mo).encode()
    # stored through the API as api.py defines it, and found by a fresh engine (a restart)
    doc = _get(api, "/inventory/managedObjects/" + mo)
    frag = doc["com_cumulocity_model_smartrest_SmartRestTemplate"]
    assert doc["name"] == XID
    assert frag["requestTemplates"][0] == {
        "msgId": "100",
        "method": "GET",
        "resourceUri": "/identity/externalIds/c8y_Serial/%%",
        "contentType": "",
        "accept": "application/json",
        "placeholder": "%%",
        "values": ["STRING"],
        "templateString": "",
    }
    assert frag["responseTemplates"][1] == {
        "msgId": "201",
        "base": "",
        "condition": "$.c8y_IsDevice",
        "pattern": ["$.id"],
    }
    assert (
        _get(api, "/identity/externalIds/c8y_SmartRestDeviceIdentifier/" + XID)["managedObject"][
            "id"
        ]
        == mo
    )
    again = _engine(api)
    assert again.process("15," + XID) == ("20," + mo).encode()
    assert again.collection(XID)[1] == Collection.from_body(REG)
    # a second registration of the X-ID, by anyone
    assert (
        e.process(REG, ICCID) == b"41,Cannot create templates for already existing template object"
    )
    assert again.process(REG) == b"41,Cannot create templates for already existing template object"


def test_registration_errors(api):
    e = _engine(api)
    h = "15,newX1\n"
    assert e.process(h + "10,100,GET,/a/%%,,,%%,STRING UNSIGNED,") == b"41,2,Bad pattern"
    assert (
        e.process(h + "10,100,GET,/a,,,,,\n11,100,,$.a,$.b")
        == b"41,3,Duplicate message identifiers are not allowed"
    )
    assert (
        e.process(h + "11,300,,$.a,$.b[?(@.x==1)]")
        == b"41,2,Using Filters (?) in JsonPath is not allowed for SmartRest"
    )
    assert (
        e.process(h + "11,300,$.list[*],$.a,$.id")
        == b"41,2,Using JsonPath to refer to a list of objects is not allowed for SmartRest"
    )
    assert (
        e.process(h + "10,100,POST,/a,,,,,{}") == b"41,2,No content type found for POST templates."
    )
    assert e.process(h + "10,100,GET,/a,,,,FLOAT,") == b"41,2,Bad value type: FLOAT"
    # templates.py lets it through, jsonpath-ng cannot read it: refused at registration, not later
    assert e.process(h + "10,100,GET,/a,,,,,\n11,300,,$.a b,$.id") == b"41,3,Invalid JsonPath"
    # a request row inside a registration
    assert (
        e.process(h + "10,100,GET,/a,,,,,\n100,x")
        == b"41,3,Not a valid message identifier for template creation"
    )
    # a CSV defect is a malformed line, not a template error
    assert (
        e.process(h + '10,100,GET,/a,,,,,\n11,300,,"$.a,$.id')
        == b"42,3,Malformed request line: column 9: unterminated quoted field"
    )
    # nothing of the refused registrations was stored
    assert e.process("15,newX1") == b"40,Template not found."
    # a template must stay inside the device API (engine_access.py)
    assert e.process(h + "10,100,GET,/a,,,,,") == (
        b"41,2,Template 100 is outside the device API: GET /a (no device resource)"
    )
    assert e.process(h + "10,100,GET,/tenant/currentTenant,,,,,").startswith(b"20,")


def test_deleted_collection_can_be_registered_again(eng, api):
    mo = eng.collection(XID)[0]
    create_device(eng)
    # the collection's own delete template (seed: "15,X-ID\nTID,Templatesammlung-MO-ID")
    assert ask(eng, "114," + mo) == ""
    # gone at once for requests, and free for a new registration
    assert ask(eng, "113") == (
        "43,2,Invalid message identifier: template with X-ID 'mcX1' and Template ID '113' not found"
    )
    out = eng.process(REG, ICCID).decode()
    assert out.startswith("20,") and out != "20," + mo


# -- the self-creation conversation of seed 002 --------------------------------------------------


def test_self_creation_conversation(eng, api):
    assert eng.process("15," + XID, ICCID).startswith(b"20,")
    mo = create_device(eng)
    # checking again finds it: 87,1,X-ID / RTID,2,ICCID,MO-ID
    assert ask(eng, "100," + ICCID) == "87,1,%s\n200,2,%s,%s" % (XID, ICCID, mo)
    # hardware and mobile info, then the supported operations: the device's MO comes back
    assert ask(
        eng, "103,%s,%s,262011234567890,1.2.3,esp32-s3" % (mo, ICCID)
    ) == "87,1,%s\n201,2,%s" % (XID, mo)
    assert ask(eng, "104," + mo) == "87,1,%s\n201,2,%s" % (XID, mo)
    doc = _get(api, "/inventory/managedObjects/" + mo)
    assert doc["name"] == "microcot device" and "c8y_IsDevice" in doc
    assert doc["c8y_Mobile"] == {"iccid": ICCID, "imsi": "262011234567890"}
    assert doc["c8y_Firmware"] == {"version": "1.2.3"}
    assert doc["c8y_SupportedOperations"] == ["c8y_Command", "c8y_Restart"]
    assert eng.device_mo_id(ICCID) == mo
    assert eng.collection_for_device(ICCID).xid == XID


def test_measurement_event_alarm(eng, api):
    mo = create_device(eng)
    # the seed's measurement: 395.3 °C, series "0"
    out = ask(
        eng, "105,c8y_Temperature,0,395.3,°C,2017-09-14T12:37:00.000+02:00,%s,c8y_Temperature" % mo
    )
    head, row = out.split("\n")
    mid = row.split(",")[2]
    assert head == "87,1," + XID and row == "207,2,%s,395.3,°C" % mid
    m = (
        _get(api, "/measurement/measurements/" + mid)
        if isinstance(api, Api)
        else api.measurements[mid]
    )
    assert m["c8y_Temperature"]["0"] == {"value": 395.3, "unit": "°C"}
    assert m["source"]["id"] == mo and m["type"] == "c8y_Temperature"
    # the seed's geo position event
    out = ask(eng, "106,2011-09-06T12:03:27.845+02:00,%s,8.6394,112,51.2345" % mo)
    eid = out.split("\n")[1].split(",")[2]
    assert out == "87,1,%s\n208,2,%s,51.2345" % (XID, eid)
    # the seed's alarm, with its quoted text; the second is de-duplicated (count 2)
    row = '107,Kesseltemperatur,2017-09-14T12:37:00.000,"Kesseltemperatur stark erhoeht",ACTIVE,MAJOR,'
    out = ask(eng, row + mo)
    aid = out.split("\n")[1].split(",")[2]
    assert out == "87,1,%s\n206,2,%s,ACTIVE,1,Kesseltemperatur stark erhoeht" % (XID, aid)
    assert ask(
        eng, row.replace(" stark", ", sehr stark") + mo
    ) == '87,1,%s\n206,2,%s,ACTIVE,2,"Kesseltemperatur, sehr stark erhoeht"' % (XID, aid)


def test_now_is_the_platform_time(api):
    e = _engine(api)
    e.process(REG, ICCID)
    mo = create_device(e)
    e2 = Engine(api, clock=lambda: T0 + 0.25)
    out = ask(e2, "115,%s,21.5" % mo)
    mid = out.split(",")[-3]
    assert out == "87,1,%s\n207,2,%s,," % (XID, mid)  # series T: the 0 paths find nothing
    if isinstance(api, Api):
        ms = _get(api, "/measurement/measurements?source=%s&type=c8y_T" % mo)["measurements"]
        assert [m["time"] for m in ms] == ["2017-09-14T12:37:00.250Z"]
    else:
        (m,) = [m for m in api.measurements.values() if m["type"] == "c8y_T"]
        assert m["time"] == "2017-09-14T12:37:00.250Z"


def test_child_devices(eng, api):
    mo = create_device(eng)
    out = ask(eng, '108,"Child, one"')
    head, row = out.split("\n")
    child = row.split(",")[2]
    assert (head, row) == ("87,1," + XID, "204,2," + child)
    ask(eng, "109,%s,%s" % (mo, child))
    refs = _get(api, "/inventory/managedObjects/" + mo)["childDevices"]["references"]
    assert [r["managedObject"]["id"] for r in refs] == [child]
    assert _get(api, "/inventory/managedObjects/" + child)["name"] == "Child, one"


def test_tenant_query(eng):
    assert ask(eng, "113") == "87,1,%s\n205,2,t-emulator,127.0.0.1" % XID


# -- operations ----------------------------------------------------------------------------------


def _op(api, device: str, **frag) -> str:
    r = api.handle("POST", "/devicecontrol/operations", {"deviceId": device, **frag})
    assert r.status == 201, r
    return r.body


def test_operations_round_trip(eng, api):
    assert eng.pending_operations(ICCID) == b""  # not bound, no device yet
    mo = create_device(eng)
    child = ask(eng, "108,child").split(",")[-1]
    ask(eng, "109,%s,%s" % (mo, child))
    assert eng.pending_operations(ICCID) == b""
    op1 = _op(api, mo, c8y_Command={"text": "ls -l"})
    op2 = _op(api, mo, c8y_Restart={})
    op3 = _op(api, child, c8y_Command={"text": "uptime"})
    # template 500 of the first collection, with the device's MO id; rows in template order
    assert eng.pending_operations(ICCID).decode() == "\n".join(
        [
            "87,3," + XID,
            "202,1,%s,%s,ls -l" % (op1["id"], mo),
            "202,1,%s,%s,uptime" % (op3["id"], child),
            "203,1,%s,%s" % (op2["id"], mo),
        ]
    )
    # a new operation is delivered at once, as template 500's answer holding just it
    assert (
        eng.render_operation(op1, user=ICCID)
        == ("87,1,%s\n202,1,%s,%s,ls -l" % (XID, op1["id"], mo)).encode()
    )
    assert (
        eng.render_operation(op2, xid=XID)
        == ("87,1,%s\n203,1,%s,%s" % (XID, op2["id"], mo)).encode()
    )
    assert eng.render_operation({"id": "1", "c8y_Unknown": {}}, user=ICCID) == b""
    # EXECUTING, then SUCCESSFUL with the seed's result; FAILED with a reason
    assert ask(eng, "110," + op1["id"]) == ""
    result = (
        "total 28496 -rw-r--r-- 1 user staff 474559 10 Mai 10:08 D-Route5.gpx drwxr-xr-x 6 user"
        " staff 192 18 Sep 10:11 Distribute -rw-r--r-- 1 user staff 6959276 8 Aug 11:59"
        " GTEClient.jar"
    )
    assert ask(eng, '111,%s,"SUCCESSFUL","%s","ls -l"' % (op1["id"], result)) == ""
    assert ask(eng, "112,%s,no restart today" % op2["id"]) == ""
    done = (
        _get(api, "/devicecontrol/operations/" + op1["id"])
        if isinstance(api, Api)
        else api.ops[op1["id"]]
    )
    assert done["status"] == "SUCCESSFUL"
    assert done["c8y_Command"] == {"text": "ls -l", "result": result}
    failed = (
        _get(api, "/devicecontrol/operations/" + op2["id"])
        if isinstance(api, Api)
        else api.ops[op2["id"]]
    )
    assert (failed["status"], failed["failureReason"]) == ("FAILED", "no restart today")
    assert eng.pending_operations(ICCID).decode() == "87,1,%s\n202,1,%s,%s,uptime" % (
        XID,
        op3["id"],
        child,
    )
    if isinstance(api, Api):  # a finished operation cannot go back: the model's 422, as 50
        assert ask(eng, "110," + op1["id"]) == "50,2,422,Unprocessable Entity"


def test_all_pending_operations_across_pages():
    api = Api(Model(":memory:"))  # paging is the real API's; the fake has none
    e = _engine(api)
    e.process(REG, ICCID)
    mo = create_device(e)
    ids = [_op(api, mo, c8y_Restart={})["id"] for _ in range(12)]  # pageSize defaults to 5
    out = e.pending_operations(ICCID).decode().split("\n")
    assert out[0] == "87,12," + XID
    assert out[1:] == ["203,1,%s,%s" % (i, mo) for i in ids]


def test_device_found_by_external_id_after_restart(eng, api):
    mo = create_device(eng)
    again = _engine(api)  # the session (X-ID, device id) is in the model
    assert again.collection_for_device(ICCID).xid == XID
    assert again.device_mo_id(ICCID) == mo
    # a device whose MO id was never seen by the engine: looked up as c8y_Serial external ID
    fresh = Engine(api, store=MemoryStore(), clock=lambda: T0)
    fresh.process(REG, ICCID)
    assert fresh.device_mo_id(ICCID) == mo
    assert fresh.device_mo_id("nobody1") is None


def test_persistence_in_a_file(tmp_path):
    path = tmp_path / "platform.db"
    with Model(path) as m:
        e = _engine(Api(m))
        coll_mo = e.process(REG, ICCID).decode()[3:]
        mo = create_device(e)
    with Model(path) as m:
        api = Api(m)
        e = _engine(api)
        assert e.process("15," + XID, ICCID).decode() == "20," + coll_mo
        op = _op(api, mo, c8y_Restart={})
        assert e.pending_operations(ICCID).decode() == "87,1,%s\n203,1,%s,%s" % (XID, op["id"], mo)


# -- the first collection must hold template 500 -------------------------------------------------


def test_first_collection_needs_template_500(eng, api):
    assert eng.process(
        "15,noOps1\n10,300,GET,/tenant/currentTenant,,,,,\n11,301,,$.name,$.name"
    ).startswith(b"20,")
    refused = (
        "43,%d,Invalid message identifier: the first collection a device uses must hold the "
        "GET template 500 (pending operations); X-ID 'noOps1' has none"
    )
    assert ask(eng, "300", "300", xid="noOps1", user="dev2") == "\n".join(
        [refused % 2, refused % 3]
    )
    # not bound by the refusal: the right collection first, then the other one works
    assert ask(eng, "113", user="dev2").startswith("87,1,%s\n205,2," % XID)
    assert ask(eng, "300", xid="noOps1", user="dev2") == "87,1,noOps1\n301,2,t-emulator"
    assert eng.collection_for_device("dev2").xid == XID
    # not a device (an administrator over HTTP), or no user at all: no binding, no refusal
    assert ask(eng, "300", xid="noOps1", user=None) == "87,1,noOps1\n301,2,t-emulator"
    assert eng.process("15,noOps1\n300", "admin", bind=False) == b"87,1,noOps1\n301,2,t-emulator"
    assert eng.collection_for_device("admin") is None


# -- answers: grouping and every error code ------------------------------------------------------


def test_rows_keep_line_order_and_errors_split_groups(eng, api):
    mo = create_device(eng)
    assert ask(eng, "104," + mo, "100,nobody", "104," + mo, "104," + mo, "113") == "\n".join(
        [
            "87,1," + XID,
            "201,2," + mo,
            "50,3,404,Not Found",
            "87,3," + XID,
            "201,4," + mo,
            "201,5," + mo,
            "205,6,t-emulator,127.0.0.1",
        ]
    )
    # a later 15 row switches the collection; each run is headed by its own X-ID
    eng.process("15,other1\n10,300,GET,/tenant/currentTenant,,,,,\n11,301,,$.name,$.name")
    assert ask(eng, "104," + mo, "15,other1", "300", "15," + XID, "104," + mo) == "\n".join(
        [
            "87,1," + XID,
            "201,2," + mo,
            "87,1,other1",
            "301,4,t-emulator",
            "87,1," + XID,
            "201,6," + mo,
        ]
    )
    # blank lines and CRLF: rows are counted, not physical lines (as the device cores count)
    assert eng.process(
        ("15,%s\r\n\r\n104,%s\r\n\n113" % (XID, mo)).encode(), ICCID
    ).decode() == "87,2,%s\n201,2,%s\n205,3,t-emulator,127.0.0.1" % (XID, mo)
    # every answer parses with the device's own parser, records by message id
    recs = smartrest.parse(ask(eng, "104," + mo, "999", "100,nobody"))
    assert [(r.code, r.line) for r in recs] == [(87, None), (201, 2), (43, 3), (50, 4)]


def test_error_codes_exact_text(eng, api):
    mo = create_device(eng)
    E = [
        # 42: the body itself
        (
            b"",
            "42,1,Malformed request line: empty request; a request starts with a 15 row naming the X-ID",
        ),
        (
            b"\n\r\n",
            "42,1,Malformed request line: empty request; a request starts with a 15 row naming the X-ID",
        ),
        (b"113", "42,1,Malformed request line: a request starts with a 15 row naming the X-ID"),
        (
            b"16,mcX1\n113",
            "42,1,Malformed request line: a request starts with a 15 row naming the X-ID",
        ),
        (
            b"15,123\n113",
            "42,1,Malformed request line: X-ID '123' is all digits; it needs at least one letter",
        ),
        (
            b"15,mcX1,x\n113",
            "42,1,Malformed request line: the 15 row takes the X-ID alone; got 2 values",
        ),
        (b'15,"mcX1\n113', "42,1,Malformed request line: column 4: unterminated quoted field"),
        # 42: one row
        (b'15,mcX1\n100,"abc', "42,2,Malformed request line: column 5: unterminated quoted field"),
        (
            b"15,mcX1\n100,\xff",
            "42,2,Malformed request line: column 5: byte 0xff is not valid UTF-8",
        ),
        (
            b'15,mcX1\n100,a"b',
            "42,2,Malformed request line: column 6: quote inside an unquoted field",
        ),
        (
            b"15,mcX1\n15,9",
            "42,2,Malformed request line: X-ID '9' is all digits; it needs at least one letter",
        ),
        # 43
        (
            b"15,mcX1\n999,1",
            "43,2,Invalid message identifier: template with X-ID 'mcX1' and "
            "Template ID '999' not found",
        ),
        (
            b"15,nope1\n100,1",
            "43,2,Invalid message identifier: template with X-ID 'nope1' and "
            "Template ID '100' not found",
        ),
        (
            b"15,mcX1\n201,1",
            "43,2,Invalid message identifier: template 201 of X-ID 'mcX1' is a response template",
        ),
        (b"15,mcX1\nabc,1", "43,2,Invalid message identifier: 'abc' is not a template ID"),
        (b"15,mcX1\n,1", "43,2,Invalid message identifier: '' is not a template ID"),
        # 45: count and every type
        (b"15,mcX1\n100", "45,2,Invalid message arguments: template 100 takes 1 value but got 0"),
        (
            b"15,mcX1\n113,x",
            "45,2,Invalid message arguments: template 113 takes 0 values but got 1",
        ),
        (
            b"15,mcX1\n104,-1",
            "45,2,Invalid message arguments: parameter at position '1': expected "
            "type 'UNSIGNED' but got '-1'",
        ),
        (
            b"15,mcX1\n104,9223372036854775808",
            "45,2,Invalid message arguments: parameter at "
            "position '1': expected type 'UNSIGNED' but got '9223372036854775808'",
        ),
        (
            b"15,mcX1\n115,1,abc",
            "45,2,Invalid message arguments: parameter at position '2': "
            "expected type 'NUMBER' but got 'abc'",
        ),
        (
            b"15,mcX1\n115,1,.5",
            "45,2,Invalid message arguments: parameter at position '2': "
            "expected type 'NUMBER' but got '.5'",
        ),
        (
            b"15,mcX1\n115,1,NaN",
            "45,2,Invalid message arguments: parameter at position '2': "
            "expected type 'NUMBER' but got 'NaN'",
        ),
        (
            b"15,mcX1\n106,2017-02-30T00:00,1,1,1,1",
            "45,2,Invalid message arguments: parameter at "
            "position '1': expected type 'DATE' but got '2017-02-30T00:00'",
        ),
        (
            b"15,mcX1\n106,14.09.2017,1,1,1,1",
            "45,2,Invalid message arguments: parameter at "
            "position '1': expected type 'DATE' but got '14.09.2017'",
        ),
        (
            b"15,mcX1\n106,,1,1,1,1",
            "45,2,Invalid message arguments: parameter at position '1': "
            "expected type 'DATE' but got ''",
        ),
        (
            b"15,mcX1\n115,1,x" + b"9" * 60,
            "45,2,Invalid message arguments: parameter at position "
            "'2': expected type 'NUMBER' but got 'x" + "9" * 39 + "...'",
        ),
        # 50: the platform's answer
        (b"15,mcX1\n100,nobody", "50,2,404,Not Found"),
        (b"15,mcX1\n104,999999", "50,2,404,Not Found"),
        # 40
        (b"15,unknownX", "40,Template not found."),
    ]
    for body, want in E:
        assert eng.process(body, ICCID).decode() == want, body
    # a quote in a STRING is JSON-escaped into the body (it broke the JSON when values went in
    # as raw text: 50,2,400)
    head, row = ask(eng, '108,"say ""hi"""').split("\n")
    assert head == "87,1," + XID and row.startswith("204,2,")
    assert _get(api, "/inventory/managedObjects/" + row.split(",")[2])["name"] == 'say "hi"'
    if isinstance(api, Api):  # the model validates what the fake does not
        assert (
            ask(eng, "107,T,2017-09-14T12:37:00Z,x,OPEN,MAJOR," + mo)
            == "50,2,422,Unprocessable Entity"
        )
    # INTEGER is not in the collection: check it directly
    assert engine_values.check("INTEGER", "-42") is None
    assert engine_values.check("INTEGER", "+42") == "expected type 'INTEGER' but got '+42'"
    assert engine_values.check("INTEGER", "-9223372036854775809") is not None
    assert engine_values.check("DATE", "2011-09-06T12:03:27.845+02:00") is None
    assert engine_values.check("DATE", "2017-09-14T12:37Z") is None
    assert engine_values.check("NUMBER", "-1.5e-3") is None
    assert engine_values.check("NUMBER", "1e999") is not None


def test_oversized_body(api):
    e = Engine(api, max_body=1000)
    body = "15,%s\n113,%s" % (XID, "x" * 1000)
    assert e.process(body).decode() == (
        "42,1,Malformed request line: request of 1012 bytes exceeds the limit of 1000 bytes"
    )
    assert e.process_binary(b"x" * 1001).decode() == (
        "42,1,Malformed Request: payload of 1001 bytes exceeds the limit of 1000 bytes"
    )


class _Broken:
    model = FakeModel()

    def __init__(self, inner):
        self.inner = inner

    def handle(self, method, target, *a, **k):
        if target.startswith("/tenant"):
            raise RuntimeError("boom")
        return self.inner.handle(method, target, *a, **k)


def test_an_api_that_raises_is_a_500(api):
    e = Engine(_Broken(api), store=MemoryStore())
    e.process(REG)
    assert e.process("15,%s\n113" % XID) == b"50,2,500,Internal Server Error"

    class Worse:
        def find_collection(self, xid):
            raise RuntimeError("disk on fire")

    e = Engine(api, store=Worse())
    assert e.process("15,%s\n113" % XID) == b"50,1,500,Internal Server Error"
    assert e.process_binary(b"mcX1\0\0\x71") == b"50,1,500,Internal Server Error"
    assert e.pending_operations(ICCID) == b""
    assert e.render_operation({}, xid=XID) == b""


# -- binary SmartREST ----------------------------------------------------------------------------


def test_binary_conversation(eng, api):
    c = eng.collection(XID)[1]
    assert eng.process_binary(c.encode(100, [ICCID]), ICCID) == b"50,1,404,Not Found"
    out = eng.process_binary(c.encode(101, [ICCID, "bin device"]), ICCID).decode()
    mo = out.split(",")[-1]
    assert out == "87,1,%s\n201,1,%s" % (XID, mo)
    assert eng.process_binary(
        c.encode(102, [int(mo), ICCID]), ICCID
    ).decode() == "87,1,%s\n200,1,%s,%s" % (XID, ICCID, mo)
    # several messages in one payload: lines are the message indexes, one 87 group
    payload = c.encode(104, [int(mo)]) + c.encode(113, []) + c.encode(100, [ICCID])
    assert eng.process_binary(payload, ICCID).decode() == "\n".join(
        ["87,3," + XID, "201,1," + mo, "205,2,t-emulator,127.0.0.1", "200,3,%s,%s" % (ICCID, mo)]
    )
    # the seed's measurement in binary: NUMBER is binary32, DATE Unix seconds
    out = eng.process_binary(
        c.encode(105, ["c8y_Temperature", "0", 395.3, "°C", int(T0), int(mo), "c8y_Temperature"]),
        ICCID,
    ).decode()
    mid = out.split("\n")[1].split(",")[2]
    assert out == "87,1,%s\n207,1,%s,395.3,°C" % (XID, mid)
    # alarm and event; operations as in text
    out = eng.process_binary(
        c.encode(107, ["Kesseltemperatur", int(T0), "stark erhoeht", "ACTIVE", "MAJOR", int(mo)]),
        ICCID,
    ).decode()
    assert out.startswith("87,1,%s\n206,1," % XID) and out.endswith(",ACTIVE,1,stark erhoeht")
    out = eng.process_binary(c.encode(106, [int(T0), int(mo), 8.5, 112.0, 51.25]), ICCID).decode()
    assert out.startswith("87,1,%s\n208,1," % XID) and out.endswith(",51.25")
    child = eng.process_binary(c.encode(108, ["bin child"]), ICCID).decode().split(",")[-1]
    assert eng.process_binary(c.encode(109, [int(mo), int(child)]), ICCID) == b""
    refs = _get(api, "/inventory/managedObjects/" + mo)["childDevices"]["references"]
    assert [r["managedObject"]["id"] for r in refs] == [child]
    op = _op(api, mo, c8y_Command={"text": "ls -l"})
    assert eng.process_binary(c.encode(110, [int(op["id"])]), ICCID) == b""
    assert (
        eng.process_binary(c.encode(111, [int(op["id"]), "SUCCESSFUL", "ok", "ls -l"]), ICCID)
        == b""
    )
    assert eng.pending_operations(ICCID) == b""


def test_binary_values_become_text():
    assert engine_values.binary_text(
        ["DATE", "NUMBER", "UNSIGNED", "INTEGER", "STRING"],
        [0, struct.unpack(">f", struct.pack(">f", 0.1))[0], 7, -7, "a,b"],
    ) == ["1970-01-01T00:00:00.000Z", "0.1", "7", "-7", "a,b"]
    assert engine_values.binary_text(["NUMBER"], [1e20]) == ["1e+20"]
    assert engine_values.binary_text(["NUMBER"], [16777216.0]) == ["16777216"]


def test_binary_errors(eng, api):
    c = eng.collection(XID)[1]
    mo = create_device(eng)
    good = c.encode(104, [int(mo)])
    E = [
        (b"", "42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'"),
        (
            b"\0\0\x68",
            "42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'",
        ),
        (b"mcX1", "42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'"),
        (
            b"mc\xffX\0\0\x68",
            "42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'",
        ),
        (
            b"mcX1\0\0",
            "42,1,Malformed Request: no Template ID found in binary message '1' around byte '5'",
        ),
        (
            b"mcX1\0\x03\xe7",
            "43,1,Invalid template identifier: template with X-ID 'mcX1' and "
            "Template ID '999' not found in cache",
        ),
        (
            b"nope1\0\0\x64",
            "43,1,Invalid template identifier: template with X-ID 'nope1' and "
            "Template ID '100' not found in cache",
        ),
        (
            b"mcX1\0\0\xc9",
            "43,1,Invalid template identifier: template with X-ID 'mcX1' and "
            "Template ID '201' not found in cache",
        ),
        (
            b"mcX1\0\0\x64abc",
            "45,1,Invalid parameter at position '1': Expected type 'STRING' in "
            "binary message '1' around byte '7'",
        ),
        (
            b"mcX1\0\0\x64a\xffc\0",
            "45,1,Invalid parameter at position '1': Expected type 'STRING' "
            "in binary message '1' around byte '7'",
        ),
        (
            b"mcX1\0\0\x68\0\0",
            "45,1,Invalid parameter at position '1': Expected type 'UNSIGNED' "
            "in binary message '1' around byte '7'",
        ),
        (
            b"mcX1\0\0\x73\0\0\0\x01\x7f\xc0\0\0",
            "45,1,Invalid parameter at position '2': Expected "
            "type 'NUMBER' in binary message '1' around byte '11'",
        ),
        # the second message is broken: the whole payload is refused, the first not executed
        (
            good + b"mcX1\0\0\x68\0",
            "45,2,Invalid parameter at position '1': Expected type "
            "'UNSIGNED' in binary message '2' around byte '%d'" % (len(good) + 7),
        ),
        (
            good + b"nope1\0\0\x64",
            "43,2,Invalid template identifier: template with X-ID 'nope1' "
            "and Template ID '100' not found in cache",
        ),
        (
            good + b"mcX1\0",
            "42,2,Malformed Request: no Template ID found in binary message '2' "
            "around byte '%d'" % (len(good) + 5),
        ),
    ]
    before = len(api.calls) if isinstance(api, FakeApi) else None
    for payload, want in E:
        assert eng.process_binary(payload, ICCID).decode() == want, payload
        recs = smartrest.parse(want)
        assert recs[0].code in (42, 43, 45) and recs[0].line is not None
    if before is not None:  # nothing reached the platform but collection look-ups
        assert all(
            t.startswith("/identity/externalIds/c8y_SmartRestDeviceIdentifier/")
            for _, t in api.calls[before:]
        )
    # text-level errors after decoding: the platform's 404 on message 2
    assert eng.process_binary(
        good + c.encode(104, [999999]), ICCID
    ).decode() == "87,1,%s\n201,1,%s\n50,2,404,Not Found" % (XID, mo)


def test_binary_first_collection_needs_template_500(eng, api):
    eng.process("15,noOps1\n10,300,GET,/tenant/currentTenant,,,,,\n11,301,,$.name,$.name")
    msg = binrest.encode("noOps1", 300, [], [])
    assert eng.process_binary(msg + msg, "dev3").decode() == "\n".join(
        "43,%d,Invalid message identifier: the first collection a device uses must hold the GET "
        "template 500 (pending operations); X-ID 'noOps1' has none" % i
        for i in (1, 2)
    )
    assert eng.process_binary(msg, "dev3", bind=False) == b"87,1,noOps1\n301,1,t-emulator"


# -- robustness ----------------------------------------------------------------------------------

_fuzz = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_FUZZ_ENGINE: dict[str, Engine] = {}


def _fuzz_engine() -> Engine:
    # one engine over the real API for all examples: registering per example would dominate
    if "e" not in _FUZZ_ENGINE:
        e = _engine(Api(Model(":memory:")))
        e.process(REG, ICCID)
        create_device(e)
        _FUZZ_ENGINE["e"] = e
    return _FUZZ_ENGINE["e"]


def _answer_is_well_formed(out: bytes) -> None:
    assert isinstance(out, bytes)
    assert b"Internal Server Error" not in out  # the engine's own failures land there
    for r in smartrest.parse(out):  # the device's parser reads every answer
        assert r.code in (20, 40, 41, 42, 43, 45, 50, 87) or 200 <= r.code <= 208


@_fuzz
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    e = _fuzz_engine()
    _answer_is_well_formed(e.process(data, ICCID))
    _answer_is_well_formed(e.process_binary(data, ICCID))


_tids = st.sampled_from(
    [
        "100",
        "103",
        "104",
        "105",
        "106",
        "107",
        "108",
        "113",
        "115",
        "201",
        "999",
        "x",
        "",
        "15",
        "10",
    ]
)
_vals = st.lists(
    st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            ["1", "-1", "0", "395.3", "2017-09-14T12:37:00.000", "ACTIVE", "MAJOR", '"', "%%", "\n"]
        ),
    ),
    max_size=8,
)


@_fuzz
@given(st.lists(st.tuples(_tids, _vals), min_size=1, max_size=5), st.booleans())
def test_fuzz_rows(rows, binary_prefix):
    e = _fuzz_engine()
    body = "15,%s\n" % XID + "\n".join(smartrest.row([t, *v]) for t, v in rows)
    _answer_is_well_formed(e.process(body, ICCID))
    payload = (
        XID.encode()
        + b"\0"
        + b"".join(
            struct.pack(">H", int(t) if t.isdigit() else 0) + "\0".join(v).encode() for t, v in rows
        )
    )
    _answer_is_well_formed(e.process_binary(payload if binary_prefix else payload[1:], ICCID))


def test_huge_row_is_bounded():
    e = _fuzz_engine()
    out = e.process(("15,%s\n108,%s" % (XID, "y" * 60000)).encode(), ICCID)
    assert out.startswith(b"87,1,%s\n204,2," % XID.encode())
    assert e.process(b"15,mcX1\n" + b'"' * 70000, ICCID).startswith(b"42,1,")


def test_http_x_id_header(eng, api):
    # POST /s with the X-Id header: no 15 row, the body's first row is line 1
    mo = create_device(eng)
    assert eng.process("104,%s\n100,nobody" % mo, "admin", bind=False, xid=XID).decode() == (
        "87,1,%s\n201,1,%s\n50,2,404,Not Found" % (XID, mo)
    )
    assert eng.process("", "admin", xid=XID).decode() == "20," + eng.collection(XID)[0]
    assert eng.process("", "admin", xid="nope1") == b"40,Template not found."
    assert eng.process("113", xid="12") == (
        b"42,1,Malformed request line: X-ID '12' is all digits; it needs at least one letter"
    )
    # registration over HTTP: 41 lines count the body's rows from 1
    assert eng.process("10,100,GET,/a,,,,,\n10,100,GET,/b,,,,,", "admin", xid="httpX1") == (
        b"41,2,Duplicate message identifiers are not allowed"
    )
    assert eng.process("10,100,GET,/a,,,,,\n11,101,,$.a b,$.id", xid="httpX1") == (
        b"41,2,Invalid JsonPath"
    )
    assert eng.process(
        "10,100,GET,/tenant/currentTenant,,,,,\n11,101,,$.name,$.name", xid="httpX1"
    ).startswith(b"20,")
    assert eng.process("100", "admin", bind=False, xid="httpX1") == b"87,1,httpX1\n101,1,t-emulator"


def test_concurrent_devices(api):
    import threading

    e = _engine(api)
    e.process(REG, ICCID)
    mo = create_device(e)
    answers: list[bytes] = []

    def device(n: int) -> None:
        for i in range(25):
            answers.append(e.process("15,%s\n115,%s,%d.5" % (XID, mo, n * 100 + i), ICCID))

    threads = [threading.Thread(target=device, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 200 and all(a.startswith(b"87,1," + XID.encode()) for a in answers)
    ids = {a.split(b"\n")[1].split(b",")[2] for a in answers}
    assert len(ids) == 200


def test_fill_uri_first():
    c = Collection("X1")
    r = c.add_request(
        7, "PUT", "/a/%%/b?x=%%", "a/json", "", "%%", "STRING STRING STRING", '{"x":"%%"}'
    )
    # the URI takes the first values (percent-encoded), the JSON body the rest (escaped); a value
    # holding the placeholder is not substituted again
    assert engine_values.fill(r, ["%%", "1 2", 'q"%%']) == (
        "PUT",
        "/a/%25%25/b?x=1%202",
        '{"x":"q\\"%%"}',
    )
    assert engine_values.fill(c.add_request(8, "DELETE", "/d", "", "", "", "", ""), []) == (
        "DELETE",
        "/d",
        None,
    )
    with pytest.raises(ValueError):
        engine_values.fill(r, ["1"])


def test_response_template_rules():
    from microcot_host.emulator import engine_paths

    c = Collection("X1")
    ops = c.add_response(1, "$.operations", "$.c8y_Command", ["$.id", "$.c8y_Command", "$.nope"])
    doc = {
        "operations": [
            {"id": "1", "c8y_Command": {"text": "a,b"}},
            {"id": "2"},
            {"id": "3", "c8y_Command": None},
        ]
    }
    # one row per list element that has the condition (a null counts: the key exists)
    assert engine_paths.extract(ops, doc) == [["1", '{"text":"a,b"}', ""], ["3", "", ""]]
    whole = c.add_response(2, "", "", ["$.flag", "$.n", "$.f", "$.list"])
    assert engine_paths.extract(whole, {"flag": False, "n": 3, "f": 2.5, "list": [1]}) == [
        ["false", "3", "2.5", "[1]"]
    ]
    # a base that matches nothing yields nothing; an object base yields one row
    assert engine_paths.extract(c.add_response(3, "$.mo", "", ["$.id"]), {"x": 1}) == []
    assert engine_paths.extract(c.add_response(4, "$.mo", "", ["$.id"]), {"mo": {"id": 9}}) == [
        ["9"]
    ]
    assert engine_paths.invalid("$.a b") and not engine_paths.invalid("$.a['b c'].d")


def test_serve_http(eng):
    mo = create_device(eng)
    assert eng.serve_http(b"104," + mo.encode(), XID, "admin") == (
        200,
        ("87,1,%s\n201,1,%s" % (XID, mo)).encode(),
    )
    # a body with its own 15 row: the header is not needed, and not used
    assert eng.serve_http(("15,%s\n104,%s" % (XID, mo)).encode(), None, "admin") == (
        200,
        ("87,1,%s\n201,2,%s" % (XID, mo)).encode(),
    )
    assert eng.serve_http(b"", XID, "admin") == (200, b"20," + eng.collection(XID)[0].encode())
    assert eng.serve_http(b"113", None, "admin")[1].startswith(b"42,1,")
    assert eng.collection_for_device("admin") is None


def test_post_s_over_http():
    import base64
    import urllib.request

    from microcot_host.emulator.http import RestServer

    api = Api(Model(":memory:"))
    e = _engine(api)
    with RestServer(api, "admin", "secret", smartrest=e.serve_http) as srv:

        def post(body: bytes, x_id: str | None = None) -> tuple[int, bytes]:
            req = urllib.request.Request(srv.url + "/s", data=body, method="POST")
            req.add_header("Authorization", "Basic " + base64.b64encode(b"admin:secret").decode())
            if x_id:
                req.add_header("X-Id", x_id)
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()

        # the seed's registration by the tenant admin over REST, then a request with the header
        status, out = post(REG.encode())
        assert status == 200 and out.startswith(b"20,")
        assert post(b"", XID) == (200, out)
        assert post(b"113", XID) == (
            200,
            b"87,1,%s\n205,1,t-emulator,%s" % (XID.encode(), srv.url.split("//")[1].encode()),
        )
