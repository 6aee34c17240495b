# ruff: noqa
# This file is MicroPython, not CPython: the unix port runs it as the virtual board's "firmware".
"""The MicroPython side of the microcot virtual board.

It does in Python what shared/runtime/pyexec.c and shared/readline/readline.c do in C on a real
board: friendly REPL (line editing, history, auto-indent, paste mode), raw REPL, raw-paste mode,
boot.py/main.py and soft reboot. The supervisor (board.py) owns the pseudo-terminal and starts a
fresh interpreter for every reset, so a reset here is just this process exiting.

Wire with the supervisor:
  stdin   bytes from the serial line. While no user code runs, Ctrl-C arrives as a byte (as on a
          board, where the interrupt character is only armed during execution).
  stdout  output to the serial line; the supervisor turns "\n" into "\r\n" as a board's stdio does,
          except while user code has disabled Ctrl-C (a binary protocol, e.g. mpremote mount).
  ctl     a socket (fd in the config). Two-byte messages, each acknowledged with one byte:
          X c  user code starts: the byte c on the serial line becomes SIGINT (KeyboardInterrupt)
          N 0  user code disabled Ctrl-C (micropython.kbd_intr(-1)): pass it through, raw output
          I 0  back in the REPL: Ctrl-C is a byte again
          R 0  hard reset request (not acknowledged: the supervisor kills this process)
  exit    100 = soft reboot into the friendly REPL, 101 = into the raw REPL; anything else is a
          crash.

The supervisor sends at most one SIGINT until it sees the next message, so at most one
KeyboardInterrupt is in flight; _pce() is written so that it cannot escape between the end of
user code and the "I" handshake.
"""

import sys, os, vfs, json, io, gc
import micropython as _umpy
import machine as _umachine

_C = json.loads(os.getenv("MICROCOT_VBOARD"))


def _where():
    # how our own frames look in a traceback (source path, or the name mpy-cross was given)
    try:
        raise ValueError
    except ValueError as e:
        s = io.StringIO()
        sys.print_exception(e, s)
        l = s.getvalue().split("\n")[1]
        return l[: l.index('"', 8) + 1]


_ME = _where()  # our frames are hidden from tracebacks
_in = sys.stdin.buffer
_w = sys.stdout.buffer.write
_b = bytearray(1)
_ctl = open(_C["ctl"], "r+b")
_cb = bytearray(2)
_owed = 0  # handshake acknowledgements not read yet
_intr = 3
_g = {"__name__": "__main__"}
_hist = []
_ai = 0  # auto-indent state: 1 enabled, 2 just added
_FORCED = 256  # PYEXEC_FORCED_EXIT


def _gone():
    # the supervisor closed our stdin or the control socket: the board is being switched off
    sys.exit(0)


def _sync(cmd, arg=0):
    global _owed
    _owed += 1
    _cb[0] = cmd
    _cb[1] = arg
    _ctl.write(_cb)
    while _owed:
        if _ctl.readinto(_b) != 1:
            _gone()
        _owed -= 1


def _settle():
    # user code is over: re-arm the SIGINT handler it may have removed, tell the supervisor, then
    # give a KeyboardInterrupt still in flight a place to surface (any jump checks for it)
    global _intr
    _umpy.kbd_intr(3)
    _intr = 3
    _sync(73)  # I
    for _ in (0, 0):
        pass


_first = True


def _getc():
    global _first
    if _first:
        # the banner and prompt are out: the supervisor may report the board ready
        _first = False
        _settle()
    if _in.readinto(_b) != 1:
        _gone()
    return _b[0]


def _pexc(e):
    try:
        s = io.StringIO()
        sys.print_exception(e, s)
        lines = s.getvalue().split("\n")
        s = None
        keep = [l for l in lines if not l.startswith(_ME)]
        if len(keep) == 3 and keep[0].startswith("Traceback"):
            keep.pop(0)  # only our frames: a board prints no traceback for this either
        _w("\n".join(keep))
    except MemoryError:
        sys.print_exception(e)


