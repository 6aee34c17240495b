# The agent's start (agent.py): the device ID and the documents this boot needs. On the heap
# only while the agent starts. Every function takes the agent's State (state.py) as `s`.
#
# The ID (DESIGN.md, identity.py): the stored one (document "dev": {"id", "src", "imsi", ...},
# written when it was read); without one, the SIM's ICCID from the modem (and its IMSI), else
# the MAC, else the configured ID, then the board restarts (Restart: reading the modem gets a
# boot of its own). Credentials (document "cred": {"id", "password", "source", "ok"}, written by
# bootstrap.py or by provisioning) belong to that ID.
from . import hal
from .state import AgentError, Restart, unload


def identify(s, fixed=None):
    """The device ID: stored, or given (`fixed`), or read from the hardware (then Restart),
    and the documents this boot needs: credentials, else a bootstrap under way; an operation in
    progress. The order matters on a small heap, which loading code fragments: first the stored
    documents (store.py reads with a 4 KiB buffer); agent.py then loads the MQTT client's code
    and the TLS context, which stay; only then the phases, whose code comes and goes."""
    store = s.db()
    dev = store.load("dev")
    if not isinstance(dev, dict) or not dev.get("id"):
        dev = None
    if fixed is not None and (dev is None or dev["id"] != fixed):
        dev = {"id": fixed, "src": "configured"}
        store.save("dev", dev)
    read = dev is None
    if read:
        dev = _read(s)
        store.save("dev", dev)
    s.dev = dev
    s.id = dev["id"]
    if s.xid is None:
        s.xid = file_xid(s.cfg["templates"])
    s.log("device %s (%s), X-ID %s, %s" % (s.id, dev.get("src"), s.xid,
                                           "binary" if s.binary else "text"))
    if read and s.cfg["restarts"]:
        raise Restart("device ID read")
    cred = store.load("cred")
    if isinstance(cred, dict) and cred.get("id") == s.id and cred.get("password"):
        s.cred = cred
        s.secret(cred["password"])
        s.oprec = rec = store.load("op")  # an operation under way (create.finish)
        d = rec.get("data") if isinstance(rec, dict) else None
        if isinstance(d, dict) and d.get("trial"):
            # an update runs on trial: it must connect in time, else a hard reset rolls it back
            s.trial = hal.ticks_add(hal.ticks_ms(), int(s.cfg["app_trial"] * 1000))
        if isinstance(rec, dict) and rec.get("stage") == "boot":
            own_boot(s, rec)
    else:
        s.bdoc = store.load("boot")  # a bootstrap under way (bootstrap.py)


# an operation's boot of its own that ran out of memory is tried again this often (a fresh boot)
_BOOT_TRIES = 2


def own_boot(s, rec):
    """An operation's work in a boot of its own (link.py: stage "boot"), before the MQTT code
    loads: its module's boot(s, record) (a reset when it succeeds, else the record says why), then
    a restart onto a clean heap; create.finish reports the outcome once connected."""
    h = s.handlers.get(rec.get("rtid"))
    fn = getattr(h[1], "boot", None) if h is not None else None
    if fn is not None:
        s.rsv2 = None  # this boot ends in a restart: no registration in it
        s.room()
        fn(rec)
        d = rec.get("data") or {}
        n = d.get("tries", 0)
        if rec["stage"] == "failed" and "MemoryError" in d.get("why", "") and n < _BOOT_TRIES:
            # how the heap's pieces lie after a boot varies: again, in a fresh one
            d["tries"] = n + 1
            rec["stage"] = "boot"
            s.db().save("op", rec)
    raise Restart("%s %s: its boot is over" % (rec.get("kind"), rec.get("id")))


def _read(s):
    """{"id", "src", "imsi"} from the modem (ICCID, IMSI), the MAC or the configuration."""
    iccid = imsi = None
    stream = None
    try:
        stream = hal.modem_uart()
    except Exception as e:
        s.log("modem: %r" % e)
    if stream is not None:
        from .atmodem import AtModem

        m = AtModem(stream)
        try:
            iccid = m.iccid()
            imsi = m.imsi()
        except Exception as e:
            s.log("modem: no ICCID (%r)" % e)
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
    conf = s.cfg["device_id"] or hal.config().get("device_id")
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
    raise AgentError("%s names no X-ID (15 line) and none is configured" % path)
