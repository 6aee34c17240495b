"""Where the project's files are, for an editable install or a source checkout."""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The source tree that holds firmware/ and boards/ (override with MICROCOT_ROOT)."""
    env = os.environ.get("MICROCOT_ROOT")
    if env:
        return Path(env).resolve()
    return _HERE.parents[1]


def firmware_dir() -> Path:
    return repo_root() / "firmware"


def boards_dir() -> Path:
    return repo_root() / "boards"


def state_dir() -> Path:
    """Per-user state (virtual boards' flash, caches); MICROCOT_HOME overrides it."""
    env = os.environ.get("MICROCOT_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "microcot"
