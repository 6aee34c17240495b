"""`microcot flash` on the ESP32 family, with no hardware: the real esptool (in our worker
processes) talks to an emulated ESP32 ROM loader on a pty, and the image must end up in the
emulator's flash file byte for byte at MicroPython's offset, both through the ROM loader
(`--no-stub`) and the way users flash by default, with esptool's flasher stub uploaded into the
emulator's RAM and answering from then on. Bad images, a wrong chip and a missing port must fail
with a clear message and write nothing; a write the MD5 check finds corrupted must fail."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from esprom_emu import EspRomEmulator

from microcot_host import boards
from microcot_host.flash import FlashError, resolve_firmware, wait_for_repl
from microcot_host.flash import esp as esp_flash

if TYPE_CHECKING:
    from esptool.loader import ESPLoader

pytestmark = pytest.mark.timeout(60)

ESP32_CHIP_ID, ESP32S3_CHIP_ID = 0, 9
FLASH_SIZE = 4 << 20


# ---- images, written independently of esptool so its parser checks our understanding ----------


def esp_image(chip_id: int = ESP32_CHIP_ID, segments: list[tuple[int, bytes]] | None = None,
              entry: int = 0x40080400, digest: bool = True) -> bytes:
    """A minimal ESP image: 8-byte header, extended header, segments, checksum, SHA-256."""
    if segments is None:
        segments = [(0x3FFB0000, bytes(range(256)) * 3), (0x40080000, b"\x36\x41\x00" * 600)]
    out = struct.pack("<BBBBI", 0xE9, len(segments), 2, 0x20, entry)  # DIO, 4 MB, 40 MHz
    # WP pin disabled, drive strengths 0, chip id, min rev 0, rev range v0.0-v655.35
    out += struct.pack("<BBBBHBHH4sB", 0xEE, 0, 0, 0, chip_id, 0, 0, 0xFFFF, bytes(4),
                       1 if digest else 0)
    checksum = 0xEF
    for addr, data in segments:
        data += bytes(-len(data) % 4)
        out += struct.pack("<II", addr, len(data)) + data
        for b in data:
            checksum ^= b
    out += bytes(15 - len(out) % 16) + bytes([checksum])  # checksum ends a 16-byte line
    return out + (hashlib.sha256(out).digest() if digest else b"")


def micropython_bin(chip_id: int = ESP32_CHIP_ID, offset: int = 0x1000) -> bytes:
    """Shaped like MicroPython's firmware.bin: bootloader, partition table, app at 0x10000."""
    data = bytearray(esp_image(chip_id))
    data += b"\xff" * (0x8000 - offset - len(data))
    data += b"\xaa\x50" + bytes(30) + b"\xff" * (0x1000 - 32)  # a partition table entry's magic
    data += b"\xff" * (0x10000 - offset - len(data))
    data += esp_image(chip_id, [(0x3F400020, b"MicroPython fake app " * 40),
                                (0x400D0020, b"\x00\x01\x02\x03" * 300)], entry=0x400D1000)
    return bytes(data)


def corrupt(data: bytes, at: int, value: int) -> bytes:
    b = bytearray(data)
    b[at] = value
    return bytes(b)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EspRomEmulator]:
    emu = EspRomEmulator(tmp_path / "flash.bin", flash_size=FLASH_SIZE).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    path = tmp_path / "ESP32_GENERIC-20250101-v1.25.0.bin"
    path.write_bytes(micropython_bin())
    return path


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MICROCOT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MICROCOT_PORT", raising=False)
    return tmp_path / "home"


def flash(*args: str, timeout: float = 45) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microcot_host", "flash", *args],
                          capture_output=True, text=True, timeout=timeout)


ROM = ("--no-stub", "--before", "no-reset", "--no-wait")
STUB = ("--before", "no-reset", "--no-wait")  # what users run: esptool uploads its stub


