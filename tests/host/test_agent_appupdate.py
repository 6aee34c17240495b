"""c8y_SoftwareUpdate end to end: the agent (the real main.py and /boot.py on the ESP32 model, a
virtual board of the i386-esp32 build; its heap: HEAP below) gets the operation from the emulator,
downloads the bundle (`microcot app bundle`'s tar) in a boot of its own over HTTPS from the
emulator's binaries with its own credentials, unpacks it into /app.new, resets; boot.py switches
the files and starts the trial; the new application's agent connects and confirms it: SUCCESSFUL, and the new main.py runs (it
answers a command the old one did not have). A new application whose main.py crashes at import
(the board waits in the REPL) is hard-reset at the app_trial deadline by the timer boot.py armed
(the virtual board has no machine.Timer: a _thread stands in), rolled back by boot.py at the next
boot, and the old application reports FAILED with the reason; its added file is gone. A wrong
SHA-256 and a "delete" action fail without touching the application.

The tests build on each other in file order (one board, one emulator)."""

from __future__ import annotations

import hashlib
import os

import pytest
from agent_fixtures import _free_port, api, live_board, operation, read_doc, wait_operation
from emulator_fixtures import new_iccid
from fidelity_fixtures import need_runtime

from microcot_host import boards as board_files
from microcot_host.appbundle import make_bundle
from microcot_host.emulator import Emulator
from microcot_host.paths import firmware_dir

pytestmark = pytest.mark.timeout(240)

# seconds a new application gets to connect: long enough for a loaded CI machine to connect
# a good one, short enough for the test's runtime
TRIAL = 12
# The interpreter's heap: at esp32-generic's budget (88,000 B free after boot) the download, in
# its boot of its own, fits; the new application's first boot then does not connect (MemoryError
# at 1.7 KB, every attempt until app_trial: boot.py's trial timer, a _thread on the virtual
# board, and the switch leave too little) and is rolled back (measured). 125k passes; the Pico W
# model passes at its own budget (the demo). MICROCOT_APPUPDATE_HEAP overrides ("" = the budget).
HEAP = os.environ.get("MICROCOT_APPUPDATE_HEAP", "125k") or None

MAIN = (firmware_dir() / "main.py").read_text()
# version 2: the example application with one more command, its version from an added module
MAIN2 = MAIN.replace('    a.command("echo", lambda args: args)\n',
                     '    a.command("echo", lambda args: args)\n'
                     '    import appinfo\n\n'
                     '    a.command("appversion", lambda args: appinfo.VERSION)\n')
assert MAIN2 != MAIN


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), mqtt_port=_free_port()) as e:
        yield e


@pytest.fixture(scope="module")
def esp(emu, tmp_path_factory):
    need_runtime(board_files.load("esp32-generic").runtime)
    b = live_board(emu, "esp32-generic", tmp_path_factory.mktemp("flash"), new_iccid(),
                   "agent-app", heap=HEAP, xid="mcAgentApp1", app_trial=TRIAL)
    yield b
    b.stop()


def software(emu, name: str, version: str, files: list[tuple[str, bytes]],
             sha: str | None = None, action: str = "install") -> list[dict]:
    data = make_bundle(files)
    mo = emu.upload_binary(f"{name}-{version}.tar", data)
    url = f"{emu.connection['https_url']}/inventory/binaries/{mo['id']}"
    return [{"name": name, "version": version, "url": url, "action": action,
             "sha256": sha or hashlib.sha256(data).hexdigest()}]


def command(emu, mo: str, text: str) -> dict:
    return wait_operation(emu, operation(emu, mo, c8y_Command={"text": text}), 60)


def test_boot_py_is_deployed_and_nothing_is_pending(esp):
    assert (esp.flash / "boot.py").read_bytes() == (firmware_dir() / "boot.py").read_bytes()
    assert not (esp.flash / "app.new").exists() and not (esp.flash / "app.old").exists()


