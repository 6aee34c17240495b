# Hardware layer: the only module that knows which port it runs on (DESIGN.md principle 2).
# Ports: esp32, rp2 (MicroPython on a board), unix (the MicroPython unix port, e.g. the virtual
# board) and cpython (host tests). machine/network are imported inside functions so that importing
# hal costs almost no heap and works on every runtime.
import sys

CONFIG_PATH = "/board.json"

# UART timeouts: the AT driver polls, so reads only need to wait for the rest of a character burst.
_UART_TIMEOUT_MS = 10
_UART_RXBUF = 512

_cfg = None

# -- clock ---------------------------------------------------------------------------------------
# ticks_ms() wraps: at 2**30 ms (12.4 days) on a 32-bit board, where ticks_diff is right only for
# spans under 2**29 ms (6.2 days). Every elapsed time is ticks_diff(now, then), every deadline
# ticks_add(now, ms), never a subtraction, a comparison or ticks_ms() // 1000. CPython gets the
# same wrapping clock (period 2**30, like the boards), so that host runs meet the wrap too.
try:
    from time import sleep_ms, ticks_add, ticks_diff
    from time import ticks_ms as _clock

    TICKS_PERIOD = ticks_add(0, -1) + 1  # 2**30 on 32-bit boards, 2**62 on the 64-bit unix port
except ImportError:
    import time as _time

    TICKS_PERIOD = 1 << 30
    _TMAX = TICKS_PERIOD - 1
    _THALF = TICKS_PERIOD >> 1

    def _clock():
        return int(_time.monotonic() * 1000) & _TMAX

    def ticks_diff(a, b):
        return ((a - b + _THALF) & _TMAX) - _THALF

    def ticks_add(a, b):
        return (a + b) & _TMAX

    def sleep_ms(ms):
        _time.sleep(ms / 1000)

ticks_ms = _clock


def ticks_at(t=None):
    """Tests: from now on hal.ticks_ms() reads `t` now and runs on from there (e.g.
    TICKS_PERIOD - 2000: the wrap in 2 s); None: the real clock again. Modules that call
    hal.ticks_ms() see it; a module that imported ticks_ms itself keeps the real clock."""
    global ticks_ms
    if t is None:
        ticks_ms = _clock
        return
    off = ticks_diff(t % TICKS_PERIOD, _clock())

    def shifted():
        return ticks_add(_clock(), off)

    ticks_ms = shifted


class Uptime:
    """Time since start that counts on across ticks_ms wraps (ticks_ms() // 1000 restarts at 0
    every 12.4 days on a 32-bit board). update() must run at least every few days (ticks_diff
    is right only within half a period): call it from a timer; seconds() updates too. The count
    is kept as seconds plus milliseconds so that it stays a small int for 34 years."""

    def __init__(self):
        self._t = ticks_ms()
        self._s = 0
        self._ms = 0

    def update(self):
        t = ticks_ms()
        d = ticks_diff(t, self._t)
        if d > 0:
            self._t = t
            ms = self._ms + d
            self._s += ms // 1000
            self._ms = ms % 1000
        return self._s

    def seconds(self):
        return self.update()


def family():
    """'esp32', 'rp2', 'unix' (any other MicroPython port is treated like unix) or 'cpython'."""
    if sys.implementation.name != "micropython":
        return "cpython"
    p = sys.platform
    if p.startswith("esp32"):
        return "esp32"
    if p == "rp2":
        return "rp2"
    return "unix"


def config(reload=False):
    """The board configuration from /board.json (written at deploy), cached; {} when absent.

    A file that exists but is not a JSON object raises ValueError naming the file: a board that
    silently ran without its modem settings would be harder to diagnose than one that says why.
    """
    global _cfg
    if _cfg is not None and not reload:
        return _cfg
    try:
        with open(CONFIG_PATH) as f:
            text = f.read()
    except OSError:
        _cfg = {}
        return _cfg
    import json

    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ValueError("%s: not valid JSON (%s)" % (CONFIG_PATH, exc))
    if not isinstance(cfg, dict):
        raise ValueError("%s: expected a JSON object, got %s" % (CONFIG_PATH, type(cfg).__name__))
    _cfg = cfg
    return cfg


