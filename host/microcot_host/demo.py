"""`microcot demo`: a virtual board registers itself with the local Cloud of Things emulator.

Everything runs on this machine and is stopped at the end (Ctrl-C too):

 1. the platform emulator (Mosquitto with TLS + the SmartREST engine), bootstrap auto-accept on;
    the device's ID is registered first, as a user does in the platform's UI;
 2. a virtual board (the MicroPython unix port) whose emulated modem holds a SIM with a fresh,
    Luhn-valid ICCID;
 3. the firmware, the example application (main.py, templates.csv) and its settings
    (/microcot.json: the emulator's broker, its CA, the bootstrap user, a short bootstrap delay)
    are deployed onto the board;
 4. a soft reset runs main.py: the agent reads the ICCID from the modem, bootstraps (its secret
    on ss/, the password XTEA-encrypted back on sr/), registers its templates, creates itself
    (managed object, external ID, hardware/mobile info, supported operations) and measures every
    2 s in text SmartREST; an operation (c8y_Command "uptime") goes there and back;
 5. an update: on an ESP32 model a firmware image (c8y_Firmware: downloaded over HTTPS in a boot
    of its own into the other OTA partition, reset into, confirmed once connected), elsewhere an
    application bundle (c8y_SoftwareUpdate, switched in by boot.py); SUCCESSFUL after the reset;
 6. main.py is stopped and the agent runs once more over the raw REPL in binary mode: an alarm
    and three binary SmartREST measurements.

Progress comes from the platform's REST API (as a user would watch it), plus the board's own log
for what only the board knows (reading the modem, decrypting). Every step has a timeout; the
command exits 0 when all passed, 1 naming the failed step otherwise, 130 on Ctrl-C. Passwords are
never printed: the settings file goes to the board, not to the screen.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import boards, cliopts

XID = "microcot2"  # the 15 line of firmware/templates.csv
XID_TYPE = "c8y_SmartRestDeviceIdentifier"  # how the platform files template collections
INTERVAL_S = 2  # main.py's measurement interval in the demo
TEXT_MEASUREMENTS = 2  # wait for this many before the operation
BINARY_VALUES = (21.5, 21.75, 22.0)  # exact in float32: what arrives is what was sent
CONSOLE_PATH = "/apps/console/"  # where the emulator serves its web console (console.MOUNT)

# Runs on the board over the raw REPL after main.py: the same agent, settings and credentials,
# switched to binary SmartREST, until everything queued is acknowledged by the broker.
PHASE2 = """
from microcot.agent import Agent
a = Agent(binary=True)
a.alarm('mc_DemoAlarm', 'microcot demo: an alarm raised by the device', 'MAJOR')
for v in %r:
    a.measure('c8y_Temperature', 'T', v, 'C')
