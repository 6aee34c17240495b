# c8y_SoftwareUpdate (agent.py _MANAGED, template 208: the operation's first entry: name,
# version, url, action, sha256): the application's files, replaced as one (appswitch.py).
#
# action "install": the bundle (an uncompressed tar, `microcot app bundle`) is downloaded over
# HTTPS (httpget.py: the device's own credentials, TLS verified with the agent's CA, resumed
# with Range after a broken connection, SHA-256 of the whole bundle checked when the operation
# has one) and unpacked while it arrives into /app.new (apptar.py, its name rules), one
# chunk per agent step (a generator) so that MQTT keeps alive. Only a complete, verified bundle
# is staged; the record's stage "staged" has data {"trial": True, ...}, the board resets, and
# /boot.py (appswitch.boot) switches the files and runs the new application on trial. Once its
# agent has connected, resume() confirms it: SUCCESSFUL. A new application that does not
# connect within cfg "app_trial" seconds (it crashes, hangs, cannot connect) is rolled back at
# the next boot, and the old one reports FAILED "new application <name> <version> rolled back:
# <why>".
#
# Any other action ("delete" included) fails at once: an application is replaced by an install,
# never removed (the board would be left without a main.py that can connect). Other entries
# than the first of c8y_SoftwareUpdate are not seen (the template takes the first).
#
# A failed download or bundle (HTTP error, wrong SHA-256, a refused name, truncated) removes
# /app.new and leaves the running application alone; a reboot during the download reports
# FAILED after the reboot. The journal keeps the name and version of what runs ("ok").
import gc

from .ops import Failed, sha256
from .state import unload

# Heap: the download needs this module, apptar.py and httpget.py; the switch's code
# (appswitch.py) is loaded before and after it, never with it (the ESP32 model, connected, has
# room for one or the other).


def handle(s, op):
    v = op.values + [""] * 5
    name, version, url, action = v[0], v[1], v[2], v[3]
    if action != "install":
        raise Failed("c8y_SoftwareUpdate action %r is not supported: only install (an "
                     "application is replaced by a bundle, never removed)" % action)
    if not url:
        raise Failed("c8y_SoftwareUpdate without a url")
    sha = sha256(v[4], "c8y_SoftwareUpdate")
    j = s.db().load("app")  # appswitch.DOC
    st = j.get("state") if isinstance(j, dict) else None
    if st not in (None, "ok", "rolledback", "staging"):
        raise Failed("an application update is under way (%s)" % st)
    return _install(s, op, name or "application", version, url, sha)


def _switcher(s):
    for m in ("httpget", "apptar"):
        unload(m)
    s.room()
    gc.collect()
    from . import appswitch

    return appswitch


def _install(s, op, name, version, url, sha):
    a = _switcher(s)
    j = a.stage(s.db(), op.id, name, version)
    staging = a.path(a.NEW)
    a = None
    unload("appswitch")
    op.stage("download")
    s.room()
    gc.collect()
    from . import apptar
    from .httpget import Download

    sink = apptar.Untar(staging)
    d = None
    try:
        d = Download(url, sink, sha256=sha, user=s.http_user(), password=s.cred["password"],
                     ssl_context=s.ctx if url.startswith("https:") else None,
                     timeout=s.cfg["timeout"], max_size=apptar.MAX_BUNDLE)
        while True:
            if d._s is None:
                s.room()  # a connection (TLS handshake) comes next: the reserve gives way
            if d.step():
                break
            yield
        files = sink.finish()
    except BaseException as e:
        sink.close()
        if d is not None:
            d.close()
        bad = isinstance(e, apptar.BundleError)
        sink = d = apptar = Download = None
        _switcher(s).abandon(s.db(), j)
        if bad:
            raise Failed(str(e))
        raise
    size = sink.size
    sink = d = apptar = Download = None
    _switcher(s).staged(s.db(), j, files)
    s.log("c8y_SoftwareUpdate %s: %s %s, %d files (%d bytes) staged: %s" % (
        op.id, name, version, len(files), size, " ".join(files)))
    op.stage("staged", {"trial": True, "name": name, "version": version})
    from .link import reset_board

    reset_board(s, "c8y_SoftwareUpdate %s: resetting into the new application" % op.id)


def resume(s, rec):
    """After the reboot (create.finish, connected): True when the new application runs (it is
    confirmed now), else why not."""
    from . import appswitch

    db = s.db()
    j = db.load(appswitch.DOC)
    stage = rec.get("stage")
    if not isinstance(j, dict) or j.get("op") != rec.get("id"):
        return "interrupted by a reboot during the %s (no application journal of it)" % stage
    st = j.get("state")
    what = "%s %s" % (j.get("name"), j.get("version"))
    if st == "trial":
        appswitch.confirm(db, j)
        s.log("c8y_SoftwareUpdate %s: new application %s confirmed" % (rec["id"], what))
        return True
    if st == "rolledback":
        appswitch.settle(db, j)
        return "new application %s rolled back: %s" % (what, j.get("why"))
    appswitch.abandon(db, j)
    if st == "staged":
        return ("new application %s downloaded but never switched in: /boot.py must call "
                "microcot.appswitch.boot() (microcot deploy --app puts it there)" % what)
    if st == "staging":
        return "interrupted by a reboot during the download of %s" % what
    return "application update of %s left in state %s" % (what, st)
