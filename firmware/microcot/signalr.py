"""SignalR JSON hub protocol, sans-I/O (no sockets, no clocks: the caller passes `now` in ms).

Wire format (ASP.NET Core SignalR, protocol "json" version 1): every message is one JSON object
followed by the record separator 0x1E. A WebSocket message may carry several records, and a record
may arrive split over several messages: `Records` reassembles them in a bounded buffer (JSON text
never holds a raw 0x1E, so splitting on it is exact).

    handshake   client: {"protocol":"json","version":1}   server: {} or {"error":"..."}
    1 invocation         invocationId?, target, arguments, streamIds?
    2 stream item        invocationId, item
    3 completion         invocationId, result? | error?
    4 stream invocation  invocationId, target, arguments, streamIds?
    5 cancel invocation  invocationId
    6 ping
    7 close              error?, allowReconnect?

Other message types (8 ack, 9 sequence of stateful reconnect, future ones) are parsed as a bare
`Message` and ignored by `HubConnection`, as the protocol asks of clients that do not know them.

`parse(record)` turns one record into a `Message` or raises `SignalRError` saying what is wrong.
The builders (`invocation`, `stream_invocation`, ...) return the bytes of one record, separator
included; the server-side ones (`handshake_response`, `stream_item`, `completion`, `close`) serve
emulators and tests.

Errors (ERRORS): the decoders (`Records.feed`, `loads`, `parse`, `parse_handshake_response`)
raise only SignalRError (HandshakeError is one) for any input, and HubConnection.receive turns
those into a local CLOSE event, never an exception. Limits, checked before the work they bound:
a record over `max_size` bytes is refused before it is stored; JSON nested deeper than
MAX_DEPTH (32) levels is refused from a scan of the bytes before it is parsed, the error naming
the path to the offending level ("$.arguments[0].a"); integers are exact at any size the runtime
parses (CPython refuses over 4300 digits: such a number is then kept as its decimal text, as on
ports whose ints stop at 64 bits). A record that parses to more objects than the heap holds ends
the connection as a local CLOSE (allow_reconnect) instead of a MemoryError out of receive().

`HubConnection` is the client's state machine: `start(now)`, then feed what the transport received
to `receive(data, now)` (returns events: `Message`s, plus the synthetic HANDSHAKE message when the
server accepted the handshake and a CLOSE message with `local=True` when the connection failed
here), call `tick(now)` cyclically (pings after `keep_alive_interval` ms without sending, close
after `server_timeout` ms without hearing from the server), and send what `data_to_send(now)`
returns as text WebSocket messages.
"""

import json

RS = b"\x1e"
MAX_DEPTH = 32  # deepest JSON nesting accepted in a record (arrays and objects)

HANDSHAKE = 0  # synthetic: the server accepted the handshake
INVOCATION = 1
STREAM_ITEM = 2
COMPLETION = 3
STREAM_INVOCATION = 4
CANCEL_INVOCATION = 5
PING = 6
CLOSE = 7

# HubConnection.state
DISCONNECTED = 0
HANDSHAKING = 1
CONNECTED = 2
CLOSED = 3

SERVER_TIMEOUT_TEXT = "Server timeout elapsed without receiving a message from the server."
_NO_RESULT = object()


class SignalRError(ValueError):
    """A record that is not valid SignalR JSON, or a record over the size limit."""


class HandshakeError(SignalRError):
    """The server refused the handshake; the text is the server's `error`."""


ERRORS = (SignalRError,)

try:
    _RecursionError = RecursionError
except NameError:  # MicroPython raises RuntimeError for a too deep recursion
    _RecursionError = RuntimeError


class Message:
    """One hub message. Fields that the message type does not carry stay None/False."""

    def __init__(self, type, invocation_id=None, target=None, arguments=None, stream_ids=None,
                 item=None, result=None, has_result=False, error=None, allow_reconnect=False,
                 local=False):
        self.type = type
        self.invocation_id = invocation_id
        self.target = target
        self.arguments = arguments
        self.stream_ids = stream_ids
        self.item = item
        self.result = result
        self.has_result = has_result
        self.error = error
        self.allow_reconnect = allow_reconnect
        self.local = local  # a CLOSE raised here (timeout, bad record), not sent by the server

    def __repr__(self):
        return "Message(%d, id=%r, target=%r, error=%r)" % (
            self.type, self.invocation_id, self.target, self.error)


