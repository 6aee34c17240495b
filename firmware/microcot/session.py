# The agent's device ID and connect (agent.py). On the heap only while the agent connects.
# Every function takes the Agent as `a`.
#
# The ID (DESIGN.md, identity.py): the stored one (document "dev": {"id", "src", "imsi", ...},
# written when it was read); without one, the SIM's ICCID from the modem (and its IMSI), else
# the MAC, else the configured ID, then the board restarts (agent.py: reading the modem gets a
# boot of its own). Credentials (document "cred": {"id", "password", "source", "ok"}, written by
# bootstrap.py or by provisioning) belong to that ID.
#
# Connect: user = ID, clean_session=False, then create.py sets the session up. CONNACK 4 or 5
# with credentials that worked before ("ok") means the device was deleted: they are deleted and
# the device bootstraps again (and finds its managed object by its external ID). Credentials that
# never worked are kept (pre-provisioned ones may not be accepted yet) and retried with back-off;
# bootstrap ones are given up after _REFUSED_MAX refusals.
from . import hal

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_UP = const(2)
_REFUSED_MAX = const(10)


def identify(a, fixed=None):
    """The device ID: stored, or given (`fixed`), or read from the hardware (then a restart).
    The order matters on a small heap, which loading code fragments: first the stored documents
    (store.py reads with a 4 KiB buffer), then the MQTT client's code and the TLS context, which
    stay; only then the phases, whose code comes and goes."""
    store = a._db()
    s = a._s
    dev = store.load("dev")
    if not isinstance(dev, dict) or not dev.get("id"):
        dev = None
    if fixed is not None and (dev is None or dev["id"] != fixed):
        dev = {"id": fixed, "src": "configured"}
        store.save("dev", dev)
    read = dev is None
    if read:
        dev = _read(a)
        store.save("dev", dev)
    s["dev"] = dev
    a.id = dev["id"]
    if a.xid is None:
        a.xid = file_xid(a.cfg["templates"])
    a.log("device %s (%s), X-ID %s, %s" % (a.id, dev.get("src"), a.xid,
                                           "binary" if a.binary else "text"))
    if read and a.cfg["restarts"]:
        restart(a, "device ID read")
    cred = store.load("cred")
    if isinstance(cred, dict) and cred.get("id") == a.id and cred.get("password"):
        s["cred"] = cred
        s["op"] = store.load("op")  # a c8y_Restart under way (create.finish)
    else:
        s["bdoc"] = store.load("boot")  # a bootstrap under way (bootstrap.py)
    store = None
    from .agent import unload

    unload("store")
    a._hold()  # the block again, before code fills the gaps
    # the code that stays for this boot, in one go: the MQTT client, and then the bootstrap or
    # what a connected agent needs
    from .mqtt import MQTTClient, tls_context  # noqa: F401

    if "cred" in s:
        from . import link  # noqa: F401 (with smartrest.py and ops.py)
        from .smartrest import check_xid

        check_xid(a.xid)
        if a.binary:
            from . import binrest  # noqa: F401
    else:
        s.pop("rsv", None)  # no template registration in this boot
        from . import bootstrap, xtea  # noqa: F401
    tls(a)


def restart(a, why):
    """Restart the board: a soft reset where the port has one (main.py runs again)."""
    a.log("restarting: " + why)
    a.close()
    try:
        import machine

        fn = getattr(machine, "soft_reset", None)
    except ImportError:
        fn = None
    if fn is not None:
        fn()
    raise SystemExit("microcot: restart (%s)" % why)


def _read(a):
    """{"id", "src", "imsi"} from the modem (ICCID, IMSI), the MAC or the configuration."""
    from .agent import unload

    iccid = imsi = None
    stream = None
    try:
        stream = hal.modem_uart()
    except Exception as e:
        a.log("modem: %r" % e)
    if stream is not None:
        from .atmodem import AtModem

        m = AtModem(stream)
        try:
            iccid = m.iccid()
            imsi = m.imsi()
        except Exception as e:
            a.log("modem: no ICCID (%r)" % e)
        try:
            stream.close()
        except Exception:
            pass
        m = None
        unload("atmodem")
    from . import identity

    try:
        mac = hal.mac()
    except Exception:
        mac = None
    conf = a.cfg["device_id"] or hal.config().get("device_id")
    try:
        did, src = identity.device_id_source(iccid, mac, conf)
    finally:
        unload("identity")
    return {"id": did, "src": src, "imsi": imsi if src == "iccid" else None}


def file_xid(path):
    """The X-ID of the templates file (its 15 line)."""
    with open(path) as f:
        for line in f:
            if line.startswith("15,"):
                return line[3:].strip()
    raise _err("%s names no X-ID (15 line) and none is configured" % path)


