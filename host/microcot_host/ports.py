"""Finding boards and resolving `--port` for every command.

USB serial ports are told apart by their USB vendor/product IDs, the way esptool and mpremote do:
a board's own USB (Espressif, Raspberry Pi) or the USB-UART bridge on a devkit (CP210x, CH340,
CH9102, FTDI). An RP2040/RP2350 in BOOTSEL has no serial port at all (it is a USB drive), so it is
found in sysfs and the mount table instead. Virtual boards are not USB devices: they are found in
a registry of JSON files (`state_dir()/run/<name>.json`) or named explicitly (a pty path, a
`--link` symlink, or a glob over such links).

`resolve()` turns what the user typed (paths, `auto`, globs, lists, MICROCOT_PORT) into a list of
ports and fails with a message that says what was found instead.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV = "MICROCOT_PORT"

# what a USB ID says about the device behind it
SERIAL = "serial"  # a serial port that may run MicroPython
BOOTLOADER = "bootloader"  # a serial ROM loader (ESP32-S2/S3/P4 USB-OTG download mode): flashable
BOOTSEL = "bootsel"  # RP2040/RP2350 mass-storage bootloader: no serial port, a UF2 drive
VIRTUAL = "virtual"


@dataclass(frozen=True)
class UsbKind:
    vendor: str
    label: str
    kind: str = SERIAL


ESPRESSIF_VID = 0x303A
RPI_VID = 0x2E8A

# (vid, pid) -> kind; pid None is the vendor's fallback
USB_IDS: dict[tuple[int, int | None], UsbKind] = {
    (0x303A, 0x1001): UsbKind("Espressif", "USB-Serial/JTAG (ESP32-S3/C3/C6/H2)"),
    (0x303A, 0x4001): UsbKind("Espressif", "native USB (MicroPython TinyUSB)"),
    # the ROM's USB-OTG download mode uses the chip's image ID as PID (esptool: IMAGE_CHIP_ID)
    (0x303A, 0x0002): UsbKind("Espressif", "ESP32-S2 ROM bootloader (USB-OTG)", BOOTLOADER),
    (0x303A, 0x0009): UsbKind("Espressif", "ESP32-S3 ROM bootloader (USB-OTG)", BOOTLOADER),
    (0x303A, 0x0012): UsbKind("Espressif", "ESP32-P4 ROM bootloader (USB-OTG)", BOOTLOADER),
    (0x303A, None): UsbKind("Espressif", "Espressif USB"),
    (0x10C4, 0xEA60): UsbKind("Silicon Labs", "CP210x USB-UART"),
    (0x1A86, 0x7523): UsbKind("WCH", "CH340 USB-UART"),
    (0x1A86, 0x55D4): UsbKind("WCH", "CH9102 USB-UART"),
    (0x0403, 0x6001): UsbKind("FTDI", "FT232R USB-UART"),
    (0x0403, 0x6010): UsbKind("FTDI", "FT2232 USB-UART"),
    (0x0403, 0x6014): UsbKind("FTDI", "FT232H USB-UART"),
    (0x0403, 0x6015): UsbKind("FTDI", "FT-X USB-UART"),
    (0x2E8A, 0x0005): UsbKind("Raspberry Pi", "MicroPython (RP2040/RP2350)"),
    (0x2E8A, 0x0003): UsbKind("Raspberry Pi", "RP2040 BOOTSEL", BOOTSEL),
    (0x2E8A, 0x000F): UsbKind("Raspberry Pi", "RP2350 BOOTSEL", BOOTSEL),
    (0x2E8A, None): UsbKind("Raspberry Pi", "Raspberry Pi USB"),
}

# Board-ID line of INFO_UF2.TXT on the BOOTSEL drive
UF2_BOARD_IDS = {"RPI-RP2": "RP2040", "RP2350": "RP2350"}


class PortError(ValueError):
    """A --port value that names no usable port; the message says what exists instead."""


@dataclass
class Port:
    """One place a board can be: a serial device, a BOOTSEL drive or a virtual board."""

    device: str  # path to open; for BOOTSEL the drive's mount point, or "" when not mounted
    kind: str  # SERIAL, BOOTLOADER, BOOTSEL, VIRTUAL, or "unknown" for an unrecognised port
    vendor: str = ""
    label: str = ""
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None
    description: str = ""
    location: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def usb_id(self) -> str:
        return f"{self.vid:04X}:{self.pid:04X}" if self.vid is not None and self.pid is not None \
            else ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["usb_id"] = self.usb_id
        return d


def classify(vid: int | None, pid: int | None) -> UsbKind | None:
    if vid is None:
        return None
    return USB_IDS.get((vid, pid)) or USB_IDS.get((vid, None))


# -- serial ports ------------------------------------------------------------------------------

def _comports() -> list:
    # looked up at call time so tests can monkeypatch serial.tools.list_ports.comports
    from serial.tools import list_ports

    return list(list_ports.comports())


def list_serial(include_unknown: bool = False) -> list[Port]:
    """Serial ports with a known USB ID (BOOTSEL IDs excluded: they are drives, not ports)."""
    found = []
    for info in _comports():
        kind = classify(info.vid, info.pid)
        if kind is None and not include_unknown:
            continue
        if kind is not None and kind.kind == BOOTSEL:
            continue  # some hosts list the PICOBOOT interface; it is not a serial port
        found.append(Port(
            device=info.device,
            kind=kind.kind if kind else "unknown",
            vendor=kind.vendor if kind else (info.manufacturer or ""),
            label=kind.label if kind else (info.description or ""),
            vid=info.vid, pid=info.pid,
            serial_number=info.serial_number,
            description=info.description or "",
            location=info.location,
        ))
    return sorted(found, key=lambda p: natural_key(p.device))


def natural_key(text: str) -> list:
    """/dev/ttyACM2 before /dev/ttyACM10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# -- BOOTSEL drives ----------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _unescape_mount(text: str) -> str:
    # /proc/mounts writes blanks in paths as octal escapes (\\040)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mount_table(mounts: Path) -> list[tuple[str, str]]:
    """(source, mount point) pairs."""
    table = []
    for line in _read(mounts).splitlines():
        parts = line.split()
        if len(parts) >= 2:
            table.append((_unescape_mount(parts[0]), _unescape_mount(parts[1])))
    return table


