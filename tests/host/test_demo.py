"""`microcot demo`, the README's main command, as a user runs it: a subprocess.

Every process the demo starts (Mosquitto, the MicroPython interpreter) inherits a marker in its
environment; after the demo ended, /proc must hold no process with that marker, whether the demo
passed or was interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from fidelity_fixtures import need_runtime

from microcot_host import demo as demo_mod

pytestmark = pytest.mark.timeout(180)

STEPS = [
    "start the platform emulator",
    "start a virtual board",
    "deploy firmware, app and settings",
    "boot: the agent reads its ID",
    "bootstrap: device request",
    "bootstrap: credentials",
    "template collection registered",
    "self-creation: managed object",
    "self-creation: external ID",
    "self-creation: device info",
    "measurements (text SmartREST)",
    'operation c8y_Command "uptime"',
    "update",  # the board's kind of update (UPDATE)
    "binary mode: an alarm, 3 values",
    "alarm",
    "measurements (binary SmartREST)",
]


# a firmware image into the other OTA partition on an ESP32 model, an application bundle elsewhere
UPDATE = {"esp32": "firmware update (c8y_Firmware)"}
OTHER_UPDATE = "application update (c8y_SoftwareUpdate)"


def marked(marker: str) -> list[str]:
    """Processes whose environment holds the marker: (pid, command) of each."""
    found = []
    needle = f"MICROCOT_DEMO_TEST={marker}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours
            continue
        if needle in env.split(b"\0"):
            found.append(f"{d.name} {cmd[:120]}")
    return found


def start_demo(marker: str, *args: str, tmpdir: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ if env is None else env, MICROCOT_DEMO_TEST=marker)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.Popen([sys.executable, "-m", "microcot_host", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def no_leftovers(marker: str) -> None:
    deadline = time.monotonic() + 5
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left running: {left}"


def passwords(tmp: Path) -> list[str]:
    """The passwords of the demo running under tmp: the emulator's admin and bootstrap user's
    (its secrets file) and the device's (the board's stored credentials)."""
    found = []
    for f in tmp.glob("microcot-demo-*/emulator/emulator-secrets.json"):
        found += [v for v in json.loads(f.read_text()).values() if isinstance(v, str)]
    for f in tmp.glob("microcot-demo-*/flash/store/cred.[ab]"):
        found.append(json.loads(f.read_bytes().split(b"\n", 1)[1])["password"])
    return found


@pytest.mark.parametrize("board", [None, "rp2-pico-w", "no-models"])
def test_demo_runs_end_to_end(tmp_path: Path, board: str | None) -> None:
    """The README's main command (an ESP32 on its 32-bit model at its budget), the same job on
    the Pico W's model (mbedTLS in the GC heap), and on a machine without the faithful builds
    (the 64-bit developer board, saying so)."""
    from microcot_host import boards

    env = None
    if board == "no-models":
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICROCOT_FIDELITY")}
        expect = "virtual"
    else:
        need_runtime(boards.load(board or "esp32-generic").runtime)
        expect = board or "esp32-generic"
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    args = ("--board", board) if board and board != "no-models" else ()
    proc = start_demo(marker, *args, tmpdir=tmp_path, env=env)
    out = ""
    secrets: list[str] = []
    try:
        # while it runs (its work directory is removed at the end), note the passwords in play
        for line in proc.stdout:
            out += line
            if line.startswith("✔") and "bootstrap: credentials" in line:
                secrets = passwords(tmp_path)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - t0
    assert proc.returncode == 0, out
    # (counts only: pytest would show the values of an assertion on them)
    found = len(secrets)
    assert found >= 3, "admin, bootstrap and device passwords expected"
    leaked = sum(pw in out for pw in secrets)
    assert leaked == 0, "a password appears in the demo's output"
    lines = out.splitlines()
    update = UPDATE.get(boards.load(expect).family, OTHER_UPDATE)
    steps = [update if s == "update" else s for s in STEPS]
    for step in steps:  # each step on a line of its own, ticked, in this order
        assert any(line.startswith("✔") and step in line for line in lines), (step, out)
    order = [next(i for i, line in enumerate(lines) if line.startswith("✔") and step in line)
             for step in steps]
    assert order == sorted(order), out
    assert "WAITING_FOR_CONNECTION → PENDING_ACCEPTANCE → ACCEPTED" in out
    assert "PENDING → EXECUTING → SUCCESSFUL" in out
    assert "demo passed" in out and "the platform's view" in out and "timings" in out
    assert re.search(r"^  console  http://127\.0\.0\.1:\d+/apps/console/$", out, re.M), out
    assert f"{expect} on {boards.load(expect).runtime}" in out
    assert ("64-bit developer board" in out) == (expect == "virtual"), out
    # the platform's view names the device, its external ID, measurements and the operation
    for label in ("device", "external ID", "measurements", "operation", "alarms"):
        assert any(f"│ {label} " in line for line in lines), (label, out)
    # and nothing that looks like the settings file
    low = out.lower()
    assert "password\"" not in low and "bootstrap_password" not in low and "ca\"" not in low
    assert "-----BEGIN" not in out
    no_leftovers(marker)
    assert took < 120, f"the demo took {took:.0f} s"


def test_demo_ctrl_c_stops_everything() -> None:
    marker = uuid.uuid4().hex
    proc = start_demo(marker)
    seen = ""
    try:
        # interrupt while the agent bootstraps: emulator, board and agent all running
        deadline = time.monotonic() + 60
        while "boot: the agent reads its ID" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += proc.stdout.readline()
        assert marked(marker), "the demo's processes should be running now"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, seen + out
    assert "interrupted" in out
    no_leftovers(marker)


def test_a_failing_step_is_named_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(d: demo_mod.Demo, workdir: Path, keep: bool, board: str) -> None:
        d.wait("self-creation: managed object", lambda st: None, timeout=0.2)

    monkeypatch.setattr(demo_mod, "run", failing)
    r = CliRunner().invoke(demo_mod.demo, [])
    assert r.exit_code == 1, r.output
    assert 'demo failed at step "self-creation: managed object": not done within 0.2 s' in \
        r.output.replace("\n", " ")


def test_new_iccid_is_luhn_valid() -> None:
    from microcot import identity

    ids = {demo_mod.new_iccid() for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert len(i) == 20 and i.startswith("894902")
        assert identity.luhn_ok(i) and identity.normalize_iccid(i) == i


def test_console_url_is_where_the_emulator_mounts_the_console() -> None:
    from microcot_host.emulator.console import MOUNT

    assert demo_mod.console_url({"http_url": "http://127.0.0.1:8111"}) == (
        "http://127.0.0.1:8111" + MOUNT + "/")


def test_settings_hold_what_the_agent_needs() -> None:
    conn = {"mqtt_host": "127.0.0.1", "mqtt_port": 1234, "bootstrap_user": "bs",
            "bootstrap_password": "secret"}
    s = demo_mod.settings(conn, "-----BEGIN CERTIFICATE-----\n")
    assert s["tls"] is True and s["ca"].startswith("-----BEGIN")
    assert s["bootstrap_delay"][1] <= 5 and s["binary"] is False
    json.dumps(s)  # goes to the board as /microcot.json
