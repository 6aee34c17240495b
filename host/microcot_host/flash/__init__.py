"""Flashing MicroPython onto boards: esptool for the ESP32 family, a UF2 copy for RP2040/RP2350.

This module holds what both paths share: the error type, where firmware files come from (the
user's path or the cache, with a clear pointer to the official downloads) and waiting for the
MicroPython REPL once the new firmware boots. The paths themselves are `esp` and `uf2`; the
command is `cli`. Nothing here imports esptool, so the UF2 path and `--help` stay light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import boards, transport
from ..paths import state_dir

__all__ = ["DOWNLOAD_URL", "MICROPYTHON_BOARDS", "FlashError", "Running", "cache_dir",
           "download_hint", "micropython_board", "resolve_firmware", "wait_for_repl"]

DOWNLOAD_URL = "https://micropython.org/download/{board}/"

# our board name -> MicroPython's board id (the name on micropython.org and in its file names);
# a board file may say `micropython_board = "..."` instead
MICROPYTHON_BOARDS = {
    "esp32-generic": "ESP32_GENERIC",
    "esp32-s3": "ESP32_GENERIC_S3",
    "esp32-c3": "ESP32_GENERIC_C3",
    "rp2-pico-w": "RPI_PICO_W",
    "rp2-pico2-w": "RPI_PICO2_W",
}

# what the official download page offers per family, and what each flashing path accepts
FIRMWARE_SUFFIX = {"esp32": ".bin", "rp2": ".uf2"}


class FlashError(RuntimeError):
    """Flashing cannot go on: the message says what is wrong and, where it can, what to do."""


def cache_dir() -> Path:
    return state_dir() / "firmware"


def micropython_board(board: boards.Board) -> str | None:
    return board.raw.get("micropython_board") or MICROPYTHON_BOARDS.get(board.name)


def download_hint(board: boards.Board) -> str:
    mp = micropython_board(board)
    suffix = FIRMWARE_SUFFIX.get(board.family, "")
    where = (f"download the {suffix} file from {DOWNLOAD_URL.format(board=mp)}" if mp else
             "download a MicroPython build for it from https://micropython.org/download/")
    return (f"{where} and pass it with --firmware PATH, or put it into {cache_dir()} "
            f"and pass its file name")


def resolve_firmware(board: boards.Board, given: str | None) -> Path:
    """The firmware file to flash: a path, a file name in the cache, or the newest cached build.

    Official builds are named `<BOARD>-<date>-v<version>.<ext>`, so the newest sorts last.
    """
    if board.family not in FIRMWARE_SUFFIX:
        raise FlashError(f"board {board.name} ({board.family}) has no firmware to flash")
    cache = cache_dir()
    if given:
        path = Path(given).expanduser()
        if path.is_file():
            return path
        cached = cache / given
        if path.name == given and cached.is_file():
            return cached
        raise FlashError(f"firmware {given}: no such file (nor in the cache {cache}); "
                         f"{download_hint(board)}")
    mp = micropython_board(board)
    suffix = FIRMWARE_SUFFIX[board.family]
    found = sorted(cache.glob(f"{mp}-*{suffix}")) if mp and cache.is_dir() else []
    if not found:
        raise FlashError(f"no firmware given for {board.name}: {download_hint(board)}")
    return found[-1]


@dataclass(frozen=True)
class Running:
    port: str
    info: transport.BoardInfo

    def describe(self) -> str:
        machine = f" ({self.info.machine})" if self.info.machine else ""
        return f"MicroPython {self.info.version} on {self.info.platform}{machine}"


def wait_for_repl(ports: list[str] | None, timeout: float, rescan=None,
                  baudrate: int = 115200) -> Running:
    """Wait until one of `ports` (or of those `rescan()` returns) answers with a raw REPL.

    A freshly flashed board formats its filesystem on first boot and a USB board enumerates
    again, so the port may be absent or mute for several seconds; keep trying until `timeout`.
    """
    deadline = time.monotonic() + timeout
    last = "no serial port seen"
    while True:
        candidates = list(ports or [])
        if rescan is not None:
            candidates += [p for p in rescan() if p not in candidates]
        for port in candidates:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                t = transport.open_board(port, baudrate=baudrate, timeout=min(5.0, max(left, 1.0)))
            except transport.BoardError as exc:
                last = str(exc)
                continue
            try:
                return Running(port, transport.board_info(t))
            except (transport.BoardError, transport.TransportExecError, OSError) as exc:
                last = f"{port}: {exc}"
            finally:
                transport.close(t)
        if time.monotonic() >= deadline:
            raise FlashError(f"no MicroPython REPL within {timeout:g} s after flashing ({last})")
        time.sleep(0.5)