def uf2_board_id(mount_point: str | Path) -> str | None:
    """The chip named by INFO_UF2.TXT on a drive ('RP2040', 'RP2350'), or None."""
    text = _read(Path(mount_point) / "INFO_UF2.TXT")
    m = re.search(r"^Board-ID:\s*(\S+)", text, re.MULTILINE)
    return UF2_BOARD_IDS.get(m.group(1)) if m else None


def list_bootsel(sysfs: str | Path = "/sys", mounts: str | Path = "/proc/mounts",
                 volumes: Sequence[str | Path] = ("/Volumes",)) -> list[Port]:
    """RP2040/RP2350 boards in BOOTSEL: USB devices from sysfs, each with its drive if mounted.

    A drive is tied to its USB device through the block device's sysfs path (it lies under the
    USB device's); drives with INFO_UF2.TXT that match no device (macOS, containers) are listed
    on their own.
    """
    sysfs = Path(sysfs)
    drives: dict[str, str] = {}  # mount point -> real sysfs path of its block device ('' unknown)
    for source, point in _mount_table(Path(mounts)):
        if uf2_board_id(point):
            blk = ""
            if source.startswith("/dev/"):
                blk_dir = sysfs / "class" / "block" / Path(source).name
                with contextlib.suppress(OSError):
                    blk = os.path.realpath(blk_dir) if blk_dir.exists() else ""
            drives[point] = blk
    for root in volumes:  # macOS mounts drives by label, with no /proc/mounts
        with contextlib.suppress(OSError):
            for vol in sorted(Path(root).iterdir()):
                if str(vol) not in drives and uf2_board_id(vol):
                    drives[str(vol)] = ""
    found: list[Port] = []
    devices = sysfs / "bus" / "usb" / "devices"
    with contextlib.suppress(OSError):
        for dev in sorted(devices.iterdir(), key=lambda p: natural_key(p.name)):
            try:
                vid = int(_read(dev / "idVendor"), 16)
                pid = int(_read(dev / "idProduct"), 16)
            except ValueError:
                continue
            kind = classify(vid, pid)
            if kind is None or kind.kind != BOOTSEL:
                continue
            real = os.path.realpath(dev)
            drive = next((pt for pt, blk in drives.items()
                          if blk and (blk + "/").startswith(real + "/")), "")
            if not drive:
                # one unpaired device and one unpaired drive belong together in practice
                loose = [pt for pt, blk in drives.items() if not blk]
                drive = loose[0] if len(loose) == 1 else ""
            drives.pop(drive, None)
            found.append(Port(device=drive, kind=BOOTSEL, vendor=kind.vendor, label=kind.label,
                              vid=vid, pid=pid, serial_number=_read(dev / "serial") or None,
                              description=_read(dev / "product"), location=dev.name))
    for point in drives:
        chip = uf2_board_id(point)
        found.append(Port(device=point, kind=BOOTSEL, vendor="Raspberry Pi",
                          label=f"{chip} BOOTSEL", description="UF2 drive"))
    return found