def _pce(h, kind, fname, eof):
    # parse_compile_execute; h = [source] so that the caller keeps no reference to the source
    global _intr
    e = None
    try:
        try:
            c = compile(bytes(h.pop()), fname, kind)
            if kind == "exec":
                _g["__file__"] = fname
            _intr = 3
            _sync(88, 3)  # X
            exec(c, _g)
        except BaseException as x:
            e = x
        c = None
        _settle()
    except KeyboardInterrupt as x:
        # the one interrupt in flight surfaced after user code: it was meant for user code
        e = x
        _settle()
    if eof:
        _w(b"\x04")
    r = 1
    if e is not None:
        if isinstance(e, SystemExit):
            r = _FORCED
        else:
            _pexc(e)
            r = 0
    if eof:
        _w(b"\x04")
    return r


def _runfile(name):
    try:
        if os.stat(name)[0] & 0x4000:
            return 1
        with open(name, "rb") as f:
            h = [f.read()]
    except OSError:
        return 1  # no file is like an empty file
    return _pce(h, "exec", name, 0)


# ---- readline.c ----


def _back(n):
    if n > 0:
        _w(b"\b\b\b\b"[:n] if n <= 4 else "\x1b[%dD" % n)


def _indent(line, cur):
    global _ai
    n = len(line)
    if not _ai & 1 or n < 2 or line[n - 1] != 10:
        return cur
    i = n - 1
    while i > 0 and line[i - 1] != 10:
        i -= 1
    j = i
    while j < n and line[j] == 32:
        j += 1
    if i > 0 and j + 1 == n:
        k = i - 1
        while k > 0:
            if line[k - 1] == 10:
                return cur  # the last two lines are blank: stop indenting
            if line[k - 1] != 32:
                break
            k -= 1
    m = (j - i) // 4
    if line[n - 2] == 58:  # ':'
        m += 1
    if m > 0:
        line.extend(b"    " * m)
        _w(b"    " * m)
        cur += 4 * m
        _ai |= 2
    return cur


def _complete(s):
    # tab completion of a.b.c chains against __main__'s globals and builtins; None = many printed
    i = len(s)
    while i > 0 and (chr(s[i - 1]).isalpha() or chr(s[i - 1]).isdigit() or s[i - 1] in b"_."):
        i -= 1
    first = i == 0
    parts = str(bytes(s[i:]), "utf8").split(".")
    obj = None
    for p in parts[:-1]:
        try:
            if obj is None:
                obj = _g[p] if p in _g else getattr(__import__("builtins"), p)
            else:
                obj = getattr(obj, p)
        except Exception:
            return b""
    w = parts[-1]
    names = dir(obj) if obj is not None else list(_g) + dir(__import__("builtins"))
    # private names only when asked for: "_" typed
    m = sorted(set(n for n in names if n.startswith(w) and (w[:1] == "_" or n[:1] != "_")))
    if not m:
        return b"import "[len(w):] if first and "import ".startswith(w) and w else b""
    p = m[0]
    for n in m[1:]:
        k = len(w)
        while k < len(p) and k < len(n) and p[k] == n[k]:
            k += 1
        p = p[:k]
    if len(m) == 1 or len(p) > len(w):
        return bytes(p[len(w):], "utf8")
    col = 64
    for n in m:
        gap = (col + 15) // 16 * 16 - col
        if gap < 2:
            gap += 16
        if col + gap + len(n) <= 64:
            _w(" " * gap + n)
            col += gap + len(n)
        else:
            _w("\r\n" + n)
            col = len(n)
    _w(b"\r\n")
    return None


