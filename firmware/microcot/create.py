# The agent's session setup after a connect (agent.py), one phase per step so that the heap
# holds one phase at a time. Every function takes the agent's State (state.py) as `s`.
#   0  seed 002's self-creation (once per boot): 100 look up the ID as external ID (200 -> the MO
#      id; 50,404 -> 101 create the MO, 102 register the ID as external ID), then 103 hardware +
#      firmware (document "dev" "fw" after a c8y_Firmware update, else microcot's version),
#      104/105 mobile (ICCID, IMSI when the modem gave it), 106 supported operations and logs,
#      107 the required availability (cfg "availability", minutes), only when they changed. The MO id is stored first (document "dev"), so a
#      reboot in between does not create a second device.
#   1  child devices: 120 create (template A), 121 link (template B), 106 their operations, each
#      step remembered in "dev" (a reboot creates no second child)
#   2  an operation that a reboot interrupted (document "op", ops.py) is reported (found,
#      outcome: the resume rules): SUCCESSFUL
#      when its kind's resume hook says so (c8y_Restart: it got to the reset), else FAILED; the
#      number of queued messages dropped while offline is sent as an event; then `ready`.
# Requests go one at a time, answers are matched by message id (DESIGN.md), each within `timeout`.
#
# Sans-I/O: the conversations (self_create, children) are generators that yield (request body,
# what) and are sent the rows of its answer; converse() drives one over the client, and a test
# drives one with answers of its own (tests/device/test_agent_units.py).
from . import hal, smartrest, tpl
from .ops import _digits, clip, reason
from .state import AgentError, iso, js, now


def step(s, ms):
    ph = s.phase
    if ph == 0:
        converse(s, self_create(s, s.db()))
        s.created = True
    elif ph == 1:
        children(s)
    else:
        finish(s)
    s.phase = ph + 1


def children(s):
    if s.kids_due:
        converse(s, kids(s, s.db()))
        s.kids_due = False


def _row(r):
    return "%d %s" % (r.code, ",".join(r.values))


def converse(s, conv):
    """Drive a conversation: publish what it yields, send it the rows of each answer."""
    try:
        body, what = next(conv)
        while True:
            body, what = conv.send(ask(s, body, what))
    except StopIteration:
        pass


def ask(s, body, what):
    """Publish a text request; the non-operation rows of the next answer on mr/."""
    c = s.c
    s.ans = []  # agent.py's callback puts the rows of the next answer here
    try:
        c.publish("ms/" + s.id, body, qos=1)
        body = None
        ms = int(s.cfg["timeout"] * 1000)
        t0 = hal.ticks_ms()
        while not s.ans:
            left = ms - hal.ticks_diff(hal.ticks_ms(), t0)
            if left <= 0:
                raise AgentError("no answer to %s within %d ms" % (what, ms))
            c.poll(left)
        return s.ans
    finally:
        s.ans = None


def expect(rows, what, code):
    """The first row with `code`; AgentError naming the answer otherwise."""
    for r in rows:
        if r.code == code:
            return r
    raise AgentError("%s: %s" % (what, _row(rows[0])))


def _req(s, *values):
    return s.body(smartrest.row(values))


def op_list(names):
    """Fragment names as the JSON array's inside: "a","b" (sorted, unique)."""
    return ",".join(['"%s"' % js(n) for n in sorted(set(names))])


def self_create(s, store):
    """The self-creation conversation (a generator, see converse); store: store.py."""
    dev = s.dev
    did = s.id
    r = (yield _req(s, tpl.LOOKUP, did), "the external ID lookup")[0]
    if r.code == tpl.R_EXTID:
        mo = r.values[1]
    elif r.code == 50 and r.values[:1] == ["404"]:
        mo = dev.get("mo")
        if mo:  # created before, but its external ID never made it
            r = (yield _req(s, tpl.EXTID, int(mo), did), "the external ID")[0]
            if r.code != tpl.R_EXTID:
                s.log("stored managed object %s is gone: creating a new one" % mo)
                mo = None
        if not mo:
            name = s.cfg["name"].replace("{id}", did)
            what = "creating the device"
            mo = expect((yield _req(s, tpl.CREATE, did, js(name)), what), what,
                        tpl.R_DEVICE).values[0]
            dev["mo"] = mo
            dev["info"] = None
            dev["kids"] = {}
            store.save("dev", dev)  # before anything else: a reboot now must not create again
            s.stats["created"] = True
            s.log("created managed object %s" % mo)
            what = "registering the external ID"
            expect((yield _req(s, tpl.EXTID, int(mo), did), what), what, tpl.R_EXTID)
    else:
        raise AgentError("external ID lookup: %s" % _row(r))
    if dev.get("mo") != mo:
        dev["mo"] = mo
        dev["info"] = None
        dev["kids"] = {}
    s.mo = mo
    import microcot

    model = hal.config().get("name") or hal.family()
    ops = op_list([h[0] for h in s.handlers.values() if h[1] is not None])
    logs = '"agent"' if s.ring is not None else ""
    imsi = dev.get("imsi")
    fw = dev.get("fw")
    if not isinstance(fw, dict):
        fw = {"name": "microcot", "version": microcot.__version__, "url": ""}
    avail = int(s.cfg["availability"] or 0)
    fp = "|".join((fw["name"], fw["version"], fw.get("url", ""), model, str(imsi), ops, logs,
                   str(avail)))
    if dev.get("info") != fp:
        m = int(mo)
        rows = [smartrest.row((tpl.HARDWARE, m, js(did), js(model), js(fw["name"]),
                               js(fw["version"]), js(fw.get("url", ""))))]
        if dev.get("src") == "iccid":
            if imsi:
                rows.append(smartrest.row((tpl.MOBILE_IMSI, m, did, imsi)))
            else:
                rows.append(smartrest.row((tpl.MOBILE, m, did)))
        rows.append(smartrest.row((tpl.OPERATIONS, m, ops, logs)))
        if avail > 0:
            rows.append(smartrest.row((tpl.AVAILABILITY, m, avail)))
        for r in (yield s.body("\n".join(rows)), "the device information"):
            if r.code != tpl.R_DEVICE:
                raise AgentError("device information: %s" % _row(r))
        dev["info"] = fp
    store.save("dev", dev)


