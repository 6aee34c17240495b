"""Device users fenced in like Cumulocity's (authz.py): every route of api.py's `_ROUTES` has a
rule, the documentation's table is those rules, and a walk over them calls each route as device
A on device B's objects (refused, or B's items hidden from a list) and on its own (served where
the table says so). Then the issue's attacks one by one, over HTTP with Basic auth as a device
would. Api, Model and RestServer in-process: no broker."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from microcot_host.emulator import api as api_mod
from microcot_host.emulator import authz
from microcot_host.emulator.api import Api, ApiResult
from microcot_host.emulator.authz import Access, Principal, Role
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import Invalid, Model

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
USERS = {"A": "89490200000000000011", "B": "89490200000000000029"}
PASSWORDS = {"A": "Device-Pass-A1", "B": "Device-Pass-B2"}
T0 = "2024-01-01T00:00:0%dZ"


def multipart(obj: dict[str, Any] | None, data: bytes, boundary: str = "mcb0123"
              ) -> tuple[bytes, str]:
    out = b""
    if obj is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"object\"\r\n\r\n"
                + json.dumps(obj) + "\r\n").encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"f.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return out + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def ok(r: ApiResult, status: int = 200) -> Any:
    assert r.status == status, r
    return r.body


def denied(r: ApiResult) -> None:
    """Cumulocity's refusal, saying nothing about whose object it is."""
    assert r.status == 403, r
    assert isinstance(r.body, dict) and r.body["error"] == "security/Forbidden", r
    assert r.body["message"].startswith("Access is denied") and "info" in r.body, r
    for u in USERS.values():
        assert u not in r.body["message"]


@dataclass
class World:
    """Two devices A and B, each with its own object tree and data, and the admin's things."""

    api: Api
    mo: dict[str, str] = field(default_factory=dict)
    child: dict[str, str] = field(default_factory=dict)
    spare: dict[str, str] = field(default_factory=dict)   # owned, linked to nothing
    meas: dict[str, str] = field(default_factory=dict)
    event: dict[str, str] = field(default_factory=dict)   # with an attachment
    bare_event: dict[str, str] = field(default_factory=dict)  # without
    alarm: dict[str, str] = field(default_factory=dict)
    op: dict[str, str] = field(default_factory=dict)
    binary: str = ""
    template: dict[str, str] = field(default_factory=dict)

    def as_user(self, who: str, method: str, target: str, body: Any = None,
                ctype: str | None = None) -> ApiResult:
        return self.api.handle(method, target, body, ctype, USERS[who])

    def admin(self, method: str, target: str, body: Any = None,
              ctype: str | None = None) -> ApiResult:
        return self.api.handle(method, target, body, ctype, ADMIN)


