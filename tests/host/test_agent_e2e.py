"""The agent (firmware/microcot/agent.py and its phase modules) on a virtual board, MicroPython
for real, against the platform emulator: seed 002 from the device's side.

One emulator (fixed MQTT port, so the broker can be stopped and started) and one virtual board
with an emulated modem (its ICCID is the device ID) serve the module; the tests build on each
other in file order, like a device's life: bootstrap (with a reboot in the middle), self-creation,
a second boot, data in text and binary, child device, operations, a c8y_Restart, a broker outage,
deleted credentials. The board runs the real /main.py where the agent restarts the board (it does
after reading the modem, after a bootstrap and for c8y_Restart); otherwise a bounded
`Agent.run(...)` script through the raw REPL, whose output says what the agent saw.

The life runs once per board file in MICROCOT_AGENT_BOARDS (default: esp32-generic and
rp2-pico-w), each on its faithful model (the i386-esp32 build with TLS outside the heap, the
i386-rp2 build with mbedTLS in the GC heap) at its board file's budget: the free heap the real
board has after boot, less the stated margin. MICROCOT_AGENT_HEAP sets the interpreter's whole
heap instead (bench/agent.py bisects with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from agent_fixtures import (
    Console,
    _free_port,
    api,
    device_mo,
    power_cycle,
    read_doc,
    run_script,
    values,
)
from emulator_fixtures import new_iccid, wait_for
from fidelity_fixtures import need_runtime

from microcot_host import boards as board_files
from microcot_host import deploy, transport
from microcot_host.emulator import Emulator
from microcot_host.vboard.models import make_board

pytestmark = pytest.mark.timeout(180)

BOARDS = tuple(os.environ.get("MICROCOT_AGENT_BOARDS", "esp32-generic,rp2-pico-w").split(","))
HEAP = os.environ.get("MICROCOT_AGENT_HEAP") or None
XID = "mcAgentE2E1"
IMSI = "262019876543210"
WAIT = 30.0


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), mqtt_port=_free_port()) as e:
        yield e


@pytest.fixture(scope="module", params=BOARDS)
def board_file(request):
    need_runtime(board_files.load(request.param).runtime)
    return request.param


@pytest.fixture(scope="module")
def iccid(board_file):
    return new_iccid()


@pytest.fixture(scope="module")
def board(emu, iccid, board_file, tmp_path_factory):
    """The virtual board with the firmware, main.py, templates.csv and /microcot.json: deployed
    on a board with the unix port's default heap (deploy's import check imports every module of
    the package, the agent's and others'), then started at the heap under test."""
    c = emu.connection
    config = {
        "host": "localhost", "port": c["mqtt_port"], "ca": Path(c["ca_cert"]).read_text(),
        "bootstrap_user": c["bootstrap_user"], "bootstrap_password": c["bootstrap_password"],
        "bootstrap_delay": [0, 1], "bootstrap_repeat": 30, "backoff": [0.5, 3],
        "keepalive": 10, "timeout": 10, "interval": 1, "xid": XID,
        "name": "e2e agent {id}",
    }
    flash = tmp_path_factory.mktemp("flash")
    vb = make_board(board_file, name="agent-deploy", heap="1m", flash_dir=flash).start()
    try:
        deploy.deploy(vb.port, board=board_file, app=True, config=config)
    finally:
        vb.stop()
    main = (flash / "main.py").read_bytes()
    (flash / "main.py").unlink()  # not before the test says so
    vb = make_board(board_file, name="agent-e2e", heap=HEAP, iccid=iccid, imsi=IMSI,
                    flash_dir=flash).start()
    vb.main = main
    yield vb
    vb.stop()


@pytest.fixture(scope="module")
def puts(emu):
    """Every operation status the devices set, in order: (operation id, status)."""
    seen: list[tuple[str, str]] = []
    handle = emu.api.handle

    def spy(method, target, body=None, *args, **kw):
        r = handle(method, target, body, *args, **kw)
        if method == "PUT" and target.startswith("/devicecontrol/operations/"):
            doc = body
            if isinstance(body, (str, bytes)):  # the SmartREST engine passes the JSON text
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
            if isinstance(doc, dict) and "status" in doc:
                seen.append((target.rsplit("/", 1)[1], doc["status"]))
        return r

    emu.api.handle = spy
    yield seen
    emu.api.handle = handle


# -- a device's life ----------------------------------------------------------------------------

def test_bootstrap_resumes_after_a_reboot_then_self_creation(emu, board, board_file, iccid, puts):
    emu.connector.auto_accept = False
    flash = board.flash_dir
    (flash / "main.py").write_bytes(board.main)
    con = Console(board.port).start()
    try:
        power_cycle(board)  # boot 1: reads the modem, restarts; boot 2: bootstraps
        wait_for(lambda: api(emu, "GET", "/devicecontrol/newDeviceRequests/" + iccid)[1]
                 .get("status") == "PENDING_ACCEPTANCE", WAIT)
        con.wait("request sent on ss/" + iccid)
        doc = read_doc(flash, "boot")
        assert doc["state"] == "ONGOING" and doc["id"] == iccid
        secret = doc["secret"]
        assert re.fullmatch(r"[A-Z]{16}", secret)
        assert read_doc(flash, "dev") == {"id": iccid, "src": "iccid", "imsi": IMSI}
        mark = len(con.text)
        power_cycle(board)  # a reboot mid-bootstrap: same secret, it waits for the answer
        con.wait("resuming with the stored secret", mark)
        assert read_doc(flash, "boot")["secret"] == secret
        assert "request sent" not in con.text[mark:]  # no new secret published
        emu.accept(iccid)
        try:
            con.wait(r"ready: managed object (\d+)", mark, 60)
        except AssertionError:
            Path("/tmp/e2e/console.txt").write_text(con.text)
            raise AssertionError("no session:\n" + con.text[-3000:]) from None
        mo = device_mo(emu, iccid)
        assert mo
        wait_for(lambda: values(emu, mo, "c8y_Temperature", "T"), WAIT)  # main.py measures
    finally:
        con.stop()
    # the credentials, stored atomically, work; the secret is gone; nothing secret was printed
    cred = read_doc(flash, "cred")
    assert cred["id"] == iccid and cred["source"] == "bootstrap" and cred["ok"] is True
    assert read_doc(flash, "boot") is None
    assert secret not in con.text and cred["password"] not in con.text
    # seed 002's self-creation: one device, its external ID, hardware, mobile, operations
    _, dev = api(emu, "GET", "/inventory/managedObjects/" + mo)
    assert dev["name"] == "e2e agent " + iccid and "c8y_IsDevice" in dev
    assert dev["c8y_Mobile"] == {"iccid": iccid, "imsi": IMSI}
    assert dev["c8y_Hardware"] == {"serialNumber": iccid, "model": board_file}
    assert dev["c8y_Firmware"]["version"] == "0.1.0"
    # the log ring (and with it c8y_LogfileRequest) only where the heap has room: not on the
    # ESP32 model (log_ring null: 2048 B over 100 KB free at start)
    logs = board_files.load(board_file).heap_budget > 100_000
    assert dev["c8y_SupportedOperations"] == [
        "c8y_Command", "c8y_Configuration", "c8y_Firmware", *(["c8y_LogfileRequest"] * logs),
        "c8y_Restart", "c8y_SendConfiguration", "c8y_SoftwareUpdate"]
    assert dev["c8y_SupportedLogs"] == (["agent"] if logs else [])
    assert dev["c8y_RequiredAvailability"] == {"responseInterval": 10}
    _, found = api(emu, "GET", "/inventory/managedObjects?fragmentType=c8y_IsDevice&pageSize=100")
    assert [d["id"] for d in found["managedObjects"] if d["name"].endswith(iccid)] == [mo]
    assert emu.engine.collection(XID) is not None  # registered by the device
    assert read_doc(flash, "dev")["mo"] == mo


AGENT = r"""
import json
from microcot.agent import Agent
a = Agent()
out = {}
"""


def test_second_boot_reuses_the_device_and_the_templates(emu, board, iccid):
    res = run_script(board, AGENT + r"""
