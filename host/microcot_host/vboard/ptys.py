"""What every board on a pseudo-terminal needs, the virtual board and the emulated RP2040 alike:
a valid name, the pty in raw mode, a wake-up pipe for the bridge thread, an optional stable
symlink (the child that dies with the host: childproc.die_with_parent)."""

from __future__ import annotations

import contextlib
import os
import re
import tty
from pathlib import Path

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """A board name: it names files (flash, registry), so letters, digits, '.', '_', '-'."""
    if not _NAME_RE.match(name):
        raise ValueError(f"board name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def open_pty() -> tuple[int, int, str]:
    """(master, slave, port): the slave is the board's serial port, raw (no echo, no CR/LF
    translation, no signals from the line discipline); the master is non-blocking."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        os.set_blocking(master, False)
        return master, slave, os.ttyname(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise


def wake_pipe() -> tuple[int, int]:
    """A non-blocking pipe whose read end wakes the bridge thread's selector."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def link_to(link: Path | None, port: str) -> None:
    """Point the stable symlink `link` (if any) at the pty, replacing an old link."""
    if link is None:
        return
    with contextlib.suppress(FileNotFoundError):
        if link.is_symlink():
            link.unlink()
    link.symlink_to(port)


def unlink_if_ours(link: Path | None, port: str | None) -> None:
    """Remove `link` if it still points at our pty (another board may have taken the name)."""
    if link is None or not link.is_symlink():
        return
    with contextlib.suppress(OSError):
        if port is None or os.readlink(link) == port:
            link.unlink()