def make_world(tmp_path: Path) -> World:
    api = Api(Model(), base_url="http://emu:8080",
              binaries=BinaryStore(tmp_path / "binaries", max_size=1 << 20), admin_user=ADMIN)
    w = World(api)
    for n, (who, user) in enumerate(USERS.items()):
        api.issue_credentials(user, PASSWORDS[who])
        # as seed 002's self-creation: the device creates itself and names it after its ID
        w.mo[who] = ok(w.as_user(who, "POST", "/inventory/managedObjects",
                                 {"name": who, "c8y_IsDevice": {}}), 201)["id"]
        ok(w.as_user(who, "POST", f"/identity/globalIds/{w.mo[who]}/externalIds",
                     {"type": "c8y_Serial", "externalId": user}), 201)
        w.child[who] = ok(w.as_user(who, "POST", "/inventory/managedObjects",
                                    {"name": who + "-child", "c8y_IsDevice": {}}), 201)["id"]
        ok(w.as_user(who, "POST", f"/inventory/managedObjects/{w.mo[who]}/childDevices",
                     {"managedObject": {"id": w.child[who]}}), 201)
        w.spare[who] = ok(w.as_user(who, "POST", "/inventory/managedObjects",
                                    {"name": who + "-spare"}), 201)["id"]
        src = {"id": w.mo[who]}
        w.meas[who] = ok(w.as_user(who, "POST", "/measurement/measurements", {
            "source": src, "type": "c8y_T", "time": T0 % n, "c8y_T": {"T": {"value": n}}}),
            201)["id"]
        for key in ("event", "bare_event"):
            getattr(w, key)[who] = ok(w.as_user(who, "POST", "/event/events", {
                "source": src, "type": "c8y_Logfile", "text": key, "time": T0 % n}), 201)["id"]
        body, ct = multipart(None, b"log of " + who.encode())
        ok(w.as_user(who, "POST", f"/event/events/{w.event[who]}/binaries", body, ct), 201)
        w.alarm[who] = ok(w.as_user(who, "POST", "/alarm/alarms", {
            "source": src, "type": "c8y_Hot", "text": "hot", "severity": "MAJOR",
            "time": T0 % n}), 201)["id"]
        w.op[who] = ok(w.admin("POST", "/devicecontrol/operations",
                               {"deviceId": w.mo[who], "c8y_Restart": {}}), 201)["id"]
        ok(w.admin("POST", "/devicecontrol/newDeviceRequests", {"id": "req-" + who}), 201)
        made = ok(api_mod.create_template_collection(api, "XID-" + who, {"registration": ""},
                                                     user=user), 201)
        w.template[who] = made["id"]
    body, ct = multipart({"name": "fw.bin", "type": "c8y_Firmware"}, b"firmware")
    w.binary = ok(w.admin("POST", "/inventory/binaries", body, ct), 201)["id"]
    return w


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


# -- the walk: one call per rule, as A on B's and on its own ----------------------------------

@dataclass
class Call:
    target: str
    body: Any = None
    ctype: str | None = None
    hidden: str | None = None  # a list: this id must not be in a device's answer (else: 403)
    forged: bool = False  # the body names another owner: ignored, the object is the device's


CSV = "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\nx1;Very-Secret-Pw1;mqtt;x;89490200000000000037;1\n"
_MO = "/inventory/managedObjects"


