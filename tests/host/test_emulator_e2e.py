"""The platform emulator end to end: paho-mqtt plays the devices against a running `Emulator`
(real Mosquitto, TLS verified, MQTT 3.1.1, clean_session=False, QoS 1).

Seed 002's conversations over MQTT: template registration, self-creation, measurements, events,
alarms, child devices and operations in text and binary; bootstrap with XTEA; deleted
credentials; access control as a device sees it; bad input while another device is served;
durability across a restart; mass registration. One emulator serves the module; the durability
test has its own data directory.
"""

from __future__ import annotations

import logging
import secrets
import string
import threading
import time

import pytest
from emulator_fixtures import (
    DENIED,
    REGISTRATION,
    WAIT,
    XID,
    Device,
    device,
    multipart,
    new_iccid,
    raw_connack,
    rest,
    wait_for,
)

from microcot import smartrest, xtea
from microcot.templates import Collection
from microcot_host.emulator import Emulator
from microcot_host.emulator.connector import Lanes

pytestmark = pytest.mark.timeout(120)

SEED_RESULT = (
    "total 28496 -rw-r--r-- 1 user staff 474559 10 Mai 10:08 D-Route5.gpx drwxr-xr-x 6 user"
    " staff 192 18 Sep 10:11 Distribute -rw-r--r-- 1 user staff 6959276 8 Aug 11:59"
    " GTEClient.jar"
)
COLL = Collection.from_body(REGISTRATION)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu")) as e:
        yield e


@pytest.fixture(scope="module")
def conn(emu):
    return emu.connection


@pytest.fixture(scope="module")
def coll_id(emu, conn):
    """The template collection, registered over MQTT by a device (seed 002)."""
    iccid = new_iccid()
    d = device(conn, iccid, emu.add_device(iccid))
    try:
        assert d.request("15," + XID) == "40,Template not found."
        out = d.request(REGISTRATION)
        assert out.startswith("20,")
        # once registered, it cannot be registered again
        assert d.request(REGISTRATION) == (
            "41,Cannot create templates for already existing template object")
        return out[3:]
    finally:
        d.close()


def self_create(d: Device, name: str = "e2e device") -> str:
    """Seed 002's self-creation up to the external ID; returns the managed object id."""
    assert d.ask("100," + d.id) == "50,2,404,Not Found"
    head, row = d.ask(f"101,{d.id},{name}").split("\n")
    mo = row.split(",")[2]
    assert (head, row) == ("87,1," + XID, "201,2," + mo)
    assert d.ask(f"102,{mo},{d.id}") == f"87,1,{XID}\n200,2,{d.id},{mo}"
    return mo


def secret16() -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(16))


def bootstrap(conn: dict, iccid: str, accept=None, secret: str | None = None) -> str:
    """Seed 002's bootstrap as a device does it; `accept()` runs once the request is pending
    (None: auto-accept is expected). Returns the decrypted password."""
    secret = secret or secret16()
    b = Device(conn, iccid, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
    try:
        assert b.subscribe("sr/" + iccid) == 1
        b.publish("ss/" + iccid, secret.encode())
        if accept is not None:
            wait_for(lambda: rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + iccid)[1]
                     .get("status") == "PENDING_ACCEPTANCE")
            assert b.nothing("sr/" + iccid, 0.1) == []  # nothing before the acceptance
            accept()
        cipher = b.get("sr/" + iccid)
    finally:
        b.close()
    assert len(cipher) % 8 == 0
    return xtea.unpad(xtea.decrypt_ecb(secret.encode(), cipher)).decode()


# -- seed 002's conversations ---------------------------------------------------------------------

