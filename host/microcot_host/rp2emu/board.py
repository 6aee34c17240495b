"""An emulated RP2040 running the real rp2 MicroPython firmware, behind a pseudo-terminal.

`EmulatedRP2040` runs `js/runner.mjs` under node: rp2040js (npm, pinned in js/package-lock.json)
with the firmware's UF2 in its flash. The board's USB CDC serial is the runner's stdin/stdout,
bridged here to a pty (what mpremote and the project's tools open, like /dev/ttyACM0); its UART0
is a socket pair, bridged to an emulated AT modem (`vboard.modem.PtyModem`) when an ICCID is
given. A supervisor thread moves the bytes. The surface is `vboard.VirtualBoard`'s.

The flash (2 MiB) persists in a file per board, so the filesystem survives `machine.reset()`, a
stop and a start; the UF2 given is written over the firmware area at every start. After
`machine.bootloader()` the folder `RPI-RP2` appears under `drive_dir` (`MICROCOT_UF2_SEARCH`
pointed at `drive_dir` makes `microcot flash` find it).

rp2040js is installed with `npm ci` into `<state dir>/rp2040js/<hash of the lock>` by
`ensure_rp2040js()` (run by `make setup`); `MICROCOT_RP2040JS` names another folder holding
node_modules/rp2040js.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tty
from pathlib import Path
from types import TracebackType

from .. import fidelity
from ..childproc import die_with_parent
from ..fidelity import FidelityMissing
from ..files import narrow_mode, private_dir
from ..paths import state_dir
from ..vboard.ptys import check_name, link_to, open_pty, unlink_if_ours, wake_pipe

__all__ = ["EmulatedRP2040", "BoardStartError", "RP2040jsMissing", "ensure_rp2040js",
           "find_node", "parse_uid", "default_uid", "runner_script"]

JS_DIR = Path(__file__).resolve().parent / "js"
ENV_RP2040JS = "MICROCOT_RP2040JS"
# board output the pty has not taken is kept up to this much (oldest dropped), as bytes sent to a
# closed port are lost
OUTPUT_LIMIT = 1 << 20
PROMPT = b">>> "


class BoardStartError(RuntimeError):
    """The emulated board did not come up (node failed, no REPL within the timeout)."""


class RP2040jsMissing(FidelityMissing):
    """node or the rp2040js package is not installed."""


def runner_script() -> Path:
    return JS_DIR / "runner.mjs"


def find_node() -> str:
    node = shutil.which("node")
    if node is None:
        raise RP2040jsMissing("node is not installed; run `make setup` (it installs Debian's "
                              "nodejs and npm: apt-get install nodejs npm)")
    return node


def _installed(folder: Path) -> bool:
    return (folder / "node_modules" / "rp2040js" / "package.json").is_file()


def ensure_rp2040js(install: bool = True) -> Path:
    """The folder whose node_modules holds rp2040js, installing it first if needed and allowed.

    `MICROCOT_RP2040JS` names the folder explicitly. Otherwise it is
    `<state dir>/rp2040js/<hash of js/package-lock.json>`, filled by `npm ci` from the lock (the
    package's own folder may be read-only in site-packages). Raises RP2040jsMissing.
    """
    env = os.environ.get(ENV_RP2040JS, "").strip()
    if env:
        folder = Path(env).expanduser()
        if not _installed(folder):
            raise RP2040jsMissing(f"{ENV_RP2040JS}={env}: no node_modules/rp2040js there "
                                  "(npm install rp2040js@1.4.1 in that folder)")
        return folder
    lock = (JS_DIR / "package-lock.json").read_bytes()
    folder = state_dir() / "rp2040js" / hashlib.sha256(lock).hexdigest()[:16]
    if _installed(folder):
        return folder
    if not install:
        raise RP2040jsMissing(f"rp2040js is not installed in {folder}; run `make setup` "
                              "(or call microcot_host.rp2emu.ensure_rp2040js())")
    find_node()
    npm = shutil.which("npm")
    if npm is None:
        raise RP2040jsMissing("npm is not installed; run `make setup` (apt-get install npm)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".install-"))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(JS_DIR / name, tmp / name)
        proc = subprocess.run([npm, "ci", "--prefix", str(tmp), "--no-audit", "--no-fund",
                               "--loglevel=error"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not _installed(tmp):
            raise RP2040jsMissing(f"npm ci of rp2040js failed ({proc.returncode}): "
                                  f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _installed(folder):  # not a concurrent install that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def parse_uid(uid: str | bytes) -> bytes:
    """16 hex digits (':' or '-' allowed between bytes) or 8 bytes -> the flash unique ID."""
    if isinstance(uid, bytes | bytearray):
        if len(uid) != 8:
            raise ValueError(f"unique ID must be 8 bytes, got {len(uid)}")
        return bytes(uid)
    digits = re.sub(r"[:\-\s]", "", uid)
    if not re.fullmatch(r"[0-9A-Fa-f]{16}", digits):
        raise ValueError(f"unique ID {uid!r}: expected 16 hex digits")
    return bytes.fromhex(digits)


def default_uid(name: str) -> bytes:
    """A stable flash unique ID derived from the board name."""
    return hashlib.sha256(b"microcot-rp2emu:" + name.encode()).digest()[:8]




def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


class EmulatedRP2040:
    """A Pico W (or Pico) in rp2040js on a pseudo-terminal. See the module docstring.

    name      board name: picks the flash file, the drive folder and the default unique ID
    firmware  the UF2 (default: fidelity.rp2_firmware(), the RPI_PICO_W build)
    flash     the flash image file (default <state dir>/boards/<name>/rp2-flash.bin)
    uid       flash unique ID, 16 hex digits or 8 bytes (machine.unique_id()); default from name
    iccid     attach an emulated AT modem with this SIM to UART0
    link      optional stable symlink to the pty
    """

    def __init__(self, name: str = "rp2", firmware: str | os.PathLike | None = None,
                 flash: str | os.PathLike | None = None, uid: str | bytes | None = None,
                 iccid: str | None = None, link: str | os.PathLike | None = None) -> None:
        self.name = check_name(name)
        self.firmware = Path(firmware) if firmware is not None else None
        board_dir = state_dir() / "boards" / name
        self.flash = Path(flash).resolve() if flash is not None else board_dir / "rp2-flash.bin"
        self.uid = parse_uid(uid) if uid is not None else default_uid(name)
        self.iccid = iccid
        if iccid is not None:
            from ..vboard.modem import ef_iccid_hex

            ef_iccid_hex(iccid)  # a bad ICCID is an argument error, not a failure at start()
        self.link = Path(link) if link is not None else None
        if flash is None:
            self.drive_dir = board_dir / "drive"
            self.log_path = board_dir / "rp2emu.log"
        else:  # named after the flash file: two boards may keep their files in one folder
            self.drive_dir = self.flash.parent / f"{self.flash.stem}-drive"
            self.log_path = self.flash.parent / f"{self.flash.stem}.log"
        self.boot_s: float | None = None  # start() until the REPL answered
        self.dropped_output = 0
        self.error: BaseException | None = None

        self._proc: subprocess.Popen | None = None
        self._modem = None
        self._modem_fd = -1
        self._uart: socket.socket | None = None
        self._port: str | None = None
        self._master = self._slave = self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._to_board = bytearray()  # pty -> CDC
        self._to_host = bytearray()  # CDC -> pty
        self._to_uart = bytearray()  # modem -> UART0
        self._to_modem = bytearray()  # UART0 -> modem
        self._probe: bytearray | None = None  # while start() pokes: CDC output lands here

    # ---- public API --------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The serial device to open (the pty's slave side)."""
        if self._port is None:
            raise RuntimeError("the emulated board is not started")
        return self._port

    @property
    def modem_path(self) -> str | None:
        """The emulated modem's pty (None without an ICCID)."""
        return self._modem.path if self._modem is not None else None

    @property
    def running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and self._proc is not None and self._proc.poll() is None)

    @property
    def pid(self) -> int | None:
        """node's process id."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 60.0) -> EmulatedRP2040:
        """Start node and the bridge; return once the friendly REPL answered a Ctrl-C/Ctrl-B
        poke with its prompt. Raises FidelityMissing (firmware, boot ROM, node or rp2040js not
        there) or BoardStartError."""
        if self._thread is not None:
            return self
        t0 = time.monotonic()
        firmware = self.firmware or fidelity.rp2_firmware("RPI_PICO_W")
        if not Path(firmware).is_file():
            raise FidelityMissing(f"{firmware}: no such firmware file")
        bootrom = fidelity.rp2_bootrom()
        node = find_node()
        lib = ensure_rp2040js()
        self._private_files()
        shutil.rmtree(self.drive_dir / "RPI-RP2", ignore_errors=True)  # a drive of a past run
        theirs: socket.socket | None = None
        try:
            if self.iccid is not None:
                from ..vboard.modem import PtyModem

                self._modem = PtyModem(iccid=self.iccid).start()
                self._modem_fd = os.open(self._modem.path, os.O_RDWR | os.O_NOCTTY)
                tty.setraw(self._modem_fd)
                os.set_blocking(self._modem_fd, False)
            self._uart, theirs = socket.socketpair()
            self._uart.setblocking(False)
            self._master, self._slave, self._port = open_pty()
            self._wake_r, self._wake_w = wake_pipe()
            link_to(self.link, self._port)
            cmd = [node, str(runner_script()), "--rp2040js", str(lib), "--bootrom", str(bootrom),
                   "--firmware", str(firmware), "--flash", str(self.flash),
                   "--uid", self.uid.hex(), "--drive-dir", str(self.drive_dir),
                   "--uart-fd", str(theirs.fileno())]
        except BaseException:
            if theirs is not None:
                theirs.close()
            self._cleanup()
            raise
        self._probe = bytearray()
        self._stopping = False
        # node is started by the bridge thread: PR_SET_PDEATHSIG fires when the thread that
        # forked ends, and this one lives as long as the board (the caller's may not)
        spawned = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(cmd, theirs, spawned),
                                        name=f"rp2emu {self.name}", daemon=True)
        self._thread.start()
        spawned.wait()
        theirs.close()
        if self._proc is None:
            err = self.error
            self.stop()
            raise BoardStartError(f"emulated RP2040 {self.name}: node did not start: {err}") \
                from err
        try:
            self._await_prompt(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop node (its flash is saved first), the bridge and the modem; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            # node leaves no children, but kill the group in case something joined it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake()
            thread.join(timeout=10)
            self._thread = None
        self._cleanup()

    def __enter__(self) -> EmulatedRP2040:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmulatedRP2040 {self.name} port={self._port} flash={self.flash}>"

    # ---- start-up ----------------------------------------------------------------------------

    def _await_prompt(self, deadline: float) -> None:
        """Poke the REPL (Ctrl-C stops main.py, Ctrl-B leaves a raw REPL) until `>>> ` comes,
        then let output settle and hand the line over to the pty."""
        next_poke = 0.0
        seen_at: float | None = None
        while True:
            now = time.monotonic()
            if not self.running:
                raise BoardStartError(f"emulated RP2040 {self.name}: node exited "
                                      f"({self._why_dead()})")
            with self._lock:
                probe = bytes(self._probe or b"")
            if seen_at is None and PROMPT in probe:
                seen_at = now
                size = len(probe)
            if seen_at is not None:
                if len(probe) != size:
                    seen_at, size = now, len(probe)
                elif now - seen_at >= 0.2:
                    with self._lock:
                        self._probe = None
                    return
            elif now >= next_poke:
                self._send(b"\r\x03\x03\x02")
                next_poke = now + 1.0
            if now >= deadline:
                raise BoardStartError(f"emulated RP2040 {self.name}: no REPL prompt within the "
                                      f"timeout; output: {probe[-300:]!r}; log {self.log_path}")
            time.sleep(0.05)

    def _why_dead(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1]
        return f"status {code}; {tail}" if tail else f"status {code}"

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._to_board += data
        self._wake()

    # ---- bridge thread -----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _private_files(self) -> None:
        # the flash image holds the board's filesystem, passwords included: owner-only like a
        # virtual board's flash folder, and so is an image an earlier version left 0644
        private_dir(self.flash.parent)
        private_dir(self.drive_dir)
        for f in (self.flash, self.log_path):
            if f.exists():
                narrow_mode(f)

    def _spawn(self, cmd: list[str], theirs: socket.socket) -> subprocess.Popen:
        parent = os.getpid()
        with open(self.log_path, "ab", opener=_owner_only) as log:
            # node writes the flash image (a temporary file renamed): with this umask it is
            # created owner-only
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                pass_fds=(theirs.fileno(),), start_new_session=True, close_fds=True,
                umask=0o077,
                preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM))
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        return proc

    def _serve(self, cmd: list[str], theirs: socket.socket, spawned: threading.Event) -> None:
        try:
            self._proc = self._spawn(cmd, theirs)
        except BaseException as exc:
            self.error = exc
            return
        finally:
            spawned.set()
        proc = self._proc
        assert self._uart is not None
        board_in, board_out = proc.stdin.fileno(), proc.stdout.fileno()
        uart = self._uart.fileno()
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                want = {self._master: selectors.EVENT_READ, board_out: selectors.EVENT_READ,
                        uart: selectors.EVENT_READ}
                if self._to_host:
                    want[self._master] |= selectors.EVENT_WRITE
                if self._to_board:
                    want[board_in] = selectors.EVENT_WRITE
                if self._to_uart:
                    want[uart] |= selectors.EVENT_WRITE
                if self._modem_fd >= 0:
                    want[self._modem_fd] = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if self._to_modem else 0)
                for fd, events in want.items():
                    try:
                        key = sel.get_key(fd)
                    except KeyError:
                        sel.register(fd, events)
                        continue
                    if key.events != events:
                        sel.modify(fd, events)
                for key in list(sel.get_map().values()):
                    if key.fd != self._wake_r and key.fd not in want:
                        sel.unregister(key.fd)
                for key, events in sel.select(1.0):
                    self._on_ready(key.fd, events, board_in, board_out, uart)
                if proc.poll() is not None:
                    self._drain(board_out)
                    break
        except BaseException as exc:  # kept for the caller (running turns False)
            self.error = exc
        finally:
            sel.close()

    def _on_ready(self, fd: int, events: int, board_in: int, board_out: int, uart: int) -> None:
        if fd == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        elif fd == self._master:
            if events & selectors.EVENT_READ:
                data = _read(fd)
                if data:
                    with self._lock:
                        self._to_board += data
            if events & selectors.EVENT_WRITE:
                self._write(fd, self._to_host)
        elif fd == board_in:
            with self._lock:
                self._write(fd, self._to_board)
        elif fd == board_out:
            self._drain(board_out)
        elif fd == uart:
            if events & selectors.EVENT_READ:
                data = _read(fd)
                if data and self._modem_fd >= 0:
                    self._to_modem += data
            if events & selectors.EVENT_WRITE:
                self._write(fd, self._to_uart)
        elif fd == self._modem_fd:
            if events & selectors.EVENT_READ:
                data = _read(fd)
                if data:
                    self._to_uart += data
            if events & selectors.EVENT_WRITE:
                self._write(fd, self._to_modem)

    def _drain(self, board_out: int) -> None:
        data = _read(board_out)
        if not data:
            return
        with self._lock:
            if self._probe is not None:
                self._probe += data
                return
        self._to_host += data
        if len(self._to_host) > OUTPUT_LIMIT:
            extra = len(self._to_host) - OUTPUT_LIMIT
            self.dropped_output += extra
            del self._to_host[:extra]
        self._write(self._master, self._to_host)

    @staticmethod
    def _write(fd: int, buf: bytearray) -> None:
        if not buf:
            return
        try:
            n = os.write(fd, buf[:65536])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EPIPE, errno.ECONNRESET):
                raise
            buf.clear()  # the other side is gone
            return
        del buf[:n]

    def _cleanup(self) -> None:
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for attr in ("_master", "_slave", "_wake_r", "_wake_w", "_modem_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)
        if self._uart is not None:
            self._uart.close()
            self._uart = None
        if self._modem is not None:
            self._modem.stop()
            self._modem = None
        unlink_if_ours(self.link, self._port)
        self._to_board.clear()
        self._to_host.clear()
        self._to_uart.clear()
        self._to_modem.clear()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError as exc:
        if exc.errno == errno.EIO:  # a pty side nobody holds; we hold the slave, so rare
            return b""
        raise