ok = a.run(seconds=%d, until=lambda: a.ready and not len(a.q) and not a._c.pending())
a.close()
print('DEMO-PHASE2', ok, a.errors, a.stats['sent'])
"""


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def new_iccid() -> str:
    """A random, Luhn-valid 20-digit ICCID (89 telecom, 49 Germany)."""
    from microcot import identity

    body = "894902" + "".join(str(secrets.randbelow(10)) for _ in range(13))
    return body + str(identity.luhn_check_digit(body))


class Platform:
    """The emulator's REST API over HTTP with the admin's Basic auth (what a user's tools see)."""

    def __init__(self, conn: dict[str, Any]) -> None:
        self.url = conn["http_url"]
        cred = f"{conn['admin_user']}:{conn['admin_password']}".encode()
        self._auth = "Basic " + base64.b64encode(cred).decode()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        return status, (json.loads(raw) if raw else None)

    def get(self, path: str) -> Any:
        """The JSON of a 200, else None."""
        status, body = self.call("GET", path)
        return body if status == 200 else None


class History:
    """Status changes as the platform records them, observed in-process on the emulator's model:
    a REST poll would miss states that last milliseconds (PENDING_ACCEPTANCE under auto-accept,
    EXECUTING of a quick command). Only watches; the model does what it always does."""

    def __init__(self, model: Any) -> None:
        self.changes: dict[str, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        for attr, kind in (("create_operation", "op"), ("update_operation", "op"),
                           ("create_device_request", "request"),
                           ("set_device_request_status", "request")):
            self._watch(model, attr, kind)

    def _watch(self, model: Any, attr: str, kind: str) -> None:
        orig = getattr(model, attr)

        def watched(*args: Any, **kwargs: Any) -> Any:
            r = orig(*args, **kwargs)
            if isinstance(r, dict) and r.get("status"):
                with self._lock:
                    seen = self.changes[f"{kind}:{r['id']}"]
                    if not seen or seen[-1] != r["status"]:
                        seen.append(r["status"])
            return r

        setattr(model, attr, watched)

    def of(self, kind: str, ident: str) -> str:
        with self._lock:
            return " → ".join(self.changes.get(f"{kind}:{ident}", []))


class BoardLog:
    """The board's serial output while main.py runs: lines kept for progress and errors."""

    def __init__(self, port: str, echo: Callable[[str], None] | None = None) -> None:
        import serial

        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._echo = echo
        self._ser = serial.Serial(port, 115200, timeout=0.1, exclusive=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="demo board log", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        self._ser.write(data)

    def add(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.strip():
            self.lines.append(line)
            if self._echo is not None:
                self._echo(line)

    def _read(self) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                data = self._ser.read(4096)
            except Exception:  # the port went away: the board is being stopped
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.add(line.decode(errors="replace"))

    def find(self, text: str) -> str | None:
        for line in list(self.lines):
            if text in line:
                return line
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(Exception):
            self._ser.close()


@dataclass
class Step:
    name: str
    started: float
    done: float = 0.0
    detail: str = ""
    ok: bool = False


@dataclass
class Demo:
    console: Console
    step_timeout: float = 60.0
    verbose: bool = False
    t0: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """A step that does its work in the with-block; it fails with the block's exception."""
        st = Step(name, self.elapsed())
        self.steps.append(st)
        with self.console.status(f"[bold]{name}[/] ..."):
            try:
                yield st
            except StepFailed:
                raise
            except Exception as e:
                raise StepFailed(name, f"{type(e).__name__}: {e}") from e
        self._done(st)

    def wait(self, name: str, check: Callable[[Step], str | None], timeout: float | None = None,
             every: float = 0.1) -> Step:
        """Poll check(step) until it returns the step's detail (not None); check may set
        step.detail meanwhile to show where things stand."""
        st = Step(name, self.elapsed())
        self.steps.append(st)
        deadline = time.monotonic() + (timeout or self.step_timeout)
        with self.console.status(f"[bold]{name}[/] ...") as status:
            while True:
                try:
                    got = check(st)
                except StepFailed:
                    raise
                except Exception as e:
                    raise StepFailed(name, f"{type(e).__name__}: {e}") from e
                if got is not None:
                    st.detail = got
                    break
                if time.monotonic() >= deadline:
                    why = f" (last seen: {st.detail})" if st.detail else ""
                    raise StepFailed(name, f"not done within {timeout or self.step_timeout:g} s"
                                     + why)
                status.update(f"[bold]{name}[/] {st.detail} "
                              f"[dim]{self.elapsed() - st.started:.1f} s[/]")
                time.sleep(every)
        self._done(st)
        return st

    def _done(self, st: Step) -> None:
        st.done = self.elapsed()
        st.ok = True
        line = f"[green]✔[/] [dim]{st.done:6.1f} s[/]  {st.name:<34} {st.detail}"
        if self.console.is_terminal:  # one screen line per step
            self.console.print(line, overflow="ellipsis", no_wrap=True)
        else:  # a log: the whole line
            self.console.print(line)


def console_url(conn: dict[str, Any]) -> str:
    """The emulator's web console, served beside its REST API."""
    return conn["http_url"].rstrip("/") + CONSOLE_PATH


def settings(conn: dict[str, Any], ca_pem: str) -> dict[str, Any]:
    """The agent's /microcot.json for the emulator (holds the bootstrap password: not printed)."""
    return {
        "host": conn["mqtt_host"], "port": conn["mqtt_port"], "tls": True, "ca": ca_pem,
        "bootstrap_user": conn["bootstrap_user"],
        "bootstrap_password": conn["bootstrap_password"],
        "bootstrap_delay": [0, 2], "interval": INTERVAL_S, "binary": False,
        "keepalive": 30, "timeout": 10, "backoff": [1, 8],
    }


def run(demo: Demo, workdir: Path, keep: bool = False, board: str = "virtual") -> None:
    """The whole demo; raises StepFailed. Everything started is stopped before it returns."""
    from .emulator import Emulator

    con = demo.console
    iccid = new_iccid()
    counts: collections.Counter[str] = collections.Counter()
    emu = Emulator(workdir / "emulator", auto_accept=True)
    try:
        with demo.step("start the platform emulator") as st:
            emu.start()
            conn = emu.connection
            st.detail = (f"MQTT/TLS {conn['mqtt_host']}:{conn['mqtt_port']}, "
                         f"REST {conn['http_url']}, bootstrap auto-accept")
        # a person can watch the board arrive in the browser (log in as the admin)
        con.print(f"  console  {console_url(conn)}", highlight=False, soft_wrap=True)
        history = History(emu.model)
        # count the SmartREST messages the platform gets from the device, text and binary: the
        # REST API shows measurements, not how they came (the connector, and process() itself,
        # call the two-step forms)
        for kind, attr in (("text", "process_later"), ("binary", "process_binary_later")):
            orig = getattr(emu.engine, attr)

            def counting(payload: bytes, user: str | None = None, *, _o=orig, _k=kind, **kw):
                if user == iccid:
                    counts[_k] += 1
                return _o(payload, user, **kw)

            setattr(emu.engine, attr, counting)
        api = Platform(conn)
        _run_board(demo, workdir, emu, api, iccid, counts, history, keep, board)
    finally:
        with con.status("stopping the emulator"):
            emu.stop()


def _run_board(demo: Demo, workdir: Path, emu: Any, api: Platform, iccid: str,
               counts: collections.Counter[str], history: History, keep: bool,
               board: str) -> None:
    from . import deploy, transport
    from .vboard.models import make_board

    con = demo.console
    conn = emu.connection
    bdef = boards.load(board)
    vb = make_board(bdef, name="demo-" + iccid[-6:], iccid=iccid, flash_dir=workdir / "flash")
    log: BoardLog | None = None
    try:
        with demo.step("start a virtual board") as st:
            vb.start()
            st.detail = (f"{board} on {bdef.runtime}, {bdef.heap_budget:,} B free heap, "
                         f"serial {vb.port}, modem with SIM ICCID {iccid}")
        with demo.step("deploy firmware, app and settings") as st:
            t = transport.open_board(vb.port)
            try:
                ca = Path(conn["ca_cert"]).read_text()
                r = deploy.deploy_transport(t, bdef, app=True,
                                            config=settings(conn, ca))
            finally:
                transport.close(t)  # back in the friendly REPL
            kb = r.bytes_sent / 1024
            st.detail = (f"{len(r.copied)} files ({kb:.0f} KiB, "
                         f"{'.mpy' if r.compiled else 'sources'}) incl. main.py, templates.csv, "
                         "microcot.json")
        with demo.step("register the ID on the platform") as st:
            status, body = api.call("POST", "/devicecontrol/newDeviceRequests", {"id": iccid})
            if status != 201:
                raise StepFailed("register the device ID", f"REST {status}: {body}")
            st.detail = f"new device request {iccid}: {body['status']}"

        echo = (lambda line: con.print(f"  [dim]board | {line}[/]", highlight=False)) \
            if demo.verbose else None
        log = BoardLog(vb.port, echo)
        log.write(b"\x04")  # Ctrl-D in the friendly REPL: soft reset, main.py runs

        def device_id(st: Step) -> str | None:
            line = log.find(f"agent: device {iccid} (iccid)")
            return f"ICCID {iccid} read from the modem (AT commands)" if line else None

        demo.wait("boot: the agent reads its ID", device_id)

        def request(st: Step) -> str | None:
            r = api.get("/devicecontrol/newDeviceRequests/" + iccid)
            st.detail = history.of("request", iccid)
            return st.detail if r is not None and r["status"] == "ACCEPTED" else None

        demo.wait("bootstrap: device request", request)

        def credentials(st: Step) -> str | None:
            c = api.get("/devicecontrol/deviceCredentials/" + iccid)
            if c is None:
                return None
            st.detail = f"user {c['username']} issued"
            if not log.find("bootstrap: credentials received and stored"):
                return None
            return f"user {c['username']}; password XTEA-decrypted and stored on the board"

        demo.wait("bootstrap: credentials", credentials)

        def collection(st: Step) -> str | None:
            x = api.get(f"/identity/externalIds/{XID_TYPE}/{XID}")
            return f"X-ID {XID} (managed object {x['managedObject']['id']})" if x else None

        demo.wait("template collection registered", collection)

        mo: list[str] = []

        def created(st: Step) -> str | None:
            r = api.get("/inventory/managedObjects?fragmentType=c8y_IsDevice&pageSize=100")
            for m in (r or {}).get("managedObjects", []):
                if m.get("c8y_Hardware", {}).get("serialNumber") == iccid:
                    mo[:] = [m["id"]]
                    return f"{m['id']} \"{m.get('name')}\" ({m.get('type')})"
            return None

        demo.wait("self-creation: managed object", created)

        def external_id(st: Step) -> str | None:
            x = api.get("/identity/externalIds/c8y_Serial/" + iccid)
            if x is None:
                return None
            if x["managedObject"]["id"] != mo[0]:
                raise StepFailed("self-creation: external ID",
                                 f"points to {x['managedObject']['id']}, not {mo[0]}")
            return f"c8y_Serial {iccid} → {mo[0]}"

        demo.wait("self-creation: external ID", external_id)

        def info(st: Step) -> str | None:
            m = api.get("/inventory/managedObjects/" + mo[0]) or {}
            ops = m.get("c8y_SupportedOperations")
            if not (m.get("c8y_Mobile", {}).get("iccid") == iccid and ops
                    and "c8y_Command" in ops):
                return None
            fw = m.get("c8y_Firmware", {})
            return (f"c8y_Mobile.iccid, {fw.get('name')} {fw.get('version')}, "
                    f"operations {', '.join(ops)}")

        demo.wait("self-creation: device info", info)

        def text_measurements(st: Step) -> str | None:
            ms = _measurements(api, mo[0])
            st.detail = f"{len(ms)} measurement(s)"
            if len(ms) < TEXT_MEASUREMENTS:
                return None
            return f"{len(ms)} measurements, last {_show(ms[-1])}; text messages {counts['text']}"

        demo.wait("measurements (text SmartREST)", text_measurements,
                  timeout=demo.step_timeout + INTERVAL_S * TEXT_MEASUREMENTS)

        status, op = api.call("POST", "/devicecontrol/operations",
                              {"deviceId": mo[0], "description": "microcot demo: uptime",
                               "c8y_Command": {"text": "uptime"}})
        if status != 201:
            raise StepFailed("operation c8y_Command", f"REST {status}: {op}")

        def operation(st: Step) -> str | None:
            o = api.get("/devicecontrol/operations/" + op["id"]) or {}
            st.detail = f"{op['id']}: " + history.of("op", op["id"])
            if o.get("status") == "FAILED":
                raise StepFailed("operation c8y_Command",
                                 f"FAILED: {o.get('failureReason')}")
            if o.get("status") != "SUCCESSFUL":
                return None
            return st.detail + f", result \"{o.get('c8y_Command', {}).get('result')}\""

        demo.wait("operation c8y_Command \"uptime\"", operation)
        _update(demo, emu, api, mo[0], bdef, history)

        before = len(_measurements(api, mo[0]))
        log.close()
        log = None
        with demo.step("binary mode: an alarm, 3 values") as st:
            t = transport.open_board(vb.port)  # Ctrl-C: main.py's agent closes, soft reset
            try:
                out = transport.run(t, PHASE2 % (BINARY_VALUES, int(demo.step_timeout)),
                                    timeout=demo.step_timeout + 10).decode(errors="replace")
            finally:
                transport.close(t)
            m = re.search(r"DEMO-PHASE2 True (\d+) (\d+)", out)
            if not m:
                tail = " | ".join(out.strip().splitlines()[-4:])
                raise StepFailed("binary mode", f"the agent did not finish: {tail}")
            if m.group(1) != "0":
                raise StepFailed("binary mode", f"the platform answered {m.group(1)} error(s)")
            st.detail = f"{m.group(2)} rows sent on bs/{iccid}, each acknowledged (QoS 1)"

        def alarm(st: Step) -> str | None:
            r = api.get(f"/alarm/alarms?source={mo[0]}&pageSize=10") or {}
            for a in r.get("alarms", []):
                if a.get("type") == "mc_DemoAlarm":
                    return f"{a['severity']} {a['status']} \"{a['text']}\""
            return None

        demo.wait("alarm", alarm)

        def binary(st: Step) -> str | None:
            ms = _measurements(api, mo[0])
            new = [m["c8y_Temperature"]["T"]["value"] for m in ms[before:]]
            st.detail = f"{len(new)} new"
            # main.py's last text measurements may still come in before them (queued when it
            # was stopped): wait for the binary ones to be the latest, the step's time bounds it
            if tuple(new[-len(BINARY_VALUES):]) != BINARY_VALUES:
                st.detail = f"{len(new)} new, the latest {new[-len(BINARY_VALUES):]}"
                return None
            return (f"{len(new)} new: {', '.join(f'{v:g}' for v in new)} C; "
                    f"binary messages {counts['binary']}")

        demo.wait("measurements (binary SmartREST)", binary)
        if counts["binary"] < len(BINARY_VALUES):
            raise StepFailed("measurements (binary SmartREST)",
                             f"the platform got {counts['binary']} binary messages")
        platform_view(con, api, iccid, mo[0], op["id"], counts)
        if keep:
            con.print(f"\n--keep: board on {vb.port}, REST {conn['http_url']}, console "
                      f"{console_url(conn)} (admin password in {emu.connection_file}); Ctrl-C "
                      "stops everything")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except StepFailed:
        if log is not None and log.lines:
            con.print("[dim]last lines of the board:[/]")
            for line in list(log.lines)[-15:]:
                con.print(f"  [dim]board | {line}[/]", highlight=False)
        raise
    finally:
        if log is not None:
            log.close()
        with con.status("stopping the virtual board"):
            vb.stop()


def _measurements(api: Platform, mo: str) -> list[dict]:
    r = api.get(f"/measurement/measurements?source={mo}&pageSize=2000") or {}
    return r.get("measurements", [])


def _show(m: dict) -> str:
    for frag, series in m.items():
        if isinstance(series, dict):
            for name, v in series.items():
                if isinstance(v, dict) and "value" in v:
                    return f"{frag}.{name} = {v['value']:g} {v.get('unit', '')}".rstrip()
    return m.get("type", "?")


def platform_view(con: Console, api: Platform, iccid: str, mo: str, op_id: str,
                  counts: collections.Counter[str]) -> None:
    m = api.get("/inventory/managedObjects/" + mo) or {}
    x = api.get("/identity/externalIds/c8y_Serial/" + iccid) or {}
    ms = _measurements(api, mo)
    al = (api.get(f"/alarm/alarms?source={mo}") or {}).get("alarms", [])
    op = api.get("/devicecontrol/operations/" + op_id) or {}
    t = Table(title="the platform's view (REST API)", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("device", f"{mo} \"{m.get('name')}\" type {m.get('type')}, owner {m.get('owner')}")
    t.add_row("external ID", f"{x.get('type')} {x.get('externalId')} → "
                             f"{x.get('managedObject', {}).get('id')}")
    hw, fw = m.get("c8y_Hardware", {}), m.get("c8y_Firmware", {})
    t.add_row("hardware", f"serial {hw.get('serialNumber')}, model {hw.get('model')}; firmware "
                          f"{fw.get('name')} {fw.get('version')}")
    t.add_row("mobile", json.dumps(m.get("c8y_Mobile", {})))
    t.add_row("operations", ", ".join(m.get("c8y_SupportedOperations", [])))
    t.add_row("measurements", f"{len(ms)} ({counts['text']} text and {counts['binary']} binary "
                              f"SmartREST messages from the device), last {_show(ms[-1])}"
              if ms else "none")
    t.add_row("alarms", "; ".join(f"{a['type']} {a['severity']} {a['status']}" for a in al))
    cmd = op.get("c8y_Command", {})
    t.add_row("operation", f"{op_id} c8y_Command \"{cmd.get('text')}\": {op.get('status')}, "
                           f"result \"{cmd.get('result')}\"")
    con.print()
    con.print(t)


def timings(con: Console, steps: list[Step], total: float) -> None:
    t = Table(title="timings", title_justify="left")
    t.add_column("step")
    t.add_column("took", justify="right")
    t.add_column("at", justify="right")
    for s in steps:
        took = f"{s.done - s.started:.1f} s" if s.ok else "failed"
        t.add_row(s.name, took, f"{s.done:.1f} s" if s.ok else "")
    t.add_row("[bold]total[/]", f"[bold]{total:.1f} s[/]", "")
    con.print()
    con.print(t)


@click.command(context_settings=cliopts.HELP)
@cliopts.timeout_option(default=60.0, old=("--step-timeout",), dest="step_timeout",
                        help="how long each step may take before the demo gives up")
@click.option("--keep", is_flag=True, help="Leave the emulator and the board running at the "
              "end, until Ctrl-C.")
@click.option("--verbose", "-v", is_flag=True, help="Show the board's log lines as they come.")
@click.option("--board", "board", default=None, metavar="NAME",
              help="board file of the virtual board (default: esp32-generic on its faithful "
                   "32-bit model when MICROCOT_FIDELITY_DIR has it, else the 64-bit developer "
                   "board 'virtual')")
def demo(step_timeout: float, keep: bool, verbose: bool, board: str | None) -> None:
    """Run the whole job on this machine: a virtual board with a SIM bootstraps against the
    local Cloud of Things emulator, creates itself, measures (text and binary SmartREST), raises
    an alarm, executes an operation and updates its firmware (its application on boards without
    OTA partitions). Exits 0 when every step passed."""
    console = Console(highlight=False)
    if not console.is_terminal:  # a log: whole lines, tables as wide as they need
        console = Console(highlight=False, soft_wrap=True, width=120)
    d = Demo(console, step_timeout=step_timeout, verbose=verbose)
    console.print("[bold]microcot demo[/]: a virtual board bootstraps against the local "
                  "Cloud of Things emulator")
    board = _demo_board(console, board)
    # SIGTERM stops everything like Ctrl-C (the finally blocks run)
    old = signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="microcot-demo-"))
    code = 0
    try:
        run(d, workdir, keep, board)
        timings(console, d.steps, d.elapsed())
        console.print(f"\n[green bold]demo passed[/] in {d.elapsed():.1f} s")
    except StepFailed as e:
        timings(console, d.steps, d.elapsed())
        console.print(f"\n[red bold]demo failed[/] at step \"{e.step}\": {e.reason}")
        code = 1
    except KeyboardInterrupt:
        console.print(f"\n[yellow]interrupted[/] after {d.elapsed():.1f} s; everything stopped")
        code = 130
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(code)


def _demo_board(console: Console, board: str | None) -> str:
    """The board the demo runs: the one asked for (its model must be there), else an ESP32 on its
    faithful model, else, saying why, the 64-bit developer board."""
    from . import fidelity

    try:
        name = board or "esp32-generic"
        missing = fidelity.missing(boards.load(name).runtime)
    except boards.BoardError as exc:
        raise click.UsageError(str(exc)) from None
    if missing is None:
        return name
    if board is not None:
        raise click.ClickException(missing)
    console.print(f"[yellow]note[/]: the ESP32's 32-bit board model is not here ({missing}); "
                  "running the 64-bit developer board instead, whose heap figures do not hold "
                  "for a real board")
    return "virtual"


DEMO_FIRMWARE = ("microcot-demo", "2.1.0")


def _update(demo: Demo, emu: Any, api: Platform, mo: str, bdef: boards.Board,
            history: History) -> None:
    """One update while main.py runs: a firmware image into the other OTA partition where the
    board has them (an ESP32), else a new application bundle (c8y_SoftwareUpdate); the board
    resets into it and the agent reports SUCCESSFUL once it is connected again."""
    from .appbundle import make_bundle
    from .paths import firmware_dir

    if bdef.family == "esp32":
        from .vboard.board import app_image

        name, version = DEMO_FIRMWARE
        data = app_image(version, name, size=64 * 1024)
        kind, what = "c8y_Firmware", "firmware update"
    else:
        name, version = "microcot-app", "2"
        data = make_bundle([("main.py", (firmware_dir() / "main.py").read_bytes())])
        kind, what = "c8y_SoftwareUpdate", "application update"
    binary = emu.upload_binary(f"{name}-{version}", data)
    item = {"name": name, "version": version,
            "url": f"{emu.connection['https_url']}/inventory/binaries/{binary['id']}",
            "sha256": hashlib.sha256(data).hexdigest()}
    body = {"c8y_Firmware": item} if kind == "c8y_Firmware" else \
        {"c8y_SoftwareUpdate": [dict(item, action="install")]}
    status, op = api.call("POST", "/devicecontrol/operations",
                          {"deviceId": mo, "description": f"microcot demo: {what}", **body})
    if status != 201:
        raise StepFailed(f"operation {kind}", f"REST {status}: {op}")

    def done(st: Step) -> str | None:
        o = api.get("/devicecontrol/operations/" + op["id"]) or {}
        st.detail = f"{op['id']}: " + history.of("op", op["id"])
        if o.get("status") == "FAILED":
            raise StepFailed(f"operation {kind}", f"FAILED: {o.get('failureReason')}")
        if o.get("status") != "SUCCESSFUL":
            return None
        if kind == "c8y_Firmware":
            fw = (api.get("/inventory/managedObjects/" + mo) or {}).get("c8y_Firmware", {})
            if fw.get("version") != version:
                return None  # the inventory follows right after the status
            return st.detail + f", {len(data) // 1024} KiB over HTTPS, now {name} {version}"
        return st.detail + f", bundle of {len(data) // 1024} KiB, {name} {version} running"

    demo.wait(f"{what} ({kind})", done, timeout=demo.step_timeout + 30)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


__all__ = ["demo", "new_iccid", "StepFailed"]
