"""`microcot flash`: put MicroPython on boards (esptool for ESP32s, a UF2 copy for RP2s)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import click

from .. import boards, transport
from .. import ports as ports_mod
from ..cliopts import HELP
from . import FlashError, Running, resolve_firmware, wait_for_repl
from . import esp as esp_flash
from . import uf2 as uf2_flash

_print_lock = threading.Lock()


class _Run:
    """What one `microcot flash` did, for --json: the image and each board's outcome.

    Boards are flashed on threads that only know their port, so they record here; with --json
    the progress lines go to stderr and this is the one thing on stdout.
    """

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self.image: dict[str, object] = {}
        self.boards: dict[str, dict[str, object]] = {}

    def board(self, port: str, **fields: object) -> None:
        with _print_lock:
            self.boards.setdefault(port, {"port": port, "ok": False, "error": None}).update(fields)

    def as_dict(self, board: str, failed: list[str]) -> dict[str, object]:
        return {**self.image, "board": board, "boards": list(self.boards.values()),
                "ok": not failed}


_run = _Run()  # replaced by every invocation of the command


def _say(port: str | None, text: str, err: bool = False) -> None:
    with _print_lock:
        click.echo(f"{port}: {text}" if port else text, err=err or _run.as_json)


def resolve_ports(specs: tuple[str, ...]) -> list[str]:
    """--port values (repeated, lists, globs, `auto`, MICROCOT_PORT) as every command takes them."""
    try:
        return ports_mod.resolve(list(specs), allow_empty=True)
    except ports_mod.PortError as exc:
        raise FlashError(f"{exc}; nothing was written") from None


@click.command("flash", context_settings=HELP)
@click.option("--board", "-b", "board_name", envvar="MICROCOT_BOARD", required=True,
              help="board file name (boards/*.toml), e.g. esp32-generic or rp2-pico-w")
@ports_mod.port_option()
@click.option("--firmware", "-f", help="MicroPython firmware file (.bin for ESP32, .uf2 for RP2), "
              "or the name of a file in the firmware cache; default: the newest cached build")
@click.option("--erase", is_flag=True, help="ESP32: erase the whole flash first (the filesystem "
              "goes too)")
@click.option("--baud", type=int, default=None, help="ESP32: baud rate for writing (default: "
              "the board file's)")
@click.option("--before", type=click.Choice(esp_flash.BEFORE_MODES), default="default-reset",
              show_default=True, help="ESP32: how to get the chip into its ROM loader")
@click.option("--after", type=click.Choice(esp_flash.AFTER_MODES), default="hard-reset",
              show_default=True, help="ESP32: how to leave the loader when done")
@click.option("--no-stub", is_flag=True, help="ESP32: talk to the ROM loader only (slower)")
@click.option("--no-compress", is_flag=True, help="ESP32: send the image uncompressed")
@click.option("--drive", type=click.Path(file_okay=False, path_type=Path),
              help="RP2: the mounted BOOTSEL drive (RPI-RP2 / RP2350) of a board already in "
              "BOOTSEL")
@click.option("--bootsel", is_flag=True, help="RP2: the board is held in BOOTSEL (not running "
              "MicroPython): wait for its drive to appear")
@click.option("--no-wait", is_flag=True, help="do not wait for the MicroPython REPL afterwards")
@click.option("--timeout", "wait_timeout", default=30.0, show_default=True,
              help="seconds to wait for a BOOTSEL drive or for the REPL after flashing")
@click.option("--check", "check_only", is_flag=True,
              help="only check the firmware file against the board; touch no board")
@click.option("--verbose", "-v", is_flag=True, help="show all of esptool's output")
@click.option("--json", "as_json", is_flag=True,
              help="print the image check and each board's result as JSON (progress on stderr)")
def flash(board_name: str, port_specs: tuple[str, ...], firmware: str | None, erase: bool,
          baud: int | None, before: str, after: str, no_stub: bool, no_compress: bool,
          drive: Path | None, bootsel: bool, no_wait: bool, wait_timeout: float,
          check_only: bool, verbose: bool, as_json: bool) -> None:
    """Flash MicroPython onto one or more boards.

    ESP32 boards are flashed with esptool, several in parallel; RP2040/RP2350 boards get the UF2
    copied onto their BOOTSEL drive, one after another. The firmware is checked against the board
    before anything is written, and afterwards the MicroPython REPL is awaited.
    """
    global _run
    _run = _Run(as_json)
    try:
        board = boards.load(board_name)
        if board.family not in ("esp32", "rp2"):
            raise FlashError(f"board {board.name} ({board.family}) runs MicroPython's unix port: "
                             "there is nothing to flash (start one with `microcot board virtual`)")
        fw = resolve_firmware(board, firmware)
        data = fw.read_bytes()
        if board.family == "esp32":
            failed = _flash_esp(board, fw, data, port_specs, check_only, no_wait, wait_timeout,
                                esp_flash.EspOptions(
                                    baud=baud or int(board.raw.get("baud", 460800)),
                                    before=before, after=after, no_stub=no_stub, erase=erase,
                                    compress=not no_compress), verbose)
        else:
            failed = _flash_rp2(board, fw, data, port_specs, drive, bootsel, check_only, no_wait,
                                wait_timeout)
    except (FlashError, boards.BoardError, transport.BoardError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(_run.as_dict(board.name, failed), indent=2))
    if failed:
        raise click.ClickException(f"failed on {len(failed)} board(s): {', '.join(failed)}")


# ---- ESP32 -------------------------------------------------------------------------------------


def _flash_esp(board: boards.Board, fw: Path, data: bytes, given: tuple[str, ...],
               check_only: bool, no_wait: bool, wait_timeout: float,
               opts: esp_flash.EspOptions, verbose: bool) -> list[str]:
    offset = esp_flash.firmware_offset(board)
    report = esp_flash.check_image(data, board.chip, offset)
    _run.image = {"firmware": str(fw), "image": report.describe(),
                  "warnings": list(report.warnings)}
    _say(None, f"firmware {fw}: {report.describe()}")
    for warning in report.warnings:
        _say(None, f"warning: {warning}", err=True)
    if check_only:
        return []
    if opts.erase and opts.no_stub:
        raise FlashError("--erase needs esptool's flasher stub (the ROM loader cannot erase the "
                         "whole chip); leave out --no-stub")
    ports = resolve_ports(given)
    if not ports:
        raise FlashError("no port given (use --port, MICROCOT_PORT, or --port auto)")
    _say(None, f"flashing {len(ports)} board(s) with {esp_flash.chip_name(board.chip)} firmware at "
               f"{offset:#x}")
    shown: dict[str, int] = {}

    def on_event(port: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            step = event.get("percent", 0) // 10
            if step != shown.get(port) or event.get("done") == event.get("total"):
                shown[port] = step
                _say(port, f"{event.get('text') or 'writing'} {event.get('percent', 0)}%")
        elif kind == "chip":
            mac = f", MAC {event['mac']}" if event.get("mac") else ""
            _say(port, f"found {event.get('description') or event.get('chip')}{mac}")
        elif kind == "warning":
            _say(port, f"warning: {event.get('text')}", err=True)
        elif kind == "error":
            _say(port, f"error: {event.get('message')}", err=True)
        elif kind == "done":
            _say(port, f"wrote {event.get('bytes')} bytes at {event.get('offset', 0):#x}, "
                       "verified (MD5)")
        elif kind == "log" and (verbose or _key_line(event.get("text", ""))):
            _say(port, event.get("text", ""))
        elif kind == "stderr" and (verbose or "WARNING" in event.get("text", "")):
            _say(port, event.get("text", "").strip(), err=True)

    results = esp_flash.flash_many(ports, board.chip, offset, fw, opts, on_event)
    for p, r in results.items():
        _run.board(p, ok=r.ok, error=r.error)
    failed = [p for p, r in results.items() if not r.ok]
    flashed = [p for p in ports if p not in failed]
    if not no_wait and opts.after != "no-reset":
        failed += _await_repls(flashed, wait_timeout)
    return failed


def _key_line(text: str) -> bool:
    # the few esptool lines a person flashing a board wants to see without -v
    return text.startswith(("Changing baud rate", "Erasing flash", "Chip erase",
                            "Hard resetting", "Hash of data verified", "Connecting"))


def _await_repls(ports: list[str], timeout: float) -> list[str]:
    failed: list[str] = []

    def wait(port: str) -> None:
        try:
            running = wait_for_repl([port], timeout)
        except FlashError as exc:
            failed.append(port)
            _run.board(port, ok=False, error=str(exc))
            _say(port, f"error: {exc}", err=True)
        else:
            _run.board(port, micropython=running.describe())
            _say(port, running.describe())

    threads = [threading.Thread(target=wait, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


# ---- RP2040 / RP2350 ---------------------------------------------------------------------------


def _flash_rp2(board: boards.Board, fw: Path, data: bytes, given: tuple[str, ...],
               drive_path: Path | None, bootsel: bool, check_only: bool, no_wait: bool,
               wait_timeout: float) -> list[str]:
    report = uf2_flash.validate_uf2(data, board.chip, board.raw.get("uf2_family"))
    _run.image = {"firmware": str(fw), "image": report.describe(),
                  "warnings": []}
    _say(None, f"firmware {fw}: {report.describe()}")
    if check_only:
        return []
    ports = resolve_ports(given)
    if drive_path is not None or bootsel:
        if len(ports) > 1:
            raise FlashError("--drive/--bootsel flash one board; give at most one --port (where "
                             "to wait for its REPL)")
        if drive_path is not None:
            drive = uf2_flash.read_drive(drive_path)
            if drive is None:
                raise FlashError(f"{drive_path}: no INFO_UF2.TXT there, so not a BOOTSEL drive "
                                 "(is the board in BOOTSEL and the drive mounted?)")
        else:
            _say(None, "waiting for the BOOTSEL drive (hold BOOTSEL while plugging the board in)")
            drive = uf2_flash.wait_for_drive(board.chip, wait_timeout)
        port = ports[0] if ports else None
        others = [p for p in uf2_flash.rp2_serial_ports() if p != port]
        return _copy_and_wait(board, fw, data, drive, port, others, no_wait, wait_timeout)
    if not ports:
        present = uf2_flash.find_drives(board.chip)
        if len(present) != 1:
            raise FlashError("no board given: pass --port of a board running MicroPython, or hold "
                             "BOOTSEL while plugging the board in and use --bootsel or --drive")
        others = uf2_flash.rp2_serial_ports()
        return _copy_and_wait(board, fw, data, present[0], None, others, no_wait, wait_timeout)
    failed: list[str] = []
    # one at a time: every board's drive looks the same, so only the order tells them apart
    for port in ports:
        try:
            before = [d.path for d in uf2_flash.find_drives()]
            others = [p for p in uf2_flash.rp2_serial_ports() if p != port]
            info = uf2_flash.enter_bootsel(port)
            _say(port, f"MicroPython {info.version} asked to reboot into BOOTSEL")
            drive = uf2_flash.wait_for_drive(board.chip, wait_timeout, exclude=before)
            failed += _copy_and_wait(board, fw, data, drive, port, others, no_wait, wait_timeout)
        except (FlashError, transport.BoardError) as exc:
            _run.board(port, ok=False, error=str(exc))
            _say(port, f"error: {exc}", err=True)
            failed.append(port)
    return failed


def _copy_and_wait(board: boards.Board, fw: Path, data: bytes, drive: uf2_flash.Uf2Drive,
                   port: str | None, others: list[str], no_wait: bool,
                   wait_timeout: float) -> list[str]:
    uf2_flash.check_drive(drive, board.chip)
    label = port or str(drive.path)
    _say(label, f"copying {len(data)} bytes to {drive.path} ({drive.board_id or 'UF2 drive'})")
    shown = [-1]

    def progress(done: int, total: int) -> None:
        step = 100 * done // total // 25
        if step != shown[0]:
            shown[0] = step
            _say(label, f"copied {100 * done // total}%")

    uf2_flash.copy_to_drive(data, drive, fw.name, progress)
    _say(label, "copied; the board reboots into the new firmware")
    _run.board(label, ok=True, drive=str(drive.path))
    if no_wait:
        return []

    def rescan() -> list[str]:
        # the board may come back under another name; boards that were there before are others
        return [p for p in uf2_flash.rp2_serial_ports() if p not in others]

    try:
        running: Running = wait_for_repl([port] if port else [], wait_timeout, rescan=rescan)
    except FlashError as exc:
        _run.board(label, ok=False, error=str(exc))
        _say(label, f"error: {exc}", err=True)
        return [label]
    _run.board(label, micropython=running.describe())
    _say(running.port, running.describe())
    return []