def _readline(line, prompt):
    global _ai
    orig = cur = len(line)
    esc = dig = 0
    hc = -1
    _w(prompt)
    if not line:
        _ai = 1
    cur = _indent(line, cur)
    while True:
        c = _getc()
        last = len(line)
        back = fwd = 0
        redraw = False
        key = 0  # 1 home, 2 end, 3 up, 4 down, 5 right, 6 left, 7 delete
        if esc == 0:
            if 1 <= c <= 5 and len(line) == orig:
                return c  # control character on an empty line
            if c == 1:
                key = 1
            elif c == 2:
                key = 6
            elif c == 3:
                return c
            elif c == 4:
                key = 7
            elif c == 5:
                key = 2
            elif c == 6:
                key = 5
            elif c == 11:  # Ctrl-K: kill to end of line
                line[cur:] = b""
                redraw = True
            elif c == 14:
                key = 4
            elif c == 16:
                key = 3
            elif c == 21:  # Ctrl-U: kill to start of line
                back = cur - orig
                line[orig:cur] = b""
                redraw = True
            elif c == 13:
                _w(b"\r\n")
                h = bytes(line[orig:])
                if h and (not _hist or _hist[0] != h):
                    _hist.insert(0, h)
                    del _hist[8:]
                return 0
            elif c == 27:
                esc = 1
            elif c == 8 or c == 127:
                if cur > orig:
                    n = 0
                    for i in range(orig, cur):
                        if line[i] != 32:
                            n = 0
                            break
                        n += 1
                    n = 4 if n >= 4 else 1
                    line[cur - n : cur] = b""
                    back = n
                    redraw = True
            elif _ai & 2 and (c == 9 or c == 32):
                # typing after an auto-indent (e.g. pasting indented code) undoes most of it
                _ai = 0
                if c == 32:
                    back = 3
                    line[len(line) - 3 :] = b""
            elif c == 9:
                if line and line[cur - 1] in b" \t\r\n":
                    s = b"    "
                else:
                    s = _complete(line[orig:cur])
                if s is None:
                    _w(prompt)
                    _w(line[orig:cur])
                    redraw = True
                elif s:
                    line[cur:cur] = s
                    redraw = True
                    fwd = len(s)
            elif 32 <= c <= 126:
                _b[0] = c
                line[cur:cur] = _b
                redraw = True
                fwd = 1
        elif esc == 1:
            esc = 2 if c == 91 else 4 if c == 79 else 0
        elif esc == 2:
            esc = 0
            if 48 <= c <= 57:
                esc = 3
                dig = c
            elif 65 <= c <= 68:
                key = (3, 4, 5, 6)[c - 65]
            elif c == 72:
                key = 1
            elif c == 70:
                key = 2
        elif esc == 3:
            esc = 0
            if c == 126:
                key = 1 if dig in (49, 55) else 2 if dig in (52, 56) else 7 if dig == 51 else 0
        else:
            esc = 0
            key = 1 if c == 72 else 2 if c == 70 else 0
        if key == 1:
            back = cur - orig
        elif key == 2:
            fwd = len(line) - cur
        elif key == 3 or key == 4:
            if key == 3 and hc + 1 < len(_hist) or key == 4 and hc >= 0:
                hc += 1 if key == 3 else -1
                line[orig:] = _hist[hc] if hc >= 0 else b""
                back = cur - orig
                redraw = True
                fwd = len(line) - orig
        elif key == 5:
            if cur < len(line):
                fwd = 1
        elif key == 6:
            if cur > orig:
                back = 1
        elif key == 7:
            if cur < len(line):
                line[cur : cur + 1] = b""
                redraw = True
        if back > 0:
            _back(back)
            cur -= back
        if redraw:
            if len(line) < last:
                _w(b"\x1b[K")
            _w(line[cur:])
            _back(len(line) - (cur + fwd))
            cur += fwd
        elif fwd > 0:
            _w(line[cur : cur + fwd])
            cur += fwd
        _ai &= ~2


_KW = (b"if", b"while", b"for", b"try", b"with", b"def", b"class", b"async")


def _cont(s):
    # mp_repl_continue_with_input: does this statement need more lines?
    if not s:
        return False
    i = 0
    while i < len(s) and (chr(s[i]).isalpha() or chr(s[i]).isdigit() or s[i] == 95):
        i += 1
    kw = s[0] == 64 or s[:i] in _KW
    par = q = 0  # q: 0 none, 1 ', 2 ", 3 ''', 4 """
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == 39 or c == 34:
            t = 1 if c == 39 else 2
            if (q == 0 or q == t + 2) and s[i + 1 : i + 3] == bytes((c, c)):
                i += 2
                q = t + 2 - q
            elif q == 0 or q == t:
                q = t - q
        elif c == 92 and i + 1 < n and s[i + 1] in b"'\"\\":
            if q:
                i += 1
        elif q == 0:
            if c in b"([{":
                par += 1
            elif c in b")]}":
                par -= 1
        i += 1
    if q > 2:
        return True
    if par > 0 and q == 0:
        return True
    if s[n - 1] == 92:
        return True
    return kw and s[n - 1] != 10