# -- encoding ---------------------------------------------------------------------------------


def record(obj):
    """One record: obj as compact JSON, UTF-8, then 0x1E."""
    return json.dumps(obj, separators=(",", ":")).encode() + RS


def handshake_request(protocol="json", version=1):
    return record({"protocol": protocol, "version": version})


def handshake_response(error=None):
    return record({"error": error} if error else {})


def invocation(target, arguments, invocation_id=None, stream_ids=None):
    m = {"type": INVOCATION, "target": target, "arguments": list(arguments)}
    if invocation_id is not None:
        m["invocationId"] = invocation_id
    if stream_ids:
        m["streamIds"] = list(stream_ids)
    return record(m)


def stream_invocation(invocation_id, target, arguments, stream_ids=None):
    m = {"type": STREAM_INVOCATION, "invocationId": invocation_id, "target": target,
         "arguments": list(arguments)}
    if stream_ids:
        m["streamIds"] = list(stream_ids)
    return record(m)


def stream_item(invocation_id, item):
    return record({"type": STREAM_ITEM, "invocationId": invocation_id, "item": item})


def completion(invocation_id, result=_NO_RESULT, error=None):
    m = {"type": COMPLETION, "invocationId": invocation_id}
    if error is not None:
        m["error"] = error
    elif result is not _NO_RESULT:
        m["result"] = result
    return record(m)


def cancel_invocation(invocation_id):
    return record({"type": CANCEL_INVOCATION, "invocationId": invocation_id})


def ping():
    return b'{"type":6}' + RS


def close(error=None, allow_reconnect=False):
    m = {"type": CLOSE}
    if error is not None:
        m["error"] = error
    if allow_reconnect:
        m["allowReconnect"] = True
    return record(m)


# -- decoding ---------------------------------------------------------------------------------


class Records:
    """Splits a byte stream into records; keeps at most `max_size` bytes of an unfinished one."""

    def __init__(self, max_size=0x10000):
        self.max_size = max_size
        self._buf = bytearray()

    def reset(self):
        self._buf = bytearray()

    def pending(self):
        """Bytes of an unfinished record held back."""
        return len(self._buf)

    def feed(self, data):
        """Return the complete records (bytes, separator removed, empty ones skipped) in data.

        `data` may be a memoryview of the transport's message buffer: it is searched in place
        and only each record is copied out, so the message is not held twice."""
        if isinstance(data, str):
            data = data.encode()
        find = getattr(data, "find", None)
        if find is None:  # a memoryview: searched through bounded slices, see _find
            data = memoryview(data)
        out = []
        start = 0
        n = len(data)
        while start < n:
            end = find(RS, start) if find is not None else _find(data, start, n)
            if end < 0:
                if len(self._buf) + n - start > self.max_size:
                    self._buf = bytearray()
                    raise SignalRError("record longer than %d bytes" % self.max_size)
                self._buf.extend(data[start:] if start else data)
                break
            if self._buf:
                if len(self._buf) + end - start > self.max_size:
                    self._buf = bytearray()
                    raise SignalRError("record longer than %d bytes" % self.max_size)
                self._buf.extend(data[start:end])
                rec = bytes(self._buf)
                self._buf = bytearray()
            else:
                if end - start > self.max_size:
                    raise SignalRError("record longer than %d bytes" % self.max_size)
                rec = bytes(data[start:end])
            if rec:
                out.append(rec)
            start = end + 1
        return out


def _find(mv, start, end):
    """Index of RS in the memoryview mv[start:end], or -1 (memoryviews have no find)."""
    while start < end:
        e = start + 512 if end - start > 512 else end
        j = bytes(mv[start:e]).find(RS)
        if j >= 0:
            return start + j
        start = e
    return -1


