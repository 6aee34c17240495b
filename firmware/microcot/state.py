# The agent's state (agent.py) as ONE object with named fields, and the few helpers that the
# agent and its phases share. The phase modules (session, bootstrap, create, link) take a State
# as their argument and never import agent.py: the orchestrator imports the phases, never the
# other way round (tests/host/test_firmware_imports.py checks that the package has no import
# circle). A phase that wants the board restarted raises Restart; agent.py does it.
import gc
import time

from . import hal

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


OFF = const(0)
BOOT = const(1)
UP = const(2)


class AgentError(Exception):
    pass


class Restart(Exception):
    """Raised by a phase: agent.py closes the connection and restarts the board (the text says
    why). Reading the ID and a bootstrap get boots of their own this way (cfg "restarts")."""


class State:
    """What the agent knows, shared by the orchestrator (agent.py) and its phases."""

    def __init__(self, cfg, log, q, bo):
        self.cfg = cfg
        self.log = log  # fn(text)
        self.q = q  # the offline queue (outq.Queue)
        self.bo = bo  # reconnect back-off (outq.Backoff)
        self.binary = bool(cfg["binary"])
        self.xid = cfg["xid"]
        self.id = None  # the device ID
        self.mo = None  # its managed object id
        self.dev = None  # document "dev" (session.py)
        self.cred = None  # document "cred": {"id", "password", "source", "ok"}, None: none
        self.bdoc = 0  # document "boot" as read at start-up (0: not read)
        self.oprec = None  # document "op" as read at start-up: an operation in progress
        self.c = None  # the device's MQTT client
        self.ctx = 0  # its TLS context (0: not made yet)
        self.on_msg = None  # the client's callback (agent.py)
        self.state = OFF  # OFF, BOOT, UP
        self.next = hal.ticks_ms()  # ticks of the next connect attempt
        self.boot = 0  # bootstrap: 1 needed, 2 its delay is running (bootstrap.py)
        self.bobj = None  # the Bootstrap under way
        self.phase = 0  # create.py's next setup step after a connect
        self.created = False  # self-creation done in this boot
        self.kids_due = False  # child devices to create, link or update
        self.refused = 0  # CONNACK refusals in a row
        self.ready = False  # set up: operations and data flow
        self.ans = None  # create.ask: [] waiting, then the rows of the answer
        self.handlers = {}  # response template id -> [fragment, fn(op), resume(record)]
        self.kids = {}  # child name -> [handler, operations, MO id]
        self.ops = []  # operation rows (template id, values) waiting to be handled
        self.recent = []  # ids of operations handled lately
        self.job = None  # [Op, generator]: a stepped operation under way (link.py)
        self.st = []  # payloads waiting for a connection (status rows, the tenant query)
        self.stats = {"connects": 0, "sent": 0, "ops": 0, "templates": None, "created": False}
        self.rsv = None  # the reserve block (cfg "reserve")
        self.rsv2 = None  # the room kept for the template registration
        self.ring = None  # the log's ring buffer (logring.Ring, c8y_LogfileRequest)
        self.trial = None  # ticks by which an update on trial must have connected (agent.step)
        self.tenant = None  # the own tenant, once asked for (Agent.query_tenant)

    def http_user(self):
        """The device's user for HTTPS downloads and uploads (cfg "http_user": {id}, {tenant});
        ops.Failed (the operation's reason) when it names the tenant and that is not known."""
        u = self.cfg["http_user"]
        if "{tenant}" in u:
            if not self.tenant:
                from .ops import Failed

                raise Failed("http_user %s needs the tenant, which is not known yet "
                                 "(Agent.query_tenant)" % u)
            u = u.replace("{tenant}", self.tenant)
        return u.replace("{id}", self.id)

    def secret(self, text):
        """A secret (a password) that the log ring must never keep: masked wherever it occurs."""
        if self.ring is not None and text:
            self.ring.mask(text)

    def body(self, row):
        """A SmartREST text payload: the X-ID line, then the row(s)."""
        return ("15,%s\n%s" % (self.xid, row)).encode()

    def db(self):
        """store.py with this agent's root (set again: unloading store forgets it), reading
        through _Fs (store.py reads with a buffer of its largest document, 4145 bytes)."""
        from . import store

        store.root(self.cfg["store"])
        if not isinstance(store.fs(), _Fs):
            store.fs(_Fs(store.fs()))
        return store

    # Loading code leaves a small heap in many small pieces, but some allocations need one piece
    # of a few KiB (the TLS context, the TLS handshake), and a phase's code is better loaded into
    # one free region than into the gaps. So the agent holds a block, taken while the heap is
    # still in one piece, lets go of it (room) right before such an allocation or import, and
    # takes it again (hold) after each step, when it can.

    def hold(self):
        n = self.cfg["reserve"]
        # not while an operation runs in steps: its download and buffers live in that room
        if self.rsv is None and n and self.job is None:
            gc.collect()
            try:
                self.rsv = bytearray(n)
            except MemoryError:
                pass

    def room(self):
        if self.rsv is not None:
            self.rsv = None
            gc.collect()

    def keep_room(self):
        """Hold room for the template registration (session.templates), while the heap is in one
        piece: the registration's payload (the templates file from its 15 line on) and a little
        for its MQTT header."""
        import os

        path = self.cfg["templates"]
        try:
            n = os.stat(path)[6]
            with open(path, "rb") as f:
                for line in f:
                    if line.startswith(b"15,"):
                        break
                    n -= len(line)
        except OSError:
            return  # session.templates says what is wrong with the file
        line = None
        gc.collect()
        try:
            self.rsv2 = bytearray(n + 128)
        except MemoryError:
            pass


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
