"""Flashing the ESP32 family with esptool's public Python API (esptool 5).

Order of events for one board, so that nothing is written that should not be:
  1. the image is checked with esptool's own image parser (magic, chip id, checksum, SHA-256),
     against the chip the board file names, before any port is opened;
  2. the chip is detected and compared with the board file;
  3. only then: stub (unless --no-stub), faster baud, flash attach, optional erase, write at the
     chip's MicroPython offset, MD5 verify (inside esptool's write_flash), reset.

esptool logs through one process-wide logger, so each port is flashed by its own worker process
(`python -m microcot_host.flash.esp ...`) that reports events as JSON lines on stdout; `flash_many`
runs the workers in parallel and hands their events to the caller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import boards
from . import FlashError

__all__ = ["CHIP_OFFSETS", "EspOptions", "ImageReport", "WorkerResult", "check_image",
           "chip_name", "firmware_offset", "flash_many", "flash_port"]

# Where MicroPython's firmware .bin goes: the second-stage bootloader's offset, which differs by
# chip (ROM reads it from there). Kept here rather than trusted from the board file alone,
# because a wrong offset leaves a board that does not boot.
CHIP_OFFSETS = {
    "esp32": 0x1000,
    "esp32s2": 0x1000,
    "esp32s3": 0x0,
    "esp32c2": 0x0,
    "esp32c3": 0x0,
    "esp32c6": 0x0,
    "esp32h2": 0x0,
    "esp32c5": 0x2000,
    "esp32p4": 0x2000,
}

# In a MicroPython .bin, the application image sits at flash 0x10000 (after bootloader and
# partition table); checking it too catches a truncated or patched download.
APP_FLASH_OFFSET = 0x10000

ESP_IMAGE_MAGIC = 0xE9
ROM_BAUD = 115200
BEFORE_MODES = ("default-reset", "usb-reset", "no-reset")
AFTER_MODES = ("hard-reset", "soft-reset", "no-reset")


def chip_name(chip: str) -> str:
    """esptool's display name for a chip key ("esp32s3" -> "ESP32-S3")."""
    from esptool.targets import CHIP_DEFS

    cls = CHIP_DEFS.get(chip)
    return cls.CHIP_NAME if cls else chip


def firmware_offset(board: boards.Board) -> int:
    chip = board.chip
    if chip not in CHIP_OFFSETS:
        raise FlashError(f"board {board.name}: chip {chip!r} is not one esptool flashing knows "
                         f"here (known: {', '.join(CHIP_OFFSETS)})")
    offset = CHIP_OFFSETS[chip]
    declared = board.raw.get("flash_offset")
    if declared is not None and declared != offset:
        raise FlashError(f"board {board.name}: flash_offset = {declared:#x} in its board file, but "
                         f"MicroPython for {chip_name(chip)} goes at {offset:#x}; fix the board file")
    return offset


@dataclass(frozen=True)
class ImageReport:
    chip: str
    size: int
    segments: int
    sha256: bool
    app: str | None = None
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        digest = ", SHA-256 valid" if self.sha256 else ""
        text = (f"{chip_name(self.chip)} image, {self.size} bytes, {self.segments} segments, "
                f"checksum valid{digest}")
        return text + (f"; {self.app}" if self.app else "")


def _chip_by_image_id() -> dict[int, str]:
    from esptool.targets import CHIP_DEFS

    return {cls.IMAGE_CHIP_ID: key for key, cls in CHIP_DEFS.items()
            if key != "esp8266" and getattr(cls, "IMAGE_CHIP_ID", None) is not None}


def _check_one(data: bytes, chip: str, what: str) -> tuple[int, bool]:
    """Validate one ESP image (header, chip, checksum, digest); return (segments, has_sha256)."""
    from esptool.bin_image import LoadFirmwareImage
    from esptool.util import FatalError

    if len(data) < 24:
        raise FlashError(f"{what}: {len(data)} bytes is too short for an ESP image")
    if data[0] != ESP_IMAGE_MAGIC:
        raise FlashError(f"{what}: not an ESP firmware image (first byte {data[0]:#04x}, expected "
                         f"{ESP_IMAGE_MAGIC:#04x}; a .uf2, .elf or .hex is not flashable here)")
    # the extended header names the chip the image was built for (esptool's image_info reads the
    # same field); compare it first so the message names the chip, not a parse error
    image_chip_id = struct.unpack_from("<H", data, 12)[0]
    built_for = _chip_by_image_id().get(image_chip_id)
    if built_for != chip:
        found = chip_name(built_for) if built_for else "an unknown chip"
        raise FlashError(f"{what}: built for {found} (image chip id {image_chip_id}), but the "
                         f"board has an {chip_name(chip)}")
    try:
        image = LoadFirmwareImage(chip, data)
    except (FatalError, RuntimeError, struct.error, TypeError, ValueError, IndexError) as exc:
        raise FlashError(f"{what}: corrupt image ({exc})") from None
    calculated = image.calculate_checksum()
    if image.checksum != calculated:
        raise FlashError(f"{what}: corrupt image (checksum {image.checksum:#04x}, the segments "
                         f"give {calculated:#04x})")
    if image.append_digest and image.stored_digest != image.calc_digest:
        raise FlashError(f"{what}: corrupt image (the appended SHA-256 does not match)")
    return len(image.segments), bool(image.append_digest)


