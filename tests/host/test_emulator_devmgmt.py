"""Device management on the emulator: operations with Cumulocity's device-management fragments
(c8y_Firmware, c8y_SoftwareUpdate, c8y_Configuration, c8y_SendConfiguration, c8y_LogfileRequest)
stored, listed and rendered by SmartREST response templates; availability (c8y_RequiredAvailability
-> c8y_Availability, c8y_UnavailabilityAlarm) with a clock the tests move; and end to end over
MQTT: a device gets a firmware operation on mr/, downloads the binary over HTTPS with its own
credentials and resumes it with Range, and goes unavailable and back."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from emulator_fixtures import Device, device, new_iccid, rest, wait_for
from seed_templates import TEMPLATES

from microcot import smartrest
from microcot_host.emulator import Emulator
from microcot_host.emulator.api import Api
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.emulator.engine import Engine
from microcot_host.emulator.model import Model, iso_ms

pytestmark = pytest.mark.timeout(120)

DM_XID = "mcDM1"
# response templates for the device-management fragments (values relative to each operation)
DM_RESPONSES = [
    "11,520,$.operations,$.c8y_Firmware,$.id,$.c8y_Firmware.name,$.c8y_Firmware.version,"
    "$.c8y_Firmware.url,$.c8y_Firmware.sha256",
    "11,521,$.operations,$.c8y_SoftwareUpdate,$.id,$.c8y_SoftwareUpdate[0].name,"
    "$.c8y_SoftwareUpdate[0].version,$.c8y_SoftwareUpdate[0].url,$.c8y_SoftwareUpdate[0].action,"
    "$.c8y_SoftwareUpdate",
    "11,522,$.operations,$.c8y_Configuration,$.id,$.c8y_Configuration.config",
    "11,523,$.operations,$.c8y_SendConfiguration,$.id",
    "11,524,$.operations,$.c8y_LogfileRequest,$.id,$.c8y_LogfileRequest.logFile,"
    "$.c8y_LogfileRequest.dateFrom,$.c8y_LogfileRequest.dateTo,$.c8y_LogfileRequest.searchText,"
    "$.c8y_LogfileRequest.maximumLines",
]
DM_REG = "\n".join(["15," + DM_XID, *TEMPLATES, *DM_RESPONSES])

SOFTWARE = [{"name": "agent", "version": "2.0", "url": "https://x/agent.mpy", "action": "install"},
            {"name": "old", "version": "1.0", "url": "", "action": "delete"}]
LOGFILE = {"logFile": "syslog", "dateFrom": "2024-01-01T00:00:00.000Z",
           "dateTo": "2024-01-02T00:00:00.000Z", "searchText": "error", "maximumLines": 100}


def firmware(url: str, sha: str | None = None) -> dict[str, Any]:
    fw: dict[str, Any] = {"name": "microcot", "version": "1.4.0", "url": url}
    if sha is not None:
        fw["sha256"] = sha
    return fw


def expected_rows(op_id: str, frag: str, value: Any) -> list[Any]:
    """The row a DM_RESPONSES template renders for an operation holding {frag: value}."""
    if frag == "c8y_Firmware":
        return [520, 1, op_id, value["name"], value["version"], value["url"],
                value.get("sha256", "")]
    if frag == "c8y_SoftwareUpdate":
        first = value[0]
        return [521, 1, op_id, first["name"], first["version"], first["url"], first["action"],
                json.dumps(value, separators=(",", ":"))]
    if frag == "c8y_Configuration":
        return [522, 1, op_id, value["config"]]
    if frag == "c8y_SendConfiguration":
        return [523, 1, op_id]
    return [524, 1, op_id, value["logFile"], value["dateFrom"], value["dateTo"],
            value["searchText"], str(value["maximumLines"])]


def answer(xid: str, row: list[Any]) -> str:
    return "\n".join([smartrest.row([87, 1, xid]), smartrest.row(row)])


class Clock:
    """Unix seconds that only move when a test moves them."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def minutes(self, n: float) -> None:
        self.t += n * 60


