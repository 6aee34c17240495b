# Application bundles and their switch (microcot/apptar.py, microcot/appswitch.py): runs on
# CPython (pytest) and on a board. The tar reader gets good, hostile and damaged bundles (made here byte by byte: no
# tarfile on MicroPython) in pieces of several sizes; the journal's steps (switch, rollback,
# confirm) get a power cut at every filesystem step (each rename, remove, mkdir, rmdir, file
# opened for writing, the store's included), then boot() runs as the next boot would, and the
# application must be wholly the old one or wholly the new one, never a mix.
import os

from dt import raises, scratch_dir

from microcot import appswitch, apptar, store
from microcot.appswitch import NEW, OLD
from microcot.apptar import BundleError, Untar, check_name


class PowerCut(Exception):
    pass


class CutFs:
    """The real filesystem, but after `budget` mutating steps every one raises PowerCut; both
    appswitch's layer (os-like) and store.py's (open/remove/rename/mkdir/sync)."""

    def __init__(self):
        self.budget = -1
        self.steps = 0

    def step(self):
        if self.budget == 0:
            raise PowerCut()
        if self.budget > 0:
            self.budget -= 1
        self.steps += 1

    def stat(self, p):
        return os.stat(p)

    def listdir(self, p):
        return os.listdir(p)

    def rename(self, a, b):
        self.step()
        os.rename(a, b)

    def remove(self, p):
        self.step()
        os.remove(p)

    def mkdir(self, p):
        self.step()
        os.mkdir(p)

    def rmdir(self, p):
        self.step()
        os.rmdir(p)

    def open(self, p, mode):
        if "w" in mode:
            self.step()
        return open(p, mode)

    def sync(self, f):
        f.flush()

    def sync_all(self):
        pass


def _isdir(p):
    try:
        return os.stat(p)[0] & 0x4000
    except OSError:
        return False


def _wipe(d):
    for n in os.listdir(d):
        p = d + "/" + n
        if _isdir(p):
            _wipe(p)
        else:
            os.remove(p)
    os.rmdir(d)


class Env:
    """A scratch application root with its store, appswitch and store pointed at it."""

    def __init__(self):
        self.d = scratch_dir("tmp_appswitch")
        appswitch.root(self.d)
        store.root(self.d + "/store")
        self.fs = CutFs()
        appswitch._os = self.fs
        apptar._open = self.fs.open
        apptar._remove = self.fs.remove
        store.fs(self.fs)

    def close(self):
        appswitch._os = os
        apptar._open = open
        apptar._remove = None
        appswitch.root("/")
        store.fs(False)
        store.root("/store")
        _wipe(self.d)

    def put(self, name, data, d=None):
        p = self.d + "/" + (d + "/" if d else "")
        if d and not _isdir(p):
            os.mkdir(p)
        with open(p + name, "wb") as f:
            f.write(data)

    def get(self, name, d=None):
        try:
            with open(self.d + "/" + (d + "/" if d else "") + name, "rb") as f:
                return f.read()
        except OSError:
            return None

    def files(self):
        return sorted(n for n in os.listdir(self.d) if not _isdir(self.d + "/" + n))


def _run(fn):
    e = Env()
    try:
        fn(e)
    finally:
        e.close()


# -- tar, made by hand ---------------------------------------------------------------------------


def _oct(n, width):
    s = ("%o" % n).encode()
    return b"0" * (width - 1 - len(s)) + s + b"\0"


def header(name, size, type=b"0", size_field=None, prefix=b"", magic=b"ustar\x0000",
           bad_sum=False):
    h = bytearray(512)
    name = name.encode() if isinstance(name, str) else name
    h[0:len(name)] = name
    h[100:108] = _oct(0o644, 8)
    h[108:116] = _oct(0, 8)
    h[116:124] = _oct(0, 8)
    h[124:136] = size_field if size_field is not None else _oct(size, 12)
    h[136:148] = _oct(0, 12)
    h[156] = type[0]
    h[257:265] = magic
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    total = 0
    for c in h:
        total += c
    if bad_sum:
        total += 1
    h[148:156] = _oct(total, 7) + b" "
    return bytes(h)


def entry(name, data, **kw):
    return header(name, len(data), **kw) + data + bytes(-len(data) & 511)


END = bytes(1024)
MAIN = b"print('new main')\n" * 40  # 720 bytes: a file over one block
LIB = b"X = 2\n"


def good():
    return [entry("main.py", MAIN), entry("applib.py", LIB), entry("empty.txt", b""), END]


def unpack(e, parts, piece=512):
    """Feed the bundle (a list of byte strings, not joined: a board's heap is small) to Untar in
    pieces of `piece` bytes."""
    try:
        os.mkdir(e.d + "/" + NEW)
    except OSError:
        pass
    u = Untar(e.d + "/" + NEW)
    try:
        for data in parts:
            mv = memoryview(data)
            for i in range(0, len(data), piece):
                u.write(mv[i:i + piece])
        return u.finish()
    finally:
        u.close()


# -- names and the tar reader --------------------------------------------------------------------


