# Hardware layer: runs on CPython (pytest) and on the unix port / a board. The virtual board's
# `_vboard` module is replaced by a fake in sys.modules; board.json by a scratch file.
import sys

from dt import raises, rmtree, scratch_dir

from microcot import hal


class FakeVboard:
    def __init__(self, mac=b"\x02\x00\x00\xab\xcd\xef", modem_path="/dev/pts/99"):
        self.name = "virtual"
        self.mac = mac
        self.modem_path = modem_path
        self.opened = []
        self.resets = 0

    def open_host(self, path, mode):
        self.opened.append((path, mode))
        return ("stream", path)

    def reset(self):
        self.resets += 1


def _with_vboard(vb, fn):
    if hal.family() in ("esp32", "rp2"):
        return  # real boards never look for _vboard
    old = sys.modules.get("_vboard")
    sys.modules["_vboard"] = vb
    try:
        fn()
    finally:
        if old is None:
            del sys.modules["_vboard"]
        else:
            sys.modules["_vboard"] = old


def _with_config(text, fn):
    d = scratch_dir('tmp_hal_test')
    path = d + "/board.json"
    saved = hal.CONFIG_PATH
    try:
        if text is not None:
            with open(path, "w") as f:
                f.write(text)
        hal.CONFIG_PATH = path
        fn(d)
    finally:
        hal.CONFIG_PATH = saved
        try:
            hal.config(reload=True)
        except ValueError:
            pass
        rmtree(d)


def test_family():
    fam = hal.family()
    assert fam in ("esp32", "rp2", "unix", "cpython")
    assert (fam == "cpython") == (sys.implementation.name != "micropython")


def test_clock():
    t0 = hal.ticks_ms()
    assert hal.ticks_diff(hal.ticks_add(t0, 5), t0) == 5
    assert hal.ticks_diff(t0, hal.ticks_add(t0, 7)) == -7
    hal.sleep_ms(20)
    took = hal.ticks_diff(hal.ticks_ms(), t0)
    assert 15 <= took < 2000, took


def test_random_bytes():
    a = hal.random_bytes(16)
    b = hal.random_bytes(16)
    assert isinstance(a, bytes) and len(a) == 16 and a != b
    assert hal.random_bytes(0) == b""
    raises(ValueError, hal.random_bytes, -1)
    raises(ValueError, hal.random_bytes, "4")


def test_config_absent_and_present():
    def absent(d):
        assert hal.config(reload=True) == {}

    _with_config(None, absent)

    def present(d):
        cfg = hal.config(reload=True)
        assert cfg["name"] == "virtual" and cfg["modem"]["baud"] == 115200
        assert hal.config() is cfg  # cached

    _with_config('{"name": "virtual", "family": "unix", "modem": {"path": "", "baud": 115200}}',
                 present)


def test_config_invalid_names_the_file():
    def bad_json(d):
        e = raises(ValueError, hal.config, True)
        assert "board.json" in str(e) and "JSON" in str(e)

    _with_config("{name: ", bad_json)

    def not_object(d):
        e = raises(ValueError, hal.config, True)
        assert "object" in str(e) and "list" in str(e)

    _with_config("[1, 2]", not_object)


def test_vboard_modem_mac_reset():
    vb = FakeVboard()

    def body():
        assert hal.vboard() is vb
        assert hal.modem_uart() == ("stream", "/dev/pts/99")
        assert vb.opened == [("/dev/pts/99", "r+b")]
        assert hal.mac() == b"\x02\x00\x00\xab\xcd\xef"
        hal.reset()
        assert vb.resets == 1

    _with_vboard(vb, body)

    vb2 = FakeVboard(mac=None, modem_path=None)

    def without_modem():
        assert hal.modem_uart() is None
        assert hal.mac() is None

    _with_vboard(vb2, without_modem)


def test_no_vboard_uses_config():
    if hal.family() in ("esp32", "rp2"):
        return
    # on the virtual board, hide its _vboard for the duration of the test
    real_vb = sys.modules.pop("_vboard", None)
    try:
        _no_vboard_uses_config()
    finally:
        if real_vb is not None:
            sys.modules["_vboard"] = real_vb


