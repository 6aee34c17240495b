"""The virtual board against the real tools: mpremote (as a command and as a library) and pyserial.

Every test talks to a real MicroPython unix port through the board's pty, the way the tools talk to
a board on /dev/ttyUSB0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from mpremote.transport_serial import SerialTransport

from microcot_host import transport
from microcot_host.vboard import VirtualBoard
from microcot_host.vboard.board import default_mac, parse_heap, parse_mac

pytestmark = pytest.mark.timeout(30)

BANNER = re.compile(rb"MicroPython v\d+\.\d+\.\d+\S* on \S+; vboard-\S+ with microcot virtual board"
                    rb"\r\nType \"help\(\)\" for more information.\r\n")


def mpremote(port: str, *args: str, timeout: float = 20, check: bool = True
             ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"mpremote {args}: {proc.stdout}{proc.stderr}"
    return proc


def read_until(ser: serial.Serial, marker: bytes, timeout: float = 5) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in {data!r}")
        data += ser.read(1)
    return data


def wait_state(vb: VirtualBoard, state: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while vb.state != state:
        assert time.monotonic() < deadline, f"board is {vb.state}, not {state}"
        time.sleep(0.01)


@pytest.fixture
def ser(virtual_board: VirtualBoard):
    s = serial.Serial(virtual_board.port, timeout=0.05)
    s.write(b"\x03\x02")  # Ctrl-C, Ctrl-B: a fresh banner and prompt, whatever state it was in
    read_until(s, b"information.\r\n>>> ")
    yield s
    s.close()


def pids_of(flash_dir: Path) -> list[int]:
    """Interpreter processes running on this flash directory (their cwd is inside it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if cwd.startswith(str(flash_dir)) and ") Z " not in stat:
            found.append(int(entry.name))
    return found


def ptys_open() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in ("/dev/ptmx", "/dev/pts/ptmx"):
                n += 1
        except OSError:
            pass
    return n


# ---- options -------------------------------------------------------------------------------------


def test_option_parsing():
    assert parse_heap("64k") == 65536 and parse_heap("2m") == 2 * 1024 * 1024
    assert parse_heap(100_000) == 100_000 and parse_heap(None) is None
    with pytest.raises(ValueError):
        parse_heap("lots")
    with pytest.raises(ValueError):
        parse_heap("1k")  # the REPL alone needs more
    assert parse_mac("aa:bb:cc:dd:ee:ff") == bytes.fromhex("aabbccddeeff")
    with pytest.raises(ValueError):
        parse_mac("aa:bb")
    mac = default_mac("demo")
    assert mac == default_mac("demo") != default_mac("other")
    assert mac[0] & 0x03 == 0x02  # locally administered, unicast
    with pytest.raises(ValueError):
        VirtualBoard("../escape")


# ---- mpremote as a command -------------------------------------------------------------------------


def test_exec_without_resume_repeatedly(virtual_board):
    for _ in range(3):
        assert mpremote(virtual_board.port, "exec", "import sys; print(sys.platform)"
                        ).stdout.strip() == "linux"


def test_filesystem_is_the_flash_directory(virtual_board, tmp_path):
    port, flash = virtual_board.port, virtual_board.flash_dir
    local = tmp_path / "x.py"
    local.write_text("VALUE = 42\nprint('x imported')\n")
    script = tmp_path / "script.py"
    script.write_text("import x\nprint('value', x.VALUE * 2)\n")

    mpremote(port, "fs", "mkdir", ":/lib")
    mpremote(port, "fs", "cp", str(local), ":/lib/x.py")
    assert (flash / "lib" / "x.py").read_text() == local.read_text()
    # a second copy is skipped: mpremote compared hashes computed on the board
    assert "Up to date" in mpremote(port, "fs", "cp", str(local), ":/lib/x.py").stdout
    listing = mpremote(port, "fs", "ls", ":/lib").stdout
    assert re.search(rf"\s{local.stat().st_size} x\.py", listing), listing  # sizes, like a board
    assert mpremote(port, "fs", "cat", ":/lib/x.py").stdout.replace("\r\n", "\n") == \
        local.read_text()
    assert mpremote(port, "run", str(script)).stdout.split() == ["x", "imported", "value", "84"]
    out = mpremote(port, "exec", "import os; print(sorted(os.listdir('/')), os.getcwd())").stdout
    assert out.split() == ["['lib']", "/"]  # the host's root is out of sight
    # rename is what atomic writes rest on
    mpremote(port, "exec", "import os; open('/a.tmp','w').write('1'); os.rename('/a.tmp','/a')")
    assert (flash / "a").read_text() == "1" and not (flash / "a.tmp").exists()
    mpremote(port, "fs", "rm", ":/lib/x.py")
    assert not (flash / "lib" / "x.py").exists()
    assert mpremote(port, "fs", "ls", ":/lib").stdout.strip() == "ls :/lib"


# ---- resets ------------------------------------------------------------------------------------------


def test_soft_reset_forgets_state(virtual_board):
    port = virtual_board.port
    mpremote(port, "exec", "marker = 1234")
    assert mpremote(port, "resume", "exec", "print(marker)").stdout.strip() == "1234"
    proc = mpremote(port, "soft-reset", "resume", "exec", "print(marker)", check=False)
    assert proc.returncode == 1 and "NameError" in proc.stdout
    assert virtual_board.last_reset_s is not None and virtual_board.last_reset_s < 1.0


def test_boot_and_main_like_a_board(virtual_board, ser):
    flash = virtual_board.flash_dir
    (flash / "boot.py").write_text("print('BOOT')\n")
    (flash / "main.py").write_text("print('MAIN')\n")
    # friendly soft reset: boot.py, main.py, banner
    ser.write(b"\x04")
    out = read_until(ser, b"information.\r\n>>> ")
    assert out.startswith(b"\r\nMPY: soft reboot\r\nBOOT\r\nMAIN\r\n") and BANNER.search(out)
    # raw REPL soft reset (what mpremote does): boot.py but no main.py
    ser.write(b"\x01")
    read_until(ser, b"raw REPL; CTRL-B to exit\r\n>")
    ser.write(b"\x04")
    out = read_until(ser, b"raw REPL; CTRL-B to exit\r\n>")
    assert out == b"OK\r\nMPY: soft reboot\r\nBOOT\r\nraw REPL; CTRL-B to exit\r\n>"
    # hard reset: like power-on, back in the friendly REPL with both scripts run
    ser.write(b"\x05A\x01")
    assert ser.read(2) == b"R\x01"
    ser.read(3)
    ser.write(b"import machine; machine.reset()\x04")
    out = read_until(ser, b"information.\r\n>>> ")
    assert b"BOOT\r\nMAIN\r\n" in out and b"soft reboot" not in out
    assert virtual_board.hard_resets == 1
    # sys.exit() at the REPL soft-reboots, as on esp32/rp2
    ser.write(b"import sys; sys.exit()\r")
    out = read_until(ser, b"information.\r\n>>> ")
    assert b"MPY: soft reboot\r\nBOOT\r\nMAIN\r\n" in out
    ser.write(b"import machine; machine.reset_cause() == machine.SOFT_RESET\r")
    assert read_until(ser, b">>> ").endswith(b"True\r\n>>> ")


def test_mpremote_interrupts_a_looping_main(virtual_board):
    (virtual_board.flash_dir / "main.py").write_text("import time\nwhile True:\n    time.sleep_ms(5)\n")
    mpremote(virtual_board.port, "reset")  # power-on: main.py starts looping
    time.sleep(0.3)
    for _ in range(2):
        assert mpremote(virtual_board.port, "exec", "print('alive')").stdout.strip() == "alive"
    assert virtual_board.hard_resets == 1 and virtual_board.crashes == 0


def test_crash_is_reported_and_the_board_restarts(virtual_board, ser):
    # kill the interpreter from the inside: its shell child's parent is the interpreter
    ser.write(b"import os; os.system('kill -9 $PPID')\r")
    out = read_until(ser, b"information.\r\n>>> ")
    assert b"MicroPython exited (signal 9); hard reset" in out
    assert virtual_board.crashes == 1
    assert mpremote(virtual_board.port, "exec", "print(1+1)").stdout.strip() == "2"


# ---- memory ----------------------------------------------------------------------------------------


@pytest.mark.virtual_board(heap="64k")
def test_heap_size_like_a_boards_ram(virtual_board):
    port = virtual_board.port
    total = int(mpremote(port, "exec", "import gc; print(gc.mem_free() + gc.mem_alloc())").stdout)
    assert 60 * 1024 < total <= 64 * 1024
    proc = mpremote(port, "exec", "b = bytearray(200 * 1024)", check=False)
    assert proc.returncode == 1 and "MemoryError" in proc.stdout
    assert mpremote(port, "exec", "b = bytearray(20 * 1024); print(len(b))").stdout.strip() == \
        "20480"
    assert virtual_board.crashes == 0


# ---- the friendly REPL over pyserial ---------------------------------------------------------------


def test_friendly_repl(virtual_board, ser):
    ser.write(b"\x02")
    assert BANNER.fullmatch(read_until(ser, b"information.\r\n>>> ")[2:-4])
    ser.write(b"1+1\r")
    assert read_until(ser, b">>> ") == b"1+1\r\n2\r\n>>> "
    # compound statement: auto-indent, then blank lines end it
    ser.write(b"for i in range(3):\rprint(i * 10)\r\r\r\r")
    out = read_until(ser, b"20\r\n>>> ")
    assert out.startswith(b"for i in range(3):\r\n...     print(i * 10)\r\n")
    assert b"0\r\n10\r\n20\r\n>>> " in out
    # open bracket continues the line
    ser.write(b"(1 +\r2)\r")
    assert read_until(ser, b">>> ").endswith(b"... 2)\r\n3\r\n>>> ")
    # Ctrl-C drops the line; backspace edits it
    ser.write(b"this is not run\x03")
    assert read_until(ser, b">>> ").endswith(b"this is not run\r\n>>> ")
    ser.write(b"2*33\x08\x084\r")
    assert read_until(ser, b">>> ").endswith(b"\r\n8\r\n>>> ")
    # paste mode
    ser.write(b"\x05")
    read_until(ser, b"paste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== ")
    ser.write(b"def f():\r    return 'pasted'\rprint(f())\r\x04")
    assert read_until(ser, b">>> ").endswith(b"pasted\r\n>>> ")
    # tracebacks look like a board's: <stdin> frames only
    ser.write(b"def g():\r  1/0\r\r\r\rg()\r")
    out = read_until(ser, b"divide by zero\r\n>>> ")
    assert b'Traceback (most recent call last):\r\n  File "<stdin>", line 1, in <module>\r\n' \
           b'  File "<stdin>", line 2, in g\r\nZeroDivisionError: divide by zero\r\n>>> ' in out
    assert b"vboard_repl" not in out and b"repl.py" not in out
    # Ctrl-C interrupts running code
    ser.write(b"while True: pass\r\r")
    wait_state(virtual_board, "running")
    ser.write(b"\x03")
    out = read_until(ser, b">>> ")
    assert out.endswith(b"KeyboardInterrupt: \r\n>>> ") and b'File "<stdin>"' in out
    # history: up arrow recalls the last line
    ser.write(b"\x1b[A\x03")
    assert read_until(ser, b">>> ").endswith(b"while True: pass\r\n>>> ")


# ---- the raw REPL through mpremote's transport ------------------------------------------------------


def test_raw_repl_keyboard_interrupt(virtual_board):
    t = SerialTransport(virtual_board.port)
    try:
        t.enter_raw_repl()
        t.exec_raw_no_follow("n = 0\nwhile True:\n n += 1")
        wait_state(virtual_board, "running")
        time.sleep(0.05)
        t.serial.write(b"\x03")
        out, err = t.follow(timeout=5)
        assert out == b"" and err.endswith(b"KeyboardInterrupt: \r\n"), err
        assert int(t.eval("n")) > 0  # the loop did run, state survived the interrupt
        assert t.exec("print('after')") == b"after\r\n"
        # interrupt while user code reads the serial line itself
        t.exec_raw_no_follow("import sys\nsys.stdin.read(1)")
        wait_state(virtual_board, "running")
        t.serial.write(b"\x03")
        assert t.follow(timeout=5)[1].endswith(b"KeyboardInterrupt: \r\n")
        # a binary protocol: Ctrl-C disabled, the byte 3 and newlines pass through untouched
        t.exec_raw_no_follow("import micropython, sys\nmicropython.kbd_intr(-1)\n"
                             "sys.stdout.buffer.write(b'R')\n"
                             "d = sys.stdin.buffer.read(3)\nsys.stdout.buffer.write(d)")
        assert t.serial.read(1) == b"R"  # Ctrl-C is off now
        t.serial.write(b"\x03\n\r")
        out, err = t.follow(timeout=5)
        assert (out, err) == (b"\x03\n\r", b"")
        t.exit_raw_repl()
    finally:
        t.close()
    assert virtual_board.crashes == 0


# ---- several boards, clean stop -------------------------------------------------------------------


def test_two_boards_then_nothing_left(tmp_path):
    ptys = ptys_open()
    fds = len(os.listdir("/proc/self/fd"))
    a = VirtualBoard("alpha", flash_dir=tmp_path / "a").start()
    b = VirtualBoard("beta", flash_dir=tmp_path / "b").start()
    try:
        assert a.port != b.port
        for vb in (a, b):
            code = "import _vboard; open('/who', 'w').write(_vboard.name)"
            mpremote(vb.port, "exec", code)
        assert (tmp_path / "a" / "who").read_text() == "alpha"
        assert (tmp_path / "b" / "who").read_text() == "beta"
        assert pids_of(tmp_path / "a") and pids_of(tmp_path / "b")
    finally:
        a.stop()
        b.stop()
    assert pids_of(tmp_path / "a") == [] and pids_of(tmp_path / "b") == []
    assert ptys_open() == ptys
    assert len(os.listdir("/proc/self/fd")) == fds


# ---- _vboard and the modem ---------------------------------------------------------------------------

AT_EXCHANGE = """
import _vboard, select
f = _vboard.open_host(_vboard.modem_path, 'r+b')
f.write(b'AT+CCID\\r')
p = select.poll()
p.register(f, select.POLLIN)
got = b''
while not got.endswith(b'OK\\r\\n') and p.poll(3000):
    got += f.read(1)
f.close()
print(repr(got))
"""


@pytest.mark.virtual_board(mac="02:11:22:33:44:55", iccid="89490200001234567892")
def test_vboard_module_and_modem(virtual_board):
    port = virtual_board.port
    out = mpremote(port, "exec", "import _vboard, machine; print(_vboard.name, _vboard.mac.hex(), "
                   "machine.unique_id().hex(), _vboard.modem_path)").stdout.split()
    assert out == [virtual_board.name, "021122334455", "021122334455", virtual_board.modem_path]
    got = mpremote(port, "exec", AT_EXCHANGE).stdout.strip()
    assert "+CCID: 89490200001234567892" in got and got.endswith("OK\\r\\n'")


# sources, compiled on the board (not .mpy): the 64-bit developer board needs room for that
@pytest.mark.virtual_board(iccid="89490200001234567892", heap="160k")
def test_firmware_identity_and_reset_through_vboard(virtual_board):
    # the contract with firmware/microcot/hal.py: identity from the modem, hal.reset() resets
    firmware = Path(__file__).resolve().parents[2] / "firmware" / "microcot"
    if not (firmware / "identity.py").exists():
        pytest.skip("firmware identity module not present")
    shutil.copytree(firmware, virtual_board.flash_dir / "lib" / "microcot")
    out = mpremote(virtual_board.port, "exec",
                   "from microcot import identity; print(*identity.detect())").stdout.split()
    assert out == ["89490200001234567892", "iccid"]
    mpremote(virtual_board.port, "exec", "--no-follow", "from microcot import hal; hal.reset()")
    deadline = time.monotonic() + 5
    while virtual_board.hard_resets == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert virtual_board.hard_resets == 1 and virtual_board.wait_ready(5)


def test_no_modem_by_default(virtual_board):
    out = mpremote(virtual_board.port, "exec", "import _vboard; print(_vboard.modem_path, "
                   "_vboard.mac.hex())").stdout.split()
    assert out == ["None", default_mac(virtual_board.name).hex()]


# ---- the command line --------------------------------------------------------------------------------


def test_cli_serves_until_sigterm(tmp_path):
    port_file = tmp_path / "port"
    flash = tmp_path / "flash"
    link = tmp_path / "ttyVB0"
    cli = subprocess.Popen([sys.executable, "-m", "microcot_host", "board", "virtual", "--name",
                            "cli-test", "--flash", str(flash), "--port-file", str(port_file),
                            "--link", str(link)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert cli.poll() is None, cli.stdout.read()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        port = port_file.read_text().strip()
        assert mpremote(port, "exec", "print(6*7)").stdout.strip() == "42"
        # through the symlink mpremote does not know it is a pty and polls in_waiting instead
        assert os.readlink(link) == port
        assert mpremote(str(link), "exec", "print(7*7)").stdout.strip() == "49"
        assert pids_of(flash)
        cli.send_signal(signal.SIGTERM)
        out, _ = cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, out
    assert f"mpremote connect {link} repl" in out
    assert pids_of(flash) == []
    assert not port_file.exists() and not link.is_symlink()


def test_a_long_flash_path_still_boots(tmp_path):
    """The board's settings reach the interpreter whatever their length (the unix port aborts
    on a command-line argument of 256 characters or more)."""
    deep = tmp_path / ("d" * 100) / ("e" * 100) / ("f" * 100)
    vb = VirtualBoard("long-path-board", flash_dir=deep, iccid="89490200001234567892").start()
    try:
        t = transport.open_board(vb.port)
        try:
            transport.run(t, "f = open('/here.txt', 'w'); f.write('x'); f.close()")
        finally:
            transport.close(t)
        assert (deep / "here.txt").read_text() == "x"  # the flash is that folder
        t = transport.open_board(vb.port)
        try:
            assert transport.evaluate(t, "1 + 1") == 2
        finally:
            transport.close(t)
    finally:
        vb.stop()
