"""MkDocs hook: the reference pages, generated at build time from the code they describe.

Nothing here is copied by hand, so the pages cannot drift from what the tools do:
- reference/cli.md: every `microcot` command's help, from the click commands themselves;
- reference/config.md: the keys of /microcot.json, from `microcot config keys --json`;
- reference/emulator-rest.md: the emulator's REST coverage, from its API module's docstring.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import click
from click.testing import CliRunner
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

# wide enough that option help is not wrapped into a column of a few words
HELP_WIDTH = 100


def _commands(cmd: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command,
                                                                         click.Context]]:
    yield cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None:
                raise RuntimeError(f"{ctx.command_path} {name} does not load")
            if not sub.hidden:
                yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx,
                                                        max_content_width=HELP_WIDTH,
                                                        terminal_width=HELP_WIDTH))


def cli_page() -> str:
    from microcot_host import cli

    # the group's own settings (-h besides --help), which its subcommands' contexts inherit
    root = click.Context(cli.main, info_name="microcot", max_content_width=HELP_WIDTH,
                         terminal_width=HELP_WIDTH, **cli.main.context_settings)
    out = ["# Command line reference", "",
           "Every `microcot` command with its `--help` text, generated from the commands when "
           "these pages are built. The [conventions](conventions.md) say which option means what "
           "across all of them.", ""]
    for cmd, ctx in _commands(cli.main, root):
        out += [f"## {ctx.command_path}", "", "```text", cmd.get_help(ctx), "```", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_page() -> str:
    from microcot_host.config import config

    r = CliRunner().invoke(config, ["keys", "--json"])
    if r.exit_code != 0:
        raise RuntimeError(f"microcot config keys --json failed: {r.output}")
    rows = json.loads(r.stdout)
    out = ["# Configuration reference: `/microcot.json`", "",
           "The agent reads its settings from `/microcot.json` on the board. Write one with "
           "`microcot config new`, check one with `microcot config check FILE`, put it on a "
           "board with `microcot deploy --config FILE`. Defaults are the firmware's own. Secret "
           "values are never taken from the command line and never printed. This table is "
           "generated from `microcot config keys --json`.", "",
           "| key | type | default | secret | meaning |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        out.append(f"| `{row['key']}` | {row['type']} | `{_cell(json.dumps(row['default']))}` "
                   f"| {'yes' if row['secret'] else ''} | {_cell(row['doc'])} |")
    return "\n".join(out) + "\n"


def rest_page() -> str:
    from microcot_host.emulator import api

    doc = (api.__doc__ or "").strip()
    if "| resource" not in doc:
        raise RuntimeError("the emulator API module's docstring lost its resource table")
    return ("# Emulator REST coverage\n\nWhat `microcot emulator` serves of Cumulocity's REST "
            "API, taken from the documentation of its API module "
            "(`microcot_host/emulator/api.py`) when these pages are built.\n\n" + doc + "\n")


GENERATED = {
    "reference/cli.md": cli_page,
    "reference/config.md": config_page,
    "reference/emulator-rest.md": rest_page,
}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for uri, make in GENERATED.items():
        files.append(File.generated(config, uri, content=make()))
    return files
