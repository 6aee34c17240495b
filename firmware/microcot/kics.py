"""Tag-value subscription of Kaspersky Industrial CyberSecurity for Networks (seed 001).

The server streams tag values over SignalR (JSON hub protocol, see signalr.py) on the WebSocket at
`wss://<server>/kics4net/api/v4/tag-values`, authenticated with `Authorization: Bearer <token>`
(no or a bad token: HTTP 401 -> KicsAuthError). The client invokes the stream method
`GetTagValuesStream` with one argument

    {"tagIdentifiers": [{"tagName": ..., "assetName": ...}, ...],
     "streamConfig": {"samplingRateHz": <number> | null}}        (null: no sampling)

and receives stream items of two kinds:

    {"confirmation": {"result": "ok"|"notFound", "tagIdentifier": {...}, "tagId": 102}}
    {"value": {"tagId": 102, "tagValue": <object, or the JSON text of the object>}}

A tag value: {"n": type name, "ts": µs since 1970, "dn": "r"|"w"|"rw", "mp": monitoring point,
"d": {field name: field}}; a field: {"t": type, "v": value, "x": 1 on the main value, "m": marker}
with the types u (UINT64), i (INT64), b (BOOL), d (DOUBLE), s (UTF-8), t (µs since 1970),
e (ENUM: also "n" type name, "s" string), st (structure: "v" holds fields), un (union: "v" holds
the alternative views of the same data, "_" the raw one). Markers: q quality, ts timestamp
status, ds data status, o origin, t update time, ct cause of transmission.

The server keeps at most one active subscription: a second one is refused with an error about an
excessive number of connections (KicsSubscriptionLimitError here). After the connection drops, the
app must subscribe again: the client does that by itself.

Pieces, all without I/O except TagValueClient:
  subscription_request()  builds and checks the argument (KicsArgumentError)
  parse_item()            a stream item -> Confirmation or TagValue (KicsDecodeError)
  decode_tag_value()      a tagValue -> TagValue of Fields, EnumValues
  Session                 SignalR connection + subscription state, fed with bytes and ticks
  TagValueClient          Session over microcot.ws.WebSocketClient, cyclic execute()
Tags are named by (assetName, tagName) tuples; dicts with those keys are accepted too.

Errors (ERRORS): the decoders (parse_item, decode_tag_value, decode_field) raise only
KicsDecodeError (a KicsError) for any input, naming the field path. Limits, checked before the
work they bound: st/un fields nested deeper than MAX_DEPTH (10) levels are refused before
recursing into them (MicroPython's recursion limit is far below CPython's: a 100-level record
must not reach it); an integer (u, i, t, ts, tagId, mp) of more than MAX_INT_DIGITS (40) digits is
refused before it is converted. Error messages show a bounded summary of the offending value,
never the repr of a whole hostile structure. Records are parsed by signalr.loads (its own
MAX_DEPTH on JSON nesting). TagValueClient never raises out of execute(): a record that breaks
the protocol ends the connection as KicsConnectionError (state WAITING, then reconnect and
subscribe again); an item that does not decode is skipped with a KicsDecodeError in `error` and
on_error, and the stream goes on.
"""

from microcot import signalr

PATH = "/kics4net/api/v4/tag-values"
METHOD = "GetTagValuesStream"

OK = "ok"
NOT_FOUND = "notFound"

FIELD_TYPES = ("u", "i", "b", "d", "s", "t", "e", "st", "un")
MAX_DEPTH = 10  # st/un nesting levels accepted (a top-level field is level 1)
MAX_INT_DIGITS = 40  # UINT64/INT64 need 20; more is refused before int() sees it
try:
    _INT_LIM = 10 ** MAX_INT_DIGITS
except OverflowError:  # a port whose ints stop at 64 bits: its json cannot make bigger ones
    _INT_LIM = None
MARKERS = ("q", "ts", "ds", "o", "t", "ct")

# Session / TagValueClient states
IDLE = 0
CONNECTING = 1  # WebSocket opening
HANDSHAKE = 2  # SignalR handshake sent
SUBSCRIBING = 3  # GetTagValuesStream sent, confirmations outstanding
SUBSCRIBED = 4  # every tag confirmed (ok or notFound)
WAITING = 5  # disconnected, reconnecting after a pause
FAILED = 6  # stopped by an error that a retry would repeat (see .error)
STOPPED = 7  # closed by the app