# ---- pyexec.c ----


def _banner():
    v = sys.implementation.version
    tag = "v%d.%d.%d" % v[:3] + ("-" + v[3] if len(v) > 3 and v[3] else "")
    date = sys.version.split(" on ")[-1] if " on " in sys.version else "?"
    _w("MicroPython %s on %s; %s with microcot virtual board\r\n" % (tag, date, _C["machine"]))
    _w('Type "help()" for more information.\r\n')


def _friendly():
    # returns 1 to switch to the raw REPL, _FORCED to soft-reboot
    _banner()
    while True:
        line = bytearray()
        r = _readline(line, b">>> ")
        kind = "single"
        if r == 1:
            _w(b"\r\n")
            return 1
        if r == 2:
            _w(b"\r\n")
            _banner()
            continue
        if r == 3:
            _w(b"\r\n")
            continue
        if r == 4:
            _w(b"\r\n")
            return _FORCED
        if r == 5:
            _w(b"\r\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== ")
            while True:
                c = _getc()
                if c == 3 or c == 4:
                    break
                line.append(c)
                _w(b"\r\n=== " if c == 13 else _b)
            _w(b"\r\n")
            if c == 3:
                continue
            kind = "exec"
        elif not line:
            continue
        else:
            while _cont(line):
                line.append(10)
                r = _readline(line, b"... ")
                if r == 3 or r == 4:
                    break
            if r == 3:
                _w(b"\r\n")
                continue
        h = [line]
        line = None
        if _pce(h, kind, "<stdin>", 0) & _FORCED:
            return _FORCED


def _paste(c):
    # raw-paste mode (after "\x05" c "\x01"): flow-controlled upload, then execute
    if c != 65:
        _w(b"R\x00")
        return 0
    _w(b"R\x01\x80\x00\x01")  # window 128 bytes (half of a board's 256-byte buffer), 2 free
    buf = bytearray()
    rem = 128
    oom = False
    while True:
        c = _getc()
        if c == 3 or c == 4:
            _w(b"\x04")  # end of data, as the board's reader says it
            if c == 3:
                _w(b"\x04")
                _pexc(KeyboardInterrupt())
                _w(b"\x04")
                return 0
            break
        if not oom:
            try:
                buf.append(c)
            except MemoryError:
                oom = True
                buf = None
        rem -= 1
        if rem == 0:
            _w(b"\x01")
            rem = 128
    if oom:
        return _oom()
    h = [buf]
    buf = None
    return _pce(h, "exec", "<stdin>", 1)


def _oom():
    gc.collect()
    _w(b"\x04")
    _pexc(MemoryError("memory allocation failed"))
    _w(b"\x04")
    return 0


def _raw():
    # returns 0 to switch to the friendly REPL, _FORCED to soft-reboot
    _w(b"raw REPL; CTRL-B to exit\r\n")
    while True:
        line = bytearray()
        oom = False
        _w(b">")
        while True:
            c = _getc()
            if c == 1:
                if len(line) == 2 and line[0] == 5:
                    if _paste(line[1]) & _FORCED:
                        return _FORCED
                    _w(b">")
                else:
                    _w(b"raw REPL; CTRL-B to exit\r\n>")
                line = bytearray()
                oom = False
            elif c == 2:
                _w(b"\r\n")
                return 0
            elif c == 3:
                line = bytearray()
                oom = False
            elif c == 4:
                break
            elif not oom:
                try:
                    line.append(c)
                except MemoryError:
                    oom = True
                    line = bytearray(1)
        _w(b"OK")
        if oom:
            _oom()
            continue
        if not line:
            _w(b"\r\n")
            return _FORCED
        h = [line]
        line = None
        if _pce(h, "exec", "<stdin>", 1) & _FORCED:
            return _FORCED


# ---- the board ----


def _hard():
    # machine.reset(): the supervisor kills this process and powers the board on again
    _ctl.write(b"R\x00")
    while True:
        try:
            if _ctl.readinto(_b) != 1:
                _gone()
        except KeyboardInterrupt:
            pass


def _soft():
    raise SystemExit


def _kbd(c):
    global _intr
    if c < 0:
        _sync(78)  # N: the supervisor stops sending SIGINT before we stop handling it
        _umpy.kbd_intr(-1)
    else:
        _umpy.kbd_intr(3)  # our SIGINT handler stays whatever the character
        _sync(88, c & 255)
    _intr = c