def vboard():
    """The `_vboard` module that the virtual board injects, or None on anything else.

    Looked up on the unix port and on CPython (where tests inject a fake), never on a board."""
    if family() in ("esp32", "rp2"):
        return None
    vb = sys.modules.get("_vboard")
    if vb is not None:
        return vb
    try:
        import _vboard

        return _vboard
    except ImportError:
        return None


def _modem_cfg():
    m = config().get("modem")
    return m if isinstance(m, dict) else {}


def modem_uart():
    """A UART-like stream to the cellular modem (write(bytes), read(n)/readinto), or None.

    esp32/rp2: machine.UART from the board's modem {uart, tx, rx, baud}.
    virtual board: its emulated modem through _vboard.open_host (the board's own filesystem is a
    host directory mounted at /, so a host pty path is not reachable with open).
    otherwise (unix, cpython): the configured device path {path}, unbuffered.
    """
    fam = family()
    if fam in ("esp32", "rp2"):
        m = _modem_cfg()
        if "uart" not in m:
            return None
        from machine import UART, Pin

        kw = {"baudrate": m.get("baud", 115200), "timeout": _UART_TIMEOUT_MS,
              "timeout_char": _UART_TIMEOUT_MS, "rxbuf": _UART_RXBUF}
        if "tx" in m:
            kw["tx"] = Pin(m["tx"])
        if "rx" in m:
            kw["rx"] = Pin(m["rx"])
        return UART(m["uart"], **kw)
    vb = vboard()
    if vb is not None:
        path = getattr(vb, "modem_path", None)
        return vb.open_host(path, "r+b") if path else None
    path = _modem_cfg().get("path")
    if not path:
        return None
    if fam == "cpython":
        return open(path, "r+b", buffering=0)
    return open(path, "r+b")  # MicroPython files are unbuffered


def _parse_mac(text):
    # board.json may carry "mac": "AA:BB:CC:DD:EE:FF" for a unix host without a virtual board
    h = text.replace(":", "").replace("-", "")
    if len(h) != 12:
        raise ValueError("board mac %r: expected 6 bytes as hex" % text)
    import binascii

    return binascii.unhexlify(h)


def mac():
    """The 6-byte MAC of the board's network interface, or None when there is none."""
    fam = family()
    if fam in ("esp32", "rp2"):
        import network

        nic = network.WLAN(network.STA_IF)
        m = bytes(nic.config("mac"))
        if not any(m):
            # some cyw43 builds report zeros until the radio has been powered up once
            nic.active(True)
            m = bytes(nic.config("mac"))
        return m
    vb = vboard()
    if vb is not None:
        m = getattr(vb, "mac", None)
        return bytes(m) if m is not None else None
    m = config().get("mac")
    return _parse_mac(m) if m else None


def reset():
    """Hard reset. On the virtual board the host restarts the interpreter (the call may return
    before that happens); a plain unix or CPython process has nothing to reset, so it raises
    SystemExit (its supervisor restarts it)."""
    fam = family()
    if fam in ("esp32", "rp2"):
        import machine

        machine.reset()
    vb = vboard()
    if vb is not None:
        vb.reset()
        return
    raise SystemExit("microcot: reset requested")


