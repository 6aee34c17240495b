# c8y_SendConfiguration and c8y_Configuration (agent._MANAGED: loaded only while one of them runs).
# The device's configuration is its settings file (/microcot.json): the file's own keys, not the
# defaults it leaves out, as load_config read them at boot (cfg "file": [path, keys]). Not read
# again: on the ESP32 model a connected agent has ~9 KB free in pieces of at most ~2 KB, and
# parsing a CA's PEM text (1.2 KB) takes two copies of it.
#   c8y_SendConfiguration  the keys as compact JSON, secrets masked and PEM text abbreviated
#       (settings.masked), into the device's c8y_Configuration (template 108); SUCCESSFUL.
#   c8y_Configuration  a JSON object of keys, each replacing the file's value. Keys not given stay:
#       a partial text must not cut a remote device off its broker (give a key its default value
#       to reset it). A masked secret or abbreviated PEM sent back keeps the device's. Checked
#       with settings.py (the host's `microcot config check` uses the same rules): a bad one
#       FAILS the operation naming the key, nothing is written. Written atomically (write). When
#       only keys in LIVE changed, SUCCESSFUL at once; else the board restarts, since the agent
#       and main.py read the others at start-up only, and resume() reports it SUCCESSFUL after
#       the reboot, sending the configuration the board then has (108).
import json
import os

from . import settings, tpl
from .ops import Failed
from .state import unload

# the keys that take effect without a restart: agent.log reads "log" at every line
LIVE = ("log",)


def handle(s, op):
    try:
        return _handle(s, op)
    finally:
        unload("settings")  # agent.py drops this module once no operation runs; this one too


def _handle(s, op):
    path, cur = _own(s)
    if op.rtid == tpl.R_SEND_CONFIG:
        send(s, cur)
        return None
    try:
        new = json.loads(op.text)
    except ValueError:
        raise Failed("the configuration is not valid JSON")
    if type(new) is not dict:
        raise Failed("the configuration must be a JSON object")
    new = settings.unmask(new, cur)
    why = settings.check(new, cur)
    if why is not None:
        raise Failed(why)
    changed = [k for k in new if k not in cur or cur[k] != new[k]]
    if not changed:
        return None
    if "store" in changed:  # the credentials and this operation's record would stay behind
        raise Failed("store: not changed remotely (the credentials are there)")
    cfg = dict(cur)
    cfg.update(new)
    write(path, cfg)
    s.cfg["file"][1] = cfg
    if all(k in LIVE for k in changed):
        for k in changed:
            s.cfg[k] = cfg[k]
        send(s, cfg)
        return None
    op.stage("restart")
    s.log("c8y_Configuration %s: %s changed, restarting the board" % (op.id, ",".join(changed)))
    _reset(s)


def resume(s, rec):
    """After the reboot: the configuration the board has now goes to the platform either way
    (a power cut between the write and the restart stage applied it too)."""
    try:
        send(s, _own(s)[1])
    finally:
        unload("settings")
    if rec.get("stage") == "restart":
        return True
    return "interrupted by a reboot (stage %s)" % rec.get("stage")


def _own(s):
    f = s.cfg.get("file")
    if not f:
        raise Failed("the settings are the application's, not a file")
    return f


def send(s, cfg):
    """The configuration into the device's c8y_Configuration (108), before the operation's status
    (same topic, QoS 1, in order)."""
    t = json.dumps(settings.masked(cfg), separators=(",", ":"))
    # as state.js, in two copies instead of a list of its characters: compact JSON has no
    # control characters, and the platform puts the value into the template's JSON string
    t = t.replace("\\", "\\\\").replace('"', '\\"')
    # the row as smartrest.row quotes it: the field holds quotes
    p = s.body('%d,%s,"%s"' % (tpl.CONFIGURATION, s.mo, t.replace('"', '""')))
    t = None
    if s.c is not None:
        try:
            s.c.publish("ms/" + s.id, p, qos=1)
            return
        except Exception as e:
            if getattr(e, "pid", None) is not None:
                return  # taken: the client sends it again after reconnecting
    s.st.append(p)


def write(path, cfg, fs=os):
    """Replace the file so that a power cut at any point leaves the old or the new one: the new
    settings go to path.new first (json.dump: written in pieces, no copy of the text on the
    heap), which then takes the name. Where rename cannot replace a file (FAT), the old one steps
    aside to path.old first; agent.load_config finishes a switch interrupted there (path
    missing: path.new, else path.old, takes the name). fs: os (tests: a filesystem that refuses
    or fails)."""
    new = path + ".new"
    with open(new, "w") as f:
        json.dump(cfg, f, separators=(",", ":"))
    try:
        fs.rename(new, path)
        return
    except OSError:
        pass
    old = path + ".old"
    try:
        fs.remove(old)
    except OSError:
        pass
    fs.rename(path, old)
    fs.rename(new, path)
    fs.remove(old)


def _reset(s):
    """link.reset_board (a seam the device tests replace); the record's stage "restart" makes
    resume() report it after the reboot."""
    from .link import reset_board

    reset_board(s)  # handle() logged why
