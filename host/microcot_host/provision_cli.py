"""The `microcot provision` command group (the work is in provision.py and provision_ledger.py).

    microcot provision --port PORT... [--csv IN] [--out fleet.csv] [--name-template T]
                       [--shell 0|1] [--rotate] [--reassign] [--ledger PATH|URL]
    microcot provision csv validate FILE [--json]
    microcot provision export --out FILE [--ledger PATH|URL]
    microcot provision status [--ledger PATH|URL] [--json]

--ledger (or MICROCOT_LEDGER) is a SQLite file, or a `postgresql://` URL that several stations
share (provision_ledger_pg.py).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click

from . import cliopts, fleetcsv, ports
from .cliopts import HELP, F
from .provision import DEFAULT_NAME, MASK

_LEDGER_HELP = ("provisioning ledger: a SQLite file (the vault and the key live beside it), or "
                "a postgresql:// URL that several stations share (env MICROCOT_LEDGER) "
                "[default: <state dir>/provisioning.db]")
_KEY_HELP = ("the key that encrypts the vault and keys the ledger's hashes; every station of a "
             "shared ledger needs a copy [default: beside a ledger file, <name>.key; "
             "<state dir>/provisioning.key for a URL]")
LEDGER_ENV = "MICROCOT_LEDGER"


class LedgerLocation(click.ParamType):
    """A ledger file (a Path) or a PostgreSQL URL (kept as text)."""

    name = "PATH|URL"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> Path | str:
        from .provision_ledger import is_url

        if isinstance(value, Path) or not is_url(str(value)):
            path = Path(str(value))
            if path.is_dir():
                self.fail(f"{path} is a directory, not a ledger file", param, ctx)
            return path
        return str(value)


def ledger_option() -> Callable[[F], F]:
    """`--ledger PATH|URL` (MICROCOT_LEDGER), the same on provision, export and status."""
    return click.option("--ledger", type=LedgerLocation(), envvar=LEDGER_ENV,
                        help=_LEDGER_HELP)


@click.group("provision", invoke_without_command=True, context_settings=HELP)
@ports.port_option()
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="mass-registration CSV (ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL) with rows for "
                   "some or all boards, matched by ICCID, else by ID")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="write the CSV for the bulk registration here (owner-only)")
@click.option("--name-template", default=None, metavar="TEMPLATE",
              help=f"NAME of devices without a CSV row: {{id}}, {{serial}}, {{source}} "
                   f"[default: as recorded in the ledger, for new devices {DEFAULT_NAME!r}]")
@click.option("--shell", type=click.Choice(["0", "1"]), default=None,
              help="SHELL of devices without a CSV row, 1: operations are sent to the device "
                   "[default: as recorded, for new devices 0]")
@click.option("--rotate", is_flag=True,
              help="issue new passwords, even where the board or the CSV has one")
@click.option("--reassign", is_flag=True,
              help="give a device ID that the ledger records on another board to this one (a "
                   "replaced board; the old one must not connect any more)")
@ledger_option()
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), help=_KEY_HELP)
@click.option("--board", "-b", "board_name", default=None,
              help="board file for deploying microcot where it is missing (default: guessed)")
@click.option("--no-deploy", is_flag=True, help="fail boards without microcot, do not deploy")
@click.option("--allow-weak", is_flag=True, help="accept weak passwords from --csv")
@cliopts.timeout_option(help="how long to wait for a board's raw REPL")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.pass_context
def provision(ctx: click.Context, port_specs: tuple[str, ...], csv_path: Path | None,
              out: Path | None, name_template: str | None, shell: str | None, rotate: bool,
              reassign: bool, ledger: Path | str | None, key_file: Path | None,
              board_name: str | None,
              no_deploy: bool, allow_weak: bool, timeout: float, as_json: bool) -> None:
    """Give every connected board its device ID's credentials and write the CSV for the bulk
    registration.

    Each board (in parallel) tells its device ID (ICCID from the modem, else the MAC), gets the
    password of its --csv row, or the one it was given before, or a new random one (--rotate:
    always a new one), holds it in its store ("cred") and proves it by a hash. A ledger records
    every step, so re-running changes nothing and an interrupted run is resumed. Passwords are
    never printed.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .provision import Options, Provisioner, ProvisionError, check_template, csv_rows, write_csv
    from .provision_ledger import Books, LedgerError

    try:
        check_template(name_template or DEFAULT_NAME)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name-template") from None
    source = _load_source(csv_path, allow_weak) if csv_path else None
    if out is not None and not out.parent.is_dir():  # found out now, not after the boards
        raise click.BadParameter(f"{out.parent} is not a directory", param_hint="--out")
    port_list = ports.resolve_for_click(port_specs)
    opts = Options(name_template=name_template, shell=shell, rotate=rotate,
                   deploy=not no_deploy, board=board_name, timeout=timeout, reassign=reassign)
    try:
        books = Books(ledger, key_file)
    except (LedgerError, OSError) as exc:
        raise click.ClickException(f"ledger: {exc}") from None
    with books, _Lines(port_list, quiet=as_json) as lines:
        outcomes = Provisioner(books, source, opts, lines.update).run(port_list)
    rows = csv_rows(outcomes)
    if out is not None and rows:
        try:
            write_csv(rows, out, check_weak=not allow_weak)
        except (ProvisionError, OSError) as exc:
            raise click.ClickException(f"{out}: {exc}") from None
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        click.echo(json.dumps({"boards": [o.as_dict() for o in outcomes],
                               "out": str(out) if out and rows else None, "rows": len(rows),
                               "ledger": books.where}, indent=2))
    else:
        _print_outcomes(outcomes)
        if out is not None:
            click.echo(f"{out}: {len(rows)} row(s) for the bulk registration (owner-only)"
                       if rows else f"{out}: not written, no board was provisioned")
    if failed:
        names = "; ".join(f"{o.port}" + (f" ({o.device_id})" if o.device_id else "")
                          + f": {o.detail}" for o in failed)
        raise click.ClickException(f"{len(failed)} of {len(outcomes)} board(s) failed: {names}")