def test_names():
    for ok in ("main.py", "app_2.mpy", "templates.csv", "cfg-x.json", "a.txt", "A" * 61 + ".py"):
        assert check_name(ok) is None, ok
    for bad, why in (("boot.py", "firmware"), ("microcot.json", "firmware"),
                     ("board.json", "firmware"), ("lib/x.py", "flat"), ("../main.py", "flat"),
                     ("/main.py", "flat"), ("store/cred.a", "flat"), (".py", "dot"),
                     (".hidden.py", "dot"), ("x.exe", "suffixes"), ("main", "suffixes"),
                     ("", "1 to 64"), ("A" * 62 + ".py", "1 to 64"), (b"\xff.py", "flat"),
                     ("a b.py", "flat"), ("a\\b.py", "flat")):
        r = check_name(bad)
        assert r is not None and why in r, (bad, r)


def test_good_bundle_in_pieces_of_any_size():
    _run(_good_bundle_in_pieces_of_any_size)


def _good_bundle_in_pieces_of_any_size(e):
    for piece in (1, 7, 511, 512, 1000, 4096):
        files = unpack(e, good() + [bytes(1024)] * 8, piece)  # tar's padding after the end
        assert files == ["main.py", "applib.py", "empty.txt"], piece
        assert e.get("main.py", NEW) == MAIN and e.get("applib.py", NEW) == LIB
        assert e.get("empty.txt", NEW) == b""


def test_hostile_and_damaged_bundles_are_refused():
    _run(_hostile_and_damaged_bundles_are_refused)


def _hostile_and_damaged_bundles_are_refused(e):
    # made one at a time: all of them at once would take a third of a small board's heap
    cases = (
        (lambda: [entry("../evil.py", b"x"), END], "flat"),
        (lambda: [entry("boot.py", b"x"), END], "firmware"),
        (lambda: [entry("microcot.json", b"{}"), END], "firmware"),
        (lambda: [entry("x.sh", b"x"), END], "suffixes"),
        (lambda: [entry(b"\xc3\xa9.py", b"x"), END], "flat"),
        (lambda: [entry("a" * 100, b"x"), END], "1 to 64"),  # no NUL in the name field
        (lambda: [entry("d.py", b"", type=b"5"), END], "entry type"),
        (lambda: [entry("pax.py", b"path=x\n", type=b"x"), END], "entry type"),
        (lambda: [entry("l.py", b"", type=b"2"), END], "entry type"),
        (lambda: [entry("p.py", b"x", prefix=b"lib"), END], "prefix"),
        (lambda: [entry("m.py", b"x", magic=b"\0" * 8), END], "ustar"),
        (lambda: [entry("m.py", b"x", bad_sum=True), END], "checksum"),
        (lambda: [header("big.py", 0, size_field=b"\x80" + b"\0" * 7 + b"\xff" * 4), END],
         "base-256"),
        (lambda: [header("big.py", 0, size_field=_oct(apptar.MAX_FILE + 1, 12)), END],
         "over"),
        (lambda: [header("big.py", 0, size_field=b"77777777777\0"), END], "over"),
        (lambda: [header("nan.py", 0, size_field=b"12x4" + b"\0" * 8), END], "octal"),
        (lambda: [header("nan.py", 0, size_field=b"\0" * 12), END], "octal"),
        (lambda: [entry("a.py", b"1"), entry("a.py", b"2"), END], "twice"),
        (lambda: [entry("a.py", b"1"), bytes(512), entry("b.py", b"2"), END], "after an end"),
        (lambda: [entry("f%d.py" % i, b"") for i in range(apptar.MAX_FILES + 1)] + [END],
         "more than"),
        (lambda: [b"\x01" * 512], "checksum"),
    )
    for make, why in cases:
        err = raises(BundleError, unpack, e, make(), 300)
        assert why in str(err), (why, str(err))


def test_truncated_bundles_are_refused():
    _run(_truncated_bundles_are_refused)


def _truncated_bundles_are_refused(e):
    data = b"".join(good())  # 3.5 KiB
    n = len(data) - 1024
    for cut in (0, 100, 512, 600, 1024 + 512 * 2, n - 1, n, n + 512):
        err = raises(BundleError, unpack, e, [memoryview(data)[:cut]], 256)
        assert "truncated" in str(err) or "no file" in str(err), (cut, str(err))
    assert "no file" in str(raises(BundleError, unpack, e, [END], 256))


def test_starting_over_after_seek_0():
    _run(_starting_over_after_seek_0)


def _starting_over_after_seek_0(e):
    os.mkdir(e.d + "/" + NEW)
    u = Untar(e.d + "/" + NEW)
    u.write(entry("stale.py", b"old" * 300)[:700])
    u.seek(0)  # the server ignored Range: from the start
    for data in good():
        u.write(data)
    assert u.finish() == ["main.py", "applib.py", "empty.txt"]
    assert sorted(os.listdir(e.d + "/" + NEW)) == ["applib.py", "empty.txt", "main.py"]


# -- the journal under power cuts ------------------------------------------------------------------

OLD_APP = {"main.py": b"old main", "util.py": b"old util", "keep.txt": b"untouched"}
NEW_APP = {"main.py": b"new main", "util.py": b"new util", "added.py": b"new module"}


