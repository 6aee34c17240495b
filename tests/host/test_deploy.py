"""microcot deploy against a virtual board: compile, hash-skip, stale files, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import serial

from microcot_host import boards, deploy, transport
from microcot_host.paths import firmware_dir
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    vb = VirtualBoard(name="deploy-test", flash_dir=tmp_path_factory.mktemp("flash")).start()
    yield vb
    vb.stop()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microcot_host", *args],
                          capture_output=True, text=True, timeout=timeout)


def on_board(port: str, code: str):
    t = transport.open_board(port)
    try:
        return transport.evaluate(t, code)
    finally:
        transport.close(t)


def test_first_deploy_then_unchanged_then_one_change(board, tmp_path):
    src = tmp_path / "fw"
    shutil.copytree(firmware_dir(), src)
    modules = sorted(p.stem for p in (src / "microcot").glob("*.py"))
    vboard = boards.load("virtual")

    t = transport.open_board(board.port)
    try:
        first = deploy.deploy_transport(t, vboard, source=src)
        assert first.compiled, "the unix port loads .mpy: deploy must compile"
        assert sorted(Path(p).stem for p in first.copied
                      if p.startswith(deploy.LIB) and p.endswith(".mpy")) == modules
        # umqtt.simple/robust over our client, where they come before a frozen umqtt
        assert {"/umqtt/simple.mpy", "/umqtt/robust.mpy"} <= set(first.copied)
        assert "/board.json" in first.copied
        assert first.version == "0.1.0"

        again = deploy.deploy_transport(t, vboard, source=src)
        assert again.copied == [] and again.bytes_sent == 0
        assert len(again.unchanged) == len(first.copied)

        init = src / "microcot" / "__init__.py"
        init.write_text(init.read_text() + "\nDEPLOY_MARK = 42\n")
        third = deploy.deploy_transport(t, vboard, source=src)
        assert third.copied == ["/lib/microcot/__init__.mpy"]
        assert transport.evaluate(t, "__import__('microcot').DEPLOY_MARK") == 42
        cfg = transport.evaluate(t, "open('/board.json').read()")
        assert json.loads(cfg)["family"] == "unix"
    finally:
        transport.close(t)
    # the files really are in the board's flash directory, compiled
    lib = board.flash_dir / "lib" / "microcot"
    assert sorted(p.stem for p in lib.glob("*.mpy")) == modules
    assert not list(lib.glob("*.tmp"))


def test_stale_files_removed_and_no_compile(board):
    t = transport.open_board(board.port)
    try:
        deploy.deploy_transport(t, boards.load("virtual"))
        transport.run(t, "f=open('/lib/microcot/stale.py','w'); f.write('x=1'); f.close()")
        src_run = deploy.deploy_transport(t, boards.load("virtual"), compile_=False)
        assert not src_run.compiled
        assert "/lib/microcot/stale.py" in src_run.removed
        names = transport.evaluate(t, "__import__('os').listdir('/lib/microcot')")
        assert all(n.endswith(".py") for n in names), names
        assert "stale.py" not in names
        back = deploy.deploy_transport(t, boards.load("virtual"))
        assert back.compiled and back.removed  # the .py sources give way to .mpy again
    finally:
        transport.close(t)


def test_cli_deploy_reports_and_skips(board):
    r = cli("deploy", "--port", board.port, "--board", "virtual", "--json")
    assert r.returncode == 0, r.stderr
    [out] = json.loads(r.stdout)
    assert out["port"] == board.port and out["micropython"].startswith("1.")
    assert out["compiled"] is True and out["microcot"] == "0.1.0"
    r2 = cli("deploy", "--port", board.port, "--json")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)[0]["copied"] == []
    assert on_board(board.port, "__import__('microcot').__version__") == "0.1.0"


def test_cli_deploy_takes_every_port_form_and_names_a_failed_port_once(board, tmp_path):
    """--port as every command takes it: a list with a glob; a missing board fails alone."""
    link = tmp_path / "ttyVB0"
    link.symlink_to(board.port)
    r = cli("deploy", "--port", f"{tmp_path}/ttyVB*,/dev/does-not-exist-42", "--json")
    assert r.returncode != 0
    assert r.stderr.count("/dev/does-not-exist-42") == 1, r.stderr
    r = cli("deploy", "--port", f"{tmp_path}/ttyVB*", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["copied"] for d in json.loads(r.stdout)] == [[]]
    r = subprocess.run([sys.executable, "-m", "microcot_host", "deploy", "--json"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MICROCOT_PORT": f"{tmp_path}/ttyVB*"})
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stderr


def test_cli_missing_port():
    r = cli("deploy", "--port", "/dev/does-not-exist-42")
    assert r.returncode != 0
    # the resolver's message, as every command with --port gives it
    assert "/dev/does-not-exist-42: no such port" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_busy_port(board):
    holder = serial.Serial(board.port, exclusive=True)
    try:
        r = cli("deploy", "--port", board.port)
    finally:
        holder.close()
    assert r.returncode != 0
    assert "busy" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_not_a_micropython_board():
    master, slave = os.openpty()  # a serial line with nothing answering
    try:
        r = cli("deploy", "--port", os.ttyname(slave), "--timeout", "2")
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode != 0
    assert "not a MicroPython board" in r.stderr
    assert "Traceback" not in r.stderr


def test_mip_package_json_lists_every_module(board):
    manifest = json.loads((firmware_dir() / "package.json").read_text())
    listed = sorted(dest for dest, _ in manifest["urls"])
    present = sorted(f"{d}/{p.name}" for d in ("microcot", "umqtt")
                     for p in (firmware_dir() / d).glob("*.py"))
    assert listed == present
    # and mip really installs from it
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", board.port, "mip", "install",
                        "--target", "/mip", str(firmware_dir() / "package.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names = on_board(board.port, "sorted(__import__('os').listdir('/mip/microcot'))")
    assert names == sorted(Path(p).name for p in present if p.startswith("microcot/"))


def test_a_module_needing_what_the_firmware_lacks_is_reported_not_failed(board, tmp_path):
    """A Pico without radio has no socket: the network modules cannot run there, the rest can."""
    src = tmp_path / "fw"
    shutil.copytree(firmware_dir(), src)
    (src / "microcot" / "znet.py").write_text("import nosuchportmodule\n")
    t = transport.open_board(board.port)
    try:
        r = deploy.deploy_transport(t, boards.load("virtual"), source=src)
        assert r.unavailable == {"znet": "no module named 'nosuchportmodule'"}
        transport.run(t, "import os\nos.remove('/lib/microcot/znet.mpy')")
    finally:
        transport.close(t)


def test_a_module_that_cannot_import_fails_the_deploy_naming_it(board, tmp_path):
    src = tmp_path / "fw"
    shutil.copytree(firmware_dir(), src)
    (src / "microcot" / "zbroken.py").write_text("raise ImportError('needs a missing driver')\n")
    t = transport.open_board(board.port)
    try:
        with pytest.raises(deploy.DeployError) as err:
            deploy.deploy_transport(t, boards.load("virtual"), source=src)
        assert "microcot.zbroken" in str(err.value)
        assert "needs a missing driver" in str(err.value)
        # the modules before it were checked and the board is usable afterwards
        assert transport.evaluate(t, "1 + 1") == 2
        transport.run(t, "import os\nos.remove('/lib/microcot/zbroken.mpy')")
    finally:
        transport.close(t)
