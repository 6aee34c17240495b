"""The `microcot` command line. Subcommands live in their own modules and are imported lazily."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command or group
_COMMANDS = {
    "app": "microcot_host.appbundle:app",
    "board": "microcot_host.vboard.cli:board",
    "config": "microcot_host.config:config",
    "boards": "microcot_host.boards_cli:boards",
    "ca": "microcot_host.cafetch:ca",
    "demo": "microcot_host.demo:demo",
    "deploy": "microcot_host.deploy:deploy_command",
    "emulator": "microcot_host.emulator.cli:emulator",
    "flash": "microcot_host.flash.cli:flash",
    "kics-emulator": "microcot_host.kics_emulator:kics_emulator",
    "provision": "microcot_host.provision_cli:provision",
    "test": "microcot_host.hil:test_command",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            # one broken or missing optional piece must not take the whole CLI down
            click.echo(f"microcot: command {name!r} unavailable: {exc}", err=True)
            return None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="microcot")
def main() -> None:
    """microcot: firmware and host tools for Cloud of Things devices on MicroPython."""


if __name__ == "__main__":
    main()