# -- operations' fragments: REST and the engine -------------------------------------------------

FRAGMENTS = {
    "c8y_Firmware": firmware("https://emu/inventory/binaries/1", "ab" * 32),
    "c8y_SoftwareUpdate": SOFTWARE,
    "c8y_Configuration": {"config": "interval=60\nmode=a,b"},
    "c8y_SendConfiguration": {},
    "c8y_LogfileRequest": LOGFILE,
}


def test_operations_keep_and_render_the_device_management_fragments() -> None:
    api = Api(Model())
    eng = Engine(api, clock=lambda: 1_700_000_000.0)
    assert eng.process(DM_REG, "admin", bind=False).startswith(b"20,")
    mo = api.handle("POST", "/inventory/managedObjects", {"name": "d", "c8y_IsDevice": {}}).body
    ops = {}
    for frag, value in FRAGMENTS.items():
        r = api.handle("POST", "/devicecontrol/operations",
                       {"deviceId": mo["id"], "description": frag, frag: value})
        assert r.status == 201 and r.body[frag] == value, r
        ops[frag] = r.body
    for frag, value in FRAGMENTS.items():
        got = api.handle("GET", f"/devicecontrol/operations?fragmentType={frag}").body
        assert [o["id"] for o in got["operations"]] == [ops[frag]["id"]]
        assert got["operations"][0][frag] == value
        # rendered as template 500's answer: exactly the row of its own template
        out = eng.render_operation(ops[frag], xid=DM_XID).decode()
        assert out == answer(DM_XID, expected_rows(ops[frag]["id"], frag, value)), frag
    # a device's update keeps the fragment and adds to it
    op = ops["c8y_LogfileRequest"]
    done = api.handle("PUT", f"/devicecontrol/operations/{op['id']}",
                      {"status": "SUCCESSFUL",
                       "c8y_LogfileRequest": {**LOGFILE, "file": "https://x/log"}}).body
    assert done["c8y_LogfileRequest"]["file"] == "https://x/log"
    assert done["c8y_LogfileRequest"]["maximumLines"] == 100


# -- availability with a clock the test moves ---------------------------------------------------

def test_availability_status_listing_and_alarm(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    api = Api(Model(tmp_path / "p.sqlite", clock=clock))
    mo = api.handle("POST", "/inventory/managedObjects",
                    {"name": "d", "c8y_IsDevice": {},
                     "c8y_RequiredAvailability": {"responseInterval": 10}}).body
    plain = api.handle("POST", "/inventory/managedObjects", {"name": "p"}).body
    assert "c8y_Availability" not in plain

    def availability() -> dict[str, Any]:
        return api.handle("GET", f"/inventory/managedObjects/{mo['id']}").body["c8y_Availability"]

    def open_alarms() -> list[dict[str, Any]]:
        return api.handle("GET", f"/alarm/alarms?source={mo['id']}&type=c8y_UnavailabilityAlarm"
                                 "&status=ACTIVE").body["alarms"]

    # never heard of: measured from its creation, without lastMessage
    assert mo["c8y_Availability"] == {"status": "AVAILABLE"}
    clock.minutes(10.5)
    assert availability() == {"status": "UNAVAILABLE"}
    assert api.check_availability() == [mo["id"]]
    [alarm] = open_alarms()
    assert (alarm["severity"], alarm["text"]) == (
        "MAJOR", "No data received from device within required interval.")
    assert api.check_availability() == [] and open_alarms()[0]["count"] == 1  # raised once

    # it sends: available, lastMessage its time, the alarm cleared
    api.record_message(mo["id"])
    sent = iso_ms(int(clock() * 1000))
    assert availability() == {"status": "AVAILABLE", "lastMessage": sent}
    assert open_alarms() == []
    assert api.handle("GET", f"/alarm/alarms/{alarm['id']}").body["status"] == "CLEARED"
    clock.minutes(10)
    assert availability()["status"] == "AVAILABLE"  # exactly the interval: still available
    clock.minutes(0.1)
    assert availability() == {"status": "UNAVAILABLE", "lastMessage": sent}
    listed = api.handle("GET", "/inventory/managedObjects?fragmentType=c8y_RequiredAvailability"
                        ).body["managedObjects"]
    assert [m["c8y_Availability"]["status"] for m in listed] == ["UNAVAILABLE"]
    assert api.handle("GET", f"/inventory/managedObjects?ids={mo['id']},{plain['id']}"
                      ).body["managedObjects"][0]["c8y_Availability"]["status"] == "UNAVAILABLE"
    assert api.check_availability() == [mo["id"]]
    assert len(open_alarms()) == 1

    # responseInterval <= 0: maintenance, no alarm; the open alarm goes when it sends again
    api.handle("PUT", f"/inventory/managedObjects/{mo['id']}",
               {"c8y_RequiredAvailability": {"responseInterval": 0}})
    assert availability() == {"status": "MAINTENANCE", "lastMessage": sent}
    api.record_message(mo["id"])
    assert open_alarms() == []
    clock.minutes(1000)
    assert api.check_availability() == [] and open_alarms() == []
    # the last message survives a restart of the model
    api.handle("PUT", f"/inventory/managedObjects/{mo['id']}",
               {"c8y_RequiredAvailability": {"responseInterval": 2000}})
    last = availability()["lastMessage"]
    api.model.close()
    again = Api(Model(tmp_path / "p.sqlite", clock=clock))
    got = again.handle("GET", f"/inventory/managedObjects/{mo['id']}").body["c8y_Availability"]
    assert got == {"status": "AVAILABLE", "lastMessage": last}
    again.model.close()


# -- end to end: MQTT device, HTTPS download, availability --------------------------------------

@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory, clock: Clock):
    with Emulator(tmp_path_factory.mktemp("emu"), clock=clock, availability_interval=0,
                  max_binary=8 << 20) as e:
        yield e


