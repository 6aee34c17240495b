"""The emulated RP2040: MicroPython's real rp2 firmware in rp2040js, behind a pseudo-terminal."""

from .board import BoardStartError, EmulatedRP2040, RP2040jsMissing, ensure_rp2040js

__all__ = ["BoardStartError", "EmulatedRP2040", "RP2040jsMissing", "ensure_rp2040js"]
