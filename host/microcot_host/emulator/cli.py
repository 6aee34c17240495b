"""`microcot emulator`: run the platform emulator, or talk to a running one through its REST API.

    microcot emulator [--data-dir DIR] [--mqtt-port P] [--http-port P] [--https-port P]
                      [--max-binary MIB] [--auto-accept] [--bind ADDR] [--host NAME ...]
                      [--workers N] [--database postgresql://...]
    microcot emulator board-config [--out F] what a real board needs (host, port, CA, user)
    microcot emulator accept ID             accept a device's bootstrap request
    microcot emulator register fleet.csv    bulk registration (seed 002's CSV)
    microcot emulator devices               devices and new device requests
    microcot emulator operations create MO '{"c8y_Restart": {}}'
    microcot emulator operations list [--device MO] [--status PENDING]

The subcommands read `<data>/connection.json` (written by the running emulator) for the REST URL
and the admin's credentials; `--data-dir` defaults to `<state dir>/emulator` (paths.state_dir()).

Passwords are never printed: the start banner masks them and names connection.json (owner-only)
as the place to read them, following the project's rule that secrets are not printed or logged.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click

from .. import cliopts, paths

MASK = "********"
DATABASE_ENV = "MICROCOT_EMULATOR_DATABASE"


def default_data() -> Path:
    return paths.state_dir() / "emulator"


def _data_option(f: Any) -> Any:
    return cliopts.option("--data-dir", "data", type=click.Path(file_okay=False, path_type=Path),
                          default=None, old=("--data",), help="The emulator's data directory "
                          "(default: the parent command's --data-dir, else <state "
                          "dir>/emulator).")(f)


def _resolve_data(ctx: click.Context, data: Path | None) -> Path:
    if data is not None:
        return data
    parent = (ctx.obj or {}).get("data")
    return parent if parent is not None else default_data()


@click.group(invoke_without_command=True, context_settings=cliopts.HELP)
@cliopts.option("--data-dir", "data", type=click.Path(file_okay=False, path_type=Path),
                default=None, old=("--data",),
                help="Data directory: SQLite platform data, broker state, TLS files, "
                     "connection.json (default: <state dir>/emulator).")
@click.option("--mqtt-port", type=click.IntRange(0, 65535), default=0,
              help="MQTT/TLS port (0: the last run's if free, else a free one).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=0,
              help="REST API port (0: the last run's if free, else a free one).")
@click.option("--https-port", type=click.IntRange(0, 65535), default=0,
              help="REST API port over TLS (0: the last run's if free, else a free one).")
@click.option("--max-binary", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Largest file /inventory/binaries accepts, in MiB.")
@click.option("--auto-accept", is_flag=True,
              help="Accept every bootstrap request at once.")
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address the broker and the REST API listen on (0.0.0.0: every IPv4 "
                   "address, for real boards on the network).")
@click.option("--host", "names", multiple=True, metavar="NAME",
              help="Host name or address boards use to reach this machine (repeatable): the "
                   "server certificate carries each, and the first goes to connection.json.")
@click.option("--workers", "worker_processes", type=click.IntRange(1, 64), default=1,
              show_default=True, metavar="N",
              help="Processes that serve the devices' SmartREST messages, the devices "
                   "partitioned between them (docs: emulator-scaling); 1 serves them in this "
                   "process.")
@click.option("--database", metavar="URL", envvar=DATABASE_ENV, default=None,
              help="The platform's data in PostgreSQL (postgresql://USER@HOST/DB; the password "
                   f"best in ~/.pgpass) instead of SQLite in the data directory (env "
                   f"{DATABASE_ENV}; docs: emulator-scaling).")
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.pass_context
def emulator(ctx: click.Context, data: Path | None, mqtt_port: int, http_port: int,
             https_port: int, max_binary: int, auto_accept: bool, bind: str,
             names: tuple[str, ...], worker_processes: int, database: str | None,
             verbose: bool) -> None:
    """The Cloud of Things platform emulator: Mosquitto with TLS, the SmartREST connector and
    the REST API. Without a subcommand it runs until Ctrl-C or SIGTERM."""
    ctx.obj = {"data": data}
    if ctx.invoked_subcommand is not None:
        return
    _run(data or default_data(), mqtt_port, http_port, auto_accept, verbose, https_port,
         max_binary, bind, names, worker_processes, database or None)


def _run(data: Path, mqtt_port: int, http_port: int, auto_accept: bool, verbose: bool,
         https_port: int = 0, max_binary: int = 64, bind: str = "127.0.0.1",
         names: tuple[str, ...] = (), worker_processes: int = 1,
         database: str | None = None) -> None:
    from .broker import BrokerError
    from .connector import ConnectorError
    from .service import Emulator, EmulatorError
    from .workers import WorkerError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        emu = Emulator(data.resolve(), mqtt_port=mqtt_port, http_port=http_port,
                       auto_accept=auto_accept, https_port=https_port,
                       max_binary=max_binary << 20, host=bind, names=names,
                       worker_processes=worker_processes, database_url=database)
        emu.start()
    except (BrokerError, ConnectorError, EmulatorError, WorkerError, OSError) as e:
        raise click.ClickException(f"the emulator could not start: {e}") from None
    try:
        c = emu.connection
        click.echo("\n".join([
            "microcot platform emulator",
            f"  data        {emu.data_dir}",
            f"  database    {emu.database}",
            f"  MQTT        {c['mqtt_host']}:{c['mqtt_port']} (TLS; devices trust the CA "
            f"{c['ca_cert']})",
            f"  REST API    {c['http_url']} (admin user {c['admin_user']!r}, password {MASK})",
            f"  REST HTTPS  {c['https_url']} (the same CA as MQTT)",
            f"  bootstrap   user {c['bootstrap_user']!r}, password {MASK}",
            f"  passwords   in {emu.connection_file} (owner-only)",
            f"  acceptance  {'automatic' if auto_accept else 'microcot emulator accept ID'}",
            f"  SmartREST   {_workers_line(emu)}",
            f"  listening   on {bind}; the certificate names {', '.join(emu.cert_names())}",
            "  a board     microcot emulator board-config (what to put into /microcot.json)",
            "Running; stop with Ctrl-C.",
        ]), nl=True)
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
    click.echo("emulator stopped")


def _workers_line(emu: Any) -> str:
    pool = emu.pool
    if pool is None:
        return "served in this process"
    pids = ", ".join(str(p) for p in pool.pids())
    return f"{pool.count} worker processes (pids {pids})"


# -- REST client for the subcommands --------------------------------------------------------------

class _Rest:
    def __init__(self, data: Path) -> None:
        path = data / "connection.json"
        try:
            conn = json.loads(path.read_text())
            self.url = str(conn["http_url"]).rstrip("/")
            user, password = conn["admin_user"], conn["admin_password"]
        except FileNotFoundError:
            raise click.ClickException(
                f"no emulator in {data} ({path.name} is missing): start one with "
                f"`microcot emulator --data-dir {data}`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise click.ClickException(f"{path} is unreadable: {e}") from None
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Accept", "application/json")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise click.ClickException(f"the emulator at {self.url} does not answer ({reason}); "
                                       "is it running?") from None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.call(method, path, None if body is None else json.dumps(body).encode())


def _fail(what: str, status: int, body: Any) -> click.ClickException:
    message = body.get("message") if isinstance(body, dict) else None
    return click.ClickException(f"{what}: {status} {message or ''}".rstrip())


@emulator.command("board-config")
@_data_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the settings with the bootstrap password and the CA's PEM into this "
                   "file (owner-only), ready for /microcot.json; nothing secret is printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON (masked).")
@click.pass_context
def board_config(ctx: click.Context, data: Path | None, out: Path | None, as_json: bool) -> None:
    """What a real board needs to reach this emulator: broker host and port, the CA to trust,
    the bootstrap user (its password masked here; with --out, written owner-only)."""
    from ..files import write_private

    folder = _resolve_data(ctx, data)
    path = folder / "connection.json"
    try:
        conn = json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"no emulator in {folder} ({path.name} is missing): start "
                                   f"one with `microcot emulator --data-dir {folder}`") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is unreadable: {e}") from None
    settings = {"host": conn["mqtt_host"], "port": conn["mqtt_port"], "tls": True,
                "ca": conn["ca_cert"], "bootstrap_user": conn["bootstrap_user"],
                "bootstrap_password": MASK}
    if out is not None:
        full = dict(settings, bootstrap_password=conn["bootstrap_password"],
                    ca=Path(conn["ca_cert"]).read_text())
        write_private(out, json.dumps(full, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(settings, indent=2))
        return
    click.echo("\n".join([
        f"  host                {settings['host']} (the server certificate names it)",
        f"  port                {settings['port']} (MQTT over TLS)",
        f"  ca                  {settings['ca']} (copy it to the board, or its PEM into "
        "/microcot.json)",
        f"  bootstrap_user      {settings['bootstrap_user']}",
        f"  bootstrap_password  {MASK} (in {path}, owner-only)",
    ] + ([f"written to {out} (owner-only), with the password and the CA's PEM"] if out else [])))


@emulator.command()
@click.argument("device_id")
@_data_option
@click.pass_context
def accept(ctx: click.Context, device_id: str, data: Path | None) -> None:
    """Accept the bootstrap request of DEVICE_ID: the emulator issues its credentials."""
    api = _Rest(_resolve_data(ctx, data))
    status, body = api.json("PUT", "/devicecontrol/newDeviceRequests/" + quote(device_id, safe=""),
                            {"status": "ACCEPTED"})
    if status == 404:
        raise click.ClickException(f"no request of {device_id}: the device has not published "
                                   "its secret yet")
    if status != 200:
        raise _fail(f"accepting {device_id} failed", status, body)
    click.echo(f"accepted {device_id}: its password goes out encrypted on sr/{device_id}")


@emulator.command()
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_data_option
@click.pass_context
def register(ctx: click.Context, csv_file: Path, data: Path | None) -> None:
    """Bulk-register the devices of CSV_FILE (seed 002: ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL).
    Exits with 1 when a row failed."""
    api = _Rest(_resolve_data(ctx, data))
    boundary = "microcot-" + base64.b32encode(os.urandom(10)).decode()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{csv_file.name}\"\r\nContent-Type: text/csv\r\n\r\n").encode()
    body += csv_file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, r = api.call("POST", "/devicecontrol/bulkNewDeviceRequests", body,
                         f"multipart/form-data; boundary={boundary}")
    if status != 201 or not isinstance(r, dict):
        raise _fail(f"registering {csv_file} failed", status, r)
    updated = len(r.get("credentialUpdatedList") or [])
    click.echo(f"{r['numberOfAll']} rows: {r['numberOfCreated']} created, {updated} updated, "
               f"{r['numberOfFailed']} failed")
    for f in r.get("failedCreationList") or []:
        who = f" ({f['deviceId']})" if f.get("deviceId") else ""
        click.echo(f"  line {f.get('line')}{who}: {f.get('failureReason')}")
    if r["numberOfFailed"]:
        raise SystemExit(1)


@emulator.command()
@_data_option
@click.option("--json", "as_json", is_flag=True, help="print the lists as JSON")
@click.pass_context
def devices(ctx: click.Context, data: Path | None, as_json: bool) -> None:
    """List the devices (managed objects with c8y_IsDevice) and the new device requests."""
    api = _Rest(_resolve_data(ctx, data))
    status, mos = api.json("GET", "/inventory/managedObjects?fragmentType=c8y_IsDevice"
                                  "&pageSize=2000")
    if status != 200:
        raise _fail("listing devices failed", status, mos)
    status, reqs = api.json("GET", "/devicecontrol/newDeviceRequests?pageSize=2000")
    if status != 200:
        raise _fail("listing requests failed", status, reqs)
    if as_json:
        click.echo(json.dumps({"devices": [
            {k: m.get(k) for k in ("id", "name", "type", "owner", "c8y_Availability")}
            for m in mos["managedObjects"]],
            "requests": [{"id": r["id"], "status": r["status"]}
                         for r in reqs["newDeviceRequests"]]}, indent=2))
        return
    click.echo("devices (managed object id, name, type, owner):")
    for m in mos["managedObjects"]:
        click.echo(f"  {m['id']:>8}  {m.get('name', '')}  {m.get('type', '')}  "
                   f"{m.get('owner', '')}")
    click.echo("new device requests (id, status):")
    for r in reqs["newDeviceRequests"]:
        click.echo(f"  {r['id']}  {r['status']}")


@emulator.group()
def operations() -> None:
    """Create and list operations."""


@operations.command("create")
@click.argument("device_mo_id")
@click.argument("fragment")
@_data_option
@click.pass_context
def operations_create(ctx: click.Context, device_mo_id: str, fragment: str,
                      data: Path | None) -> None:
    """Create an operation for DEVICE_MO_ID; FRAGMENT is JSON, e.g. '{"c8y_Restart": {}}'."""
    try:
        frag = json.loads(fragment)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="FRAGMENT") from None
    if not isinstance(frag, dict):
        raise click.BadParameter("must be a JSON object", param_hint="FRAGMENT")
    api = _Rest(_resolve_data(ctx, data))
    status, op = api.json("POST", "/devicecontrol/operations", {**frag, "deviceId": device_mo_id})
    if status != 201:
        raise _fail("creating the operation failed", status, op)
    click.echo(f"operation {op['id']} for {device_mo_id}: {op['status']}")


@operations.command("list")
@click.option("--device", "device_mo_id", help="Only this device (and its child devices).")
@click.option("--status", help="PENDING, EXECUTING, SUCCESSFUL or FAILED (comma list).")
@_data_option
@click.pass_context
def operations_list(ctx: click.Context, device_mo_id: str | None, status: str | None,
                    data: Path | None) -> None:
    """List operations, oldest first."""
    api = _Rest(_resolve_data(ctx, data))
    q = {"pageSize": "2000"}
    if device_mo_id:
        q["agentId"] = device_mo_id
    if status:
        q["status"] = status
    code, body = api.json("GET", "/devicecontrol/operations?" + urlencode(q))
    if code != 200:
        raise _fail("listing operations failed", code, body)
    for op in body["operations"]:
        frags = [k for k in op if k.startswith("c8y_")]
        click.echo(f"  {op['id']:>8}  {op['deviceId']:>8}  {op['status']:<10}  "
                   f"{','.join(frags)}")