def _too_deep(raw, limit):
    """Offset of the first '[' or '{' nested deeper than `limit` in JSON bytes, or -1.

    Strings are skipped with find (brackets inside them do not count), and a stretch between
    strings is walked byte by byte only when its opening brackets could pass the limit."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return -1
    d = 0
    i = 0
    n = len(raw)
    while i < n:
        q = raw.find(b'"', i)
        if q < 0:
            q = n
        seg = raw[i:q]
        opens = seg.count(b"[") + seg.count(b"{")
        if d + opens <= limit:
            d += opens - seg.count(b"]") - seg.count(b"}")
        else:
            for j in range(i, q):
                c = raw[j]
                if c == 0x5B or c == 0x7B:  # [ {
                    d += 1
                    if d > limit:
                        return j
                elif c == 0x5D or c == 0x7D:  # ] }
                    d -= 1
        i = _str_end(raw, q)
    return -1


def _str_end(raw, q):
    """Index after the string that opens at raw[q] (the end of raw when it is not closed)."""
    n = len(raw)
    i = q + 1
    while i < n:
        j = raw.find(b'"', i)
        if j < 0:
            return n
        k = j
        while k > q + 1 and raw[k - 1] == 0x5C:  # a quote after an odd run of \ is escaped
            k -= 1
        if (j - k) % 2 == 0:
            return j + 1
        i = j + 1
    return n


def json_path(raw, at):
    """The path ("$.a[2].b") of the container that opens at raw[at], for error messages."""
    stack = []  # [is_object, key or index]
    i = 0
    key = None
    while i < at:
        c = raw[i]
        if c == 0x22:  # a string: in an object where a key is due it is the key
            e = _str_end(raw, i)
            if stack and stack[-1][0] and stack[-1][1] is None:
                key = bytes(raw[i + 1:e - 1]).decode("utf-8", "replace") if e - 1 > i else ""
                stack[-1][1] = key
            i = e
            continue
        if c == 0x5B or c == 0x7B:
            stack.append([c == 0x7B, None if c == 0x7B else 0])
        elif c == 0x5D or c == 0x7D:
            if stack:
                stack.pop()
        elif c == 0x2C and stack:  # ,
            if stack[-1][0]:
                stack[-1][1] = None
            else:
                stack[-1][1] += 1
        i += 1
    out = ["$"]
    for is_obj, k in stack:
        out.append(".%s" % k if is_obj else "[%d]" % k)
    p = "".join(out)
    return p if len(p) <= 200 else p[:200] + "..."


def quote_big_ints(text):
    """text with every integer literal of 19 digits or more turned into a JSON string.

    The fallback for ports whose integers stop at 64 bits (MICROPY_LONGINT_IMPL_LONGLONG), where
    json.loads fails on 18446744073709551615: quoted, such a number survives as its exact decimal
    text. Numbers inside strings, and floats (with '.', 'e' or 'E'), are left alone."""
    out = []
    i = last = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif c == "-" or "0" <= c <= "9":
            j = i + 1
            while j < n and text[j] in "0123456789.eE+-":
                j += 1
            tok = text[i:j]
            if len(tok) - (c == "-") >= 19 and "." not in tok and "e" not in tok and "E" not in tok:
                out.append(text[last:i])
                out.append('"%s"' % tok)
                last = j
            i = j
        else:
            i += 1
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


def loads(rec):
    """JSON of one record, integers exact; SignalRError when it is not JSON, not UTF-8, or
    nested deeper than MAX_DEPTH (checked on the bytes before parsing).

    Integers of any size are exact where the port has arbitrary-precision ints (CPython up to
    its digit limit, and the MicroPython ports built with mpz: unix, esp32, rp2). Elsewhere
    json.loads fails on a number beyond 64 bits, and the record is parsed again with such
    numbers kept as decimal strings (`quote_big_ints`)."""
    if isinstance(rec, str):
        text = rec
        raw = rec.encode()
    else:
        raw = rec if isinstance(rec, bytes) else bytes(rec)
        try:
            text = raw.decode()
        except UnicodeError:
            raise SignalRError("record is not UTF-8")
    at = _too_deep(raw, MAX_DEPTH)
    if at >= 0:
        raise SignalRError("JSON nested deeper than %d levels at byte %d (%s)"
                           % (MAX_DEPTH, at, json_path(raw, at)))
    raw = None
    try:
        return json.loads(text)
    except (ValueError, OverflowError) as exc:
        err = exc
    except _RecursionError as exc:  # not expected within MAX_DEPTH; kept for safety
        raise SignalRError("record is not JSON: %r" % (exc,))
    try:
        quoted = quote_big_ints(text)
        if quoted is not text:
            return json.loads(quoted)
    except (ValueError, OverflowError):
        pass
    raise SignalRError("record is not JSON: %s" % (err,))


def _obj(rec):
    obj = rec if isinstance(rec, dict) else loads(rec)
    if not isinstance(obj, dict):
        raise SignalRError("record is not a JSON object")
    return obj


def parse_handshake_request(rec):
    """(protocol, version) of a client's handshake request."""
    obj = _obj(rec)
    p = obj.get("protocol")
    v = obj.get("version")
    if not isinstance(p, str) or not isinstance(v, int) or isinstance(v, bool):
        raise SignalRError("handshake request needs a string 'protocol' and an integer 'version'")
    return p, v


