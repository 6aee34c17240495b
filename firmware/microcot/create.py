# The agent's session setup after a connect (agent.py) and the template collection check
# (session.py), one phase per step so that the heap holds one phase at a time. Every function
# takes the Agent as `a`.
#   0  seed 002's self-creation (once per boot): 100 look up the ID as external ID (200 -> the MO
#      id; 50,404 -> 101 create the MO, 102 register the ID as external ID), then 103 hardware +
#      firmware, 104/105 mobile (ICCID, IMSI when the modem gave it), 106 supported operations,
#      these three only when they changed. The MO id is stored first (document "dev"), so a
#      reboot in between does not create a second device.
#   1  child devices: 120 create (template A), 121 link (template B), 106 their operations, each
#      step remembered in "dev" (a reboot creates no second child)
#   2  a c8y_Restart that restarted the board is reported SUCCESSFUL; the number of queued
#      messages dropped while offline is sent as an event; then the agent is `ready`.
# Requests go one at a time, answers are matched by message id (DESIGN.md), each within `timeout`.
from . import hal, smartrest

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_T_LOOKUP = const(100)
_T_CREATE = const(101)
_T_EXTID = const(102)
_T_HARDWARE = const(103)
_T_MOBILE_IMSI = const(104)
_T_MOBILE = const(105)
_T_OPERATIONS = const(106)
_T_EVENT = const(111)
_T_CHILD = const(120)
_T_LINK = const(121)
_T_SUCCESSFUL = const(131)
_R_EXTID = const(200)
_R_DEVICE = const(201)
_R_CHILD = const(204)


def step(a, ms):
    ph = a._s.get("phase", 0)
    if ph == 0:
        self_create(a)
        a._s["done"] = True
    elif ph == 1:
        if a._s.get("kids"):
            children(a)
    else:
        finish(a)
    a._s["phase"] = ph + 1


def _err(msg):
    from .agent import AgentError

    return AgentError(msg)


def _row(r):
    return "%d %s" % (r.code, ",".join(r.values))


def ask(a, body, what):
    """Publish a text request; the non-operation rows of the next answer on mr/."""
    c = a._c
    a._ans = []  # link.on_msg puts the rows of the next answer here
    try:
        c.publish("ms/" + a.id, body, qos=1)
        body = None
        ms = int(a.cfg["timeout"] * 1000)
        t0 = hal.ticks_ms()
        while not a._ans:
            left = ms - hal.ticks_diff(hal.ticks_ms(), t0)
            if left <= 0:
                raise _err("no answer to %s within %d ms" % (what, ms))
            c.poll(left)
        return a._ans
    finally:
        a._ans = None


def expect(a, body, what, code):
    """ask(), then the first row with `code`; AgentError naming the answer otherwise."""
    rows = ask(a, body, what)
    for r in rows:
        if r.code == code:
            return r
    raise _err("%s: %s" % (what, _row(rows[0])))


def _req(a, *values):
    return a._body(smartrest.row(values))


def op_list(names):
    """Fragment names as the JSON array's inside: "a","b" (sorted, unique)."""
    from .agent import js

    return ",".join(['"%s"' % js(n) for n in sorted(set(names))])