def dm_device(emu: Emulator) -> tuple[Device, str, str]:
    """A device that registered DM_REG (once) and created itself; (device, password, MO id)."""
    conn = emu.connection
    iccid = new_iccid()
    password = emu.add_device(iccid)
    d = device(conn, iccid, password)
    if d.request("15," + DM_XID).startswith("40,"):
        assert d.request(DM_REG).startswith("20,")
    assert d.ask("100," + iccid, xid=DM_XID) == "50,2,404,Not Found"
    mo = d.ask(f"101,{iccid},dm device", xid=DM_XID).split(",")[-1]
    assert d.ask(f"102,{mo},{iccid}", xid=DM_XID) == f"87,1,{DM_XID}\n200,2,{iccid},{mo}"
    return d, password, mo


def test_firmware_operation_https_download_and_other_fragments(emu: Emulator) -> None:
    conn = emu.connection
    assert conn["https_url"].startswith("https://") and conn["https_url"] != conn["http_url"]
    d, password, mo = dm_device(emu)
    try:
        data = bytes(range(256)) * 4096  # 1 MiB "firmware"
        sha = hashlib.sha256(data).hexdigest()
        binary = emu.upload_binary("microcot-1.4.0.bin", data, type="c8y_Firmware")
        assert binary["length"] == len(data) and binary["c8y_Checksum"]["sha256"] == sha
        url = conn["https_url"] + "/inventory/binaries/" + binary["id"]

        fw = firmware(url, sha)
        op = emu.create_operation(mo, {"c8y_Firmware": fw})
        assert d.get("mr/" + d.id).decode() == answer(
            DM_XID, expected_rows(op["id"], "c8y_Firmware", fw))

        # the device fetches the URL with its own credentials, verifying the CA; drops the
        # connection after 300 kB and resumes with Range
        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        ctx = client_ssl_context(conn["ca_cert"])
        auth = {"Authorization": "Basic " + base64.b64encode(
            f"{d.id}:{password}".encode()).decode()}
        path = "/inventory/binaries/" + binary["id"]
        c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
        c.request("GET", path, headers=auth)
        r = c.getresponse()
        assert r.status == 200 and r.getheader("ETag") == f'"{sha}"'
        got = r.read(300_000)
        c.close()
        c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
        c.request("GET", path, headers={**auth, "Range": f"bytes={len(got)}-",
                                        "If-Range": f'"{sha}"'})
        r = c.getresponse()
        assert r.status == 206
        got += r.read()
        c.close()
        assert hashlib.sha256(got).hexdigest() == sha
        # ... but may not replace it
        status, _ = rest(conn, "DELETE", path, user=d.id, password=password)
        assert status == 403

        # the other fragments: REST, and the CLI's `operations create`
        from microcot_host.emulator.cli import emulator as cli_group

        res = CliRunner().invoke(cli_group, [
            "operations", "create", mo, json.dumps({"c8y_SoftwareUpdate": SOFTWARE}),
            "--data-dir", str(emu.data_dir)])
        assert res.exit_code == 0, res.output
        op_id = res.output.split()[1]
        assert d.get("mr/" + d.id).decode() == answer(
            DM_XID, expected_rows(op_id, "c8y_SoftwareUpdate", SOFTWARE))
        assert rest(conn, "GET", "/devicecontrol/operations/" + op_id)[1][
            "c8y_SoftwareUpdate"] == SOFTWARE
        for frag in ("c8y_Configuration", "c8y_SendConfiguration", "c8y_LogfileRequest"):
            status, op = rest(conn, "POST", "/devicecontrol/operations",
                              {"deviceId": mo, frag: FRAGMENTS[frag]})
            assert status == 201
            assert d.get("mr/" + d.id).decode() == answer(
                DM_XID, expected_rows(op["id"], frag, FRAGMENTS[frag])), frag
        _, listed = rest(conn, "GET", f"/devicecontrol/operations?deviceId={mo}"
                                      "&fragmentType=c8y_LogfileRequest")
        assert [o["c8y_LogfileRequest"] for o in listed["operations"]] == [LOGFILE]
        assert d.nothing("mr/" + d.id) == []
    finally:
        d.close()


