# Operations as the agent receives them (seed 002 "Operations"), pure logic.
#
# An operation reaches the device on mr/<ID> as a row of one of its response templates, e.g.
#   202,1,<operation id>,<device MO id>,<command text>      (11,202,$.operations,$.c8y_Command,...)
#   203,1,<operation id>,<device MO id>                     (11,203,$.operations,$.c8y_Restart,...)
# Every operation template of the agent starts with $.id and $.deviceId, so `Op` takes those two
# and keeps the rest as `values`. The device MO id tells whether it is for the device itself or
# for one of its child devices (seed 002: "Handhabung von Operationen für Child-Devices").
#
# c8y_Command runs one of the commands the application registered (a dict name -> fn(args)):
# the first word of the text names it, the rest is its argument string. Nothing else is
# executed: an unknown name fails the operation with "unknown command: <name>".
#
# The operation in progress (store.py document "op", link.py writes it): before EXECUTING is
# sent, {"id", "kind": fragment, "rtid", "stage", "started": Unix seconds, "child"} is stored;
# a handler may move `stage` on (Op.stage, e.g. c8y_Restart: "reset" right before the reset),
# with "data" for its resume hook (c8y_Firmware: the partition and version it activated);
# the record is deleted once the final status is sent. A record found at boot means a reboot
# came in the middle of that operation: create.outcome() says how it is reported (SUCCESSFUL when the
# resume hook of its kind returns True, else FAILED with the hook's text or "interrupted ..."),
# the record is deleted, and the operation id counts as handled (a redelivery is not run).

MAX_RESULT = 2000  # characters of a result or failure reason sent back


class Failed(Exception):
    """Raised by a handler: the operation is reported FAILED with this text as its reason."""


class Op:
    __slots__ = ("id", "rtid", "device", "values", "child", "save")

    def __init__(self, oid, rtid, device, values, child=None):
        self.id = oid
        self.rtid = rtid
        self.device = device
        self.values = values
        self.child = child  # the child device's name, or None for the device itself
        self.save = None  # fn(stage): stores the operation's record with that stage (link.py)

    def stage(self, name, data=None):
        """Note how far the operation got, in its stored record (read by resume() at boot);
        data (small, JSON): what resume() needs to know, kept in the record as "data"."""
        if self.save is not None:
            self.save(name, data)

    @property
    def text(self):
        """The first value after the device id (c8y_Command: the command line)."""
        return self.values[0] if self.values else ""

    def __repr__(self):
        return "Op(%s, %d, dev %s, %r)" % (self.id, self.rtid, self.device, self.values)


def parse(row):
    """An Op from (response template id, values) of an operation row; ValueError when the row
    does not carry an operation id and a device id."""
    code, v = row
    if len(v) < 2 or not _digits(v[0]) or not _digits(v[1]):
        r = repr(v[:3])  # the row came from the platform: bounded in the log
        raise ValueError("operation row %d: expected <operation id>,<device id>,..., got %s"
                         % (code, r if len(r) <= 80 else r[:77] + "..."))
    return Op(v[0], code, v[1], v[2:])


def _digits(s):
    # ids are the platform's longs (19 digits at most): a longer one is refused before any int()
    return bool(s) and len(s) <= 20 and all("0" <= c <= "9" for c in s)


def sha256(v, what):
    """An operation's optional SHA-256: None when empty, the 64 hex digits, else Failed."""
    if not v:
        return None
    if len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v):
        raise Failed("%s sha256 is not 64 hex digits" % what)
    return v


def clip(text):
    """A result or reason as str, bounded to MAX_RESULT characters."""
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    if len(text) > MAX_RESULT:
        text = text[: MAX_RESULT - 3] + "..."
    return text


def reason(exc):
    """The failure reason of an exception raised by a handler."""
    s = str(exc)
    if isinstance(exc, Failed):
        return clip(s or "failed")
    return clip("%s: %s" % (type(exc).__name__, s) if s else type(exc).__name__)


def run(table, text):
    """Run a command line with a table name -> fn(args); its result (str), or Failed."""
    text = (text or "").strip()
    i = 0
    while i < len(text) and text[i] not in " \t":
        i += 1
    name = text[:i]
    fn = table.get(name)
    if fn is None:
        raise Failed("unknown command: %s" % (name or "(empty)"))
    return clip(fn(text[i:].strip()))


def record(op, kind, t, stage="run"):
    """The stored record of an operation in progress."""
    return {"id": op.id, "kind": kind, "rtid": op.rtid, "stage": stage, "started": t,
            "child": op.child}
