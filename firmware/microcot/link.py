# The agent while connected (agent.py): incoming operations, sending the offline queue in text
# or binary SmartREST, operation status rows. On the heap only while the agent is connected.
# Every function takes the agent's State (state.py) as `s`.
#
# Operations (ops.py) are dispatched by response template id and device MO id: the handler
# registered for that template (agent.operation; the built-ins c8y_Command and c8y_Restart are
# registered the same way) or the handler of the child device with that MO id. Each one: its
# record is stored (document "op", ops.py), EXECUTING is sent, the handler runs, then SUCCESSFUL
# (a handler returning (template id, values...) reports with that row instead, e.g. c8y_Command's
# 133 with its result) or FAILED with the reason, and the record is deleted. An operation
# delivered again (QoS 1) while its id is among the last 16 is not run again.
#
# Long work: a handler may return a generator; serve() then advances it by one next() per turn
# (between turns the client keeps the connection alive: keep each chunk of work well below the
# keep-alive), its return value being the handler's result. Other operations wait meanwhile.
# Work too large for the heap a connected agent leaves (c8y_Firmware's download on the ESP32):
# the handler stores stage "boot" (op.stage) and raises state.Restart; after the restart the
# agent calls the module's boot(s, record) before it connects (agent.start), with the heap to
# itself, and the resume hook reports the outcome once connected.
#   def update(op):
#       for chunk in range(100):
#           write(chunk)          # a bounded piece of work
#           yield
#       return None               # -> SUCCESSFUL
from . import hal, smartrest, tpl
from .ops import clip, parse, reason, record
from .state import Restart, iso, js, now

_types = {}  # template id -> binary value types, from the templates file


def serve(s, ms):
    """One turn while connected: receive (at most ms waiting), operations, send."""
    c = s.c
    c.poll(ms)
    n = 0
    while n < 32 and c.poll(0) is not None:
        n += 1
    if s.job is not None:
        advance(s)
    else:
        handle_ops(s)
    flush(s)


def handle_ops(s):
    """Start the waiting operations, one after the other (a stepped one stops the line)."""
    while s.ops and s.ready and s.job is None:
        try:
            op = parse(s.ops.pop(0))
        except ValueError as e:
            s.log(str(e))
            continue
        if op.id in s.recent:
            continue  # delivered again (QoS 1): done already
        s.recent.append(op.id)
        if len(s.recent) > 16:
            s.recent.pop(0)
        s.stats["ops"] += 1
        h = s.handlers[op.rtid]
        fn = h[1] if op.device == s.mo else None
        for name in s.kids:
            k = s.kids[name]
            if k[2] == op.device:
                op.child = name
                fn = k[0]
        if fn is None:
            status(s, tpl.FAILED, int(op.id), "no handler for %s on device %s" % (h[0], op.device))
            continue
        s.log("operation %s %s %s" % (op.id, h[0], op.child or ""))
        begin(s, op, h[0])
        status(s, tpl.EXECUTING, int(op.id))
        try:
            res = fn(op)
        except Restart:
            raise  # the operation goes on in a boot of its own (its record says how far)
        except Exception as e:
            end(s, op, e)
            continue
        if hasattr(res, "send"):  # a generator: advanced by serve(), a chunk per turn
            s.job = [op, res]
        else:
            end(s, op, res)


def advance(s):
    """One chunk of the stepped operation under way."""
    op, g = s.job
    try:
        next(g)
        return
    except StopIteration as e:
        res = e.args[0] if e.args else None
    except Exception as e:
        res = e
    s.job = None
    end(s, op, res)


def begin(s, op, kind):
    """Store the operation's record (ops.py) before anything of it happens."""
    rec = record(op, kind, now())
    db = s.db()
    db.save("op", rec)

    def save(stage, data=None):
        rec["stage"] = stage
        if data is not None:
            rec["data"] = data
        s.db().save("op", rec)

    op.save = save


def end(s, op, res):
    """The final status of an operation (res: its result, or the exception that failed it),
    then its record goes."""
    oid = int(op.id)
    if isinstance(res, Exception):
        status(s, tpl.FAILED, oid, js(reason(res)))
    elif isinstance(res, tuple) and res and isinstance(res[0], int):
        status(s, res[0], oid, *res[1:])
    else:
        status(s, tpl.SUCCESSFUL, oid)
    op.save = None
    s.db().delete("op")


