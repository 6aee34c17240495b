"""The virtual board's emulated modem: the sans-I/O core, the pty server, and end to end the
device's AT driver (firmware/microcot/atmodem.py) reading the ICCID through the pty, both on
CPython and on the MicroPython unix port."""

from __future__ import annotations

import functools
import os
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from microcot import atmodem, hal, identity
from microcot_host.vboard.modem import ModemEmulator, PtyModem, ef_iccid_hex

ICCID20 = "89490200001234567892"
ICCID19 = "8949020000123456788"
IMSI = "262011234567890"
FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
ICCID_CMDS = ("AT+CCID", "AT+QCCID", "AT+ICCID", "AT+CRSM=176,12258,0,0,10")
SUPPORTED = ("+CCID", "+QCCID", "+ICCID", "+CRSM")


def ok(*lines: str) -> bytes:
    return b"".join(b"\r\n" + ln.encode() + b"\r\n" for ln in lines) + b"\r\nOK\r\n"


# -- the core ------------------------------------------------------------------------------------


def test_ef_iccid_hex():
    assert ef_iccid_hex(ICCID20) == "98942000002143658729"
    assert ef_iccid_hex(ICCID19) == "989420000021436587F8"
    with pytest.raises(ValueError):
        ef_iccid_hex("12a")
    with pytest.raises(ValueError):
        ef_iccid_hex("1" * 21)


@pytest.mark.parametrize(
    ("cmd", "answer"),
    [
        ("AT", ok()),
        ("ATI", ok("microcot", "Virtual LTE-M modem", "Revision: VM01R01")),
        ("AT+CGMI", ok("microcot")),
        ("AT+CGSN", ok("490154203237518")),
        ("AT+CCID", ok("+CCID: " + ICCID20)),
        ("AT+CCID?", ok("+CCID: " + ICCID20)),
        ("AT+QCCID", ok("+QCCID: " + ICCID20)),
        ("AT+ICCID", ok("+ICCID: " + ICCID20)),
        ("AT+CRSM=176,12258,0,0,10", ok('+CRSM: 144,0,"98942000002143658729"')),
        ("AT+CRSM=176,28539,0,0,12", ok("+CRSM: 106,130")),
        ("AT+CRSM=abc", b"\r\nERROR\r\n"),
        ("AT+CIMI", ok(IMSI)),
        ("AT+CPIN?", ok("+CPIN: READY")),
        ("at+ccid", ok("+CCID: " + ICCID20)),
        ("AT+FOO", b"\r\nERROR\r\n"),
        ("ATE5", b"\r\nERROR\r\n"),
    ],
)
def test_commands_with_echo(cmd: str, answer: bytes):
    m = ModemEmulator(ICCID20, IMSI)
    assert m.feed(cmd.encode() + b"\r") == cmd.encode() + b"\r" + answer
    assert m.commands == [cmd]


def test_echo_switch():
    m = ModemEmulator(ICCID20)
    assert m.feed(b"ATE0\r") == b"ATE0\r" + ok()  # the command that turns echo off is echoed
    assert m.feed(b"AT+CCID\r") == ok("+CCID: " + ICCID20)
    assert m.feed(b"ATE1\r") == ok()
    assert m.feed(b"AT\r") == b"AT\r" + ok()
    quiet = ModemEmulator(ICCID20, echo=False)
    assert quiet.feed(b"AT\r") == ok()


def test_partial_lines_and_line_endings():
    m = ModemEmulator(ICCID20, echo=False)
    assert m.feed(b"AT+Q") == b""
    assert m.feed(b"CC") == b""
    assert m.feed(b"ID\r") == ok("+QCCID: " + ICCID20)
    assert m.feed(b"AT\r\n") == ok()  # the LF after CR is an empty line: no answer
    assert m.feed(b"AT\n") == ok()
    assert m.feed(b"AT\rAT+CIMI\r") == ok() + b"\r\nERROR\r\n"  # no IMSI configured
    out = b"".join(m.feed(bytes([b])) for b in b"AT+ICCID\r")
    assert out == ok("+ICCID: " + ICCID20)
    assert m.feed(b"AT+CC\x08\x08CCID\r") == ok("+CCID: " + ICCID20)


def test_garbage_is_ignored_and_long_lines_refused():
    m = ModemEmulator(ICCID20, echo=False)
    assert m.feed(b"hello\r\x00\x00\r") == b""
    assert m.feed(b"AT" + b"X" * 1000 + b"\r") == b"\r\nERROR\r\n"
    assert m.feed(b"AT\r") == ok()


