# Atomic store: runs on CPython (pytest) and on a board / the unix port. Power cuts are simulated
# with an in-memory filesystem that stops at every single step (each byte written, each remove,
# rename, mkdir), so the crash tests do not wear a board's flash. A few tests use the real
# filesystem in a scratch directory that they remove again.
import os

from dt import raises, rmtree, scratch_dir

from microcot import store


class PowerCut(Exception):
    pass


class _Reader:
    def __init__(self, data):
        self.data = data

    def read(self, n=-1):
        out = self.data if n < 0 else self.data[:n]
        self.data = self.data[len(out):]
        return out

    def close(self):
        pass


class _Writer:
    def __init__(self, fs, path):
        self.fs = fs
        self.path = path

    def write(self, data):
        # one step per byte: the cut can leave any prefix of what was written on the medium
        for b in bytes(data):
            self.fs.step()
            self.fs.files[self.path] = self.fs.files[self.path] + bytes((b,))
        return len(data)

    def flush(self):
        pass

    def close(self):
        pass


class FakeFs:
    """In-memory files; after `budget` steps every operation raises PowerCut. fat=True makes
    rename fail onto an existing file, as FAT does on MicroPython."""

    def __init__(self, fat=False):
        self.files = {}
        self.dirs = set()
        self.fat = fat
        self.steps = 0
        self.budget = -1
        self.log = []

    def step(self):
        if 0 <= self.budget <= self.steps:
            raise PowerCut()
        self.steps += 1

    def _parent_ok(self, path):
        parent = path[: path.rfind("/")] or "/"
        if parent != "/" and parent not in self.dirs:
            raise OSError(2)

    def open(self, path, mode):
        if "r" in mode:
            if path not in self.files:
                raise OSError(2)
            return _Reader(self.files[path])
        self._parent_ok(path)
        self.step()
        self.log.append(("open", path))
        self.files[path] = b""
        return _Writer(self, path)

    def remove(self, path):
        if path not in self.files:
            raise OSError(2)
        self.step()
        self.log.append(("remove", path))
        del self.files[path]

    def rename(self, old, new):
        if old not in self.files:
            raise OSError(2)
        if self.fat and new in self.files:
            raise OSError(17)
        self.step()
        self.log.append(("rename", old, new))
        self.files[new] = self.files.pop(old)

    def mkdir(self, path):
        if path in self.dirs:
            raise OSError(17)
        self.step()
        self.dirs.add(path)

    def sync(self, f):
        f.flush()

    def sync_all(self):
        pass


def fresh(fat=False):
    fs = FakeFs(fat)
    store.fs(fs)
    store.root("/s")
    return fs


def done():
    store.fs(False)
    store.root("/store")


def _real(fn):
    d = scratch_dir('tmp_store_test')
    store.fs(False)
    store.root(d)
    try:
        fn(d)
    finally:
        done()
        rmtree(d)


# -- basics on the real filesystem -----------------------------------------------------------------


def test_roundtrip_real_fs():
    def body(d):
        assert store.load("creds") is None
        assert store.load("creds", {"x": 1}) == {"x": 1}
        assert store.status("creds") == "missing"
        doc = {"user": "8949", "password": "s3cr3t", "n": [1, 2.5, None, True], "s": "ä,\"\n"}
        store.save("creds", doc)
        assert store.load("creds") == doc
        assert store.status("creds") == "ok"
        store.save("creds", "v2")
        store.save("creds", 3)
        assert store.load("creds") == 3
        names = sorted(os.listdir(d))
        assert names == ["creds.a", "creds.b"], names
        store.delete("creds")
        assert store.load("creds", "gone") == "gone"
        assert os.listdir(d) == []
        store.delete("creds")  # deleting what is not there is fine

    _real(body)


def test_on_flash_format():
    def body(d):
        store.save("state", {"a": 1})
        with open(d + "/state.a", "rb") as f:
            data = f.read()
        assert data.startswith(b"MCS1 ") and data.endswith(b'\n{"a": 1}'), data
        hdr = data[: data.find(b"\n")].split(b" ")
        assert hdr[2] == b"1" and hdr[3] == b"8"
        import binascii

        assert int(hdr[1], 16) == binascii.crc32(b'1 8\n{"a": 1}')

    _real(body)


def test_corrupt_newest_falls_back_real_fs():
    def body(d):
        store.save("cfg", {"gen": 1})
        store.save("cfg", {"gen": 2})
        newest = d + "/cfg.b"
        with open(newest, "rb") as f:
            good = f.read()
        # a flipped bit in the JSON, in the header, a truncation, trailing bytes, an empty file
        for bad in (good[:-2] + b"3}", good.replace(b"MCS1", b"MCS2"), good[:-1], good + b" ",
                    b"", good[:5]):
            with open(newest, "wb") as f:
                f.write(bad)
            assert store.load("cfg") == {"gen": 1}, bad
            assert store.status("cfg") == "fallback"
        with open(d + "/cfg.a", "wb") as f:
            f.write(b"garbage")
        assert store.load("cfg", "dflt") == "dflt"
        assert store.status("cfg") == "corrupt"
        # the store recovers: a save writes a fresh generation over the damage
        store.save("cfg", {"gen": 3})
        assert store.load("cfg") == {"gen": 3}

    _real(body)


def test_names_validated():
    for bad in ("", "../x", "a/b", "a.b", "x" * 33, "a b", None, 5):
        raises(ValueError, store.load, bad)
        raises(ValueError, store.save, bad, 1)
        raises(ValueError, store.delete, bad)
    e = raises(ValueError, store.save, "a/b", 1)
    assert "'/'" in str(e) and "position 1" in str(e)


