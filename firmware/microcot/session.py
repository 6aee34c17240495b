# The agent's connect (agent.py): the TLS context, the MQTT client, the template collection,
# refused credentials. On the heap only while the agent connects. Every function takes the
# agent's State (state.py) as `s`. The device ID and the documents a boot starts with: ident.py.
#
# Connect: user = ID, clean_session=False, then create.py sets the session up. CONNACK 4 or 5
# with credentials that worked before ("ok") means the device was deleted: they are deleted and
# the device bootstraps again (and finds its managed object by its external ID). Credentials that
# never worked are kept (pre-provisioned ones may not be accepted yet) and retried with back-off;
# bootstrap ones are given up after _REFUSED_MAX refusals.
from . import hal
from .state import UP, AgentError, Restart, unload

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_REFUSED_MAX = const(10)


def tls(s):
    """The TLS context for the broker (verified with the configured CA), made once."""
    from .tlsctx import for_config

    cfg = s.cfg
    if s.ctx == 0:
        s.room()
        s.ctx = for_config(cfg)
        ca = cfg["ca"]
        if ca and ca.startswith("-----"):
            cfg["ca"] = None  # loaded: the text need not stay on the heap
    return s.ctx


def client(s, user, password, host, port):
    """An MQTT client to the broker, client id = the device ID."""
    from .mqtt import MQTTClient

    cfg = s.cfg
    return MQTTClient(s.id, host, port, user=user, password=password, keepalive=cfg["keepalive"],
                      ssl=tls(s), timeout=cfg["timeout"])


def connect(s):
    """Connect with the stored credentials; none: the bootstrap comes first."""
    cred = s.cred
    if cred is None:
        if s.c is not None and s.cfg["restarts"]:
            # this boot connected before: bootstrap in a boot of its own
            raise Restart("credentials deleted")
        s.boot = 1
        return
    from .mqtt import MQTTConnectError

    c = s.c
    if c is None:
        c = s.c = client(s, s.id, cred["password"], s.cfg["host"], s.cfg["port"])
        c.set_callback(s.on_msg)
    c.pswd = cred["password"]
    try:
        present = c.connect(clean_session=False)
    except MQTTConnectError as e:
        if e.code in (4, 5):
            refused(s, cred, e.code)
        raise
    s.stats["connects"] += 1
    s.refused = 0
    if s.cfg["unload"]:
        unload("mqttconn")  # the connect's code, before the setup loads its own (agent._DROP)
    if not cred.get("ok"):
        store = s.db()
        cred["ok"] = True
        store.save("cred", cred)
        store.delete("boot")
    s.state = UP
    s.log("connected to %s:%d (session %s)" % (s.cfg["host"], s.cfg["port"],
                                               "present" if present else "new"))
    c.subscribe("mr/" + s.id, 1)
    c.subscribe("br/" + s.id, 1)
    if not s.created:
        templates(s)
    else:
        s.rsv2 = None  # the room kept for the registration (agent.py): not needed in this boot
    s.phase = 1 if s.created else 0  # create.py's next step
    s.bo.reset()


def templates(s):
    """The template collection, first (seed 002: the collection with template 500 must be the
    first one the device uses): `15,<X-ID>` alone is answered 20 (registered) or 40 (not): then
    the whole templates file in one payload, answered 20. The answers are plain enough to be
    read raw, so nothing else needs to be loaded beside the payload."""
    c = s.c
    got = []
    c.set_callback(lambda t, m: got.append(m))
    try:
        if _ask(s, c, got, ("15," + s.xid).encode()) == b"20":
            s.stats["templates"] = "found"
            return
        if got[0][:2] != b"40":
            raise AgentError("template check: %s" % got[0][:80])
        s.log("registering the template collection %s" % s.xid)
        s.rsv2 = None  # the room kept for this (agent.py)
        s.room()
        body = registration(s.cfg["templates"], s.xid)
        if _ask(s, c, got, body) != b"20":
            raise AgentError("template registration refused: %s" % got[0][:200])
        s.stats["templates"] = "registered"
    finally:
        c.set_callback(s.on_msg)
        s.rsv2 = None


def _ask(s, c, got, body):
    got.clear()
    c.publish("ms/" + s.id, body, qos=1)
    t0 = hal.ticks_ms()
    ms = int(s.cfg["timeout"] * 1000)
    while not got:
        left = ms - hal.ticks_diff(hal.ticks_ms(), t0)
        if left <= 0:
            raise AgentError("no answer to the template check within %d ms" % ms)
        c.poll(left)
    return got[0][:2]


def registration(path, xid):
    """The registration body: the file from its 15 line on (comments may only precede it),
    with that line naming `xid`. One buffer, read straight from the file."""
    import gc
    import os

    size = os.stat(path)[6]
    with open(path, "rb") as f:
        off = 0
        while True:
            line = f.readline()
            if not line:
                raise AgentError("%s has no 15 line" % path)
            if line.startswith(b"15,"):
                break
            off += len(line)
        off += len(line)
        line = None
        gc.collect()  # the lines read are garbage: the buffer may take their place
        head = b"15," + xid.encode() + b"\n"
        body = bytearray(len(head) + size - off)
        body[: len(head)] = head
        f.readinto(memoryview(body)[len(head):])
    n = len(body)
    while n and body[n - 1] in b"\r\n":
        n -= 1
    return memoryview(body)[:n]


def refused(s, cred, code):
    n = s.refused = s.refused + 1
    if cred.get("ok"):
        why = "credentials that worked before were refused (CONNACK %d): device deleted?" % code
    elif cred.get("source") == "bootstrap" and n >= _REFUSED_MAX:
        why = "bootstrap credentials refused %d times (CONNACK %d)" % (n, code)
    else:
        s.log("credentials refused (CONNACK %d), not accepted yet? keeping them" % code)
        return
    s.log(why + ": deleting them, bootstrapping again")
    s.db().delete("cred")
    s.cred = None
    raise Restart("credentials refused")