def test_no_sim():
    m = ModemEmulator(None, echo=False)
    for cmd in ICCID_CMDS + ("AT+CIMI", "AT+CPIN?"):
        assert m.feed(cmd.encode() + b"\r") == b"\r\n+CME ERROR: 10\r\n", cmd
    assert m.feed(b"AT\r") == ok()
    assert m.feed(b"ATI\r").endswith(b"OK\r\n")


def test_supported_subset():
    m = ModemEmulator(ICCID19, echo=False, supported={"+CRSM"})
    for cmd in ICCID_CMDS[:3]:
        assert m.feed(cmd.encode() + b"\r") == b"\r\nERROR\r\n"
    assert m.feed(b"AT+CRSM=176,12258,0,0,10\r") == ok('+CRSM: 144,0,"989420000021436587F8"')
    assert m.feed(b"AT\r") == ok()  # plain AT is always there


def test_unsolicited():
    assert ModemEmulator(ICCID20).unsolicited("+CREG: 1") == b"\r\n+CREG: 1\r\n"


# -- the pty server ------------------------------------------------------------------------------


def _read_until(fd: int, end: bytes, timeout: float = 3.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(end):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out, got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            buf += os.read(fd, 1024)
    return buf


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_pty_plain_os_io():
    fds = _open_fds()
    threads = threading.active_count()
    with PtyModem(ModemEmulator(ICCID20, IMSI)) as pm:
        assert pm.path.startswith("/dev/")
        fd = os.open(pm.path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"AT+CCID\r")
            assert _read_until(fd, b"OK\r\n") == b"AT+CCID\r" + ok("+CCID: " + ICCID20)
            os.write(fd, b"ATE0\r")
            _read_until(fd, b"OK\r\n")
            os.write(fd, b"AT+CIMI\r")
            assert _read_until(fd, b"OK\r\n") == ok(IMSI)
            pm.inject("+CREG: 1")
            assert _read_until(fd, b"\r\n+CREG: 1\r\n") == b"\r\n+CREG: 1\r\n"
        finally:
            os.close(fd)
    assert not pm.running
    assert threading.active_count() == threads
    assert _open_fds() == fds


def test_pty_pyserial_and_reopen():
    serial = pytest.importorskip("serial")
    with PtyModem(iccid=ICCID19, echo=False) as pm:
        for _ in range(2):  # the firmware re-opens the modem after every reset
            with serial.Serial(pm.path, 115200, timeout=2) as port:
                port.write(b"AT+QCCID\r")
                assert port.read_until(b"OK\r\n") == ok("+QCCID: " + ICCID19)


def test_pty_start_stop_idempotent():
    fds = _open_fds()
    pm = PtyModem(ModemEmulator(ICCID20))
    with pytest.raises(RuntimeError):
        _ = pm.path
    assert pm.start() is pm
    path = pm.path
    assert pm.start() is pm and pm.path == path
    pm.stop()
    pm.stop()
    assert not pm.running
    assert _open_fds() == fds
    with pytest.raises(TypeError):
        PtyModem(ModemEmulator(ICCID20), iccid=ICCID20)


# -- end to end: the firmware's AT driver on CPython -----------------------------------------------


@pytest.mark.parametrize("iccid", [ICCID20, ICCID19])
@pytest.mark.parametrize("index", range(4))
def test_e2e_cpython_driver_each_command(index: int, iccid: str):
    # the modem implements only the index-th command, so the driver must fall back to it
    emu = ModemEmulator(iccid, IMSI, supported={SUPPORTED[index], "+CIMI"})
    with PtyModem(emu) as pm, open(pm.path, "r+b", buffering=0) as stream:
        modem = atmodem.AtModem(stream, timeout_ms=3000)
        assert modem._poll is not None  # a pty is waited on with poll, not with sleeps
        assert modem.iccid() == iccid
        assert modem.imsi() == IMSI
        modem.close()
    assert emu.commands == list(ICCID_CMDS[: index + 1]) + ["AT+CIMI"]


def test_e2e_cpython_no_sim_and_bad_luhn():
    for emu, message in (
        (ModemEmulator(None), "SIM not inserted"),
        (ModemEmulator("89490200001234567890"), "should be 2"),
    ):
        with (
            PtyModem(emu) as pm,
            open(pm.path, "r+b", buffering=0) as stream,
            pytest.raises(atmodem.ModemError, match=message),
        ):
            atmodem.AtModem(stream).iccid()


def test_e2e_cpython_modem_gone_is_a_clear_error():
    pm = PtyModem(ModemEmulator(ICCID20)).start()
    with open(pm.path, "r+b", buffering=0) as stream:
        modem = atmodem.AtModem(stream, timeout_ms=2000)
        assert modem.command("AT") == []
        pm.stop()
        t0 = time.monotonic()
        with pytest.raises(atmodem.ModemError, match="AT[+]CCID.*stream") as info:
            modem.command("AT+CCID")
        assert not isinstance(info.value, atmodem.ModemTimeout)
        assert time.monotonic() - t0 < 1


def test_e2e_cpython_urcs_between_commands():
    with PtyModem(ModemEmulator(ICCID20)) as pm, open(pm.path, "r+b", buffering=0) as stream:
        modem = atmodem.AtModem(stream)
        pm.inject("+CREG: 2")
        pm.inject("RING")
        time.sleep(0.05)
        assert modem.command("AT+CCID") == ["+CCID: " + ICCID20]


def test_e2e_cpython_detect_through_hal_and_fake_vboard(monkeypatch: pytest.MonkeyPatch):
    with PtyModem(ModemEmulator(ICCID19, supported={"+ICCID"})) as pm:
        vb = types.SimpleNamespace(
            name="virtual",
            mac=b"\x02\x00\x00\x00\x00\x01",
            modem_path=pm.path,
            open_host=functools.partial(open, buffering=0),
            reset=lambda: None,
        )
        monkeypatch.setitem(sys.modules, "_vboard", vb)
        assert identity.detect() == (ICCID19, "iccid")
        vb.modem_path = None
        assert hal.vboard() is vb
        assert identity.detect() == ("020000000001", "mac")


# -- end to end: the firmware's AT driver on the MicroPython unix port -----------------------------


def _micropython() -> str:
    exe = Path(sys.executable).with_name("micropython")
    found = str(exe) if exe.exists() else shutil.which("micropython")
    if not found:
        pytest.skip("MicroPython unix port not installed")
    return found


_MP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {firmware!r})
    from microcot import atmodem, identity
    f = open({path!r}, 'r+b')
    m = atmodem.AtModem(f, timeout_ms=3000)
    print('POLL', m._poll is not None)
    print('ICCID', m.iccid())
    print('IMSI', m.imsi())
    m.close()
    f.close()

    class V:
        name = 'virtual'
        mac = b'\\x02\\x00\\x00\\x00\\x00\\x01'
        modem_path = {path!r}
        def open_host(path, mode):
            return open(path, mode)
        def reset():
            pass
    sys.modules['_vboard'] = V
    print('DETECT', '%s %s' % identity.detect())
    """
)


def _run_mp(path: str) -> dict[str, str]:
    script = _MP_SCRIPT.format(firmware=str(FIRMWARE), path=path)
    proc = subprocess.run(
        [_micropython(), "-X", "heapsize=100k", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out


@pytest.mark.parametrize("index", range(4))
def test_e2e_micropython_driver_each_command(index: int):
    iccid = ICCID19 if index % 2 else ICCID20
    emu = ModemEmulator(iccid, IMSI, supported={SUPPORTED[index], "+CIMI"})
    with PtyModem(emu) as pm:
        out = _run_mp(pm.path)
    assert out == {"POLL": "True", "ICCID": iccid, "IMSI": IMSI, "DETECT": f"{iccid} iccid"}
    assert emu.commands[: index + 1] == list(ICCID_CMDS[: index + 1])


def test_e2e_micropython_no_sim_falls_back_to_mac():
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {firmware!r})
        from microcot import identity
        class V:
            mac = b'\\x02\\x00\\x00\\x00\\x00\\x01'
            modem_path = {path!r}
            def open_host(path, mode):
                return open(path, mode)
        sys.modules['_vboard'] = V
        print('%s %s' % identity.detect())
        """
    )
    with PtyModem(ModemEmulator(None)) as pm:
        proc = subprocess.run(
            [_micropython(), "-X", "heapsize=100k", "-c",
             script.format(firmware=str(FIRMWARE), path=pm.path)],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "020000000001 mac"