def command(s, table, op):
    """c8y_Command: the command of the table that the text names (ops.run), reported with its
    result (template 133)."""
    from .ops import run

    return (tpl.RESULT, js(op.text), js(clip(run(table, op.text))))


def reset(s, op):
    """c8y_Restart: EXECUTING acknowledged, the record at stage "reset", then reset_board; after
    the restart create.finish reports it (resume: SUCCESSFUL)."""
    settle(s)
    op.stage("reset")
    reset_board(s, "c8y_Restart %s: resetting the board" % op.id)


def settle(s):
    """Wait (up to 5 s) until what is in flight, EXECUTING above all, is acknowledged."""
    c = s.c
    if c is None:
        return
    t0 = hal.ticks_ms()
    while c.pending() and hal.ticks_diff(hal.ticks_ms(), t0) < 5000:
        c.poll(100)


def reset_board(s, why=None):
    """An operation's hard reset (c8y_Restart, an update, a configuration): in-flight messages
    acknowledged, the queue on flash, `why` logged, the connection closed, the board reset
    (hal.reset: machine.reset(), a process restart on the virtual board). Does not return."""
    settle(s)
    s.q.flush()
    if why:
        s.log(why)
    if s.c is not None:
        s.c.disconnect()
    hal.reset()
    while True:  # the virtual board's host may take a moment to restart the interpreter
        hal.sleep_ms(100)


def status(s, *values):
    """Send a text row now (QoS 1) or, offline, as soon as connected; returns the packet id."""
    p = s.body(smartrest.row(values))
    if s.ready and s.c is not None:
        try:
            return s.c.publish("ms/" + s.id, p, qos=1)
        except Exception as e:
            if getattr(e, "pid", None) is not None:
                return e.pid  # taken: the client sends it again after reconnecting
    if len(s.st) >= 32:
        s.st.pop(0)
    s.st.append(p)
    return None


def types_of(path, tid):
    """The binary value types of request template tid in the templates file (without NOW)."""
    pre = "10,%d," % tid
    with open(path) as f:
        for line in f:
            if line.startswith(pre):
                return [t for t in smartrest.parse_rows(line)[0][7].split() if t != "NOW"]
    raise ValueError("no template %d in %s" % (tid, path))


def encode(s, item):
    """(topic, payload) of a queued row, or None while its source MO is not known yet."""
    import json

    v = json.loads(item)
    tid = v.pop(0)
    src = v.pop(0)
    if src != "*":
        if src and src not in s.kids:
            raise ValueError("unknown child %r" % src)
        mo = s.kids[src][2] if src else s.mo
        if mo is None:
            return None
        v.insert(0, int(mo))
    types = _types.get(tid)
    if types is None:
        types = _types[tid] = types_of(s.cfg["templates"], tid)
    if len(types) != len(v):
        raise ValueError("template %d: %d values, not %d" % (tid, len(types), len(v)))
    for i in range(len(v)):
        t = types[i]
        if s.binary:
            if t == "NUMBER":
                v[i] = float(v[i])
        elif t == "DATE":
            v[i] = iso(v[i])
    if s.binary:
        from .binrest import encode

        return "bs/" + s.id, encode(s.xid, tid, types, v)
    return "ms/" + s.id, s.body(smartrest.row([tid] + v))


def flush(s):
    """Send waiting status rows, then queued rows, while the client has room in flight."""
    c = s.c
    room = c.max_inflight
    while s.st and c.pending() < room:
        c.publish("ms/" + s.id, s.st[0], qos=1)
        s.st.pop(0)
    q = s.q
    q.done(c.pending())  # the durable queue lets go of acknowledged rows
    while len(q) and c.pending() < room:
        try:
            enc = encode(s, q.peek())
        except ValueError as e:
            s.log("queue: bad row dropped: %s" % e)
            q.pop(False)
            continue
        if enc is None:
            return
        sent = True
        try:
            c.publish(enc[0], enc[1], qos=1)
        except Exception as e:
            if getattr(e, "pid", None) is None:  # not taken by the client
                if type(e).__name__ != "MQTTPacketTooLarge":
                    raise
                s.log("queue: row too large, dropped")
                sent = False
        q.pop(sent)
        s.stats["sent"] += 1
