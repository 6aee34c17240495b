# The agent while connected (agent.py): incoming operations, sending the offline queue in text
# or binary SmartREST, operation status rows. On the heap only while the agent is connected.
# Every function takes the Agent as `a`.
#
# Operations (ops.py) are dispatched by response template id and device MO id: the device's own
# handler (built in: 202 c8y_Command runs a command of the table, 203 c8y_Restart restarts the
# board) or the handler of the child device with that MO id. Status: EXECUTING, then SUCCESSFUL
# (c8y_Command: with its result) or FAILED with the reason. An operation delivered again (QoS 1)
# while its id is among the last 16 is not run again.
#
# c8y_Restart: EXECUTING is sent and acknowledged, the operation id stored (document "op"), the
# queue moved to flash, the connection closed, the board reset (hal.reset: machine.reset(), a
# process restart on the virtual board); after the restart the setup (create.py) reports it
# SUCCESSFUL.
from . import hal, smartrest
from .ops import clip, parse, reason, run

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_T_EXECUTING = const(130)
_T_SUCCESSFUL = const(131)
_T_FAILED = const(132)
_T_RESULT = const(133)
_R_COMMAND = const(202)


_types = {}  # template id -> binary value types, from the templates file


def serve(a, ms):
    """One turn while connected: receive (at most ms waiting), children, operations, send."""
    c = a._c
    c.poll(ms)
    n = 0
    while n < 32 and c.poll(0) is not None:
        n += 1
    if a._s.get("kids"):
        a._call("create", "children")
    handle_ops(a)
    flush(a)


def handle_ops(a):
    from .agent import js

    while a._ops and a.ready:
        try:
            op = parse(a._ops.pop(0))
        except ValueError as e:
            a.log(str(e))
            continue
        if op.id in a._recent:
            continue  # delivered again (QoS 1): done already
        a._recent.append(op.id)
        if len(a._recent) > 16:
            a._recent.pop(0)
        a.stats["ops"] += 1
        oid = int(op.id)
        h = a._handlers[op.rtid]
        fn = h[1] if op.device == a.mo else None
        for name in a._kids:
            k = a._kids[name]
            if k[2] == op.device:
                op.child = name
                fn = k[0]
        if fn is None:
            status(a, _T_FAILED, oid, "no handler for %s on device %s" % (h[0], op.device))
            continue
        a.log("operation %s %s %s" % (op.id, h[0], op.child or ""))
        status(a, _T_EXECUTING, oid)
        try:
            if fn != 1:
                res = fn(op)
            elif op.rtid == _R_COMMAND:
                res = run(a._cmds, op.text)
            else:
                res = restart(a, op)
        except Exception as e:
            status(a, _T_FAILED, oid, js(reason(e)))
            continue
        if op.rtid == _R_COMMAND:
            status(a, _T_RESULT, oid, js(op.text), js(clip(res)))
        else:
            status(a, _T_SUCCESSFUL, oid)


def restart(a, op):
    a._db().save("op", {"restart": op.id})
    c = a._c
    t0 = hal.ticks_ms()
    while c.pending() and hal.ticks_diff(hal.ticks_ms(), t0) < 5000:
        c.poll(100)  # EXECUTING acknowledged
    a.q.flush()
    a.log("c8y_Restart %s: resetting the board" % op.id)
    c.disconnect()
    hal.reset()
    while True:  # the virtual board's host may take a moment to restart the interpreter
        hal.sleep_ms(100)


def status(a, *values):
    """Send a text row now (QoS 1) or, offline, as soon as connected; returns the packet id."""
    p = a._body(smartrest.row(values))
    if a.ready:
        try:
            return a._c.publish("ms/" + a.id, p, qos=1)
        except Exception as e:
            if getattr(e, "pid", None) is not None:
                return e.pid  # taken: the client sends it again after reconnecting
    if len(a._st) >= 32:
        a._st.pop(0)
    a._st.append(p)
    return None


def types_of(path, tid):
    """The binary value types of request template tid in the templates file (without NOW)."""
    pre = "10,%d," % tid
    with open(path) as f:
        for line in f:
            if line.startswith(pre):
                return [t for t in smartrest.parse_rows(line)[0][7].split() if t != "NOW"]
    raise ValueError("no template %d in %s" % (tid, path))


def encode(a, item):
    """(topic, payload) of a queued row, or None while its source MO is not known yet."""
    import json

    v = json.loads(item)
    tid = v.pop(0)
    src = v.pop(0)
    if src != "*":
        if src and src not in a._kids:
            raise ValueError("unknown child %r" % src)
        mo = a._kids[src][2] if src else a.mo
        if mo is None:
            return None
        v.insert(0, int(mo))
    types = _types.get(tid)
    if types is None:
        types = _types[tid] = types_of(a.cfg["templates"], tid)
    if len(types) != len(v):
        raise ValueError("template %d: %d values, not %d" % (tid, len(types), len(v)))
    for i in range(len(v)):
        t = types[i]
        if a.binary:
            if t == "NUMBER":
                v[i] = float(v[i])
        elif t == "DATE":
            from .agent import iso

            v[i] = iso(v[i])
    if a.binary:
        from .binrest import encode

        return "bs/" + a.id, encode(a.xid, tid, types, v)
    return "ms/" + a.id, a._body(smartrest.row([tid] + v))


def flush(a):
    """Send waiting status rows, then queued rows, while the client has room in flight."""
    c = a._c
    room = c.max_inflight
    while a._st and c.pending() < room:
        c.publish("ms/" + a.id, a._st[0], qos=1)
        a._st.pop(0)
    q = a.q
    while len(q) and c.pending() < room:
        try:
            enc = encode(a, q.peek())
        except ValueError as e:
            a.log("queue: bad row dropped: %s" % e)
            q.pop()
            continue
        if enc is None:
            return
        try:
            c.publish(enc[0], enc[1], qos=1)
        except Exception as e:
            if getattr(e, "pid", None) is None:  # not taken by the client
                if type(e).__name__ != "MQTTPacketTooLarge":
                    raise
                a.log("queue: row too large, dropped")
        q.pop()
        a.stats["sent"] += 1
