"""Finding boards and resolving --port: fake USB ports, a fake sysfs, and real virtual boards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from serial.tools import list_ports, list_ports_common

from microcot_host import boards_cli, deploy, ports, transport
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(120)

_REAL_LIST_BOOTSEL = ports.list_bootsel  # before any test patches it


def fake_port(device: str, vid: int | None, pid: int | None, serial: str = "SN",
              description: str = "USB device") -> list_ports_common.ListPortInfo:
    info = list_ports_common.ListPortInfo(device, skip_link_detection=True)
    info.vid, info.pid, info.serial_number = vid, pid, serial
    info.description = description
    return info


# one per USB ID class the tools know, with what list_serial must make of it
USB_CASES = [
    ("/dev/ttyACM0", 0x303A, 0x1001, ports.SERIAL, "USB-Serial/JTAG"),
    ("/dev/ttyACM1", 0x303A, 0x4001, ports.SERIAL, "native USB"),
    ("/dev/ttyACM2", 0x303A, 0x0002, ports.BOOTLOADER, "ESP32-S2 ROM"),
    ("/dev/ttyACM3", 0x303A, 0x0009, ports.BOOTLOADER, "ESP32-S3 ROM"),
    ("/dev/ttyACM4", 0x303A, 0x8123, ports.SERIAL, "Espressif USB"),
    ("/dev/ttyUSB0", 0x10C4, 0xEA60, ports.SERIAL, "CP210x"),
    ("/dev/ttyUSB1", 0x1A86, 0x7523, ports.SERIAL, "CH340"),
    ("/dev/ttyUSB2", 0x1A86, 0x55D4, ports.SERIAL, "CH9102"),
    ("/dev/ttyUSB3", 0x0403, 0x6001, ports.SERIAL, "FT232R"),
    ("/dev/ttyUSB4", 0x0403, 0x6010, ports.SERIAL, "FT2232"),
    ("/dev/ttyUSB5", 0x0403, 0x6014, ports.SERIAL, "FT232H"),
    ("/dev/ttyUSB6", 0x0403, 0x6015, ports.SERIAL, "FT-X"),
    ("/dev/ttyACM5", 0x2E8A, 0x0005, ports.SERIAL, "MicroPython (RP2040/RP2350)"),
    ("/dev/ttyACM6", 0x2E8A, 0x000A, ports.SERIAL, "Raspberry Pi USB"),
]
NOT_BOARDS = [
    ("/dev/ttyACM7", 0x2E8A, 0x0003),  # RP2040 BOOTSEL: a drive, never a serial port
    ("/dev/ttyACM8", 0x2E8A, 0x000F),  # RP2350 BOOTSEL
    ("/dev/ttyACM9", 0x046D, 0xC52B),  # a mouse receiver
    ("/dev/ttyS0", None, None),  # a built-in UART
]


@pytest.fixture
def fake_usb(monkeypatch, tmp_path):
    """list_ports sees USB_CASES + NOT_BOARDS; no BOOTSEL drives; an empty virtual registry."""
    entries = [fake_port(d, v, p) for d, v, p, _, _ in USB_CASES]
    entries += [fake_port(d, v, p) for d, v, p in NOT_BOARDS]
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: list(reversed(entries)))
    monkeypatch.setattr(ports, "list_bootsel", lambda *a, **k: [])
    monkeypatch.setenv("MICROCOT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ports.ENV, raising=False)
    return entries


def set_comports(monkeypatch, *entries):
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: list(entries))


@pytest.mark.parametrize(("device", "vid", "pid", "kind", "label"), USB_CASES)
def test_every_known_usb_id_is_listed_with_its_kind(fake_usb, device, vid, pid, kind, label):
    found = {p.device: p for p in ports.list_serial()}
    assert found[device].kind == kind
    assert label in found[device].label
    assert found[device].usb_id == f"{vid:04X}:{pid:04X}"


def test_bootsel_and_unknown_ids_are_not_serial_boards(fake_usb):
    listed = [p.device for p in ports.list_serial()]
    assert listed == sorted(listed, key=ports.natural_key)
    for device, _, _ in NOT_BOARDS:
        assert device not in listed
    everything = {p.device: p.kind for p in ports.list_serial(include_unknown=True)}
    assert everything["/dev/ttyACM9"] == everything["/dev/ttyS0"] == "unknown"
    assert "/dev/ttyACM7" not in everything and "/dev/ttyACM8" not in everything


def make_sysfs(root: Path) -> tuple[Path, Path]:
    """A sysfs with an RP2040 in BOOTSEL (drive mounted), an RP2350 in BOOTSEL (not mounted)
    and a Pico running MicroPython (no drive); and a mount table."""
    sysfs = root / "sys"
    devices = sysfs / "bus" / "usb" / "devices"
    devices.mkdir(parents=True)
    (sysfs / "class" / "block").mkdir(parents=True)
    usb_root = sysfs / "devices" / "pci0000:00" / "usb1"
    for name, pid, product in (("1-1", "0003", "RP2 Boot"), ("1-2", "000f", "RP2350 Boot"),
                               ("1-3", "0005", "Board in FS mode")):
        dev = usb_root / name
        dev.mkdir(parents=True)
        (dev / "idVendor").write_text("2e8a\n")
        (dev / "idProduct").write_text(pid + "\n")
        (dev / "serial").write_text(f"E0C9{name}\n")
        (dev / "product").write_text(product + "\n")
        (devices / name).symlink_to(dev)
    # the RP2040's drive: its block device lies under the USB device in sysfs
    blk = usb_root / "1-1" / "1-1:1.0" / "host6" / "target6:0:0" / "6:0:0:0" / "block" / "sdb"
    (blk / "sdb1").mkdir(parents=True)
    (sysfs / "class" / "block" / "sdb1").symlink_to(blk / "sdb1")
    drive = root / "media" / "me" / "RPI RP2"  # a blank: /proc/mounts escapes it as \040
    drive.mkdir(parents=True)
    (drive / "INFO_UF2.TXT").write_text("UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\n"
                                        "Board-ID: RPI-RP2\n")
    mounts = root / "mounts"
    escaped = str(drive).replace(" ", "\\040")
    mounts.write_text("proc /proc proc rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
                      f"/dev/sdb1 {escaped} vfat rw,nosuid 0 0\n")
    return sysfs, mounts


def test_bootsel_boards_come_from_sysfs_with_their_drive(tmp_path):
    sysfs, mounts = make_sysfs(tmp_path)
    found = ports.list_bootsel(sysfs=sysfs, mounts=mounts, volumes=())
    assert [(p.usb_id, p.kind) for p in found] == [("2E8A:0003", ports.BOOTSEL),
                                                   ("2E8A:000F", ports.BOOTSEL)]
    rp2040, rp2350 = found
    assert rp2040.device == str(tmp_path / "media" / "me" / "RPI RP2")
    assert rp2040.label == "RP2040 BOOTSEL" and rp2040.serial_number == "E0C91-1"
    assert rp2350.device == "" and rp2350.label == "RP2350 BOOTSEL"  # not mounted (yet)
    assert ports.uf2_board_id(rp2040.device) == "RP2040"


def test_bootsel_drive_without_usb_device_is_listed_on_its_own(tmp_path):
    # macOS: no sysfs, drives under /Volumes
    vol = tmp_path / "Volumes" / "RP2350"
    vol.mkdir(parents=True)
    (vol / "INFO_UF2.TXT").write_text("UF2 Bootloader v1.0\nModel: Raspberry Pi RP2350\n"
                                      "Board-ID: RP2350\n")
    (tmp_path / "Volumes" / "USBSTICK").mkdir()
    found = ports.list_bootsel(sysfs=tmp_path / "nosys", mounts=tmp_path / "nomounts",
                               volumes=[tmp_path / "Volumes"])
    assert [(p.device, p.label) for p in found] == [(str(vol), "RP2350 BOOTSEL")]


# -- resolve -----------------------------------------------------------------------------------

@pytest.fixture
def ttys(tmp_path):
    """Files that stand in for serial devices (resolve only checks that they exist)."""
    d = tmp_path / "dev"
    d.mkdir()
    for n in (0, 1, 2, 10):
        (d / f"ttyACM{n}").touch()
    return d


def test_resolve_paths_globs_lists_and_repeats(fake_usb, ttys):
    a0, a1, a2, a10 = (str(ttys / f"ttyACM{n}") for n in (0, 1, 2, 10))
    assert ports.resolve(a1) == [a1]
    assert ports.resolve([a2, a0]) == [a2, a0]  # the order given
    assert ports.resolve([f"{a0},{a1} {a2}"]) == [a0, a1, a2]
    assert ports.resolve(str(ttys / "ttyACM*")) == [a0, a1, a2, a10]  # 2 before 10
    assert ports.resolve([a0, str(ttys / "ttyACM[01]")]) == [a0, a1]  # once each
    link = ttys / "board"
    link.symlink_to(a1)
    assert ports.resolve([a1, str(link)]) == [a1]  # one device, two names


def test_resolve_takes_the_environment_like_mpremote(fake_usb, ttys, monkeypatch):
    a0, a1 = str(ttys / "ttyACM0"), str(ttys / "ttyACM1")
    assert ports.resolve(None, env={ports.ENV: f"{a0}, {a1}"}) == [a0, a1]
    monkeypatch.setenv(ports.ENV, a1)
    assert ports.resolve(()) == [a1]
    assert ports.resolve([a0]) == [a0]  # --port wins over the environment


def test_resolve_errors_say_what_exists(fake_usb, ttys):
    with pytest.raises(ports.PortError, match="no port given.*MICROCOT_PORT"):
        ports.resolve(None, env={})
    with pytest.raises(ports.PortError) as exc:
        ports.resolve(str(ttys / "ttyUSB7"))
    msg = str(exc.value)
    assert "ttyUSB7: no such port" in msg and "/dev/ttyUSB0 [10C4:EA60] CP210x" in msg
    with pytest.raises(ports.PortError, match="no port matches"):
        ports.resolve(str(ttys / "ttyUSB*"))
    with pytest.raises(ports.PortError, match="/dev/ttyACM42: no such port"):
        ports.resolve("a42")  # mpremote's shorthand
    assert ports.resolve([], allow_empty=True, env={}) == []


def test_auto_picks_the_one_board(fake_usb, monkeypatch):
    set_comports(monkeypatch, fake_port("/dev/ttyUSB0", 0x10C4, 0xEA60),
                 fake_port("/dev/ttyACM3", 0x303A, 0x0009), fake_port("/dev/ttyS0", None, None))
    assert ports.auto() == "/dev/ttyUSB0"  # the ROM loader and the UART are not candidates


def test_auto_with_several_probes_them_then_lists_them(fake_usb, monkeypatch):
    set_comports(monkeypatch, fake_port("/dev/ttyUSB0", 0x10C4, 0xEA60),
                 fake_port("/dev/ttyACM0", 0x2E8A, 0x0005))
    assert ports.auto(probe=lambda p: p == "/dev/ttyACM0") == "/dev/ttyACM0"
    with pytest.raises(ports.PortError) as exc:
        ports.auto(probe=lambda p: True)
    assert "2 boards found" in str(exc.value)
    assert "/dev/ttyUSB0 [10C4:EA60]" in str(exc.value) and "/dev/ttyACM0 [2E8A:0005]" in str(
        exc.value)


def test_auto_with_no_board_names_the_bootloaders(fake_usb, monkeypatch, tmp_path):
    set_comports(monkeypatch)
    with pytest.raises(ports.PortError, match="no MicroPython board found; plug one in"):
        ports.auto()
    sysfs, mounts = make_sysfs(tmp_path)
    monkeypatch.setattr(ports, "list_bootsel", lambda: _REAL_LIST_BOOTSEL(sysfs, mounts, ()))
    set_comports(monkeypatch, fake_port("/dev/ttyACM3", 0x303A, 0x0009))
    with pytest.raises(ports.PortError) as exc:
        ports.auto()
    msg = str(exc.value)
    assert "flash MicroPython first" in msg
    assert "ESP32-S3 ROM bootloader" in msg and "RP2040 BOOTSEL" in msg and "RP2350 BOOTSEL" in msg


def register_virtual(name: str, port: str, pid: int) -> None:
    d = ports.run_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps({"name": name, "pid": pid, "port": port,
                                                "iccid": "89490200001234567892"}))


def test_virtual_board_registry(fake_usb, ttys, monkeypatch):
    port = str(ttys / "ttyACM0")
    register_virtual("dev1", port, os.getpid())
    register_virtual("gone", str(ttys / "ttyACM1"), 2 ** 22 + 12345)  # no such process
    register_virtual("nopty", str(ttys / "nothing"), os.getpid())
    (ports.run_dir() / "broken.json").write_text("{not json")
    found = ports.list_virtual()
    assert [(p.device, p.kind, p.extra["name"]) for p in found] == [(port, ports.VIRTUAL, "dev1")]
    assert ports.resolve("virtual:dev1") == [port]
    with pytest.raises(ports.PortError, match=r"virtual:nope: .*\(running: dev1\)"):
        ports.resolve("virtual:nope")
    set_comports(monkeypatch)
    assert ports.auto() == port  # a lone virtual board is the one board


# -- microcot boards ---------------------------------------------------------------------------

def test_match_board_from_build_machine_and_platform():
    m = boards_cli.match_board
    assert m("esp32", "ESP32_GENERIC_S3", "Generic ESP32S3 module with ESP32S3") == \
        ("esp32-s3", "_build")
    assert m("esp32", "ESP32_GENERIC_S3-SPIRAM_OCT", "")[0] == "esp32-s3"
    assert m("esp32", "ESP32_GENERIC", "")[0] == "esp32-generic"
    assert m("esp32", "ESP32_GENERIC_C3", "")[0] == "esp32-c3"
    assert m("rp2", "RPI_PICO_W", "")[0] == "rp2-pico-w"
    assert m("rp2", "RPI_PICO2_W", "")[0] == "rp2-pico2-w"
    # firmware without _build: the machine string
    assert m("rp2", "", "Raspberry Pi Pico 2 W with RP2350") == ("rp2-pico2-w", "_machine")
    assert m("rp2", "", "Raspberry Pi Pico W with RP2040")[0] == "rp2-pico-w"
    assert m("esp32", "", "Generic ESP32 module with ESP32")[0] == "esp32-generic"
    assert m("esp32", "", "ESP32C3 module with ESP32C3")[0] == "esp32-c3"
    assert m("linux", "standard", "linux [GCC 14.2.1] version") == ("virtual", "unix port")
    # what was deployed wins; an unknown board says so
    assert m("esp32", "ESP32_GENERIC", "", deployed="esp32-c3") == ("esp32-c3", "/board.json")
    name, why = m("rp2", "RPI_PICO", "Raspberry Pi Pico with RP2040")
    assert name is None and "RPI_PICO" in why


def test_boards_lists_usb_and_bootsel_without_probing(fake_usb, monkeypatch, tmp_path):
    sysfs, mounts = make_sysfs(tmp_path)
    monkeypatch.setattr(ports, "list_bootsel", lambda: _REAL_LIST_BOOTSEL(sysfs, mounts, ()))
    result = CliRunner().invoke(boards_cli.boards, ["--no-probe", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["port"]: r for r in json.loads(result.output)}
    assert rows["/dev/ttyUSB0"]["usb_id"] == "10C4:EA60" and rows["/dev/ttyUSB0"]["status"] == \
        "unprobed"
    assert rows["/dev/ttyACM3"]["status"] == "bootloader"  # ROM download mode: never opened
    assert "/dev/ttyS0" not in rows
    bootsel = [r for r in rows.values() if r["status"] == "bootsel"]
    assert sorted(r["usb_id"] for r in bootsel) == ["2E8A:0003", "2E8A:000F"]
    assert rows[str(tmp_path / "media" / "me" / "RPI RP2")]["reason"].startswith("UF2 drive at")
    table = CliRunner().invoke(boards_cli.boards, ["--no-probe"])
    assert table.exit_code == 0 and "CP210x" in table.output and "bootsel" in table.output
    assert "/dev/ttyS0" in CliRunner().invoke(boards_cli.boards, ["--no-probe", "--all"]).output


def test_parallel_board_opens_neither_print_nor_swap_stdout(capsys):
    """mpremote prints what it got when a raw REPL does not answer; transport silences that in
    mpremote's module, never by swapping the process-wide sys.stdout, so threads cannot clash."""
    ptys = [os.openpty() for _ in range(4)]
    stdout = sys.stdout

    def try_open(slave: int) -> str:
        try:
            transport.open_board(os.ttyname(slave), timeout=1)
        except transport.BoardError as exc:
            return str(exc)
        return "opened"

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(try_open, [s for _, s in ptys]))
    finally:
        for m, s in ptys:
            os.close(m)
            os.close(s)
    assert sys.stdout is stdout
    assert all("not a MicroPython board" in r for r in results), results
    assert capsys.readouterr().out == ""


