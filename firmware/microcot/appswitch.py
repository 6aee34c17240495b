# The application's files and their atomic replacement (c8y_SoftwareUpdate, opapp.py; /boot.py).
#
# The application is what a bundle names at the board's root: main.py, its modules (.py, .mpy),
# templates.csv, data files. A bundle is an uncompressed ustar tar (`microcot app bundle` makes
# one with Python's tarfile). The rules for its names (check_name, also the host's): flat names of
# 1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with a dot, ending in .py .mpy .csv
# .json .txt; never boot.py, microcot.json or board.json (the firmware's: boot.py must stay able
# to roll back, the settings hold the credentials' context); flat names keep everything out of
# /store and /lib. At most MAX_FILES files of at most MAX_FILE bytes each, no duplicates. Files
# the bundle does not name stay as they are.
#
# Untar is httpget.Download's sink: it parses the tar while it downloads (one 512-byte header
# buffer, nothing sized by what the bundle says) and writes each file into the staging directory
# /app.new/; the whole bundle is never in RAM. Refused with a reason (BundleError): a bad header
# checksum, anything but ustar regular files (directories, links, pax headers: long or non-ASCII
# names), a name prefix, a size field that is not plain octal or over MAX_FILE, an archive that
# ends before its end-of-archive blocks (truncated). Bytes after the end-of-archive are ignored
# (tar pads its records with zeros).
#
# The journal: store.py document "app" {state, op, name, version, files, added, why, prev}.
#   ok          the application named (name, version) runs; prev: [name, version] of the one
#               before an update (restored as "ok" after a rollback is reported)
#   staging     opapp.py downloads into /app.new (a reboot: boot() clears /app.new, resume
#               reports FAILED)
#   staged      /app.new holds the complete, verified files; the next boot switches
#   switching   added (the files that had no current version) is fixed; the files move
#   trial       the new files are in place, the old ones in /app.old: this boot is its trial
#   rollback    why: the old files move back
#   rolledback  done; opapp.resume reports FAILED "new application ... rolled back: <why>"
# Every step is idempotent and decided by what the filesystem shows, so a power cut anywhere is
# completed (switching) or undone (rollback) by the next boot:
#   switch, per file f: f not added, /app.old/f missing, /app.new/f there -> /f to /app.old/f;
#                       /app.new/f there -> to /f        (renames only onto free names: FAT)
#   rollback, per file: f added -> remove /f; /app.old/f there -> remove /f, /app.old/f to /f
#   confirm: the journal says "ok" first, then /app.old goes (a cut in between leaves only
#            garbage, which boot() clears)
#
# boot() (called by /boot.py, before main.py, only when /app.new or /app.old exists, so a normal
# boot costs two stat calls): finishes a half-done switch or rollback (a switch it finishes
# starts the trial: that boot is the trial boot); a "trial" found at boot was never confirmed
# and is rolled back (any restart before the agent connected counts, the agent's own soft
# resets, a power cut and a Ctrl-D on the REPL included); in the trial boot it arms
# a one-shot machine.Timer (where the port has one; else a _thread, the unix port and the virtual
# board) that hard-resets the board after cfg "app_trial" seconds, so that a main.py that crashes
# (the board waits in the REPL) or hangs is rolled back at the next boot. The agent also resets
# at that deadline when it runs but cannot connect (the operation's record has {"trial": True}:
# ident.py, agent.step). confirm() (opapp.resume, once the new application's agent is connected)
# disarms the timer, records "ok" and deletes /app.old.
import os

MAX_FILES = 16
MAX_NAME = 64
MAX_FILE = 256 * 1024
MAX_BUNDLE = 1024 * 1024  # bytes a download may announce (httpget max_size)
SUFFIXES = (".py", ".mpy", ".csv", ".json", ".txt")
RESERVED = ("boot.py", "microcot.json", "board.json")
NEW = "app.new"
OLD = "app.old"
DOC = "app"
_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"

