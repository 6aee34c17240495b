"""An emulated cellular modem for the virtual board.

`ModemEmulator` is a sans-I/O core: bytes typed at the modem go into `feed()`, the bytes it answers
come out. It behaves like a V.250 modem in verbose mode: echo on by default (every received byte is
echoed as it arrives, `ATE0`/`ATE1` switch it), commands end with CR (an LF is accepted too), info
text is framed `\\r\\n<line>\\r\\n` and the final result `\\r\\nOK\\r\\n`, `\\r\\nERROR\\r\\n` or
`\\r\\n+CME ERROR: <n>\\r\\n`. Lines that do not start with AT are ignored, as real modems do while
they hunt for the next "AT". Without a SIM (iccid=None) the SIM commands answer
`+CME ERROR: 10` (SIM not inserted).

`PtyModem` serves an emulator on a pseudo-terminal from a background thread; its `.path` is what
the virtual board hands to the firmware as `_vboard.modem_path`.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import tty
from collections.abc import Iterable
from types import TracebackType

__all__ = ["DEFAULT_IMEI", "ModemEmulator", "PtyModem", "ef_iccid_hex"]

DEFAULT_IMEI = "490154203237518"  # the usual documentation IMEI (Luhn-valid)
LINE_MAX = 556  # V.250 requires at least 40 characters; common modems accept 556

CME_SIM_NOT_INSERTED = 10
# EF_ICCID: file id 0x2FE2, read with READ BINARY (176); 10 bytes of swapped BCD
_READ_BINARY = 176
_EF_ICCID = 12258
_SIM_COMMANDS = frozenset({"+CCID", "+QCCID", "+ICCID", "+CRSM", "+CIMI", "+CPIN"})


def ef_iccid_hex(iccid: str) -> str:
    """The contents of EF_ICCID as AT+CRSM prints them: the ICCID padded with F to 20 nibbles,
    the two nibbles of every byte swapped ("8949..." -> "9894...")."""
    if not iccid.isascii() or not iccid.isdigit() or len(iccid) > 20:
        raise ValueError(f"ICCID must be at most 20 decimal digits, got {iccid!r}")
    s = iccid.ljust(20, "F")
    return "".join(s[i + 1] + s[i] for i in range(0, 20, 2))


class ModemEmulator:
    """A cellular modem's AT command interpreter (sans-I/O).

    supported: command names (such as "+CCID", "+CRSM", "I") the modem implements; None means all.
    Anything else, and any unknown command, answers ERROR. `commands` logs every command line.
    """

    def __init__(
        self,
        iccid: str | None,
        imsi: str | None = None,
        echo: bool = True,
        *,
        supported: Iterable[str] | None = None,
        imei: str = DEFAULT_IMEI,
        manufacturer: str = "microcot",
        model: str = "Virtual LTE-M modem",
        revision: str = "VM01R01",
    ) -> None:
        if iccid is not None:
            ef_iccid_hex(iccid)  # validates the shape
        self.iccid = iccid
        self.imsi = imsi
        self.echo = echo
        self.supported = None if supported is None else {s.upper() for s in supported}
        self.imei = imei
        self.manufacturer = manufacturer
        self.model = model
        self.revision = revision
        self.commands: list[str] = []
        self._line = bytearray()
        self._overflow = False

    # -- I/O-free interface ---------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Take bytes the host sent; return the bytes the modem sends back (echo and answers)."""
        out = bytearray()
        for b in data:
            if self.echo:
                out.append(b)
            if b in (0x0D, 0x0A):
                if self._overflow:
                    self._overflow = False
                    self._line.clear()
                    out += b"\r\nERROR\r\n"
                elif self._line:
                    line = self._line.decode("latin-1")
                    self._line.clear()
                    out += self.execute(line)
            elif b == 0x08 and self._line:  # backspace, for people typing in a terminal
                self._line.pop()
            elif len(self._line) < LINE_MAX:
                self._line.append(b)
            else:
                self._overflow = True
        return bytes(out)

    def unsolicited(self, text: str) -> bytes:
        """The framing of an unsolicited result code such as "+CREG: 1" or "RING"."""
        return b"\r\n" + text.encode() + b"\r\n"

    def execute(self, line: str) -> bytes:
        """The answer to one command line (without its terminator), final result included."""
        line = line.strip()
        if line[:2].upper() != "AT":
            return b""
        self.commands.append(line)
        body = line[2:].strip()
        upper = body.upper()
        name = upper
        for i, c in enumerate(upper):
            if c in "=?":
                name = upper[:i]
                break
        if self.supported is not None and name and name not in self.supported:
            return _error()
        if name in _SIM_COMMANDS and self.iccid is None:
            return _cme(CME_SIM_NOT_INSERTED)
        handler = _HANDLERS.get(name)
        if handler is None:
            return _error()
        return handler(self, upper, body)

    # -- commands --------------------------------------------------------------------------------

    def _at(self, upper: str, body: str) -> bytes:
        return _ok()

    def _e(self, upper: str, body: str) -> bytes:
        if upper in ("E", "E0"):
            self.echo = False
        elif upper == "E1":
            self.echo = True
        else:
            return _error()
        return _ok()

    def _i(self, upper: str, body: str) -> bytes:
        if upper != "I":
            return _error()
        return _ok(self.manufacturer, self.model, f"Revision: {self.revision}")

    def _cgmi(self, upper: str, body: str) -> bytes:
        return _ok(self.manufacturer) if upper == "+CGMI" else _error()

    def _cgmm(self, upper: str, body: str) -> bytes:
        return _ok(self.model) if upper == "+CGMM" else _error()

    def _cgmr(self, upper: str, body: str) -> bytes:
        return _ok(self.revision) if upper == "+CGMR" else _error()

    def _cgsn(self, upper: str, body: str) -> bytes:
        return _ok(self.imei) if upper in ("+CGSN", "+GSN") else _error()

    def _ccid(self, upper: str, body: str) -> bytes:
        name = upper.rstrip("?")
        if upper not in (name, name + "?"):
            return _error()
        return _ok(f"{name}: {self.iccid}")

    def _crsm(self, upper: str, body: str) -> bytes:
        if not upper.startswith("+CRSM="):
            return _ok() if upper == "+CRSM=?" else _error()
        try:
            args = [int(a) for a in upper[6:].split(",")[:5]]
        except ValueError:
            return _error()
        if len(args) < 2:
            return _error()
        if args[0] != _READ_BINARY or args[1] != _EF_ICCID:
            return _ok("+CRSM: 106,130")  # 6A82: file not found
        data = ef_iccid_hex(self.iccid or "")
        if len(args) == 5 and 0 < args[4] < 10:
            data = data[: 2 * args[4]]
        return _ok(f'+CRSM: 144,0,"{data}"')

    def _cimi(self, upper: str, body: str) -> bytes:
        if upper != "+CIMI" or self.imsi is None:
            return _error()
        return _ok(self.imsi)

    def _cpin(self, upper: str, body: str) -> bytes:
        if upper == "+CPIN?":
            return _ok("+CPIN: READY")
        return _ok() if upper == "+CPIN=?" else _error()

    def _cmee(self, upper: str, body: str) -> bytes:
        return _ok()