def test_self_creation_data_and_operations_in_text(emu, conn, coll_id):
    iccid = new_iccid()
    d = device(conn, iccid, emu.add_device(iccid))
    try:
        assert d.request("15," + XID) == "20," + coll_id
        mo = self_create(d)
        # checking again finds it; hardware and mobile info; supported operations
        assert d.ask("100," + iccid) == f"87,1,{XID}\n200,2,{iccid},{mo}"
        assert d.ask(f"103,{mo},{iccid},262011234567890,1.2.3,esp32-s3") == (
            f"87,1,{XID}\n201,2,{mo}")
        assert d.ask(f"104,{mo}") == f"87,1,{XID}\n201,2,{mo}"
        status, doc = rest(conn, "GET", "/inventory/managedObjects/" + mo)
        assert status == 200 and doc["owner"] == iccid and "c8y_IsDevice" in doc
        assert doc["c8y_Mobile"] == {"iccid": iccid, "imsi": "262011234567890"}
        assert doc["c8y_SupportedOperations"] == ["c8y_Command", "c8y_Restart"]

        # the seed's measurement, event and alarm (de-duplicated: count 2)
        out = d.ask(f"105,c8y_Temperature,0,395.3,°C,2017-09-14T12:37:00.000+02:00,{mo},"
                    "c8y_Temperature")
        mid = out.split("\n")[1].split(",")[2]
        assert out == f"87,1,{XID}\n207,2,{mid},395.3,°C"
        status, ms = rest(conn, "GET", f"/measurement/measurements?source={mo}")
        assert [m["c8y_Temperature"]["0"]["value"] for m in ms["measurements"]] == [395.3]
        out = d.ask(f"106,2011-09-06T12:03:27.845+02:00,{mo},8.6394,112,51.2345")
        assert out.startswith(f"87,1,{XID}\n208,2,") and out.endswith(",51.2345")
        row = '107,Kesseltemperatur,2017-09-14T12:37:00.000,"Kesseltemperatur stark erhoeht",'
        aid = d.ask(row + f"ACTIVE,MAJOR,{mo}").split("\n")[1].split(",")[2]
        assert d.ask(row + f"ACTIVE,MAJOR,{mo}") == (
            f"87,1,{XID}\n206,2,{aid},ACTIVE,2,Kesseltemperatur stark erhoeht")

        # a child device: template A creates it, template B (no answer rows) links it
        child = d.ask('108,"Child, one"').split(",")[-1]
        assert d.ask(f"109,{mo},{child}", "113").startswith(f"87,1,{XID}\n205,3,t-emulator,")
        _, refs = rest(conn, "GET", f"/inventory/managedObjects/{mo}/childDevices")
        assert [r["managedObject"]["id"] for r in refs["references"]] == [child]

        # operations: REST creates, mr/ delivers as the device's response template rows
        status, op = rest(conn, "POST", "/devicecontrol/operations",
                          {"deviceId": mo, "c8y_Command": {"text": "ls -l"}})
        assert status == 201
        assert d.get("mr/" + iccid).decode() == f"87,1,{XID}\n202,1,{op['id']},{mo},ls -l"
        # EXECUTING, then SUCCESSFUL with the seed's result (no answer rows: 113 answers)
        assert d.ask(f"110,{op['id']}", "113").startswith(f"87,1,{XID}\n205,3,")
        assert rest(conn, "GET", "/devicecontrol/operations/" + op["id"])[1]["status"] == (
            "EXECUTING")
        d.ask(f'111,{op["id"]},SUCCESSFUL,"{SEED_RESULT}",ls -l', "113")
        _, done = rest(conn, "GET", "/devicecontrol/operations/" + op["id"])
        assert done["status"] == "SUCCESSFUL"
        assert done["c8y_Command"] == {"text": "ls -l", "result": SEED_RESULT}
        # an operation of the child device reaches the parent, naming the child; FAILED
        op2 = emu.create_operation(child, {"c8y_Restart": {}})
        assert d.get("mr/" + iccid).decode() == f"87,1,{XID}\n203,1,{op2['id']},{child}"
        d.ask(f"112,{op2['id']},no restart today", "113")
        _, failed = rest(conn, "GET", "/devicecontrol/operations/" + op2["id"])
        assert (failed["status"], failed["failureReason"]) == ("FAILED", "no restart today")
        assert d.nothing("mr/" + iccid) == []  # each operation exactly once
    finally:
        d.close()