# -- virtual boards ----------------------------------------------------------------------------

def run_dir() -> Path:
    """Where running virtual boards register: <state dir>/run/<name>.json."""
    from .paths import state_dir

    return state_dir() / "run"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_virtual(directory: Path | None = None) -> list[Port]:
    """Running virtual boards from their registry files; stale entries (process gone, pty gone)
    are skipped, as a board killed with SIGKILL cannot remove its own file."""
    found = []
    for path in sorted((directory or run_dir()).glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(entry, dict):
            continue
        port = entry.get("link") or entry.get("port")
        if not isinstance(port, str) or not os.path.exists(port) \
                or not _pid_alive(entry.get("pid")):
            continue
        found.append(Port(device=port, kind=VIRTUAL, vendor="microcot",
                          label=f"virtual board {entry.get('name', path.stem)}",
                          description="MicroPython unix port on a pty",
                          extra={k: entry[k] for k in ("name", "pid", "iccid", "mac", "modem")
                                 if k in entry}))
    return found


# -- resolution --------------------------------------------------------------------------------

_SHORTHAND = re.compile(r"^([acu])(\d+)$")  # mpremote's a0, u0, c0


def _expand_shorthand(item: str) -> str:
    m = _SHORTHAND.match(item)
    if not m:
        return item
    prefix = {"a": "/dev/ttyACM", "u": "/dev/ttyUSB", "c": "COM"}[m.group(1)]
    return prefix + m.group(2)


def split_specs(specs: Iterable[str]) -> list[str]:
    """'a,b c' -> ['a', 'b', 'c']: MICROCOT_PORT and --port both take lists."""
    out = []
    for spec in specs:
        out.extend(p for p in re.split(r"[,\s]+", spec.strip()) if p)
    return out


def _is_url(item: str) -> bool:
    return item.startswith(("socket://", "rfc2217://", "loop://"))


def _exists(item: str) -> bool:
    if _is_url(item):
        return True
    if sys.platform == "win32" and re.fullmatch(r"(?i)COM\d+", item):
        return True
    return os.path.exists(item)


def _candidates_text(ports: list[Port]) -> str:
    if not ports:
        return "none"
    return "; ".join(f"{p.device or '(not mounted)'} [{p.usb_id or p.kind}] {p.label}"
                     for p in ports)


def answers_micropython(port: str, timeout: float = 2.0) -> bool:
    """True when a MicroPython raw REPL answers on the port within about `timeout` seconds."""
    from . import transport

    try:
        t = transport.open_board(port, soft_reset=False, timeout=timeout)
    except transport.BoardError:
        return False
    transport.close(t)
    return True


def auto(probe: Callable[[str], bool] | None = None) -> str:
    """The one board connected: USB serial ports with a known ID, then registered virtual boards.

    With more than one candidate, `probe(port)` (True when MicroPython answers) narrows them
    down; still more than one is an error listing them, as is none (with BOOTSEL boards and
    ROM loaders named, which need flashing first).
    """
    usb = list_serial()
    serial = [p for p in usb if p.kind == SERIAL]
    candidates = serial + list_virtual()
    if len(candidates) > 1:
        probe = probe or answers_micropython
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(probe, [p.device for p in candidates]))
        answering = [p for p, ok in zip(candidates, answers, strict=True) if ok]
        if answering:
            candidates = answering
    if len(candidates) == 1:
        return candidates[0].device
    if not candidates:
        other = [p for p in usb if p.kind != SERIAL] + list_bootsel()
        hint = (f" (found only bootloaders, flash MicroPython first: {_candidates_text(other)})"
                if other else "; plug one in, or name the port with --port PATH")
        raise PortError(f"--port auto: no MicroPython board found{hint}")
    raise PortError(f"--port auto: {len(candidates)} boards found, pick one with --port "
                    f"(or give several): {_candidates_text(candidates)}")