def _no_vboard_uses_config():
    def body(d):
        dev = d + "/modem"
        with open(dev, "wb") as f:
            f.write(b"")
        with open(d + "/board.json", "w") as f:
            f.write('{"modem": {"path": "%s", "baud": 9600}, "mac": "aa:bb:cc:00:11:22"}' % dev)
        hal.config(reload=True)
        s = hal.modem_uart()
        try:
            s.write(b"AT\r")
        finally:
            s.close()
        with open(dev, "rb") as f:
            assert f.read() == b"AT\r"
        assert hal.mac() == b"\xaa\xbb\xcc\x00\x11\x22"
        raises(SystemExit, hal.reset)

    _with_config("{}", body)

    def empty(d):
        hal.config(reload=True)
        assert hal.modem_uart() is None
        assert hal.mac() is None

    _with_config('{"modem": {"path": ""}}', empty)


# -- 32-bit truths: ticks_ms wraps at 2**30 ms (12.4 days) on a 32-bit board; CPython's hal clock
# wraps there too, and hal.ticks_at() puts the wrap a moment ahead on every runtime.

def test_ticks_run_on_across_the_wrap():
    P = hal.TICKS_PERIOD
    assert P >= 1 << 30 and P & (P - 1) == 0
    assert hal.ticks_add(P - 1, 2) == 1
    assert hal.ticks_diff(1, P - 1) == 2 and hal.ticks_diff(P - 1, 1) == -2
    try:
        hal.ticks_at(P - 30)
        t0 = hal.ticks_ms()
        assert P - 1000 < t0 < P, t0
        hal.sleep_ms(60)
        t1 = hal.ticks_ms()
        assert t1 < t0, (t0, t1)  # wrapped: a plain t1 - t0 would be about -P
        assert 55 <= hal.ticks_diff(t1, t0) < 2000
        assert hal.ticks_diff(hal.ticks_add(t0, 60), t0) == 60
    finally:
        hal.ticks_at(None)
    assert hal.ticks_ms() < P


def test_uptime_counts_on_across_wraps():
    # what main.py's uptime command reports: it used to be ticks_ms() // 1000, which restarts
    # at 0 at every wrap (after 12.4 days on a 32-bit board)
    P = hal.TICKS_PERIOD
    step = 1 << 28  # under half the smallest period: the update timer runs far more often
    try:
        t = P - 1500
        hal.ticks_at(t)
        u = hal.Uptime()
        for _ in range(10):  # 31 days in 10 jumps, over at least two wraps of a 32-bit clock
            t = (t + step) % P
            hal.ticks_at(t)
            u.update()
        hal.ticks_at((t + 2500) % P)
        want = (10 * step + 2500) // 1000
        s = u.seconds()
        assert want <= s <= want + 2, (s, want)
        assert isinstance(s, int) and s < 1 << 29  # a small int on every board
        assert u.seconds() >= s  # never backwards
    finally:
        hal.ticks_at(None)


def test_mem_free_after_a_collection():
    n = hal.mem_free()
    if sys.implementation.name != "micropython":
        assert n == -1
        return
    import gc

    gc.disable()  # garbage stays until hal.mem_free collects it
    try:
        junk = [bytearray(256) for _ in range(16)]
        junk = None
        before = gc.mem_free()
        after = hal.mem_free()
    finally:
        gc.enable()
    assert junk is None and after >= before + 16 * 256, (before, after)
    b = bytearray(4096)
    assert hal.mem_free() <= after - 4096, b[:0]


def test_clock_hint_says_when_the_clock_is_not_set():
    # a board before NTP: 2000-01-01 (esp32 epoch) or 1970; TLS errors then say so
    for t in (0, 946684800 + 3600):
        hint = hal.clock_hint(t)
        assert "clock says 19" in hint or "clock says 2000" in hint, hint
        assert "NTP" in hint
    assert hal.clock_hint(1767225600) == ""  # 2026-01-01
    import time

    # the board's own clock: set on a virtual board (the host's), maybe not on a fresh Pico
    now = int(time.time()) + (946684800 if time.gmtime(0)[0] == 2000 else 0)
    assert (hal.clock_hint() == "") == (now >= hal._CLOCK_SANE)