def kids(s, store):
    """Create (template A) and link (template B) each child once; remembered in "dev" (a
    conversation, see converse)."""
    dev = s.dev
    kids = dev.get("kids")
    if not isinstance(kids, dict):
        kids = dev["kids"] = {}
    for name in list(s.kids):
        k = s.kids[name]
        st = kids.get(name)
        if not isinstance(st, list) or len(st) != 3:
            what = "creating child %s" % name
            mo = expect((yield _req(s, tpl.CHILD, js(name)), what), what, tpl.R_CHILD).values[0]
            st = kids[name] = [mo, 0, ""]
            store.save("dev", dev)
            s.log("child %s: managed object %s" % (name, mo))
        if not st[1]:
            # template B answers nothing: the tenant query in the same request confirms it
            what = "linking child %s" % name
            for r in (yield _req(s, tpl.LINK, int(s.mo), int(st[0])) + b"\n140", what):
                if r.code < 60:
                    raise AgentError("%s: %s" % (what, _row(r)))
            st[1] = 1
            store.save("dev", dev)
        ops = op_list(k[1])
        if ops and st[2] != ops:
            what = "operations of child %s" % name
            expect((yield _req(s, tpl.OPERATIONS, int(st[0]), ops, ""), what), what,
                   tpl.R_CHILD)
            st[2] = ops
            store.save("dev", dev)
        k[2] = st[0]


def found(rec):
    """A record as read at boot, in today's shape (the old {"restart": id} too), or None."""
    if not isinstance(rec, dict):
        return None
    if "restart" in rec and "id" not in rec:  # before the record was general
        rec = {"id": rec["restart"], "kind": "c8y_Restart", "rtid": tpl.R_RESTART,
               "stage": "reset"}
    if not _digits(str(rec.get("id", ""))):
        return None
    return rec


def outcome(rec, resume):
    """How an operation interrupted by a reboot is reported: (True, None) SUCCESSFUL, or
    (False, reason) FAILED. resume: its kind's hook fn(record) -> True (it completed), a str
    (why it failed) or anything else (failed); None: the kind has no hook."""
    why = "interrupted by a reboot (stage %s)" % rec.get("stage")
    if resume is None or rec.get("child"):
        return False, why
    try:
        r = resume(rec)
    except Exception as e:
        return False, reason(e)
    if r is True:
        return True, None
    return False, clip(r) if isinstance(r, str) and r else why


def resumed(s, rec):
    """The status row (template id, values) for an operation found in progress at boot."""
    h = s.handlers.get(rec.get("rtid"))
    ok, why = outcome(rec, h[2] if h is not None and len(h) > 2 else None)
    oid = int(rec["id"])
    return (tpl.SUCCESSFUL, oid) if ok else (tpl.FAILED, oid, js(why))


def finish(s):
    """An operation that a reboot interrupted, the drop count; then the agent is ready."""
    raw = s.oprec  # read at start-up (session.identify)
    rec = found(raw)
    s.oprec = None
    c = s.c
    if rec is not None:
        row = resumed(s, rec)
        s.log("%s %s: back after the restart, %s" % (rec.get("kind"), rec["id"],
                                                  "SUCCESSFUL" if row[0] == tpl.SUCCESSFUL
                                                  else "FAILED"))
        c.wait_puback(c.publish("ms/" + s.id, s.body(smartrest.row(row)), qos=1))
        s.recent.append(str(rec["id"]))  # handled: a redelivery is not run again
    if raw is not None:
        s.db().delete("op")
    n = s.q.dropped
    if n:  # reported with the device's own time, before the rest of the queue
        s.q.dropped = 0
        c.publish("ms/" + s.id, _req(s, tpl.EVENT, int(s.mo), "mc_QueueOverflow",
                                     "%d queued messages were dropped while offline" % n,
                                     iso(now())), qos=1)
    s.ready = True
    s.trial = None
    s.log("ready: managed object %s" % s.mo)
