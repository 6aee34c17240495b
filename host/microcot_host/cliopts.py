"""Option names shared by every `microcot` command, and old spellings kept for one release.

One name per concept (tests/host/test_cli_names.py checks every command against these):
`--port` is where a board is (a path, auto, a glob, a list, virtual:NAME), `--board` is a board
file, `--data-dir` is a data directory, `--timeout` is how long a command waits (BOARD_TIMEOUT
unless waiting includes something slower), `--json` is the machine-readable output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

# how long a command waits for a board (its raw REPL, an answer) or a server by default; the
# exceptions wait for something slower and say so in their help (a board rebooting after
# `flash`, one whole step of `demo`)
BOARD_TIMEOUT = 10.0

F = TypeVar("F", bound=Callable[..., Any])

# every command's own context settings carry -h: click caches a command's help option from the
# first context that asks, so a command invoked on its own (tests, embedding) before through
# `microcot` would otherwise answer only --help from then on
HELP: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def warn_renamed(old: str, new: str) -> None:
    click.echo(f"microcot: {old} is deprecated and will be removed; use {new}", err=True)


class RenamedOption(click.Option):
    """An option that also accepts old spellings: not shown in --help, a warning when used.

    Each old spelling goes to the parser under a destination of its own, so that
    handle_parse_result() knows which one was typed and can name it in the warning.
    """

    def __init__(self, *args: Any, old_names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_names = tuple(old_names)

    def _old_dest(self, i: int) -> str:
        return f"{self.name}__old{i}"

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        saved = self.opts, self.secondary_opts, self.name
        try:
            for i, old in enumerate(self.old_names):
                # the same action, nargs and flag value as the option itself, another name
                self.opts, self.secondary_opts, self.name = [old], [], self._old_dest(i)
                super().add_to_parser(parser, ctx)
        finally:
            self.opts, self.secondary_opts, self.name = saved

    def handle_parse_result(self, ctx: click.Context, opts: dict[str, Any],
                            args: list[str]) -> tuple[Any, list[str]]:
        for i, old in enumerate(self.old_names):
            key = self._old_dest(i)
            if key not in opts:
                continue
            value = opts.pop(key)
            warn_renamed(old, self.opts[0])
            assert self.name is not None
            if self.name not in opts:
                opts[self.name] = value
            elif self.multiple:
                opts[self.name] = [*opts[self.name], *value]
        return super().handle_parse_result(ctx, opts, args)


def option(*names: str, old: Sequence[str] = (), **kwargs: Any) -> Callable[[F], F]:
    """click.option() that also takes the `old` spellings (hidden, deprecated)."""
    return click.option(*names, cls=RenamedOption, old_names=old, **kwargs)


def timeout_option(default: float = BOARD_TIMEOUT, help: str = "how long to wait for a board",
                   old: Sequence[str] = (), dest: str = "timeout") -> Callable[[F], F]:
    """`--timeout SECONDS`, the one name every command uses for how long it waits."""
    return option("--timeout", dest, type=float, default=default, show_default=True,
                  metavar="SECONDS", old=old, help=help)
