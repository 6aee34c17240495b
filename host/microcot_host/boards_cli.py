"""`microcot boards`: which boards are connected, what runs on them, and who they are.

Each serial port is opened once (in parallel, with short timeouts) and asked in one raw-REPL
exec for MicroPython's version, `sys.implementation._build`/`_machine`, the deployed board file
(/board.json) and the device ID. A port where no raw REPL answers is reported as "not
MicroPython" with the reason; it never hangs the listing.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import click

from . import cliopts, ports

# Runs on the board (MicroPython): a dict of plain values, never an exception. The device ID comes
# from microcot.identity when it is deployed (ICCID from the modem, else the MAC), else straight
# from the network interface, else from machine.unique_id().
_PROBE = r"""
import sys
def _probe():
    i = sys.implementation
    r = {'platform': sys.platform, 'version': '.'.join([str(v) for v in i.version[:3]]),
         'machine': getattr(i, '_machine', ''), 'build': getattr(i, '_build', ''),
         'mpy': getattr(i, '_mpy', None), 'microcot': None, 'deployed_board': None,
         'device_id': None, 'id_source': None, 'id_error': None,
         'vboard': getattr(sys.modules.get('_vboard'), 'name', None)}
    try:
        import json
        f = open('/board.json')
        r['deployed_board'] = json.load(f).get('name')
        f.close()
    except Exception:
        pass
    try:
        import microcot
        r['microcot'] = getattr(microcot, '__version__', '?')
        from microcot import identity
        r['device_id'], r['id_source'] = identity.detect(timeout_ms=%(modem_ms)d)
    except Exception as e:
        if r['microcot'] is not None:
            r['id_error'] = str(e)
    if r['device_id'] is None:
        try:
            import network
            n = network.WLAN(network.STA_IF)
            m = bytes(n.config('mac'))
            if not any(m):
                was = n.active()
                n.active(True)
                m = bytes(n.config('mac'))
                n.active(was)
            if any(m):
                r['device_id'] = ''.join(['%%02X' %% b for b in m])
                r['id_source'] = 'mac'
        except Exception:
            pass
    if r['device_id'] is None:
        try:
            import machine, binascii
            r['device_id'] = binascii.hexlify(machine.unique_id()).decode().upper()
            r['id_source'] = 'unique_id'
        except Exception:
            pass
    return r
