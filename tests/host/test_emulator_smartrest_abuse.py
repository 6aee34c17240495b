"""The SmartREST engine as a hostile device would use it: nothing leaves the device API.

Two devices with credentials (so api.py fences them in as device users) create themselves with
the firmware's own collection (firmware/templates.csv), in process: an Engine over the real Api
on an in-memory Model, as the MQTT connector drives it (`process(body, user)`, binary too).
Checked: templates outside the device API are refused at registration (41, naming the template,
its method and URI) and at use (a stored one: 50,<line>,403); every request runs as the device
(another device's managed object is a 403, its own works); values cannot change the structure of
the request (JSON escaping, percent-encoded URI values); hostile ids and numbers are answered
with SmartREST error rows, never a traceback; a seeded fuzz of mutated rows, text and binary,
always gets well-formed rows while the other device keeps being served.
"""

from __future__ import annotations

import logging
import random
import struct
from pathlib import Path

import pytest

from microcot import binrest, smartrest
from microcot.templates import Collection, Request
from microcot_host.emulator import api as api_mod
from microcot_host.emulator.api import Api
from microcot_host.emulator.engine import Engine
from microcot_host.emulator.engine_store import fragment
from microcot_host.emulator.model import Model

T0 = 1_700_000_000.0
DEV_A = "89490200000000000013"
DEV_B = "89490200000000000021"
INJECTION = 'n","c8y_IsDevice":{},"owner":"admin'

_CSV = Path(__file__).resolve().parents[2] / "firmware" / "templates.csv"
_LINES = _CSV.read_text().splitlines()
REG = "\n".join(_LINES[next(i for i, x in enumerate(_LINES) if x.startswith("15,")) :])
XID = REG.split("\n", 1)[0][3:]
COLL = Collection.from_body(REG)
OP_500 = (
    "10,500,GET,/devicecontrol/operations?status=PENDING&agentId=%%,,application/json,%%,UNSIGNED,"
)


class Platform:
    """The emulator's API and engine with two self-created devices."""

    def __init__(self) -> None:
        self.api = Api(Model(":memory:"))
        self.engine = Engine(self.api, clock=lambda: T0)
        for user in (DEV_A, DEV_B):
            self.api.issue_credentials(user, "pw-" + user)
        assert self.ask(DEV_A, REG, raw=True).startswith("20,")
        self.mo = {u: self.create(u) for u in (DEV_A, DEV_B)}

    def ask(self, user: str, *rows: str, raw: bool = False, xid: str | None = None) -> str:
        body = rows[0] if raw else "\n".join(["15," + (xid or XID), *rows])
        return self.engine.process(body, user).decode()

    def create(self, user: str) -> str:
        assert self.ask(user, "100," + user) == "50,2,404,Not Found"
        head, row = self.ask(user, "101,%s,device %s" % (user, user)).split("\n")
        mo = row.split(",")[2]
        assert (head, row) == ("87,1," + XID, "201,2," + mo)
        assert self.ask(user, "102,%s,%s" % (mo, user)).endswith("200,2,%s,%s" % (user, mo))
        return mo

    def get(self, target: str) -> dict:
        r = self.api.handle("GET", target)
        assert r.status == 200, (target, r)
        assert isinstance(r.body, dict)
        return r.body


@pytest.fixture
def plat(caplog: pytest.LogCaptureFixture) -> Platform:
    caplog.set_level(logging.INFO)
    return Platform()


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# -- templates outside the device API ------------------------------------------------------------

