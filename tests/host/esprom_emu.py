"""An emulated ESP32 ROM serial loader on a pseudo-terminal, for driving the real esptool.

A test fixture, not a product: it is as much of the ROM loader protocol as esptool uses with
`--no-stub` (ESP32 in full; enough of an ESP32-S3 to be detected), with a flash chip behind it
kept in a file. What it implements:

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
  * FLASH_END / FLASH_DEFL_END "run user code": the loader leaves and answers nothing more.

Every request is recorded (`ops`), so a test can assert that nothing at all reached the loader.

Run it by hand: `python tests/host/esprom_emu.py --flash /tmp/flash.bin` prints the port.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import struct
import threading
import time
import tty
import zlib
from pathlib import Path

OPS = {
    0x02: "FLASH_BEGIN", 0x03: "FLASH_DATA", 0x04: "FLASH_END", 0x05: "MEM_BEGIN",
    0x06: "MEM_END", 0x07: "MEM_DATA", 0x08: "SYNC", 0x09: "WRITE_REG", 0x0A: "READ_REG",
    0x0B: "SPI_SET_PARAMS", 0x0D: "SPI_ATTACH", 0x0E: "READ_FLASH_SLOW", 0x0F: "CHANGE_BAUDRATE",
    0x10: "FLASH_DEFL_BEGIN", 0x11: "FLASH_DEFL_DATA", 0x12: "FLASH_DEFL_END",
    0x13: "SPI_FLASH_MD5", 0x14: "GET_SECURITY_INFO",
}
WRITES = {"FLASH_BEGIN", "FLASH_DATA", "FLASH_DEFL_BEGIN", "FLASH_DEFL_DATA"}

# ROM error codes (second status byte)
ERR_INVALID_MSG = 0x05
ERR_FAILED = 0x06
ERR_BAD_CRC = 0x07
ERR_FLASH_WRITE = 0x08
ERR_INFLATE = 0x0B

SECTOR = 0x1000
CHECKSUM_MAGIC = 0xEF

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


class EspRomEmulator:
    """The ROM loader of an ESP32 (or, for detection only, an ESP32-S3) behind a pty."""

    def __init__(self, flash_path: Path | str, chip: str = "esp32", flash_size: int = 4 << 20,
                 mac: bytes = bytes.fromhex("246f28a1b2c3"), latency: float = 0.0) -> None:
        if chip not in ("esp32", "esp32s3"):
            raise ValueError(f"chip {chip!r}: the emulator knows esp32 and esp32s3")
        self.chip = chip
        self.flash_path = Path(flash_path)
        self.flash_size = flash_size
        self.mac = mac
        self.latency = latency  # seconds before each answer, like a slow link or a busy chip
        self.ops: list[str] = []
        self.baud = 115200
        self.exited = False
        self.errors: list[str] = []
        self._regs: dict[int, int] = {}
        self._write: dict | None = None
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
        new = bytes(a & b for a, b in zip(old, data, strict=True))
        os.pwrite(self._flash_fd, new, addr)
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

    def _reply(self, op: int, val: int = 0, data: bytes = b"", status: int = 0,
               error: int = 0) -> None:
        if self.latency:
            time.sleep(self.latency)
        body = data + bytes([status, error, 0, 0])
        packet = struct.pack("<BBHI", 1, op, len(body), val) + body
        os.write(self._master, slip_encode(packet))

    def _fail(self, op: int, error: int, why: str) -> None:
        self.errors.append(f"{OPS.get(op, hex(op))}: {why}")
        self._reply(op, status=1, error=error)

    def _packet(self, pkt: bytes) -> None:
        if self.exited or len(pkt) < 8 or pkt[0] != 0:
            return
        _, op, size, chk = struct.unpack_from("<BBHI", pkt)
        data = pkt[8:8 + size]
        name = OPS.get(op, hex(op))
        self.ops.append(name)
        if len(data) != size:
            self._fail(op, ERR_INVALID_MSG, "length does not match the header")
            return
        handler = getattr(self, "_op_" + name.lower(), None)
        if handler is None or (name == "GET_SECURITY_INFO" and self.chip == "esp32"):
            self._fail(op, ERR_INVALID_MSG, "not a command of this ROM")
            return
        handler(op, data, chk)

    def _op_sync(self, op: int, data: bytes, chk: int) -> None:
        if data != b"\x07\x07\x12\x20" + b"\x55" * 32:
            return  # the ROM ignores a garbled SYNC; esptool tries again
        for _ in range(8):
            self._reply(op, val=0x20120707)

    def _op_read_reg(self, op: int, data: bytes, chk: int) -> None:
        (addr,) = struct.unpack("<I", data[:4])
        self._reply(op, val=self._read_reg(addr))

    def _op_write_reg(self, op: int, data: bytes, chk: int) -> None:
        for i in range(0, len(data) - 15, 16):
            addr, value, mask, _delay = struct.unpack_from("<IIII", data, i)
            self._write_reg(addr, value, mask)
        self._reply(op)

    def _op_get_security_info(self, op: int, data: bytes, chk: int) -> None:
        # ESP32-S3: flags, flash_crypt_cnt, 7 key purposes, chip id, API version
        self._reply(op, data=struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0))

    def _op_spi_attach(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_spi_set_params(self, op: int, data: bytes, chk: int) -> None:
        _fl_id, total, _block, _sector, _page, _mask = struct.unpack("<IIIIII", data)
        if total > self.flash_size:
            self._fail(op, ERR_FAILED, f"flash size {total} is more than the chip has")
            return
        self._reply(op)

    def _op_change_baudrate(self, op: int, data: bytes, chk: int) -> None:
        new, _old = struct.unpack("<II", data)
        self._reply(op)  # answered at the old rate; a pty has no rate to change
        self._set_baud(new)

    def _begin(self, op: int, data: bytes, deflated: bool) -> None:
        erase, blocks, block_size, offset = struct.unpack_from("<IIII", data)
        if offset % SECTOR or not self._erase(offset, erase):
            self._fail(op, ERR_FAILED, f"bad region {offset:#x}+{erase:#x}")
            return
        self._write = {"offset": offset, "pos": offset, "blocks": blocks, "block_size": block_size,
                       "seq": 0, "inflate": zlib.decompressobj() if deflated else None}
        self._reply(op)

    def _op_flash_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, deflated=False)

    def _op_flash_defl_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, deflated=True)

    def _data(self, op: int, data: bytes, chk: int, deflated: bool) -> None:
        w = self._write
        if w is None or (w["inflate"] is not None) != deflated:
            self._fail(op, ERR_FAILED, "no matching BEGIN")
            return
        size, seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:]
        if len(payload) != size:
            self._fail(op, ERR_INVALID_MSG, "payload length does not match")
            return
        calc = CHECKSUM_MAGIC
        for b in payload:
            calc ^= b
        if calc != chk & 0xFF:
            self._fail(op, ERR_BAD_CRC, f"block {seq}: checksum {chk:#x}, computed {calc:#x}")
            return
        if seq != w["seq"]:
            self._fail(op, ERR_FAILED, f"block {seq} out of sequence (expected {w['seq']})")
            return
        if deflated:
            try:
                plain = w["inflate"].decompress(payload)
            except zlib.error as exc:
                self._fail(op, ERR_INFLATE, f"inflate: {exc}")
                return
            addr = w["pos"]
        else:
            plain = payload
            addr = w["offset"] + seq * w["block_size"]
        if not self._program(addr, plain):
            self._fail(op, ERR_FLASH_WRITE, f"write past the end of flash at {addr:#x}")
            return
        w["pos"] = addr + len(plain)
        w["seq"] += 1
        self._reply(op)

    def _op_flash_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, deflated=False)

    def _op_flash_defl_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, deflated=True)

    def _end(self, op: int, data: bytes) -> None:
        self._reply(op)
        self._write = None
        # 0 reboots, 1 runs the application: either way the ROM loader is gone
        self.exited = True

    def _op_flash_end(self, op: int, data: bytes, chk: int) -> None:
        self._end(op, data)

    def _op_flash_defl_end(self, op: int, data: bytes, chk: int) -> None:
        self._end(op, data)

    def _op_spi_flash_md5(self, op: int, data: bytes, chk: int) -> None:
        addr, size, _, _ = struct.unpack_from("<IIII", data)
        if addr + size > self.flash_size:
            self._fail(op, ERR_FAILED, "MD5 region past the end of flash")
            return
        digest = hashlib.md5(os.pread(self._flash_fd, size, addr)).hexdigest()
        self._reply(op, data=digest.encode())

    def _op_read_flash_slow(self, op: int, data: bytes, chk: int) -> None:
        addr, size = struct.unpack_from("<II", data)
        if size > 64 or addr + size > self.flash_size:
            self._fail(op, ERR_FAILED, "bad read")
            return
        self._reply(op, data=os.pread(self._flash_fd, size, addr).ljust(64, b"\xff"))


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
