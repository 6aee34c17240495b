"""An emulated ESP32 ROM serial loader on a pseudo-terminal, for driving the real esptool.

A test fixture, not a product: it is as much of the ROM loader protocol as esptool uses with
`--no-stub` (ESP32 in full; enough of an ESP32-S3 to be detected), plus esptool's flasher stub
once esptool has uploaded it, with a flash chip behind it kept in a file. What it implements:

  * SLIP framing; requests `00 op len:u16 chk:u32 data`, responses `01 op len val:u32 data status`
    with the ESP32 ROM's 4 status bytes (status, error, 0, 0);
  * SYNC (answered 8 times, like the ROM), READ_REG / WRITE_REG over a register file holding the
    chip-detect magic, the eFuse words esptool reads (MAC, revision, package, SPI pads, 8M clock),
    the APB date, the UART divider and the RTC calibration that esptool uses to guess the crystal;
  * the SPI peripheral's user-command registers (CMD, ADDR, USR, USR1, USR2, MOSI/MISO length,
    W0..W15): writing SPI_CMD_USR runs the command on the emulated flash (RDID 0x9F, SFDP 0x5A,
    RDSR 0x05/0x35/0x15, and accepts reset/power commands) and clears the bit, which is how
    esptool reads the flash id without a stub;
  * SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE, FLASH_BEGIN/DATA/END (erase up front, sequence
    numbers, data checksum, NOR semantics: a write can only clear bits), FLASH_DEFL_BEGIN/DATA/END
    (zlib inflate, streamed), SPI_FLASH_MD5 (32 hex digits like the ROM), READ_FLASH_SLOW;
  * GET_SECURITY_INFO: an ESP32 ROM does not know it and answers "invalid message" (status 1,
    error 5), an ESP32-S3 answers with its chip id 9;
  * FLASH_END / FLASH_DEFL_END "run user code": the loader leaves and answers nothing more;
  * MEM_BEGIN / MEM_DATA / MEM_END into an emulated RAM (checksums, sequence numbers, sizes).
    MEM_END with an entry point "runs" what was loaded: if the RAM holds, byte for byte, one of
    the flasher stubs esptool ships (targets/stub_flasher/<version>/<chip>.json: text and data
    at their addresses, and the same entry point), the stub starts and says "OHAI"; anything
    else is code the emulator cannot run, and the chip goes silent.

Once the stub runs, requests are answered the way esptool's flasher stub (esp-flasher-stub)
answers them: 2 status bytes, a big-endian 16-bit code (0 or 0xC000.. like the stub's error
codes); SYNC with value 0; SPI_ATTACH with the stub's 4-byte argument; CHANGE_BAUDRATE taking
(new, old); FLASH_BEGIN/DATA/END and FLASH_DEFL_BEGIN/DATA/END erasing sector by sector as the
data arrives and writing exactly the announced size (FLASH_END checks it all came), without
leaving the loader; SPI_FLASH_MD5 as 16 raw bytes; ERASE_FLASH, ERASE_REGION, and READ_FLASH
(data frames, each acknowledged by the host, then the MD5 frame).

Every request is recorded (`ops`; those the stub answered also in `stub_ops`), so a test can
assert that nothing at all reached the loader, and every MD5 answer in `md5_answers`.
`corrupt_at` flips a bit of the flash at that address whenever a write covers it, like a bad
cell or a transfer error the checksums missed: the MD5 verification must catch it.

Run it by hand: `python tests/host/esprom_emu.py --flash /tmp/flash.bin` prints the port.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import select
import struct
import threading
import time
import tty
import zlib
from pathlib import Path
from typing import Any

OPS = {
    0x02: "FLASH_BEGIN", 0x03: "FLASH_DATA", 0x04: "FLASH_END", 0x05: "MEM_BEGIN",
    0x06: "MEM_END", 0x07: "MEM_DATA", 0x08: "SYNC", 0x09: "WRITE_REG", 0x0A: "READ_REG",
    0x0B: "SPI_SET_PARAMS", 0x0D: "SPI_ATTACH", 0x0E: "READ_FLASH_SLOW", 0x0F: "CHANGE_BAUDRATE",
    0x10: "FLASH_DEFL_BEGIN", 0x11: "FLASH_DEFL_DATA", 0x12: "FLASH_DEFL_END",
    0x13: "SPI_FLASH_MD5", 0x14: "GET_SECURITY_INFO",
    0xD0: "ERASE_FLASH", 0xD1: "ERASE_REGION", 0xD2: "READ_FLASH",
}
WRITES = {"FLASH_BEGIN", "FLASH_DATA", "FLASH_DEFL_BEGIN", "FLASH_DEFL_DATA", "ERASE_FLASH",
          "ERASE_REGION"}
ROM_ONLY = {"READ_FLASH_SLOW"}
STUB_ONLY = {"ERASE_FLASH", "ERASE_REGION", "READ_FLASH"}

# Why a request failed, and what each loader answers for it: the ROM's error byte (after a
# status byte of 1) and the stub's 16-bit response code (sent big-endian).
FAILURES = {
    "bad_length": (0x05, 0xC000),     # ROM: invalid message; stub: bad data length
    "invalid_command": (0x05, 0xC300),
    "not_implemented": (0x05, 0xFF00),
    "failed": (0x06, 0xC400),         # ROM: the result is wrong; stub: failed SPI operation
    "not_in_flash_mode": (0x06, 0xC600),
    "checksum": (0x07, 0xC100),
    "flash_write": (0x08, 0xC400),
    "inflate": (0x0B, 0xC700),
    "too_much_data": (0x06, 0xC900),
}

SECTOR = 0x1000
CHECKSUM_MAGIC = 0xEF
SYNC_DATA = b"\x07\x07\x12\x20" + b"\x55" * 32

# ESP32 addresses (esptool/targets/esp32.py)
CHIP_DETECT_MAGIC_REG = 0x40001000
ESP32_MAGIC = 0x00F01D83
EFUSE_BASE = 0x3FF5A000
APB_CTL_DATE = 0x3FF6607C
UART_CLKDIV = 0x3FF40014
RTCCALICFG1 = 0x3FF5F06C
SPI_BASE = 0x3FF42000
SPI_CMD = SPI_BASE + 0x00
SPI_ADDR = SPI_BASE + 0x04
SPI_USR = SPI_BASE + 0x1C
SPI_USR1 = SPI_BASE + 0x20
SPI_USR2 = SPI_BASE + 0x24
SPI_MOSI_DLEN = SPI_BASE + 0x28
SPI_MISO_DLEN = SPI_BASE + 0x2C
SPI_W0 = SPI_BASE + 0x80
SPI_CMD_USR = 1 << 18
USR_ADDR, USR_MISO = 1 << 30, 1 << 28
XTAL_HZ = 40_000_000

# what a Winbond W25Q-series chip answers; the size byte follows the emulated flash size
FLASH_VENDOR, FLASH_TYPE = 0xEF, 0x40


def _sfdp() -> bytes:
    table = bytearray(b"\xff" * 256)
    table[0:8] = b"SFDP\x06\x01\x00\xff"           # signature, rev 1.6, one parameter header
    table[8:16] = b"\x00\x06\x01\x10\x30\x00\x00\xff"  # basic flash parameter table at 0x30
    table[16:24] = bytes([FLASH_VENDOR, 0, 1, 4, 0x90, 0, 0, 0xFF])  # vendor table: not XMC
    return bytes(table)


def slip_encode(packet: bytes) -> bytes:
    return b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def shipped_stubs(chip: str) -> dict[str, dict[str, Any]]:
    """The flasher stubs the installed esptool ships for `chip`, by version directory: the
    segments (load address -> bytes) it would upload and its entry point."""
    from esptool.loader import StubFlasher

    stubs: dict[str, dict[str, Any]] = {}
    for version in sorted(os.listdir(StubFlasher.STUB_DIR)):
        path = Path(StubFlasher.STUB_DIR, version, f"{chip}.json")
        if not path.is_file():
            continue
        raw = json.loads(path.read_text())
        segments = {raw["text_start"]: base64.b64decode(raw["text"])}
        if "data" in raw:
            segments[raw["data_start"]] = base64.b64decode(raw["data"])
        stubs[version] = {"entry": raw["entry"], "segments": segments}
    return stubs


def _checksum(data: bytes) -> int:
    calc = CHECKSUM_MAGIC
    for b in data:
        calc ^= b
    return calc


class EspRomEmulator:
    """The ROM loader of an ESP32 (or, for detection only, an ESP32-S3) behind a pty, and the
    flasher stub esptool uploads into it."""

    def __init__(self, flash_path: Path | str, chip: str = "esp32", flash_size: int = 4 << 20,
                 mac: bytes = bytes.fromhex("246f28a1b2c3"), latency: float = 0.0,
                 corrupt_at: int | None = None) -> None:
        if chip not in ("esp32", "esp32s3"):
            raise ValueError(f"chip {chip!r}: the emulator knows esp32 and esp32s3")
        self.chip = chip
        self.flash_path = Path(flash_path)
        self.flash_size = flash_size
        self.mac = mac
        self.latency = latency  # seconds before each answer, like a slow link or a busy chip
        self.corrupt_at = corrupt_at
        self.corrupted: list[int] = []  # flash addresses where a bit was flipped after a write
        self.ops: list[str] = []
        self.stub_ops: list[str] = []  # the requests the running stub answered
        self.md5_answers: list[dict[str, Any]] = []
        self.baud_changes: list[tuple[int, int]] = []  # (new, old) as the host sent them
        self.baud = 115200
        self.exited = False
        self.errors: list[str] = []
        self.ram: dict[int, bytearray] = {}  # MEM_BEGIN address -> bytes received
        self.stub_version: str | None = None  # which shipped stub runs, once it does
        self._regs: dict[int, int] = {}
        self._write: dict[str, Any] | None = None
        self._mem: dict[str, Any] | None = None
        self._reading: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self.port = ""
        self._init_regs()

    # ---- lifecycle ----

    def start(self) -> EspRomEmulator:
        if not self.flash_path.exists() or self.flash_path.stat().st_size != self.flash_size:
            self.flash_path.write_bytes(b"\xff" * self.flash_size)
        self._flash_fd = os.open(self.flash_path, os.O_RDWR)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # keep the slave open: the master reads EIO once nobody has it
        self.port = os.ttyname(self._slave)
        self._thread = threading.Thread(target=self._serve, name="esprom", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for fd in (self._master, self._slave, getattr(self, "_flash_fd", -1)):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        self._flash_fd = -1

    def __enter__(self) -> EspRomEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def wrote(self) -> bool:
        return any(op in WRITES for op in self.ops)

    @property
    def stub_running(self) -> bool:
        return self.stub_version is not None

    def flash(self) -> bytes:
        return self.flash_path.read_bytes()

    # ---- registers ----

    def _init_regs(self) -> None:
        r = self._regs
        if self.chip == "esp32":
            r[CHIP_DETECT_MAGIC_REG] = ESP32_MAGIC
        # eFuse words as esptool's ESP32ROM decodes them: MAC in words 1-2 (CRC byte left 0),
        # an ESP32-D0WD-V3 revision v3.0: package 1 and rev bit 0 in word 3, rev bit 1 in word 5,
        # rev bit 2 in the APB date register; CK8M_FREQ for the ROM's crystal calculation
        m = self.mac
        r[EFUSE_BASE + 4] = int.from_bytes(m[2:6], "big")
        r[EFUSE_BASE + 8] = int.from_bytes(m[0:2], "big")
        r[EFUSE_BASE + 12] = (1 << 9) | (1 << 15)
        r[EFUSE_BASE + 16] = 100
        r[EFUSE_BASE + 20] = 1 << 20
        r[APB_CTL_DATE] = 1 << 31
        # cali * 15625 * CK8M / 40 = 40 MHz, the crystal esptool should find
        r[RTCCALICFG1] = (XTAL_HZ * 40 // (15625 * 100)) << 7
        self._set_baud(115200)

    def _set_baud(self, baud: int) -> None:
        self.baud = baud
        self._regs[UART_CLKDIV] = round(XTAL_HZ / baud)

    def _read_reg(self, addr: int) -> int:
        return self._regs.get(addr, 0)

    def _write_reg(self, addr: int, value: int, mask: int) -> None:
        old = self._regs.get(addr, 0)
        self._regs[addr] = (old & ~mask) | (value & mask)
        if addr == SPI_CMD and self._regs[addr] & SPI_CMD_USR:
            self._spi_user_command()
            self._regs[addr] &= ~SPI_CMD_USR

    def _spi_user_command(self) -> None:
        usr = self._regs.get(SPI_USR, 0)
        command = self._regs.get(SPI_USR2, 0) & 0xFF
        addr = 0
        if usr & USR_ADDR:
            addr_bits = ((self._regs.get(SPI_USR1, 0) >> 26) & 0x3F) + 1
            addr = self._regs.get(SPI_ADDR, 0) >> (32 - addr_bits)
        miso_bits = (self._regs.get(SPI_MISO_DLEN, 0) + 1) if usr & USR_MISO else 0
        if command == 0x9F:  # RDID: vendor, type, capacity (log2 of the size)
            reply = bytes([FLASH_VENDOR, FLASH_TYPE, self.flash_size.bit_length() - 1])
        elif command == 0x5A:  # SFDP
            reply = _sfdp()[addr:addr + 4].ljust(4, b"\xff")
        elif command in (0x05, 0x35, 0x15):  # status registers: idle, unprotected
            reply = b"\x00\x00\x00\x00"
        else:  # write enable/disable, reset, power-down and the like: nothing to answer
            reply = b""
        if miso_bits:
            value = int.from_bytes(reply[:4].ljust(4, b"\x00"), "little")
            self._regs[SPI_W0] = value & ((1 << min(miso_bits, 32)) - 1)

    # ---- flash ----

    def _erase(self, start: int, size: int) -> bool:
        end = start + size
        start -= start % SECTOR
        end = -(-end // SECTOR) * SECTOR
        if end > self.flash_size:
            return False
        os.pwrite(self._flash_fd, b"\xff" * (end - start), start)
        return True

    def _program(self, addr: int, data: bytes) -> bool:
        if addr + len(data) > self.flash_size:
            return False
        old = os.pread(self._flash_fd, len(data), addr)
        # NOR flash: programming clears bits, only an erase sets them again
        new = bytearray(a & b for a, b in zip(old, data, strict=True))
        bad = self.corrupt_at
        if bad is not None and addr <= bad < addr + len(data):
            new[bad - addr] ^= 0x01
            self.corrupted.append(bad)
        os.pwrite(self._flash_fd, bytes(new), addr)
        return True

    # ---- protocol ----

    def _serve(self) -> None:
        buf = bytearray()
        frame: bytearray | None = None
        escape = False
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self._master, 4096)
            except OSError:
                time.sleep(0.01)
                continue
            buf += chunk
            for byte in bytes(buf):
                if frame is None:
                    if byte == 0xC0:
                        frame = bytearray()
                    continue
                if byte == 0xC0:
                    if frame:
                        self._packet(bytes(frame))
                        frame = None
                    else:
                        frame = bytearray()  # back-to-back delimiters: a new frame starts
                    escape = False
                elif escape:
                    frame.append({0xDC: 0xC0, 0xDD: 0xDB}.get(byte, byte))
                    escape = False
                elif byte == 0xDB:
                    escape = True
                else:
                    frame.append(byte)
            buf.clear()

    def _send_frame(self, payload: bytes) -> None:
        os.write(self._master, slip_encode(payload))

    def _reply(self, op: int, val: int = 0, data: bytes = b"", failure: str | None = None) -> None:
        if self.latency:
            time.sleep(self.latency)
        if self.stub_running:
            # the stub: one 16-bit response code, big-endian (0 = success)
            code = FAILURES[failure][1] if failure else 0
            status = code.to_bytes(2, "big")
        else:
            # the ESP32 ROM: status (0/1), error, and two reserved bytes
            status = bytes([1, FAILURES[failure][0], 0, 0]) if failure else bytes(4)
        body = data + status
        self._send_frame(struct.pack("<BBHI", 1, op, len(body), val) + body)

    def _fail(self, op: int, failure: str, why: str) -> None:
        self.errors.append(f"{OPS.get(op, hex(op))}: {why}")
        self._reply(op, failure=failure)

    def _packet(self, pkt: bytes) -> None:
        if self.exited:
            return
        if self._reading is not None and len(pkt) == 4:
            self._read_ack(struct.unpack("<I", pkt)[0])
            return
        if len(pkt) < 8 or pkt[0] != 0:
            return
        _, op, size, chk = struct.unpack_from("<BBHI", pkt)
        data = pkt[8:8 + size]
        name = OPS.get(op, hex(op))
        self.ops.append(name)
        if self.stub_running:
            self.stub_ops.append(name)
        if len(data) != size:
            self._fail(op, "bad_length", "length does not match the header")
            return
        handler = getattr(self, "_op_" + name.lower(), None)
        if self.stub_running:
            if handler is None or name in ROM_ONLY:
                self._fail(op, "invalid_command", "not a command of the stub")
                return
        elif handler is None or name in STUB_ONLY or (
                name == "GET_SECURITY_INFO" and self.chip == "esp32"):
            self._fail(op, "invalid_command", "not a command of this ROM")
            return
        handler(op, data, chk)

    def _expect_size(self, op: int, data: bytes, *sizes: int) -> bool:
        """The stub checks every request's exact length (the ROM is more lenient)."""
        if self.stub_running and len(data) not in sizes:
            self._fail(op, "bad_length", f"{len(data)} bytes, the stub takes {sizes}")
            return False
        return True

    def _op_sync(self, op: int, data: bytes, chk: int) -> None:
        if data != SYNC_DATA:
            if self.stub_running:
                self._fail(op, "bad_length", "garbled SYNC")
            return  # the ROM ignores a garbled SYNC; esptool tries again
        # the ROM answers 8 times with a value; the stub 8 times with 0 (how esptool knows it)
        for _ in range(8):
            self._reply(op, val=0 if self.stub_running else 0x20120707)

    def _op_read_reg(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 4):
            return
        (addr,) = struct.unpack("<I", data[:4])
        self._reply(op, val=self._read_reg(addr))

    def _op_write_reg(self, op: int, data: bytes, chk: int) -> None:
        if self.stub_running and (not data or len(data) % 16):
            self._fail(op, "bad_length", "WRITE_REG takes 16-byte entries")
            return
        for i in range(0, len(data) - 15, 16):
            addr, value, mask, _delay = struct.unpack_from("<IIII", data, i)
            self._write_reg(addr, value, mask)
        self._reply(op)

    def _op_get_security_info(self, op: int, data: bytes, chk: int) -> None:
        if self.stub_running and self.chip == "esp32":
            self._fail(op, "not_implemented", "an ESP32 has no security info")
            return
        # ESP32-S3: flags, flash_crypt_cnt, 7 key purposes, chip id, API version
        self._reply(op, data=struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0))

    def _op_spi_attach(self, op: int, data: bytes, chk: int) -> None:
        # the ROM takes the pin configuration and an "is legacy" word, the stub only the first
        if not self._expect_size(op, data, 4):
            return
        self._reply(op)

    def _op_spi_set_params(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 24):
            return
        _fl_id, total, _block, _sector, _page, _mask = struct.unpack("<IIIIII", data)
        if total > self.flash_size:
            self._fail(op, "failed", f"flash size {total} is more than the chip has")
            return
        self._reply(op)

    def _op_change_baudrate(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 8):
            return
        new, old = struct.unpack("<II", data)
        if self.stub_running and old != self.baud:
            # the stub takes the rate it runs at as the second word, the ROM 0
            self.errors.append(f"CHANGE_BAUDRATE: old rate {old}, but the link runs at "
                               f"{self.baud}")
        self.baud_changes.append((new, old))
        self._reply(op)  # answered at the old rate; a pty has no rate to change
        self._set_baud(new)

    # ---- RAM: where esptool loads its flasher stub ----

    def _op_mem_begin(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 16):
            return
        size, blocks, block_size, offset = struct.unpack_from("<IIII", data)
        if blocks * block_size < size:
            self._fail(op, "bad_length", f"{blocks} blocks of {block_size} cannot hold {size}")
            return
        self.ram[offset] = bytearray()
        self._mem = {"offset": offset, "size": size, "blocks": blocks,
                     "block_size": block_size, "seq": 0}
        self._reply(op)

    def _op_mem_data(self, op: int, data: bytes, chk: int) -> None:
        m = self._mem
        if m is None:
            self._fail(op, "not_in_flash_mode", "no MEM_BEGIN")
            return
        if len(data) < 16:
            self._fail(op, "bad_length", "no data header")
            return
        size, seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:]
        ram = self.ram[m["offset"]]
        if len(payload) != size or len(ram) + size > m["size"]:
            self._fail(op, "too_much_data", f"block {seq}: {size} bytes announced, "
                       f"{len(payload)} sent, {m['size'] - len(ram)} expected at most")
            return
        if _checksum(payload) != chk & 0xFF:
            self._fail(op, "checksum", f"block {seq}: checksum {chk:#x}")
            return
        if seq != m["seq"]:
            self._fail(op, "failed", f"block {seq} out of sequence (expected {m['seq']})")
            return
        ram += payload
        m["seq"] += 1
        self._reply(op)

    def _op_mem_end(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 8):
            return
        stay, entry = struct.unpack("<II", data)
        if self._mem is not None and len(self.ram[self._mem["offset"]]) != self._mem["size"]:
            self._fail(op, "bad_length", "MEM_END before all the announced data came")
            return
        self._mem = None
        self._reply(op)
        if stay or self.stub_running:
            return
        self._run_ram(entry)

    def _run_ram(self, entry: int) -> None:
        """Jump to `entry`: only a stub esptool ships, loaded intact, can run here."""
        loaded = {addr: bytes(b) for addr, b in self.ram.items()}
        for version, stub in shipped_stubs(self.chip).items():
            if stub["entry"] == entry and all(loaded.get(addr) == seg
                                              for addr, seg in stub["segments"].items()):
                self.stub_version = version
                self._send_frame(b"OHAI")  # the stub's greeting, a bare SLIP frame
                return
        self.errors.append(f"MEM_END: entry {entry:#x} does not start a flasher stub that "
                           f"esptool ships for {self.chip} (loaded: "
                           + ", ".join(f"{a:#x}+{len(b)}" for a, b in loaded.items()) + ")")
        self.exited = True  # unknown code runs: the loader is gone

    # ---- writing flash ----

    def _begin(self, op: int, data: bytes, deflated: bool) -> None:
        # the ESP32 ROM takes 4 words, the stub 4 or 5 (the last: encrypted write)
        if not self._expect_size(op, data, 16, 20):
            return
        size, blocks, block_size, offset = struct.unpack_from("<IIII", data)
        if self.stub_running:
            # the stub gets the byte count and erases sector by sector as data arrives
            end = -(-(offset + size) // SECTOR) * SECTOR
            if end > self.flash_size:
                self._fail(op, "failed", f"bad region {offset:#x}+{size:#x}")
                return
            erase_next, erase_end = offset - offset % SECTOR, end
        elif offset % SECTOR or not self._erase(offset, size):
            # the ROM erases the whole (sector-rounded) region up front
            self._fail(op, "failed", f"bad region {offset:#x}+{size:#x}")
            return
        else:
            erase_next = erase_end = 0
        self._write = {"offset": offset, "pos": offset, "remaining": size, "blocks": blocks,
                       "block_size": block_size, "seq": 0, "erase_next": erase_next,
                       "erase_end": erase_end, "deflated": deflated,
                       "inflate": zlib.decompressobj() if deflated else None}
        self._reply(op)

    def _op_flash_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, deflated=False)

    def _op_flash_defl_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, deflated=True)

    def _data(self, op: int, data: bytes, chk: int, deflated: bool) -> None:
        w = self._write
        if w is None or w["deflated"] != deflated:
            self._fail(op, "not_in_flash_mode", "no matching BEGIN")
            return
        if len(data) < 16:
            self._fail(op, "bad_length", "no data header")
            return
        size, seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:]
        if len(payload) != size:
            self._fail(op, "too_much_data", "payload length does not match")
            return
        calc = _checksum(payload)
        if calc != chk & 0xFF:
            self._fail(op, "checksum", f"block {seq}: checksum {chk:#x}, computed {calc:#x}")
            return
        if seq != w["seq"]:
            self._fail(op, "failed", f"block {seq} out of sequence (expected {w['seq']})")
            return
        if deflated:
            try:
                plain = w["inflate"].decompress(payload)
            except zlib.error as exc:
                self._fail(op, "inflate", f"inflate: {exc}")
                return
            addr = w["pos"]
        else:
            plain = payload
            addr = w["offset"] + seq * w["block_size"]
        if self.stub_running:
            # the stub writes exactly the announced size: no padding of the last block
            if deflated and len(plain) > w["remaining"]:
                self._fail(op, "too_much_data", "more data inflated than announced")
                return
            plain = plain[:w["remaining"]]
            addr = w["pos"]
            self._erase_ahead(w, addr + len(plain))
        if not self._program(addr, plain):
            self._fail(op, "flash_write", f"write past the end of flash at {addr:#x}")
            return
        w["pos"] = addr + len(plain)
        w["remaining"] = max(0, w["remaining"] - len(plain))
        w["seq"] += 1
        self._reply(op)

    def _erase_ahead(self, w: dict[str, Any], until: int) -> None:
        while w["erase_next"] < min(until, w["erase_end"]):
            self._erase(w["erase_next"], SECTOR)
            w["erase_next"] += SECTOR

    def _op_flash_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, deflated=False)

    def _op_flash_defl_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, deflated=True)

    def _end(self, op: int, data: bytes) -> None:
        if not self._expect_size(op, data, 4):
            return
        if self.stub_running:
            w = self._write
            if w is None:
                self._fail(op, "not_in_flash_mode", "no matching BEGIN")
                return
            if w["remaining"]:
                self._fail(op, "bad_length", f"{w['remaining']} announced bytes never came")
                return
            # whatever the flag, the stub stays: esptool sends this to wait for the last write
            self._write = None
            self._reply(op)
            return
        self._reply(op)
        self._write = None
        # 0 reboots, 1 runs the application: either way the ROM loader is gone
        self.exited = True

    def _op_flash_end(self, op: int, data: bytes, chk: int) -> None:
        self._end(op, data)

    def _op_flash_defl_end(self, op: int, data: bytes, chk: int) -> None:
        self._end(op, data)

    # ---- reading and erasing flash ----

    def _op_spi_flash_md5(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 16):
            return
        addr, size, _, _ = struct.unpack_from("<IIII", data)
        if addr + size > self.flash_size:
            self._fail(op, "failed", "MD5 region past the end of flash")
            return
        digest = hashlib.md5(os.pread(self._flash_fd, size, addr))
        by = "stub" if self.stub_running else "ROM"
        self.md5_answers.append({"by": by, "addr": addr, "size": size, "md5": digest.hexdigest()})
        # the ROM answers 32 hex digits, the stub the 16 raw bytes
        self._reply(op, data=digest.digest() if self.stub_running else digest.hexdigest().encode())

    def _op_read_flash_slow(self, op: int, data: bytes, chk: int) -> None:
        addr, size = struct.unpack_from("<II", data)
        if size > 64 or addr + size > self.flash_size:
            self._fail(op, "failed", "bad read")
            return
        self._reply(op, data=os.pread(self._flash_fd, size, addr).ljust(64, b"\xff"))

    def _op_erase_flash(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 0):
            return
        self._erase(0, self.flash_size)
        self._reply(op)

    def _op_erase_region(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 8):
            return
        addr, size = struct.unpack("<II", data)
        if addr % SECTOR or size % SECTOR:
            self._fail(op, "bad_length", f"region {addr:#x}+{size:#x} is not sector aligned")
            return
        if not self._erase(addr, size):
            self._fail(op, "failed", f"region {addr:#x}+{size:#x} past the end of flash")
            return
        self._reply(op)

    def _op_read_flash(self, op: int, data: bytes, chk: int) -> None:
        if not self._expect_size(op, data, 16):
            return
        addr, size, packet, _in_flight = struct.unpack("<IIII", data)
        if addr + size > self.flash_size or not 0 < packet <= 4096:
            self._fail(op, "bad_length", f"read {addr:#x}+{size:#x} in packets of {packet}")
            return
        self._reply(op)
        # then data frames, one at a time: each waits for the host's count of bytes received
        self._reading = {"pos": addr, "end": addr + size, "size": size, "packet": packet,
                         "md5": hashlib.md5()}
        self._read_next()

    def _read_next(self) -> None:
        r = self._reading
        assert r is not None
        chunk = os.pread(self._flash_fd, min(r["packet"], r["end"] - r["pos"]), r["pos"])
        r["pos"] += len(chunk)
        r["md5"].update(chunk)
        self._send_frame(chunk)

    def _read_ack(self, received: int) -> None:
        r = self._reading
        assert r is not None
        if r["pos"] < r["end"]:
            self._read_next()
        elif received >= r["size"]:
            self._reading = None
            self._send_frame(r["md5"].digest())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flash", type=Path, required=True, help="flash contents file")
    ap.add_argument("--chip", default="esp32", choices=("esp32", "esp32s3"))
    a = ap.parse_args()
    with EspRomEmulator(a.flash, chip=a.chip) as emu:
        print(emu.port, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
