"""Operations store-and-forward, and answers while the broker is away (connector.py).

An operation is delivered from the database while it is PENDING: at its creation and at each
connection of its device (seed 002: "Alle erstellten Operations werden bei der nächsten Verbindung
an den Broker gesendet"), so a session lost to a clean-session login, a takeover attempt or a
broker restart loses none; once the device reports EXECUTING it is not sent again. A device
bulk-registered with SHELL 0 gets no operations: they fail at once with a reason. An answer the
connector publishes while the broker is down reaches the device after the restart, once.

paho-mqtt plays the devices against one in-process Emulator (real Mosquitto behind the emulator's
front, TLS, MQTT 3.1.1, QoS 1).
"""

from __future__ import annotations

import re
import threading

import pytest
from emulator_fixtures import (
    REGISTRATION,
    XID,
    Device,
    device,
    multipart,
    new_iccid,
    raw_connack,
    rest,
    wait_for,
)

from microcot_host.emulator import Emulator
from microcot_host.emulator.connector import LogFollower, connected_clients

pytestmark = pytest.mark.timeout(120)

# longer than the connector's connect_grace (0.5 s): its delivery at a connection has come by then
SETTLE = 1.2


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu")) as e:
        yield e


@pytest.fixture(scope="module")
def coll(emu):
    """The template collection, registered over MQTT by a device (seed 002)."""
    iccid = new_iccid()
    d = device(emu.connection, iccid, emu.add_device(iccid))
    try:
        out = d.request(REGISTRATION)
        assert out.startswith("20,"), out
        return out[3:]
    finally:
        d.close()


def self_created(conn: dict, iccid: str, password: str) -> str:
    """The device binds to the collection and creates itself (seed 002); its MO id."""
    d = device(conn, iccid, password)
    try:
        assert d.ask("100," + iccid) == "50,2,404,Not Found"
        mo = d.ask(f"101,{iccid},fwd {iccid}").split("\n")[1].split(",")[2]
        assert d.ask(f"102,{mo},{iccid}") == f"87,1,{XID}\n200,2,{iccid},{mo}"
        return mo
    finally:
        d.close()


def command_row(op: dict, mo: str, text: str) -> str:
    return f"87,1,{XID}\n202,1,{op['id']},{mo},{text}"


def status(conn: dict, op: dict) -> tuple[str, str | None]:
    _, doc = rest(conn, "GET", "/devicecontrol/operations/" + op["id"])
    return doc["status"], doc.get("failureReason")


def test_an_operation_survives_a_lost_session_and_a_broker_restart(emu, coll):
    conn = emu.connection
    iccid = new_iccid()
    password = emu.add_device(iccid)
    mo = self_created(conn, iccid, password)
    op = emu.create_operation(mo, {"c8y_Command": {"text": "survive"}})  # the device is away
    # its session goes: a clean-session login drops what the broker kept for it
    lost = Device(conn, iccid, iccid, password, clean_session=True).connect()
    lost.close()
    emu.broker.restart()
    conn = emu.connection
    d = device(conn, iccid, password)
    try:
        assert d.get("mr/" + iccid).decode() == command_row(op, mo, "survive")
        # acknowledged: EXECUTING (the device's own SmartREST update), then never again
        assert d.ask(f"110,{op['id']}", "113").startswith(f"87,1,{XID}\n205,3,")
        assert status(conn, op) == ("EXECUTING", None)
    finally:
        d.close()
    d = device(conn, iccid, password)
    try:
        d.ask("113")
        assert d.nothing("mr/" + iccid, SETTLE) == []
    finally:
        d.close()


def test_a_takeover_attempt_loses_no_operation(emu, coll):
    conn = emu.connection
    victim, other = new_iccid(), new_iccid()
    victim_pw, other_pw = emu.add_device(victim), emu.add_device(other)
    mo = self_created(conn, victim, victim_pw)
    op = emu.create_operation(mo, {"c8y_Command": {"text": "mine"}})
    # another device logs in with the victim's client id and a clean session (refused by the
    # emulator's front, CONNACK 5; a broker that let it through would drop the victim's session)
    raw_connack(conn, other, other_pw, client_id=victim)
    d = device(conn, victim, victim_pw)
    try:
        got = d.get("mr/" + victim).decode()
        assert got == command_row(op, mo, "mine")
        assert d.ask(f"110,{op['id']}", "113").startswith(f"87,1,{XID}\n205,3,")
    finally:
        d.close()


