# The Cloud of Things device agent (seed 002): bootstrap, self-creation, data, operations.
#
#   from microcot.agent import Agent
#   a = Agent()                                  # settings from /microcot.json (load_config)
#   a.command("uptime", lambda args: "...")      # c8y_Command table
#   a.child("sensor-1", handler=fn)              # a child device and its operations handler
#   a.every(60, lambda: a.measure("c8y_Temperature", "T", 21.5, "C"))
#   a.run()                                      # forever; run(seconds=..)/run(until=..) bounded
#
# The orchestrator and its phases, each with its own module, so that a small board's heap holds
# only what the current phase needs (step() unloads the rest when it returns):
#   agent.py      always: settings, the application API, the loop; it alone imports the phases
#   state.py      always: the State object the phases take (named fields, no string keys), the
#                 shared helpers, Restart (a phase asks for a restart by raising it)
#   tpl.py        always: the template ids, one table (checked against templates.csv)
#   outq.py       always: the offline queue and the back-off
#   ident.py      at start: the device ID (identity.py, atmodem.py), the stored documents
#   session.py    connecting: TLS, the MQTT client, the template collection, refused credentials
#   bootstrap.py  without credentials: seed 002's bootstrap (xtea.py)
#   create.py     after a connect: self-creation, child devices, an operation a reboot
#                 interrupted (sans-I/O conversations: generators of requests fed with answers)
#   link.py       connected: operations, sending the queue in text or binary, status rows
#   ops.py        operation rows, c8y_Command's table, the operation-in-progress record
# Imports go one way: agent -> ident, session, bootstrap, create, link -> state, tpl, ops, smartrest,
# hal (tests/host/test_firmware_imports.py fails on any circle).
#
# Adding an operation: one handler and one response template row (templates.csv, named in
# tpl.py), e.g. `11,213,$.operations,$.c8y_Relay,$.id,$.deviceId,$.c8y_Relay.state` and
#   a.operation(213, "c8y_Relay", set_relay, resume=lambda rec: rec["stage"] == "set")
# The built-ins c8y_Command (202) and c8y_Restart (203) are registered the same way; the device
# management ones (_MANAGED) too, their code in modules loaded only while one runs. A handler
# gets an ops.Op (id, values, child), returns its result (None: SUCCESSFUL; a tuple (template
# id, values...): that row reports it), raises to fail it, or returns a generator for long work
# (link.py: advanced a chunk per step, so MQTT keeps alive). op.stage("x") notes progress in the
# operation's record; `resume(record)` decides after a reboot in the middle (True: SUCCESSFUL).
#
# Heap measures, each switchable in /microcot.json, kept where a faithful board showed it is
# needed (bench/agent.py --no-rate: a full session of firmware/main.py at the board budgets,
# smallest heap bisected to 4 KiB and confirmed 3 times; free heap after boot):
#   reserve   on (12 KiB): a block held for the few large allocations, let go of right before
#             them. Since mqtt.py sends a large QoS 1 payload without copying it, the bench's
#             sessions on the ESP32 model (i386-esp32, 86,000 B) passed 3/3 without it (smallest
#             heap 80,664 B vs 88,671 with it), but the demo and the e2e tests at that budget
#             then failed at the template registration (3,367 B in one piece): keep it. On the
#             Pico W model it costs 12 KB while connected (65.3 vs 77.6 KB free).
#   unload    on: the ESP32 model keeps 19.5 KB free while connected with it, 12.6 KB without.
#   restarts  on: a one-boot life on the ESP32 model failed now and then at the template
#             registration; with them off it needs 84,668 B (vs 80,664).
#   Pico W model (i386-rp2, 169,000 B): none of them needed (all off: 3/3, 61.6 KB free while
#   connected, smallest 162,730 B).
#   With device management (the figures above are from before it; measured since, on the ESP32
#   model): a raw-REPL life had 39.7 KB free after Agent() (40.3 KB before); a reserve of 8 KiB
#   instead of 12 left the first TLS handshake without a 1.1 KB piece every time, so the reserve
#   stays at 12 KiB; the log ring is off there (log_ring null, _RING); the room held for the
#   template registration is its size, not 8 KiB (State.keep_room).
# Reading the modem and bootstrapping happen in boots of their own (`restarts`): the agent
# restarts the board (soft reset) after either, so that their code and names (which MicroPython
# never frees) do not crowd the session that follows. A fresh device: boot 1 reads its ID and
# stores it; boot 2 bootstraps and stores the credentials; boot 3 and every later one connects.
# The ID is read again only when none is stored (the stored credentials belong to it).
#
# On the board's flash (store.py documents under `store`, default /store):
#   dev    {"id", "src": iccid|mac|configured, "imsi", "mo", "info", "kids": {name: [MO id,
#          linked, operations]}}      the device, its managed object, what was sent about it
#   cred   {"id", "password", "source": bootstrap|provisioned, "ok"}      (the password is
#          never printed)
#   boot   {"state": "ONGOING", "id", "secret"} while a bootstrap is under way
#   op     {"id", "kind", "rtid", "stage", "started", "child"} while an operation is under way
#          (ops.py): found at boot, it is reported (SUCCESSFUL or FAILED) and deleted
#   queue.txt   rows of the offline queue that did not fit in memory (outq.py)
#   queue.log   with "durable": every row of the queue, on flash before measure() returns
#               (outlog.py), until its PUBACK
#
#   disconnected  wait for the next attempt (back-off with jitter, outq.Backoff), then connect
#                 as user = ID, clean_session=False, subscribe mr/ and br/ (QoS 1), then create.
#   bootstrap     after a random delay: bootstrap.py, then restart.
#   up            handle incoming messages, operations, send what is queued.
# One step() never blocks longer than asked, except inside a connect or one request of the
# setup (bounded by `timeout`), a handler's run (or one chunk of a stepped one) and a c8y_Restart.
#
# Data (measure, event, location, alarm, alarm_status, send) always goes through the offline queue
# (outq.Queue) as JSON rows [template id, source, values...]: sent in order as soon as connected,
# in text on ms/<ID> or binary on bs/<ID> (`binary`), QoS 1. The source is symbolic ("" this
# device, a child's name, "*" none) until the row is sent, so data measured before the
# self-creation gets the right MO id. Times are Unix seconds. Errors the platform answers on mr/
# or br/ (40-50) are counted (`errors`), logged, kept in `last_error` and passed to
# `on_error(code, line, text)`.
import os

