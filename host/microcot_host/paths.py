"""Where the project's files are: a source checkout (also an editable install), or the data an
installed wheel carries (`microcot_host/_data/`, read through importlib.resources)."""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

from .files import private_dir

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parents[1]


def _is_checkout(root: Path) -> bool:
    return (root / "boards").is_dir() and (root / "firmware" / "microcot").is_dir()


def _data(name: str) -> Path:
    # an installed wheel unpacks its data as files, so the traversable is a real directory
    return Path(str(resources.files("microcot_host").joinpath("_data", name)))


def repo_root() -> Path | None:
    """The source tree that holds firmware/ and boards/ (MICROCOT_ROOT names one), or None when
    running from an installed package."""
    env = os.environ.get("MICROCOT_ROOT")
    if env:
        return Path(env).resolve()
    return _CHECKOUT if _is_checkout(_CHECKOUT) else None


def firmware_dir() -> Path:
    """firmware/: the device package (microcot/), the example app (main.py, templates.csv), the
    mip and freeze manifests."""
    root = repo_root()
    return root / "firmware" if root is not None else _data("firmware")


def boards_dir() -> Path:
    root = repo_root()
    return root / "boards" if root is not None else _data("boards")


def device_tests_dir() -> Path:
    """The device test modules (`microcot test`, `pytest --port`)."""
    root = repo_root()
    return root / "tests" / "device" if root is not None else _data("device_tests")


def state_dir() -> Path:
    """Per-user state (virtual boards' flash, the provisioning ledger, caches); MICROCOT_HOME
    overrides it.

    It holds passwords (in the boards' flash, the emulator's data, the ledger's vault), so it is
    made owner-only (0700, with any folder made on the way, as the XDG spec asks of its base
    folders) and narrowed to 0700 if an earlier version made it 0755. A folder that cannot be
    made is left to whoever writes into it next to report."""
    env = os.environ.get("MICROCOT_HOME")
    if env:
        path = Path(env)
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".local" / "state"
        path = base / "microcot"
    with contextlib.suppress(OSError):
        private_dir(path, narrow=True)
    return path
