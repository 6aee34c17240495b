# The Cloud of Things device agent (seed 002): bootstrap, self-creation, data, operations.
#
#   from microcot.agent import Agent
#   a = Agent()                                  # settings from /microcot.json (load_config)
#   a.command("uptime", lambda args: "...")      # c8y_Command table
#   a.child("sensor-1", handler=fn)              # a child device and its operations handler
#   a.every(60, lambda: a.measure("c8y_Temperature", "T", 21.5, "C"))
#   a.run()                                      # forever; run(seconds=..)/run(until=..) bounded
#
# Phases, each with its own module, so that a small board's heap holds only what the current
# phase needs (step() unloads the rest when it returns):
#   agent.py      always: settings, the application API, the offline queue, the loop
#   session.py    the device ID (identity.py, atmodem.py), connecting, refused credentials
#   bootstrap.py  without credentials: seed 002's bootstrap (xtea.py)
#   create.py     after a connect: template collection, self-creation, child devices
#   link.py       connected: operations, sending the queue in text or binary, c8y_Restart
# Reading the modem and bootstrapping happen in boots of their own: the agent restarts the
# board (soft reset) after either, so that their code and names (which MicroPython never frees)
# do not crowd the session that follows. A fresh device: boot 1 reads its ID and stores it; boot
# 2 bootstraps and stores the credentials; boot 3 and every later one connects. The ID is read
# again only when none is stored (the stored credentials belong to it).
#
# On the board's flash (store.py documents under `store`, default /store):
#   dev    {"id", "src": iccid|mac|configured, "imsi", "mo", "info", "kids": {name: [MO id,
#          linked, operations]}}      the device, its managed object, what was sent about it
#   cred   {"id", "password", "source": bootstrap|provisioned, "ok"}      (the password is
#          never printed)
#   boot   {"state": "ONGOING", "id", "secret"} while a bootstrap is under way
#   op     {"restart": operation id} while a c8y_Restart is under way
#   queue.txt   rows of the offline queue that did not fit in memory (outq.py)
#
#   disconnected  wait for the next attempt (back-off with jitter, outq.Backoff), then connect
#                 as user = ID, clean_session=False, subscribe mr/ and br/ (QoS 1), then create.
#   bootstrap     after a random delay: bootstrap.py, then restart.
#   up            handle incoming messages, operations, send what is queued.
# One step() never blocks longer than asked, except inside a connect or one request of the
# setup (bounded by `timeout`) and a c8y_Restart.
#
# Data (measure, event, location, alarm, alarm_status, send) always goes through the offline queue
# (outq.Queue) as JSON rows [template id, source, values...]: sent in order as soon as connected,
# in text on ms/<ID> or binary on bs/<ID> (`binary`), QoS 1. The source is symbolic ("" this
# device, a child's name, "*" none) until the row is sent, so data measured before the
# self-creation gets the right MO id. Times are Unix seconds. Errors the platform answers on mr/
# or br/ (40-50) are counted (`errors`), logged, kept in `last_error` and passed to
# `on_error(code, line, text)`.
import gc
import os
import time

from . import hal
from .outq import Backoff, Queue

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_T_MEASURE = const(110)
_T_EVENT = const(111)
_T_ALARM = const(113)
_T_ALARM_STATUS = const(114)
_R_TENANT = const(205)
_R_ALARM = const(206)
_OFF = const(0)
_BOOT = const(1)
_UP = const(2)

CONFIG = "/microcot.json"
SEVERITIES = ("CRITICAL", "MAJOR", "MINOR", "WARNING")
STATUSES = ("ACTIVE", "ACKNOWLEDGED", "CLEARED")