def tls(a):
    """The TLS context for the broker (verified with the configured CA), made once."""
    from .mqtt import tls_context

    cfg = a.cfg
    on = cfg["tls"]
    if "ctx" not in a._s:
        ctx = None
        a._room()
        if on:
            ca = cfg["ca"]
            if ca and ca.startswith("-----"):
                ctx = tls_context(cadata=ca, verify=on != "noverify")
                cfg["ca"] = None  # loaded: the text need not stay on the heap
            else:
                ctx = tls_context(cafile=ca, verify=on != "noverify")
        a._s["ctx"] = ctx
    return a._s["ctx"]


def client(a, user, password, host, port):
    """An MQTT client to the broker, client id = the device ID."""
    from .mqtt import MQTTClient

    cfg = a.cfg
    return MQTTClient(a.id, host, port, user=user, password=password, keepalive=cfg["keepalive"],
                      ssl=tls(a), timeout=cfg["timeout"])


def connect(a):
    """Connect with the stored credentials; none: the bootstrap comes first."""
    cred = a._s.get("cred")
    if cred is None:
        if a._c is not None and a.cfg["restarts"]:
            # this boot connected before: bootstrap in a boot of its own
            restart(a, "credentials deleted")
        a._s["boot"] = 1
        return
    from .mqtt import MQTTConnectError

    c = a._c
    if c is None:
        c = a._c = client(a, a.id, cred["password"], a.cfg["host"], a.cfg["port"])
        c.set_callback(a._on_msg)
    c.pswd = cred["password"]
    try:
        present = c.connect(clean_session=False)
    except MQTTConnectError as e:
        if e.code in (4, 5):
            refused(a, cred, e.code)
        raise
    a.stats["connects"] += 1
    a._s["refused"] = 0
    if not cred.get("ok"):
        store = a._db()
        cred["ok"] = True
        store.save("cred", cred)
        store.delete("boot")
    a._state = _UP
    a.log("connected to %s:%d (session %s)" % (a.cfg["host"], a.cfg["port"],
                                               "present" if present else "new"))
    c.subscribe("mr/" + a.id, 1)
    c.subscribe("br/" + a.id, 1)
    if not a._s.get("done"):
        templates(a)
    a._s["phase"] = 0 if not a._s.get("done") else 1  # create.py's next step
    a.bo.reset()


def templates(a):
    """The template collection, first (seed 002: the collection with template 500 must be the
    first one the device uses): `15,<X-ID>` alone is answered 20 (registered) or 40 (not): then
    the whole templates file in one payload, answered 20. The answers are plain enough to be
    read raw, so nothing else needs to be loaded beside the payload."""
    c = a._c
    got = []
    c.set_callback(lambda t, m: got.append(m))
    try:
        if _ask(a, c, got, ("15," + a.xid).encode()) == b"20":
            a.stats["templates"] = "found"
            return
        if got[0][:2] != b"40":
            raise _err("template check: %s" % got[0][:80])
        a.log("registering the template collection %s" % a.xid)
        a._s.pop("rsv", None)  # the room kept for this (identify)
        a._room()
        body = registration(a.cfg["templates"], a.xid)
        if _ask(a, c, got, body) != b"20":
            raise _err("template registration refused: %s" % got[0][:200])
        a.stats["templates"] = "registered"
    finally:
        c.set_callback(a._on_msg)
        a._s.pop("rsv", None)


def _ask(a, c, got, body):
    got.clear()
    c.publish("ms/" + a.id, body, qos=1)
    t0 = hal.ticks_ms()
    ms = int(a.cfg["timeout"] * 1000)
    while not got:
        left = ms - hal.ticks_diff(hal.ticks_ms(), t0)
        if left <= 0:
            raise _err("no answer to the template check within %d ms" % ms)
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
                raise _err("%s has no 15 line" % path)
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


def _err(msg):
    from .agent import AgentError

    return AgentError(msg)


def refused(a, cred, code):
    n = a._s["refused"] = a._s.get("refused", 0) + 1
    if cred.get("ok"):
        why = "credentials that worked before were refused (CONNACK %d): device deleted?" % code
    elif cred.get("source") == "bootstrap" and n >= _REFUSED_MAX:
        why = "bootstrap credentials refused %d times (CONNACK %d)" % (n, code)
    else:
        a.log("credentials refused (CONNACK %d), not accepted yet? keeping them" % code)
        return
    a.log(why + ": deleting them, bootstrapping again")
    a._db().delete("cred")
    a._s["cred"] = None
    restart(a, "credentials refused")
