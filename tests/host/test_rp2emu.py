"""The emulated RP2040 (`microcot board rp2`): MicroPython's real rp2 firmware (RPI_PICO_W) in
rp2040js, end to end through the project's tools: mpremote, deploy, identity over machine.UART to
the emulated modem, flash through BOOTSEL, provisioning two boards at once, `microcot test`.

Skipped with the reason when the firmware, node or rp2040js is missing (fail instead with
MICROCOT_REQUIRE_FIDELITY=1). Boards are shared per module where a test leaves them as it found
them; every wait is bounded by an event, never by a timed assertion.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fidelity_fixtures import need

from microcot import identity
from microcot_host import fidelity, transport
from microcot_host.rp2emu import EmulatedRP2040
from microcot_host.rp2emu.board import ensure_rp2040js, find_node

pytestmark = pytest.mark.timeout(240)

MPREMOTE = str(Path(sys.executable).with_name("mpremote"))
RP2040_FAMILY = 0xE48BFF56
RP2350_ARM_S = 0xE48BFF59


def iccid(n: int) -> str:
    payload = "8949020" + "%012d" % n
    return payload + identity.luhn_check_digit(payload)


def _rp2040_parts() -> tuple[Path, Path]:
    firmware = fidelity.rp2_firmware("RPI_PICO_W")
    fidelity.rp2_bootrom()
    find_node()
    return firmware, ensure_rp2040js(install=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private state dir (boards' flash, run registry) with the installed rp2040js kept."""
    _firmware, lib = need(_rp2040_parts)
    home = tmp_path_factory.mktemp("rp2home")
    saved = {k: os.environ.get(k) for k in ("MICROCOT_HOME", "MICROCOT_RP2040JS")}
    os.environ["MICROCOT_HOME"] = str(home)
    os.environ["MICROCOT_RP2040JS"] = str(lib)
    try:
        yield dict(os.environ)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def pair(env: dict[str, str]) -> Iterator[list[EmulatedRP2040]]:
    """Two boards, each with a modem on UART0 (distinct ICCIDs)."""
    boards = []
    try:
        for i, name in enumerate(("rp2-a", "rp2-b")):
            boards.append(EmulatedRP2040(name, iccid=iccid(700 + i)).start())
        yield boards
    finally:
        for b in boards:
            b.stop()


