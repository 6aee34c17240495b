"""c8y_SendConfiguration and c8y_Configuration end to end: the real /main.py on a virtual board
(the ESP32 model at its board file's budget) against the platform emulator. The device reports
/microcot.json with its secrets masked; a configuration sent back with a changed key restarts the
board and is SUCCESSFUL after the reboot, the masked secret kept on the flash; a bad one FAILS
naming the key and leaves the file as it was. The tests build on each other in file order."""

from __future__ import annotations

import json

import pytest
from agent_fixtures import _free_port, api, live_board, wait_operation
from emulator_fixtures import new_iccid, wait_for
from fidelity_fixtures import need_runtime

from microcot_host import boards as board_files
from microcot_host.emulator import Emulator

pytestmark = pytest.mark.timeout(240)

BOARD = "esp32-generic"
WAIT = 60.0
MASK = "********"


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
    b = live_board(emu, BOARD, tmp_path_factory.mktemp("flash"), new_iccid(), "conf-e2e",
                   bootstrap_delay=[0, 0.5], interval=5, name="config agent {id}")
    yield b.vb, b.con, b.mo, b.config
    b.stop()


def on_flash(vb) -> dict:
    return json.loads((vb.flash_dir / "microcot.json").read_text())


def test_send_configuration_reports_the_file_with_secrets_masked(emu, device):
    vb, con, mo, config = device
    op = emu.create_operation(mo, {"c8y_SendConfiguration": {}})
    done = wait_operation(emu, op["id"], WAIT)
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
    done = wait_operation(emu, op["id"], WAIT)
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
    done = wait_operation(emu, op["id"], WAIT)
    assert done["status"] == "FAILED"
    assert done["failureReason"] == "port: expected a whole number from 1 to 65535"
    assert (vb.flash_dir / "microcot.json").read_bytes() == before
    assert vb.hard_resets == resets