def test_self_creation_data_and_operations_in_binary(emu, conn, coll_id):
    iccid = new_iccid()
    d = device(conn, iccid, emu.add_device(iccid), binary=True)
    c = COLL
    try:
        assert d.brequest(c.encode(100, [iccid])) == "50,1,404,Not Found"
        out = d.brequest(c.encode(101, [iccid, "bin device"]))
        mo = out.split(",")[-1]
        assert out == f"87,1,{XID}\n201,1,{mo}"
        assert d.brequest(c.encode(102, [int(mo), iccid])) == f"87,1,{XID}\n200,1,{iccid},{mo}"
        # several messages in one payload: lines are the message indexes, one 87 group
        out = d.brequest(c.encode(103, [int(mo), iccid, "262011234567890", "1.2.3", "rp2"])
                         + c.encode(104, [int(mo)]) + c.encode(100, [iccid]))
        assert out == "\n".join([f"87,3,{XID}", f"201,1,{mo}", f"201,2,{mo}",
                                 f"200,3,{iccid},{mo}"])
        out = d.brequest(c.encode(105, ["c8y_Temperature", "0", 395.3, "°C", 1505392620,
                                        int(mo), "c8y_Temperature"]))
        assert out.startswith(f"87,1,{XID}\n207,1,") and out.endswith(",395.3,°C")
        out = d.brequest(c.encode(106, [1505392620, int(mo), 8.5, 112.0, 51.25]))
        assert out.startswith(f"87,1,{XID}\n208,1,") and out.endswith(",51.25")
        out = d.brequest(c.encode(107, ["Kessel", 1505392620, "zu heiss", "ACTIVE", "MAJOR",
                                        int(mo)]))
        assert out.startswith(f"87,1,{XID}\n206,1,") and out.endswith(",ACTIVE,1,zu heiss")
        child = d.brequest(c.encode(108, ["bin child"])).split(",")[-1]
        d.brequest(c.encode(109, [int(mo), int(child)]) + c.encode(113, []))
        _, refs = rest(conn, "GET", f"/inventory/managedObjects/{mo}/childDevices")
        assert [r["managedObject"]["id"] for r in refs["references"]] == [child]
        _, ms = rest(conn, "GET", f"/measurement/measurements?source={mo}")
        assert ms["measurements"][0]["time"] == "2017-09-14T12:37:00.000Z"

        # operations come as text on mr/ (DESIGN.md); status updates go in binary
        op = emu.create_operation(mo, {"c8y_Command": {"text": "uptime"}})
        assert d.get("mr/" + iccid).decode() == f"87,1,{XID}\n202,1,{op['id']},{mo},uptime"
        assert d.brequest(c.encode(110, [int(op["id"])]) + c.encode(113, [])).startswith(
            f"87,1,{XID}\n205,2,")
        assert d.brequest(c.encode(111, [int(op["id"]), "SUCCESSFUL", "up 3 days", "uptime"])
                          + c.encode(113, [])).startswith(f"87,1,{XID}\n205,2,")
        _, done = rest(conn, "GET", "/devicecontrol/operations/" + op["id"])
        assert done["status"] == "SUCCESSFUL" and done["c8y_Command"]["result"] == "up 3 days"
        assert d.nothing("br/" + iccid) == [] and d.nothing("mr/" + iccid, 0) == []
    finally:
        d.close()


# -- bootstrap ------------------------------------------------------------------------------------