def self_create(a):
    from .agent import js

    store = a._db()
    dev = a._s["dev"]
    did = a.id
    r = ask(a, _req(a, _T_LOOKUP, did), "the external ID lookup")[0]
    if r.code == _R_EXTID:
        mo = r.values[1]
    elif r.code == 50 and r.values[:1] == ["404"]:
        mo = dev.get("mo")
        if mo:  # created before, but its external ID never made it
            r = ask(a, _req(a, _T_EXTID, int(mo), did), "the external ID")[0]
            if r.code != _R_EXTID:
                a.log("stored managed object %s is gone: creating a new one" % mo)
                mo = None
        if not mo:
            name = a.cfg["name"].replace("{id}", did)
            mo = expect(a, _req(a, _T_CREATE, did, js(name)), "creating the device",
                        _R_DEVICE).values[0]
            dev["mo"] = mo
            dev["info"] = None
            dev["kids"] = {}
            store.save("dev", dev)  # before anything else: a reboot now must not create again
            a.stats["created"] = True
            a.log("created managed object %s" % mo)
            expect(a, _req(a, _T_EXTID, int(mo), did), "registering the external ID", _R_EXTID)
    else:
        raise _err("external ID lookup: %s" % _row(r))
    if dev.get("mo") != mo:
        dev["mo"] = mo
        dev["info"] = None
        dev["kids"] = {}
    a.mo = mo
    import microcot

    model = hal.config().get("name") or hal.family()
    ops = op_list([h[0] for h in a._handlers.values() if h[1] is not None])
    imsi = dev.get("imsi")
    fp = "|".join((microcot.__version__, model, str(imsi), ops))
    if dev.get("info") != fp:
        m = int(mo)
        rows = [smartrest.row((_T_HARDWARE, m, js(did), js(model), microcot.__version__))]
        if dev.get("src") == "iccid":
            if imsi:
                rows.append(smartrest.row((_T_MOBILE_IMSI, m, did, imsi)))
            else:
                rows.append(smartrest.row((_T_MOBILE, m, did)))
        rows.append(smartrest.row((_T_OPERATIONS, m, ops)))
        for r in ask(a, a._body("\n".join(rows)), "the device information"):
            if r.code != _R_DEVICE:
                raise _err("device information: %s" % _row(r))
        dev["info"] = fp
    store.save("dev", dev)


def children(a):
    """Create (template A) and link (template B) each child once; remembered in "dev"."""
    from .agent import js

    store = a._db()
    dev = a._s["dev"]
    kids = dev.get("kids")
    if not isinstance(kids, dict):
        kids = dev["kids"] = {}
    for name in list(a._kids):
        k = a._kids[name]
        st = kids.get(name)
        if not isinstance(st, list) or len(st) != 3:
            mo = expect(a, _req(a, _T_CHILD, js(name)), "creating child %s" % name,
                        _R_CHILD).values[0]
            st = kids[name] = [mo, 0, ""]
            store.save("dev", dev)
            a.log("child %s: managed object %s" % (name, mo))
        if not st[1]:
            # template B answers nothing: the tenant query in the same request confirms it
            for r in ask(a, _req(a, _T_LINK, int(a.mo), int(st[0])) + b"\n140",
                         "linking child %s" % name):
                if r.code < 60:
                    raise _err("linking child %s: %s" % (name, _row(r)))
            st[1] = 1
            store.save("dev", dev)
        ops = op_list(k[1])
        if ops and st[2] != ops:
            expect(a, _req(a, _T_OPERATIONS, int(st[0]), ops), "operations of child %s" % name,
                   _R_CHILD)
            st[2] = ops
            store.save("dev", dev)
        k[2] = st[0]
    a._s["kids"] = 0


def finish(a):
    """A finished c8y_Restart, the drop count; then the agent is ready."""
    op = a._s.pop("op", None)  # read at start-up (session.identify)
    c = a._c
    if isinstance(op, dict) and op.get("restart"):
        a.log("c8y_Restart %s: back after the restart" % op["restart"])
        c.wait_puback(c.publish("ms/" + a.id, _req(a, _T_SUCCESSFUL, int(op["restart"])), qos=1))
        a._db().delete("op")
    n = a.q.dropped
    if n:  # reported with the device's own time, before the rest of the queue
        from .agent import iso, now

        a.q.dropped = 0
        c.publish("ms/" + a.id, _req(a, _T_EVENT, int(a.mo), "mc_QueueOverflow",
                                     "%d queued messages were dropped while offline" % n,
                                     iso(now())), qos=1)
    a.ready = True
    a.log("ready: managed object %s" % a.mo)