def _existing_books(ledger: Path | str | None, key_file: Path | None):
    """The books of earlier runs; an error instead of new empty files (and a new key)."""
    from .provision_ledger import Books

    return Books(ledger, key_file, create=False)


def _load_source(path: Path, allow_weak: bool) -> fleetcsv.FleetCsv:
    parsed = fleetcsv.parse(path.read_bytes(), check_weak=True)
    blocking = [p for p in parsed.problems
                if not (allow_weak and p.code == "weak-credentials")]
    if blocking:
        shown = "\n".join(f"  {path}: {fleetcsv.describe(p)}" for p in blocking[:20])
        more = f"\n  ... and {len(blocking) - 20} more" if len(blocking) > 20 else ""
        hint = " (weak passwords: --allow-weak)" if any(
            p.code == "weak-credentials" for p in blocking) else ""
        raise click.ClickException(f"--csv {path}: {len(blocking)} problem(s){hint}; see "
                                   f"`microcot provision csv validate`:\n{shown}{more}")
    return parsed


class _Lines:
    """A progress line per board: live on a terminal, one line per step otherwise (CI logs)."""

    def __init__(self, port_list: list[str], quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty() and not quiet
        self._lock = threading.Lock()
        self._ports = port_list
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> _Lines:
        if self.live:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      TimeElapsedColumn(), console=Console(stderr=True))
            self._progress.start()
            width = max(len(p) for p in self._ports) if self._ports else 0
            for p in self._ports:
                self._tasks[p] = self._progress.add_task(f"{p:<{width}}  waiting", total=None)
        return self

    def update(self, port: str, what: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._progress is not None and port in self._tasks:
                width = max(len(p) for p in self._ports)
                self._progress.update(self._tasks[port], description=f"{port:<{width}}  {what}")
            else:
                click.echo(f"{port}: {what}", err=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _print_outcomes(outcomes) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("Port", "Device ID", "Board serial", "Result", "Password", "Detail"):
        table.add_column(col, overflow="fold")
    style = {"written": "green", "confirmed": "green", "unchanged": "cyan", "updated": "cyan",
             "failed": "red"}
    for o in outcomes:
        dev = f"{o.device_id} ({o.id_source})" if o.device_id else "-"
        detail = o.detail + (" [microcot deployed]" if o.deployed else "")
        pw = f"{MASK} ({o.origin})" if o.row is not None else "-"
        table.add_row(o.port, dev, o.serial or "-", f"[{style.get(o.result, '')}]{o.result}[/]",
                      pw, detail)
    Console(width=None if sys.stdout.isatty() else 160, highlight=False).print(table)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    click.echo(", ".join(f"{n} {r}" for r, n in sorted(counts.items())))


# -- csv --------------------------------------------------------------------------------------

@provision.group("csv")
def csv_group() -> None:
    """Mass-registration CSV files (seed 002)."""


@csv_group.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the problems as JSON")
@click.pass_context
def validate(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Check FILE (ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL) and report every problem with its line
    and column: header, separator, missing values, TYPE, SHELL, duplicate ID or ICCID, the ICCID's
    Luhn digit, weak credentials. Exit code 1 when there is any problem. Passwords are never
    shown."""
    parsed = fleetcsv.parse(file.read_bytes(), check_weak=True)
    if as_json:
        click.echo(json.dumps({
            "file": str(file), "ok": parsed.ok, "rows": len(parsed.rows),
            "separator": parsed.separator,
            "problems": [{"line": p.line, "column": p.column, "position": p.position,
                          "code": p.code, "message": p.message} for p in parsed.problems]},
            indent=2))
    else:
        for p in parsed.problems:
            click.echo(f"{file}: {fleetcsv.describe(p)}")
        sep = {";": "';'", ",": "','", "\t": "tab"}.get(parsed.separator or "", "unknown")
        verdict = "OK" if parsed.ok else f"{len(parsed.problems)} problem(s)"
        click.echo(f"{file}: {len(parsed.rows)} device row(s), separator {sep}: {verdict}",
                   err=not parsed.ok)
    if not parsed.ok:
        ctx.exit(1)


# -- ledger ------------------------------------------------------------------------------------

@provision.command("export")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the CSV to write (owner-only)")
@ledger_option()
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), help=_KEY_HELP)
def export(out: Path, ledger: Path | str | None, key_file: Path | None) -> None:
    """Write the bulk-registration CSV of every verified device in the ledger (all runs)."""
    from .provision import ProvisionError, ledger_rows, write_csv
    from .provision_ledger import LedgerError

    try:
        with _existing_books(ledger, key_file) as books:
            rows = ledger_rows(books)
    except (LedgerError, OSError) as exc:
        raise click.ClickException(f"ledger: {exc}") from None
    if not rows:
        raise click.ClickException("the ledger has no verified device")
    try:
        # passwords the operator accepted with --allow-weak are not refused here
        write_csv(rows, out, check_weak=False)
    except (ProvisionError, OSError) as exc:
        raise click.ClickException(f"{out}: {exc}") from None
    click.echo(f"{out}: {len(rows)} row(s) (owner-only)")


@provision.command("status")
@ledger_option()
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), help=_KEY_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the ledger as JSON")
def status(ledger: Path | str | None, key_file: Path | None, as_json: bool) -> None:
    """The ledger: every device's board, port, status and last error (no passwords)."""
    from dataclasses import asdict

    from .provision_ledger import LedgerError

    try:
        with _existing_books(ledger, key_file) as books:
            recs = books.ledger.all()
            where = books.where
    except (LedgerError, OSError) as exc:
        raise click.ClickException(f"ledger: {exc}") from None
    if as_json:
        click.echo(json.dumps([asdict(r) for r in recs], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(where))
    for col in ("Device ID", "External ID", "Name", "Board serial", "Port", "Status",
                "Gen", "Updated", "Error"):
        table.add_column(col, overflow="fold")
    for r in recs:
        table.add_row(r.device_id, r.external_id, r.name, r.board_serial or "-", r.port or "-",
                      r.status, str(r.generation), r.updated_at, r.error or "")
    Console(width=None if sys.stdout.isatty() else 160, highlight=False).print(table)