STATE_NAMES = ("idle", "connecting", "handshake", "subscribing", "subscribed", "waiting",
               "failed", "stopped")


class KicsError(Exception):
    """Base of this module's errors."""


class KicsAuthError(KicsError):
    """The server answered the WebSocket request with 401: no token, or one it did not accept."""


class KicsSubscriptionLimitError(KicsError):
    """The server refused the subscription: another one is active (seed: "excessive number of
    connections"). Retried after a pause, since the other subscription may end (or be our own
    previous one, not yet noticed as gone by the server)."""


class KicsSubscriptionError(KicsError):
    """The server refused the subscription with an error (e.g. a problem with the argument)."""


class KicsArgumentError(KicsError):
    """A subscription argument that the server would refuse, caught before sending."""


class KicsConnectionError(KicsError):
    """The connection failed or closed (WebSocket, SignalR handshake, server close, timeout)."""


class KicsDecodeError(KicsError):
    """A stream item or tag value that does not follow the seed's format; names the field path."""


ERRORS = (KicsError,)


def _show(v):
    """A short description of a received value for an error message (bounded, no recursion)."""
    if isinstance(v, dict):
        return "an object of %d keys" % len(v)
    if isinstance(v, (list, tuple)):
        return "an array of %d items" % len(v)
    if isinstance(v, str):
        return repr(v[:40]) + ("..." if len(v) > 40 else "")
    if isinstance(v, int) and not isinstance(v, bool) and _INT_LIM is not None \
            and not -_INT_LIM < v < _INT_LIM:
        return "an integer of more than %d digits" % MAX_INT_DIGITS
    return repr(v)


# -- tags and the subscription argument -------------------------------------------------------


def tag_key(tag):
    """(assetName, tagName) of a tuple/list or a {"assetName", "tagName"} dict."""
    if isinstance(tag, dict):
        a = tag.get("assetName")
        t = tag.get("tagName")
    elif isinstance(tag, (tuple, list)) and len(tag) == 2:
        a, t = tag
    else:
        raise KicsArgumentError("a tag is (assetName, tagName) or a dict with both, got %r" % (tag,))
    return a, t


def subscription_request(tags, sampling_rate_hz=None):
    """The GetTagValuesStream argument; KicsArgumentError naming what is wrong."""
    try:
        if isinstance(tags, (str, bytes, dict)):
            raise TypeError
        tags = list(tags)
    except TypeError:
        raise KicsArgumentError("tags must be a list of (assetName, tagName), got %r" % (tags,))
    ids = []
    for i, tag in enumerate(tags):
        a, t = tag_key(tag)
        for what, v in (("assetName", a), ("tagName", t)):
            if not isinstance(v, str) or not v:
                raise KicsArgumentError("tagIdentifiers[%d].%s must be a non-empty string, got %r"
                                        % (i, what, v))
        ids.append({"tagName": t, "assetName": a})
    if not ids:
        raise KicsArgumentError("tagIdentifiers must name at least one tag")
    r = sampling_rate_hz
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0
                          or r == float("inf")):
        raise KicsArgumentError("streamConfig.samplingRateHz must be null or a number > 0, got %r"
                                    % (sampling_rate_hz,))
    return {"tagIdentifiers": ids, "streamConfig": {"samplingRateHz": sampling_rate_hz}}


def classify_error(text):
    """The exception for a completion error of GetTagValuesStream."""
    low = (text or "").lower()
    if "connection" in low and ("excess" in low or "too many" in low or "number of" in low
                                or "limit" in low or "exceed" in low):
        return KicsSubscriptionLimitError(text)
    return KicsSubscriptionError(text)


# -- the value model ---------------------------------------------------------------------------


class EnumValue:
    """An ENUM field's value: type name (`n`), original value (`v`) and its string (`s`)."""

    def __init__(self, name, value, string):
        self.name = name
        self.value = value
        self.string = string

    def __eq__(self, other):
        if isinstance(other, EnumValue):
            return (self.name, self.value, self.string) == (other.name, other.value, other.string)
        return False

    def __hash__(self):
        return hash((self.name, self.value))

    def __repr__(self):
        return "EnumValue(%r, %r, %r)" % (self.name, self.value, self.string)