DEFAULTS = {
    "host": "nb-iot.ram.m2m.telekom.com",  # the broker (seed 002), also for the bootstrap
    "port": 8883,
    "tls": True,  # False: plain MQTT; "noverify": TLS without checking the broker (a warning)
    "ca": None,  # the broker's CA: a path on the board (PEM or DER), or the PEM text itself
    "bootstrap_user": None,
    "bootstrap_password": None,
    "bootstrap_delay": [0, 60],  # seconds, random in between (seed 002)
    "bootstrap_repeat": 300,  # seconds without an answer before the same secret is sent again
    "device_id": None,  # the ID when neither modem nor MAC give one
    "xid": None,  # default: the 15 line of the templates file
    "templates": "/templates.csv",
    "name": "microcot {id}",
    "interval": 60,  # seconds between measurements (main.py)
    "binary": False,
    "keepalive": 60,
    "timeout": 15,  # seconds: connect, and each answer during the setup
    "backoff": [2, 300],  # seconds: first and largest reconnect delay
    "queue": [16, 500],  # rows in memory, rows on flash (0: none)
    "store": "/store",
    "reserve": 12288,  # bytes held for the few large allocations (0: none, e.g. in tests)
    # the other heap measures, switchable so that bench/agent.py can tell which a board needs:
    "restarts": True,  # boots of their own after reading the ID and after a bootstrap
    "unload": True,  # drop the phase modules a state does not use (_DROP)
    "log": True,
}


# Loading code leaves a small heap in many small pieces, but some allocations need one piece of
# a few KiB (the TLS context, the TLS handshake), and a phase's code is better loaded into one
# free region than into the gaps. So the agent holds a block, taken while the heap is still in
# one piece, lets go of it (_room) right before such an allocation or import, and takes it again
# after each step, when it can. With credentials stored, a second block is kept until the
# template check, for the registration's payload and MQTT packet (3.4 KiB each, in one piece).

# what a step unloads, by state: the transient phases that state does not use (the code that
# stays for a boot, session.identify loads first)
_DROP = (("session", "store", "create"),  # off
         ("session", "create", "store"),  # bootstrap
         ("session",),  # up, setting up
         ("session", "store", "create"))  # up and ready


class AgentError(Exception):
    pass


def load_config(path=CONFIG, **over):
    """DEFAULTS, updated from the JSON object in `path` (when it exists), then from `over`."""
    cfg = dict(DEFAULTS)
    if path:
        import json

        try:
            with open(path) as f:
                data = json.load(f)
        except OSError:
            data = {}
        except ValueError as e:
            raise ValueError("%s: not valid JSON (%s)" % (path, e))
        if not isinstance(data, dict):
            raise ValueError("%s: not a JSON object" % path)
        cfg.update(data)
    cfg.update(over)
    return cfg


def now():
    """Unix seconds (whatever the port's epoch)."""
    return int(time.time()) + (946684800 if time.gmtime(0)[0] == 2000 else 0)


def iso(t):
    """Unix seconds -> ISO 8601 UTC, as SmartREST DATE text."""
    off = 946684800 if time.gmtime(0)[0] == 2000 else 0
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % time.gmtime(int(t) - off)[:6]


def js(s):
    """Text escaped for a JSON string: the platform puts values into templates as raw text."""
    s = str(s)
    for c in s:
        if c == '"' or c == "\\" or c < " ":
            break
    else:
        return s
    out = []
    for c in s:
        out.append("\\" + c if c == '"' or c == "\\" else "\\u%04x" % ord(c) if c < " " else c)
    return "".join(out)


def unload(name):
    """Drop a microcot module from the heap (it is imported again when needed)."""
    import sys

    sys.modules.pop("microcot." + name, None)
    pkg = sys.modules.get("microcot")
    if pkg is not None and name in pkg.__dict__:
        delattr(pkg, name)