def call_for(w: World, rule: authz.Rule, who: str) -> Call:
    """The request of `rule` on the objects of device `who`."""
    mo, user = w.mo[who], USERS[who]
    xid = f"/identity/externalIds/c8y_Serial/{user}"
    bin_body, bin_ct = multipart({"name": "x"}, b"x")
    att_body, att_ct = multipart(None, b"attached")
    calls: dict[tuple[str, str], Call] = {
        (_MO, "GET"): Call(f"{_MO}?ids={mo}", hidden=mo),
        (_MO, "POST"): Call(_MO, {"name": "n", "owner": user}, forged=True),
        (_MO + "/{id}", "GET"): Call(f"{_MO}/{mo}"),
        (_MO + "/{id}", "PUT"): Call(f"{_MO}/{mo}", {"c8y_Note": {"by": "walk"}}),
        (_MO + "/{id}", "DELETE"): Call(f"{_MO}/{w.spare[who]}"),
        (_MO + "/{id}/childDevices", "GET"): Call(f"{_MO}/{mo}/childDevices"),
        (_MO + "/{id}/childDevices", "POST"): Call(f"{_MO}/{mo}/childDevices",
                                                   {"managedObject": {"id": w.spare[who]}}),
        (_MO + "/{id}/childDevices/{childId}", "GET"): Call(
            f"{_MO}/{mo}/childDevices/{w.child[who]}"),
        (_MO + "/{id}/childDevices/{childId}", "DELETE"): Call(
            f"{_MO}/{mo}/childDevices/{w.child[who]}"),
        ("/inventory/binaries", "GET"): Call("/inventory/binaries"),
        ("/inventory/binaries", "POST"): Call("/inventory/binaries", bin_body, bin_ct),
        ("/inventory/binaries/{id}", "GET"): Call(f"/inventory/binaries/{w.binary}"),
        ("/inventory/binaries/{id}", "PUT"): Call(f"/inventory/binaries/{w.binary}", b"new",
                                                  "application/octet-stream"),
        ("/inventory/binaries/{id}", "DELETE"): Call(f"/inventory/binaries/{w.binary}"),
        ("/identity/externalIds/{type}/{value}", "GET"): Call(xid),
        ("/identity/externalIds/{type}/{value}", "DELETE"): Call(xid),
        ("/identity/globalIds/{id}/externalIds", "GET"): Call(
            f"/identity/globalIds/{mo}/externalIds"),
        ("/identity/globalIds/{id}/externalIds", "POST"): Call(
            f"/identity/globalIds/{mo}/externalIds", {"type": "c8y_Other", "externalId": "o" + who}),
        ("/measurement/measurements", "GET"): Call(f"/measurement/measurements?source={mo}"),
        ("/measurement/measurements", "POST"): Call("/measurement/measurements", {
            "source": {"id": mo}, "type": "c8y_T", "time": T0 % 5, "c8y_T": {"T": {"value": 1}}}),
        ("/measurement/measurements/{id}", "GET"): Call(
            f"/measurement/measurements/{w.meas[who]}"),
        ("/measurement/measurements/{id}", "DELETE"): Call(
            f"/measurement/measurements/{w.meas[who]}"),
        ("/event/events", "GET"): Call(f"/event/events?source={mo}"),
        ("/event/events", "POST"): Call("/event/events", {
            "source": {"id": mo}, "type": "c8y_E", "text": "e", "time": T0 % 5}),
        ("/event/events/{id}", "GET"): Call(f"/event/events/{w.event[who]}"),
        ("/event/events/{id}", "PUT"): Call(f"/event/events/{w.event[who]}", {"text": "changed"}),
        ("/event/events/{id}", "DELETE"): Call(f"/event/events/{w.event[who]}"),
        ("/event/events/{id}/binaries", "GET"): Call(f"/event/events/{w.event[who]}/binaries"),
        ("/event/events/{id}/binaries", "POST"): Call(
            f"/event/events/{w.bare_event[who]}/binaries", att_body, att_ct),
        ("/event/events/{id}/binaries", "PUT"): Call(
            f"/event/events/{w.event[who]}/binaries", att_body, att_ct),
        ("/event/events/{id}/binaries", "DELETE"): Call(
            f"/event/events/{w.event[who]}/binaries"),
        ("/alarm/alarms", "GET"): Call(f"/alarm/alarms?source={mo}"),
        ("/alarm/alarms", "POST"): Call("/alarm/alarms", {
            "source": {"id": mo}, "type": "c8y_Cold", "text": "cold", "severity": "MINOR",
            "time": T0 % 5}),
        ("/alarm/alarms/{id}", "GET"): Call(f"/alarm/alarms/{w.alarm[who]}"),
        ("/alarm/alarms/{id}", "PUT"): Call(f"/alarm/alarms/{w.alarm[who]}",
                                            {"status": "ACKNOWLEDGED"}),
        ("/devicecontrol/operations", "GET"): Call(f"/devicecontrol/operations?deviceId={mo}"),
        ("/devicecontrol/operations", "POST"): Call("/devicecontrol/operations",
                                                    {"deviceId": mo, "c8y_Restart": {}}),
        ("/devicecontrol/operations/{id}", "GET"): Call(f"/devicecontrol/operations/{w.op[who]}"),
        ("/devicecontrol/operations/{id}", "PUT"): Call(f"/devicecontrol/operations/{w.op[who]}",
                                                        {"status": "EXECUTING"}),
        ("/devicecontrol/newDeviceRequests", "GET"): Call("/devicecontrol/newDeviceRequests"),
        ("/devicecontrol/newDeviceRequests", "POST"): Call("/devicecontrol/newDeviceRequests",
                                                           {"id": "new-" + who}),
        ("/devicecontrol/newDeviceRequests/{id}", "GET"): Call(
            f"/devicecontrol/newDeviceRequests/req-{who}"),
        ("/devicecontrol/newDeviceRequests/{id}", "PUT"): Call(
            f"/devicecontrol/newDeviceRequests/req-{who}", {"status": "PENDING_ACCEPTANCE"}),
        ("/devicecontrol/newDeviceRequests/{id}", "DELETE"): Call(
            f"/devicecontrol/newDeviceRequests/req-{who}"),
        ("/devicecontrol/bulkNewDeviceRequests", "POST"): Call(
            "/devicecontrol/bulkNewDeviceRequests", CSV, "text/csv"),
        ("/devicecontrol/deviceCredentials/{id}", "GET"): Call(
            f"/devicecontrol/deviceCredentials/{user}"),
        ("/devicecontrol/deviceCredentials/{id}", "DELETE"): Call(
            f"/devicecontrol/deviceCredentials/{user}"),
        ("/tenant/currentTenant", "GET"): Call("/tenant/currentTenant"),
        ("/s", "POST"): Call("/s", "15,XID-" + who, "text/plain"),
    }
    return calls[(rule.path, rule.method)]