REFUSED = [
    # the adversarial test's template: another device's credentials deleted over MQTT
    (
        "10,900,DELETE,/devicecontrol/deviceCredentials/%%,,,%%,STRING,",
        "DELETE /devicecontrol/deviceCredentials/%% (no device resource)",
    ),
    (
        "10,900,GET,/devicecontrol/newDeviceRequests,,application/json,,,",
        "GET /devicecontrol/newDeviceRequests (no device resource)",
    ),
    (
        "10,900,GET,/devicecontrol/newDeviceRequests/%%,,application/json,%%,STRING,",
        "GET /devicecontrol/newDeviceRequests/%% (no device resource)",
    ),
    (
        "10,900,POST,/devicecontrol/bulkNewDeviceRequests,text/csv,,%%,STRING,%%",
        "POST /devicecontrol/bulkNewDeviceRequests (no device resource)",
    ),
    (
        "10,900,PUT,/inventory/binaries/%%,text/plain,,%%,UNSIGNED STRING,%%",
        "PUT /inventory/binaries/%% (devices may only use GET there)",
    ),
    ("10,900,GET,/user/t-emulator/users,,,,,", "GET /user/t-emulator/users (no device resource)"),
    ("10,900,GET,/tenant/tenants,,,,,", "GET /tenant/tenants (no device resource)"),
    ("10,900,POST,/s,text/plain,,%%,STRING,%%", "POST /s (no device resource)"),
    (
        "10,900,POST,/devicecontrol/operations/%%,application/json,,%%,UNSIGNED,{}",
        "POST /devicecontrol/operations/%% (devices may only use GET/PUT there)",
    ),
    # a placeholder can only fill an id: it cannot name the resource
    (
        "10,900,GET,/devicecontrol/%%,,application/json,%%,STRING,",
        "GET /devicecontrol/%% (no device resource)",
    ),
    (
        "10,900,GET,/%%/managedObjects,,application/json,%%,STRING,",
        "GET /%%/managedObjects (no device resource)",
    ),
    # not a path of this platform
    (
        "10,900,GET,http://evil.test/inventory/managedObjects,,,,,",
        "GET http://evil.test/inventory/managedObjects (the URI is not a path on this platform)",
    ),
    (
        "10,900,GET,//evil.test/inventory/managedObjects,,,,,",
        "GET //evil.test/inventory/managedObjects (the URI is not a path on this platform)",
    ),
    (
        "10,900,GET,%%/inventory/managedObjects,,,%%,STRING,",
        "GET %%/inventory/managedObjects (the URI is not a path on this platform)",
    ),
]


@pytest.mark.parametrize("template,what", REFUSED, ids=[r[1][:40] for r in REFUSED])
def test_template_outside_the_device_api_is_refused_41(
    plat: Platform, caplog: pytest.LogCaptureFixture, template: str, what: str
) -> None:
    body = "\n".join(["15,evilX1", OP_500, template, "11,901,,$.id,$.id"])
    want = ["41", "3", "Template 900 is outside the device API: " + what]
    assert smartrest.parse_rows(plat.ask(DEV_A, body, raw=True)) == [want]
    assert plat.ask(DEV_A, "15,evilX1", raw=True) == "40,Template not found."
    assert plat.api.model.has_credentials(DEV_B)
    no_traceback(caplog)


def test_the_device_api_matches_what_api_py_opens_to_devices() -> None:
    from microcot_host.emulator import authz, engine_access

    opened = {
        (r.pattern, r.method)
        for r in authz.RULES
        if r.access is not authz.Access.ADMIN and r.pattern != ("s",)
    }
    ours = {(p, m) for p, methods in engine_access.ROUTES for m in methods}
    assert ours == opened
    # every template of the firmware's collection is inside it
    requests = [t for t in COLL if isinstance(t, Request)]
    assert all(engine_access.refusal(t.method, t.uri, t.placeholder) is None for t in requests)


