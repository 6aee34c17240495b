"""Board models: each board file names its runtime and budget; every tool makes the same board."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fidelity_fixtures import need, need_runtime
from mpremote.transport_serial import SerialTransport

from microcot_host import boards, fidelity
from microcot_host.vboard.heapcal import calibration
from microcot_host.vboard.models import make_board, micropython_for

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


def _exec(port: str, code: str) -> str:
    t = SerialTransport(port, 115200)
    try:
        t.enter_raw_repl(soft_reset=False)
        out = t.exec(code)
        t.exit_raw_repl()
    finally:
        t.close()
    return out.decode().strip()


def test_every_real_board_names_a_faithful_runtime():
    for name in boards.names():
        b = boards.load(name)
        assert b.runtime in fidelity.RUNTIMES, name
        assert b.heap_budget, name
        if b.family == "unix":
            assert b.runtime == "unix64"
        else:
            # a board users own is modelled by a 32-bit build, never the 64-bit developer port
            assert b.runtime in fidelity.FAITHFUL, name
    assert boards.load("esp32-generic").runtime == "i386-esp32"
    assert boards.load("rp2-pico-w").runtime == "i386-rp2"


def test_a_bad_runtime_in_a_board_file_is_refused(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\nfamily = "esp32"\nchip = "esp32"\nruntime = "i686"\n')
    with pytest.raises(boards.BoardError, match="runtime 'i686'"):
        boards.load(path)


@pytest.mark.parametrize(("board", "runtime"), [("esp32-generic", "i386-esp32"),
                                                 ("rp2-pico-w", "i386-rp2"),
                                                 ("virtual", "unix64")])
def test_virtual_board_runs_the_model_with_the_budget_free(board, runtime, tmp_path):
    need_runtime(runtime)
    budget = boards.load(board).heap_budget
    vb = make_board(board, name=f"model-{board}", flash_dir=tmp_path).start()
    try:
        maxsize, free = _exec(vb.port, "import sys,gc\ngc.collect()\n"
                                       "print(sys.maxsize, gc.mem_free())").split()
    finally:
        vb.stop()
    assert int(maxsize) == (2**31 - 1 if runtime.startswith("i386") else 2**63 - 1)
    # the REPL leaves user code the real board's free heap (calibrated per binary): within the
    # 1 KiB rounding up and the bytecode of this snippet, which lives while it runs
    assert budget - 512 <= int(free) < budget + 1024


def test_calibration_is_a_line_through_its_probes():
    a, b = calibration(micropython_for("unix64"))
    assert 0.95 < a < 1.0  # only the GC's tables, a few per cent
    assert 4_000 < b < 40_000  # the Python REPL's own objects


def test_missing_model_skips_with_how_to_get_it_or_fails_when_required(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MICROCOT_FIDELITY", "MICROCOT_MICROPYTHON_I386",
                                "MICROCOT_REQUIRE"))}
    (tmp_path / "tests" / "device").mkdir(parents=True)
    (tmp_path / "tests" / "device" / "test_x.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmicrocot_device_dir = tests/device\n")
    cmd = [sys.executable, "-m", "pytest", "--port", "virtual", "--board", "esp32-generic",
           "-rs", "-p", "no:cacheprovider", "tests/device"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and "MICROCOT_FIDELITY_DIR is not set" in run.stdout
    run = subprocess.run(cmd, cwd=tmp_path, env={**env, "MICROCOT_REQUIRE_FIDELITY": "1"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "MICROCOT_REQUIRE_FIDELITY is set" in run.stdout


def _outcomes(junit: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        out[f"{case.get('classname')}::{case.get('name')}"] = kind
    return out


def test_microcot_test_and_pytest_board_virtual_make_the_same_board(tmp_path):
    """Same board file -> same runtime, heap and results, whichever tool starts the board."""
    need_runtime("i386-esp32")
    select = ["-k", "test_store or test_xtea or test_agent_units"]
    junit = tmp_path / "pytest.xml"
    direct = subprocess.run(
        [sys.executable, "-m", "pytest", "--port", "virtual", "--board", "esp32-generic",
         f"--junitxml={junit}", "-p", "no:cacheprovider", "-q", *select,
         str(ROOT / "tests" / "device")],
        cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert direct.returncode == 0, direct.stdout[-3000:]
    out = tmp_path / "hil"
    many = subprocess.run(
        [sys.executable, "-m", "microcot_host.cli", "test", "--virtual", "1", "--board",
         "esp32-generic", "--out", str(out), "--", *select],
        cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert many.returncode == 0, many.stdout[-3000:] + many.stderr[-3000:]
    a, b = _outcomes(junit), _outcomes(out / "virtual-1.xml")
    assert a and a == b
    assert set(a.values()) == {"passed"}
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert props.get("microcot.runtime") == "i386-esp32"


def _serve(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """`microcot board virtual ARGS` until it prints its port; the port, and its output after
    SIGTERM stopped it."""
    import signal
    import time

    pf = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "microcot_host", "board", "virtual",
                             "--port-file", str(pf), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not pf.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no port"
            time.sleep(0.05)
        port = pf.read_text().strip()
        out = _exec(port, "import sys\nprint(sys.platform, sys.maxsize)")
    finally:
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, text
    return out, text


def test_board_virtual_cli_runs_the_board_files_model(tmp_path):
    need_runtime("i386-esp32")
    out, text = _serve(["--board", "esp32-generic", "--name", "cli-esp32",
                        "--flash", str(tmp_path / "flash")], tmp_path)
    assert out == f"linux {2**31 - 1}"
    assert "model: esp32-generic on i386-esp32" in text and "developer board" not in text


def test_board_virtual_cli_emulated_runs_the_real_rp2_firmware(tmp_path):
    from microcot_host.rp2emu.board import ensure_rp2040js

    need_runtime("rp2040")
    lib = need(lambda: ensure_rp2040js(install=False))
    env = dict(os.environ, MICROCOT_HOME=str(tmp_path / "home"), MICROCOT_RP2040JS=str(lib))
    out, text = _serve(["--board", "rp2-pico-w", "--emulated", "--name", "cli-rp2"], tmp_path,
                       env)
    assert out == f"rp2 {2**31 - 1}", text
    r = subprocess.run([sys.executable, "-m", "microcot_host", "board", "virtual", "--board",
                        "esp32-generic", "--emulated"], capture_output=True, text=True)
    assert r.returncode == 2 and "not an rp2 board" in r.stderr