def test_every_route_has_a_rule_and_every_rule_a_route() -> None:
    routes = {(pattern, m) for pattern, methods in api_mod._ROUTES for m in methods}
    rules = {(r.pattern, r.method) for r in authz.RULES}
    assert routes - rules == set(), "routes without an access rule"
    assert rules - routes == set(), "rules for routes api.py does not serve"
    assert len(rules) == len(authz.RULES), "a route with two rules"


def test_the_docs_table_is_the_rules() -> None:
    page = (ROOT / "docs" / "reference" / "emulator-access.md").read_text()
    assert authz.markdown_table() in page
    for r in authz.RULES:
        assert f"| `{r.path}` | {r.method} |" in page
    nav = (ROOT / "mkdocs.yml").read_text()
    assert "reference/emulator-access.md" in nav


@pytest.mark.parametrize("rule", authz.RULES, ids=lambda r: f"{r.method} {r.path}")
def test_walk_the_table(tmp_path: Path, rule: authz.Rule) -> None:
    w = make_world(tmp_path)
    assert call_for(w, rule, "A")  # every rule has a call: a new route needs one here
    # as A on B's objects: refused, or B's items left out of a list
    c = call_for(w, rule, "B")
    r = w.as_user("A", rule.method, c.target, c.body, c.ctype)
    if rule.access is Access.ALL:
        assert r.status != 403, r
    elif c.hidden is not None:
        assert r.status == 200 and f'"{c.hidden}"' not in json.dumps(r.body), r
    elif c.forged:
        assert r.status == 201 and r.body["owner"] == USERS["A"], r
    else:
        denied(r)
    # as A on its own
    c = call_for(w, rule, "A")
    r = w.as_user("A", rule.method, c.target, c.body, c.ctype)
    if rule.access is Access.ADMIN:
        denied(r)
    elif rule.path == "/s":
        assert r.status == 501, r  # http.py serves it; Api itself does not
    else:
        assert r.status < 300, r
        if c.hidden is not None:
            assert f'"{c.hidden}"' in json.dumps(r.body), r
    # the admin: anything, anyone's
    c = call_for(w, rule, "B")
    r = w.admin(rule.method, c.target, c.body, c.ctype)
    assert r.status != 403, r
    if rule.path != "/s" and rule.access is not Access.ADMIN:
        assert r.status < 300, r


# -- the rules one by one ---------------------------------------------------------------------