_root = "/"
_os = os  # tests put a filesystem that fails at a chosen step here (and into _open)
_open = open


class BundleError(Exception):
    pass


def root(path=None):
    """The directory holding the application (default /); with a path, set it first."""
    global _root
    if path is not None:
        _root = path.rstrip("/") + "/"
    return _root


def check_name(name):
    """None when `name` (str or bytes) may name a file of a bundle, else why not."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    shown = repr(b[:MAX_NAME])[1:]
    if not 0 < len(b) <= MAX_NAME:
        return "file %s: a name has 1 to %d characters" % (shown, MAX_NAME)
    for c in b:
        if c not in _CHARS:
            return ("file %s: names are flat (no directories: /lib and /store are the "
                    "firmware's) and only of A-Z a-z 0-9 _ . -" % shown)
    if b[0] == 46:
        return "file %s: a name must not start with a dot" % shown
    n = str(b, "ascii")
    if n in RESERVED:
        return "file %s: belongs to the firmware, not to the application" % n
    for suf in SUFFIXES:
        if n.endswith(suf) and len(n) > len(suf):
            return None
    return "file %s: the allowed suffixes are %s" % (n, " ".join(SUFFIXES))


def _p(name, d=None):
    return _root + name if d is None else _root + d + "/" + name


def _exists(path):
    try:
        _os.stat(path)
        return True
    except OSError:
        return False


def _mkdir(d):
    try:
        _os.mkdir(_p(d))
    except OSError:
        pass  # there already


def rmtree(d):
    """Remove a flat directory under the root and what it holds (nothing when it is missing)."""
    path = _p(d)
    try:
        names = _os.listdir(path)
    except OSError:
        return
    for n in names:
        _os.remove(path + "/" + n)
    _os.rmdir(path)


def _octal(b, what, limit):
    # a ustar number: optional spaces, octal digits, then NUL or spaces; base-256 (the high bit,
    # GNU's large numbers) and values over limit are refused before they can grow
    if b[0] & 0x80:
        raise BundleError("%s in base-256 refused" % what)
    i = 0
    n = len(b)
    while i < n and b[i] == 32:
        i += 1
    v = 0
    j = i
    while j < n and 48 <= b[j] <= 55:
        v = v * 8 + b[j] - 48
        if v > limit:
            raise BundleError("%s over %d" % (what, limit))
        j += 1
    if j == i:
        raise BundleError("%s is not an octal number" % what)
    while j < n:
        if b[j] not in (0, 32):
            raise BundleError("%s is not an octal number" % what)
        j += 1
    return v


class Untar:
    """A download sink (write, seek(0)) that unpacks a bundle into /app.new as it arrives."""

    def __init__(self):
        self.hdr = bytearray(512)
        self.f = None
        self.reset()

    def reset(self):
        self.close()
        self.n = 0  # header bytes collected
        self.left = 0  # bytes of the current file still to come
        self.pad = 0  # padding to the next 512-byte block
        self.end = 0  # zero blocks seen (two end the archive)
        self.files = []
        self.size = 0  # bytes of all files

    def close(self):
        f, self.f = self.f, None
        if f is not None:
            f.close()

    def seek(self, pos):
        # the server ignored a Range request: the download starts over, and so does the parse
        if pos:
            raise OSError("Untar can only start over")
        self.reset()
        rmtree(NEW)
        _mkdir(NEW)

    def write(self, buf):
        mv = memoryview(buf)
        n = len(mv)
        i = 0
        while i < n:
            if self.left:
                k = min(self.left, n - i)
                self.f.write(mv[i:i + k])
                self.left -= k
                i += k
                if not self.left:
                    self.close()
            elif self.pad:
                k = min(self.pad, n - i)
                self.pad -= k
                i += k
            elif self.end >= 2:
                break  # after the end-of-archive: tar's record padding
            else:
                k = min(512 - self.n, n - i)
                self.hdr[self.n:self.n + k] = mv[i:i + k]
                self.n += k
                i += k
                if self.n == 512:
                    self.n = 0
                    self._header()
        return n

    def _header(self):
        h = self.hdr
        total = 0
        for c in h:
            total += c
        if not total:
            self.end += 1
            return
        if self.end:
            raise BundleError("bundle: a header after an end-of-archive block")
        for c in h[148:156]:
            total += 32 - c  # the checksum counts its own field as spaces
        if _octal(h[148:156], "header checksum", 1 << 20) != total:
            raise BundleError("bundle: bad header checksum (not a tar, or damaged) at file %d"
                              % (len(self.files) + 1))
        if h[257:262] != b"ustar":
            raise BundleError("bundle: not a ustar archive (make it with microcot app bundle)")
        t = h[156]
        if t not in (0, 48):
            raise BundleError("bundle: only regular files, not entry type %r (directories, "
                              "links and pax headers are refused)" % chr(t))
        for c in h[345:500]:
            if c:
                raise BundleError("bundle: names with a directory prefix are refused")
        k = 0
        while k < 100 and h[k]:
            k += 1
        name = bytes(h[:k])
        why = check_name(name)
        if why is not None:
            raise BundleError("bundle: " + why)
        name = str(name, "ascii")
        if name in self.files:
            raise BundleError("bundle: file %s twice" % name)
        if len(self.files) >= MAX_FILES:
            raise BundleError("bundle: more than %d files" % MAX_FILES)
        size = _octal(h[124:136], "size of " + name, MAX_FILE)
        self.files.append(name)
        self.size += size
        self.f = _open(_p(name, NEW), "wb")
        self.left = size
        self.pad = -size & 511
        if not size:
            self.close()

    def finish(self):
        """The names of the files once the archive is complete; BundleError when it is not."""
        if self.left or self.pad or self.n or self.end < 2:
            self.close()
            raise BundleError("bundle: truncated (it ends before its end-of-archive blocks)")
        if not self.files:
            raise BundleError("bundle: no file in it")
        return self.files


# -- the journal and the switch ---------------------------------------------------------------


def stage(db, op, name, version):
    """A new journal for a download into an empty /app.new; returns it."""
    j = db.load(DOC)
    prev = None
    if isinstance(j, dict):
        prev = [j.get("name"), j.get("version")] if j.get("state") == "ok" else j.get("prev")
    j = {"state": "staging", "op": op, "name": name, "version": version, "prev": prev}
    db.save(DOC, j)
    rmtree(NEW)
    _mkdir(NEW)
    return j


def staged(db, j, files):
    j["state"] = "staged"
    j["files"] = files
    db.save(DOC, j)


def abandon(db, j):
    """An update that ends before its switch: /app.new goes, the journal says what runs."""
    rmtree(NEW)
    settle(db, j)


def settle(db, j):
    """The journal back to the application that runs: prev (or none) after a failed update."""
    p = j.get("prev")
    if p:
        db.save(DOC, {"state": "ok", "name": p[0], "version": p[1]})
    else:
        db.delete(DOC)


def switch(db, j):
    """Move the staged files in place, the current ones to /app.old (see the top)."""
    files = j["files"]
    if j["state"] == "staged":
        for f in files:
            if not _exists(_p(f, NEW)):
                raise OSError("staged file %s missing" % f)
        _mkdir(OLD)
        j["added"] = [f for f in files if not _exists(_p(f))]
        j["state"] = "switching"
        db.save(DOC, j)
    added = j["added"]
    for f in files:
        new = _p(f, NEW)
        if f not in added and not _exists(_p(f, OLD)) and _exists(new):
            _os.rename(_p(f), _p(f, OLD))
        if _exists(new):
            _os.rename(new, _p(f))
    for f in files:
        if not _exists(_p(f)) or _exists(_p(f, NEW)) or not (f in added or _exists(_p(f, OLD))):
            raise OSError("%s not switched" % f)
    rmtree(NEW)
    j["state"] = "trial"
    db.save(DOC, j)


def rollback(db, j, why):
    """The files as they were before the switch (see the top); the journal says why."""
    if j["state"] != "rollback":
        j["state"] = "rollback"
        j["why"] = why
        db.save(DOC, j)
    added = j.get("added")
    if added is not None:  # no "added": the switch never began, nothing moved
        for f in j["files"]:
            cur = _p(f)
            old = _p(f, OLD)
            if f in added:
                if _exists(cur):
                    _os.remove(cur)
            elif _exists(old):
                if _exists(cur):
                    _os.remove(cur)
                _os.rename(old, cur)
    rmtree(NEW)
    rmtree(OLD)
    j["state"] = "rolledback"
    for k in ("files", "added"):
        j.pop(k, None)
    db.save(DOC, j)


def confirm(db, j):
    """The new application connected: it stays."""
    disarm()
    db.save(DOC, {"state": "ok", "name": j.get("name"), "version": j.get("version"),
                  "op": j.get("op")})
    rmtree(OLD)


def _arm(seconds):
    # the callback lives in a dict of its own: a function of this module would keep the whole
    # module (unloaded after boot) on the heap for the length of the trial
    import sys

    import microcot

    g = {"x": [False]}
    try:
        import machine

        g["m"] = machine
        exec("def f(t=None):\n if not x[0]:\n  m.reset()\n", g)
        tm = getattr(machine, "Timer", None)
        if tm is not None:
            t = tm(0) if sys.platform == "esp32" else tm(-1)
            t.init(mode=tm.ONE_SHOT, period=int(seconds * 1000), callback=g["f"])
            g["t"] = t
        else:
            import _thread

            g["s"] = seconds
            exec("def w():\n import time\n time.sleep(s)\n f()\n", g)
            _thread.start_new_thread(g["w"], ())
    except (ImportError, AttributeError, OSError, ValueError) as e:
        print("appswitch: no trial deadline timer (%r): the agent's deadline alone" % (e,))
        return
    microcot.trial = g


def disarm():
    """The trial's deadline is off (the new application connected)."""
    import microcot

    g = getattr(microcot, "trial", None)
    if g is not None:
        g["x"][0] = True
        t = g.get("t")
        if t is not None:
            t.deinit()
        microcot.trial = None


