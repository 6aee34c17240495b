"""The virtual board: a MicroPython unix port behind a pseudo-terminal, and its emulated modem."""

from .board import BoardStartError, VirtualBoard

__all__ = ["BoardStartError", "VirtualBoard"]