def resolve(specs: str | Sequence[str] | None = None, *, env: dict[str, str] | None = None,
            probe: Callable[[str], bool] | None = None, allow_empty: bool = False) -> list[str]:
    """Ports named by --port values (or MICROCOT_PORT when there are none), in order, unique.

    Each value may be a path, `auto`, a glob (/dev/ttyACM*), a registered virtual board
    `virtual:NAME`, mpremote's shorthand (a0 = /dev/ttyACM0, u0 = /dev/ttyUSB0, c0 = COM0), or
    a comma/space separated list of these. Two names of one device (a symlink and its pty)
    count once.
    """
    if isinstance(specs, str):
        specs = [specs]
    items = split_specs(specs or [])
    if not items:
        items = split_specs([(env if env is not None else os.environ).get(ENV, "")])
    if not items:
        if allow_empty:
            return []
        raise PortError(f"no port given: use --port PATH (or auto, or a glob) or set {ENV}")
    ports: list[str] = []
    for item in items:
        item = _expand_shorthand(item)
        if item == "auto":
            ports.append(auto(probe))
        elif item.startswith("virtual:"):
            ports.append(_virtual_by_name(item.split(":", 1)[1]))
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item), key=natural_key)
            if not matches:
                raise PortError(f"no port matches {item!r}; connected: "
                                f"{_candidates_text(list_serial() + list_virtual())}")
            ports.extend(matches)
        elif _exists(item):
            ports.append(item)
        else:
            raise PortError(f"{item}: no such port; connected: "
                            f"{_candidates_text(list_serial() + list_virtual())}")
    return _unique(ports)


def _virtual_by_name(name: str) -> str:
    boards = list_virtual()
    for p in boards:
        if p.extra.get("name") == name:
            return p.device
    running = ", ".join(str(p.extra.get("name")) for p in boards) or "none"
    raise PortError(f"virtual:{name}: no running virtual board of that name (running: {running})")


def _unique(ports: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for p in ports:
        key = p if _is_url(p) else os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# -- click glue, shared by the commands --------------------------------------------------------

def port_option(multiple: bool = True):
    """`--port/-p`, repeatable; pass the values to resolve_for_click()."""
    import click

    return click.option(
        "--port", "-p", "port_specs", multiple=multiple, metavar="PORT",
        help=f"serial port, 'auto', a glob like '/dev/ttyACM*' or a list; repeatable "
             f"(default: ${ENV})")


def resolve_for_click(specs: Sequence[str] | str | None, **kwargs) -> list[str]:
    """resolve() with its errors as click errors (exit code 1 and the message, no traceback)."""
    import click

    try:
        return resolve(specs, **kwargs)
    except PortError as exc:
        raise click.ClickException(str(exc)) from None


__all__ = ["BOOTLOADER", "answers_micropython", "BOOTSEL", "ENV", "SERIAL", "USB_IDS", "VIRTUAL", "Port", "PortError",
           "auto", "classify", "list_bootsel", "list_serial", "list_virtual", "natural_key",
           "port_option", "resolve", "resolve_for_click", "run_dir", "split_specs",
           "uf2_board_id"]