def _config(path):
    import json

    cfg = {"store": "/store", "app_trial": 300}
    try:
        with open(path) as f:
            cfg.update(json.load(f))
    except (OSError, ValueError):
        pass
    return cfg


def boot(config="/microcot.json", arm=True, db=None):
    """At boot, before main.py (see the top); returns the journal's state afterwards."""
    cfg = _config(config)
    if db is None:
        from . import store

        store.root(cfg["store"])
        db = store
    j = db.load(DOC)
    st = j.get("state") if isinstance(j, dict) else None
    what = "" if st is None else "%s %s" % (j.get("name"), j.get("version"))
    if st in ("staged", "switching"):
        try:
            switch(db, j)
        except Exception as e:
            print("appswitch: switching to %s failed: %r" % (what, e))
            rollback(db, j, "switching the files failed: %r" % (e,))
            return j["state"]
        n = cfg["app_trial"]
        print("appswitch: switched to %s, on trial for %s s" % (what, n))
        if arm and n:
            _arm(n)
    elif st == "trial":
        why = ("it did not connect: the board restarted before the agent confirmed it "
               "(app_trial %s s)" % cfg["app_trial"])
        print("appswitch: rolling back %s: %s" % (what, why))
        rollback(db, j, why)
    elif st == "rollback":
        rollback(db, j, j.get("why"))
    elif st == "staging":
        rmtree(NEW)  # a download the reboot cut short; opapp.resume reports it
    elif st in ("ok", "rolledback"):
        rmtree(NEW)
        rmtree(OLD)
    else:
        print("appswitch: /app.new or /app.old without a journal: left alone")
    return st if j is None else j["state"]