ok = a.run(until=lambda: a.ready, seconds=30)
print('RESULT', json.dumps({'ok': ok, 'mo': a.mo, 'stats': a.stats}))
a.close()
""")
    assert res["ok"], res["log"][-2000:]
    assert res["mo"] == device_mo(emu, iccid)
    assert res["stats"]["templates"] == "found" and res["stats"]["created"] is False
    _, found = api(emu, "GET", "/inventory/managedObjects?fragmentType=c8y_IsDevice&pageSize=100")
    assert len([d for d in found["managedObjects"] if d["name"].endswith(iccid)]) == 1


def test_data_children_operations_and_tenant(emu, board, iccid, puts):
    mo = device_mo(emu, iccid)
    created: dict[str, str] = {}

    def on_line(line: str) -> None:
        m = re.match(r"READY (\d+)", line)
        if m and not created:
            kid = m.group(1)
            created["echo"] = emu.create_operation(mo, {"c8y_Command": {"text": "echo hi there"}})["id"]
            created["bad"] = emu.create_operation(mo, {"c8y_Command": {"text": "rm -rf /"}})["id"]
            created["kid"] = emu.create_operation(kid, {"c8y_Restart": {}})["id"]

    res = run_script(board, AGENT + r"""
got = []
a.command('echo', lambda args: args)
a.child('kid', handler=lambda op: got.append([op.child, op.rtid, op.id]), operations=['c8y_Restart'])
errors = []
a.on_error = lambda code, line, text: errors.append(code)
a.run(until=lambda: a.ready, seconds=30)
a.query_tenant()
for v in (21.5, 22.5, 23.5):
    a.measure('c8y_Temperature', 'T', v, 'C')