class Field:
    """One field of a tag value.

    type    one of FIELD_TYPES
    value   u, i, t: int (exact, any size; t in µs since 1970); b: bool; d: float; s: str;
            e: EnumValue; st, un: dict name -> Field (a union's raw view is "_")
    main    True for the field marked `"x": 1` (the tag's main value)
    marker  the `m` marker code (q, ts, ds, o, t, ct) or None
    path    dotted path from the top ("strucfield.q2")
    """

    def __init__(self, name, type, value, main=False, marker=None, path=None):
        self.name = name
        self.type = type
        self.value = value
        self.main = main
        self.marker = marker
        self.path = path or name

    def __getitem__(self, name):
        if self.type not in ("st", "un"):
            raise KeyError("field %s of type %s has no sub-fields" % (self.path, self.type))
        return self.value[name]

    def to_py(self):
        """Plain Python: nested dicts for st/un, (name, value, string) tuples for enums."""
        if self.type in ("st", "un"):
            return dict((k, f.to_py()) for k, f in self.value.items())
        if self.type == "e":
            return (self.value.name, self.value.value, self.value.string)
        return self.value

    def __eq__(self, other):
        return isinstance(other, Field) and (self.name, self.type, self.value, self.main,
                                             self.marker) == (other.name, other.type, other.value,
                                                              other.main, other.marker)

    def __repr__(self):
        extra = (" x" if self.main else "") + (" m=%s" % self.marker if self.marker else "")
        return "Field(%s:%s=%r%s)" % (self.path, self.type, self.value, extra)


class TagValue:
    """A tag's new value.

    tag_id     the server's tag id
    tag        (assetName, tagName) when known from the confirmation, else None
    type_name  `n`: the tag's TagStructure type name
    ts         `ts`: µs since 1970 (int, exact)
    direction  `dn`: "r", "w" or "rw"
    mp         monitoring point id
    fields     dict name -> Field (top level of `d`)
    main       the Field with `"x": 1` (None if there is none); `x` is its value
    markers    dict marker code -> Field carrying it (the shallowest; `marked` lists all)
    """

    def __init__(self, tag_id, type_name, ts, direction, mp, fields, tag=None):
        self.tag_id = tag_id
        self.tag = tag
        self.type_name = type_name
        self.ts = ts
        self.direction = direction
        self.mp = mp
        self.fields = fields
        self.marked = []
        self.main = None
        walk = []
        todo = list(fields.values())
        while todo:
            f = todo.pop()
            walk.append(f)
            if f.type in ("st", "un"):
                todo.extend(f.value.values())
        walk.sort(key=_depth_key)  # shallowest first, then by path: the same on every port
        self.markers = {}
        for f in walk:
            if f.main and self.main is None:
                self.main = f
            if f.marker:
                self.marked.append(f)
                if f.marker not in self.markers:
                    self.markers[f.marker] = f

    @property
    def x(self):
        return self.main.value if self.main is not None else None

    def __getitem__(self, name):
        return self.fields[name]

    def get(self, path, default=None):
        """The Field at a dotted path ("strucfield.v1"), or default."""
        node = self.fields
        f = None
        for part in path.split("."):
            if node is None or part not in node:
                return default
            f = node[part]
            node = f.value if f.type in ("st", "un") else None
        return f

    def to_py(self):
        return dict((k, f.to_py()) for k, f in self.fields.items())

    def __repr__(self):
        return "TagValue(%r, id=%r, n=%r, ts=%r, x=%r)" % (self.tag, self.tag_id, self.type_name,
                                                          self.ts, self.x)


def _depth_key(f):
    return (f.path.count("."), f.path)


class Confirmation:
    """The server's answer for one requested tag: result "ok" or "notFound", and its tag id."""

    def __init__(self, result, tag, tag_id):
        self.result = result
        self.tag = tag
        self.tag_id = tag_id

    @property
    def ok(self):
        return self.result == OK

    def __repr__(self):
        return "Confirmation(%r, %r, %r)" % (self.result, self.tag, self.tag_id)