def assert_clean_failure(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert w in r.stderr, r.stderr


# ---- the image check (no board involved) -------------------------------------------------------


def test_esptool_reads_our_generated_image_like_ours() -> None:
    from esptool.bin_image import LoadFirmwareImage

    image = LoadFirmwareImage("esp32", esp_image())
    assert image.chip_id == ESP32_CHIP_ID
    assert image.checksum == image.calculate_checksum()
    assert image.stored_digest == image.calc_digest


def test_check_image_reports_bootloader_and_application() -> None:
    report = esp_flash.check_image(micropython_bin(), "esp32", 0x1000)
    assert report.chip == "esp32" and report.sha256 and report.segments == 2
    assert "application at 0x10000 valid" in report.describe()
    assert not report.warnings


@pytest.mark.parametrize("data, words", [
    (b"", "too short"),
    (b"\x00" * 64, "first byte 0x00"),
    (b"UF2\n" + bytes(60), "not an ESP firmware image"),
    (esp_image(ESP32S3_CHIP_ID), "built for ESP32-S3"),
    (esp_image(77), "built for an unknown chip .image chip id 77."),
    (corrupt(esp_image(), 40, 0x99), "checksum"),                 # a segment byte changed
    (corrupt(esp_image(), -1, 0x00), "SHA-256"),                   # the digest changed
    (esp_image()[:200], "corrupt image"),                          # truncated in a segment
    (corrupt(esp_image(), 23, 7), "corrupt image"),                # digest flag neither 0 nor 1
    (corrupt(micropython_bin(), 0xF000 + 40, 0x12), "application image at 0x10000"),
])
def test_check_image_rejects(data: bytes, words: str) -> None:
    with pytest.raises(FlashError, match=words):
        esp_flash.check_image(data, "esp32", 0x1000)


def test_offset_table_agrees_with_esptool_and_the_board_files() -> None:
    from esptool.targets import CHIP_DEFS

    for chip, offset in esp_flash.CHIP_OFFSETS.items():
        assert offset == CHIP_DEFS[chip].BOOTLOADER_FLASH_OFFSET, chip
    for name in ("esp32-generic", "esp32-s3", "esp32-c3"):
        board = boards.load(name)
        assert esp_flash.firmware_offset(board) == board.raw["flash_offset"]


def test_board_file_with_a_wrong_offset_is_refused() -> None:
    good = boards.load("esp32-s3")
    bad = boards.Board(good.name, good.family, good.chip, {**good.raw, "flash_offset": 0x1000})
    with pytest.raises(FlashError, match="flash_offset = 0x1000 .* goes at 0x0"):
        esp_flash.firmware_offset(bad)


# ---- against the emulated ROM loader, through the CLI and its worker processes ------------------


def test_flash_rom_loader_deflated(emulator: EspRomEmulator, fw: Path) -> None:
    data = fw.read_bytes()
    r = flash("--board", "esp32-generic", "--port", emulator.port, "--firmware", str(fw), *ROM)
    assert r.returncode == 0, r.stdout + r.stderr
    flash_now = emulator.flash()
    assert flash_now[0x1000:0x1000 + len(data)] == data
    assert flash_now[:0x1000] == b"\xff" * 0x1000
    assert flash_now[0x1000 + len(data):] == b"\xff" * (FLASH_SIZE - 0x1000 - len(data))
    for op in ("SYNC", "READ_REG", "WRITE_REG", "CHANGE_BAUDRATE", "SPI_ATTACH", "SPI_SET_PARAMS",
               "FLASH_DEFL_BEGIN",
               "FLASH_DEFL_DATA", "SPI_FLASH_MD5"):
        assert op in emulator.ops, op
    assert "FLASH_DATA" not in emulator.ops
    assert emulator.baud == 460800  # the board file's rate, after syncing at 115200
    assert not emulator.errors[2:], emulator.errors  # the first two: ESP32 has no security info
    assert "ESP32-D0WD-V3 (revision v3.0), MAC 24:6f:28:a1:b2:c3" in r.stdout
    assert "application at 0x10000 valid" in r.stdout
    assert f"{emulator.port}: wrote {len(data)} bytes at 0x1000, verified (MD5)" in r.stdout
    assert "100%" in r.stdout


def test_flash_rom_loader_uncompressed_erases_first(emulator: EspRomEmulator, fw: Path) -> None:
    # flash full of zeros: a write without the erase would leave zeros (NOR only clears bits)
    emulator.flash_path.write_bytes(bytes(FLASH_SIZE))
    data = fw.read_bytes()
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), "--no-compress", *ROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert emulator.flash()[0x1000:0x1000 + len(data)] == data
    assert emulator.flash()[:0x1000] == bytes(0x1000)  # before the offset: left alone
    assert "FLASH_BEGIN" in emulator.ops and "FLASH_DATA" in emulator.ops
    assert "FLASH_DEFL_DATA" not in emulator.ops