a.event('mc_Door', 'opened, "left"')
a.alarm('mc_Hot', 'too hot', 'MAJOR')
a.alarm('mc_Cold', 'too cold', 'MINOR')
a.measure('mc_Kid', 'x', 1, 'u', source='kid')
a.run(until=lambda: len(a.alarms) >= 2 and a.tenant and not len(a.q), seconds=20)
a.alarm_status('mc_Hot', 'ACKNOWLEDGED')
a.alarm_status('mc_Cold', 'CLEARED')
a.run(until=lambda: not len(a.q), seconds=10)
print('READY', a.s.kids['kid'][2])
a.run(until=lambda: a.stats['ops'] >= 3 and not a.s.st and not a._c.pending(), seconds=30)
a.run(seconds=1)
print('RESULT', json.dumps({'tenant': a.tenant, 'got': got, 'errors': errors,
                            'stats': a.stats, 'kid': a.s.kids['kid'][2]}))
a.close()
""", timeout=90, on_line=on_line)
    log = res["log"]
    assert res["tenant"] == "t-emulator", log[-2000:]
    kid = res["kid"]
    # binary SmartREST on bs/<ID> (a per-device setting): measurements, an alarm, and the
    # platform's error answer on br/ reaching on_error
    bres = run_script(board, r"""
import json
from microcot.agent import Agent
a = Agent(binary=True)
errors = []
a.on_error = lambda code, line, text: errors.append(code)
a.run(until=lambda: a.ready, seconds=30)
for v in (31.25, 32.5):
    a.measure('c8y_Temperature', 'T', v, 'C')