def _int(v, path, what="integer"):
    """An exact int from a JSON integer or a decimal string (kept as the string if the port
    cannot hold it); integral floats only while a double is exact (2**53). At most
    MAX_INT_DIGITS digits."""
    if isinstance(v, bool):
        raise KicsDecodeError("%s: expected an %s, got a boolean" % (path, what))
    if isinstance(v, int):
        if _INT_LIM is not None and not -_INT_LIM < v < _INT_LIM:
            raise KicsDecodeError("%s: %s of more than %d digits" % (path, what, MAX_INT_DIGITS))
        return v
    if isinstance(v, str):
        s = v[1:] if v[:1] == "-" else v
        if not s or not _digits(s):
            raise KicsDecodeError("%s: expected an %s, got %s" % (path, what, _show(v)))
        if len(s) > MAX_INT_DIGITS:
            raise KicsDecodeError("%s: %s of %d digits, at most %d" % (path, what, len(s),
                                                                     MAX_INT_DIGITS))
        try:
            return int(v)
        except (ValueError, OverflowError):
            return v  # beyond this port's ints: the exact decimal text
    if isinstance(v, float) and v == v and abs(v) <= 9007199254740992.0 and v == int(v):
        return int(v)
    raise KicsDecodeError("%s: expected an %s, got %s" % (path, what, _show(v)))


def _digits(s):
    # ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses
    return all("0" <= c <= "9" for c in s)


_SPECIAL_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def decode_field(name, obj, path=None, depth=1):
    """One field object -> Field (recursively for st/un, at most MAX_DEPTH levels deep)."""
    path = path or name
    if not isinstance(obj, dict):
        raise KicsDecodeError("%s: a field must be an object, got %s" % (path, _show(obj)))
    t = obj.get("t")
    if not isinstance(t, str) or t not in FIELD_TYPES:
        raise KicsDecodeError("%s: unknown field type 't'=%s" % (path, _show(t)))
    if "v" not in obj:
        raise KicsDecodeError("%s: field without 'v'" % path)
    v = obj["v"]
    if t == "u":
        v = _int(v, path, "unsigned integer")
        if (isinstance(v, int) and v < 0) or (isinstance(v, str) and v[:1] == "-"):
            raise KicsDecodeError("%s: negative value %s for type u (UINT64)" % (path, v))
    elif t == "i" or t == "t":
        v = _int(v, path)
    elif t == "b":
        if v is True or v is False:
            pass
        elif v == 0 or v == 1:
            v = v == 1
        else:
            raise KicsDecodeError("%s: expected a boolean, got %s" % (path, _show(v)))
    elif t == "d":
        if isinstance(v, str) and v in _SPECIAL_FLOATS:
            v = _SPECIAL_FLOATS[v]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                v = float(v)
            except OverflowError:  # an integer beyond any double
                raise KicsDecodeError("%s: number %s out of range" % (path, _show(v)))
        else:
            raise KicsDecodeError("%s: expected a number, got %s" % (path, _show(v)))
    elif t == "s":
        if not isinstance(v, str):
            raise KicsDecodeError("%s: expected a string, got %s" % (path, _show(v)))
    elif t == "e":
        n = obj.get("n")
        s = obj.get("s")
        if not isinstance(n, str) or not isinstance(s, str):
            raise KicsDecodeError("%s: an enum needs string 'n' (type name) and 's' (value name)"
                                  % path)
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                v = _int(v, path)
            except KicsDecodeError:
                pass  # a non-numeric original value stays as it came
        elif not isinstance(v, float):
            raise KicsDecodeError("%s: enum value 'v' must be a number or string, got %s"
                                  % (path, _show(v)))
        v = EnumValue(n, v, s)
    else:  # st, un
        if not isinstance(v, dict):
            raise KicsDecodeError("%s: a %s field needs an object of fields in 'v'" % (path, t))
        if v and depth >= MAX_DEPTH:  # checked before recursing
            raise KicsDecodeError("%s: fields nested deeper than %d levels" % (path, MAX_DEPTH))
        sub = {}
        for k, f in v.items():
            sub[k] = decode_field(k, f, "%s.%s" % (path, k), depth + 1)
        v = sub
    x = obj.get("x")
    m = obj.get("m")
    if m is not None and not isinstance(m, str):
        raise KicsDecodeError("%s: marker 'm' must be a string, got %s" % (path, _show(m)))
    return Field(name, t, v, bool(x), m, path)