def _staged(e):
    for n in OLD_APP:
        e.put(n, OLD_APP[n])
    os.mkdir(e.d + "/store")
    j = appswitch.stage(store, "77", "app", "2")
    for n in NEW_APP:
        e.put(n, NEW_APP[n], NEW)
    appswitch.staged(store, j, sorted(NEW_APP))


def _is_old(e):
    return e.files() == sorted(OLD_APP) and all(e.get(n) == OLD_APP[n] for n in OLD_APP)


def _is_new(e):
    want = dict(OLD_APP)
    want.update(NEW_APP)
    return e.files() == sorted(want) and all(e.get(n) == want[n] for n in want)


def _gone(e, d):
    return not _isdir(e.d + "/" + d)


def _boot(e):
    return appswitch.boot(config=e.d + "/none.json", arm=False, db=store)


def _each_cut(e, setup, act, check):
    """setup(); act() cut after n steps, for every n until it completes uncut; check(cut)."""
    n = 0
    while True:
        _wipe(e.d)
        os.mkdir(e.d)
        e.fs.budget = -1
        setup()
        e.fs.budget = n
        try:
            act()
            cut = False
        except PowerCut:
            cut = True
        e.fs.budget = -1
        check(cut)
        if not cut:
            return n
        n += 1


def test_switch_cut_anywhere_is_completed_or_undone_at_the_next_boot():
    _run(_switch_cut_anywhere_is_completed_or_undone_at_the_next_boot)


def _switch_cut_anywhere_is_completed_or_undone_at_the_next_boot(e):
    def check(cut):
        if not cut:  # the switch boot ran: the new application on trial, the old one kept
            j = store.load("app")
            assert j["state"] == "trial" and _is_new(e) and _gone(e, NEW)
            assert e.get("main.py", OLD) == OLD_APP["main.py"]
            return
        st = _boot(e)  # the next boot
        if st == "trial":  # the cut came before the switch began: this boot switched
            assert _is_new(e)
            appswitch.confirm(store, store.load("app"))
            assert _is_new(e) and _gone(e, OLD) and store.load("app")["state"] == "ok"
        else:  # the cut boot was the trial boot (or its switch had begun): never confirmed
            assert st == "rolledback", st
            assert _is_old(e) and _gone(e, OLD) and _gone(e, NEW)
            assert "did not connect" in store.load("app")["why"]

    steps = _each_cut(e, lambda: _staged(e), lambda: _boot(e), check)
    assert steps >= 8  # mkdir, journal, 2 moves out, 3 moves in, staging dir, journal


def test_rollback_cut_anywhere_is_finished_at_the_next_boot():
    _run(_rollback_cut_anywhere_is_finished_at_the_next_boot)


def _rollback_cut_anywhere_is_finished_at_the_next_boot(e):
    def setup():
        _staged(e)
        _boot(e)

    def check(cut):
        if cut:
            assert _boot(e) == "rolledback"
        assert _is_old(e) and _gone(e, OLD) and _gone(e, NEW)
        j = store.load("app")
        assert j["state"] == "rolledback" and "files" not in j
        assert _boot(e) == "rolledback" and _is_old(e)  # and again: nothing more happens

    _each_cut(e, setup, lambda: _boot(e), check)


def test_confirm_cut_anywhere_keeps_the_new_application():
    _run(_confirm_cut_anywhere_keeps_the_new_application)


def _confirm_cut_anywhere_keeps_the_new_application(e):
    def setup():
        _staged(e)
        _boot(e)

    def check(cut):
        st = _boot(e) if cut else store.load("app")["state"]
        if st == "rolledback":  # cut before the journal said ok: not confirmed, rolled back
            assert _is_old(e)
        else:
            assert st == "ok" and _is_new(e) and _gone(e, OLD)

    _each_cut(e, setup, lambda: appswitch.confirm(store, store.load("app")), check)


def test_a_failed_switch_rolls_back_with_the_reason():
    _run(_a_failed_switch_rolls_back_with_the_reason)


def _a_failed_switch_rolls_back_with_the_reason(e):
    _staged(e)
    os.remove(e.d + "/" + NEW + "/util.py")  # a staged file gone (the flash, a person)
    assert _boot(e) == "rolledback"
    assert _is_old(e) and "switching the files failed" in store.load("app")["why"]


def test_an_interrupted_download_leaves_the_application_alone():
    _run(_an_interrupted_download_leaves_the_application_alone)


def _an_interrupted_download_leaves_the_application_alone(e):
    for n in OLD_APP:
        e.put(n, OLD_APP[n])
    os.mkdir(e.d + "/store")
    store.save("app", {"state": "ok", "name": "app", "version": "1"})
    j = appswitch.stage(store, "78", "app", "2")
    assert j["prev"] == ["app", "1"]
    e.put("main.py", b"half", NEW)
    assert _boot(e) == "staging" and _gone(e, NEW) and _is_old(e)
    appswitch.settle(store, j)
    assert store.load("app") == {"state": "ok", "name": "app", "version": "1"}