a.alarm('mc_Wet', 'wet', 'WARNING')
# a measurement of a managed object that does not exist: the platform answers 50 on br/
a.send(110, [99999999, 'mc_X', 'x', 1.0, 'u', 1700000000, 'mc_X'], source='*')
a.run(until=lambda: errors and not len(a.q) and not a._c.pending(), seconds=20)
print('RESULT', json.dumps({'errors': errors, 'binary': a.binary}))
a.close()
""", timeout=60)
    assert bres["errors"] == [50], bres["log"][-2000:]
    # measurements in text, then binary (the same series), events, alarms and their statuses
    assert values(emu, mo, "c8y_Temperature", "T")[-5:] == [21.5, 22.5, 23.5, 31.25, 32.5], log
    assert values(emu, kid, "mc_Kid", "x") == [1]
    _, ev = api(emu, "GET", f"/event/events?source={mo}&type=mc_Door")
    assert [e["text"] for e in ev["events"]] == ['opened, "left"']
    _, al = api(emu, "GET", f"/alarm/alarms?source={mo}&pageSize=100")
    st = {a["type"]: (a["status"], a["severity"]) for a in al["alarms"]}
    assert st == {"mc_Hot": ("ACKNOWLEDGED", "MAJOR"), "mc_Cold": ("CLEARED", "MINOR"),
                  "mc_Wet": ("ACTIVE", "WARNING")}
    assert res["errors"] == [], log[-2000:]
    # the child: created (no c8y_IsDevice), linked, its operations
    _, kdoc = api(emu, "GET", "/inventory/managedObjects/" + kid)
    assert "c8y_IsChildDevice" in kdoc and "c8y_IsDevice" not in kdoc
    assert kdoc["c8y_SupportedOperations"] == ["c8y_Restart"]
    _, refs = api(emu, "GET", f"/inventory/managedObjects/{mo}/childDevices")
    assert [r["managedObject"]["id"] for r in refs["references"]] == [kid]
    # operations: EXECUTING then SUCCESSFUL with the result / FAILED with the reason
    ops = {k: api(emu, "GET", "/devicecontrol/operations/" + v)[1] for k, v in created.items()}
    assert ops["echo"]["status"] == "SUCCESSFUL"
    assert ops["echo"]["c8y_Command"] == {"text": "echo hi there", "result": "hi there"}
    assert (ops["bad"]["status"], ops["bad"]["failureReason"]) == ("FAILED",
                                                                    "unknown command: rm")
    assert ops["kid"]["status"] == "SUCCESSFUL"  # the child's handler ran it
    assert res["got"] == [["kid", 203, created["kid"]]]
    for k in ("echo", "bad", "kid"):
        assert [s for i, s in puts if i == created[k]][0] == "EXECUTING"


def test_restart_operation_restarts_the_board_and_reports_after(emu, board, iccid):
    mo = device_mo(emu, iccid)
    con = Console(board.port).start()
    try:
        power_cycle(board)  # main.py again
        con.wait(r"ready: managed object")
        resets = board.hard_resets
        mark = len(con.text)
        op = emu.create_operation(mo, {"c8y_Restart": {}})
        wait_for(lambda: board.hard_resets > resets, WAIT)  # hal.reset(): the process restarts
        con.wait(r"c8y_Restart %s: back after the restart" % op["id"], mark, WAIT)
        wait_for(lambda: api(emu, "GET", "/devicecontrol/operations/" + op["id"])[1]["status"]
                 == "SUCCESSFUL", WAIT)
    finally:
        con.stop()


def test_power_cut_during_an_operation_reports_it_once_and_never_runs_it_again(emu, board, iccid,
                                                                              puts):
    """A c8y_Command whose command never ends: the power is cut while it runs (its record,
    store.py "op", on flash). main.py boots, finds the record: FAILED (c8y_Command has no resume
    rule), exactly once, and the command is not run again."""
    mo = device_mo(emu, iccid)
    hanging = threading.Event()
    result: dict = {}
    t = transport.open_board(board.port)

    ready = threading.Event()

    def out(b: bytes) -> None:
        result["out"] = result.get("out", b"") + b
        if b"READY" in result["out"]:
            ready.set()
        if b"HANGING" in result["out"]:
            hanging.set()

    def board_side() -> None:
        try:
            transport.run(t, AGENT + r"""
import time
def hang(args):
    print('HANGING')
    while True:
        time.sleep(1)
a.command('hang', hang)
a.run(until=lambda: a.ready, seconds=30)
print('READY')
a.run(seconds=60)
""", timeout=90, on_output=out)
        except BaseException as e:  # noqa: BLE001 - the power cut ends it
            result["error"] = e

    worker = threading.Thread(target=board_side, daemon=True)
    worker.start()
    con = Console(board.port)
    try:
        assert ready.wait(WAIT), result
        op = emu.create_operation(mo, {"c8y_Command": {"text": "hang"}})
        assert hanging.wait(WAIT), result.get("out", b"")[-2000:]
        rec = read_doc(board.flash_dir, "op")
        assert rec["id"] == op["id"] and rec["kind"] == "c8y_Command", rec
        with contextlib.suppress(Exception):
            t.close()  # the script's transport lets go of the port (the script runs on)
        con.start()
        board.power_cut()  # main.py boots
        worker.join(30)
        con.wait(r"c8y_Command %s: back after the restart, FAILED" % op["id"], 0, WAIT)
        con.wait(r"ready: managed object", 0, WAIT)
        done = api(emu, "GET", "/devicecontrol/operations/" + op["id"])[1]
        assert done["status"] == "FAILED"
        assert done["failureReason"] == "interrupted by a reboot (stage run)"
        time.sleep(2.0)  # a redelivery, if any, would have run by now
        assert [s for i, s in puts if i == op["id"]] == ["EXECUTING", "FAILED"]
        assert read_doc(board.flash_dir, "op") is None
        assert "HANGING" not in con.text
    finally:
        con.stop()
        with contextlib.suppress(Exception):
            t.close()


def test_offline_queue_across_a_broker_outage(emu, board, iccid):
    mo = device_mo(emu, iccid)
    ready = threading.Event()
    result: dict = {}

    def on_line(line: str) -> None:
        if line == "READY":
            ready.set()

    def board_side() -> None:
        try:
            result.update(run_script(board, AGENT + r"""