def default_stub(chip: str = "esp32") -> tuple[str, dict]:
    """The stub esptool uploads by default: the first of its stub directories with this chip."""
    from esptool.loader import StubFlasher

    for version in StubFlasher.STUB_SUBDIRS:
        path = Path(StubFlasher.STUB_DIR, version, f"{chip}.json")
        if path.exists():
            return version, json.loads(path.read_text())
    raise AssertionError(f"esptool ships no stub for {chip}")


def fill(emu: EspRomEmulator, byte: int) -> bytes:
    """Old contents everywhere, so that what was erased (and what was not) shows."""
    old = bytes([byte]) * FLASH_SIZE
    emu.flash_path.write_bytes(old)
    return old


@pytest.mark.parametrize("compress", [True, False], ids=["deflated", "uncompressed"])
def test_flash_with_the_stub(emulator: EspRomEmulator, fw: Path, compress: bool) -> None:
    fill(emulator, 0x5A)
    data = fw.read_bytes()
    args = () if compress else ("--no-compress",)
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), *args, *STUB)
    assert r.returncode == 0, r.stdout + r.stderr
    # the stub was uploaded intact (text and data at their addresses) and started
    version, stub = default_stub()
    assert emulator.stub_version == version
    assert bytes(emulator.ram[stub["text_start"]]) == base64.b64decode(stub["text"])
    assert bytes(emulator.ram[stub["data_start"]]) == base64.b64decode(stub["data"])
    first = emulator.ops.index("MEM_END") + 1
    assert emulator.stub_ops == emulator.ops[first:]  # everything after MEM_END went to the stub
    # the stub, not the ROM, took the new rate, the write and the verification
    assert emulator.baud_changes == [(460800, 115200)] and emulator.baud == 460800
    writes = (("FLASH_DEFL_BEGIN", "FLASH_DEFL_DATA", "FLASH_DEFL_END") if compress
              else ("FLASH_BEGIN", "FLASH_DATA", "FLASH_END"))
    for op in ("CHANGE_BAUDRATE", *writes, "SPI_FLASH_MD5"):
        assert op in emulator.stub_ops, op
    assert not {"FLASH_DATA", "FLASH_DEFL_DATA", "SPI_FLASH_MD5"} & set(emulator.ops[:first])
    assert emulator.md5_answers == [{"by": "stub", "addr": 0x1000, "size": len(data),
                                     "md5": hashlib.md5(data).hexdigest()}]
    assert not emulator.errors[2:], emulator.errors  # the first two: ESP32 has no security info
    assert not emulator.exited  # FLASH_END does not end the stub as it ends the ROM loader
    # the image at the board's offset; the stub erased only the sectors it wrote
    end = 0x1000 + len(data)
    sector_end = -(-end // 0x1000) * 0x1000
    flash_now = emulator.flash()
    assert flash_now[0x1000:end] == data
    assert flash_now[end:sector_end] == b"\xff" * (sector_end - end)
    assert flash_now[:0x1000] == b"\x5a" * 0x1000
    assert flash_now[sector_end:] == b"\x5a" * (FLASH_SIZE - sector_end)
    assert f"{emulator.port}: wrote {len(data)} bytes at 0x1000, verified (MD5)" in r.stdout


def test_flash_with_the_stub_erases_everything_first(emulator: EspRomEmulator, fw: Path) -> None:
    fill(emulator, 0x00)  # a write without the erase would leave zeros (NOR only clears bits)
    data = fw.read_bytes()
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), "--erase", *STUB)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERASE_FLASH" in emulator.stub_ops
    assert emulator.stub_ops.index("ERASE_FLASH") < emulator.stub_ops.index("FLASH_DEFL_BEGIN")
    expected = b"\xff" * 0x1000 + data + b"\xff" * (FLASH_SIZE - 0x1000 - len(data))
    assert emulator.flash() == expected
    assert "Erasing flash" in r.stdout


