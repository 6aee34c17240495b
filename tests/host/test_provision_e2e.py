"""Seed 002's mass registration end to end, on eight virtual boards and the platform emulator.

1. Eight bare virtual boards, each with its own SIM (a distinct, Luhn-valid ICCID), are
   provisioned in parallel by `microcot provision --port ... --out fleet.csv` (microcot is
   deployed on the way, since it is missing).
2. fleet.csv is uploaded to the emulator's bulk registration (REST, multipart, as Cumulocity's UI
   does it).
3. The example application and its settings go onto every board; the settings name no bootstrap
   user, so a device that tried to bootstrap would fail instead.
4. Every board is switched off and on: main.py runs the agent, which connects with the
   provisioned credentials (user = its ICCID), creates itself and sends a measurement.
5. The emulator's REST API shows eight devices whose external IDs are the ICCIDs, each with a
   measurement, and every board's credentials are the provisioned ones, now accepted ("ok").
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import serial
from click.testing import CliRunner
from emulator_fixtures import multipart, new_iccid, rest

from microcot_host import deploy, fleetcsv
from microcot_host.emulator import Emulator
from microcot_host.provision_cli import provision as provision_cli
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(150)

N = 8
# the agent's heap after the power cycle: MICROCOT_AGENT_HEAP as in test_agent_e2e.py; unset, the
# unix port's default (the agent does not fit the virtual board file's budget yet)
HEAP = os.environ.get("MICROCOT_AGENT_HEAP") or None
ONLINE_S = 60  # all eight connected, created and measured (they share the CPU with the broker)


@pytest.fixture
def emu(tmp_path: Path):
    with Emulator(tmp_path / "emu") as e:
        yield e


def parallel(fn, items):
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


class Console:
    """What a running board prints (main.py's agent log), read without interrupting it: the
    evidence when a device does not show up."""

    def __init__(self, vb: VirtualBoard) -> None:
        self.name = vb.name
        self.text = bytearray()
        self._ser = serial.Serial(vb.port, 115200, timeout=0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                self.text += self._ser.read(4096)
            except (OSError, serial.SerialException):
                return

    def close(self) -> str:
        self._stop = True
        self._thread.join(2)
        self._ser.close()
        return f"--- {self.name}\n" + self.text.decode(errors="replace")[-3000:]


def stored(vb: VirtualBoard, name: str) -> dict | None:
    best = None
    for slot in ("a", "b"):
        p = vb.flash_dir / "store" / f"{name}.{slot}"
        if p.exists():
            head, body = p.read_bytes().split(b"\n", 1)
            try:
                doc = json.loads(body)
            except ValueError:  # being replaced right now
                continue
            seq = int(head.split()[2])
            if best is None or seq > best[0]:
                best = (seq, doc)
    return best[1] if best else None


def test_eight_boards_provisioned_registered_and_online(tmp_path: Path, emu: Emulator) -> None:
    conn = emu.connection
    iccids = [new_iccid() for _ in range(N)]
    assert len(set(iccids)) == N
    boards = parallel(lambda i: VirtualBoard(f"e2e-prov-{i}", iccid=iccids[i],
                                             flash_dir=tmp_path / f"flash{i}").start(), range(N))
    try:
        # 1. provisioning, all boards at once
        out = tmp_path / "fleet.csv"
        args = ["--out", str(out), "--ledger", str(tmp_path / "ledger" / "p.db"), "--json",
                "--name-template", "Kessel {id}"]
        for vb in boards:
            args += ["--port", vb.port]
        t0 = time.monotonic()
        r = CliRunner().invoke(provision_cli, args, catch_exceptions=False)
        took = time.monotonic() - t0
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)["boards"]
        assert [(b["result"], b["device_id"], b["deployed"]) for b in res] == [
            ("written", i, True) for i in iccids]
        assert took < 45, f"provisioning 8 boards took {took:.1f} s"
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        parsed = fleetcsv.parse(out.read_text(), check_weak=True)
        assert parsed.ok, parsed.messages()
        assert sorted(row.iccid for row in parsed.rows) == sorted(iccids)
        passwords = {row.iccid: row.credentials for row in parsed.rows}
        for vb in boards:
            assert stored(vb, "cred") == {"id": vb.iccid, "password": passwords[vb.iccid],
                                          "source": "provisioned", "ok": False}

        # 2. the bulk registration
        status, body = rest(conn, "POST", "/devicecontrol/bulkNewDeviceRequests",
                            *multipart("fleet.csv", out.read_bytes()))
        assert status == 201, body
        assert (body["numberOfAll"], body["numberOfCreated"], body["numberOfFailed"]) == (N, N, 0)

        # 3. the application, with settings that allow no bootstrap
        settings = {"host": conn["mqtt_host"], "port": conn["mqtt_port"], "tls": True,
                    "ca": Path(conn["ca_cert"]).read_text(), "bootstrap_user": None,
                    "bootstrap_password": None, "interval": 2, "backoff": [1, 4],
                    "timeout": 20}
        parallel(lambda vb: deploy.deploy(vb.port, board="virtual", app=True, config=settings),
                 boards)

        # 4. off and on again: main.py starts the agent
        def power_cycle(vb: VirtualBoard) -> VirtualBoard:
            vb.stop()
            return VirtualBoard(vb.name, iccid=vb.iccid, flash_dir=vb.flash_dir,
                                heap=HEAP).start()

        boards[:] = parallel(power_cycle, boards)
        consoles = [Console(vb) for vb in boards]

        # 5. the platform's view
        deadline = time.monotonic() + ONLINE_S
        found: dict[str, str] = {}
        measured: dict[str, int] = {}
        while time.monotonic() < deadline and len(measured) < N:
            for i in iccids:
                if i not in found:
                    st, ext = rest(conn, "GET", f"/identity/externalIds/c8y_Serial/{i}")
                    if st == 200:
                        found[i] = ext["managedObject"]["id"]
                if i in found and i not in measured:
                    st, ms = rest(conn, "GET", f"/measurement/measurements?source={found[i]}"
                                               "&pageSize=5")
                    if st == 200 and ms["measurements"]:
                        measured[i] = len(ms["measurements"])
            time.sleep(0.5)
        if len(measured) < N:
            logs = "\n".join(c.close() for c in consoles)
            for pw in passwords.values():
                logs = logs.replace(pw, "***")
            pytest.fail(f"after {ONLINE_S} s: {len(found)} of {N} devices created, "
                        f"{len(measured)} with a measurement; the boards said:\n{logs}")
        for c in consoles:
            c.close()
        for i, mo in found.items():
            st, dev = rest(conn, "GET", f"/inventory/managedObjects/{mo}")
            assert st == 200 and "c8y_IsDevice" in dev and dev["name"] == f"microcot {i}"
            st, ms = rest(conn, "GET", f"/measurement/measurements?source={mo}&pageSize=1")
            assert "c8y_Temperature" in ms["measurements"][0]

        # no bootstrap: the requests are the bulk registration's, the credentials the provisioned
        for vb in boards:
            cred = stored(vb, "cred")
            assert cred is not None and cred["source"] == "provisioned"
            assert cred["password"] == passwords[vb.iccid] and cred["ok"] is True
            st, req = rest(conn, "GET", f"/devicecontrol/newDeviceRequests/{vb.iccid}")
            assert st == 200 and req["status"] == "ACCEPTED"
            assert "microcot_BulkRegistration" in req
        assert passwords and not any(pw in r.output for pw in passwords.values())
    finally:
        for vb in boards:
            vb.stop()
