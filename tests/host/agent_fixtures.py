"""What the agent's end-to-end tests share (test_agent_e2e.py and the device-management ones):
the board's console, power cuts, bounded agent scripts over the raw REPL, the store documents as
the flash has them, the emulator's REST API in-process, and a board brought up to a connected
agent (`live_board`): deployed with the firmware, main.py and settings, bootstrapped and
self-created against the emulator (auto-accepted), with its console running."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import serial
from emulator_fixtures import wait_for

from microcot_host import deploy, transport
from microcot_host.emulator import Emulator
from microcot_host.vboard import VirtualBoard
from microcot_host.vboard.models import make_board

WAIT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_doc(flash: Path, name: str):
    """A store.py document as the board has it (the valid slot with the highest seq), or None."""
    best = None
    for slot in ("a", "b"):
        p = flash / "store" / f"{name}.{slot}"
        if not p.exists():
            continue
        data = p.read_bytes()
        head, _, body = data.partition(b"\n")
        parts = head.split(b" ")
        if len(parts) != 4 or parts[0] != b"MCS1" or int(parts[3]) != len(body):
            continue
        seq = int(parts[2])
        if best is None or seq > best[0]:
            best = (seq, json.loads(body))
    return None if best is None else best[1]


class Console:
    """The board's serial output while main.py runs (a thread reads it)."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.text = ""
        self._ser: serial.Serial | None = None
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def start(self) -> Console:
        self._ser = serial.Serial(self.port, timeout=0.1)
        self._stop.clear()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        return self

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
        m = wait_for(lambda: rx.search(self.text, after), timeout)
        return m

    def stop(self) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(2)
        if self._ser is not None:
            self._ser.close()
            self._ser = None


def power_cycle(vb: VirtualBoard) -> None:
    """A power cut: the interpreter is killed, the board starts again (and runs main.py)."""
    pid = vb.child_pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: vb.child_pid not in (None, pid), 10)


def run_script(vb: VirtualBoard, code: str, timeout: float = 60, on_line=None) -> dict:
    """Run code on the board (raw REPL, interrupting main.py); its RESULT line as a dict."""
    buf = [b""]

    def out(b: bytes) -> None:
        buf[0] += b
        while b"\n" in buf[0]:
            line, buf[0] = buf[0].split(b"\n", 1)
            if on_line is not None:
                on_line(line.decode(errors="replace").strip())

    t = transport.open_board(vb.port)
    try:
        text = transport.run(t, code, timeout=timeout, on_output=out).decode(errors="replace")
    except transport.ExecError as e:  # the board's output with its traceback
        raise AssertionError(e.output.decode(errors="replace")[-3000:] + e.error_output) from None
    finally:
        transport.close(t)
    m = re.search(r"^RESULT (.*)$", text, re.M)
    assert m, text[-3000:]
    res = json.loads(m.group(1))
    res["log"] = text
    return res


def api(emu, method: str, target: str, body=None):
    r = emu.api.handle(method, target, body)
    return r.status, r.body


def device_mo(emu, iccid: str) -> str | None:
    status, body = api(emu, "GET", "/identity/externalIds/c8y_Serial/" + iccid)
    return body["managedObject"]["id"] if status == 200 else None


def values(emu, mo: str, fragment: str, series: str) -> list[float]:
    """A measurement series of the device, in the order the platform received them (id)."""
    _, body = api(emu, "GET", f"/measurement/measurements?source={mo}&pageSize=2000"
                              f"&valueFragmentType={fragment}")
    ms = sorted(body["measurements"], key=lambda m: int(m["id"]))
    return [m[fragment][series]["value"] for m in ms if series in m[fragment]]


def emulator_config(emu: Emulator, **over: Any) -> dict[str, Any]:
    """/microcot.json for a board on this emulator: fast back-off and short timeouts."""
    c = emu.connection
    cfg: dict[str, Any] = {
        "host": "localhost", "port": c["mqtt_port"], "ca": Path(c["ca_cert"]).read_text(),
        "bootstrap_user": c["bootstrap_user"], "bootstrap_password": c["bootstrap_password"],
        "bootstrap_delay": [0, 1], "bootstrap_repeat": 30, "backoff": [0.5, 3],
        "keepalive": 10, "timeout": 10, "interval": 1,
    }
    cfg.update(over)
    return cfg


class LiveBoard:
    """A virtual board running main.py against the emulator, its console read (`con`)."""

    def __init__(self, vb: VirtualBoard, con: Console, mo: str, device_id: str,
                 config: dict[str, Any]) -> None:
        self.vb = vb
        self.con = con
        self.mo = mo
        self.id = device_id
        self.config = config  # the /microcot.json deployed

    @property
    def flash(self) -> Path:
        return self.vb.flash_dir

    def stop(self) -> None:
        self.con.stop()
        self.vb.stop()


def live_board(emu: Emulator, board_file: str, flash: Path, device_id: str, board_name: str,
               heap: str | None = None, **config: Any) -> LiveBoard:
    """Deploy (firmware, main.py, templates.csv, settings) on a board with a large heap, then
    start it at `heap` (None: the board file's budget) with an emulated modem whose ICCID is
    `device_id`, and wait until main.py's agent is ready (bootstrap auto-accepted)."""
    emu.connector.auto_accept = True
    cfg = emulator_config(emu, **config)
    vb = make_board(board_file, name=board_name + "-deploy", heap="1m", flash_dir=flash).start()
    try:
        deploy.deploy(vb.port, board=board_file, app=True, config=cfg)
    finally:
        vb.stop()
    main = (flash / "main.py").read_bytes()
    (flash / "main.py").unlink()  # the console must be there before main.py's first line
    vb = make_board(board_file, name=board_name, heap=heap, iccid=device_id,
                    flash_dir=flash).start()
    con = Console(vb.port).start()
    try:
        (flash / "main.py").write_bytes(main)
        power_cycle(vb)
        m = con.wait(r"ready: managed object (\d+)", 0, 90)
    except AssertionError:
        con.stop()
        vb.stop()
        raise AssertionError("the agent did not get ready:\n" + con.text[-3000:]) from None
    except BaseException:
        con.stop()
        vb.stop()
        raise
    return LiveBoard(vb, con, m.group(1), device_id, cfg)


def operation(emu: Emulator, mo: str, **fragments: Any) -> str:
    """Create an operation for the device (as the admin); its id."""
    status, body = api(emu, "POST", "/devicecontrol/operations",
                       {"deviceId": mo, "description": " ".join(fragments), **fragments})
    assert status == 201, body
    return body["id"]


def wait_operation(emu: Emulator, op_id: str, timeout: float = 60) -> dict[str, Any]:
    """The operation once it is SUCCESSFUL or FAILED."""
    def done() -> dict[str, Any] | None:
        _, body = api(emu, "GET", "/devicecontrol/operations/" + op_id)
        return body if body.get("status") in ("SUCCESSFUL", "FAILED") else None

    return wait_for(done, timeout)