class _vboard:
    name = _C["name"]
    mac = bytes.fromhex(_C["mac"]) if _C["mac"] else None
    modem_path = _C["modem"]
    flash_dir = _C["flash"]

    def open_host(path, mode="r"):
        return _host.open(path, mode)

    reset = _hard
    soft_reset = _soft


class _Flash:
    # The board's filesystem, a host directory. What VfsPosix does unlike a board's littlefs/FAT:
    # ilistdir() gives no sizes (mpremote fs ls shows 0), and with a root directory rename()
    # builds both host paths in one shared buffer so it renames the target onto itself (1.29).
    def __init__(self, root):
        self.v = vfs.VfsPosix(root)
        self.r = root

    def ilistdir(self, path):
        d = path.rstrip("/") + "/" if path else ""
        for e in self.v.ilistdir(path):
            n = 0
            if e[1] == 0x8000:
                try:
                    n = self.v.stat(d + e[0])[6]
                except OSError:
                    pass
            yield (e[0], e[1], e[2], n)

    def rename(self, a, b):
        # relative paths are relative to the process's cwd, which VfsPosix.chdir keeps in here
        _host.rename(self.r + a if a[:1] == "/" else a, self.r + b if b[:1] == "/" else b)

    def __getattr__(self, n):
        return getattr(self.v, n)


class _Proxy:
    # stands in for a built-in module whose functions the board must replace
    def __init__(self, mod, **over):
        self._mod = mod
        for k in over:
            setattr(self, k, over[k])

    def __getattr__(self, n):
        return getattr(self._mod, n)


# ---- emulated OTA partitions (the "esp32" module; see board.py's _ota_boot) ----
# ota_0/ota_1 are host files <ota dir>/ota_N.bin (bytes never written read as 0xFF), the
# otadata a JSON file there: {"boot": label, "state": undefined|new|pending|valid|aborted}.
# board.py's bootloader picks the running partition at every hard reset; a soft reset keeps it.
_OTA_SIZE = 0x180000  # MicroPython's partitions-4MiB-ota.csv
# the emulated flash's working buffer, taken at start-up (so heapcal counts it): an erase or a
# NOR write on a real ESP32 takes nothing from the GC heap, so the emulation must not either
_SCRATCH = bytearray(64)


def _otaf(name):
    return _C["flash"] + ".ota/" + name


def _otad(d=None):
    if d is None:
        with _host.open(_otaf("otadata.json"), "r") as f:
            return json.loads(f.read())
    with _host.open(_otaf("otadata.json"), "w") as f:
        f.write(json.dumps(d))


def _oerr(code, name):
    return OSError(-code, name)