print(repr(_probe()))
del _probe
"""

# MicroPython board names (sys.implementation._build, without the "-VARIANT") -> boards/*.toml
BUILDS = {
    "ESP32_GENERIC": "esp32-generic",
    "ESP32_GENERIC_S3": "esp32-s3",
    "ESP32_GENERIC_C3": "esp32-c3",
    "RPI_PICO_W": "rp2-pico-w",
    "RPI_PICO2_W": "rp2-pico2-w",
}
# builds without _build (older firmware) are recognised by _machine, most specific first
MACHINES = (
    (re.compile(r"Pico 2 W\b"), "rp2-pico2-w"),
    (re.compile(r"Pico W\b"), "rp2-pico-w"),
    (re.compile(r"with ESP32-?S3\b", re.I), "esp32-s3"),
    (re.compile(r"with ESP32-?C3\b", re.I), "esp32-c3"),
    (re.compile(r"with ESP32$", re.I), "esp32-generic"),
)
UNIX_PLATFORMS = ("linux", "darwin", "freebsd", "win32")


@dataclass
class BoardReport:
    port: str
    kind: str
    usb_id: str = ""
    usb: str = ""
    serial_number: str | None = None
    status: str = "unprobed"  # micropython | not micropython | unavailable | bootsel | bootloader
    reason: str = ""
    platform: str = ""
    version: str = ""
    build: str = ""
    machine: str = ""
    mpy: int | None = None
    board: str | None = None
    board_from: str = ""
    microcot: str | None = None
    device_id: str | None = None
    id_source: str = "n/a"

    def as_dict(self) -> dict:
        return asdict(self)


def match_board(platform: str, build: str, machine: str,
                deployed: str | None = None) -> tuple[str | None, str]:
    """(boards/*.toml name, what it was told by) for what a board reports; (None, why) if none."""
    from . import boards

    known = set(boards.names())
    if deployed and deployed in known:
        return deployed, "/board.json"
    base = (build or "").split("-", 1)[0].upper()
    if base in BUILDS and BUILDS[base] in known:
        return BUILDS[base], "_build"
    for pattern, name in MACHINES:
        if pattern.search(machine or "") and name in known:
            return name, "_machine"
    if platform in UNIX_PLATFORMS and "virtual" in known:
        return "virtual", "unix port"
    return None, f"no board file for {build or machine or platform or 'this board'}"


def probe(port: str, timeout: float = 3.0, modem_ms: int = 1000, kind: str = "unknown"
          ) -> BoardReport:
    """Open the port, ask the board who it is, close it. Never raises for a board's fault."""
    from . import transport

    rep = BoardReport(port=port, kind=kind)
    try:
        # no soft reset: a listing should not re-run boot.py; Ctrl-C still stops main.py
        t = transport.open_board(port, soft_reset=False, timeout=timeout)
    except transport.BoardError as exc:
        text = str(exc).removeprefix(f"{port}: ")
        rep.status = "not micropython" if "not a MicroPython board" in text else "unavailable"
        rep.reason = text
        return rep
    try:
        # the modem is asked a few AT commands, each bounded by modem_ms
        out = transport.run(t, _PROBE % {"modem_ms": modem_ms}, timeout=10 + 6 * modem_ms / 1000)
        facts = ast.literal_eval(out.decode(errors="replace").strip().splitlines()[-1])
    except transport.ExecError as exc:
        rep.status = "micropython"
        rep.reason = f"probe failed on the board: {_last_line(exc.error_output)}"
        return rep
    except (transport.BoardError, ValueError, SyntaxError, IndexError) as exc:
        rep.status = "micropython"
        rep.reason = f"probe failed: {exc}"
        return rep
    finally:
        transport.close(t)
    rep.status = "micropython"
    if facts.get("vboard") and rep.kind == "unknown":
        rep.kind = ports.VIRTUAL
        rep.usb = f"virtual board {facts['vboard']}"
    for key in ("platform", "version", "build", "machine", "mpy", "microcot"):
        setattr(rep, key, facts.get(key) if key in ("mpy", "microcot") else facts.get(key) or "")
    rep.board, rep.board_from = match_board(rep.platform, rep.build, rep.machine,
                                            facts.get("deployed_board"))
    if facts.get("device_id"):
        rep.device_id = facts["device_id"]
        rep.id_source = facts.get("id_source") or "?"
    if facts.get("id_error"):
        rep.reason = f"identity: {facts['id_error']}"
    return rep


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "error"


def _report_for(p: ports.Port) -> BoardReport:
    return BoardReport(port=p.device, kind=p.kind, usb_id=p.usb_id, usb=p.label,
                       serial_number=p.serial_number)


def survey(specs: tuple[str, ...] = (), show_all: bool = False, do_probe: bool = True,
           timeout: float = 3.0) -> list[BoardReport]:
    """Reports for the named ports, or for every board that can be found."""
    serial = ports.list_serial(include_unknown=True)
    virtual = ports.list_virtual()
    known = {os.path.realpath(p.device): p for p in serial + virtual}
    bootsel: list[ports.Port] = []
    if specs:
        targets = []
        for dev in ports.resolve(specs, allow_empty=False):
            p = known.get(os.path.realpath(dev))
            targets.append(ports.Port(device=dev, kind=p.kind if p else "unknown",
                                      vendor=p.vendor if p else "", label=p.label if p else "",
                                      vid=p.vid if p else None, pid=p.pid if p else None,
                                      serial_number=p.serial_number if p else None))
    else:
        targets = [p for p in serial if show_all or p.kind != "unknown"] + virtual
        bootsel = ports.list_bootsel()
    reports = [_report_for(p) for p in targets]

    def one(rep: BoardReport) -> BoardReport:
        if rep.kind == ports.BOOTLOADER:
            rep.status, rep.reason = "bootloader", "ROM download mode: flash it, then reset"
            return rep
        if not do_probe:
            return rep
        probed = probe(rep.port, timeout=timeout, kind=rep.kind)
        probed.usb_id, probed.serial_number = rep.usb_id, rep.serial_number
        probed.usb = rep.usb or probed.usb  # a virtual board names itself in the probe
        return probed

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(reports)))) as pool:
        reports = list(pool.map(one, reports))
    for p in bootsel:
        rep = _report_for(p)
        rep.status = "bootsel"
        rep.reason = f"UF2 drive at {p.device}" if p.device else "UF2 drive not mounted"
        reports.append(rep)
    return reports


def _table(reports: list[BoardReport]):
    from rich.table import Table

    table = Table(title=None, show_lines=False)
    for col in ("Port", "USB", "Status", "MicroPython", "Build / machine", "Board", "Device ID"):
        table.add_column(col, overflow="fold")
    styles = {"micropython": "green", "bootsel": "yellow", "bootloader": "yellow"}
    for r in reports:
        status = r.status + (f"\n{r.reason}" if r.reason else "")
        usb = " ".join(x for x in (r.usb_id, r.usb) if x) or r.kind
        mp = r.version + (f" (microcot {r.microcot})" if r.microcot else "")
        build = " / ".join(x for x in (r.build, r.machine) if x)
        board = r.board or ("-" if r.status != "micropython" else "?")
        dev_id = f"{r.device_id} ({r.id_source})" if r.device_id else "n/a"
        table.add_row(r.port or "(no drive)", usb,
                      f"[{styles.get(r.status, 'red')}]{status}[/]", mp, build, board, dev_id)
    return table


@click.command("boards", context_settings=cliopts.HELP)
@ports.port_option()
@click.option("--all", "show_all", is_flag=True,
              help="also serial ports whose USB ID is not a known board or adapter")
@click.option("--no-probe", is_flag=True,
              help="only list ports by USB ID; do not open them (a probe interrupts the "
                   "program running on a board, as mpremote does)")
@cliopts.timeout_option(help="how long to wait for a board's raw REPL")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def boards(port_specs: tuple[str, ...], show_all: bool, no_probe: bool, timeout: float,
           as_json: bool) -> None:
    """List connected boards: USB serial ports, BOOTSEL drives and running virtual boards.

    For each, what runs on it (MicroPython version, build, machine), the matching board file
    and the device ID. With --port, only those ports (any path, e.g. a virtual board's pty).
    $MICROCOT_PORT is not used here: this command is for finding ports.
    """
    try:
        reports = survey(port_specs, show_all=show_all, do_probe=not no_probe, timeout=timeout)
    except ports.PortError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
        return
    if not reports:
        click.echo("no boards found (USB serial ports with a known ID, BOOTSEL drives, "
                   "registered virtual boards); try --all, or --port PATH")
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(_table(reports))