@pytest.mark.parametrize("loader", ["stub", "ROM"])
def test_corrupted_write_fails_the_md5_check(tmp_path: Path, fw: Path, loader: str) -> None:
    bad = 0x1000 + 0x9000  # inside the image, in the partition table's sector
    data = fw.read_bytes()
    with EspRomEmulator(tmp_path / "flash.bin", flash_size=FLASH_SIZE, corrupt_at=bad) as emu:
        r = flash("-b", "esp32-generic", "-p", emu.port, "-f", str(fw),
                  *(STUB if loader == "stub" else ROM))
        assert_clean_failure(r, f"{emu.port}: MD5 of file does not match data in flash",
                             f"failed on 1 board(s): {emu.port}")
        assert f"{emu.port}: wrote" not in r.stdout
        assert emu.corrupted == [bad]
        answer = emu.md5_answers[-1]
        assert answer["by"] == loader and (answer["addr"], answer["size"]) == (0x1000, len(data))
        assert answer["md5"] != hashlib.md5(data).hexdigest()
        assert emu.stub_running == (loader == "stub")
        flash_now = emu.flash()
        assert flash_now[bad] == data[bad - 0x1000] ^ 0x01
        assert flash_now[0x1000:bad] == data[:bad - 0x1000]


def _connect(emu: EspRomEmulator) -> ESPLoader:
    from esptool.cmds import detect_chip

    return detect_chip(emu.port, baud=115200, connect_mode="no-reset", connect_attempts=1)


@pytest.mark.parametrize("damage", ["text byte", "entry point"])
def test_stub_that_is_not_esptools_does_not_run(emulator: EspRomEmulator, damage: str) -> None:
    from esptool.loader import StubFlasher
    from esptool.util import FatalError

    with _connect(emulator) as esp:
        stub = StubFlasher(esp)
        if damage == "text byte":
            text = bytearray(stub.text)
            text[100] ^= 0xFF  # one byte damaged on the way
            stub.text = bytes(text)
        else:
            stub.entry += 4  # intact code, entered at the wrong place
        esp._port.timeout = 0.5  # no "OHAI" is coming; do not wait esptool's 3 s for it
        with pytest.raises(FatalError, match="Failed to start stub flasher"):
            esp.run_stub(stub)
    assert emulator.stub_version is None and emulator.exited
    assert "does not start a flasher stub" in emulator.errors[-1]
    assert emulator.ops[-1] == "MEM_END" and not emulator.wrote