class _Part:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if id == 0:
            id = _otad()["boot"]
        elif id == 1:
            id = _C["ota"]
        if id not in ("ota_0", "ota_1"):
            raise OSError(2)
        self.l = id
        self.bs = block_size

    def info(self):
        n = int(self.l[4])
        return (0, 0x10 + n, 0x10000 + n * _OTA_SIZE, _OTA_SIZE, self.l, False)

    def __repr__(self):
        i = self.info()
        return "<Partition type=0, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % i[1:5]

    def _io(self, a, n):
        if a < 0 or a + n > _OTA_SIZE:
            raise _oerr(0x102, "ESP_ERR_INVALID_ARG")
        return _host.open(_otaf(self.l + ".bin"), "r+b")

    def readblocks(self, b, buf, off=0):
        a = b * self.bs + off
        with self._io(a, len(buf)) as f:
            f.seek(a)
            n = f.readinto(buf) or 0
        for i in range(n, len(buf)):
            buf[i] = 0xFF

    def _put(self, a, data):
        with self._io(a, len(data)) as f:
            end = f.seek(0, 2)
            if end < a:
                f.write(b"\xff" * (a - end))
            f.seek(a)
            f.write(data)

    def _erase(self, a, n):
        if a % 4096 or n % 4096:
            raise _oerr(0x102, "ESP_ERR_INVALID_ARG")
        s = _SCRATCH
        for i in range(len(s)):
            s[i] = 0xFF
        with self._io(a, n) as f:
            pos = min(a, f.seek(0, 2))  # a file shorter than a: erased up to a as well
            f.seek(pos)
            while pos < a + n:
                k = min(len(s), a + n - pos)
                f.write(memoryview(s)[:k])
                pos += k

    def writeblocks(self, b, buf, off=None):
        a = b * self.bs
        if off is None:
            self._erase(a, len(buf))  # the simple form erases first, as esp32_partition.c does
            self._put(a, buf)
        else:
            # NOR flash: a write only clears bits (piece by piece through the scratch buffer)
            a += off
            s = _SCRATCH
            mv = memoryview(buf)
            i = 0
            while i < len(buf):
                k = min(len(s), len(buf) - i)
                self.readblocks(0, memoryview(s)[:k], a + i)
                for j in range(k):
                    s[j] &= mv[i + j]
                self._put(a + i, memoryview(s)[:k])
                i += k

    def ioctl(self, op, arg):
        if op == 4:
            return _OTA_SIZE // self.bs
        if op == 5:
            return self.bs
        if op == 6:
            self._erase(arg * self.bs, self.bs)
        return 0

    def set_boot(self):
        h = bytearray(64)
        self.readblocks(0, h)
        if h[0] != 0xE9 or h[32:36] != b"\x32\x54\xcd\xab":
            raise _oerr(0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")
        _otad({"boot": self.l, "state": "new"})

    def get_next_update(self):
        return _Part("ota_1" if _C["ota"] == "ota_0" else "ota_0")

    @staticmethod
    def find(type=0, subtype=255, label=None, block_size=4096):
        if type != 0:
            return []
        return [_Part(l, block_size) for l in ("ota_0", "ota_1")
                if (label is None or label == l) and subtype in (255, 0x10 + int(l[4]))]

    @staticmethod
    def mark_app_valid_cancel_rollback():
        d = _otad()
        if d["boot"] == _C["ota"] and d["state"] == "pending":
            d["state"] = "valid"
            _otad(d)


class _Esp32:
    Partition = _Part


def _setup():
    global _host
    _host = vfs.VfsPosix()
    vfs.umount("/")
    vfs.mount(_Flash(_C["flash"]), "/")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]
    sys.argv[:] = []
    uid = _vboard.mac or bytes(8)
    sys.modules["_vboard"] = _vboard
    sys.modules["machine"] = _Proxy(
        _umachine,
        reset=_hard,
        soft_reset=_soft,
        reset_cause=lambda: _C["cause"],
        unique_id=lambda: uid,
        PWRON_RESET=1,
        HARD_RESET=2,
        WDT_RESET=3,
        DEEPSLEEP_RESET=4,
        SOFT_RESET=5,
    )
    sys.modules["micropython"] = _Proxy(_umpy, kbd_intr=_kbd)
    if _C.get("hosts"):
        # the board's network resolves these names (VirtualBoard's hosts); TLS still checks
        # the certificate against the name the firmware asked for
        import socket as _usock

        def _resolve(host, port, *a, _m=_C["hosts"], _g=_usock.getaddrinfo):
            return _g(_m.get(host, host), port, *a)

        sys.modules["socket"] = _Proxy(_usock, getaddrinfo=_resolve)
    if _C.get("ota"):
        sys.modules["esp32"] = _Esp32


_mode = _C["mode"]  # 0 friendly, 1 raw
_booted = False


def _main():
    global _mode, _booted
    if not _booted:
        _booted = True
        r = _runfile("boot.py")
        if not r & _FORCED and _mode == 0:
            r = _runfile("main.py")
        if r & _FORCED:
            return
    while True:
        r = _raw() if _mode else _friendly()
        if r & _FORCED:
            return
        _mode = r


def _top():
    _setup()
    while True:
        try:
            _main()
            break
        except KeyboardInterrupt:
            # cannot happen by design (see the module docstring); treat it as a Ctrl-C keypress
            _settle()
            _w(b"\r\n")
        except MemoryError:
            gc.collect()
            _w(b"\r\nMemoryError\r\n")
    _w(b"MPY: soft reboot\r\n")
    sys.exit(100 + _mode)


# run as a script (source) or imported from a precompiled .mpy by `micropython -c`
if sys.implementation.name == "micropython":
    _top()
