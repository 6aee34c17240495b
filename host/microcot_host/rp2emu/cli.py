"""`microcot board rp2`: serve an emulated RP2040 (real rp2 firmware) on a pty until stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import click

from ..fidelity import FidelityMissing
from .board import BoardStartError, EmulatedRP2040, parse_uid


def _uid(_ctx: click.Context, _param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return parse_uid(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("rp2")
@click.option("--firmware", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="the rp2 MicroPython UF2 (default: the RPI_PICO_W build found through "
                   "MICROCOT_FIDELITY_DIR)")
@click.option("--name", "-n", default="rp2", show_default=True,
              help="board name: selects its flash file and default unique ID")
@click.option("--flash", type=click.Path(dir_okay=False, path_type=Path),
              help="the flash image file (default: <state dir>/boards/<name>/rp2-flash.bin)")
@click.option("--uid", callback=_uid, metavar="HEX",
              help="flash unique ID, 16 hex digits (machine.unique_id(); default from the name)")
@click.option("--modem", "iccid", metavar="ICCID",
              help="attach an emulated AT modem with a SIM of this ICCID to UART0")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="also make this symlink point at the pty, e.g. /tmp/ttyRP2")
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path),
              help="write the pty path to this file once the board is up (for scripts)")
def rp2(firmware: Path | None, name: str, flash: Path | None, uid: bytes | None,
        iccid: str | None, link: Path | None, port_file: Path | None) -> None:
    """Serve an emulated RP2040 running MicroPython's real rp2 firmware until Ctrl-C or SIGTERM.

    The printed port behaves like a Pico's USB serial: mpremote, `microcot deploy`, `test` and
    `flash` use it like /dev/ttyACM0 (for `flash`, point MICROCOT_UF2_SEARCH at the drive folder
    printed). The flash file persists across runs. There is no radio.
    """
    try:
        board = EmulatedRP2040(name, firmware=firmware, flash=flash, uid=uid, iccid=iccid,
                               link=link)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    stop = threading.Event()
    registry: Path | None = None

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        try:
            board.start()
        except (FidelityMissing, BoardStartError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        port = str(link) if link else board.port
        click.echo(f"emulated RP2040 {name!r} on {board.port}" + (f" ({link})" if link else ""))
        click.echo(f"  flash: {board.flash}")
        click.echo(f"  drive: {board.drive_dir} (RPI-RP2 appears there after "
                   "machine.bootloader())")
        click.echo(f"  uid:   {board.uid.hex().upper()}")
        if board.modem_path:
            click.echo(f"  modem: UART0 -> {board.modem_path} (ICCID {iccid})")
        click.echo(f"  up in {board.boot_s:.1f} s; try: mpremote connect {port} repl")
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(board.port + "\n")
            os.replace(tmp, port_file)
        registry = _register(board, link)
        click.echo("Ctrl-C stops the board.")
        while not stop.wait(0.5):
            if not board.running:
                raise click.ClickException(f"the emulator stopped; see {board.log_path}")
    finally:
        if registry is not None:
            _unregister(registry)
        board.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if port_file is not None:
            with contextlib.suppress(OSError):
                port_file.unlink()


def _register(board: EmulatedRP2040, link: Path | None) -> Path:
    """The same registry entry as `microcot board virtual` (ports.list_virtual reads it)."""
    from ..files import write_private
    from ..ports import run_dir

    path = run_dir() / f"{board.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"name": board.name, "pid": os.getpid(), "port": board.port,
             "link": str(link) if link else None, "modem": board.modem_path,
             "flash": str(board.flash), "iccid": board.iccid, "uid": board.uid.hex().upper(),
             "drive": str(board.drive_dir), "kind": "rp2040", "runtime": "rp2040",
             "started": time.time()}
    write_private(path, json.dumps(entry, indent=1) + "\n")
    return path


def _unregister(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