def test_size_limit_and_json_only():
    fresh()
    try:
        store.save("big", "x" * (store.MAX_SIZE - 2))  # quotes make it exactly MAX_SIZE
        assert len(store.load("big")) == store.MAX_SIZE - 2
        e = raises(ValueError, store.save, "big", "x" * (store.MAX_SIZE - 1))
        assert "4097" in str(e) and "4096" in str(e) and "big" in str(e)
        assert len(store.load("big")) == store.MAX_SIZE - 2
        raises(ValueError, store.save, "obj", object())
        assert store.load("obj") is None
    finally:
        done()


def test_root_paths():
    fs = fresh()
    try:
        store.root("/")
        store.save("k", 1)
        assert "/k.a" in fs.files
        store.root("/x/y/")
        assert store.root() == "/x/y"
        store.save("k", 2)
        assert "/x/y/k.a" in fs.files and "/x" in fs.dirs and "/x/y" in fs.dirs
        raises(ValueError, store.root, "")
    finally:
        done()


# -- power cuts --------------------------------------------------------------------------------


def _save_steps(fat, setup, doc):
    fs = fresh(fat)
    setup()
    start = fs.steps
    store.save("creds", doc)
    return fs.steps - start


def _cut_during(fs, fn, k):
    fs.budget = fs.steps + k
    try:
        fn()
        finished = True
    except PowerCut:
        finished = False
    fs.budget = -1
    return finished


def _every_cut(fat, setup, old):
    new = {"user": "dev", "password": "NEW-secret-2"}
    total = _save_steps(fat, setup, new)
    assert total > 40
    for k in range(total + 1):
        fs = fresh(fat)
        setup()
        finished = _cut_during(fs, lambda: store.save("creds", new), k)
        got = store.load("creds", "default")
        assert finished == (k == total), k
        if finished:
            assert got == new
        else:
            assert got in (old, new), (k, got)
        assert store.status("creds") in ("ok", "missing")
        # after the reboot the store works: the next save and load succeed
        store.save("creds", {"after": k})
        assert store.load("creds") == {"after": k}
    done()


def test_power_cut_at_every_step_first_save():
    _every_cut(False, lambda: None, "default")


def test_power_cut_at_every_step_with_two_generations():
    def setup():
        store.save("creds", {"gen": 1})
        store.save("creds", {"gen": 2})

    _every_cut(False, setup, {"gen": 2})


def test_power_cut_at_every_step_fat_rename():
    def setup():
        store.save("creds", {"gen": 1})
        store.save("creds", {"gen": 2})
        store.save("creds", {"gen": 3})

    _every_cut(True, setup, {"gen": 3})


def test_repeated_power_cuts():
    # a cut during a save, then reboots that cut the following saves too: what load returns is
    # always one of the documents a save was started with, and never goes back past the last
    # completed one
    docs = [{"g": i} for i in range(4)]
    total = _save_steps(False, lambda: store.save("creds", docs[0]), docs[1])
    try:
        for k in range(0, total + 1, 3):
            for j in range(0, total + 1, 5):
                fs = fresh()
                store.save("creds", docs[0])
                _cut_during(fs, lambda: store.save("creds", docs[1]), k)
                first = store.load("creds")
                assert first in (docs[0], docs[1])
                _cut_during(fs, lambda: store.save("creds", docs[2]), j)
                second = store.load("creds")
                assert second in (first, docs[2]), (k, j, first, second)
                store.save("creds", docs[3])
                assert store.load("creds") == docs[3]
    finally:
        done()


def test_power_cut_during_delete_never_resurrects_an_older_generation():
    def setup():
        store.save("creds", {"gen": 1})
        store.save("creds", {"gen": 2})

    fs = fresh()
    setup()
    start = fs.steps
    store.delete("creds")
    total = fs.steps - start
    try:
        for k in range(total + 1):
            fs = fresh()
            setup()
            _cut_during(fs, lambda: store.delete("creds"), k)
            assert store.load("creds", "none") in ({"gen": 2}, "none"), k
    finally:
        done()


def test_torn_slot_at_every_byte_offset():
    # a filesystem that is not atomic could leave the renamed slot torn: load must then return the
    # previous generation, whatever the length of the torn file
    fs = fresh()
    try:
        store.save("creds", {"gen": 1})
        store.save("creds", {"gen": 2, "pad": "x" * 20})
        good = fs.files["/s/creds.b"]
        for n in range(len(good)):
            fs.files["/s/creds.b"] = good[:n]
            assert store.load("creds") == {"gen": 1}, n
            # and a single corrupted byte anywhere
            fs.files["/s/creds.b"] = good[:n] + bytes(((good[n] + 1) & 0xFF,)) + good[n + 1:]
            assert store.load("creds") == {"gen": 1}, n
        fs.files["/s/creds.b"] = good
        assert store.load("creds") == {"gen": 2, "pad": "x" * 20}
    finally:
        done()


def test_stale_tmp_is_ignored_and_replaced():
    fs = fresh()
    try:
        store.save("creds", {"gen": 1})
        fs.files["/s/creds.tmp"] = b"MCS1 half-writ"
        assert store.load("creds") == {"gen": 1}
        store.save("creds", {"gen": 2})
        assert "/s/creds.tmp" not in fs.files
        assert store.load("creds") == {"gen": 2}
        store.delete("creds")
        assert fs.files == {}
    finally:
        done()