def test_boards_with_a_missing_port_is_a_clear_error(fake_usb):
    result = CliRunner().invoke(boards_cli.boards, ["--port", "/dev/ttyNOPE9", "--json"])
    assert result.exit_code == 1
    assert "/dev/ttyNOPE9: no such port" in result.output


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microcot_host", *args], capture_output=True,
                          text=True, timeout=timeout)


ICCID = "89490200001234567892"


def test_boards_probes_virtual_boards_and_a_dead_pty(tmp_path):
    """A deployed virtual board reports its ICCID; one without microcot its unique ID; a pty
    with nothing behind it is 'not micropython', within the probe timeout."""
    master, slave = os.openpty()
    try:
        with VirtualBoard("t-ports-a", iccid=ICCID, flash_dir=tmp_path / "a") as vb_a, \
                VirtualBoard("t-ports-b", mac="02:11:22:33:44:55", flash_dir=tmp_path / "b") as vb_b:
            deploy.deploy(vb_a.port, board="virtual")
            dead = os.ttyname(slave)
            proc = run_cli("boards", "--port", vb_a.port, "--port", vb_b.port, "--port", dead,
                           "--json", "--timeout", "2")
            assert proc.returncode == 0, proc.stderr
            rows = {r["port"]: r for r in json.loads(proc.stdout)}
    finally:
        os.close(master)
        os.close(slave)
    a, b, d = rows[vb_a.port], rows[vb_b.port], rows[dead]
    assert a["status"] == "micropython" and a["version"].startswith("1.")
    assert a["board"] == "virtual" and a["board_from"] == "/board.json"
    assert a["kind"] == "virtual" and "t-ports-a" in a["usb"]
    assert a["microcot"] and a["build"] == "standard"
    assert (a["device_id"], a["id_source"]) == (ICCID, "iccid")
    assert b["board"] == "virtual" and b["board_from"] == "unix port" and b["microcot"] is None
    assert (b["device_id"], b["id_source"]) == ("021122334455", "unique_id")
    assert d["status"] == "not micropython" and "raw REPL" in d["reason"]
    assert d["device_id"] is None and d["id_source"] == "n/a"