def test_install_switches_confirms_and_the_new_application_runs(emu, esp):
    vb = esp.vb
    resets = vb.hard_resets
    mark = len(esp.con.text)
    files = [("main.py", MAIN2.encode()), ("appinfo.py", b'VERSION = "2"\n')]
    op = operation(emu, esp.mo, c8y_SoftwareUpdate=software(emu, "app", "2", files))
    done = wait_operation(emu, op, 90)
    assert done["status"] == "SUCCESSFUL", (done.get("failureReason"), esp.con.text[mark:])
    assert vb.hard_resets == resets + 1
    con = esp.con  # the console's reader may be a line behind the platform
    con.wait(f"c8y_SoftwareUpdate {op}: app 2, 2 files", mark)
    con.wait("appswitch: switched to app 2, on trial for %d s" % TRIAL, mark)
    con.wait(f"c8y_SoftwareUpdate {op}: new application app 2 confirmed", mark)
    flash = esp.flash
    assert (flash / "main.py").read_text() == MAIN2
    assert not (flash / "app.new").exists() and not (flash / "app.old").exists()
    assert read_doc(flash, "app") == {"state": "ok", "name": "app", "version": "2", "op": op}
    res = command(emu, esp.mo, "appversion")  # only the new main.py has it
    assert res["status"] == "SUCCESSFUL" and res["c8y_Command"]["result"] == "2", res


def test_wrong_sha256_and_delete_fail_and_leave_the_application_alone(emu, esp):
    resets = esp.vb.hard_resets
    bad = software(emu, "app", "9", [("main.py", b"raise SystemExit\n")], sha="0" * 64)
    done = wait_operation(emu, operation(emu, esp.mo, c8y_SoftwareUpdate=bad), 60)
    assert done["status"] == "FAILED" and "SHA-256 mismatch" in done["failureReason"], done
    gone = software(emu, "app", "2", [("x.txt", b"")], action="delete")
    done = wait_operation(emu, operation(emu, esp.mo, c8y_SoftwareUpdate=gone), 60)
    assert done["status"] == "FAILED" and "action 'delete' is not supported" in \
        done["failureReason"], done
    assert esp.vb.hard_resets == resets
    assert (esp.flash / "main.py").read_text() == MAIN2
    assert not (esp.flash / "app.new").exists()
    assert read_doc(esp.flash, "app")["version"] == "2"


def test_a_new_application_that_never_connects_is_rolled_back_and_reported(emu, esp):
    vb = esp.vb
    resets = vb.hard_resets
    mark = len(esp.con.text)
    files = [("main.py", b"import no_such_module_here\n"), ("broken.py", b"X = 1\n")]
    op = operation(emu, esp.mo, c8y_SoftwareUpdate=software(emu, "app", "3", files))
    done = wait_operation(emu, op, 120)
    assert done["status"] == "FAILED", (done, esp.con.text[mark:][-3000:])
    assert done["failureReason"].startswith("new application app 3 rolled back: it did not "
                                            "connect"), done["failureReason"]
    # one reset into it, one by the trial's timer while the board sat in the REPL
    assert vb.hard_resets == resets + 2
    esp.con.wait("ImportError: no module named 'no_such_module_here'", mark)
    esp.con.wait("appswitch: rolling back app 3", mark)
    flash = esp.flash
    assert (flash / "main.py").read_text() == MAIN2 and not (flash / "broken.py").exists()
    assert not (flash / "app.new").exists() and not (flash / "app.old").exists()
    assert read_doc(flash, "app") == {"state": "ok", "name": "app", "version": "2"}
    res = command(emu, esp.mo, "appversion")  # version 2 runs again
    assert res["status"] == "SUCCESSFUL" and res["c8y_Command"]["result"] == "2", res
    _, dev = api(emu, "GET", "/inventory/managedObjects/" + esp.mo)
    assert "c8y_SoftwareUpdate" in dev["c8y_SupportedOperations"]