def random_bytes(n):
    """n bytes from the OS/hardware RNG. There is deliberately no PRNG fallback: a time-seeded
    generator would make secrets guessable (DESIGN.md principle 7)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError("random_bytes: n must be a non-negative int, got %r" % (n,))
    import os

    return os.urandom(n)


# -- memory in a TLS handshake --------------------------------------------------------------------
# mbedTLS reports a failed allocation as an error code: MicroPython's ssl makes
# MBEDTLS_ERR_SSL_ALLOC_FAILED an OSError ENOMEM, MBEDTLS_ERR_MPI_ALLOC_FAILED (-0x10) the OSError
# 16 (EBUSY: codes above -256 are taken for errnos), the others OSError(code, text). An allocation
# that fails while a signature of the server's chain is checked (RSA, ECDSA) is worse: mbedTLS
# marks the certificate untrusted and the error says "The certificate is not correctly signed by
# the trusted CA"; one while the key is imported says MBEDTLS_ERR_PK_INVALID_PUBKEY. Those two are
# told apart from a real certificate problem by the heap afterwards (mbedTLS has freed all of its
# memory by then): the heap must hold what a handshake takes, its 16 KiB input buffer, its 4 KiB
# output buffer and about 10 KiB in pieces for the chain, the keys and the numbers. Measured on the
# i386-rp2 build (the emulator's RSA-2048 chain, heaps filled and fragmented by tests/host/
# test_tls_memory.py), handshakes fail with about 30 KB free in one run and pass from 31 KB. That
# happens only where mbedTLS allocates from the GC heap (rp2; found out when a CA is loaded: see
# tls_ca), not where it has a heap of its own (esp32, the unix port).
TLS_NEED = (16896, 4608, 10)  # after a collection: blocks of these sizes and 10 of 1 KiB
_tls_heap = None  # True: mbedTLS allocates from the GC heap
_ALLOC = {0x7F00: "TLS buffers or handshake state", 0x2880: "a certificate of the chain",
          0x3F80: "a public key", 0x4D80: "elliptic-curve numbers", 0x3400: "DH numbers",
          0x6180: "a cipher", 0x5180: "a hash", 0x1180: "PEM text",
          0x10: "big numbers (key exchange or signature check)", 0x6A: "a certificate field"}


# certificates in use were issued after this (2025-01-01): a board whose clock is earlier has not
# set it yet (no NTP), and every certificate check fails as "not yet valid"
_CLOCK_SANE = 1735689600


def clock_hint(t=None):
    """"" when the wall clock looks set, else a sentence saying it is not (for TLS errors)."""
    import time

    if t is None:
        t = int(time.time()) + (946684800 if time.gmtime(0)[0] == 2000 else 0)
    if t >= _CLOCK_SANE:
        return ""
    off = 946684800 if time.gmtime(0)[0] == 2000 else 0
    y, mo, d = time.gmtime(max(0, t - off))[:3]
    return ("; the board's clock says %04d-%02d-%02d, before any certificate in use was issued: "
            "set it first (NTP: ntptime.settime())" % (y, mo, d))


def mem_free():
    """The free GC heap after a collection (-1 on CPython, whose heap has no fixed size)."""
    import gc

    gc.collect()
    f = getattr(gc, "mem_free", None)
    return f() if f is not None else -1


def tls_ca(ctx, der):
    """ctx.load_verify_locations(cadata=der) on MicroPython, noting whether mbedTLS took the
    memory for the CA from the GC heap."""
    global _tls_heap
    import gc

    a = gc.mem_alloc()
    ctx.load_verify_locations(cadata=der)
    d = gc.mem_alloc() - a
    if d >= 0 and not _tls_heap:
        _tls_heap = d >= len(der) // 2 or family() == "rp2"


def tls_oom(e, where):
    """The message of a TLS handshake with `where` (host:port) that failed with `e` because it ran
    out of memory, or None when memory was not the cause."""
    a = e.args[0] if e.args else None
    what = None
    if isinstance(e, MemoryError):
        what = "a MicroPython object (%s)" % (a or "MemoryError")
    elif isinstance(e, OSError) and isinstance(a, int):
        if a == 12:
            what = _ALLOC[0x7F00]
        elif a == 16 and family() != "cpython":
            what = _ALLOC[0x10]
        elif a < 0:
            what = _ALLOC.get(-a & 0xFF80) or _ALLOC.get(-a & 0x7F)
            if what is None and -a == 0x3B00 and _tls_short():
                what = "a public key"
    elif isinstance(e, ValueError) and family() != "cpython" and _tls_short():
        what = "numbers to check the chain's signatures"
    if what is None:
        return None
    import gc

    gc.collect()
    m = str(e).strip() or type(e).__name__
    return ("TLS handshake with %s ran out of memory (%d bytes free); mbedTLS could not allocate "
            "%s (it said: %s)" % (where, gc.mem_free(), what, m))


def _tls_short():
    # mbedTLS in the GC heap, and what a handshake takes does not fit after a collection
    if not _tls_heap:
        return False
    import gc

    gc.collect()
    held = []
    try:
        held.append(bytearray(TLS_NEED[0]))
        held.append(bytearray(TLS_NEED[1]))
        for _ in range(TLS_NEED[2]):
            held.append(bytearray(1024))
    except MemoryError:
        return True
    finally:
        held = None
    return False