a.run(until=lambda: a.ready, seconds=30)
print('READY')
for i in range(40):
    a.measure('mc_Seq', 'n', i, '')
    a.run(seconds=0.15)
a.run(until=lambda: a.ready and not len(a.q) and not a._c.pending(), seconds=30)
print('RESULT', json.dumps({'stats': a.stats, 'left': len(a.q)}))
a.close()
""", timeout=90, on_line=on_line))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = e

    worker = threading.Thread(target=board_side)
    worker.start()
    try:
        assert ready.wait(WAIT)
        time.sleep(1.0)
        emu.broker.stop()  # on this thread: Mosquitto ends with the thread that started it
        time.sleep(3.0)
        emu.broker.start()
    finally:
        worker.join(120)
    assert "error" not in result, result.get("error")
    assert result["left"] == 0, result["log"][-2000:]
    assert "connection:" in result["log"]  # it did lose the link
    # every one arrives (the connector may take a moment to reconnect to the broker itself)
    got = wait_for(lambda: (lambda g: g if sorted(set(g)) == list(range(40)) else None)(
        values(emu, mo, "mc_Seq", "n")), WAIT)
    first = [got.index(i) for i in range(40)]
    assert first == sorted(first)  # in order (QoS 1 may repeat one, with the same value)


def test_full_queue_drops_the_oldest_and_reports_how_many(emu, board, iccid):
    mo = device_mo(emu, iccid)
    res = run_script(board, r"""
import json
from microcot.agent import Agent
a = Agent(queue=[2, 3])  # 2 rows in memory, 3 on flash: room for 5
for i in range(12):  # before the first connect: offline
    a.measure('mc_Drop', 'n', i, '')
dropped = a.q.dropped
a.run(until=lambda: a.ready and not len(a.q) and not a._c.pending(), seconds=30)
print('RESULT', json.dumps({'dropped': dropped}))
a.close()
""")
    assert res["dropped"] == 7, res["log"][-2000:]
    wait_for(lambda: values(emu, mo, "mc_Drop", "n") == [7, 8, 9, 10, 11])  # the newest five

    def overflow():
        _, ev = api(emu, "GET", f"/event/events?source={mo}&type=mc_QueueOverflow")
        return [e["text"] for e in ev["events"]]

    assert wait_for(overflow) == ["7 queued messages were dropped while offline"]


def test_deleted_credentials_rebootstrap_with_the_same_device(emu, board, iccid):
    mo = device_mo(emu, iccid)
    old = read_doc(board.flash_dir, "cred")["password"]
    emu.connector.auto_accept = True
    con = Console(board.port).start()
    try:
        power_cycle(board)
        con.wait(r"ready: managed object")
        mark = len(con.text)
        status, _ = api(emu, "DELETE", "/devicecontrol/deviceCredentials/" + iccid)
        assert status == 204
        con.wait(r"refused \(CONNACK 5\)", mark)
        con.wait(r"ready: managed object %s" % mo, mark, 60)
        n = len(values(emu, mo, "c8y_Temperature", "T"))
        wait_for(lambda: len(values(emu, mo, "c8y_Temperature", "T")) > n, WAIT)
    finally:
        con.stop()
        emu.connector.auto_accept = False
    cred = read_doc(board.flash_dir, "cred")
    assert cred["password"] != old and cred["ok"] is True
    assert device_mo(emu, iccid) == mo