def test_principals() -> None:
    assert authz.principal_of(None, ADMIN, False) == authz.INTERNAL
    assert authz.principal_of(ADMIN, ADMIN, False) == Principal(Role.ADMIN, ADMIN)
    # device credentials win over the name; a stranger is fenced in once the admin is known
    assert authz.principal_of(ADMIN, ADMIN, True) == Principal(Role.DEVICE, ADMIN)
    assert authz.principal_of("who", ADMIN, False) == Principal(Role.DEVICE, "who")
    assert authz.principal_of("who", None, False) == Principal(Role.ADMIN, "who")


def test_the_admin_name_is_never_a_device(world: World) -> None:
    with pytest.raises(Invalid):
        world.api.issue_credentials(ADMIN, "Some-Password-1")
    assert not world.api.model.has_credentials(ADMIN)
    assert world.api.principal(ADMIN).role is Role.ADMIN


def test_lists_hold_only_the_devices_own(world: World) -> None:
    w = world
    for target, key in (("/inventory/managedObjects", "managedObjects"),
                        ("/measurement/measurements", "measurements"),
                        ("/event/events", "events"), ("/alarm/alarms", "alarms"),
                        ("/devicecontrol/operations", "operations")):
        mine = ok(w.as_user("A", "GET", target + "?pageSize=100"))[key]
        theirs = ok(w.as_user("B", "GET", target + "?pageSize=100"))[key]
        everything = ok(w.admin("GET", target + "?pageSize=100"))[key]
        mine_ids = {x["id"] for x in mine}
        assert mine_ids and not mine_ids & {x["id"] for x in theirs}, target
        assert mine_ids | {x["id"] for x in theirs} <= {x["id"] for x in everything}, target
    got = {m["id"] for m in ok(w.as_user("A", "GET", "/inventory/managedObjects?pageSize=100"))[
        "managedObjects"]}
    assert got == {w.mo["A"], w.child["A"], w.spare["A"], w.template["A"]}
    # an explicit filter naming B's object is refused
    for target in (f"/measurement/measurements?source={w.mo['B']}",
                   f"/event/events?source={w.child['B']}", f"/alarm/alarms?source={w.mo['B']}",
                   f"/devicecontrol/operations?agentId={w.mo['B']}",
                   f"/devicecontrol/operations?deviceId={w.mo['B']}&agentId={w.mo['A']}"):
        denied(w.as_user("A", "GET", target))
    # ... one naming nothing is an empty list, as for the admin
    assert ok(w.as_user("A", "GET", "/measurement/measurements?source=999999"))[
        "measurements"] == []


def test_a_devices_list_pages_over_all_its_objects_in_order(world: World) -> None:
    w = world
    for i, mo in enumerate((w.child["A"], w.mo["A"], w.child["A"])):
        ok(w.as_user("A", "POST", "/measurement/measurements", {
            "source": {"id": mo}, "type": "c8y_T", "time": f"2024-01-01T00:01:0{i}+01:00",
            "c8y_T": {"T": {"value": i}}}), 201)
    # all of A's, oldest first across its two objects, two per page
    pages = []
    for page in (1, 2, 3):
        body = ok(w.as_user("A", "GET", f"/measurement/measurements?pageSize=2&currentPage={page}"
                                        "&withTotalPages=true"))
        pages.append([m["c8y_T"]["T"]["value"] for m in body["measurements"]])
        assert body["statistics"]["totalPages"] == 2
    # 00:01:0x+01:00 is before the world's 00:00:00Z
    assert pages == [[0, 1], [2, 0], []]
    newest = ok(w.as_user("A", "GET", "/measurement/measurements?pageSize=1&revert=true"))
    assert [m["c8y_T"]["T"]["value"] for m in newest["measurements"]] == [0]


