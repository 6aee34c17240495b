"""`microcot flash` on RP2040/RP2350 boards, with no hardware: UF2 files built here, a temporary
directory standing in for the BOOTSEL drive (with its INFO_UF2.TXT), and a virtual board standing
in for MicroPython on the board. Wrong family, bad blocks and a missing port must fail with a
clear message naming the problem and copy nothing."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from microcot_host.flash import FlashError
from microcot_host.flash import uf2 as uf2_flash
from microcot_host.flash.cli import flash as flash_command
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(60)

RP2040, RP2350_ARM_S, RP2350_RISCV, ABSOLUTE = 0xE48BFF56, 0xE48BFF59, 0xE48BFF5A, 0xE48BFF57
INFO_RP2040 = "UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\nBoard-ID: RPI-RP2\n"
INFO_RP2350 = "UF2 Bootloader v1.0\nModel: Raspberry Pi RP2350\nBoard-ID: RP2350\n"


# ---- UF2 files, built from the format's description ---------------------------------------------


def block(number: int, count: int, addr: int, payload: bytes, family: int = RP2040,
          flags: int = 0x2000, magic: tuple[int, int, int] = (0x0A324655, 0x9E5D5157, 0x0AB16F30),
          size: int | None = None, tail: bytes = b"") -> bytes:
    size = len(payload) if size is None else size
    head = struct.pack("<8I", magic[0], magic[1], flags, addr, size, number, count, family)
    data = (payload + tail).ljust(476, b"\x00")
    return head + data + struct.pack("<I", magic[2])


def uf2(image: bytes, family: int = RP2040, base: int = 0x10000000) -> bytes:
    chunks = [image[i:i + 256].ljust(256, b"\x00") for i in range(0, len(image), 256)]
    return b"".join(block(n, len(chunks), base + 256 * n, c, family) for n, c in enumerate(chunks))


def rp2350_uf2(image: bytes) -> bytes:
    # what picotool writes for the RP2350: the erratum E10 "ignore" block first
    ignore = block(0, 2, 0x10FFFF00, b"\xef" * 256, ABSOLUTE, flags=0xA000,
                   tail=struct.pack("<I", 0x9957E304))
    return ignore + uf2(image, RP2350_ARM_S)


IMAGE = bytes(range(256)) * 7 + b"MicroPython RPI_PICO_W fake" * 10


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i:i + 512] for i in range(0, len(data), 512)]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Drives are searched only under tmp/mnt (never the real mounts of the machine)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setenv("MICROCOT_UF2_SEARCH", str(mnt))
    monkeypatch.setenv("MICROCOT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MICROCOT_PORT", raising=False)
    return mnt


def make_drive(mnt: Path, name: str = "RPI-RP2", info: str = INFO_RP2040) -> Path:
    drive = mnt / name
    drive.mkdir()
    (drive / "INFO_UF2.TXT").write_text(info)
    (drive / "INDEX.HTM").write_text("<html>redirect</html>")
    return drive


def files_on(drive: Path) -> set[str]:
    return {p.name for p in drive.iterdir()} - {"INFO_UF2.TXT", "INDEX.HTM"}


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    path = tmp_path / "RPI_PICO_W-20250415-v1.25.0.uf2"
    path.write_bytes(uf2(IMAGE))
    return path


def run(*args: str):
    return CliRunner().invoke(flash_command, list(args), catch_exceptions=False)


def assert_clean_failure(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output, result.output


# ---- validation --------------------------------------------------------------------------------


def test_valid_rp2040_uf2() -> None:
    report = uf2_flash.validate_uf2(uf2(IMAGE), "rp2040", RP2040)
    assert report.blocks == 9 and report.family == RP2040
    assert (report.start, report.end) == (0x10000000, 0x10000900)
    assert "UF2 for RP2040, 9 blocks" in report.describe()


def test_rp2350_uf2_with_the_erratum_block() -> None:
    report = uf2_flash.validate_uf2(rp2350_uf2(IMAGE), "rp2350", RP2350_ARM_S)
    assert report.blocks == 9 and report.ignored == 1
    # a RISC-V build boots on an RP2350 too
    assert uf2_flash.validate_uf2(uf2(IMAGE, RP2350_RISCV), "rp2350").family == RP2350_RISCV


def test_rp2350_uf2_for_an_rp2040_board() -> None:
    with pytest.raises(FlashError, match=r"not for RP2040: its UF2 family is RP2350 Arm Secure "
                                         r"\(0xe48bff59\).*0xe48bff56"):
        uf2_flash.validate_uf2(rp2350_uf2(IMAGE), "rp2040", RP2040)


def test_board_file_family_must_belong_to_the_chip() -> None:
    with pytest.raises(FlashError, match="uf2_family 0xe48bff59 is not a family of RP2040"):
        uf2_flash.validate_uf2(uf2(IMAGE), "rp2040", RP2350_ARM_S)


def mangle_block(data: bytes, index: int, **fields) -> bytes:
    blocks = blocks_of(data)
    m0, m1, flags, addr, size, number, count, family = struct.unpack_from("<8I", blocks[index])
    values = {"m0": m0, "m1": m1, "flags": flags, "addr": addr, "size": size, "number": number,
              "count": count, "family": family, **fields}
    head = struct.pack("<8I", *(values[k] for k in ("m0", "m1", "flags", "addr", "size", "number",
                                                    "count", "family")))
    b = head + blocks[index][32:]
    if "m_end" in fields:
        b = b[:508] + struct.pack("<I", fields["m_end"])
    blocks[index] = b
    return b"".join(blocks)


GOOD = uf2(IMAGE)


@pytest.mark.parametrize("data, pattern", [
    (b"", "empty file"),
    (GOOD[:-100], "not a whole number of 512-byte UF2 blocks"),
    (b"\x7fELF" + bytes(508), r"block 0 \(file offset 0x0\): bad UF2 start magic"),
    (mangle_block(GOOD, 3, m0=0x12345678), r"block 3 \(file offset 0x600\): bad UF2 start magic"),
    (mangle_block(GOOD, 5, m_end=0), "block 5 .*bad UF2 end magic"),
    (mangle_block(GOOD, 2, addr=0x20000000), r"block 2 .*address 0x20000000 is outside the "
                                             r"RP2040 flash window 0x10000000-0x10ffffff"),
    (mangle_block(GOOD, 4, addr=0x10000480), "block 4 .*not 256-byte aligned"),
    (mangle_block(GOOD, 1, size=300), "block 1 .*payload of 300 bytes; RP2040 blocks carry 256"),
    (mangle_block(GOOD, 1, size=480), "block 1 .*more than the 476"),
    (mangle_block(GOOD, 6, flags=0), "block 6 .*no family id"),
    (mangle_block(GOOD, 0, flags=0x3000), "block 0 .*file container"),
    (mangle_block(GOOD, 7, number=3), "block 7 .*block number 3, expected 7"),
    (mangle_block(GOOD, 8, number=9), "block 8 .*block number 9 is not below its block count 9"),
    (mangle_block(GOOD, 4, count=10), "block 4 .*says 10 blocks in the file, block 0 said 9"),
    (b"".join(blocks_of(GOOD)[:7]), "7 blocks for RP2040 but declares 9: truncated"),
    (b"".join(mangle_block(GOOD, i, count=12)[i * 512:(i + 1) * 512] for i in range(9)),
     "9 blocks for RP2040 but declares 12"),
])
def test_bad_uf2_names_the_block(data: bytes, pattern: str) -> None:
    with pytest.raises(FlashError, match=pattern):
        uf2_flash.validate_uf2(data, "rp2040", RP2040)


# ---- the drive -----------------------------------------------------------------------------------


def test_drives_found_by_info_uf2(env: Path) -> None:
    make_drive(env, "RPI-RP2")
    make_drive(env, "RP2350", INFO_RP2350)
    (env / "USBSTICK").mkdir()  # a drive without INFO_UF2.TXT is not a bootloader
    assert [d.path.name for d in uf2_flash.find_drives("rp2040")] == ["RPI-RP2"]
    assert [d.path.name for d in uf2_flash.find_drives("rp2350")] == ["RP2350"]
    drive = uf2_flash.find_drives("rp2040")[0]
    assert drive.info["Model"] == "Raspberry Pi RP2" and drive.info["banner"].startswith("UF2")


def test_mount_points_from_proc_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROCOT_UF2_SEARCH")
    assert uf2_flash._unescape_mount("/media/me/My\\040Drive") == "/media/me/My Drive"
    assert Path("/") in uf2_flash.mount_points()


def test_copy_tolerates_the_drive_vanishing_at_the_end(env: Path, monkeypatch) -> None:
    drive = uf2_flash.read_drive(make_drive(env))

    def gone(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(uf2_flash.os, "fsync", gone)
    target = uf2_flash.copy_to_drive(GOOD, drive, "fw.uf2")
    assert target.read_bytes() == GOOD


def test_copy_fails_when_the_drive_vanishes_midway(env: Path, monkeypatch) -> None:
    drive = uf2_flash.read_drive(make_drive(env))
    real_write = os.write
    calls = []

    def flaky(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENODEV, "No such device")
        return real_write(fd, data[:1024])

    monkeypatch.setattr(uf2_flash.os, "write", flaky)
    with pytest.raises(FlashError, match=f"went away after 1024 of {len(GOOD)} bytes"):
        uf2_flash.copy_to_drive(GOOD, drive, "fw.uf2")


# ---- the command --------------------------------------------------------------------------------


def test_user_holds_bootsel_and_names_the_drive(env: Path, fw: Path) -> None:
    drive = make_drive(env)
    result = run("--board", "rp2-pico-w", "--firmware", str(fw), "--drive", str(drive),
                 "--no-wait")
    assert result.exit_code == 0, result.output
    assert (drive / fw.name).read_bytes() == fw.read_bytes()
    assert "UF2 for RP2040, 9 blocks" in result.output
    assert "copied; the board reboots" in result.output


def test_bootsel_waits_for_the_drive_to_appear(env: Path, fw: Path) -> None:
    drive = make_drive(env)
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--bootsel", "--no-wait", "--timeout", "2")
    assert result.exit_code == 0, result.output
    assert (drive / fw.name).read_bytes() == fw.read_bytes()


def test_bootsel_without_a_drive_times_out_clearly(env: Path, fw: Path) -> None:
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--bootsel", "--no-wait", "--timeout", "1")
    assert_clean_failure(result, "no RPI-RP2 drive appeared within 1 s", "--drive")


def test_wrong_family_copies_nothing(env: Path, tmp_path: Path) -> None:
    drive = make_drive(env)
    fw = tmp_path / "RPI_PICO2_W-20250415-v1.25.0.uf2"
    fw.write_bytes(rp2350_uf2(IMAGE))
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--drive", str(drive), "--no-wait")
    assert_clean_failure(result, "not for RP2040", "RP2350 Arm Secure")
    assert files_on(drive) == set()


def test_bad_block_copies_nothing(env: Path, fw: Path) -> None:
    drive = make_drive(env)
    fw.write_bytes(mangle_block(GOOD, 4, addr=0x30000000))
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--drive", str(drive), "--no-wait")
    assert_clean_failure(result, "block 4 (file offset 0x800)", "outside the RP2040 flash window")
    assert files_on(drive) == set()


def test_drive_of_the_other_chip_is_refused(env: Path, fw: Path) -> None:
    drive = make_drive(env, "RP2350", INFO_RP2350)
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--drive", str(drive), "--no-wait")
    assert_clean_failure(result, "the drive of an RP2350", "the board is an RP2040")
    assert files_on(drive) == set()


def test_not_a_bootsel_drive(tmp_path: Path, fw: Path) -> None:
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--drive", str(tmp_path), "--no-wait")
    assert_clean_failure(result, "no INFO_UF2.TXT there")


def test_missing_port_copies_nothing(env: Path, fw: Path, tmp_path: Path) -> None:
    drive = make_drive(env)
    result = run("-b", "rp2-pico-w", "-f", str(fw), "-p", str(tmp_path / "ttyACM7"))
    assert_clean_failure(result, "ttyACM7: no such port", "nothing was written")
    assert files_on(drive) == set()


def test_no_board_at_all(fw: Path) -> None:
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--no-wait")
    assert_clean_failure(result, "no board given", "--bootsel")


def test_cli_as_a_user_runs_it(env: Path, tmp_path: Path) -> None:
    fw = tmp_path / "bad.uf2"
    fw.write_bytes(mangle_block(GOOD, 2, m0=0))
    r = subprocess.run([sys.executable, "-m", "microcot_host", "flash", "-b", "rp2-pico2-w",
                        "-f", str(fw), "--bootsel"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("Error: block 2 (file offset 0x400): bad UF2 start magic")


def test_no_firmware_says_where_to_download(tmp_path: Path) -> None:
    result = run("-b", "rp2-pico2-w", "--bootsel")
    assert_clean_failure(result, "https://micropython.org/download/RPI_PICO2_W/", ".uf2",
                         str(tmp_path / "home" / "firmware"))


# ---- with MicroPython running (a virtual board) ------------------------------------------------


@pytest.fixture
def board(tmp_path: Path) -> Iterator[VirtualBoard]:
    vb = VirtualBoard("uf2-test", flash_dir=tmp_path / "vflash").start()
    try:
        yield vb
    finally:
        vb.stop()


def test_no_bootloader_on_the_board(env: Path, fw: Path, board: VirtualBoard) -> None:
    drive = make_drive(env)
    result = run("-b", "rp2-pico-w", "-f", str(fw), "-p", board.port, "--timeout", "2")
    assert_clean_failure(result, f"{board.port}: no machine.bootloader() on this board",
                         "--bootsel", "failed on 1 board(s)")
    assert files_on(drive) == set()


def test_not_an_rp2_board(env: Path, fw: Path, board: VirtualBoard, tmp_path: Path) -> None:
    (tmp_path / "vflash" / "boot.py").write_text(_shim(env / "RPI-RP2"))
    result = run("-b", "rp2-pico-w", "-f", str(fw), "-p", board.port, "--timeout", "2")
    assert_clean_failure(result, "runs MicroPython on 'linux', not an RP2040/RP2350 board")


def _shim(drive: Path) -> str:
    """boot.py for the virtual board: a machine.bootloader() that 'reboots into BOOTSEL' by
    making the drive appear (writing its INFO_UF2.TXT on the host) and resetting the board."""
    return f"""