from . import hal, tpl
from .outq import Backoff, make
from .state import OFF, UP, AgentError, Restart, State, iso, js, now, unload  # noqa: F401

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
    "durable": False,  # every row on flash before measure() returns (outlog.py; docs/agent.md)
    "store": "/store",
    "reserve": 12288,  # bytes held for the few large allocations (0: none; see above)
    # the other heap measures, switchable so that bench/agent.py can tell which a board needs:
    "restarts": True,  # boots of their own after reading the ID and after a bootstrap
    "unload": True,  # drop the phase modules a state does not use (_DROP)
    "log": True,
    # device management (_MANAGED): which of the built-in operations this device supports
    "manage": ["firmware", "software", "configuration", "logs"],
    "availability": 10,  # minutes without a message before the platform says unavailable (0: -)
    "log_ring": None,  # bytes of log lines for c8y_LogfileRequest (0: none; None: _RING)
    "rest_url": None,  # the platform's HTTPS REST API (uploads); None: https://<host>
    "http_user": "{id}",  # the device's user for HTTPS downloads and uploads ({tenant}, {id})
    "app_trial": 300,  # seconds a new application gets to connect before it is rolled back
}

# The built-in device-management operations: (cfg "manage" name, response template, fragment,
# module). A module's code is loaded only while one of its operations runs (_Mod): it has
# handle(s, op) and may have resume(s, record), the operation's resume hook.
_MANAGED = (("firmware", tpl.R_FIRMWARE, "c8y_Firmware", "opfw"),
            ("software", tpl.R_SOFTWARE, "c8y_SoftwareUpdate", "opapp"),
            ("configuration", tpl.R_CONFIG, "c8y_Configuration", "opconf"),
            ("configuration", tpl.R_SEND_CONFIG, "c8y_SendConfiguration", "opconf"),
            ("logs", tpl.R_LOGFILE, "c8y_LogfileRequest", "oplog"))
# log_ring None: a ring of _RING[1] bytes when the heap has over _RING[0] free at start, else
# none. Measured on the ESP32 model (86,000 B): the ring and its module take 3.5 KB, which a
# connected agent there cannot spare, and the log upload's code does not fit beside it anyway
# (tests/host/test_agent_logs.py runs on the Pico W model); the Pico W model has 150 KB.
_RING = (100000, 2048)
# inbound rows kept per message (operations waiting, answer rows) and alarm ids remembered: a
# message's rows are bounded by the client's max_packet, what is kept of them by these
_MAX_KEPT = 64
_MAX_ALARMS = 32
# what they load, unloaded once no operation runs
_OPMODS = ("opfw", "opapp", "opconf", "oplog", "httpget", "ota", "appswitch", "apptar",
           "settings", "tlsctx")