def test_operations_created_offline_come_at_every_connection_until_executing(emu, coll):
    conn = emu.connection
    iccid = new_iccid()
    password = emu.add_device(iccid)
    mo = self_created(conn, iccid, password)
    ops = [emu.create_operation(mo, {"c8y_Command": {"text": f"n{i}"}}) for i in range(2)]
    rows = [command_row(op, mo, f"n{i}") for i, op in enumerate(ops)]
    d = device(conn, iccid, password)
    try:
        # from the broker's session, then all PENDING ones from the database at the connection
        got = [d.get("mr/" + iccid).decode() for _ in range(3)]
        assert got == [*rows, "\n".join(rows)]
        d.ask(f"110,{ops[0]['id']}", "113")
    finally:
        d.close()
    d = device(conn, iccid, password)
    try:
        assert d.get("mr/" + iccid).decode() == rows[1]  # the one still PENDING, once
        assert d.nothing("mr/" + iccid, SETTLE) == []
    finally:
        d.close()


def test_a_shell_0_device_gets_no_operations(emu, coll):
    conn = emu.connection
    on, off = new_iccid(), new_iccid()
    csv = "\n".join(["ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL",
                     f"on-{on};Shell-Pass-On1;mqtt;On;{on};1",
                     f"off-{off};Shell-Pass-Off0;mqtt;Off;{off};0"]).encode()
    body, ctype = multipart("fleet.csv", csv)
    code, summary = rest(conn, "POST", "/devicecontrol/bulkNewDeviceRequests", body, ctype)
    assert code == 201 and summary["numberOfCreated"] == 2, summary
    mo_off = self_created(conn, off, "Shell-Pass-Off0")
    mo_on = self_created(conn, on, "Shell-Pass-On1")
    d = device(conn, off, "Shell-Pass-Off0")
    try:
        code, op = rest(conn, "POST", "/devicecontrol/operations",
                        {"deviceId": mo_off, "c8y_Command": {"text": "ls"}})
        assert code == 201
        assert op["status"] == "FAILED" and "SHELL=0" in op["failureReason"], op
        assert status(conn, op) == ("FAILED", op["failureReason"])
        assert d.nothing("mr/" + off, SETTLE) == []
    finally:
        d.close()
    # SHELL 1: as usual
    op = emu.create_operation(mo_on, {"c8y_Command": {"text": "ls"}})
    assert op["status"] == "PENDING"
    d = device(conn, on, "Shell-Pass-On1")
    try:
        assert d.get("mr/" + on).decode() == command_row(op, mo_on, "ls")
    finally:
        d.close()


def test_an_answer_published_while_the_broker_is_down_arrives_once(emu, coll, monkeypatch):
    conn = emu.connection
    iccid = new_iccid()
    password = emu.add_device(iccid)
    d = device(conn, iccid, password)
    d.client.reconnect_delay_set(0.1, 0.5)
    release = threading.Event()
    process = emu.engine.process_later  # what the connector calls

    def held(body, user=None, **kw):
        if user == iccid:  # answered once the broker is gone
            release.wait(10)
        return process(body, user, **kw)

    monkeypatch.setattr(emu.engine, "process_later", held)
    broker = emu.broker
    start = broker.start

    def start_later() -> None:
        release.set()  # the answer goes out now, into paho's queue
        wait_for(lambda: emu.connector.lanes.queued == 0, 5.0)
        start()

    monkeypatch.setattr(broker, "start", start_later)
    try:
        d.publish("ms/" + iccid, f"15,{XID}\n113".encode())
        wait_for(lambda: emu.connector.lanes.queued == 1, 5.0)  # the request waits in its lane
        broker.restart()
        assert d.get("mr/" + iccid).decode().startswith(f"87,1,{XID}\n205,2,")
        # the broker delivers the request to the connector again (it was not acknowledged):
        # recognised, not answered a second time
        assert d.nothing("mr/" + iccid, SETTLE) == []
    finally:
        release.set()
        d.close()


def test_connections_are_read_from_mosquittos_log(tmp_path):
    log = tmp_path / "mosquitto.log"
    log.write_text("T: mosquitto version 2.0.11 starting\n"
                   "T: New client connected from 127.0.0.1:1 as early (p2, c0, k60, u'early').\n"
                   "T: mosquitto version 2.0.11 starting\n"
                   "T: New client connected from 127.0.0.1:2 as dev1 (p2, c0, k60, u'dev1').\n")
    # from the broker's last start on: a device may connect before the connector does
    f = LogFollower(log, re.compile(rb"mosquitto version \S+ starting"))
    assert connected_clients(f.lines()) == ["dev1"]
    with log.open("a") as out:
        out.write("T: Client dev1 disconnected.\nT: New client connected from 127.0.0.1:3 as ")
    assert connected_clients(f.lines()) == []  # half a line waits for its end
    with log.open("a") as out:
        out.write("dev2 (p2, c1, k30, u'dev2').\n")
    assert connected_clients(f.lines()) == ["dev2"]
    assert f.lines() == []
    log.write_text("T: New client connected from 127.0.0.1:4 as dev3 (p5, c0, k60).\n")
    assert connected_clients(f.lines()) == ["dev3"]  # a new file: read from its start
    assert connected_clients(LogFollower(log).lines()) == []  # without `since`: from its end
