"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing page or
anchor fails), and its reference pages are generated from the code, not copied."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from microcot_host.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    # mkdocs is the project's `docs` extra, which `make setup` installs: missing is a failure
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # no -q: it raises the log level past WARNING, and --strict then counts no warnings at all
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=110)


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    # every command, as click knows it
    for name in main.list_commands(click.Context(main)):
        assert f"microcot {name}" in cli, name
    assert "microcot ca fetch" in cli and "microcot emulator board-config" in cli
    assert "--data-dir" in cli
    # the settings: every key of `microcot config keys`
    conf = (site / "reference" / "config" / "index.html").read_text()
    keys = json.loads(CliRunner().invoke(main, ["config", "keys", "--json"]).stdout)
    for k in keys:
        assert f"<code>{k['key']}</code>" in conf, k["key"]
    rest = (site / "reference" / "emulator-rest" / "index.html").read_text()
    assert "/inventory/managedObjects" in rest and "/devicecontrol/operations" in rest
    for page in ("getting-started/esp32", "getting-started/pico-w", "getting-started/emulator",
                 "getting-started/cloud-of-things", "agent"):
        assert (site / page / "index.html").is_file(), page


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    (copy / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "mkdocs_hooks.py", copy / "tools")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the missing page](nowhere.md).\n")
    r = _build(copy, tmp_path / "site")
    assert r.returncode != 0 and "nowhere.md" in r.stdout + r.stderr


def test_the_readme_is_the_two_commands_and_a_tour():
    readme = (ROOT / "README.md").read_text()
    first = readme.split("\n## ", 1)[0]
    assert "make demo" in first and "make test" in first  # the two commands stay first
    # short: the rest lives in the docs, each guide linked from the README
    assert len(readme.splitlines()) < 100
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rel = page.relative_to(ROOT).as_posix()
        if rel.startswith("docs/guides/") or rel.startswith("docs/getting-started/"):
            assert f"]({rel})" in readme, rel
    assert "mkdocs" in readme


def _tour() -> list[list[str]]:
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## A short tour", 1)[1].split("```", 2)[1]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines()
            if line.startswith("microcot ")]


def test_the_tours_commands_are_what_the_cli_takes():
    """Each command of the README's tour names a command and options that exist (parsed by click,
    nothing run), so the tour cannot drift from the CLI."""
    tour = _tour()
    assert len(tour) >= 6
    for argv in tour:
        cmd: click.Command = main
        # the group's settings (-h): click caches each command's help option from its first context
        ctx = click.Context(main, info_name="microcot", **main.context_settings)
        rest = list(argv)
        while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
            name = rest.pop(0)
            sub = cmd.get_command(ctx, name)
            assert sub is not None, (argv, name)
            cmd, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
        try:
            cmd.make_context(cmd.name, rest, parent=ctx.parent)
        except click.exceptions.UsageError as e:
            # a file the tour names need not exist here; every other complaint is the tour's fault
            assert "does not exist" in str(e), (argv, str(e))