def test_stored_collection_outside_the_device_api_is_refused_when_used(
    plat: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    # a collection stored before the engine checked templates (or written into the database by
    # other means): refused per request, as the REST API would refuse the device (403)
    rows = [
        "10,500,GET,/devicecontrol/newDeviceRequests?x=%%,,application/json,%%,UNSIGNED,",
        "10,900,DELETE,/devicecontrol/deviceCredentials/%%,,,%%,STRING,",
        "10,901,GET,/devicecontrol/newDeviceRequests,,application/json,,,",
        "10,902,GET,/tenant/currentTenant,,application/json,,,",
        "11,903,,$.domainName,$.name",
    ]
    old = Collection.from_rows(smartrest.parse_rows("\n".join(rows)), "oldX1")
    made = api_mod.create_template_collection(plat.api, "oldX1", fragment(old))
    assert made.status == 201
    assert plat.ask(DEV_A, "900," + DEV_B, "901", "902", xid="oldX1") == (
        "50,2,403,Forbidden\n50,3,403,Forbidden\n87,1,oldX1\n903,4,t-emulator"
    )
    assert plat.api.model.has_credentials(DEV_B)
    assert "templates 500, 900, 901 are outside the device API" in caplog.text
    # its template 500 fetches no operations: no call is made
    assert plat.api.handle("POST", "/devicecontrol/newDeviceRequests", {"id": "x1"}).status == 201
    assert plat.engine.pending_operations(DEV_A, xid="oldX1") == b""
    assert "template 500 of oldX1 (GET /devicecontrol/newDeviceRequests?x=" in caplog.text
    no_traceback(caplog)


def test_a_template_cannot_write_a_template_collection(plat: Platform) -> None:
    # seed 002: a collection cannot be changed, only deleted; nor can a device make one of its
    # objects a collection behind the registration's checks
    frag = api_mod.SMARTREST_FRAGMENT
    body = "\n".join(
        [
            "15,sneakX1",
            OP_500,
            "10,700,PUT,/inventory/managedObjects/%%,application/json,,%%,UNSIGNED STRING,%%",
            "10,701,POST,/identity/globalIds/%%/externalIds,application/json,,%%,"
            'UNSIGNED STRING,"{""type"":""%%"",""externalId"":""someX1""}"',
        ]
    )
    assert plat.ask(DEV_A, body, raw=True).startswith("20,")
    mo = plat.mo[DEV_A]
    value = smartrest.quote('{"%s":{"registration":"10,1,GET,/x,,,,,"}}' % frag)
    assert plat.ask(DEV_A, "700,%s,%s" % (mo, value), xid="sneakX1") == "50,2,403,Forbidden"
    assert plat.ask(DEV_A, "701,%s,%s" % (mo, api_mod.SMARTREST_XID_TYPE), xid="sneakX1") == (
        "50,2,403,Forbidden"
    )
    assert frag not in plat.get("/inventory/managedObjects/" + mo)


# -- every request as the device -----------------------------------------------------------------


def test_another_devices_object_is_403_own_works(
    plat: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = plat.mo[DEV_A], plat.mo[DEV_B]
    # template 104 (c8y_Mobile) with the other device's managed object: refused
    assert plat.ask(DEV_A, "104,%s,%s,999" % (b, DEV_A)) == "50,2,403,Forbidden"
    assert "c8y_Mobile" not in plat.get("/inventory/managedObjects/" + b)
    # the own one works
    assert plat.ask(DEV_A, "104,%s,%s,262011234567890" % (a, DEV_A)) == "87,1,%s\n201,2,%s" % (
        XID,
        a,
    )
    assert plat.get("/inventory/managedObjects/" + a)["c8y_Mobile"]["imsi"] == "262011234567890"
    # data for the other device, its deletion, its operations: refused
    m = "110,%s,c8y_T,T,21.5,C,2023-11-14T22:13:20Z,c8y_T"
    assert plat.ask(DEV_A, m % b) == "50,2,403,Forbidden"
    assert plat.ask(DEV_A, "199," + b) == "50,2,403,Forbidden"
    assert plat.ask(DEV_B, m % b) == ""  # 110 has no response template: nothing to say
    # POST /s as the device (http.py passes the authenticated user): the same rules
    assert plat.engine.serve_http(("104,%s,x,1" % b).encode(), XID, DEV_A) == (
        200,
        b"50,1,403,Forbidden",
    )
    assert plat.get("/inventory/managedObjects/" + b)["id"] == b
    no_traceback(caplog)


def test_operations_are_fetched_as_the_device(plat: Platform) -> None:
    b = plat.mo[DEV_B]
    r = plat.api.handle(
        "POST", "/devicecontrol/operations", {"deviceId": b, "c8y_Restart": {}, "description": "r"}
    )
    assert r.status == 201
    assert plat.engine.pending_operations(DEV_A) == b""
    assert (
        plat.engine.pending_operations(DEV_B).decode().endswith("203,1,%s,%s" % (r.body["id"], b))
    )
    # the other device's operation cannot be touched through a template either
    assert plat.ask(DEV_A, "131," + r.body["id"]) == "50,2,403,Forbidden"


# -- values cannot change the request ------------------------------------------------------------


def test_json_injection_is_a_literal_name_owned_by_the_device(plat: Platform) -> None:
    head, row = plat.ask(DEV_A, "101,%s,%s" % (DEV_A, smartrest.quote(INJECTION))).split("\n")
    assert head == "87,1," + XID
    mo = plat.get("/inventory/managedObjects/" + row.split(",")[2])
    assert mo["name"] == INJECTION
    assert mo["owner"] == DEV_A
    # a device that escapes its values itself (the firmware's state.js) keeps working
    row = plat.ask(DEV_A, "101,%s,%s" % (DEV_A, smartrest.quote('say \\"hi\\"'))).split("\n")[1]
    assert plat.get("/inventory/managedObjects/" + row.split(",")[2])["name"] == 'say "hi"'


def test_values_outside_json_strings_must_be_json(plat: Platform) -> None:
    a = plat.mo[DEV_A]
    # 106 puts its values into lists: "c8y_SupportedOperations":[%%] (as the firmware sends them)
    ok = plat.ask(DEV_A, "106,%s,%s,%s" % (a, smartrest.quote('"c8y_Restart","c8y_Command"'), ""))
    assert ok == "87,1,%s\n201,2,%s" % (XID, a)
    assert plat.get("/inventory/managedObjects/" + a)["c8y_SupportedOperations"] == [
        "c8y_Restart",
        "c8y_Command",
    ]
    for bad in ['"x"],"owner":"admin","y":["z', "NaN", "1]", '"a"} ,{"b"', "[" * 5000]:
        [out] = smartrest.parse_rows(plat.ask(DEV_A, "106,%s,%s," % (a, smartrest.quote(bad))))
        assert out[:2] == ["45", "2"] and out[2].startswith(
            "Invalid message arguments: parameter at position '2': the template takes JSON "
            "list elements here; got '"
        ), out
    assert plat.get("/inventory/managedObjects/" + a)["owner"] == DEV_A


def test_uri_values_stay_in_their_segment(plat: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    targets: list[str] = []
    handle = plat.api.handle

    def recording(method: str, target: str, *args: object, **kw: object) -> object:
        targets.append(target)
        return handle(method, target, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(plat.api, "handle", recording)
    # 100 looks the value up as an external ID: nothing else, whatever the value holds
    for v, seg in [
        ("../../devicecontrol/newDeviceRequests", "..%2F..%2Fdevicecontrol%2FnewDeviceRequests"),
        ("x/childDevices", "x%2FchildDevices"),
        ("x?pageSize=2000#y", "x%3FpageSize%3D2000%23y"),
        ("%2e%2e", "%252e%252e"),
    ]:
        targets.clear()
        assert plat.ask(DEV_A, "100," + smartrest.quote(v)) == "50,2,404,Not Found", v
        assert targets == ["/identity/externalIds/c8y_Serial/" + seg]


def test_numbers_are_numbers(plat: Platform) -> None:
    a = plat.mo[DEV_A]
    m = "110,%s,c8y_T,T,%s,C,2023-11-14T22:13:20Z,c8y_T"
    for v in ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "1" + "0" * 30, "0x10"]:
        out = plat.ask(DEV_A, m % (a, v))
        assert out.startswith(
            "45,2,Invalid message arguments: parameter at position '4': expected type 'NUMBER'"
        ), (v[:20], out)
    assert plat.ask(DEV_A, "107,%s,%s" % (a, "9" * 5000)).startswith(
        "45,2,Invalid message arguments: parameter at position '2': expected type 'UNSIGNED'"
    )
    assert plat.ask(DEV_A, m % (a, "-1.5e3")) == ""
    listed = plat.get("/measurement/measurements?source=%s&pageSize=100" % a)["measurements"]
    assert [x["c8y_T"]["T"]["value"] for x in listed] == [-1500]


# -- hostile ids, lines and paths ----------------------------------------------------------------


def test_hostile_ids_lines_and_paths(plat: Platform, caplog: pytest.LogCaptureFixture) -> None:
    digits = "9" * 5000
    assert plat.ask(DEV_A, digits + ",1") == (
        "43,2,Invalid message identifier: '%s...' is not a template ID" % ("9" * 40)
    )
    assert plat.ask(DEV_A, "15,x" + digits + "\n100,1", raw=True).startswith(
        "42,1,Malformed request line: X-ID 'x999"
    )
    reg = "15,bigX1\n%s\n10,%s,GET,/tenant/currentTenant,,,,," % (OP_500, digits)
    assert plat.ask(DEV_A, reg, raw=True) == (
        "41,3,Not a valid message identifier for template creation"
    )
    deep = "$" + ".a" * 5000
    reg = "15,deepX1\n%s\n11,600,,%s,$.id" % (OP_500, deep)
    assert plat.ask(DEV_A, reg, raw=True) == "41,3,Invalid JsonPath"
    reg = "15,deepX1\n%s\n11,600,%s,,$.id" % (OP_500, "$" + "['a']" * 40)
    assert plat.ask(DEV_A, reg, raw=True) == "41,3,Invalid JsonPath"
    # a long line within the body limit: answered; beyond it: 42
    long_name = "n" * 60_000
    out = plat.ask(DEV_A, "101,%s,%s" % (DEV_A, long_name))
    assert out.startswith("87,1,") or out.startswith("50,2,4"), out[:80]
    assert plat.ask(DEV_A, "101,%s,%s" % (DEV_A, "n" * 70_000)).startswith("42,1,")
    no_traceback(caplog)


def test_binary_smartrest(plat: Platform, caplog: pytest.LogCaptureFixture) -> None:
    a, b = plat.mo[DEV_A], plat.mo[DEV_B]

    def send(tid: int, *values: object) -> str:
        payload = COLL.encode(tid, list(values))
        return plat.engine.process_binary(payload, DEV_A).decode()

    out = send(101, DEV_A, INJECTION)
    mo = plat.get("/inventory/managedObjects/" + out.split("\n")[1].split(",")[2])
    assert (mo["name"], mo["owner"]) == (INJECTION, DEV_A)
    assert send(104, int(b), DEV_A, "1") == "50,1,403,Forbidden"
    assert send(104, int(a), DEV_A, "1") == "87,1,%s\n201,1,%s" % (XID, a)
    # the device's encoder refuses NaN and infinities: a hostile device writes the bytes itself;
    # the decoder refuses them too, with seed 002's binary message
    ok = COLL.encode(110, [int(a), "c8y_T", "T", 1.5, "C", int(T0), "c8y_T"])
    for v in (float("nan"), float("inf")):
        out = plat.engine.process_binary(
            ok.replace(struct.pack(">f", 1.5), struct.pack(">f", v)), DEV_A
        )
        assert out.decode().startswith(
            "45,1,Invalid parameter at position '4': Expected type 'NUMBER'"
        )
    assert plat.engine.process_binary(XID.encode() + b"\0\xff\xff", DEV_A).startswith(b"43,1,")
    no_traceback(caplog)


# -- fuzz ----------------------------------------------------------------------------------------

HOSTILE = [
    "",
    "9" * 5000,
    "-" + "9" * 30,
    "NaN",
    "Infinity",
    "1e999",
    INJECTION,
    '"',
    "\\",
    '\\"',
    "\\u0000",
    "\\ud800",
    "%%",
    "../..",
    "a/b?c#d",
    "[" * 3000,
    '{"a":' * 100,
    "\n",
    "x" * 3000,
    "ä€😀",
    "2017-02-30T00:00",
]
CODES = {20, 40, 41, 42, 43, 45, 50, 87} | {t.tid for t in COLL if not isinstance(t, Request)}


def _valid_rows(a: str) -> list[list[str]]:
    t = "2023-11-14T22:13:20Z"
    return [
        ["100", DEV_A],
        ["101", DEV_A, "fuzzed"],
        ["103", a, DEV_A, "model", "fw", "1.0", ""],
        ["104", a, DEV_A, "262011234567890"],
        ["106", a, '"c8y_Restart"', '"agent"'],
        ["107", a, "10"],
        ["108", a, "k=v"],
        ["110", a, "c8y_T", "T", "21.5", "C", t, "c8y_T"],
        ["111", a, "c8y_E", "text", t],
        ["112", a, t, "1.5", "2.5", "3"],
        ["113", a, "c8y_A", t, "text", "ACTIVE", "MAJOR"],
        ["120", "child"],
        ["132", "1", "reason"],
        ["140"],
    ]


def _mutate(rnd: random.Random, row: list[str]) -> list[str]:
    """A valid row with one or two of its values made hostile (now and then its id too)."""
    row = list(row)
    if rnd.random() < 0.1:
        row[0] = rnd.choice([str(rnd.randrange(10 ** rnd.randint(1, 12))), "9" * 5000, "15", ""])
    for _ in range(rnd.randint(1, 2)):
        if len(row) == 1:
            row.append(rnd.choice(HOSTILE))
            continue
        i = rnd.randrange(1, len(row))
        k = rnd.randrange(5)
        if k == 0:
            row[i] = rnd.choice(HOSTILE)
        elif k == 1:
            del row[i]
        elif k == 2:
            row.insert(i, rnd.choice(HOSTILE))
        elif k == 3:
            row[i] = row[i] + rnd.choice(HOSTILE)
        else:
            row[i] = "".join(chr(rnd.randrange(1, 0x250)) for _ in range(rnd.randrange(8)))
    return row


def _binary(rnd: random.Random, row: list[str]) -> bytes:
    tid = int(row[0]) if row[0].isdigit() and len(row[0]) < 6 else rnd.randrange(65536)
    data = XID.encode() + b"\0" + struct.pack(">H", tid % 65536)
    req = COLL.request(tid)
    if req is not None and rnd.random() < 0.85:
        types = req.binary_types()
        values: list[object] = []
        for t in types:
            if t == binrest.STRING:
                values.append(rnd.choice(HOSTILE + row[1:] or ["x"])[:200])
            elif t == binrest.NUMBER:
                values.append(rnd.choice([1.5, float("nan"), float("inf"), -3e38]))
            else:
                values.append(rnd.randrange(2**31))
        try:
            return COLL.encode(tid, values)
        except ValueError:
            pass
    return data + rnd.randbytes(rnd.randrange(40))


def _well_formed(out: bytes) -> None:
    assert b"Internal Server Error" not in out, out[:200]
    for r in smartrest.parse(out):
        assert r.code in CODES, (r, out[:200])


def test_fuzz_mutated_rows_text_and_binary(
    plat: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    rnd = random.Random(20240612)
    a, b = plat.mo[DEV_A], plat.mo[DEV_B]
    rows = _valid_rows(a)
    m = "110,%s,c8y_T,T,%d,C,2023-11-14T22:13:20Z,c8y_T"
    for n in range(300):
        row = _mutate(rnd, rnd.choice(rows))
        body = "15,%s\n%s" % (XID, smartrest.row(row))
        _well_formed(plat.engine.process(body, DEV_A))
        _well_formed(plat.engine.process_binary(_binary(rnd, row), DEV_A))
        if n % 50 == 0:  # the well-behaved device is served throughout
            assert plat.ask(DEV_B, m % (b, n)) == ""
    assert plat.get("/inventory/managedObjects/" + b)["owner"] == DEV_B
    listed = plat.get("/measurement/measurements?source=%s&pageSize=100" % b)["measurements"]
    assert [x["c8y_T"]["T"]["value"] for x in listed] == list(range(0, 300, 50))
    assert plat.api.model.has_credentials(DEV_B)
    no_traceback(caplog)
