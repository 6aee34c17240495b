"""One way to talk to a board, real or virtual: mpremote's serial transport, with clear errors.

mpremote's own errors are terse ("failed to access", "could not enter raw repl"); a user with a
board on the desk needs to know whether the port is missing, taken by another program, or not a
MicroPython board at all.
"""

from __future__ import annotations

import ast
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import serial
from mpremote import transport_serial as _transport_serial
from mpremote.transport import TransportError, TransportExecError
from mpremote.transport_serial import SerialTransport

# sys.implementation._mpy >> 10, as MicroPython's persistentcode.h numbers native architectures
MPY_ARCHES = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp",
              "armv7emdp", "xtensa", "xtensawin", "rv32imc", "rv64imc")


class BoardError(RuntimeError):
    """A board could not be reached or did not behave like a MicroPython board."""


class ExecTimeout(BoardError):
    pass


class ExecError(TransportExecError):
    """Code raised an exception on the board: its output so far and the board's traceback."""

    def __init__(self, output: bytes, error_output: str) -> None:
        super().__init__(output, error_output)
        self.output = output


@dataclass(frozen=True)
class BoardInfo:
    platform: str
    version: str
    machine: str
    mpy_version: int | None
    mpy_sub: int | None
    arch: str | None

    @property
    def mpy_tag(self) -> str:
        return "none" if self.mpy_version is None else f"{self.mpy_version}.{self.mpy_sub}"


def open_board(port: str, baudrate: int = 115200, soft_reset: bool = True,
               timeout: float = 10.0) -> SerialTransport:
    """Open a board's serial port and enter the raw REPL (interrupting whatever runs).

    `timeout` bounds the wait for the raw REPL, boot.py included.
    """
    if not port:
        raise BoardError("no port given (use --port or MICROCOT_PORT)")
    if not port.startswith(("socket://", "rfc2217://")) and not os.path.exists(port):
        raise BoardError(f"{port}: no such serial port (is the board plugged in?)")
    try:
        t = SerialTransport(port, baudrate=baudrate, exclusive=True)
    except (serial.SerialException, TransportError):
        raise BoardError(f"{port}: {_why_unopenable(port, baudrate)}") from None
    try:
        t.serial.timeout = 1
        t.serial = _PushbackSerial(t.serial)
        t.enter_raw_repl(soft_reset=soft_reset, timeout_overall=timeout)
    except (TransportError, serial.SerialException, OSError) as exc:
        t.close()
        raise BoardError(f"{port}: not a MicroPython board, or it does not answer "
                         f"(no raw REPL: {exc})") from None
    return t


def _why_unopenable(port: str, baudrate: int) -> str:
    """mpremote says only "failed to access"; open the port ourselves to learn why."""
    try:
        serial.Serial(port, baudrate=baudrate, exclusive=True).close()
    except serial.SerialException as exc:
        text = str(exc)
        if "exclusive" in text.lower() or "busy" in text.lower() or "Errno 16" in text:
            return "port is busy (another program, e.g. a terminal or mpremote, has it open)"
        if "Permission denied" in text or "Errno 13" in text:
            return ("permission denied (add yourself to the port's group, e.g. dialout, "
                    "and log in again)")
        return f"cannot open: {text}"
    return "cannot open (it went away or is in use)"


# mpremote prints the bytes it got when entering the raw REPL fails; we raise a clear error
# instead. Shadowing print in its module (not swapping sys.stdout) is safe with many threads.
_transport_serial.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]


def run(t: SerialTransport, code: str, timeout: float = 30.0,
        on_output: Callable[[bytes], None] | None = None) -> bytes:
    """Execute code in the raw REPL; return its output, raise TransportExecError on an exception.

    Unlike mpremote's exec, `timeout` bounds the whole run, not the gap between two bytes, and a
    timed-out run is interrupted so the board is usable again.
    """
    t.exec_raw_no_follow(code)
    out, err = _read_result(t.serial, time.monotonic() + timeout, on_output)
    if err is None:
        interrupt(t)
        raise ExecTimeout(f"no result within {timeout:g} s (interrupted)")
    if err:
        raise ExecError(out, err.decode(errors="replace"))
    return out


class _PushbackSerial:
    """A serial port that can take bytes back, so a chunked read never eats the next prompt."""

    def __init__(self, ser: serial.Serial) -> None:
        self._ser = ser
        self._back = b""

    def unread(self, data: bytes) -> None:
        self._back = data + self._back

    def read(self, size: int = 1) -> bytes:
        if self._back:
            data, self._back = self._back[:size], self._back[size:]
            return data
        return self._ser.read(size)

    def inWaiting(self) -> int:  # noqa: N802 - mpremote calls pyserial's old name
        return len(self._back) + self._ser.in_waiting

    @property
    def in_waiting(self) -> int:
        return self.inWaiting()

    def __getattr__(self, name: str):
        return getattr(self._ser, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("_ser", "_back"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._ser, name, value)


def _read_result(ser, deadline: float,
                 on_output: Callable[[bytes], None] | None) -> tuple[bytes, bytes | None]:
    """Read `output EOF error EOF`; error is None when the deadline passes first."""
    parts = [bytearray(), bytearray()]
    part = 0
    while time.monotonic() < deadline:
        chunk = ser.read(max(1, min(ser.in_waiting, 4096)))
        while chunk:
            end = chunk.find(b"\x04")
            piece = chunk if end < 0 else chunk[:end]
            parts[part] += piece
            if part == 0 and on_output and piece:
                on_output(piece)
            if end < 0:
                break
            if part == 1:
                rest = chunk[end + 1:]
                if rest and hasattr(ser, "unread"):
                    ser.unread(rest)
                return bytes(parts[0]), bytes(parts[1])
            part = 1
            chunk = chunk[end + 1:]
    return bytes(parts[0]), None


def interrupt(t: SerialTransport) -> None:
    """Ctrl-C a running program and resynchronise at the raw REPL prompt."""
    t.serial.write(b"\x03")
    data = t.read_until(1, b"\x04>", timeout=5)
    if data.endswith(b"\x04>"):
        t.serial.unread(b">")  # the next exec waits for this prompt
    else:
        t.enter_raw_repl(soft_reset=False)


def evaluate(t: SerialTransport, expr: str, timeout: float = 30.0):
    out = run(t, f"print(repr({expr}))", timeout=timeout)
    return ast.literal_eval(out.decode().strip())


def board_info(t: SerialTransport) -> BoardInfo:
    plat, ver, machine, mpy = evaluate(
        t,
        "(lambda s: (s.platform, '.'.join(str(v) for v in s.implementation.version[:3]), "
        "getattr(s.implementation, '_machine', ''), getattr(s.implementation, '_mpy', None)))"
        "(__import__('sys'))",
    )
    if mpy is None:
        return BoardInfo(plat, ver, machine, None, None, None)
    arch_idx = mpy >> 10
    arch = MPY_ARCHES[arch_idx] if arch_idx < len(MPY_ARCHES) else None
    return BoardInfo(plat, ver, machine, mpy & 0xFF, (mpy >> 8) & 3, arch)


def soft_reset(t: SerialTransport) -> None:
    t.enter_raw_repl(soft_reset=True)


def close(t: SerialTransport) -> None:
    with contextlib.suppress(OSError, serial.SerialException):
        t.exit_raw_repl()
    with contextlib.suppress(OSError, serial.SerialException):
        t.close()


__all__ = ["BoardError", "BoardInfo", "ExecError", "ExecTimeout", "TransportExecError", "board_info",
           "close", "evaluate", "interrupt", "open_board", "run", "soft_reset"]