def parse_handshake_response(rec):
    """None when the server accepted; HandshakeError with the server's text when it refused."""
    obj = _obj(rec)
    err = obj.get("error")
    if err:
        raise HandshakeError(str(err))
    if "type" in obj:
        raise SignalRError("expected the handshake response, got a message of type %r" % (obj["type"],))


def _str(obj, key, t, required=True):
    v = obj.get(key)
    if v is None:
        if required:
            raise SignalRError("message type %d without '%s'" % (t, key))
        return None
    if not isinstance(v, str):
        raise SignalRError("message type %d: '%s' is not a string" % (t, key))
    return v


def _list(obj, key, t, required=True):
    v = obj.get(key)
    if v is None:
        if required:
            raise SignalRError("message type %d without '%s'" % (t, key))
        return None
    if not isinstance(v, list):
        raise SignalRError("message type %d: '%s' is not an array" % (t, key))
    return v


def parse(rec):
    """One record (bytes, str or an already decoded dict) as a Message."""
    obj = _obj(rec)
    t = obj.get("type")
    if not isinstance(t, int) or isinstance(t, bool):
        raise SignalRError("message without an integer 'type'")
    if t in (INVOCATION, STREAM_INVOCATION):
        m = Message(t, _str(obj, "invocationId", t, t == STREAM_INVOCATION), _str(obj, "target", t),
                    _list(obj, "arguments", t), _list(obj, "streamIds", t, False))
    elif t == STREAM_ITEM:
        if "item" not in obj:
            raise SignalRError("message type 2 without 'item'")
        m = Message(t, _str(obj, "invocationId", t), item=obj["item"])
    elif t == COMPLETION:
        m = Message(t, _str(obj, "invocationId", t), error=_str(obj, "error", t, False))
        if "result" in obj:
            if m.error is not None:
                raise SignalRError("completion with both 'result' and 'error'")
            m.result = obj["result"]
            m.has_result = True
    elif t == CANCEL_INVOCATION:
        m = Message(t, _str(obj, "invocationId", t))
    elif t == CLOSE:
        ar = obj.get("allowReconnect", False)
        if not isinstance(ar, bool):
            raise SignalRError("message type 7: 'allowReconnect' is not a boolean")
        m = Message(t, error=_str(obj, "error", t, False), allow_reconnect=ar)
    else:
        m = Message(t)  # PING, and types this client does not know
    return m


# -- client state machine ---------------------------------------------------------------------


