"""Serving a board from the command line until Ctrl-C or SIGTERM: `microcot board virtual` and
`microcot board rp2` alike (start, announce, port file, run registry, clean stop)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import click


class Served(Protocol):
    """What VirtualBoard and the emulated RP2040 both offer (models.make_board returns one)."""

    name: str

    @property
    def port(self) -> str: ...

    @property
    def modem_path(self) -> str | None: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...


def serve(board: Served, *, port_file: Path | None, start_errors: tuple[type[Exception], ...],
          announce: Callable[[], dict[str, Any]], why_stopped: Callable[[], str]) -> None:
    """Start `board`, let `announce()` print what it is (it returns the fields of its registry
    entry), publish its port, and keep it until a signal; then stop it and clean up."""
    stop = threading.Event()
    registry: Path | None = None

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        try:
            board.start()
        except start_errors as exc:
            raise click.ClickException(str(exc)) from None
        entry = announce()
        # registered before the port file appears: a script that waits for the file finds the
        # board in `microcot boards` too
        registry = register(board.name, board.port, entry)
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(board.port + "\n")
            os.replace(tmp, port_file)  # a watcher never reads half a path
        click.echo("Ctrl-C stops the board.")
        while not stop.wait(0.5):
            if not board.running:
                raise click.ClickException(why_stopped())
    finally:
        if registry is not None:
            unregister(registry)
        board.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if port_file is not None:
            with contextlib.suppress(OSError):
                port_file.unlink()


def register(name: str, port: str, fields: dict[str, Any]) -> Path:
    """Announce the board where `microcot boards` and `--port auto|virtual:NAME` look
    (ports.list_virtual). Only boards served from the command line register: boards of tests and
    `microcot test` would make `auto` ambiguous for a developer with one board on the desk."""
    from ..files import write_private
    from ..ports import run_dir

    path = run_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"name": name, "pid": os.getpid(), "port": port, **fields, "started": time.time()}
    write_private(path, json.dumps(entry, indent=1) + "\n")
    return path


def unregister(path: Path) -> None:
    # a second board of the same name may have taken the entry over: leave its file alone
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