def decode_tag_value(tag_value, tag_id=None, tag=None):
    """A `tagValue` (object, or JSON text of one) -> TagValue."""
    if isinstance(tag_value, (str, bytes, bytearray)):
        try:
            tag_value = signalr.loads(tag_value)
        except signalr.SignalRError as exc:
            raise KicsDecodeError("tagValue of tag %r is not JSON: %s" % (tag_id, exc))
    if not isinstance(tag_value, dict):
        raise KicsDecodeError("tagValue of tag %r must be an object" % (tag_id,))
    d = tag_value.get("d")
    if not isinstance(d, dict):
        raise KicsDecodeError("tagValue of tag %r: 'd' must be an object of fields" % (tag_id,))
    fields = {}
    for k, f in d.items():
        fields[k] = decode_field(k, f)
    ts = tag_value.get("ts")
    if ts is not None:
        ts = _int(ts, "ts")
    mp = tag_value.get("mp")
    if mp is not None and not isinstance(mp, str):
        mp = _int(mp, "mp")
    n = tag_value.get("n")
    dn = tag_value.get("dn")
    if n is not None and not isinstance(n, str):
        raise KicsDecodeError("tagValue of tag %r: 'n' must be a string" % (tag_id,))
    if dn is not None and dn not in ("r", "w", "rw"):
        raise KicsDecodeError("tagValue of tag %r: 'dn' must be r, w or rw, got %s"
                              % (tag_id, _show(dn)))
    return TagValue(tag_id, n, ts, dn, mp, fields, tag)


def _tag_id(v, what):
    if v is None:
        return None
    return _int(v, what)


def parse_item(item, tags_by_id=None):
    """A GetTagValuesStream item -> Confirmation or TagValue; KicsDecodeError otherwise."""
    if not isinstance(item, dict):
        raise KicsDecodeError("stream item must be an object, got %s" % _show(item))
    if "confirmation" in item:
        c = item["confirmation"]
        if not isinstance(c, dict) or not isinstance(c.get("result"), str):
            raise KicsDecodeError("confirmation without a string 'result'")
        ti = c.get("tagIdentifier")
        tag = None
        if ti is not None:
            if not isinstance(ti, dict):
                raise KicsDecodeError("confirmation: 'tagIdentifier' must be an object")
            tag = tag_key(ti)
            for part in tag:  # a tag is a dict key and compared: strings only
                if part is not None and not isinstance(part, str):
                    raise KicsDecodeError("confirmation: tagIdentifier names must be strings, "
                                          "got %s" % _show(part))
        return Confirmation(c["result"], tag, _tag_id(c.get("tagId"), "confirmation.tagId"))
    if "value" in item:
        v = item["value"]
        if not isinstance(v, dict) or "tagValue" not in v:
            raise KicsDecodeError("value item without 'tagValue'")
        tid = _tag_id(v.get("tagId"), "value.tagId")
        tag = tags_by_id.get(tid) if tags_by_id else None
        return decode_tag_value(v["tagValue"], tid, tag)
    keys = sorted(item)
    raise KicsDecodeError("stream item with neither 'confirmation' nor 'value': keys %s%s"
                          % (keys[:5], " ..." if len(keys) > 5 else ""))


# -- the subscription, sans-I/O ----------------------------------------------------------------


