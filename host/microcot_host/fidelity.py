"""The faithful board models: which MicroPython a virtual board runs, found through settings.

A board file names a `runtime`:

| runtime      | what runs                                                    | models |
| ------------ | ------------------------------------------------------------ | ------ |
| `unix64`     | the 64-bit unix port from PyPI (`micropython` in the venv)    | nothing real: a fast developer board |
| `i386-esp32` | 32-bit unix port, TLS buffers outside the GC heap             | ESP32 (ESP-IDF gives mbedTLS its own heap) |
| `i386-rp2`   | 32-bit unix port, mbedTLS allocating from the GC heap         | RP2040/RP2350 (TLS inside the GC heap) |
| `rp2040`     | the real rp2 firmware (UF2) in an emulated RP2040 (rp2040js)  | a Pico W minus its radio |

The builds are not part of the package: `MICROCOT_FIDELITY_DIR` names the folder that holds them
(the layout of `shared/fidelity/`: `micropython-i386-esp32`, `micropython-i386-rp2`,
`rp2/RPI_PICO_W-*.uf2`, `rp2/RPI_PICO-*.uf2`, `rp2/bootrom-b1.bin`). Single files can be named
instead with `MICROCOT_MICROPYTHON_I386_ESP32`, `MICROCOT_MICROPYTHON_I386_RP2`,
`MICROCOT_RP2_FIRMWARE` and `MICROCOT_RP2_BOOTROM`. When a build is missing, tests that need it
are skipped with `missing()`'s message, unless `MICROCOT_REQUIRE_FIDELITY=1` (set by CI) makes
that a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNTIMES = ("unix64", "i386-esp32", "i386-rp2", "rp2040")
# the runtimes a heap figure may come from (DESIGN.md: never the 64-bit port)
FAITHFUL = ("i386-esp32", "i386-rp2", "rp2040")

HOW_TO_GET = (
    "set MICROCOT_FIDELITY_DIR to a folder with the faithful builds (in the project's CI: "
    "../shared/fidelity); build the i386 boards with its src/build-i386.sh (Debian's gcc-multilib) "
    "and get the RPI_PICO_W UF2 from micropython.org (see the docs: guides/board-models.md)")

_BINARY = {"i386-esp32": ("MICROCOT_MICROPYTHON_I386_ESP32", "micropython-i386-esp32"),
           "i386-rp2": ("MICROCOT_MICROPYTHON_I386_RP2", "micropython-i386-rp2")}
_UF2 = {"RPI_PICO_W": "RPI_PICO_W-", "RPI_PICO": "RPI_PICO-"}


class FidelityMissing(RuntimeError):
    """A faithful build that a board model needs is not available here."""


def required() -> bool:
    """True when a missing build must fail instead of skip (CI sets MICROCOT_REQUIRE_FIDELITY=1)."""
    return os.environ.get("MICROCOT_REQUIRE_FIDELITY", "").strip().lower() in ("1", "true", "yes")


def fidelity_dir() -> Path | None:
    env = os.environ.get("MICROCOT_FIDELITY_DIR", "").strip()
    return Path(env).expanduser().resolve() if env else None


def _named(var: str, default_name: str) -> Path:
    env = os.environ.get(var, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FidelityMissing(f"{var}={env}: no such file")
        return path
    base = fidelity_dir()
    if base is None:
        raise FidelityMissing(f"{default_name} not found: MICROCOT_FIDELITY_DIR is not set; "
                              + HOW_TO_GET)
    path = base / default_name
    if not path.is_file():
        raise FidelityMissing(f"{path} does not exist; " + HOW_TO_GET)
    return path


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def i386_binary(runtime: str) -> Path:
    """The 32-bit unix port for `i386-esp32` or `i386-rp2` (needs Debian's libc6-i386)."""
    check_runtime(runtime)
    if runtime not in _BINARY:
        raise ValueError(f"runtime {runtime!r} is not a unix port build")
    path = _named(*_BINARY[runtime])
    if not os.access(path, os.X_OK):
        raise FidelityMissing(f"{path} is not executable")
    if not Path("/lib/ld-linux.so.2").exists() and not Path("/lib32/ld-linux.so.2").exists():
        raise FidelityMissing(f"{path} needs the 32-bit C library: apt-get install libc6-i386 "
                              "(make setup installs it)")
    return path


def rp2_firmware(board: str = "RPI_PICO_W") -> Path:
    """The rp2 port's UF2 for `board` (RPI_PICO_W or RPI_PICO)."""
    env = os.environ.get("MICROCOT_RP2_FIRMWARE", "").strip()
    if env and board == "RPI_PICO_W":
        return _named("MICROCOT_RP2_FIRMWARE", "")
    prefix = _UF2.get(board)
    if prefix is None:
        raise ValueError(f"rp2 firmware {board!r}: expected one of {', '.join(_UF2)}")
    base = fidelity_dir()
    if base is None:
        raise FidelityMissing(f"the {board} firmware: MICROCOT_FIDELITY_DIR is not set; "
                              + HOW_TO_GET)
    found = sorted((base / "rp2").glob(prefix + "*.uf2"))
    if not found:
        raise FidelityMissing(f"no {prefix}*.uf2 in {base / 'rp2'}; " + HOW_TO_GET)
    return found[-1]


def rp2_bootrom() -> Path:
    """The RP2040 B1 boot ROM (16 KiB) that the emulated chip starts from."""
    return _named("MICROCOT_RP2_BOOTROM", "rp2/bootrom-b1.bin")


def missing(runtime: str) -> str | None:
    """None when `runtime` can run here, else why not and how to get it."""
    try:
        if runtime in _BINARY:
            i386_binary(runtime)
        elif runtime == "rp2040":
            rp2_firmware()
            rp2_bootrom()
        else:
            check_runtime(runtime)
    except FidelityMissing as exc:
        return str(exc)
    return None