def mpremote(port: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([MPREMOTE, "connect", port, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def run_on(port: str, code: str, timeout: float = 30.0, boot: float = 0.0) -> str:
    """Run code on the board; `boot` seconds more for a board that is still rebooting (its
    USB comes back up like a real Pico's, later on a loaded machine)."""
    deadline = time.monotonic() + boot
    while True:
        try:
            t = transport.open_board(port, soft_reset=False, timeout=10)
            break
        except transport.BoardError:
            if time.monotonic() > deadline:
                raise
    try:
        return transport.run(t, code, timeout=timeout).decode()
    finally:
        transport.close(t)


def microcot(*args: str, env: dict[str, str] | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microcot_host", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def node_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.1)


def with_family(data: bytes, family: int) -> bytes:
    out = bytearray(data)
    for off in range(0, len(out), 512):
        struct.pack_into("<I", out, off + 28, family)
    return bytes(out)


# -- the board itself ---------------------------------------------------------------------------

def test_boots_into_the_rp2_firmware(pair: list[EmulatedRP2040]) -> None:
    a = pair[0]
    assert a.running and a.boot_s is not None
    out = mpremote(a.port, "exec", "import sys; print(sys.platform)")
    assert out.strip() == "rp2"
    machine = run_on(a.port, "import sys; print(sys.implementation._machine)")
    assert "Pico W" in machine and "RP2040" in machine


def test_unique_ids_differ_and_follow_the_uid(pair: list[EmulatedRP2040]) -> None:
    ids = [run_on(b.port, "import machine, binascii; "
                  "print(binascii.hexlify(machine.unique_id()).decode())").strip()
           for b in pair]
    assert ids[0] != ids[1]
    assert ids == [b.uid.hex() for b in pair]


def test_uart0_reaches_the_modem(pair: list[EmulatedRP2040]) -> None:
    b = pair[1]
    out = run_on(b.port, (
        "import machine, time\n"
        "u = machine.UART(0, 115200, tx=machine.Pin(0), rx=machine.Pin(1), timeout=200)\n"
        "u.read()\n"
        "u.write(b'ATE0\\r')\n"
        "time.sleep_ms(200); u.read()\n"
        "u.write(b'AT+CCID\\r')\n"
        "buf = b''\n"
        "t = time.ticks_ms()\n"
        "while b'OK' not in buf and time.ticks_diff(time.ticks_ms(), t) < 5000:\n"
        "    buf += u.read() or b''\n"
        "print(buf)\n"))
    assert f"+CCID: {b.iccid}" in out and "OK" in out


def test_files_survive_reset_and_restart(env: dict[str, str], tmp_path: Path) -> None:
    board = EmulatedRP2040("rp2-persist", flash=tmp_path / "flash.bin", uid="0011223344556677")
    board.start()
    try:
        run_on(board.port, "f = open('keep.txt', 'w'); f.write('kept 1'); f.close()")
        port = board.port
        t = transport.open_board(port, soft_reset=False, timeout=10)
        try:
            t.exec_raw_no_follow("import machine; machine.reset()")
        finally:
            transport.close(t)
        # the pty stays; the chip rebooted (uptime restarted) and still has the file
        out = run_on(port, "import time; print(open('keep.txt').read(), time.ticks_ms())",
                     boot=60)
        text, ticks = out.split()[:2], int(out.split()[2])
        assert " ".join(text) == "kept 1" and ticks < 60_000
        assert board.port == port and board.running
    finally:
        board.stop()
    assert not board.running and not node_alive(board.pid)
    # stop saved the flash: a new run of the same board still has the file
    again = EmulatedRP2040("rp2-persist", flash=tmp_path / "flash.bin").start()
    try:
        assert run_on(again.port, "print(open('keep.txt').read())").strip() == "kept 1"
    finally:
        again.stop()


# -- the project's tools against it --------------------------------------------------------------

def test_deploy_then_identity_from_the_modem(pair: list[EmulatedRP2040],
                                             env: dict[str, str]) -> None:
    a = pair[0]
    first = microcot("deploy", "--port", a.port, "--json", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    [r1] = json.loads(first.stdout)
    assert r1["board"] == "rp2-pico-w" and r1["compiled"] and r1["copied"]
    again = microcot("deploy", "--port", a.port, "--json", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    [r2] = json.loads(again.stdout)
    assert r2["copied"] == [] and r2["removed"] == [] and r2["unchanged"] == \
        len(r1["copied"]) + r1["unchanged"]
    # the firmware's identity reads the SIM over machine.UART(0) (the board file's modem pins)
    out = run_on(a.port, "from microcot import identity; print(identity.detect(None, 3000))")
    assert a.iccid in out and "iccid" in out


def test_provision_two_boards_at_once(pair: list[EmulatedRP2040], env: dict[str, str],
                                      tmp_path: Path) -> None:
    out = tmp_path / "fleet.csv"
    args = ["provision", "--ledger", str(tmp_path / "ledger.db"), "--out", str(out), "--json",
            "--timeout", "30"]
    for b in pair:
        args += ["--port", b.port]
    r = microcot(*args, env=env, timeout=230)
    assert r.returncode == 0, r.stdout + r.stderr
    res = {b["port"]: b for b in json.loads(r.stdout)["boards"]}
    for b in pair:
        assert res[b.port]["result"] == "written", res[b.port]
        assert res[b.port]["device_id"] == b.iccid and res[b.port]["id_source"] == "iccid"
    text = out.read_text()
    assert pair[0].iccid in text and pair[1].iccid in text


def test_flash_through_bootsel(env: dict[str, str], tmp_path: Path) -> None:
    pico = need(lambda: fidelity.rp2_firmware("RPI_PICO"))
    pico_w = fidelity.rp2_firmware("RPI_PICO_W")
    board = EmulatedRP2040("rp2-flash", flash=tmp_path / "flash.bin").start()
    try:
        port = board.port
        fenv = dict(env, MICROCOT_UF2_SEARCH=str(board.drive_dir))
        # a UF2 for another chip is refused before the board is touched
        wrong = tmp_path / "rp2350.uf2"
        wrong.write_bytes(with_family(pico.read_bytes(), RP2350_ARM_S))
        r = microcot("flash", "--board", "rp2-pico-w", "--port", port, "--firmware", str(wrong),
                     env=fenv)
        assert r.returncode != 0 and "not for RP2040" in r.stdout + r.stderr
        assert "Pico W" in run_on(port, "import sys; print(sys.implementation._machine)")
        # the plain Pico build through machine.bootloader() and the RPI-RP2 drive
        r = microcot("flash", "--board", "rp2-pico-w", "--port", port, "--firmware", str(pico),
                     "--timeout", "60", env=fenv)
        assert r.returncode == 0, r.stdout + r.stderr
        machine = run_on(port, "import sys; print(sys.implementation._machine)")
        assert "Pico with RP2040" in machine and "Pico W" not in machine
        # the drive itself ignores a UF2 without RP2040 blocks and stays; a good one is taken
        from microcot_host.flash import uf2 as uf2_flash

        uf2_flash.enter_bootsel(port)
        drive = board.drive_dir / "RPI-RP2"
        wait_for(lambda: (drive / "INFO_UF2.TXT").exists(), "the RPI-RP2 drive")
        (drive / "other.uf2").write_bytes(wrong.read_bytes())
        wait_for(lambda: not (drive / "other.uf2").exists(), "the foreign UF2 being dropped")
        assert (drive / "INFO_UF2.TXT").exists()
        (drive / "back.uf2").write_bytes(pico_w.read_bytes())
        wait_for(lambda: not drive.exists(), "the drive going away after a good UF2")
        wait_for(lambda: "Pico W" in _machine_or_empty(port), "the Pico W firmware answering")
        # (the two builds place their filesystems differently, as on a real Pico: a new one)
        run_on(port, "f = open('w.txt', 'w'); f.write('w'); f.close()")
        assert run_on(port, "print(open('w.txt').read())").strip() == "w"
    finally:
        board.stop()


def _machine_or_empty(port: str) -> str:
    try:
        return run_on(port, "import sys; print(sys.implementation._machine)")
    except (transport.BoardError, OSError):
        return ""


def test_cli_board_registry_and_microcot_test(env: dict[str, str], tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    cli = subprocess.Popen([sys.executable, "-m", "microcot_host", "board", "rp2", "--name",
                            "hil-rp2", "--modem", iccid(800), "--flash",
                            str(tmp_path / "flash.bin"), "--port-file", str(port_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    entry_path = Path(env["MICROCOT_HOME"]) / "run" / "hil-rp2.json"
    try:
        wait_for(lambda: entry_path.exists() or cli.poll() is not None, "the board registering")
        assert cli.poll() is None, cli.stdout.read()
        entry = json.loads(entry_path.read_text())
        assert entry["runtime"] == "rp2040" and entry["port"] == port_file.read_text().strip()
        boards = microcot("boards", "--json", env=env, timeout=60)
        assert entry["port"] in boards.stdout, boards.stdout + boards.stderr
        out = tmp_path / "hil"
        r = microcot("test", "--port", "virtual:hil-rp2", "--out", str(out), "--", "-k", "xtea",
                     env=env, timeout=230)
        assert r.returncode == 0, r.stdout + r.stderr
        summary = json.loads((out / "summary.json").read_text())
        (result,) = summary["boards"]
        assert result["status"] == "passed" and result["board"] == "rp2-pico-w", result
    finally:
        cli.send_signal(signal.SIGTERM)
        cli.wait(timeout=30)
    assert cli.returncode == 0
    assert not entry_path.exists()


def test_plain_pico_skips_exactly_the_tests_that_need_a_network_stack(
        env: dict[str, str], tmp_path: Path) -> None:
    """The RPI_PICO firmware has no socket: deploy reports the modules that cannot run there,
    the device tests that need them are skipped with the reason, the others pass."""
    need(lambda: fidelity.rp2_firmware("RPI_PICO"))
    root = Path(__file__).resolve().parents[2]
    junit = tmp_path / "pico.xml"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--port", "virtual", "--board", "rp2-pico",
         "--runtime", "rp2040", f"--junitxml={junit}", "-p", "no:cacheprovider", "-q",
         "-rs", str(root / "tests" / "device" / "test_mqtt.py"),
         str(root / "tests" / "device" / "test_mqttclient.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    import xml.etree.ElementTree as ET

    cases = {c.get("name"): next((x.tag for x in c if x.tag in ("skipped", "failure", "error")),
                                 "passed") for c in ET.parse(junit).iter("testcase")}
    skipped = {n for n, k in cases.items() if k == "skipped"}
    # the MQTT client's tests need mqtt.py (socket, ssl), those of its packet codec do not
    assert skipped == {
        "test_client_without_io", "test_pem_to_der",
        "test_tls_context_refuses_a_bad_ca_and_verifies_by_default",
        "test_last_will_goes_into_connect_and_a_refusal_is_umqtts_exception_with_the_code",
        "test_ssl_true_without_a_ca_never_skips_verification",
        "test_a_hostile_broker_costs_the_connection_never_the_client",
        "test_connack_garbage_is_a_protocol_error_and_a_close_mid_connack_a_connection_error",
        "test_umqtt_simple_turns_a_broken_link_into_oserror_and_keeps_refusals_apart",
        "test_umqtt_robust_reconnects_over_a_broken_link_and_publishes_once",
        "test_no_memory_for_an_incoming_packet_closes_the_connection"}, cases
    assert all(k == "passed" for n, k in cases.items() if n not in skipped), cases
    assert "board lacks socket, ssl" in r.stdout
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert props["microcot.platform"] == "rp2" and "socket" not in props["microcot.capabilities"]


def test_deploy_on_a_plain_pico_names_the_modules_it_cannot_run(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    firmware = need(lambda: fidelity.rp2_firmware("RPI_PICO"))
    board = EmulatedRP2040("pico-plain", firmware=firmware, flash=tmp_path / "flash.bin").start()
    try:
        r = microcot("deploy", "--port", board.port, "--board", "rp2-pico", "--json", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        na = json.loads(r.stdout)[0]["unavailable"]
        # the MQTT and WebSocket clients need socket/ssl; the protocol cores do not
        assert {"mqtt", "ws"} <= set(na) and "no module named" in na["mqtt"]
        assert not {"mqttpkt", "wsframe", "smartrest", "binrest", "xtea", "agent"} & set(na)
    finally:
        board.stop()