def test_bootstrap_with_xtea_end_to_end(emu, conn, coll_id, caplog):
    caplog.set_level(logging.DEBUG)
    iccid = new_iccid()
    secret = secret16()

    def accept():
        # the secret is kept encrypted in the model until the acceptance
        stored = emu.model.get_setting("bootstrap.secret." + iccid)
        assert stored and secret not in stored
        status, r = rest(conn, "PUT", "/devicecontrol/newDeviceRequests/" + iccid,
                         {"status": "ACCEPTED"})
        assert (status, r["status"]) == (200, "ACCEPTED")

    password = bootstrap(conn, iccid, accept, secret)
    assert len(password) == 20 and password.isalnum()
    d = device(conn, iccid, password)
    try:
        assert d.request("15," + XID) == "20," + coll_id
        assert d.ask("100," + iccid) == "50,2,404,Not Found"
    finally:
        d.close()
    status, cred = rest(conn, "GET", "/devicecontrol/deviceCredentials/" + iccid)
    assert status == 200 and cred["source"] == "bootstrap"
    assert not emu.model.get_setting("bootstrap.secret." + iccid)  # forgotten once used
    # neither the secret nor the password reach a log
    logs = caplog.text + (emu.data_dir / "broker" / "mosquitto.log").read_text()
    assert secret not in logs and password not in logs


def test_wrong_secret_is_ignored(emu, conn, caplog):
    iccid = new_iccid()
    b = Device(conn, iccid, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
    try:
        assert b.subscribe("sr/" + iccid) == 1
        with caplog.at_level(logging.WARNING, "microcot_host.emulator"):
            b.publish("ss/" + iccid, b"ABCDEFGHIJKLMNO")  # 15 bytes
            wait_for(lambda: "must be 16 bytes" in caplog.text)
        assert f"ss/{iccid}: a bootstrap secret must be 16 bytes" in caplog.text
        assert rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + iccid)[0] == 404
        assert b.nothing("sr/" + iccid) == []
    finally:
        b.close()


def test_auto_accept_and_rebootstrap(emu, conn, coll_id):
    iccid = new_iccid()
    emu.connector.auto_accept = True
    try:
        first = bootstrap(conn, iccid)
    finally:
        emu.connector.auto_accept = False
    d = device(conn, iccid, first)
    assert d.request("15," + XID) == "20," + coll_id
    mo = self_create(d)
    op = emu.create_operation(mo, {"c8y_Restart": {}})
    assert d.get("mr/" + iccid).decode() == f"87,1,{XID}\n203,1,{op['id']},{mo}"
    d.close()
    # again, with credentials: a new request to accept, a new password, the old one refused
    second = bootstrap(conn, iccid, lambda: emu.accept(iccid))
    assert second != first
    assert raw_connack(conn, iccid, first) == 5
    d = device(conn, iccid, second)
    try:
        assert d.request("15," + XID) == "20," + coll_id
        # it may have lost its session: its PENDING operation comes once more
        assert d.get("mr/" + iccid).decode() == f"87,1,{XID}\n203,1,{op['id']},{mo}"
        assert d.nothing("mr/" + iccid) == []
    finally:
        d.close()


def test_deleted_credentials_refuse_the_next_connect(emu, conn):
    iccid = new_iccid()
    password = emu.add_device(iccid)
    assert raw_connack(conn, iccid, password) == 0
    status, _ = rest(conn, "DELETE", "/devicecontrol/deviceCredentials/" + iccid)
    assert status == 204
    assert raw_connack(conn, iccid, password) == 5


# -- access control as a device sees it ---------------------------------------------------------