def _ok(*lines: str) -> bytes:
    return b"".join(b"\r\n" + ln.encode() + b"\r\n" for ln in lines) + b"\r\nOK\r\n"


def _error() -> bytes:
    return b"\r\nERROR\r\n"


def _cme(code: int) -> bytes:
    return b"\r\n+CME ERROR: %d\r\n" % code


_HANDLERS = {
    "": ModemEmulator._at,
    "E": ModemEmulator._e,
    "E0": ModemEmulator._e,
    "E1": ModemEmulator._e,
    "I": ModemEmulator._i,
    "+CGMI": ModemEmulator._cgmi,
    "+CGMM": ModemEmulator._cgmm,
    "+CGMR": ModemEmulator._cgmr,
    "+CGSN": ModemEmulator._cgsn,
    "+GSN": ModemEmulator._cgsn,
    "+CCID": ModemEmulator._ccid,
    "+QCCID": ModemEmulator._ccid,
    "+ICCID": ModemEmulator._ccid,
    "+CRSM": ModemEmulator._crsm,
    "+CIMI": ModemEmulator._cimi,
    "+CPIN": ModemEmulator._cpin,
    "+CMEE": ModemEmulator._cmee,
}


class PtyModem:
    """Serves a ModemEmulator on a pseudo-terminal; `.path` is the device to open.

    The slave side is set raw (no echo, no CR/LF translation by the line discipline: the emulator
    does the echo). The server keeps its own slave descriptor open so that the pty survives the
    firmware closing and re-opening it across resets. start() and stop() are idempotent; stop()
    joins the thread and closes every descriptor.
    """

    def __init__(self, emulator: ModemEmulator | None = None, **emulator_args: object) -> None:
        if emulator is not None and emulator_args:
            raise TypeError("pass either an emulator or the arguments to build one")
        self.emulator = emulator if emulator is not None else ModemEmulator(**emulator_args)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._out = bytearray()
        self._thread: threading.Thread | None = None
        self._fds: list[int] = []
        self._master = -1
        self._wake_w = -1
        self._path: str | None = None
        self._stopping = False

    @property
    def path(self) -> str:
        if self._path is None:
            raise RuntimeError("PtyModem is not started")
        return self._path

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> PtyModem:
        if self._thread is not None:
            return self
        master, slave = os.openpty()
        wake_r, wake_w = os.pipe()
        self._fds = [master, slave, wake_r, wake_w]
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            os.set_blocking(wake_r, False)
            self._path = os.ttyname(slave)
        except BaseException:
            self._close_fds()
            raise
        self._master, self._wake_w = master, wake_w
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, args=(master, wake_r), name=f"pty-modem {self._path}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout=5)
        self._thread = None
        self._close_fds()
        self._path = None

    def inject(self, text: str) -> None:
        """Send an unsolicited result code (e.g. "+CREG: 1") to whoever has the pty open."""
        with self._lock:
            self._out += self.emulator.unsolicited(text)
        self._wake()

    def __enter__(self) -> PtyModem:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._master = self._wake_w = -1

    def _serve(self, master: int, wake_r: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ)
        sel.register(master, selectors.EVENT_READ)
        writing = False
        try:
            while not self._stopping:
                for key, mask in sel.select():
                    if key.fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                        continue
                    if mask & selectors.EVENT_READ:
                        try:
                            data = os.read(master, 4096)
                        except (BlockingIOError, InterruptedError):
                            data = b""
                        except OSError:  # EIO: nobody has the slave open; we hold it, so rare
                            data = b""
                        if data:
                            with self._lock:
                                self._out += self.emulator.feed(data)
                    if mask & selectors.EVENT_WRITE:
                        self._flush(master)
                if self._out:
                    self._flush(master)
                want = bool(self._out)
                if want != writing:
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
                    sel.modify(master, events)
                    writing = want
        finally:
            sel.close()

    def _flush(self, master: int) -> None:
        with self._lock:
            while self._out:
                try:
                    n = os.write(master, self._out)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:  # the pty is gone; drop what cannot be delivered
                    self._out.clear()
                    return
                del self._out[:n]
