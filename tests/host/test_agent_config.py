"""c8y_SendConfiguration and c8y_Configuration end to end: the real /main.py on a virtual board
(the ESP32 model at its board file's budget) against the platform emulator. The device reports
/microcot.json with its secrets masked; a configuration sent back with a changed key restarts the
board and is SUCCESSFUL after the reboot, the masked secret kept on the flash; a bad one FAILS
naming the key and leaves the file as it was. The tests build on each other in file order."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
from pathlib import Path

import pytest
import serial
from emulator_fixtures import new_iccid, wait_for
from fidelity_fixtures import need_runtime

from microcot_host import boards as board_files
from microcot_host import deploy
from microcot_host.emulator import Emulator
from microcot_host.vboard.models import make_board

pytestmark = pytest.mark.timeout(240)

BOARD = "esp32-generic"
WAIT = 60.0
MASK = "********"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """The board's serial output while main.py runs (a thread reads it)."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.text = ""
        self._ser = serial.Serial(port, timeout=0.1)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                b = self._ser.read(4096)
            except (serial.SerialException, OSError, TypeError):
                return
            if b:
                self.text += b.decode(errors="replace").replace("\r", "")

    def wait(self, pattern: str, after: int = 0, timeout: float = WAIT) -> re.Match:
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.text, after), timeout)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)
        self._ser.close()


def power_cycle(vb) -> None:
    """A power cut: the interpreter is killed, the board starts again (and runs main.py)."""
    pid = vb.child_pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: vb.child_pid not in (None, pid), 10)


def api(emu, method: str, target: str, body=None):
    r = emu.api.handle(method, target, body)
    return r.status, r.body


def op_done(emu, oid: str) -> dict | None:
    _, body = api(emu, "GET", "/devicecontrol/operations/" + oid)
    return body if body.get("status") in ("SUCCESSFUL", "FAILED") else None


def reported(emu, mo: str) -> str | None:
    _, body = api(emu, "GET", "/inventory/managedObjects/" + mo)
    return (body.get("c8y_Configuration") or {}).get("config")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), mqtt_port=_free_port(), auto_accept=True) as e:
        yield e


@pytest.fixture(scope="module")
def device(emu, tmp_path_factory):
    """The board with main.py running, bootstrapped and ready: (board, console, MO id, the
    settings deployed)."""
    need_runtime(board_files.load(BOARD).runtime)
    c = emu.connection
    config = {
        "host": "localhost", "port": c["mqtt_port"], "ca": Path(c["ca_cert"]).read_text(),
        "bootstrap_user": c["bootstrap_user"], "bootstrap_password": c["bootstrap_password"],
        "bootstrap_delay": [0, 0.5], "backoff": [0.5, 3], "keepalive": 10, "timeout": 10,
        "interval": 5, "name": "config agent {id}",
    }
    flash = tmp_path_factory.mktemp("flash")
    vb = make_board(BOARD, name="conf-deploy", heap="1m", flash_dir=flash).start()
    try:
        deploy.deploy(vb.port, board=BOARD, app=True, config=config)
    finally:
        vb.stop()
    main = (flash / "main.py").read_bytes()
    (flash / "main.py").unlink()
    iccid = new_iccid()
    vb = make_board(BOARD, name="conf-e2e", iccid=iccid, flash_dir=flash).start()
    con = Console(vb.port)
    try:
        (flash / "main.py").write_bytes(main)
        power_cycle(vb)  # boot 1 reads the ID, boot 2 bootstraps, boot 3 connects
        try:
            con.wait(r"ready: managed object", 0, 90)
        except AssertionError:
            raise AssertionError("no session:\n" + con.text[-3000:]) from None
        _, ext = api(emu, "GET", "/identity/externalIds/c8y_Serial/" + iccid)
        yield vb, con, ext["managedObject"]["id"], config
    finally:
        con.stop()
        vb.stop()


def on_flash(vb) -> dict:
    return json.loads((vb.flash_dir / "microcot.json").read_text())


def test_send_configuration_reports_the_file_with_secrets_masked(emu, device):
    vb, con, mo, config = device
    op = emu.create_operation(mo, {"c8y_SendConfiguration": {}})
    done = wait_for(lambda: op_done(emu, op["id"]), WAIT)
    assert done["status"] == "SUCCESSFUL", (done.get("failureReason"), con.text[-2000:])
    text = reported(emu, mo)
    assert text and config["bootstrap_password"] not in text
    # the file's keys only; the CA's PEM text abbreviated
    assert json.loads(text) == dict(config, bootstrap_password=MASK, ca="<PEM text>")
    assert config["bootstrap_password"] not in con.text


def test_a_changed_key_restarts_the_board_and_succeeds_after(emu, device):
    vb, con, mo, config = device
    sent = json.loads(reported(emu, mo))
    sent["interval"] = 7  # main.py reads it at start-up: a restart
    resets = vb.hard_resets
    mark = len(con.text)
    _, op = api(emu, "POST", "/devicecontrol/operations",
                {"deviceId": mo, "c8y_Configuration": {"config": json.dumps(sent)}})
    wait_for(lambda: vb.hard_resets > resets, WAIT)
    con.wait(r"c8y_Configuration %s: back after the restart, SUCCESSFUL" % op["id"], mark, WAIT)
    assert "interval changed, restarting the board" in con.text[mark:]
    done = wait_for(lambda: op_done(emu, op["id"]), WAIT)
    assert done["status"] == "SUCCESSFUL", (done.get("failureReason"), con.text[-2000:])
    cfg = on_flash(vb)
    assert cfg == dict(config, interval=7)  # the masked secret and the CA kept
    assert not [p.name for p in vb.flash_dir.iterdir() if p.name.startswith("microcot.json.")]
    # the platform shows what the board has now (sent after the reboot)
    wait_for(lambda: json.loads(reported(emu, mo))["interval"] == 7, WAIT)
    assert config["bootstrap_password"] not in reported(emu, mo)


def test_a_bad_configuration_fails_naming_the_key_and_changes_nothing(emu, device):
    vb, con, mo, config = device
    before = (vb.flash_dir / "microcot.json").read_bytes()
    resets = vb.hard_resets
    sent = json.loads(reported(emu, mo))
    sent["interval"] = 9
    sent["port"] = 70000
    _, op = api(emu, "POST", "/devicecontrol/operations",
                {"deviceId": mo, "c8y_Configuration": {"config": json.dumps(sent)}})
    done = wait_for(lambda: op_done(emu, op["id"]), WAIT)
    assert done["status"] == "FAILED"
    assert done["failureReason"] == "port: expected a whole number from 1 to 65535"
    assert (vb.flash_dir / "microcot.json").read_bytes() == before
    assert vb.hard_resets == resets