class HubConnection:
    """A SignalR client connection without I/O; times are milliseconds from any monotonic clock."""

    def __init__(self, keep_alive_interval=15000, server_timeout=30000, handshake_timeout=15000,
                 max_record_size=0x10000, protocol="json", version=1):
        self.keep_alive_interval = keep_alive_interval
        self.server_timeout = server_timeout
        self.handshake_timeout = handshake_timeout
        self.protocol = protocol
        self.version = version
        self.records = Records(max_record_size)
        self.state = DISCONNECTED
        self.error = None  # text of the error that closed the connection
        self.allow_reconnect = False
        self.streams = {}  # open stream invocations: invocation id -> target
        self._out = bytearray()
        self._next_id = 0
        self._last_recv = self._last_send = self._started = 0

    def start(self, now):
        """Begin a (new) connection over a freshly opened transport: queues the handshake."""
        self.records.reset()
        self.streams = {}
        self._out = bytearray(handshake_request(self.protocol, self.version))
        self.state = HANDSHAKING
        self.error = None
        self.allow_reconnect = False
        self._last_recv = self._last_send = self._started = now

    def _send(self, rec):
        if self.state != CONNECTED:
            raise SignalRError("not connected (state %d)" % self.state)
        self._out.extend(rec)

    def next_id(self):
        i = str(self._next_id)
        self._next_id += 1
        return i

    def invoke(self, target, arguments, expect_result=True):
        """Queue an invocation; returns its invocation id (None for a fire-and-forget send)."""
        iid = self.next_id() if expect_result else None
        self._send(invocation(target, arguments, iid))
        return iid

    def stream(self, target, arguments):
        """Queue a stream invocation; returns its invocation id."""
        iid = self.next_id()
        self._send(stream_invocation(iid, target, arguments))
        self.streams[iid] = target
        return iid

    def cancel(self, invocation_id):
        self.streams.pop(invocation_id, None)
        self._send(cancel_invocation(invocation_id))

    def data_to_send(self, now):
        """Bytes to send now (b"" when nothing), as one text WebSocket message."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out = bytearray()
        self._last_send = now
        return out

    def _closed(self, error, allow_reconnect, local):
        self.state = CLOSED
        self.error = error
        self.allow_reconnect = allow_reconnect
        self.streams = {}
        self._out = bytearray()
        return Message(CLOSE, error=error, allow_reconnect=allow_reconnect, local=local)

    def connection_lost(self, error=None):
        """The transport closed; returns the CLOSE event (None if already closed)."""
        if self.state in (CLOSED, DISCONNECTED):
            self.state = DISCONNECTED
            return None
        ev = self._closed(error or "connection lost", True, True)
        self.state = DISCONNECTED
        return ev

    def receive(self, data, now):
        """Feed bytes from the transport; returns the events they complete."""
        if self.state not in (HANDSHAKING, CONNECTED):
            return []
        self._last_recv = now
        events = []
        try:
            recs = self.records.feed(data)
        except SignalRError as exc:
            return [self._closed(str(exc), False, True)]
        except MemoryError:  # a record this heap cannot hold: a retry may find more room
            self.records.reset()
            return [self._closed("a record does not fit in memory", True, True)]
        for rec in recs:
            try:
                if self.state == HANDSHAKING:
                    parse_handshake_response(rec)
                    self.state = CONNECTED
                    events.append(Message(HANDSHAKE))
                    continue
                m = parse(rec)
            except HandshakeError as exc:
                events.append(self._closed("handshake refused: %s" % exc, False, True))
                break
            except SignalRError as exc:
                events.append(self._closed(str(exc), False, True))
                break
            except MemoryError:  # parsed, it does not fit: a retry may find more room
                rec = None
                events.append(self._closed("a record does not fit in memory", True, True))
                break
            if m.type == CLOSE:
                events.append(self._closed(m.error, m.allow_reconnect, False))
                break
            if m.type == COMPLETION:
                self.streams.pop(m.invocation_id, None)
            elif m.type > CLOSE or m.type < INVOCATION:
                continue  # unknown to this client: ignored
            if m.type != PING:
                events.append(m)
        return events

    def tick(self, now):
        """Timers: returns the CLOSE event of a timeout, or []; may queue a ping."""
        if self.state == HANDSHAKING:
            if now - self._started >= self.handshake_timeout:
                return [self._closed("handshake timed out", True, True)]
        elif self.state == CONNECTED:
            if self.server_timeout and now - self._last_recv >= self.server_timeout:
                return [self._closed(SERVER_TIMEOUT_TEXT, True, True)]
            if self.keep_alive_interval and now - self._last_send >= self.keep_alive_interval \
                    and not self._out:
                self._out.extend(ping())
        return []

    def stop(self):
        """Close from this side (the transport is closed by the caller)."""
        if self.state in (HANDSHAKING, CONNECTED):
            self._closed(None, False, True)
        self.state = DISCONNECTED
