"""Flashing RP2040/RP2350 boards: validate the UF2, get the board into BOOTSEL, copy the file.

The bootrom's USB drive (`RPI-RP2` on an RP2040, `RP2350` on an RP2350) takes a UF2 file and
writes its blocks to flash, then reboots into the new firmware; the drive vanishes as it does.
Since the bootrom silently ignores blocks it does not like (wrong family, bad address), a bad file
would look like success with nothing flashed, so every block is checked here first.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import transport
from . import FlashError

__all__ = ["BLOCK_SIZE", "FAMILIES", "FAMILY_NAMES", "Uf2Drive", "Uf2Report", "copy_to_drive",
           "enter_bootsel", "find_drives", "parse_info", "rp2_serial_ports", "validate_uf2",
           "wait_for_drive"]

BLOCK_SIZE = 512
MAGIC_START0 = 0x0A324655
MAGIC_START1 = 0x9E5D5157
MAGIC_END = 0x0AB16F30
MAX_PAYLOAD = 476
RP_PAYLOAD = 256

FLAG_NOT_MAIN_FLASH = 0x00000001
FLAG_FILE_CONTAINER = 0x00001000
FLAG_FAMILY_ID = 0x00002000
FLAG_EXTENSION_TAGS = 0x00008000

RP2040 = 0xE48BFF56
ABSOLUTE = 0xE48BFF57
DATA = 0xE48BFF58
RP2350_ARM_S = 0xE48BFF59
RP2350_RISCV = 0xE48BFF5A
RP2350_ARM_NS = 0xE48BFF5B
# picotool puts this one-block "ignore me" file first in RP2350 UF2s (erratum RP2350-E10): an
# absolute-family block at 0x10ffff00 whose extension tag tells the bootrom to drop it
RP2_IGNORE_BLOCK_TAG = 0x9957E304

FAMILY_NAMES = {
    RP2040: "RP2040", ABSOLUTE: "absolute", DATA: "data", RP2350_ARM_S: "RP2350 Arm Secure",
    RP2350_RISCV: "RP2350 RISC-V", RP2350_ARM_NS: "RP2350 Arm Non-secure",
}
# families a chip's bootrom boots from the main flash image
FAMILIES = {
    "rp2040": (RP2040,),
    "rp2350": (RP2350_ARM_S, RP2350_RISCV, RP2350_ARM_NS),
}
# the XIP flash window each chip maps (RP2350 can map a second chip select after the first)
FLASH_WINDOW = {"rp2040": (0x10000000, 16 << 20), "rp2350": (0x10000000, 32 << 20)}
# what INFO_UF2.TXT says on each chip's bootrom drive
DRIVE_BOARD_IDS = {"rp2040": ("RPI-RP2",), "rp2350": ("RP2350",)}

RP2_USB_VID = 0x2E8A
# sys.platform of the boards whose machine.bootloader() means the UF2 bootrom
BOOTSEL_PLATFORMS = ("rp2",)


def family_name(family: int) -> str:
    return FAMILY_NAMES.get(family, f"{family:#010x}")


@dataclass(frozen=True)
class Uf2Report:
    blocks: int
    family: int
    start: int
    end: int
    ignored: int

    def describe(self) -> str:
        extra = f", {self.ignored} foreign blocks ignored by the bootrom" if self.ignored else ""
        return (f"UF2 for {family_name(self.family)}, {self.blocks} blocks, flash "
                f"{self.start:#010x}-{self.end - 1:#010x}{extra}")


def _is_ignore_block(flags: int, family: int, size: int, raw: bytes) -> bool:
    if family != ABSOLUTE or not flags & FLAG_EXTENSION_TAGS:
        return False
    tag_at = 32 + size
    return tag_at + 4 <= 508 and struct.unpack_from("<I", raw, tag_at)[0] == RP2_IGNORE_BLOCK_TAG


def validate_uf2(data: bytes, chip: str, board_family: int | None = None) -> Uf2Report:
    """Check every block of a UF2 for `chip` ("rp2040"/"rp2350"); raise FlashError naming the block.

    Blocks of other families are legal in a UF2 (one file can carry builds for several chips; the
    bootrom skips the others), but there must be a complete run for this chip, numbered 0..n-1.
    """
    if chip not in FAMILIES:
        raise FlashError(f"chip {chip!r} takes no UF2 here (known: {', '.join(FAMILIES)})")
    wanted = FAMILIES[chip]
    if board_family is not None and board_family not in wanted:
        raise FlashError(f"the board file's uf2_family {board_family:#010x} is not a family of "
                         f"{chip.upper()} ({', '.join(f'{f:#x}' for f in wanted)})")
    if not data:
        raise FlashError("firmware: empty file, not a UF2")
    if len(data) % BLOCK_SIZE:
        raise FlashError(f"firmware: {len(data)} bytes is not a whole number of 512-byte UF2 "
                         "blocks (truncated download, or not a .uf2?)")
    window_start, window_size = FLASH_WINDOW[chip]
    window_end = window_start + window_size
    mine: list[tuple[int, int, int, int]] = []  # (index, block number, count, address)
    families: dict[int, int] = {}
    ignored = 0
    for index in range(len(data) // BLOCK_SIZE):
        raw = data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
        m0, m1, flags, addr, size, number, count, family = struct.unpack_from("<8I", raw)
        (m_end,) = struct.unpack_from("<I", raw, 508)
        where = f"block {index} (file offset {index * BLOCK_SIZE:#x})"
        if m0 != MAGIC_START0 or m1 != MAGIC_START1:
            raise FlashError(f"{where}: bad UF2 start magic {m0:#010x} {m1:#010x} (expected "
                             f"{MAGIC_START0:#010x} {MAGIC_START1:#010x}): not a UF2 file, "
                             "or a corrupt one")
        if m_end != MAGIC_END:
            raise FlashError(f"{where}: bad UF2 end magic {m_end:#010x} (expected "
                             f"{MAGIC_END:#010x})")
        if flags & FLAG_FILE_CONTAINER:
            raise FlashError(f"{where}: a UF2 file container (flag 0x1000), not a flash image")
        if flags & FLAG_NOT_MAIN_FLASH:
            ignored += 1
            continue
        if not flags & FLAG_FAMILY_ID:
            raise FlashError(f"{where}: no family id (flag 0x2000 not set); the "
                             f"{chip.upper()} bootrom needs one")
        if size > MAX_PAYLOAD:
            raise FlashError(f"{where}: payload of {size} bytes, more than the {MAX_PAYLOAD} a "
                             "block holds")
        if _is_ignore_block(flags, family, size, raw):
            ignored += 1
            continue
        if number >= count:
            raise FlashError(f"{where}: block number {number} is not below its block count "
                             f"{count}")
        families[family] = families.get(family, 0) + 1
        if family not in wanted:
            ignored += 1
            continue
        if size != RP_PAYLOAD:
            raise FlashError(f"{where} (block number {number}): payload of {size} bytes; "
                             f"{chip.upper()} blocks carry {RP_PAYLOAD}")
        if addr % RP_PAYLOAD:
            raise FlashError(f"{where} (block number {number}): address {addr:#010x} is not "
                             f"{RP_PAYLOAD}-byte aligned")
        if not (window_start <= addr and addr + size <= window_end):
            raise FlashError(f"{where} (block number {number}): address {addr:#010x} is outside "
                             f"the {chip.upper()} flash window {window_start:#010x}-"
                             f"{window_end - 1:#010x}")
        mine.append((index, number, count, addr))
    if not mine:
        found = ", ".join(f"{family_name(f)} ({f:#010x})" for f in families) or "none"
        raise FlashError(f"firmware is not for {chip.upper()}: its UF2 family is {found}, the "
                         f"board needs {' / '.join(f'{f:#010x}' for f in wanted)}; download the "
                         "build for this board")
    if len({f for f in families if f in wanted}) > 1:
        raise FlashError(f"firmware mixes several {chip.upper()} families "
                         f"({', '.join(family_name(f) for f in families if f in wanted)})")
    count = mine[0][2]
    for expected, (index, number, total, _addr) in enumerate(mine):
        where = f"block {index} (file offset {index * BLOCK_SIZE:#x})"
        if total != count:
            raise FlashError(f"{where}: says {total} blocks in the file, block 0 said {count}")
        if number != expected:
            raise FlashError(f"{where}: block number {number}, expected {expected} (blocks "
                             "missing, repeated or out of order)")
    if len(mine) != count:
        raise FlashError(f"firmware has {len(mine)} blocks for {chip.upper()} but declares "
                         f"{count}: truncated (block {len(mine)} onwards missing)")
    family = next(f for f in families if f in wanted)
    start = min(a for *_, a in mine)
    end = max(a for *_, a in mine) + RP_PAYLOAD
    return Uf2Report(len(mine), family, start, end, ignored)


# ---- the BOOTSEL drive -------------------------------------------------------------------------


@dataclass(frozen=True)
class Uf2Drive:
    path: Path
    info: dict[str, str]

    @property
    def board_id(self) -> str:
        return self.info.get("Board-ID", "")

    def chip(self) -> str | None:
        for chip, ids in DRIVE_BOARD_IDS.items():
            if self.board_id in ids:
                return chip
        return None


def parse_info(text: str) -> dict[str, str]:
    """INFO_UF2.TXT: a banner line, then `Key: value` lines."""
    info: dict[str, str] = {}
    lines = text.splitlines()
    if lines:
        info["banner"] = lines[0].strip()
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def read_drive(path: Path) -> Uf2Drive | None:
    try:
        text = (path / "INFO_UF2.TXT").read_text(errors="replace")
    except OSError:
        return None
    return Uf2Drive(path, parse_info(text))


def _unescape_mount(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points() -> list[Path]:
    """Where a removable drive may be mounted: /proc/mounts, then the usual automount folders.

    MICROCOT_UF2_SEARCH (folders separated by os.pathsep) replaces the list: each folder and
    each folder in it is a candidate, which is how tests and unusual setups point at a drive.
    """
    override = os.environ.get("MICROCOT_UF2_SEARCH")
    roots: list[Path]
    found: list[Path] = []
    if override is not None:
        roots = [Path(p) for p in override.split(os.pathsep) if p]
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/mounts").read_text().splitlines():
                parts = line.split()
                if len(parts) > 1:
                    found.append(Path(_unescape_mount(parts[1])))
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
        roots = [Path("/media") / user, Path("/run/media") / user, Path("/media"),
                 Path("/Volumes")]
    for root in roots:
        found.append(root)
        with contextlib.suppress(OSError):
            found.extend(sorted(p for p in root.iterdir() if p.is_dir()))
    unique: list[Path] = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


def find_drives(chip: str | None = None) -> list[Uf2Drive]:
    drives = []
    for point in mount_points():
        drive = read_drive(point)
        if drive and (chip is None or drive.chip() in (chip, None)):
            drives.append(drive)
    return drives


def wait_for_drive(chip: str, timeout: float, exclude: Iterable[Path] = (),
                   emit: Callable[[str], None] | None = None) -> Uf2Drive:
    skip = set(exclude)
    deadline = time.monotonic() + timeout
    while True:
        fresh = [d for d in find_drives(chip) if d.path not in skip]
        if len(fresh) == 1:
            return fresh[0]
        if len(fresh) > 1:
            raise FlashError("several BOOTSEL drives: " + ", ".join(str(d.path) for d in fresh)
                             + "; pass the right one with --drive")
        if time.monotonic() >= deadline:
            want = " or ".join(DRIVE_BOARD_IDS[chip])
            raise FlashError(f"no {want} drive appeared within {timeout:g} s (is it mounted? "
                             "desktops mount it by themselves; otherwise mount it and pass "
                             "--drive PATH)")
        time.sleep(0.25)


def check_drive(drive: Uf2Drive, chip: str) -> None:
    found = drive.chip()
    if found is not None and found != chip:
        raise FlashError(f"{drive.path}: the drive of an {found.upper()} (Board-ID "
                         f"{drive.board_id}), but the board is an {chip.upper()}")


def enter_bootsel(port: str, timeout: float = 10.0,
                  platforms: tuple[str, ...] | None = None) -> transport.BoardInfo:
    """Ask MicroPython on `port` to reboot into the bootrom with machine.bootloader().

    The board leaves the USB bus at once, so the call never returns: a serial error after
    sending it is the expected outcome, not a failure.
    """
    t = transport.open_board(port, timeout=timeout)
    try:
        try:
            info = transport.board_info(t)
            has = transport.evaluate(t, "hasattr(__import__('machine'), 'bootloader')")
        except (transport.TransportExecError, transport.BoardError, OSError) as exc:
            raise FlashError(f"{port}: could not ask the board: {exc}") from None
        if not has:
            raise FlashError(f"{port}: no machine.bootloader() on this board (MicroPython "
                             f"{info.version} on {info.platform}): hold BOOTSEL while plugging it "
                             "in and run again with --bootsel, or pass the drive with --drive")
        if info.platform not in (platforms or BOOTSEL_PLATFORMS):
            raise FlashError(f"{port}: runs MicroPython on {info.platform!r}, not an RP2040/"
                             "RP2350 board; a UF2 cannot be flashed to it")
        # the board leaves the bus while this runs: any error from here on is the good outcome
        with contextlib.suppress(Exception):
            t.exec_raw_no_follow("import machine\nmachine.bootloader()")
            time.sleep(0.2)
    finally:
        with contextlib.suppress(Exception):
            t.close()
    return info


def copy_to_drive(data: bytes, drive: Uf2Drive, name: str,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the UF2 onto the drive and force it out (the bootrom flashes as blocks arrive)."""
    target = drive.path / (name if name.lower().endswith(".uf2") else name + ".uf2")
    total = len(data)
    written = 0
    step = 64 * 1024
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise FlashError(f"{drive.path}: cannot write {target.name}: {exc.strerror or exc}") \
            from None
    try:
        while written < total:
            n = os.write(fd, data[written:written + step])
            written += n
            if progress:
                progress(written, total)
        os.fsync(fd)
    except OSError as exc:
        # the bootrom reboots once the last block is in, and the drive disappears under us
        if written < total:
            raise FlashError(f"{drive.path}: the drive went away after {written} of {total} "
                             f"bytes ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return target


def rp2_serial_ports() -> list[str]:
    """Serial ports of Raspberry Pi USB devices: where MicroPython on an RP2 comes back."""
    from .. import ports

    return [p.device for p in ports.list_serial() if p.vid == RP2_USB_VID]