class Agent:
    def __init__(self, config=None, path=CONFIG, **over):
        if config is not None:
            cfg = dict(DEFAULTS)
            cfg.update(config)
            cfg.update(over)
        else:
            cfg = load_config(path, **over)
        self.cfg = cfg
        self.binary = bool(cfg["binary"])
        self.id = self.mo = self.tenant = self.last_error = None
        self.xid = cfg["xid"]
        self.ready = False
        self.errors = 0
        self.on_error = None  # fn(code, line, text)
        self.alarms = {}  # (source MO id, type) -> [alarm id, status], from the answers
        self.stats = {"connects": 0, "sent": 0, "ops": 0, "templates": None, "created": False}
        st = cfg["store"]
        cur = ""
        for part in st.split("/"):  # the store's directory (and the queue file's)
            if part:
                cur += "/" + part if cur or st[0] == "/" else part
                try:
                    os.mkdir(cur)
                except OSError:
                    pass
        n = cfg["queue"]
        self.q = Queue(n[0], st.rstrip("/") + "/queue.txt", n[1])
        n = cfg["backoff"]
        self.bo = Backoff(int(n[0] * 1000), int(n[1] * 1000))
        self._state = _OFF
        self._next = hal.ticks_ms()
        self._c = None  # the device's MQTT client
        self._s = {}  # state of the phase modules
        self._cmds = {}  # c8y_Command table: name -> fn(args)
        self._kids = {}  # name -> [handler, operations, MO id]
        self._handlers = {202: ["c8y_Command", 1], 203: ["c8y_Restart", 1]}  # 1: built in
        self._ops = []  # operation rows (id, values) waiting to be handled
        self._recent = []  # ids of operations handled lately
        self._st = []  # payloads waiting for a connection (status rows, the tenant query)
        self._ans = None  # create.ask: [] waiting, then the rows of the answer
        self._timers = []
        self._rsv = None
        self._hold()
        for slot in "ab" if cfg["reserve"] else "":
            try:  # credentials stored: this boot connects and may register the templates
                os.stat(st.rstrip("/") + "/cred." + slot)
                self._s["rsv"] = bytearray(8192)  # their payload and MQTT packet (session.py)
                break
            except OSError:
                pass

    def log(self, msg):
        if self.cfg["log"]:
            print("agent:", msg)

    # -- application API ----------------------------------------------------------------------

    def command(self, name, fn):
        """Register a c8y_Command command: fn(args: str) -> result (str); raise to fail it.
        The first word of the operation's text names the command; nothing else is run."""
        if not name or " " in name or "\t" in name:
            raise ValueError("command name %r: one word" % (name,))
        self._cmds[name] = fn

    def operation(self, rtid, fragment, fn=None):
        """Handle operations arriving as rows of response template rtid (its first two values
        $.id, $.deviceId) for this device with fn(op) -> result; fragment (e.g. c8y_Firmware)
        goes into the supported operations. fn None: rows for child devices only."""
        self._handlers[rtid] = [fragment, fn]

    def child(self, name, handler=None, operations=()):
        """A child device (created and linked once, then remembered): handler(op) gets its
        operations; `operations` are its supported operations."""
        if not isinstance(name, str) or not 0 < len(name) < 65 or name == "*" or "\n" in name:
            raise ValueError("child name %r: 1 to 64 characters, not '*'" % (name,))
        self._kids[name] = [handler, list(operations), None]
        self._s["kids"] = 1

    def every(self, seconds, fn, at_once=False):
        """Call fn() every `seconds` from step() (connected or not). At most hal.TICKS_PERIOD / 4
        ms (3.1 days on a 32-bit board, where ticks_ms wraps every 12.4 days and ticks_add
        refuses spans of half of that): count shorter periods for a longer one."""
        ms = int(seconds * 1000)
        if not 0 < ms < hal.TICKS_PERIOD >> 2:
            raise ValueError("every %r s: the period must be over 0 and under %d s on this board"
                             % (seconds, (hal.TICKS_PERIOD >> 2) // 1000))
        t = hal.ticks_ms()
        self._timers.append([ms, t if at_once else hal.ticks_add(t, ms), fn])

    def measure(self, fragment, series, value, unit="", type=None, t=None, source=None):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value - value:
            raise ValueError("measurement value %r is not a finite number" % (value,))
        self._put(_T_MEASURE, source, [js(fragment), js(series), value, js(unit), _t(t),
                                       js(type or fragment)])

    def event(self, type, text, t=None, source=None):
        self._put(_T_EVENT, source, [js(type), js(text), _t(t)])

    def alarm(self, type, text, severity="MAJOR", status="ACTIVE", t=None, source=None):
        """severity: CRITICAL MAJOR MINOR WARNING; status: ACTIVE ACKNOWLEDGED CLEARED."""
        if severity not in SEVERITIES or status not in STATUSES:
            raise ValueError("alarm %r %r: bad severity or status" % (severity, status))
        self._put(_T_ALARM, source, [js(type), _t(t), js(text), status, severity])

    def alarm_status(self, type, status, source=None):
        """Set the status of the open alarm of this type (its id learnt from the answer to the
        alarm). One not known yet can only be CLEARED (posting a CLEARED alarm clears it)."""
        if status not in STATUSES:
            raise ValueError("alarm status %r" % (status,))
        known = self.alarms.get((self.mo if source is None else self._kids[source][2], type))
        if known:
            self._put(_T_ALARM_STATUS, "*", [int(known[0]), status])
        elif status == "CLEARED":
            self.alarm(type, type, "WARNING", "CLEARED", source=source)
        else:
            raise ValueError("no alarm of type %r known yet" % type)

    def send(self, tid, values, source=None):
        """Queue a row of any request template (e.g. 112, a location event: time, lat, lng,
        alt). With a source (None: this device, or a child's name) the template's first
        parameter is the source MO id, put in when sent; '*': the values as they are."""
        self._put(tid, source, list(values))

    def query_tenant(self):
        """Ask for the own tenant (seed 002 "Eigenen Tenant abfragen"), when connected; the
        answer sets `tenant`."""
        self._st.append(self._body("140"))

    def start(self, device_id=None):
        """The device ID (step() calls it): the stored one, else read from the modem or the
        MAC (session.py), then a restart. device_id: use this ID (tests, fixed IDs)."""
        if self.id is None:
            try:
                self._call("session", "identify", device_id)
            finally:
                self._trim()

    def close(self):
        """Disconnect (the broker keeps the session) and move the queue to flash."""
        self.ready = False
        self._state = _OFF
        b = self._s.pop("bobj", None)
        if b is not None:
            b.close()
        if self._c is not None:
            try:
                self._c.disconnect()
            except Exception:
                pass
        try:
            self.q.flush()
        except OSError as e:
            self.log("queue: %r" % e)
        self._trim()

    def run(self, seconds=None, until=None):
        """Step until until() is true (True) or `seconds` passed (False); forever without both.
        Ctrl-C closes the connection and propagates."""
        t0 = hal.ticks_ms()
        gone = 0  # ms, summed step by step: one ticks_diff is right only within 6 days on 32 bits
        try:
            while True:
                if until is not None and until():
                    return True
                ms = 200
                if seconds is not None:
                    t = hal.ticks_ms()
                    gone += hal.ticks_diff(t, t0)
                    t0 = t
                    ms = min(ms, int(seconds * 1000) - gone)
                    if ms <= 0:
                        return False
                self.step(ms)
        except KeyboardInterrupt:
            self.close()
            raise

    # -- the loop -----------------------------------------------------------------------------

    def step(self, ms=100):
        """One turn: timers, then connect / bootstrap / set up / serve, waiting at most ms."""
        t = hal.ticks_ms()
        for tm in self._timers:
            if hal.ticks_diff(t, tm[1]) >= 0:
                tm[1] = hal.ticks_add(tm[1], tm[0])
                if hal.ticks_diff(t, tm[1]) >= 0:  # far behind (a long connect): no burst
                    tm[1] = hal.ticks_add(t, tm[0])
                try:
                    tm[2]()
                except Exception as e:
                    self.log("timer: %r" % e)
                t = hal.ticks_ms()
            ms = min(ms, max(0, hal.ticks_diff(tm[1], t)))
        st = self._state
        try:
            if self.id is None:
                self.start()
            elif st == _UP:
                self._call("link" if self.ready else "create", "serve" if self.ready else "step",
                           ms)
            elif st == _OFF and hal.ticks_diff(self._next, t) > 0:
                hal.sleep_ms(min(ms, hal.ticks_diff(self._next, t)))
            elif "boot" in self._s:
                self._call("bootstrap", "step", ms)
            else:
                self._call("session", "connect")
        except Exception as e:  # KeyboardInterrupt and SystemExit are not Exceptions
            # close the connection (unacknowledged messages stay in the client and are sent
            # again; a bootstrap's state stays stored), schedule the next attempt
            self.ready = False
            self._ans = None
            b = self._s.pop("bobj", None)
            if b is not None:
                b.close()
            if self._c is not None:
                self._c.close()
            self._state = _OFF
            d = self.bo.next()
            self._next = hal.ticks_add(hal.ticks_ms(), d)
            self.log("%s: %r; next attempt in %d ms" % ("bootstrap" if st == _BOOT
                                                          else "connection", e, d))
        self._trim()

    def _call(self, name, fn, *args):
        import sys

        if "microcot." + name not in sys.modules:
            self._room()  # its code goes in one place, not into the gaps
        if name == "link":
            from . import link as m
        elif name == "create":
            from . import create as m
        elif name == "session":
            from . import session as m
        else:
            from . import bootstrap as m
        return getattr(m, fn)(self, *args)

    def _trim(self):
        # only at the top of a step: a module must not be unloaded while it runs
        if self.cfg["unload"]:
            for m in _DROP[self._state + (self._state == _UP and self.ready)]:
                unload(m)
        self._hold()

    def _hold(self):
        n = self.cfg["reserve"]
        if self._rsv is None and n:
            gc.collect()
            try:
                self._rsv = bytearray(n)
            except MemoryError:
                pass

    def _room(self):
        if self._rsv is not None:
            self._rsv = None
            gc.collect()

    def _db(self):
        # store.py with this agent's root (set again: unloading store forgets it), reading
        # through _Fs (store.py reads with a buffer of its largest document, 4145 bytes)
        from . import store

        store.root(self.cfg["store"])
        if not isinstance(store.fs(), _Fs):
            store.fs(_Fs(store.fs()))
        return store

    def _on_msg(self, topic, msg):
        """The device client's callback (mr/ and br/): operation rows wait for link.py; errors
        (40-50) are counted, logged, kept and passed to on_error (except the answers that
        create.ask waits for); tenant and alarm answers are noted."""
        from .smartrest import parse

        try:
            recs = parse(msg)
        except ValueError as e:
            self.log("unreadable on %s: %s" % (topic, e))
            return
        asking = self._ans is not None
        ans = []
        for r in recs:
            code = r.code
            v = r.values
            if code in self._handlers:
                if len(self._ops) < 64:
                    self._ops.append((code, v))
            elif code != 87:
                ans.append(r)
                if 40 <= code <= 50 and not asking:
                    self.errors += 1
                    self.last_error = e = (code, r.line, ",".join(v))
                    self.log("error on %s: %d line %s: %s" % (topic, code, r.line, e[2]))
                    if self.on_error is not None:
                        try:
                            self.on_error(*e)
                        except Exception as x:
                            self.log("on_error: %r" % x)
                elif code == _R_TENANT and v:
                    self.tenant = v[0]
                elif code == _R_ALARM and len(v) > 3:
                    self.alarms[(v[3], v[1])] = [v[0], v[2]]
        if ans and asking:
            self._ans = ans

    def _put(self, tid, source, values):
        import json

        if source is None:
            source = ""
        elif source != "*" and source not in self._kids:
            raise ValueError("unknown child device %r" % (source,))
        self.q.put(json.dumps([tid, source] + values))

    def _body(self, row):
        return ("15,%s\n%s" % (self.xid, row)).encode()


class _Fs:
    """store.py's filesystem layer, but a file opened for reading reads at most what it holds:
    MicroPython's read(n) allocates n bytes first, and a fragmented heap may not have 4 KiB."""

    def __init__(self, fs):
        self._fs = fs

    def open(self, path, mode):
        f = self._fs.open(path, mode)
        return _Small(f) if mode == "rb" else f

    def __getattr__(self, name):
        return getattr(self._fs, name)


class _Small:
    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        f = self.f
        here = f.tell()
        left = f.seek(0, 2) - here
        f.seek(here)
        return f.read(left if n < 0 or n > left else n)

    def close(self):
        self.f.close()


def _t(t):
    if t is None:
        return now()
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError("time %r: Unix seconds" % (t,))
    return t