class Session:
    """SignalR connection plus the subscription, without I/O (times in ms).

    The driver calls connection_made(now) when the WebSocket is open, receive(data, now) with
    each message, tick(now) cyclically, sends data_to_send(now) as text messages, and
    connection_lost() when the socket closed. After each call it checks `close_requested`
    (close the socket) and `retry` (whether reconnecting makes sense; False after an error that a
    retry would repeat: `error` says which).

    Callbacks: on_value(TagValue), on_status(tag, result) per confirmation (result "ok",
    "notFound", or None when a reconnect makes it unknown again), on_error(exception) for every
    error, including items that could not be decoded (those are skipped, the stream goes on).
    """

    def __init__(self, tags, sampling_rate_hz=None, on_value=None, on_status=None, on_error=None,
                 keep_alive_interval=15000, server_timeout=30000, max_record_size=0x10000):
        self.hub = signalr.HubConnection(keep_alive_interval, server_timeout,
                                         max_record_size=max_record_size)
        self.on_value = on_value
        self.on_status = on_status
        self.on_error = on_error
        self.state = IDLE
        self.error = None
        self.close_requested = False
        self.retry = True
        self.invocation_id = None
        self.values = {}  # tag -> latest TagValue
        self.tag_ids = {}  # tag id -> tag
        self.tag_status = {}
        self._set_tags(tags, sampling_rate_hz)

    def _set_tags(self, tags, sampling_rate_hz):
        self.request = subscription_request(tags, sampling_rate_hz)
        self.tags = [(t["assetName"], t["tagName"]) for t in self.request["tagIdentifiers"]]
        self.sampling_rate_hz = sampling_rate_hz
        self.tag_status = dict((t, None) for t in self.tags)

    # -- driver side ---------------------------------------------------------------------------
    def connection_made(self, now):
        self.hub.start(now)
        self.state = HANDSHAKE
        self.close_requested = False
        self.invocation_id = None

    def connection_lost(self, error=None):
        if self.state in (FAILED, STOPPED):
            return
        self.hub.connection_lost(error)
        self._unconfirm()
        self.invocation_id = None
        self.state = WAITING if self.retry else FAILED

    def data_to_send(self, now):
        return self.hub.data_to_send(now)

    def stop(self):
        self.hub.stop()
        self.state = STOPPED
        self.retry = False

    def subscribe(self, tags, sampling_rate_hz=None):
        """Replace the subscription; re-issued at once when connected, else on connect."""
        self._set_tags(tags, sampling_rate_hz)
        self.values = {}
        self.tag_ids = {}
        if self.hub.state == signalr.CONNECTED:
            if self.invocation_id is not None:
                self.hub.cancel(self.invocation_id)
            self._invoke()

    def _invoke(self):
        self.invocation_id = self.hub.stream(METHOD, [self.request])
        self.state = SUBSCRIBING

    def _unconfirm(self):
        for t in self.tags:
            if self.tag_status.get(t) is not None:
                self.tag_status[t] = None
                if self.on_status:
                    self.on_status(t, None)

    def _fail(self, exc, retry):
        self.error = exc
        self.retry = retry
        self.close_requested = True
        if self.on_error:
            self.on_error(exc)

    def receive(self, data, now):
        for ev in self.hub.receive(data, now):
            self._event(ev)

    def tick(self, now):
        for ev in self.hub.tick(now):
            self._event(ev)

    def _event(self, ev):
        t = ev.type
        if t == signalr.HANDSHAKE:
            self._invoke()
        elif t == signalr.STREAM_ITEM:
            if ev.invocation_id == self.invocation_id:
                self._item(ev.item)
        elif t == signalr.COMPLETION:
            if ev.invocation_id != self.invocation_id:
                return
            self.invocation_id = None
            if ev.error is not None:
                exc = classify_error(ev.error)
                self._fail(exc, isinstance(exc, KicsSubscriptionLimitError))
            else:
                self._fail(KicsConnectionError("the server ended the subscription"), True)
        elif t == signalr.CLOSE:
            if ev.local:  # a timeout, or a record breaking the protocol: reconnect and
                text = ev.error or "connection closed"  # subscribe again
                retry = not text.startswith("handshake refused")
            else:
                text = "server closed the connection" + (": %s" % ev.error if ev.error else "")
                retry = ev.allow_reconnect
            self._fail(KicsConnectionError(text), retry)
        # invocations from the server (type 1) are not part of this API: ignored

    def _item(self, item):
        try:
            obj = parse_item(item, self.tag_ids)
        except KicsError as exc:
            self.error = exc
            if self.on_error:
                self.on_error(exc)
            return
        if isinstance(obj, Confirmation):
            tag = self._requested(obj.tag)
            if tag is None:
                return
            self.tag_status[tag] = obj.result
            if obj.tag_id is not None and obj.ok:
                self.tag_ids[obj.tag_id] = tag
            if self.state == SUBSCRIBING and None not in self.tag_status.values():
                self._subscribed()
            if self.on_status:
                self.on_status(tag, obj.result)
        else:
            if self.state == SUBSCRIBING:  # values flow: the subscription is up, whatever the
                self._subscribed()  # confirmations said
            self.values[obj.tag if obj.tag is not None else obj.tag_id] = obj
            if self.on_value:
                self.on_value(obj)

    def _subscribed(self):
        self.state = SUBSCRIBED
        self.error = None

    def _requested(self, tag):
        """The requested tag a confirmation names: as sent, else matched without regard to
        case (a server may answer with its own spelling); None when it names none of ours."""
        if tag is None or tag in self.tag_status:
            return tag
        a, t = tag
        a = str(a).lower()
        t = str(t).lower()
        for k in self.tags:
            if k[0].lower() == a and k[1].lower() == t:
                return k
        return None


