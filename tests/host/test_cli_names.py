"""One name per concept across `microcot` and its pytest plugin (microcot_host/cliopts.py).

Walks every click command and checks the naming rules; old spellings stay accepted (hidden, with
a warning) for one release.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from microcot_host import cli, cliopts, pytest_plugin

# old or competing spellings that no command may show any more -> the one name
RETIRED = {
    "--data": "--data-dir",
    "--board-name": "--board",
    "--probe-timeout": "--timeout",
    "--step-timeout": "--timeout",
}
# every --timeout defaults to cliopts.BOARD_TIMEOUT unless waiting includes something slower
SLOWER_TIMEOUTS = {
    ("flash",): 30.0,  # a board reboots after being written, a BOOTSEL drive must appear
    ("demo",): 60.0,  # one whole step of the demo (a bootstrap, a measurement round trip)
}
# where a table or a summary is printed, a program can ask for it as JSON
NEEDS_JSON = [("boards",), ("flash",), ("deploy",), ("test",), ("provision",),
              ("provision", "status"), ("provision", "csv", "validate"), ("emulator", "devices"),
              ("emulator", "board-config"), ("config", "keys"), ("ca", "fetch")]
# `--port` elsewhere is a TCP port the user configures, not where a board is
PORT_IS_TCP = {("config", "new")}  # the broker's port in /microcot.json


def _walk(group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()
          ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"microcot {' '.join(path + (name,))} does not load"
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, click.Context(cmd, parent=ctx), path + (name,))


COMMANDS = dict(_walk(cli.main, click.Context(cli.main)))


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def _visible(cmd: click.Command) -> set[str]:
    return {o for p in _options(cmd) for o in p.opts + p.secondary_opts}


def test_no_command_shows_a_retired_spelling():
    for path, cmd in COMMANDS.items():
        shown = _visible(cmd) & set(RETIRED)
        assert not shown, f"microcot {' '.join(path)}: {shown} -> {[RETIRED[s] for s in shown]}"


def test_every_timeout_is_named_timeout_with_the_one_default():
    seen = []
    for path, cmd in COMMANDS.items():
        for p in _options(cmd):
            names = [o for o in p.opts if "timeout" in o]
            if not names:
                continue
            assert names == ["--timeout"], f"microcot {' '.join(path)}: {names}"
            assert p.default == SLOWER_TIMEOUTS.get(path, cliopts.BOARD_TIMEOUT), path
            assert p.show_default, f"microcot {' '.join(path)} --timeout: default not shown"
            seen.append(path)
    # the commands that wait for boards or servers all have one
    assert {("boards",), ("test",), ("deploy",), ("provision",), ("flash",), ("demo",),
            ("ca", "fetch")} <= set(seen)


def test_machine_output_is_json_everywhere_the_issue_asks():
    for path in NEEDS_JSON:
        opts = {o: p for p in _options(COMMANDS[path]) for o in p.opts}
        assert "--json" in opts, f"microcot {' '.join(path)} has no --json"
        assert opts["--json"].is_flag
    for path, cmd in COMMANDS.items():
        for p in _options(cmd):
            if "--json" in p.opts:
                assert p.is_flag and p.name == "as_json", path


def test_port_is_where_a_board_is_and_board_is_a_board_file():
    for path, cmd in COMMANDS.items():
        for p in _options(cmd):
            if "--port" in p.opts and path not in PORT_IS_TCP:
                # the shared option: paths, auto, globs, lists, virtual:NAME, $MICROCOT_PORT
                assert p.name == "port_specs" and p.metavar == "PORT", path
            if "--board" in p.opts:
                assert "board file" in (p.help or "") or "boards/" in (p.help or ""), path
    # the emulators' listening options are named alike
    listen = {path: _visible(cmd) for path, cmd in COMMANDS.items()
              if path in {("emulator",), ("kics-emulator",)}}
    assert all("--bind" in names for names in listen.values()), listen


def test_old_spellings_are_hidden_aliases_of_a_shown_option():
    olds = {}
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            if isinstance(p, cliopts.RenamedOption):
                for old in p.old_names:
                    assert old not in _visible(cmd), (path, old)
                    olds[old] = p.opts[0]
    assert olds["--data"] == "--data-dir" and olds["--probe-timeout"] == "--timeout"
    assert olds["--step-timeout"] == "--timeout" and olds["--host"] == "--bind"


def test_an_old_spelling_still_works_and_warns(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli.main, ["emulator", "accept", "x1", "--data", str(tmp_path / "none")])
    assert "--data is deprecated" in r.stderr and "use --data-dir" in r.stderr
    assert f"no emulator in {tmp_path / 'none'}" in r.stderr  # the value arrived
    r = runner.invoke(cli.main, ["test", "--probe-timeout", "1"], env={"MICROCOT_PORT": ""})
    assert "--probe-timeout is deprecated" in r.stderr and "no boards" in r.stderr


def test_renamed_option_keeps_repeated_and_flag_values():
    @click.command()
    @cliopts.option("--port", "ports", multiple=True, old=("--where",))
    @cliopts.option("--no-deploy", is_flag=True, old=("--board-no-deploy",))
    def cmd(ports: tuple[str, ...], no_deploy: bool) -> None:
        click.echo(f"{sorted(ports)} {no_deploy}")

    r = CliRunner().invoke(cmd, ["--where", "a", "--port", "b", "--board-no-deploy"])
    assert r.exit_code == 0 and r.stdout == "['a', 'b'] True\n"
    assert "--where is deprecated" in r.stderr and "--board-no-deploy is deprecated" in r.stderr
    assert "--where" not in CliRunner().invoke(cmd, ["--help"]).stdout


# -- the pytest plugin speaks the same names ------------------------------------------------------

def _plugin_options() -> dict[str, bool]:
    """Option name -> shown in --help, as the plugin declares them."""
    from _pytest.config.argparsing import Parser

    parser = Parser(_ispytest=True)
    pytest_plugin.pytest_addoption(parser)
    return {name: opt.attrs().get("help") != "==SUPPRESS=="
            for opt in parser.getgroup("microcot").options for name in opt.names()}


def test_the_plugin_uses_the_names_microcot_uses():
    shown = {name for name, visible in _plugin_options().items() if visible}
    microcot_names = {o for cmd in COMMANDS.values() for o in _visible(cmd)}
    # --board-timeout alone differs: pytest-timeout owns --timeout, for the same kind of limit
    assert shown - {"--board-timeout"} <= microcot_names, shown - microcot_names
    assert {"--port", "--board", "--heap", "--runtime"} <= shown
    test_cmd = _visible(COMMANDS[("test",)])
    assert {"--port", "--board", "--heap", "--runtime"} <= test_cmd


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_x="def test_a():\n    pass\n")
    return pytester


def _collect(suite: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    # --collect-only: the options are read, no board is opened
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p",
                           "no:cacheprovider", *args], cwd=suite.path, capture_output=True,
                          text=True, timeout=120)


def test_the_plugins_old_spellings_warn_and_still_mean_the_same(suite):
    r = _collect(suite, "--board", "/dev/ttyNOTHERE", "--board-name", "esp32-generic")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "microcot board: /dev/ttyNOTHERE, board file esp32-generic" in r.stdout
    assert "--board /dev/ttyNOTHERE (a port) is deprecated" in r.stdout
    assert "use --port /dev/ttyNOTHERE" in r.stdout
    assert "--board-name is deprecated" in r.stdout
    r = _collect(suite, "--port", "/dev/ttyNOTHERE", "--board", "rp2-pico-w")
    assert "microcot board: /dev/ttyNOTHERE, board file rp2-pico-w" in r.stdout
    assert "deprecated" not in r.stdout
    # a board file alone says where is missing, instead of treating the name as a port
    r = _collect(suite, "--board", "esp32-generic")
    assert r.returncode != 0 and "--port PORT|virtual" in r.stderr