def test_boards_table_shows_the_device_id(tmp_path):
    with VirtualBoard("t-ports-c", iccid=ICCID, flash_dir=tmp_path / "c") as vb:
        deploy.deploy(vb.port, board="virtual")
        proc = run_cli("boards", "--port", vb.port)
    assert proc.returncode == 0, proc.stderr
    assert ICCID in proc.stdout and "virtual" in proc.stdout and "micropython" in proc.stdout


def test_a_virtual_board_from_the_cli_registers_and_is_found(tmp_path):
    env = {**os.environ, "MICROCOT_HOME": str(tmp_path / "home")}
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "microcot_host", "board", "virtual", "--name", "t-registry",
         "--flash", str(tmp_path / "flash"), "--port-file", str(port_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if port_file.exists():
                break
            time.sleep(0.05)
        pty = port_file.read_text().strip()
        entry = tmp_path / "home" / "run" / "t-registry.json"
        assert json.loads(entry.read_text())["port"] == pty
        assert oct(entry.stat().st_mode & 0o777) == "0o600"
        found = ports.list_virtual(tmp_path / "home" / "run")
        assert [p.device for p in found] == [pty]
        listed = subprocess.run([sys.executable, "-m", "microcot_host", "boards", "--json"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = {r["port"]: r for r in json.loads(listed.stdout)}
        assert rows[pty]["status"] == "micropython" and rows[pty]["board"] == "virtual"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not (tmp_path / "home" / "run" / "t-registry.json").exists()
