# The application's files and their atomic replacement (c8y_SoftwareUpdate: opapp.py; /boot.py).
#
# The application is what a bundle (apptar.py) names at the board's root: main.py, its modules
# (.py, .mpy), templates.csv, data files. opapp.py unpacks a bundle into the staging directory
# /app.new; this module switches it in, runs it on trial and rolls it back. Files a bundle does
# not name stay as they are.
#
# The journal: store.py document "app" {state, op, name, version, files, added, why, prev}.
#   ok          the application named (name, version) runs; prev: [name, version] of the one
#               before an update (restored as "ok" after a failed one is reported)
#   staging     opapp.py downloads into /app.new (a reboot: boot() clears /app.new, resume
#               reports FAILED)
#   staged      /app.new holds the complete, verified files; the next boot switches
#   switching   added (the files that had no current version) is fixed; the files move
#   trial       the new files are in place, the old ones in /app.old: this boot is its trial
#   rollback    why: the old files move back
#   rolledback  done; opapp.resume reports FAILED "new application ... rolled back: <why>"
# Every step is idempotent and decided by what the filesystem shows, so a power cut anywhere is
# completed (switching) or undone (rollback) by the next boot:
#   switch: first every staged file must be in /app.new; then per file f: f not added,
#           /app.old/f missing, /app.new/f there -> /f to /app.old/f; /app.new/f there -> to /f
#           (renames only onto free names: FAT refuses others); then each file must have moved
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

NEW = "app.new"
OLD = "app.old"
DOC = "app"

_root = "/"
_os = os  # tests put a filesystem that fails at a chosen step here


def root(path=None):
    """The directory holding the application (default /); with a path, set it first."""
    global _root
    if path is not None:
        _root = path.rstrip("/") + "/"
    return _root


def path(name, d=None):
    """The path of a file of the application (d: in /app.new or /app.old)."""
    return _root + name if d is None else _root + d + "/" + name


def _exists(p):
    try:
        _os.stat(p)
        return True
    except OSError:
        return False


def _mkdir(d):
    try:
        _os.mkdir(path(d))
    except OSError:
        pass  # there already


def rmtree(d):
    """Remove a flat directory under the root and what it holds (nothing when it is missing)."""
    p = path(d)
    try:
        names = _os.listdir(p)
    except OSError:
        return
    for n in names:
        _os.remove(p + "/" + n)
    _os.rmdir(p)


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
            if not _exists(path(f, NEW)):
                raise OSError("staged file %s missing" % f)
        _mkdir(OLD)
        j["added"] = [f for f in files if not _exists(path(f))]
        j["state"] = "switching"
        db.save(DOC, j)
    added = j["added"]
    for f in files:
        new = path(f, NEW)
        if f not in added and not _exists(path(f, OLD)) and _exists(new):
            _os.rename(path(f), path(f, OLD))
        if _exists(new):
            _os.rename(new, path(f))
    for f in files:
        if not _exists(path(f)) or _exists(path(f, NEW)) or not (f in added
                                                                 or _exists(path(f, OLD))):
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
            cur = path(f)
            old = path(f, OLD)
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


def _config(file):
    import json

    cfg = {"store": "/store", "app_trial": 300}
    try:
        with open(file) as f:
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
