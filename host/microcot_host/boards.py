"""Board definitions from boards/*.toml and the JSON form a board keeps as /board.json."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fidelity import RUNTIMES
from .paths import boards_dir

FAMILIES = ("esp32", "rp2", "unix")


class BoardError(ValueError):
    pass


@dataclass(frozen=True)
class Board:
    name: str
    family: str
    chip: str
    raw: dict[str, Any] = field(repr=False)

    @property
    def modem(self) -> dict[str, Any] | None:
        return self.raw.get("modem")

    @property
    def repl_baud(self) -> int:
        """The REPL's line speed; `baud` is esptool's flashing speed, often higher."""
        return int(self.raw.get("repl_baud", 115200))

    @property
    def heap_budget(self) -> int | None:
        """Free heap after boot (`gc.mem_free()` at the REPL) that the real board leaves user
        code, less the margin stated in the board file; virtual boards are given exactly this."""
        return self.raw.get("heap_budget")

    @property
    def runtime(self) -> str:
        """The board model a virtual board of this kind runs (see microcot_host.fidelity)."""
        return str(self.raw.get("runtime", "unix64"))

    def device_config(self, **overrides: Any) -> dict[str, Any]:
        """What the firmware reads from /board.json (hal.py): no host-only details."""
        keep = ("name", "family", "chip", "network", "heap_budget", "modem")
        cfg = {k: self.raw[k] for k in keep if k in self.raw}
        cfg.update(overrides)
        return cfg

    def device_json(self, **overrides: Any) -> bytes:
        return json.dumps(self.device_config(**overrides), sort_keys=True).encode()


def load(name_or_path: str | Path) -> Board:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = boards_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(names()) or "none"
        raise BoardError(f"unknown board {name_or_path!r} (known: {known})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BoardError(f"{path}: {exc}") from None
    for key in ("name", "family", "chip"):
        if key not in raw:
            raise BoardError(f"{path}: missing key {key!r}")
    if raw.get("runtime", "unix64") not in RUNTIMES:
        raise BoardError(f"{path}: runtime {raw['runtime']!r} is not one of {RUNTIMES}")
    if raw["family"] not in FAMILIES:
        raise BoardError(f"{path}: family {raw['family']!r} is not one of {FAMILIES}")
    return Board(raw["name"], raw["family"], raw["chip"], raw)


def names() -> list[str]:
    return sorted(p.stem for p in boards_dir().glob("*.toml"))
