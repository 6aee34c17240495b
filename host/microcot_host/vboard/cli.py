"""`microcot board virtual`: serve a virtual board on a pseudo-terminal until stopped."""

from __future__ import annotations

from pathlib import Path

import click

from ..cliopts import HELP
from .board import BoardStartError, VirtualBoard, parse_heap, parse_mac
from .serve import serve


@click.group("board", context_settings=HELP)
def board() -> None:
    """Boards without hardware."""


def _heap(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    try:
        return parse_heap(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _mac(_ctx: click.Context, _param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return parse_mac(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@board.command("virtual")
@click.option("--name", "-n", default="vboard", show_default=True,
              help="board name: selects its flash directory and default MAC")
@click.option("--board", "board_name", default="virtual", show_default=True, metavar="NAME",
              help="board file: its runtime (unix64, i386-esp32, i386-rp2) and heap budget, "
                   "e.g. esp32-generic or rp2-pico-w")
@click.option("--runtime", default=None, metavar="RUNTIME",
              help="override the board file's runtime: unix64 (64-bit developer board), "
                   "i386-esp32, i386-rp2, rp2040 (= --emulated)")
@click.option("--emulated", is_flag=True,
              help="an rp2 board file's real firmware in an emulated RP2040 (microcot board rp2)")
@click.option("--heap", callback=_heap, metavar="SIZE",
              help="the interpreter's whole heap, e.g. 100k or 2m (default: the size that "
                   "leaves the board file's heap_budget free after boot)")
@click.option("--iccid", metavar="ICCID",
              help="attach an emulated AT modem with a SIM of this ICCID")
@click.option("--imsi", metavar="IMSI", help="IMSI of the emulated SIM (with --iccid)")
@click.option("--mac", callback=_mac, metavar="MAC",
              help="the board's MAC address (default: derived from the name)")
@click.option("--flash", "flash_dir", type=click.Path(file_okay=False, path_type=Path),
              help="directory that is the board's filesystem "
                   "(default: <state dir>/boards/<name>/flash)")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="also make this symlink point at the pty, e.g. /tmp/ttyVB0")
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path),
              help="write the pty path to this file once the board is up (for scripts)")
@click.option("--deploy", "do_deploy", is_flag=True,
              help="deploy the firmware onto the board after it starts")
@click.pass_context
def virtual(ctx: click.Context, name: str, board_name: str, runtime: str | None, emulated: bool,
            heap: int | None, iccid: str | None, imsi: str | None,
            mac: bytes | None, flash_dir: Path | None, link: Path | None,
            port_file: Path | None, do_deploy: bool) -> None:
    """Serve a virtual MicroPython board on a pseudo-terminal until Ctrl-C or SIGTERM.

    The printed port behaves like a USB-serial MicroPython board: mpremote, `microcot deploy`
    and the HIL tests use it exactly like /dev/ttyUSB0. The flash directory persists across runs.
    Without --iccid the board has no modem (`_vboard.modem_path` is None).
    """
    if imsi and not iccid:
        raise click.BadParameter("--imsi needs --iccid", param_hint="--imsi")
    from .. import boards
    from ..fidelity import FidelityMissing
    from .models import make_board

    if emulated or runtime == "rp2040":
        _emulated(ctx, board_name, name, iccid, flash_dir, link, port_file, heap, mac, do_deploy)
        return
    try:
        vb = make_board(board_name, name=name, runtime=runtime, heap=heap, iccid=iccid,
                        imsi=imsi, mac=mac, flash_dir=flash_dir, link=link)
    except (ValueError, boards.BoardError) as exc:
        raise click.UsageError(str(exc)) from None
    except (FidelityMissing, BoardStartError) as exc:
        raise click.ClickException(str(exc)) from None
    assert isinstance(vb, VirtualBoard)
    model = runtime or boards.load(board_name).runtime

    def announce() -> dict:
        port = str(link) if link else vb.port
        click.echo(f"virtual board {name!r} on {vb.port}" + (f" ({link})" if link else ""))
        heap_note = f"-X heapsize={vb.heap}" if vb.heap else "the unix port's default heap"
        click.echo(f"  model: {board_name} on {model}, {heap_note}"
                   + ("  (64-bit developer board: no heap figure holds for a real MCU)"
                      if model == "unix64" else ""))
        click.echo(f"  flash: {vb.flash_dir}")
        click.echo(f"  MAC:   {vb.mac.hex(':').upper()}")
        if vb.modem_path:
            click.echo(f"  modem: {vb.modem_path} (ICCID {iccid})")
        click.echo(f"  try:   mpremote connect {port} repl")
        if do_deploy:
            _deploy(vb.port)
        return {"link": str(link) if link else None, "modem": vb.modem_path,
                "flash": str(vb.flash_dir), "mac": vb.mac.hex(":").upper(), "iccid": iccid,
                "runtime": model}

    serve(vb, port_file=port_file, start_errors=(BoardStartError, OSError), announce=announce,
          why_stopped=lambda: f"the board's supervisor stopped: {vb.error}")


def _emulated(ctx: click.Context, board_name: str, name: str, iccid: str | None,
              flash_dir: Path | None, link: Path | None, port_file: Path | None,
              heap: int | None, mac: bytes | None, do_deploy: bool) -> None:
    """`--emulated`: what `microcot board rp2` does, with the board file's firmware."""
    from .. import boards, fidelity
    from ..rp2emu.cli import rp2

    bdef = boards.load(board_name)
    if bdef.family != "rp2":
        raise click.UsageError(f"--emulated: {board_name} is not an rp2 board (an RP2040 is "
                               "emulated; try --board rp2-pico-w)")
    if heap is not None or mac is not None or do_deploy:
        raise click.UsageError("--heap, --mac and --deploy do not apply to the emulated RP2040 "
                               "(its RAM and ID are the chip's; deploy with microcot deploy)")
    try:
        firmware = fidelity.rp2_firmware(str(bdef.raw.get("firmware", "RPI_PICO_W")))
    except fidelity.FidelityMissing as exc:
        raise click.ClickException(str(exc)) from None
    flash = flash_dir / "rp2-flash.bin" if flash_dir is not None else None
    ctx.invoke(rp2, firmware=firmware, name=name, flash=flash, uid=None, iccid=iccid, link=link,
               port_file=port_file)


def _deploy(port: str) -> None:
    try:
        from ..deploy import deploy
    except ImportError:
        click.echo("  (deploy is not available in this installation; skipped)")
        return
    try:
        result = deploy(port, board="virtual")
    except Exception as exc:  # the board keeps running; the user sees why deploy failed
        click.echo(f"  deploy failed: {exc}", err=True)
        return
    click.echo(f"  deployed: {len(result.copied)} files copied, {len(result.unchanged)} unchanged")
board.add_command(__import__("microcot_host.rp2emu.cli", fromlist=["rp2"]).rp2)  # microcot board rp2
