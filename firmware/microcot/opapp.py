# c8y_SoftwareUpdate (agent.py _MANAGED, template 208: the operation's first entry: name,
# version, url, action, sha256): the application's files, replaced as one (appswitch.py).
#
# action "install": checked on arrival, then, like c8y_Firmware (opfw.py), the download runs in
# a boot of its own (stage "boot", agent.start calls boot() before the MQTT code loads): a
# connected agent has no room for a second TLS session and the download's code (the Pico W
# model: mbedTLS could not allocate its buffers with 47 KB free; the ESP32 model: httpget did
# not import). The bundle (an uncompressed tar, `microcot app bundle`) comes over HTTPS
# (httpget.py: the device's own credentials, TLS verified with the agent's CA, resumed with
# Range after a broken connection, SHA-256 of the whole bundle checked when the operation has
# one) and is unpacked while it arrives into /app.new (apptar.py, its name rules). Only a
# complete, verified bundle is staged; the record's stage "staged" has data {"trial": True,
# ...}, the board resets, and /boot.py (appswitch.boot) switches the files and runs the new
# application on trial. Once its agent has connected, resume() confirms it: SUCCESSFUL. A new
# application that does not connect within cfg "app_trial" seconds (it crashes, hangs, cannot
# connect) is rolled back at the next boot, and the old one reports FAILED "new application
# <name> <version> rolled back: <why>".
#
# Any other action ("delete" included) fails at once: an application is replaced by an install,
# never removed (the board would be left without a main.py that can connect). Other entries
# than the first of c8y_SoftwareUpdate are not seen (the template takes the first).
#
# A failed download or bundle (HTTP error, wrong SHA-256, a refused name, truncated) removes
# /app.new and leaves the running application alone (stage "failed", reported once connected);
# a reboot during the download reports FAILED after the reboot ("fetching": never downloaded
# twice). The journal keeps the name and version of what runs ("ok").
import gc

from . import hal
from .ops import Failed, reason, sha256
from .state import Restart, unload

# Heap: the download's boot loads this module, apptar.py and httpget.py; the switch's code
# (appswitch.py) before and after it, never with it.


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
    from .link import settle

    settle(s)  # EXECUTING acknowledged before the restart
    op.stage("boot", {"name": name or "application", "version": version, "url": url,
                      "sha256": sha})
    raise Restart("c8y_SoftwareUpdate %s: downloading in a boot of its own" % op.id)


def _switcher(s):
    for m in ("httpget", "apptar"):
        unload(m)
    gc.collect()
    from . import appswitch

    return appswitch


def boot(s, rec):
    """The download, before the agent connects (agent.start): the bundle into /app.new, staged,
    a hard reset into boot.py's switch; or the record says why not."""
    db = s.db()
    d = rec["data"]
    rec["stage"] = "fetching"
    db.save("op", rec)
    name, version, url, sha = d["name"], d["version"], d["url"], d.get("sha256")
    a = _switcher(s)
    j = a.stage(db, rec["id"], name, version)
    staging = a.path(a.NEW)
    a = None
    unload("appswitch")
    gc.collect()
    sink = None
    try:
        from . import apptar
        from .httpget import Download
        from .tlsctx import for_config

        sink = apptar.Untar(staging)
        dl = Download(url, sink, sha256=sha, user=s.http_user(), password=s.cred["password"],
                      ssl_context=for_config(s.cfg) if url.startswith("https:") else None,
                      timeout=s.cfg["timeout"], max_size=apptar.MAX_BUNDLE)
        while not dl.step():
            pass
        files = sink.finish()
        size = sink.size
    except Exception as e:
        if sink is not None:
            sink.close()
        sink = dl = apptar = Download = None
        _switcher(s).abandon(db, j)
        rec["stage"] = "failed"
        d["why"] = str(e) if type(e).__name__ == "BundleError" else reason(e)
        db.save("op", rec)
        s.log("c8y_SoftwareUpdate %s: failed: %s" % (rec["id"], d["why"]))
        return
    sink = dl = apptar = Download = None
    _switcher(s).staged(db, j, files)
    s.log("c8y_SoftwareUpdate %s: %s %s, %d files (%d bytes) staged: %s" % (
        rec["id"], name, version, len(files), size, " ".join(files)))
    rec["stage"] = "staged"
    d["trial"] = True
    db.save("op", rec)
    s.q.flush()
    s.log("c8y_SoftwareUpdate %s: resetting into the new application" % rec["id"])
    hal.reset()
    while True:  # the virtual board's host may take a moment to restart the interpreter
        hal.sleep_ms(100)


def resume(s, rec):
    """After the reboot (create.finish, connected): True when the new application runs (it is
    confirmed now), else why not."""
    stage = rec.get("stage")
    d = rec.get("data")
    if stage == "failed" and isinstance(d, dict):  # boot() could not stage it
        return d.get("why") or "download failed"
    from . import appswitch

    db = s.db()
    j = db.load(appswitch.DOC)
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