def test_the_owner_is_the_user_never_the_body(world: World) -> None:
    w = world
    mo = ok(w.as_user("A", "POST", _MO, {"name": "x"}), 201)
    assert mo["owner"] == USERS["A"]
    # a body's owner is ignored: the issue's JSON injection ("owner":"admin") gets A's object
    for body in ({"name": "x", "owner": ADMIN}, json.dumps({"name": "x", "owner": USERS["B"]}),
                 '{"name":"n","c8y_IsDevice":{},"owner":"admin"}'):
        made = ok(w.as_user("A", "POST", _MO, body), 201)
        assert made["owner"] == USERS["A"]
        ok(w.as_user("A", "GET", f"{_MO}/{made['id']}"))
    assert ok(w.as_user("A", "PUT", f"{_MO}/{mo['id']}", {"owner": ADMIN, "n": 1}))[
        "owner"] == USERS["A"]
    assert w.api.model.get_managed_object(mo["id"])["owner"] == USERS["A"]
    # the admin owns what it creates, and may give an object to a device
    assert ok(w.admin("POST", _MO, {"name": "y"}), 201)["owner"] == ADMIN
    given = ok(w.admin("POST", _MO, {"name": "z", "owner": USERS["B"]}), 201)
    assert given["owner"] == USERS["B"]
    ok(w.as_user("B", "GET", f"{_MO}/{given['id']}"))
    denied(w.as_user("A", "GET", f"{_MO}/{given['id']}"))


def test_child_devices_are_reached_through_their_parent(world: World) -> None:
    w = world
    # a grandchild made by the admin under A's child is A's, with its data
    gc = ok(w.admin("POST", _MO, {"name": "gc"}), 201)["id"]
    ok(w.admin("POST", f"{_MO}/{w.child['A']}/childDevices", {"managedObject": {"id": gc}}), 201)
    ok(w.as_user("A", "GET", f"{_MO}/{gc}"))
    ok(w.as_user("A", "POST", "/event/events", {"source": {"id": gc}, "type": "t", "text": "x",
                                                "time": T0 % 1}), 201)
    denied(w.as_user("B", "GET", f"{_MO}/{gc}"))
    # A cannot adopt B's object (it would own it through the link), nor give B one of its own
    denied(w.as_user("A", "POST", f"{_MO}/{w.mo['A']}/childDevices",
                     {"managedObject": {"id": w.mo["B"]}}))
    denied(w.as_user("A", "POST", f"{_MO}/{w.mo['B']}/childDevices",
                     {"managedObject": {"id": w.spare["A"]}}))
    # a missing child is the model's 422, as for the admin
    assert w.as_user("A", "POST", f"{_MO}/{w.mo['A']}/childDevices",
                     {"managedObject": {"id": "999999"}}).status == 422


def test_an_external_id_cannot_name_another_device(world: World) -> None:
    w = world
    target = f"/identity/globalIds/{w.spare['A']}/externalIds"
    # B's user name: B's first lookup (seed 002) would find A's object
    denied(w.as_user("A", "POST", target, {"type": "c8y_Serial", "externalId": USERS["B"]}))
    # a device that is still to register (a new device request) is protected the same way
    denied(w.as_user("A", "POST", target, {"type": "c8y_Serial", "externalId": "req-B"}))
    ok(w.as_user("A", "POST", target, {"type": "c8y_Serial", "externalId": "A-serial-2"}), 201)
    # taken: 409 without saying by which object
    ok(w.as_user("B", "POST", f"/identity/globalIds/{w.mo['B']}/externalIds",
                 {"type": "c8y_Other", "externalId": "oB2"}), 201)
    r = w.as_user("A", "POST", target, {"type": "c8y_Other", "externalId": "oB2"})
    assert r.status == 409 and w.mo["B"] not in r.body["message"], r
    # the admin may (hardware replacement, seed 002: "Identität hinzufügen")
    ok(w.admin("POST", target, {"type": "c8y_Serial2", "externalId": USERS["B"]}), 201)