import sys, _vboard
_m = sys.modules['machine']
class _M:
    def __getattr__(self, n):
        return getattr(_m, n)
    def bootloader(self):
        f = _vboard.open_host({str(drive / 'INFO_UF2.TXT')!r}, 'w')
        f.write({INFO_RP2040!r})
        f.close()
        _m.reset()
sys.modules['machine'] = _M()
"""


def test_bootloader_drive_copy_and_repl(env: Path, fw: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    drive = env / "RPI-RP2"
    drive.mkdir()  # mounted, but no bootloader behind it until machine.bootloader() runs
    flash_dir = tmp_path / "vflash"
    flash_dir.mkdir()
    (flash_dir / "boot.py").write_text(_shim(drive))
    # the virtual board is the unix port; let it stand in for an rp2 here
    monkeypatch.setattr(uf2_flash, "BOOTSEL_PLATFORMS", ("rp2", "linux"))
    with VirtualBoard("uf2-bootsel", flash_dir=flash_dir) as vb:
        result = run("-b", "rp2-pico-w", "-f", str(fw), "-p", vb.port, "--timeout", "20")
        assert result.exit_code == 0, result.output
        assert (drive / fw.name).read_bytes() == fw.read_bytes()
        assert "asked to reboot into BOOTSEL" in result.output
        assert vb.hard_resets >= 1
        assert f"{vb.port}: MicroPython " in result.output and " on linux" in result.output


def test_drive_given_and_repl_awaited_on_the_port(env: Path, fw: Path,
                                                  board: VirtualBoard) -> None:
    drive = make_drive(env)
    result = run("-b", "rp2-pico-w", "-f", str(fw), "--drive", str(drive), "-p", board.port,
                 "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert (drive / fw.name).read_bytes() == fw.read_bytes()
    assert f"{board.port}: MicroPython " in result.output
