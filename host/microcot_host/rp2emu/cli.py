"""`microcot board rp2`: serve an emulated RP2040 (real rp2 firmware) on a pty until stopped."""

from __future__ import annotations

from pathlib import Path

import click

from ..cliopts import HELP
from ..fidelity import FidelityMissing
from ..vboard.serve import serve
from .board import BoardStartError, EmulatedRP2040, parse_uid


def _uid(_ctx: click.Context, _param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return parse_uid(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("rp2", context_settings=HELP)
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

    def announce() -> dict:
        port = str(link) if link else board.port
        click.echo(f"emulated RP2040 {name!r} on {board.port}" + (f" ({link})" if link else ""))
        click.echo(f"  flash: {board.flash}")
        click.echo(f"  drive: {board.drive_dir} (RPI-RP2 appears there after "
                   "machine.bootloader())")
        click.echo(f"  uid:   {board.uid.hex().upper()}")
        if board.modem_path:
            click.echo(f"  modem: UART0 -> {board.modem_path} (ICCID {iccid})")
        click.echo(f"  up in {board.boot_s:.1f} s; try: mpremote connect {port} repl")
        return {"link": str(link) if link else None, "modem": board.modem_path,
                "flash": str(board.flash), "iccid": board.iccid, "uid": board.uid.hex().upper(),
                "drive": str(board.drive_dir), "kind": "rp2040", "runtime": "rp2040"}

    serve(board, port_file=port_file, start_errors=(FidelityMissing, BoardStartError, OSError),
          announce=announce, why_stopped=lambda: f"the emulator stopped; see {board.log_path}")