# what a step unloads, by state: the transient phases that state does not use (the code that
# stays for a boot, start() loads first)
_DROP = (("ident", "session", "store", "create"),  # off
         ("ident", "session", "create", "store"),  # bootstrap
         ("ident", "session", "mqttconn"),  # up, setting up (connected: mqtt.py's opening code)
         ("ident", "session", "store", "create", "mqttconn"))  # up and ready


def load_config(path=CONFIG, **over):
    """DEFAULTS, updated from the JSON object in `path` (when it exists), then from `over`."""
    cfg = dict(DEFAULTS)
    if path:
        import json

        data = {}
        for p in (path, path + ".new", path + ".old"):
            try:
                with open(p) as f:
                    data = json.load(f)
            except OSError:
                continue
            except ValueError as e:
                if p == path:
                    raise ValueError("%s: not valid JSON (%s)" % (path, e))
                continue  # a .new cut short: the old file had not moved yet
            if p != path:  # c8y_Configuration's switch (opconf.write) was cut short: finish it
                try:
                    os.rename(p, path)
                except OSError:
                    pass
            break
        if not isinstance(data, dict):
            raise ValueError("%s: not a JSON object" % path)
        cfg.update(data)
        cfg["file"] = [path, data]  # its own keys, for c8y_Configuration (opconf.py)
    cfg.update(over)
    return cfg


def _restarted(rec):
    """c8y_Restart's resume rule: it succeeded when the board got to its reset."""
    return rec.get("stage") == "reset"


class _Mod:
    """A built-in operation whose code is a module of its own, imported when it is needed."""

    def __init__(self, s, name):
        self.s = s
        self.name = name

    def _m(self):
        import sys

        n = "microcot." + self.name
        if n not in sys.modules:
            self.s.room()  # its code goes in one place, not into the gaps
            __import__(n)
        return sys.modules[n]

    def __call__(self, op):
        return self._m().handle(self.s, op)

    def resume(self, rec):
        fn = getattr(self._m(), "resume", None)
        return None if fn is None else fn(self.s, rec)

    def boot(self, rec):
        fn = getattr(self._m(), "boot", None)
        if fn is not None:
            fn(self.s, rec)