def test_stub_reads_erases_and_hashes_regions(emulator: EspRomEmulator) -> None:
    old = bytes(range(256)) * (FLASH_SIZE // 256)
    emulator.flash_path.write_bytes(old)
    with _connect(emulator) as rom:
        esp = rom.run_stub()
        assert esp.IS_STUB and emulator.stub_running
        assert esp.read_flash(0x1F00, 0x2300) == old[0x1F00:0x4200]  # unaligned, 3 packets
        esp.erase_region(0x2000, 0x1000)
        assert esp.flash_md5sum(0x1000, 0x3000) == hashlib.md5(
            old[0x1000:0x2000] + b"\xff" * 0x1000 + old[0x3000:0x4000]).hexdigest()
        from esptool.util import FatalError

        with pytest.raises(FatalError, match="Bad data length"):  # the stub's own error code
            esp.erase_region(0x2100, 0x1000)
    assert [op for op in emulator.stub_ops if op != "READ_REG"] == [
        "READ_FLASH", "ERASE_REGION", "SPI_FLASH_MD5", "ERASE_REGION"]
    assert emulator.md5_answers[-1]["by"] == "stub"


def test_several_boards_in_parallel(tmp_path: Path, fw: Path) -> None:
    # answers slowed down so that each session lasts long enough to see them overlap
    emus = [EspRomEmulator(tmp_path / f"flash{i}.bin", flash_size=FLASH_SIZE, latency=0.02).start()
            for i in range(3)]
    stamps: dict[str, list[float]] = {}
    try:
        for e in emus:
            original = e._packet

            def timed(pkt: bytes, e=e, original=original) -> None:
                stamps.setdefault(e.port, []).append(time.monotonic())
                original(pkt)

            e._packet = timed  # type: ignore[method-assign]
        args = [a for e in emus for a in ("--port", e.port)]
        r = flash("-b", "esp32-generic", *args, "-f", str(fw), *ROM)
        assert r.returncode == 0, r.stdout + r.stderr
        data = fw.read_bytes()
        for e in emus:
            assert e.flash()[0x1000:0x1000 + len(data)] == data
            assert f"{e.port}: wrote {len(data)} bytes" in r.stdout
        # one worker process per port, all at once: every board's session overlaps the others
        spans = [(min(s), max(s)) for s in stamps.values()]
        assert max(start for start, _ in spans) < min(end for _, end in spans)
    finally:
        for e in emus:
            e.stop()


def test_wrong_chip_image_writes_nothing(emulator: EspRomEmulator, tmp_path: Path) -> None:
    fw = tmp_path / "ESP32_GENERIC_S3.bin"
    fw.write_bytes(micropython_bin(ESP32S3_CHIP_ID, offset=0x0))
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), *ROM)
    assert_clean_failure(r, "built for ESP32-S3", "board has an ESP32")
    assert emulator.ops == []  # not even a SYNC
    assert emulator.flash() == b"\xff" * FLASH_SIZE


@pytest.mark.parametrize("mangle, words", [
    (lambda d: corrupt(d, 0, 0x00), "first byte 0x00"),
    (lambda d: corrupt(d, 40, d[40] ^ 1), "checksum"),
    (lambda d: d[:100], "corrupt image"),
    (lambda d: corrupt(d, 0xF000 + 100, d[0xF000 + 100] ^ 0xFF), "application image"),
])
def test_corrupt_image_writes_nothing(emulator: EspRomEmulator, fw: Path, mangle, words) -> None:
    fw.write_bytes(mangle(fw.read_bytes()))
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), *ROM)
    assert_clean_failure(r, words)
    assert emulator.ops == []
    assert emulator.flash() == b"\xff" * FLASH_SIZE


def test_wrong_chip_on_the_port_writes_nothing(tmp_path: Path, fw: Path) -> None:
    with EspRomEmulator(tmp_path / "s3.bin", chip="esp32s3", flash_size=FLASH_SIZE) as emu:
        r = flash("-b", "esp32-generic", "-p", emu.port, "-f", str(fw), *ROM)
        assert_clean_failure(r, "the chip is an ESP32-S3", "wants an ESP32", "--board")
        assert "GET_SECURITY_INFO" in emu.ops  # it was asked, and answered as an S3
        assert not emu.wrote
        assert emu.flash() == b"\xff" * FLASH_SIZE


def test_missing_port_writes_nothing(emulator: EspRomEmulator, fw: Path,
                                     tmp_path: Path) -> None:
    gone = str(tmp_path / "ttyUSB9")
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-p", gone, "-f", str(fw), *ROM)
    assert_clean_failure(r, "ttyUSB9: no such port", "nothing was written")
    assert emulator.ops == []  # the good port is not touched either


def test_no_port_at_all(fw: Path) -> None:
    r = flash("-b", "esp32-generic", "-f", str(fw), *ROM)
    assert_clean_failure(r, "no port given")


def test_silent_port_is_a_clear_error(tmp_path: Path, fw: Path) -> None:
    master, slave = os.openpty()  # a serial port with nothing behind it
    try:
        r = flash("-b", "esp32-generic", "-p", os.ttyname(slave), "-f", str(fw), *ROM)
    finally:
        os.close(master)
        os.close(slave)
    assert_clean_failure(r, "no ESP bootloader answers", "hold BOOT")


