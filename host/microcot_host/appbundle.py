"""`microcot app bundle`: an application bundle for c8y_SoftwareUpdate.

A bundle is an uncompressed ustar tar of the application's files (main.py, its modules,
templates.csv, data files), each under its base name: the device (microcot/apptar.py,
appswitch.py) unpacks it into the board's root, switches to it atomically and rolls back if the
new application does not connect. The names are checked here with the device's own rules
(apptar.check_name), so a bundle this command makes is one the device accepts. `--version V`
adds `appversion.txt` holding V, for the application to read. The tar is reproducible: mode
0644, owner 0, time 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import click

from microcot import apptar

from .cliopts import HELP

VERSION_FILE = "appversion.txt"


class BundleError(ValueError):
    pass


def make_bundle(files: list[tuple[str, bytes]]) -> bytes:
    """The tar of (name, content) pairs, checked with the device's rules."""
    if not files:
        raise BundleError("a bundle needs at least one file")
    if len(files) > apptar.MAX_FILES:
        raise BundleError(f"{len(files)} files: a bundle holds at most {apptar.MAX_FILES}")
    seen: set[str] = set()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            why = apptar.check_name(name)
            if why is not None:
                raise BundleError(why)
            if name in seen:
                raise BundleError(f"file {name}: twice in the bundle")
            seen.add(name)
            if len(data) > apptar.MAX_FILE:
                raise BundleError(f"file {name}: {len(data)} bytes, at most "
                                  f"{apptar.MAX_FILE} per file")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    data = out.getvalue()
    if len(data) > apptar.MAX_BUNDLE:
        raise BundleError(f"the bundle has {len(data)} bytes, at most {apptar.MAX_BUNDLE}")
    return data


@click.group(context_settings=HELP)
def app() -> None:
    """Application bundles for c8y_SoftwareUpdate."""


@app.command("bundle")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the bundle to write (a tar)")
@click.option("--version", "version", help=f"the application's version, also put into "
              f"{VERSION_FILE}")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def bundle_command(paths: tuple[Path, ...], output: Path, version: str | None,
                   as_json: bool) -> None:
    """Bundle PATHS (each under its file name at the board's root) into a tar for
    c8y_SoftwareUpdate: upload it as a binary and give its URL (and the SHA-256 printed here)
    in the operation's entry with action "install"."""
    files = [(p.name, p.read_bytes()) for p in paths]
    if version is not None:
        files.append((VERSION_FILE, version.encode()))
    try:
        data = make_bundle(files)
    except BundleError as e:
        raise click.ClickException(str(e)) from None
    output.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    result = {"bundle": str(output), "bytes": len(data), "sha256": sha,
              "files": [n for n, _ in files], "version": version}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{output}: {len(data)} bytes, {len(files)} files ({' '.join(result['files'])})")
    click.echo(f"sha256 {sha}")
