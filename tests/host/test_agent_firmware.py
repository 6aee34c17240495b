"""c8y_Firmware end to end: the agent (main.py on an ESP32 model, a virtual board at its
board file's heap budget, with the emulated OTA partition pair and bootloader) gets the
operation from the emulator, downloads the image over HTTPS from the emulator's binaries with its
own credentials, writes it to the inactive partition, resets into it, confirms it once connected
and reports SUCCESSFUL; an image that crashes at boot is rolled back by the bootloader and
reported FAILED; a new firmware that cannot connect within app_trial is reset, rolled back and
reported FAILED; a wrong SHA-256 fails before anything is activated; a board without OTA
partitions (the Pico W model) says so.

The ESP32 runs are on the ESP32-S3 model (i386-esp32 at esp32-s3's budget, 150,000 B). At the
plain ESP32's (esp32-generic, 88,000 B) the update now fits (its download boot has 36 KB free),
but without a margin: 2 of 6 runs failed at allocations under 1 KB (measured), so CI does not
bet on it; freezing the package into the firmware (firmware/manifest.py) is what gives a plain
ESP32 room.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from agent_fixtures import (
    _free_port,
    api,
    live_board,
    operation,
    power_cycle,
    read_doc,
    wait_operation,
)
from emulator_fixtures import new_iccid, wait_for
from fidelity_fixtures import need_runtime

from microcot_host import boards as board_files
from microcot_host.emulator import Emulator
from microcot_host.vboard.board import OTA_CRASH_PROJECT, app_image

pytestmark = pytest.mark.timeout(300)

IMAGE = app_image("2.1.0", "microcot-fw", size=120 * 1024, fill=bytes(range(256)))
CRASH = app_image("9.9.9", OTA_CRASH_PROJECT, size=8192)
ESP = "esp32-s3"  # see the module's comment: the plain ESP32 (WROOM) has no room for it
TRIAL = 6  # seconds a new firmware gets to connect (app_trial)


class Clock:
    """The emulator's time: the real one plus what a test skips ahead."""

    def __init__(self) -> None:
        self.skip = 0.0

    def __call__(self) -> float:
        return time.time() + self.skip


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), mqtt_port=_free_port(), clock=Clock()) as e:
        yield e


@pytest.fixture(scope="module")
def esp(emu, tmp_path_factory):
    need_runtime(board_files.load(ESP).runtime)
    b = live_board(emu, ESP, tmp_path_factory.mktemp("flash"), new_iccid(),
                   "agent-fw", xid="mcAgentFw1", app_trial=TRIAL)
    yield b
    Path("/tmp/fwcon.txt").write_text(b.con.text)
    b.stop()


def binary_url(emu, name: str, data: bytes) -> str:
    mo = emu.upload_binary(name, data)
    return f"{emu.connection['https_url']}/inventory/binaries/{mo['id']}"


def firmware(emu, name: str, data: bytes, version: str, sha: str | None = "") -> dict:
    fw = {"name": "microcot-fw", "version": version, "url": binary_url(emu, name, data)}
    if sha is not None:
        fw["sha256"] = sha or hashlib.sha256(data).hexdigest()
    return fw


def test_firmware_update_downloads_resets_confirms_and_reports(emu, esp):
    vb = esp.vb
    resets = vb.hard_resets
    mark = len(esp.con.text)
    op = operation(emu, esp.mo, c8y_Firmware=firmware(emu, "fw-2.1.0.bin", IMAGE, "2.1.0"))
    done = wait_operation(emu, op, 90)
    assert done["status"] == "SUCCESSFUL", (done.get("failureReason"), esp.con.text[-4000:])
    assert vb.hard_resets == resets + 1  # one reset, into the new partition
    log = esp.con.text[mark:]
    assert f"c8y_Firmware {op}: {len(IMAGE)} bytes in ota_1, image microcot-fw 2.1.0" in log
    assert (vb.ota_dir / "ota_1.bin").read_bytes()[:len(IMAGE)] == IMAGE
    # the inventory names the new firmware; the record is gone
    wait_for(lambda: api(emu, "GET", "/inventory/managedObjects/" + esp.mo)[1]
             .get("c8y_Firmware", {}).get("version") == "2.1.0", 30)
    fw = api(emu, "GET", "/inventory/managedObjects/" + esp.mo)[1]["c8y_Firmware"]
    assert fw["name"] == "microcot-fw" and fw["url"].endswith("/inventory/binaries/" +
                                                            fw["url"].rsplit("/", 1)[1])
    assert read_doc(esp.flash, "op") is None
    # confirmed: another reset keeps it (no rollback)
    mark = len(esp.con.text)
    rollbacks = vb.ota_rollbacks
    power_cycle(vb)
    esp.con.wait(r"ready: managed object", mark, 60)
    assert vb.ota_rollbacks == rollbacks and vb.ota_running == "ota_1"


