"""`microcot emulator` as a user runs it: a subprocess with its own data directory, the
connection file, the subcommands that talk to it over REST, a clean SIGTERM, and a clear error
when Mosquitto is missing."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from emulator_fixtures import Device, device, new_iccid, wait_for

from microcot import xtea
from microcot_host.emulator.service import CONNECTION_KEYS

pytestmark = pytest.mark.timeout(90)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microcot_host", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def processes_using(path: Path, program: str = "mosquitto") -> list[int]:
    """Pids of `program` whose command line mentions `path` (the broker's config is under it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if program in cmdline and str(path) in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


class Running:
    """`python -m microcot_host emulator --data-dir D` in the background, its stdout collected."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microcot_host", "emulator", "--data-dir", str(data), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                raise AssertionError(f"no {text!r} within {timeout} s: {self.out} {err}") from None
            self.out.append(line)
            if text in line:
                return

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(15)
        time.sleep(0.05)
        while not self.lines.empty():
            self.out.append(self.lines.get_nowait())
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_run_accept_register_and_stop(tmp_path):
    data = tmp_path / "emu"
    run = Running(data)
    try:
        run.wait_for_line("Running")
        conn_file = data / "connection.json"
        conn = json.loads(conn_file.read_text())
        assert sorted(conn) == sorted(CONNECTION_KEYS)
        assert stat.S_IMODE(conn_file.stat().st_mode) == 0o600
        assert Path(conn["ca_cert"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
        banner = "".join(run.out)
        assert str(conn["mqtt_port"]) in banner and conn["http_url"] in banner
        assert str(conn_file) in banner and conn["ca_cert"] in banner
        assert conn["admin_password"] not in banner
        assert conn["bootstrap_password"] not in banner

        # a device bootstraps; `emulator accept` lets the emulator answer
        iccid = new_iccid()
        secret = b"QWERTYUIOPASDFGH"
        boot = Device(conn, iccid, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
        try:
            assert boot.subscribe("sr/" + iccid) == 1
            boot.publish("ss/" + iccid, secret)
            wait_for(lambda: "PENDING_ACCEPTANCE" in cli("emulator", "devices", "--data-dir",
                                                          str(data)).stdout)
            listed = json.loads(cli("emulator", "devices", "--data-dir", str(data), "--json").stdout)
            assert {"id": iccid, "status": "PENDING_ACCEPTANCE"} in listed["requests"]
            r = cli("emulator", "accept", iccid, "--data-dir", str(data))
            assert r.returncode == 0, r.stderr
            assert f"accepted {iccid}" in r.stdout
            password = xtea.unpad(xtea.decrypt_ecb(secret, boot.get("sr/" + iccid))).decode()
        finally:
            boot.close()
        d = device(conn, iccid, password)
        assert d.request("15,noSuchX1") == "40,Template not found."
        d.close()
        assert password not in run.out

        # bulk registration from a CSV file; the group's --data-dir works for subcommands too
        ids = [new_iccid(), new_iccid()]
        fleet = tmp_path / "fleet.csv"
        fleet.write_text("ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n"
                         f"a;Fleet-Pass-01;mqtt;A;{ids[0]};1\n"
                         f"b;Fleet-Pass-02;mqtt;B;{ids[1]};0\n")
        r = cli("emulator", "--data-dir", str(data), "register", str(fleet))
        assert r.returncode == 0, r.stderr
        assert "2 rows: 2 created, 0 updated, 0 failed" in r.stdout
        assert "Fleet-Pass" not in r.stdout
        d = device(conn, ids[1], "Fleet-Pass-02")
        assert d.request("15,noSuchX1") == "40,Template not found."
        d.close()
        fleet.write_text("ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n"
                         f"c;tiny;mqtt;C;{new_iccid()};1\n")
        r = cli("emulator", "register", str(fleet), "--data-dir", str(data))
        assert r.returncode == 1
        assert "1 rows: 0 created, 0 updated, 1 failed" in r.stdout and "line 2" in r.stdout
        assert "tiny" not in r.stdout

        assert processes_using(data), "no broker process found under the data directory"
        assert run.terminate() == 0
        assert "emulator stopped" in "".join(run.out)
        assert processes_using(data) == []  # Mosquitto is gone too
    finally:
        run.kill()

    # subcommands against a stopped emulator say so
    r = cli("emulator", "accept", "x1", "--data-dir", str(data))
    assert r.returncode == 1 and "does not answer" in r.stderr and "running?" in r.stderr


def test_subcommand_without_an_emulator(tmp_path):
    r = cli("emulator", "accept", "x1", "--data-dir", str(tmp_path / "none"))
    assert r.returncode == 1
    assert "no emulator in" in r.stderr and "microcot emulator --data-dir" in r.stderr


def test_missing_mosquitto_is_a_clear_error(tmp_path):
    env = dict(os.environ, MICROCOT_MOSQUITTO=str(tmp_path / "no" / "mosquitto"))
    r = cli("emulator", "--data-dir", str(tmp_path / "emu"), env=env)
    assert r.returncode == 1
    assert "the emulator could not start" in r.stderr
    assert "`mosquitto` binary was not found" in r.stderr and "make setup" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "emu" / "connection.json").exists()
    assert processes_using(tmp_path / "emu") == []


def test_a_second_emulator_on_the_same_data_is_refused(tmp_path):
    data = tmp_path / "emu"
    run = Running(data)
    try:
        run.wait_for_line("Running")
        r = cli("emulator", "--data-dir", str(data))
        assert r.returncode == 1 and "in use by another broker" in r.stderr
        assert run.proc.poll() is None
    finally:
        assert run.terminate() == 0
        run.kill()
    assert processes_using(data) == []
