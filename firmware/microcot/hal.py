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
# MicroPython's ticks wrap (ticks_diff handles that); CPython gets monotonic milliseconds that do
# not wrap, so the plain difference is right there.
try:
    from time import sleep_ms, ticks_add, ticks_diff, ticks_ms
except ImportError:
    import time as _time

    def ticks_ms():
        return int(_time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def sleep_ms(ms):
        _time.sleep(ms / 1000)


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