def test_device_goes_unavailable_and_back(emu: Emulator, clock: Clock) -> None:
    conn = emu.connection
    d, password, mo = dm_device(emu)
    try:
        status, _ = rest(conn, "PUT", "/inventory/managedObjects/" + mo,
                         {"c8y_RequiredAvailability": {"responseInterval": 5}})
        assert status == 200

        def availability() -> dict[str, Any]:
            return rest(conn, "GET", "/inventory/managedObjects/" + mo)[1]["c8y_Availability"]

        clock.minutes(1)
        sent = iso_ms(int(clock() * 1000))
        d.ask(f"104,{mo}", xid=DM_XID)  # any message counts
        wait_for(lambda: availability().get("lastMessage") == sent)
        assert availability()["status"] == "AVAILABLE"

        clock.minutes(6)
        assert availability() == {"status": "UNAVAILABLE", "lastMessage": sent}
        assert mo in emu.check_availability()
        _, alarms = rest(conn, "GET", f"/alarm/alarms?source={mo}&status=ACTIVE")
        assert [a["type"] for a in alarms["alarms"]] == ["c8y_UnavailabilityAlarm"]

        # a REST request with the device's credentials is a message too
        status, _ = rest(conn, "GET", "/inventory/binaries", user=d.id, password=password)
        assert status == 200
        assert availability() == {"status": "AVAILABLE",
                                  "lastMessage": iso_ms(int(clock() * 1000))}
        _, alarms = rest(conn, "GET", f"/alarm/alarms?source={mo}&status=ACTIVE")
        assert alarms["alarms"] == []

        # over MQTT once more after another outage
        clock.minutes(6)
        assert mo in emu.check_availability()
        d.ask(f"104,{mo}", xid=DM_XID)
        wait_for(lambda: availability()["status"] == "AVAILABLE")
        wait_for(lambda: rest(conn, "GET", f"/alarm/alarms?source={mo}&status=ACTIVE")[1][
            "alarms"] == [])
    finally:
        d.close()