def check_image(data: bytes, chip: str, offset: int) -> ImageReport:
    """Check a firmware .bin for `chip` before anything is written; raise FlashError if bad."""
    segments, digest = _check_one(data, chip, "firmware")
    app = None
    warnings: list[str] = []
    app_at = APP_FLASH_OFFSET - offset
    if len(data) > app_at:
        if data[app_at] == ESP_IMAGE_MAGIC:
            n, _ = _check_one(data[app_at:], chip, f"application image at {APP_FLASH_OFFSET:#x}")
            app = f"application at {APP_FLASH_OFFSET:#x} valid ({n} segments)"
        else:
            warnings.append(f"no application image at {APP_FLASH_OFFSET:#x}: is this the full "
                            "MicroPython firmware .bin?")
    return ImageReport(chip, len(data), segments, digest, app, tuple(warnings))


# ---- the worker: one process per port ----------------------------------------------------------


@dataclass(frozen=True)
class EspOptions:
    baud: int = 460800
    before: str = "default-reset"
    after: str = "hard-reset"
    no_stub: bool = False
    erase: bool = False
    compress: bool = True
    connect_attempts: int = 7

    def argv(self) -> list[str]:
        args = ["--baud", str(self.baud), "--before", self.before, "--after", self.after,
                "--connect-attempts", str(self.connect_attempts)]
        args += ["--no-stub"] if self.no_stub else []
        args += ["--erase"] if self.erase else []
        args += [] if self.compress else ["--no-compress"]
        return args


Emit = Callable[..., None]


def _plain(text: str) -> str:
    # esptool escapes square brackets for rich markup; show what a terminal would
    try:
        from rich.text import Text

        return Text.from_markup(text).plain
    except Exception:  # noqa: BLE001 - a message that is not valid markup is shown as is
        return text


def _event_logger(emit: Emit):
    from esptool.logger import TemplateLogger

    class EventLogger(TemplateLogger):
        """esptool's documented custom-logger hook, turned into events for the parent."""

        def __init__(self) -> None:
            self._line = ""
            self._percent = -1

        def print(self, *args: Any, **kwargs: Any) -> None:
            sep, end = kwargs.get("sep", " "), kwargs.get("end", "\n")
            self._line += sep.join(str(a) for a in args) + end
            while "\n" in self._line:
                line, self._line = self._line.split("\n", 1)
                if line.strip():
                    emit("log", text=_plain(line.rstrip()))

        def note(self, message: str) -> None:
            emit("log", text="Note: " + _plain(str(message)))

        def warning(self, message: str) -> None:
            emit("warning", text=_plain(str(message)))

        def error(self, message: str) -> None:
            emit("warning", text=_plain(str(message)))

        def stage(self, finish: bool = False) -> None:
            pass

        def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "",
                         suffix: str = "", bar_length: int = 30) -> None:
            percent = 100 * cur_iter // total_iters if total_iters else 100
            # a ROM write reports every 1 KiB block; a line per 5 % is enough for a person
            if percent // 5 != self._percent // 5 or cur_iter >= total_iters:
                self._percent = percent
                emit("progress", done=cur_iter, total=total_iters, percent=percent,
                     text=_plain(prefix.strip()))

        def set_verbosity(self, verbosity: str) -> None:
            pass

    return EventLogger()