def test_erase_needs_the_stub(emulator: EspRomEmulator, fw: Path) -> None:
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), "--erase", *ROM)
    assert_clean_failure(r, "--erase needs esptool's flasher stub")
    assert emulator.ops == []


def test_check_only_touches_no_board(fw: Path) -> None:
    r = flash("-b", "esp32-generic", "-f", str(fw), "--check")
    assert r.returncode == 0, r.stderr
    assert "ESP32 image" in r.stdout and "SHA-256 valid" in r.stdout


def test_virtual_board_has_nothing_to_flash(fw: Path) -> None:
    r = flash("-b", "virtual", "-f", str(fw), "--check")
    assert_clean_failure(r, "nothing to flash")


# ---- where firmware comes from -----------------------------------------------------------------


def test_no_firmware_says_where_to_download(home: Path) -> None:
    r = flash("-b", "esp32-s3", "-p", "/dev/null", "--no-wait")
    assert_clean_failure(r, "https://micropython.org/download/ESP32_GENERIC_S3/",
                         str(home / "firmware"))


def test_firmware_from_the_cache(home: Path) -> None:
    board = boards.load("esp32-generic")
    cache = home / "firmware"
    cache.mkdir(parents=True)
    for name in ("ESP32_GENERIC-20240602-v1.23.0.bin", "ESP32_GENERIC-20250415-v1.25.0.bin",
                 "ESP32_GENERIC_S3-20250801-v1.26.0.bin", "RPI_PICO_W-20250415-v1.25.0.uf2"):
        (cache / name).write_bytes(b"x")
    # the newest build of exactly this board (not the S3's, whose name shares the prefix)
    assert resolve_firmware(board, None).name == "ESP32_GENERIC-20250415-v1.25.0.bin"
    assert resolve_firmware(board, "ESP32_GENERIC-20240602-v1.23.0.bin").parent == cache
    with pytest.raises(FlashError, match="no such file"):
        resolve_firmware(board, "ESP32_GENERIC-19990101-v0.1.bin")


# ---- after flashing: the REPL and the version ---------------------------------------------------


def test_wait_for_repl_reports_the_version(virtual_board) -> None:
    running = wait_for_repl([virtual_board.port], timeout=20)
    assert running.port == virtual_board.port
    assert running.info.platform == "linux"
    assert running.describe().startswith(f"MicroPython {running.info.version} on linux")


def test_each_flashed_board_is_awaited(virtual_board, emulator: EspRomEmulator, capsys) -> None:
    from microcot_host.flash import cli

    failed = cli._await_repls([virtual_board.port, emulator.port], timeout=3)
    out, err = capsys.readouterr()
    assert failed == [emulator.port]
    assert f"{virtual_board.port}: MicroPython " in out and " on linux" in out
    assert f"{emulator.port}: error: no MicroPython REPL within 3 s" in err


# ---- --json: the result for a program, progress on stderr ----------------------------------------


def test_json_reports_each_board(emulator: EspRomEmulator, fw: Path) -> None:
    r = flash("-b", "esp32-generic", "-p", emulator.port, "-f", str(fw), "--json", *ROM)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert result["ok"] is True and result["board"] == "esp32-generic"
    assert result["firmware"] == str(fw) and "application at 0x10000 valid" in result["image"]
    assert result["boards"] == [{"port": emulator.port, "ok": True, "error": None}]
    assert "100%" in r.stderr


def test_json_names_a_failed_board(tmp_path: Path, fw: Path) -> None:
    master, slave = os.openpty()
    port = os.ttyname(slave)
    try:
        r = flash("-b", "esp32-generic", "-p", port, "-f", str(fw), "--json", *ROM)
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 1
    result = json.loads(r.stdout)
    assert result["ok"] is False
    [board] = result["boards"]
    assert board["port"] == port and not board["ok"]
    assert "no ESP bootloader answers" in board["error"]