class Agent:
    def __init__(self, config=None, path=CONFIG, **over):
        if config is not None:
            cfg = dict(DEFAULTS)
            cfg.update(config)
            cfg.update(over)
        else:
            cfg = load_config(path, **over)
        self.cfg = cfg
        self.last_error = None
        self.errors = 0
        self.on_error = None  # fn(code, line, text)
        self.alarms = {}  # (source MO id, type) -> [alarm id, status], from the answers
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
        q = make(n[0], st, n[1], cfg["durable"])
        n = cfg["backoff"]
        s = self.s = State(cfg, self.log, q, Backoff(int(n[0] * 1000), int(n[1] * 1000)))
        self.q = q
        self.bo = s.bo
        self.stats = s.stats
        s.on_msg = self._on_msg
        self._cmds = {}  # c8y_Command table: name -> fn(args)
        self._timers = []
        # the built-in operations, registered like any other
        self.operation(tpl.R_COMMAND, "c8y_Command", self._command)
        self.operation(tpl.R_RESTART, "c8y_Restart", self._reset, _restarted)
        n = cfg["log_ring"]
        if n is None:
            f = hal.mem_free()  # -1: CPython, no fixed heap
            n = _RING[1] if f < 0 or f > _RING[0] else 0
        for m in _MANAGED:
            if m[0] in cfg["manage"] and (n or m[0] != "logs"):
                h = _Mod(s, m[3])
                self.operation(m[1], m[2], h, h.resume)
        if n and "logs" in cfg["manage"]:
            from .logring import Ring

            s.ring = Ring(n)
            s.secret(cfg["bootstrap_password"])
            w = cfg.get("wlan")
            if isinstance(w, dict):
                s.secret(w.get("password"))
        s.hold()
        for slot in "ab" if cfg["reserve"] else "":
            try:  # credentials stored: this boot connects and may register the templates
                os.stat(st.rstrip("/") + "/cred." + slot)
            except OSError:
                continue
            s.keep_room()
            break

    def __getattr__(self, name):
        # the state's fields that applications read as the agent's: id, mo, ready, binary,
        # xid; _c the device's MQTT client (bench/agent.py, demo.py: a._c.pending())
        if name == "s":
            raise AttributeError(name)
        return getattr(self.s, "c" if name == "_c" else name)

    def log(self, msg):
        r = self.s.ring
        if r is not None:
            r.add(msg)
        if self.cfg["log"]:
            print("agent:", msg)

    # -- application API ----------------------------------------------------------------------

    def command(self, name, fn):
        """Register a c8y_Command command: fn(args: str) -> result (str); raise to fail it.
        The first word of the operation's text names the command; nothing else is run."""
        if not name or " " in name or "\t" in name:
            raise ValueError("command name %r: one word" % (name,))
        self._cmds[name] = fn

    def operation(self, rtid, fragment, fn=None, resume=None):
        """Handle operations arriving as rows of response template rtid (its first two values
        $.id, $.deviceId) for this device with fn(op) -> result; fragment (e.g. c8y_Firmware)
        goes into the supported operations. fn None: rows for child devices only. fn may
        return a generator (long work, advanced a chunk per step). resume(record): after a
        reboot in the middle of one, True reports it SUCCESSFUL, else FAILED (ops.py)."""
        self.s.handlers[rtid] = [fragment, fn, resume]

    def child(self, name, handler=None, operations=()):
        """A child device (created and linked once, then remembered): handler(op) gets its
        operations; `operations` are its supported operations."""
        if not isinstance(name, str) or not 0 < len(name) < 65 or name == "*" or "\n" in name:
            raise ValueError("child name %r: 1 to 64 characters, not '*'" % (name,))
        self.s.kids[name] = [handler, list(operations), None]
        self.s.kids_due = True

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
        self._put(tpl.MEASURE, source, [js(fragment), js(series), value, js(unit), _t(t),
                                       js(type or fragment)])

    def event(self, type, text, t=None, source=None):
        self._put(tpl.EVENT, source, [js(type), js(text), _t(t)])

    def alarm(self, type, text, severity="MAJOR", status="ACTIVE", t=None, source=None):
        """severity: CRITICAL MAJOR MINOR WARNING; status: ACTIVE ACKNOWLEDGED CLEARED."""
        if severity not in SEVERITIES or status not in STATUSES:
            raise ValueError("alarm %r %r: bad severity or status" % (severity, status))
        self._put(tpl.ALARM, source, [js(type), _t(t), js(text), status, severity])

    def alarm_status(self, type, status, source=None):
        """Set the status of the open alarm of this type (its id learnt from the answer to the
        alarm). One not known yet can only be CLEARED (posting a CLEARED alarm clears it)."""
        if status not in STATUSES:
            raise ValueError("alarm status %r" % (status,))
        known = self.alarms.get((self.mo if source is None else self.s.kids[source][2], type))
        if known:
            self._put(tpl.ALARM_STATUS, "*", [int(known[0]), status])
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
        self.s.st.append(self.s.body(str(tpl.TENANT)))

    def start(self, device_id=None):
        """The device ID (step() calls it): the stored one, else read from the modem or the
        MAC (session.py), then a restart. device_id: use this ID (tests, fixed IDs)."""
        s = self.s
        if s.id is None:
            try:
                # the ID and the documents; an operation's boot of its own ends there (Restart)
                self._call("ident", "identify", device_id)
                unload("ident")
                unload("store")
                s.hold()  # the block again, before code fills the gaps
                # the code that stays for this boot, in one go: the MQTT client, and then the
                # bootstrap or what a connected agent needs
                try:
                    from .mqtt import MQTTClient, tls_context  # noqa: F401

                    if s.cred is not None:
                        from . import link  # noqa: F401 (with smartrest.py and ops.py)
                        from .smartrest import check_xid

                        check_xid(s.xid)
                        if s.binary:
                            from . import binrest  # noqa: F401
                    else:
                        s.rsv2 = None  # no template registration in this boot
                        from . import bootstrap, xtea  # noqa: F401
                    self._call("session", "tls")
                except MemoryError as e:
                    # loading it all in one go is a layout choice: the connect loads what is
                    # missing (the ESP32 model at its budget, most boots)
                    self.log("start: %r; the connect loads the rest" % e)
            except Restart as e:
                self._restart(str(e))
            finally:
                self._trim()

    def close(self):
        """Disconnect (the broker keeps the session) and move the queue to flash."""
        s = self.s
        s.ready = False
        s.state = OFF
        b = s.bobj
        s.bobj = None
        if b is not None:
            b.close()
        if s.c is not None:
            try:
                s.c.disconnect()
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
        s = self.s
        st = s.state
        if s.trial is not None and hal.ticks_diff(t, s.trial) >= 0:
            # an update on trial (firmware, application) did not connect in time: a hard reset
            # makes the bootloader (firmware) or boot.py (application) roll it back
            self.log("no connection within app_trial of an update: hard reset, rollback")
            self.close()
            hal.reset()
            raise SystemExit("microcot: reset for a rollback")
        try:
            if s.id is None:
                self.start()
            elif st == UP:
                if s.ready:
                    if s.kids_due:
                        self._call("create", "children")
                    self._call("link", "serve", ms)
                else:
                    self._call("create", "step", ms)
            elif st == OFF and hal.ticks_diff(s.next, t) > 0:
                hal.sleep_ms(min(ms, hal.ticks_diff(s.next, t)))
            elif s.boot:
                self._call("bootstrap", "step", ms)
            else:
                self._call("session", "connect")
        except Restart as e:
            self._restart(str(e))
        except Exception as e:  # KeyboardInterrupt and SystemExit are not Exceptions
            # close the connection (unacknowledged messages stay in the client and are sent
            # again; a bootstrap's state stays stored), schedule the next attempt
            s.ready = False
            s.ans = None
            b = s.bobj
            s.bobj = None
            if b is not None:
                b.close()
            if s.c is not None:
                s.c.close()
            s.state = OFF
            d = s.bo.next()
            s.next = hal.ticks_add(hal.ticks_ms(), d)
            self.log("%s: %r; next attempt in %d ms" % ("bootstrap" if st == 1
                                                          else "connection", e, d))
        self._trim()

    def _call(self, name, fn, *args):
        import sys

        if "microcot." + name not in sys.modules:
            self.s.room()  # its code goes in one place, not into the gaps
        if name == "link":
            from . import link as m
        elif name == "create":
            from . import create as m
        elif name == "session":
            from . import session as m
        elif name == "ident":
            from . import ident as m
        else:
            from . import bootstrap as m
        return getattr(m, fn)(self.s, *args)

    def _restart(self, why):
        """Restart the board: a soft reset where the port has one (main.py runs again)."""
        self.log("restarting: " + why)
        self.close()
        try:
            import machine

            fn = getattr(machine, "soft_reset", None)
        except ImportError:
            fn = None
        if fn is not None:
            fn()
        raise SystemExit("microcot: restart (%s)" % why)

    def _trim(self):
        # only at the top of a step: a module must not be unloaded while it runs
        s = self.s
        if self.cfg["unload"]:
            for m in _DROP[s.state + (s.state == UP and s.ready)]:
                unload(m)
            if s.job is None:
                for m in _OPMODS:
                    unload(m)
        s.hold()

    def _command(self, op):
        return self._call("link", "command", self._cmds, op)

    def _reset(self, op):
        return self._call("link", "reset", op)

    def _on_msg(self, topic, msg):
        """The device client's callback (mr/ and br/): operation rows wait for link.py; errors
        (40-50) are counted, logged, kept and passed to on_error (except the answers that
        create.ask waits for); tenant and alarm answers are noted.

        Inbound data never raises out of here: a message that is not valid SmartREST
        (smartrest.ERRORS) is handled up to its first defect and the rest is dropped and logged
        ("unreadable on <topic>"), and so is one that fails in any other way (out of memory on a
        board, say). The client then acknowledges it: an exception would leave poll(), the step
        would reconnect and the broker would deliver the same message again, for ever. Rows are
        read one at a time (smartrest.records), and what is kept of them is bounded: _MAX_KEPT
        operation rows and answer rows, _MAX_ALARMS alarm ids."""
        from .smartrest import ERRORS, records

        s = self.s
        asking = s.ans is not None
        ans = []
        try:
            for r in records(msg):
                code = r.code
                v = r.values
                if code in s.handlers:
                    if len(s.ops) < _MAX_KEPT:
                        s.ops.append((code, v))
                elif code != 87:
                    if asking and len(ans) < _MAX_KEPT:
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
                    elif code == tpl.R_TENANT and v:
                        s.tenant = v[0]
                    elif code == tpl.R_ALARM and len(v) > 3:
                        al = self.alarms
                        k = (v[3], v[1])
                        if k not in al and len(al) >= _MAX_ALARMS:
                            al.pop(next(iter(al)))  # any one: a hostile stream must not grow it
                        al[k] = [v[0], v[2]]
        except ERRORS as e:
            self.log("unreadable on %s: %s" % (topic, e))
        except Exception as e:  # see above: nothing may leave the callback
            self.log("message on %s dropped: %r" % (topic, e))
        if ans and asking:
            s.ans = ans

    def _put(self, tid, source, values):
        import json

        if source is None:
            source = ""
        elif source != "*" and source not in self.s.kids:
            raise ValueError("unknown child device %r" % (source,))
        self.q.put(json.dumps([tid, source] + values))


def _t(t):
    if t is None:
        return now()
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError("time %r: Unix seconds" % (t,))
    return t