def flash_port(port: str, chip: str, offset: int, data: bytes, opts: EspOptions,
               emit: Emit) -> dict[str, Any]:
    """Flash one board in this process (esptool's logger is taken over: one port per process)."""
    import serial
    from esptool.cmds import attach_flash, detect_chip, reset_chip, run_stub, write_flash
    from esptool.logger import log
    from esptool.util import FatalError

    log.set_logger(_event_logger(emit))
    report = check_image(data, chip, offset)
    if opts.erase and opts.no_stub:
        raise FlashError("--erase needs esptool's flasher stub (the ROM loader cannot erase the "
                         "whole chip); leave out --no-stub")
    if not port.startswith(("rfc2217://", "socket://")) and not os.path.exists(port):
        raise FlashError(f"{port}: no such serial port (is the board plugged in?)")
    emit("log", text=f"connecting ({opts.before})")
    try:
        esp = detect_chip(port, baud=ROM_BAUD, connect_mode=opts.before,
                          connect_attempts=opts.connect_attempts)
    except (FatalError, OSError, serial.SerialException) as exc:
        raise FlashError(f"{port}: no ESP bootloader answers ({_plain(str(exc)).strip()}); "
                         "hold BOOT and tap RESET if the board does not reset itself") from None
    with esp:
        if chip_name(chip) != esp.CHIP_NAME:
            raise FlashError(f"{port}: the chip is an {esp.CHIP_NAME}, but the board file wants "
                             f"an {chip_name(chip)}; pick the matching --board")
        info: dict[str, Any] = {"chip": esp.CHIP_NAME}
        with contextlib.suppress(FatalError, NotImplementedError, OSError):
            info["description"] = esp.get_chip_description()
        with contextlib.suppress(FatalError, NotImplementedError, OSError, TypeError):
            info["mac"] = ":".join(f"{b:02x}" for b in esp.read_mac())
        emit("chip", **info)
        try:
            if not opts.no_stub:
                esp = run_stub(esp)
            if opts.baud > ROM_BAUD:
                esp.change_baud(opts.baud)
            attach_flash(esp)
            write_flash(esp, [(offset, data)], erase_all=opts.erase,
                        compress=opts.compress, no_compress=not opts.compress)
            reset_chip(esp, opts.after)
        except (FatalError, OSError, serial.SerialException) as exc:
            raise FlashError(f"{port}: {_plain(str(exc)).strip()}") from None
    return {"chip": info.get("description", esp.CHIP_NAME), "mac": info.get("mac"),
            "bytes": len(data), "offset": offset, "image": report.describe()}


def _worker(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microcot_host.flash.esp",
                                 description="flash one ESP board; JSON-line events on stdout")
    ap.add_argument("--port", required=True)
    ap.add_argument("--chip", required=True, choices=sorted(CHIP_OFFSETS))
    ap.add_argument("--offset", required=True, type=lambda s: int(s, 0))
    ap.add_argument("--firmware", required=True, type=Path)
    ap.add_argument("--baud", type=int, default=EspOptions.baud)
    ap.add_argument("--before", choices=BEFORE_MODES, default=EspOptions.before)
    ap.add_argument("--after", choices=AFTER_MODES, default=EspOptions.after)
    ap.add_argument("--connect-attempts", type=int, default=EspOptions.connect_attempts)
    ap.add_argument("--no-stub", action="store_true")
    ap.add_argument("--erase", action="store_true")
    ap.add_argument("--no-compress", action="store_true")
    a = ap.parse_args(argv)
    out = sys.stdout
    lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        with lock:
            out.write(json.dumps({"event": event, **fields}) + "\n")
            out.flush()

    # esptool or a library might print on its own; keep our stdout for events only
    sys.stdout = sys.stderr
    opts = EspOptions(a.baud, a.before, a.after, a.no_stub, a.erase, not a.no_compress,
                      a.connect_attempts)
    try:
        data = a.firmware.read_bytes()
        result = flash_port(a.port, a.chip, a.offset, data, opts, emit)
    except FlashError as exc:
        emit("error", message=str(exc))
        return 1
    except OSError as exc:
        emit("error", message=f"{a.firmware}: {exc.strerror or exc}")
        return 1
    emit("done", **result)
    return 0


# ---- the parent: several workers in parallel --------------------------------------------------


@dataclass
class WorkerResult:
    port: str
    ok: bool = False
    error: str | None = None
    done: dict[str, Any] = field(default_factory=dict)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # the worker must import this very package, even from a source checkout
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flash_many(ports: list[str], chip: str, offset: int, firmware: Path, opts: EspOptions,
               on_event: Callable[[str, dict[str, Any]], None]) -> dict[str, WorkerResult]:
    """Flash every port at once, one worker process each; events go to on_event(port, event)."""
    results = {p: WorkerResult(p) for p in ports}

    def run(port: str) -> None:
        res = results[port]
        cmd = [sys.executable, "-m", "microcot_host.flash.esp", "--port", port, "--chip", chip,
               "--offset", hex(offset), "--firmware", str(firmware), *opts.argv()]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_worker_env())
        except OSError as exc:
            res.error = f"cannot start the flashing worker: {exc}"
            return
        stderr: list[str] = []

        def drain() -> None:
            # esptool bound some warnings (e.g. "Chip was NOT reset") to its own logger before
            # ours was installed; they arrive here
            for line in proc.stderr:
                stderr.append(line)
                if line.strip():
                    on_event(port, {"event": "stderr", "text": _plain(line.rstrip())})

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "log", "text": line.rstrip()}
            if event.get("event") == "done":
                res.ok, res.done = True, event
            elif event.get("event") == "error":
                res.error = event.get("message")
            on_event(port, event)
        proc.wait()
        drainer.join(timeout=5)
        if proc.returncode != 0 and res.error is None:
            tail = "".join(stderr).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            res.error = f"the flashing worker failed: {tail[0]}"
        if proc.returncode != 0:
            res.ok = False

    threads = [threading.Thread(target=run, args=(p,), name=f"flash {p}") for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


if __name__ == "__main__":
    sys.exit(_worker())
