"""`microcot test` on many boards, the redaction of its logs, and the board requirement markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from microcot_host import hil
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(180)

# -- redaction ---------------------------------------------------------------------------------

SECRET = "hunter2-Xy9"


@pytest.mark.parametrize(("line", "kept"), [
    (f"password={SECRET}", "password=***"),
    (f"connect user=dev1 password={SECRET} host=x", "user=dev1 password=*** host=x"),
    (f'{{"user": "dev1", "password": "{SECRET}"}}', '"password": "***"'),
    (f"{{'password': '{SECRET}', 'x': 1}}", "'password': '***', 'x': 1"),
    (f"MQTTClient('id', 'h', user='u', password=b'{SECRET}')", "password=b'***'"),
    (f"bootstrap_password: {SECRET}", "bootstrap_password: ***"),
    (f"MQTT_PASSWORD={SECRET}", "MQTT_PASSWORD=***"),
    (f"api_key={SECRET}&x=1", "api_key=***&x=1"),
    (f"token: {SECRET}", "token: ***"),
    (f"Authorization: Basic {SECRET}", "Authorization: Basic ***"),
    (f"'Authorization': 'Bearer {SECRET}'", "'Authorization': 'Bearer ***'"),
    (f"header Bearer {SECRET}abcdef", "Bearer ***"),
    (f"mqtts://dev1:{SECRET}@localhost:8883", "mqtts://dev1:***@localhost:8883"),
    ("published secret QWERTYUIOPASDFGH on ss/8949", "published secret *** on ss/8949"),
    ("b'QWERTYUIOPASDFGH'", "b'***'"),
    (f"89490200001234567892;{SECRET};mqtt;dev1;89490200001234567892;0",
     "89490200001234567892;***;mqtt;dev1;"),
])
def test_redact_masks_secrets(line, kept):
    out = hil.redact(line)
    assert kept in out
    assert SECRET not in out and "QWERTYUIOPASDFGH" not in out


@pytest.mark.parametrize("line", [
    "tests/device/test_secret.py::test_token_roundtrip PASSED",
    "FAILED tests/device/test_store.py::test_password_generation - AssertionError",
    "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL",
    "WS_STATUS_TLS_HANDSHAKE_FAILED and ABCDEFGHIJKLMNOPQ (17 letters)",
    "http://localhost:8080/path@x",
])
def test_redact_leaves_ordinary_lines_alone(line):
    assert hil.redact(line) == line


def test_redactor_drops_private_key_blocks():
    r = hil.Redactor()
    lines = ["key follows\n", "-----BEGIN EC PRIVATE KEY-----\n", "MHcCAQEEIKsecretbits\n",
             "moresecret==\n", "-----END EC PRIVATE KEY-----\n", "done password=x\n"]
    out = "".join(r.line(ln) for ln in lines)
    assert "secretbits" not in out and "moresecret" not in out
    assert "BEGIN EC PRIVATE KEY" in out and "END EC PRIVATE KEY" in out
    assert out.endswith("done password=***\n")
    one = hil.Redactor().line("-----BEGIN PRIVATE KEY-----abc-----END PRIVATE KEY-----\n")
    assert "abc" not in one


def test_redact_junit_in_place(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(
        '<testsuites><testsuite name="b" tests="1" failures="1"><testcase name="t">'
        f'<failure message="assert password={SECRET}">{{&quot;password&quot;: &quot;{SECRET}'
        '&quot;}\nline two</failure></testcase></testsuite></testsuites>')
    hil.redact_junit(path)
    text = path.read_text()
    assert SECRET not in text
    failure = ET.parse(path).getroot().find(".//failure")
    assert failure.get("message") == "assert password=***"
    assert failure.text == '{"password": "***"}\nline two'


def test_virtual_port_specs_and_test_paths():
    assert hil.split_virtual(["virtual:3", "/dev/ttyACM0,virtual", "auto"]) == (
        4, ["/dev/ttyACM0", "auto"])
    assert hil._iccid(1) != hil._iccid(2) and len(hil._iccid(1)) == 20
    assert not hil._names_tests(["-k", "tests", "-x", "--lf"])
    assert hil._names_tests(["-x", __file__ + "::test_x"])
    targets = [hil.Target("virtual-1", "/dev/pts/1"), hil.Target("virtual-1", "/dev/pts/2"),
               hil.Target("virtual-1-2", "/dev/pts/3"), hil.Target("virtual-1", "/dev/pts/4")]
    hil.unique_labels(targets)
    assert [t.label for t in targets] == ["virtual-1", "virtual-1-2", "virtual-1-2-2",
                                          "virtual-1-3"]


# -- many boards -------------------------------------------------------------------------------

DEVICE_SUITE = {
    "tests/device/test_all.py": """
        import sys

        def test_on_micropython():
            assert sys.implementation.name == 'micropython'

        def test_prints_secrets():
            # what a careless debugging line prints; the logs must not keep it
            print('connect password=%s' % ('hun' + 'ter2'))
            print('Authorization: Bearer ' + 'abc' + 'def123456')
            print({'password': 'sw' + 'ordfish'})
    """,
    "tests/device/test_board_two_fails.py": """
        from microcot import identity

        def test_not_board_two():
            device_id = identity.detect()[0]
            # hil gives virtual board N the ICCID 8949020000<N as 9 digits><Luhn digit>
            assert device_id[:19] != '8949020000000000002', \\
                'fails on board 2, password=sw' + 'ordfish'
    """,
    "tests/device/test_needs_modem.py": """
        BOARD_REQUIRES = ('modem',)

        def test_modem_iccid():
            from microcot import identity
            assert identity.detect()[1] == 'iccid'
    """,
    "tests/device/test_esp32_only.py": """
        BOARD_FAMILIES = ('esp32', 'rp2')

        def test_radio():
            import network
            assert network.WLAN
    """,
    "tests/device/test_unix_family.py": """
        BOARD_FAMILIES = 'unix'
        BOARD_REQUIRES = ('socket',)

        def test_runs_here():
            import socket
            assert socket.socket
    """,
}
LEAKS = ("hunter2", "abcdef123456", "swordfish")


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    for rel, text in DEVICE_SUITE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmicrocot_device_dir = tests/device\n")
    return tmp_path


def microcot_test(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MICROCOT_PORT"}
    return subprocess.run([sys.executable, "-m", "microcot_host", "test", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_three_virtual_boards_in_parallel_one_fails(suite):
    out = suite / "results"
    start = time.monotonic()
    # a roomy heap: this is about many boards, not about fitting the firmware in a small one
    proc = microcot_test(suite, "--virtual", "3", "--heap", "2m", "--out", str(out))
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    by_label = {b["label"]: b for b in summary["boards"]}
    assert sorted(by_label) == ["virtual-1", "virtual-2", "virtual-3"]
    assert summary["ok"] is False
    for label, b in by_label.items():
        # test_all (2) + test_board_two_fails + test_needs_modem + test_unix_family run;
        # test_esp32_only is skipped: a virtual board is of the unix family
        assert b["tests"] == 6 and b["skipped"] == 1, b
        if label == "virtual-2":
            assert b["status"] == "failed" and b["failed"] == 1
            assert b["failures"] == ["tests.device.test_board_two_fails::test_not_board_two"]
            assert "fails on board 2, password=***" in b["reason"]
        else:
            assert b["status"] == "passed" and b["passed"] == 5
        xml = ET.parse(out / f"{label}.xml").getroot()
        props = {p.get("name"): p.get("value") for p in xml.iter("property")}
        assert props["microcot.board"] == "virtual" and props["microcot.port"] == b["port"]
        log = (out / f"{label}.log").read_text()
        assert "password=***" in log
        for leak in LEAKS:
            assert leak not in log and leak not in (out / f"{label}.xml").read_text()
    assert len({b["port"] for b in summary["boards"]}) == 3
    # the summary table names the failing board and the failing test
    assert "virtual-2" in proc.stdout and "failed" in proc.stdout
    assert "failed: tests.device.test_board_two_fails::test_not_board_two" in proc.stdout
    skip_reason = "board is unix/virtual, test needs esp32 or rp2"
    assert skip_reason in (out / "virtual-1.log").read_text() or skip_reason in \
        (out / "virtual-1.xml").read_text()
    # parallel: three boards take about as long as one (generous bound for a busy CI host)
    assert took < 40


def test_boards_given_as_ports_and_a_board_without_modem(suite, tmp_path):
    """Three boards started here and passed as --port: requirements are per board."""
    boards = [VirtualBoard(f"t-many-{i}", iccid=hil._iccid(10 + i) if i else None,
                           flash_dir=tmp_path / f"flash{i}") for i in range(3)]
    try:
        for vb in boards:
            vb.start()
        out = suite / "r2"
        proc = microcot_test(suite, *[a for vb in boards for a in ("--port", vb.port)],
                             "--out", str(out), "--json", "--", "-k", "not board_two",
                             "-p", "no:randomly")
    finally:
        for vb in boards:
            vb.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("{"), proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    rows = summary["boards"]
    assert [r["port"] for r in rows] == [vb.port for vb in boards]
    assert all(r["board"] == "virtual" and r["status"] == "passed" for r in rows)
    # board 0 has no modem: its modem test is skipped, the others run it
    assert [r["skipped"] for r in rows] == [2, 1, 1]
    assert "board lacks modem" in (out / f"{rows[0]['label']}.xml").read_text()
    for r in rows:
        assert Path(r["junit"]).exists() and Path(r["log"]).exists()


def test_a_port_that_is_no_board_fails_the_run_quickly(suite):
    master, slave = os.openpty()
    try:
        start = time.monotonic()
        proc = microcot_test(suite, "--port", os.ttyname(slave), "--timeout", "1",
                             "--out", str(suite / "r3"))
        took = time.monotonic() - start
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 1
    assert "unavailable" in proc.stdout and "not micropython" in proc.stdout
    assert took < 20


def test_no_boards_or_a_missing_port_is_a_clear_error(suite):
    proc = microcot_test(suite)
    assert proc.returncode == 1 and "no boards: use --port" in proc.stderr
    proc = microcot_test(suite, "--port", "/dev/ttyNOPE3")
    assert proc.returncode == 1 and "/dev/ttyNOPE3: no such port" in proc.stderr


# -- markers in one pytest run -----------------------------------------------------------------

MARKER_SUITE = {
    "tests/device/test_caps.py": """
        BOARD_REQUIRES = ('wlan',)

        def test_wlan_scan():
            raise AssertionError('must not run on a board without WLAN')
    """,
    "tests/device/test_bad.py": """
        BOARD_REQUIRES = ('modme',)

        def test_typo():
            pass
    """,
    "tests/host_side/test_marked.py": """
        import pytest

        @pytest.mark.needs('modem')
        def test_with_modem():
            pass

        @pytest.mark.family('esp32')
        def test_esp32_only():
            raise AssertionError('must not run on a unix board')

        @pytest.mark.needs('wlan')
        def test_needs_wlan():
            raise AssertionError('must not run without WLAN')
    """,
}


@pytest.fixture
def marker_suite(pytester):
    for rel, text in MARKER_SUITE.items():
        path = pytester.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    pytester.makeini("[pytest]\nmicrocot_device_dir = tests/device\n")
    return pytester


def test_markers_skip_on_a_board_that_lacks_what_a_test_needs(marker_suite):
    result = marker_suite.runpytest_subprocess(
        "--port", "virtual", "--heap", "2m", "-rs", "-p", "no:cacheprovider",
        "tests/device/test_caps.py",
        "tests/host_side")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, skipped=3)  # the plugin's virtual board has a modem
    assert "test_caps.py: board lacks wlan" in out
    assert "board is unix/virtual, test needs esp32" in out
    summary = [ln for ln in out.splitlines() if ", capabilities " in ln]
    assert summary and "tags unix,virtual," in summary[0]
    assert set(summary[0].split(", capabilities ")[1].split(",")) == {"ssl", "socket", "modem"}


def test_unknown_capability_is_a_collection_error(marker_suite):
    result = marker_suite.runpytest_subprocess("--port", "virtual", "--heap", "2m",
                                               "-p", "no:cacheprovider", "tests/device/test_bad.py")
    assert result.ret != 0
    assert "BOARD_REQUIRES names unknown capabilities modme" in result.stdout.str()


def test_without_a_board_the_requirements_are_ignored(marker_suite):
    # under CPython in-process the globals are plain module globals and the markers do nothing
    result = marker_suite.runpytest_subprocess("-p", "no:cacheprovider",
                                               "tests/device/test_bad.py", "tests/host_side")
    result.assert_outcomes(passed=2, failed=2)