def test_access_control(emu, conn):
    a_id, b_id, c_id, x_id = new_iccid(), new_iccid(), new_iccid(), new_iccid()
    a = device(conn, a_id, emu.add_device(a_id))
    b = device(conn, b_id, emu.add_device(b_id))
    boot = Device(conn, c_id, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
    try:
        assert a.subscribe("mr/" + b_id) == DENIED
        assert a.subscribe("mr/+") == DENIED
        assert a.subscribe("#") == DENIED
        assert a.subscribe("ms/" + a_id) == DENIED  # publish topics are write-only
        a.publish("mr/" + b_id, b"87,1,fake\n202,1,1,1,rm -rf /")
        assert b.nothing("mr/" + b_id) == []
        # the bootstrap user reads only sr/<its client id>
        assert boot.subscribe("sr/+") == DENIED
        boot.subscribe("sr/" + x_id)  # granted by the fallback pattern, but never delivered
        emu.connector.auto_accept = True
        try:
            bootstrap(conn, x_id)  # x's own bootstrap answer on sr/<x>
        finally:
            emu.connector.auto_accept = False
        assert boot.nothing("sr/" + x_id) == []
    finally:
        for x in (a, b, boot):
            x.close()


# -- bad input, and every other device is served meanwhile -----------------------------------------

def test_bad_input_is_answered_and_others_are_served(emu, conn, coll_id):
    bad_id, good_id = new_iccid(), new_iccid()
    bad = device(conn, bad_id, emu.add_device(bad_id), binary=True)
    good = device(conn, good_id, emu.add_device(good_id))
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def serve_good():
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                out = good.ask("113")
                latencies.append(time.monotonic() - t0)
                if not out.startswith(f"87,1,{XID}\n205,2,t-emulator,"):
                    failures.append(out)
        except AssertionError as e:
            failures.append(str(e))

    mo = self_create(bad, "bad device")
    huge = f"15,{XID}\n108," + "x" * (100 * 1024)
    t = threading.Thread(target=serve_good)
    t.start()
    try:
        cases = [
            ("no 15 row", "113",
             "42,1,Malformed request line: a request starts with a 15 row naming the X-ID"),
            ("unterminated quote", f'15,{XID}\n108,"open', "42,2,Malformed request line:"),
            ("bad X-ID", "15,bad xid!\n113", "42,1,Malformed request line:"),
            ("unknown X-ID", "15,nopeX9\n100,1",
             "43,2,Invalid message identifier: template with X-ID 'nopeX9' and Template ID "
             "'100' not found"),
            ("unknown template", f"15,{XID}\n999,1",
             f"43,2,Invalid message identifier: template with X-ID '{XID}' and Template ID "
             "'999' not found"),
            ("response template", f"15,{XID}\n201,1", "43,2,Invalid message identifier:"),
            ("not a number", f"15,{XID}\n104,abc", "45,2,Invalid message arguments:"),
            ("too many values", f"15,{XID}\n104,{mo},{mo}", "45,2,Invalid message arguments:"),
            ("too few values", f"15,{XID}\n105,c8y_T,0,1.5", "45,2,Invalid message arguments:"),
            ("unknown object", f"15,{XID}\n104,99999999", "50,2,404,Not Found"),
            ("mixed", f"15,{XID}\n104,abc\n104,{mo}",
             "45,2,Invalid message arguments: parameter at position '1'"),
            ("oversized", huge, f"42,1,Malformed request line: request of {len(huge)} bytes "
                                "exceeds the limit of 65536 bytes"),
        ]
        for what, body, want in cases:
            out = bad.request(body)
            first = smartrest.parse(out)[0]  # unquoted: a message may be CSV-quoted
            assert ",".join(map(str, [first.code, first.line, *first.values])).startswith(
                want), (what, out)
        assert bad.request(f"15,{XID}\n104,abc\n104,{mo}").endswith(f"\n87,1,{XID}\n201,3,{mo}")
        binary = [
            (b"", "42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'"),
            (XID.encode() + b"\0\0", "42,1,Malformed Request: no Template ID found in binary "
                                     "message '1' around byte '7'"),
            (XID.encode() + b"\0\x03\xe7", f"43,1,Invalid template identifier: template with "
                                           f"X-ID '{XID}' and Template ID '999' not found in "
                                           "cache"),
            (XID.encode() + b"\0\x00\x68\0\0", "45,1,Invalid parameter at position '1': "
                                               "Expected type 'UNSIGNED' in binary message '1' "
                                               "around byte '9'"),
            (COLL.encode(104, [int(mo)]) + b"junk", "42,2,Malformed Request: no X-Id found in "
                                                   "binary message '2'"),
            (b"\xff" * (70 * 1024), "42,1,Malformed Request: payload of 71680 bytes exceeds the "
                                    "limit of 65536 bytes"),
        ]
        for payload, want in binary:
            out = bad.brequest(payload)
            assert out.startswith(want), (payload[:20], out)
        assert bad.nothing("mr/" + bad_id, 0) == [] and bad.nothing("br/" + bad_id, 0) == []
    finally:
        stop.set()
        t.join(WAIT + 1)
        bad.close()
        good.close()
    assert not failures, failures
    assert len(latencies) >= 5 and max(latencies) < 3.0, latencies


def test_a_stuck_device_does_not_stall_the_others(emu, conn, coll_id, monkeypatch):
    slow_id, quick_id = new_iccid(), new_iccid()
    slow = device(conn, slow_id, emu.add_device(slow_id))
    quick = device(conn, quick_id, emu.add_device(quick_id))
    release = threading.Event()
    process = emu.engine.process_later  # what the connector calls

    def stuck_for_one(body, user=None, **kw):
        if user == slow_id:
            release.wait(WAIT)
        return process(body, user, **kw)

    monkeypatch.setattr(emu.engine, "process_later", stuck_for_one)
    try:
        for _ in range(3):
            slow.publish("ms/" + slow_id, f"15,{XID}\n113".encode())
        t0 = time.monotonic()
        for _ in range(5):
            assert quick.ask("113").startswith(f"87,1,{XID}\n205,2,")
        assert time.monotonic() - t0 < 2.0
        assert slow.nothing("mr/" + slow_id, 0.1) == []
        release.set()
        # the slow device's answers come, in order, once it is released
        for _ in range(3):
            assert slow.get("mr/" + slow_id).decode().startswith(f"87,1,{XID}\n205,2,")
    finally:
        release.set()
        slow.close()
        quick.close()


def test_lanes_replace_a_stuck_worker():
    lanes = Lanes(workers=1, budget=0.2, name="t")
    lanes.start()
    release = threading.Event()
    done: list[str] = []
    try:
        lanes.submit("slow", lambda: (release.wait(5), done.append("slow")))
        lanes.submit("slow", lambda: done.append("slow-2"))
        time.sleep(0.05)
        lanes.submit("other", lambda: done.append("other"))
        wait_for(lambda: "other" in done, 3.0)
        assert done == ["other"]  # the slow lane keeps its order
        release.set()
        wait_for(lambda: len(done) == 3, 3.0)
        assert done == ["other", "slow", "slow-2"]
        # bounded lanes: a full lane refuses, others do not
        small = Lanes(workers=1, max_lane=2, name="s")
        assert small.submit("a", lambda: None) and small.submit("a", lambda: None)
        assert not small.submit("a", lambda: None) and small.submit("b", lambda: None)
    finally:
        release.set()
        assert lanes.stop(2.0) == 0


# -- mass registration --------------------------------------------------------------------------

def test_mass_registration_devices_connect_with_their_csv_credentials(emu, conn, coll_id):
    ids = [new_iccid() for _ in range(3)]
    csv = "\n".join([
        "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL",
        f"dev-a-{ids[0]};Secret-Pass-A1;mqtt;Device A;{ids[0]};1",
        f"dev-b-{ids[1]};Secret-Pass-B2;mqtt;Device B;{ids[1]};0",
        f"dev-c-{ids[2]};short;mqtt;Device C;{ids[2]};1",
    ]).encode()
    body, ctype = multipart("fleet.csv", csv)
    status, summary = rest(conn, "POST", "/devicecontrol/bulkNewDeviceRequests", body, ctype)
    assert status == 201
    assert (summary["numberOfAll"], summary["numberOfCreated"], summary["numberOfFailed"],
            summary["numberOfSuccessful"]) == (3, 2, 1, 2)
    (failed,) = summary["failedCreationList"]
    assert failed["line"] == 4 and "CREDENTIALS" in failed["failureReason"]
    for iccid, pw in ((ids[0], "Secret-Pass-A1"), (ids[1], "Secret-Pass-B2")):
        d = device(conn, iccid, pw)
        try:
            assert d.request("15," + XID) == "20," + coll_id
            mo = self_create(d, "bulk " + iccid)
            assert d.ask(f"104,{mo}") == f"87,1,{XID}\n201,2,{mo}"
        finally:
            d.close()
    assert raw_connack(conn, ids[2], "short") == 5


# -- durability -------------------------------------------------------------------------------------

def test_restart_keeps_everything_and_delivers_offline_operations(tmp_path, database_url):
    """On both stores (`database_url`: SQLite in the data folder, and PostgreSQL)."""
    iccid, boot_id = new_iccid(), new_iccid()
    with Emulator(tmp_path / "data", database_url=database_url) as emu:
        conn = emu.connection
        password = emu.add_device(iccid)
        d = device(conn, iccid, password)
        coll = d.request(REGISTRATION)[3:]
        mo = self_create(d)
        d.ask(f"105,c8y_Temperature,0,21.5,C,2024-01-01T00:00:00Z,{mo},c8y_Temperature")
        d.close()
        # offline: the broker's persistent session keeps the operation
        op1 = emu.create_operation(mo, {"c8y_Command": {"text": "one"}})
        # a bootstrap between the secret and the acceptance
        b = Device(conn, boot_id, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
        assert b.subscribe("sr/" + boot_id) == 1
        secret = secret16()
        b.publish("ss/" + boot_id, secret.encode())
        wait_for(lambda: emu.model.get_setting("bootstrap.secret." + boot_id))
        b.close()  # clean_session=False: the broker keeps its subscription to sr/<ID>
        t0 = time.monotonic()
        emu.restart()
        restart_seconds = time.monotonic() - t0
        assert emu.connection["mqtt_port"] == conn["mqtt_port"]  # ports are kept when free
        conn = emu.connection
        op2 = emu.create_operation(mo, {"c8y_Restart": {}})
        # the device comes back: both operations from its session, then once more from the
        # database, as seed 002 wants every PENDING one at the next connection (the device
        # drops copies by operation id)
        d = device(conn, iccid, password)
        got = [d.get("mr/" + iccid).decode() for _ in range(3)]
        rows = [f"87,1,{XID}\n202,1,{op1['id']},{mo},one", f"87,1,{XID}\n203,1,{op2['id']},{mo}"]
        assert got == [*rows, "\n".join(rows)]
        # templates, the device, its data and its binding are still there
        assert d.request("15," + XID) == "20," + coll
        assert d.ask("100," + iccid) == f"87,1,{XID}\n200,2,{iccid},{mo}"
        _, ms = rest(conn, "GET", f"/measurement/measurements?source={mo}")
        assert [m["c8y_Temperature"]["0"]["value"] for m in ms["measurements"]] == [21.5]
        assert d.nothing("mr/" + iccid) == []  # nothing more while they are PENDING
        # the bootstrap goes on after the restart
        b2 = Device(conn, boot_id, conn["bootstrap_user"], conn["bootstrap_password"],
                    ).connect()
        emu.accept(boot_id)
        cipher = b2.get("sr/" + boot_id)
        new_pw = xtea.unpad(xtea.decrypt_ecb(secret.encode(), cipher)).decode()
        b2.close()
        d.close()
        # an operation while the whole emulator is down is impossible (REST is down too), but
        # one whose device was unknown is sent after the device's next request
        other = new_iccid()
        status, pre = rest(conn, "POST", "/inventory/managedObjects",
                           {"name": "pre-made", "c8y_IsDevice": {}})
        rest(conn, "POST", f"/identity/globalIds/{pre['id']}/externalIds",
             {"type": "c8y_Serial", "externalId": other})
        op3 = emu.create_operation(pre["id"], {"c8y_Command": {"text": "early"}})
        o = device(conn, other, emu.add_device(other))
        assert o.ask("100," + other) == f"87,1,{XID}\n200,2,{other},{pre['id']}"
        assert o.get("mr/" + other).decode() == f"87,1,{XID}\n202,1,{op3['id']},{pre['id']},early"
        o.close()
    with Emulator(tmp_path / "data", database_url=database_url) as emu:  # a new process
        assert raw_connack(emu.connection, boot_id, new_pw) == 0
        assert raw_connack(emu.connection, iccid, password) == 0
    assert restart_seconds < 5.0