# -- the client over microcot.ws -----------------------------------------------------------------

from microcot.hal import ticks_diff, ticks_ms  # noqa: E402 - the client part only

# WebSocket states after which a retry would fail the same way (TLS settings, unsupported)
_WS_PERMANENT = (10, 17, 18, 19, 20, 21, 22, 24, 26, 27, 28, 29, 30)
_WS_REJECT = 1009  # WS_STATUS_CONNECT_RES_REJECT: an HTTP 4xx/5xx answer to the upgrade


class TagValueClient:
    """Tag-value subscription over microcot.ws, cyclic like the WebSocket client.

        c = TagValueClient("kics-server", token, [("Asset 079", "Asdu_1_object_1001")], 1,
                           port=8080, tls={"ca": "/kics-ca.der"}, on_value=print)
        c.connect()
        while True:
            c.execute(50)     # connect, handshake, subscribe, receive, ping, reconnect

    server, port   the KICS server (port: 443 with TLS, 80 without, when None)
    token          the REST API's authentication token, sent as `Authorization: Bearer <token>`
    tags           [(assetName, tagName), ...]; sampling_rate_hz: None (every value) or > 0
    tls            passed to microcot.ws: True, False/None (ws://), a dict such as {"ca": path}
    on_value(TagValue), on_status(tag, result), on_error(exception): callbacks (see Session)
    reconnect_interval, reconnect_max: seconds; the pause doubles after each failed attempt
    ws_options     further microcot.ws.WebSocketClient arguments (per_message_deflate, limits...)

    Outputs: state (IDLE CONNECTING HANDSHAKE SUBSCRIBING SUBSCRIBED WAITING FAILED STOPPED),
    state_name, error (the last exception: KicsAuthError, KicsSubscriptionLimitError,
    KicsSubscriptionError, KicsConnectionError, KicsDecodeError), tag_status, values, ws.
    After a lost connection the client reconnects and subscribes again by itself; it stops
    (FAILED) only on errors a retry would repeat: 401, the server refusing the argument, the
    handshake refused, TLS settings the port cannot use.
    """

    def __init__(self, server, token, tags, sampling_rate_hz=None, port=None, tls=True,
                 on_value=None, on_status=None, on_error=None, path=PATH,
                 keep_alive_interval=15, server_timeout=30, reconnect_interval=1,
                 reconnect_max=30, max_record_size=0x10000, ws_options=None):
        if not token:
            raise KicsArgumentError("a token is required (the server answers 401 without one)")
        self.session = Session(tags, sampling_rate_hz, on_value, on_status, None,
                               keep_alive_interval * 1000, server_timeout * 1000, max_record_size)
        self.session.on_error = self._on_error
        self.on_error = on_error
        self.server = server
        tls = None if tls is False else tls  # anything but None/False: TLS ({} the defaults)
        self.port = port or (80 if tls is None else 443)
        self.tls = tls
        self.path = path
        self._token = token
        self.ws_options = ws_options or {}
        self.reconnect_interval = reconnect_interval
        self.reconnect_max = reconnect_max
        self.ws = None
        self.attempts = 0  # connection attempts so far
        self._delay = reconnect_interval
        self._retry_at = 0
        self._t = ticks_ms()
        self._now = 0

    # outputs ----------------------------------------------------------------------------------
    @property
    def state(self):
        return self.session.state

    @property
    def state_name(self):
        return STATE_NAMES[self.session.state]

    @property
    def error(self):
        return self.session.error

    @property
    def tag_status(self):
        return self.session.tag_status

    @property
    def values(self):
        return self.session.values

    @property
    def subscribed(self):
        return self.session.state == SUBSCRIBED

    def __repr__(self):
        return "<TagValueClient %s:%d %s>" % (self.server, self.port, self.state_name)

    # inputs -----------------------------------------------------------------------------------
    def subscribe(self, tags, sampling_rate_hz=None):
        """Replace the subscription (sent at once when subscribed, else on the next connect)."""
        self.session.subscribe(tags, sampling_rate_hz)

    def connect(self):
        """Start connecting; execute() carries it on. Also restarts a FAILED or STOPPED client."""
        self.session.retry = True
        self.session.error = None
        self._delay = self.reconnect_interval
        self._open(self._clock())

    def close(self):
        """Stop: close the connection, no reconnect. execute() finishes the close handshake."""
        self.session.stop()
        if self.ws is not None:
            self.ws.disconnect()

    # the cycle --------------------------------------------------------------------------------
    def _clock(self):
        t = ticks_ms()
        self._now += ticks_diff(t, self._t)
        self._t = t
        return self._now

    def _on_error(self, exc):
        if self.on_error:
            self.on_error(exc)

    def _make_ws(self):
        from microcot.ws import WebSocketClient

        opts = dict(self.ws_options)
        hdrs = dict(opts.pop("headers", None) or {})
        hdrs["Authorization"] = "Bearer " + self._token
        ws = WebSocketClient(self.server, self.port, self.path, tls=self.tls, headers=hdrs, **opts)
        ws.on_message = self._ws_message
        return ws

    def _ws_message(self, content, content_type):
        self.session.receive(content, self._clock())

    def _open(self, now):
        self.attempts += 1
        ses = self.session
        ses.state = CONNECTING
        ses.close_requested = False
        if self.ws is None:
            self.ws = self._make_ws()
            ok = self.ws.connect()
        else:
            ok = self.ws.connect(True)  # a fresh connection, whatever the old one was doing
        if not ok:
            self._ws_failed(now)

    def _ws_failed(self, now):
        ws = self.ws
        if ws.state == _WS_REJECT and ws.http_status == 401:
            exc = KicsAuthError("the server refused the token: HTTP 401 on %s" % self.path)
            retry = False
        else:
            exc = KicsConnectionError("WebSocket: %s (state %d)" % (ws.error_msg or "failed", ws.state))
            retry = ws.state not in _WS_PERMANENT
        ses = self.session
        ses.error = exc
        ses.retry = retry
        self._on_error(exc)
        self._wait(now)

    def _wait(self, now):
        ses = self.session
        ses.connection_lost()  # WAITING, or FAILED when ses.retry is False
        ses.close_requested = False
        if ses.state == WAITING:
            self._retry_at = now + int(self._delay * 1000)
            self._delay = min(self._delay * 2, self.reconnect_max)

    def execute(self, wait_ms=0):
        """One cycle; waits up to wait_ms for data when there is nothing to do."""
        ses = self.session
        ws = self.ws
        if ws is not None:
            ws.execute(wait_ms if ses.state in (CONNECTING, HANDSHAKE, SUBSCRIBING, SUBSCRIBED)
                       else 0)
        now = self._clock()
        st = ses.state
        if st == WAITING:
            if now - self._retry_at >= 0:
                self._open(now)
            elif wait_ms:
                _sleep_ms(min(wait_ms, self._retry_at - now))
            return
        if st in (IDLE, FAILED, STOPPED):
            if wait_ms:
                _sleep_ms(wait_ms)
            return
        if st == CONNECTING:
            if ws.connected:
                ses.connection_made(now)
            elif ws.error or ws.state == 4:  # WS_STATUS_SOCK_NO_CONN: gone without an error
                self._ws_failed(now)
                return
            else:
                return
        elif ses.close_requested:  # SignalR said goodbye, or the subscription was refused
            if ws.connected:
                ws.disconnect()
            self._wait(now)
            return
        elif not ws.connected:  # the WebSocket closed or broke under us
            exc = KicsConnectionError(ws.error_msg or "the server closed the WebSocket (code %d)"
                                      % ws.close_reason)
            ses.error = exc
            self._on_error(exc)
            self._wait(now)
            return
        ses.tick(now)
        if ses.state == SUBSCRIBED:
            self._delay = self.reconnect_interval
        out = ses.data_to_send(now)
        if out and not ws.send_message(out, True):
            return  # the send failed: the next cycle sees the connection gone
        if ses.close_requested:
            ws.disconnect()
            self._wait(now)


def _sleep_ms(ms):
    if ms > 0:
        try:
            from time import sleep_ms
        except ImportError:
            from time import sleep

            sleep(ms / 1000)
            return
        sleep_ms(ms)