def test_template_collections_and_binaries_are_read_by_every_device(world: World) -> None:
    w = world
    tpl = w.template["B"]
    ok(w.as_user("A", "GET", f"{_MO}/{tpl}"))
    ok(w.as_user("A", "GET", f"/identity/externalIds/{api_mod.SMARTREST_XID_TYPE}/XID-B"))
    ok(w.as_user("A", "GET", f"/identity/globalIds/{tpl}/externalIds"))
    denied(w.as_user("A", "PUT", f"{_MO}/{tpl}", {"name": "mine"}))
    denied(w.as_user("A", "DELETE", f"{_MO}/{tpl}"))
    denied(w.as_user("A", "DELETE",
                     f"/identity/externalIds/{api_mod.SMARTREST_XID_TYPE}/XID-B"))
    # its owner may not change it (other devices use it) but may delete it (seed 002's delete
    # template)
    denied(w.as_user("B", "PUT", f"{_MO}/{tpl}", {"name": "changed"}))
    ok(w.as_user("B", "DELETE", f"{_MO}/{tpl}"), 204)
    ok(w.as_user("A", "GET", f"{_MO}/{w.binary}"))
    ok(w.as_user("A", "GET", f"/inventory/binaries/{w.binary}"))
    denied(w.as_user("A", "PUT", f"{_MO}/{w.binary}", {"name": "evil"}))
    denied(w.as_user("A", "DELETE", f"{_MO}/{w.binary}"))


def test_the_engines_internal_lookups_still_see_everything(world: World) -> None:
    w = world
    found = api_mod.find_template_collection(w.api, "XID-B")
    assert found is not None and found[0] == w.template["B"]
    r = w.api.handle("GET", f"/devicecontrol/operations?agentId={w.mo['B']}&status=PENDING")
    assert [o["id"] for o in ok(r)["operations"]] == [w.op["B"]]


# -- the issue's attacks, over HTTP as a device ------------------------------------------------

def http(srv: RestServer, who: str, method: str, path: str, body: bytes | None = None,
         ctype: str = "application/json") -> tuple[int, Any]:
    user = USERS.get(who, who)
    password = PASSWORDS.get(who, ADMIN_PW)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(srv.url + path, data=body, method=method,
                                 headers={"Authorization": "Basic " + auth,
                                          "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_the_issues_attacks_over_http(world: World) -> None:
    w = world
    with RestServer(w.api, ADMIN, ADMIN_PW) as srv:
        # A lists every managed object: only its own come back
        status, body = http(srv, "A", "GET", "/inventory/managedObjects?pageSize=2000")
        assert status == 200
        assert {m.get("owner") for m in body["managedObjects"]} == {USERS["A"]}
        # ... every new device request, B's credential record
        for path in ("/devicecontrol/newDeviceRequests",
                     f"/devicecontrol/deviceCredentials/{USERS['B']}"):
            status, body = http(srv, "A", "GET", path)
            assert status == 403 and body["error"] == "security/Forbidden", path
        # deletes B's credentials
        status, _ = http(srv, "A", "DELETE", f"/devicecontrol/deviceCredentials/{USERS['B']}")
        assert status == 403 and w.api.model.check_credentials(USERS["B"], PASSWORDS["B"])
        # gives B a password of its choosing by bulk registration
        csv = f"ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\nb;Chosen-By-A-1;mqtt;b;{USERS['B']};1\n"
        status, _ = http(srv, "A", "POST", "/devicecontrol/bulkNewDeviceRequests", csv.encode(),
                         "text/csv")
        assert status == 403 and not w.api.model.check_credentials(USERS["B"], "Chosen-By-A-1")
        # creates an object owned by the admin
        status, made = http(srv, "A", "POST", "/inventory/managedObjects",
                            json.dumps({"name": "n", "c8y_IsDevice": {}, "owner": "admin"}).encode())
        assert status == 201 and made["owner"] == USERS["A"]
        # the admin still does all of it
        status, _ = http(srv, ADMIN, "GET", f"/devicecontrol/deviceCredentials/{USERS['B']}")
        assert status == 200
        # the admin's name is Api's now: a stranger is not taken for it
        assert w.api.admin_user == ADMIN
        with pytest.raises(ValueError):
            RestServer(w.api, "root", "Other-Pass-1")