def test_an_image_that_crashes_at_boot_is_rolled_back_and_reported_failed(emu, esp):
    vb = esp.vb
    before = vb.ota_running
    rollbacks = vb.ota_rollbacks
    op = operation(emu, esp.mo, c8y_Firmware=firmware(emu, "crash.bin", CRASH, "9.9.9"))
    done = wait_operation(emu, op, 90)
    assert done["status"] == "FAILED", done
    assert "did not come up: the bootloader rolled back to " + before in done["failureReason"]
    assert vb.ota_rollbacks == rollbacks + 1 and vb.ota_running == before


def test_a_firmware_that_does_not_connect_in_time_is_rolled_back(emu, esp):
    """The broker is away after the reset into the new firmware: the agent resets the board
    after app_trial seconds, the bootloader boots the previous firmware (never confirmed), and
    that one reports FAILED once the broker is back."""
    vb = esp.vb
    before = vb.ota_running
    mark = len(esp.con.text)
    op = operation(emu, esp.mo, c8y_Firmware=firmware(emu, "fw-3.bin", IMAGE, "3.0.0"))
    esp.con.wait(f"c8y_Firmware {op}: resetting into", mark, 60)
    emu.broker.stop()
    try:
        esp.con.wait("no connection within app_trial of an update", mark, 60)
    finally:
        emu.broker.start()
    done = wait_operation(emu, op, 90)
    assert done["status"] == "FAILED", done
    assert "rolled back to " + before in done["failureReason"]
    assert vb.ota_running == before


def test_a_wrong_sha256_fails_before_anything_is_activated(emu, esp):
    vb = esp.vb
    boot = vb.ota_running
    resets = vb.hard_resets
    op = operation(emu, esp.mo, c8y_Firmware=firmware(emu, "bad.bin", IMAGE, "4.0", "00" * 32))
    done = wait_operation(emu, op, 60)
    assert done["status"] == "FAILED" and "SHA-256" in done["failureReason"], done
    assert vb.hard_resets == resets and vb.ota_running == boot


def test_a_board_without_ota_partitions_says_so(emu, tmp_path):
    need_runtime(board_files.load("rp2-pico-w").runtime)
    b = live_board(emu, "rp2-pico-w", tmp_path / "flash", new_iccid(), "agent-fw-rp2",
                   xid="mcAgentFw1")
    try:
        op = operation(emu, b.mo, c8y_Firmware=firmware(emu, "fw.bin", IMAGE, "2.1.0"))
        done = wait_operation(emu, op, 60)
        assert done["status"] == "FAILED", done
        assert "no OTA partitions" in done["failureReason"], done
    finally:
        b.stop()


def test_availability_from_the_agents_required_interval(emu, esp):
    """The agent sent c8y_RequiredAvailability (cfg "availability", 10 minutes) at its
    self-creation; 11 minutes without a message make the device UNAVAILABLE with the platform's
    alarm, and its next measurement (main.py measures every second) makes it AVAILABLE again."""
    mo = api(emu, "GET", "/inventory/managedObjects/" + esp.mo)[1]
    assert mo["c8y_RequiredAvailability"] == {"responseInterval": 10}
    emu.broker.stop()  # nothing reaches the platform while its clock moves on
    try:
        emu.clock.skip += 11 * 60
        assert esp.mo in emu.check_availability()
        mo = api(emu, "GET", "/inventory/managedObjects/" + esp.mo)[1]
        assert mo["c8y_Availability"]["status"] == "UNAVAILABLE"
        _, alarms = api(emu, "GET", f"/alarm/alarms?source={esp.mo}&type=c8y_UnavailabilityAlarm")
        assert [a["status"] for a in alarms["alarms"]] == ["ACTIVE"]
    finally:
        emu.broker.start()
    wait_for(lambda: api(emu, "GET", "/inventory/managedObjects/" + esp.mo)[1]
             .get("c8y_Availability", {}).get("status") == "AVAILABLE", 60)
