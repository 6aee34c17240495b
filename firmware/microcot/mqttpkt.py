# MQTT 3.1.1 packets without I/O (DESIGN.md principle 1): encoders that build one packet into one
# bytearray, decoders over a packet body, and `Reader`, an incremental reader that tells the driver
# which memoryview to `readinto` next so a packet is read without copies and resumes across polls.
# The exception classes of the MQTT client live here too, so both modules share one hierarchy.
#
# Reader refuses a packet larger than its limit as soon as the remaining length is known, before
# anything is allocated for it, and a remaining length longer than 4 bytes as a protocol error.
# Within the limit, a body is not allocated at the size its header declares either: it grows by
# at most `chunk` bytes beyond what has arrived, so four bytes claiming 16 KiB cost a chunk, not
# 16 KiB (a small board's heap is the budget; the sender has to send what it declared).
#
# Errors (ERRORS): the decoders (Reader.got, parse_connack, parse_pid, parse_suback,
# parse_publish) raise MQTTProtocolError (MQTTPacketTooLarge is one) and nothing else, for any
# bytes; a driver treats it as a broken stream: close the connection, connect again. The encoders
# raise ValueError for arguments out of range (a caller's bug, not the broker's).

# first byte of each packet type, with the flags the protocol fixes
CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62
PUBCOMP = 0x70
SUBSCRIBE = 0x82
SUBACK = 0x90
UNSUBSCRIBE = 0xA2
UNSUBACK = 0xB0
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

MAX_RL = 268435455  # the largest remaining length 4 bytes can carry
CHUNK = 2048  # bytes a packet body grows by, at most, beyond what has arrived (Reader)
SUBACK_FAILURE = 0x80

CONNACK_TEXT = (
    "accepted",
    "unacceptable protocol version",
    "identifier rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)


class MQTTException(Exception):
    """Base of every error of the MQTT client and of this module."""


class MQTTProtocolError(MQTTException):
    """The broker sent something MQTT 3.1.1 does not allow (malformed or unexpected packet)."""


class MQTTPacketTooLarge(MQTTProtocolError):
    def __init__(self, size, limit, what="incoming packet"):
        super().__init__("%s of %d bytes exceeds the limit of %d bytes" % (what, size, limit))
        self.size = size
        self.limit = limit


ERRORS = (MQTTProtocolError,)


class MQTTConnectError(MQTTException):
    """CONNACK refused the connection: .code is the return code (1..5, or other from a bad broker)."""

    def __init__(self, code):
        text = CONNACK_TEXT[code] if 0 < code < len(CONNACK_TEXT) else "unknown return code"
        super().__init__("connection refused by the broker: CONNACK %d (%s)" % (code, text))
        self.code = code


class MQTTSubscribeError(MQTTException):
    def __init__(self, topic, code):
        super().__init__("subscription to %r refused by the broker (SUBACK 0x%02x)" % (topic, code))
        self.topic = topic
        self.code = code


class MQTTConnectionError(MQTTException):
    """The link failed or is not there: closed, reset, TLS failure, not connected."""


class MQTTTLSError(MQTTConnectionError):
    """The TLS handshake failed (certificate not trusted, wrong host name, ...)."""


class MQTTMemoryError(MemoryError):
    """The TLS handshake ran out of memory; the message names the handshake, the free heap and
    what mbedTLS could not allocate. A MemoryError like any other failed allocation, not an
    MQTTException (MicroPython allows no class with both as bases): the cure is memory, not
    another CA. The connection is closed."""


class MQTTTimeout(MQTTConnectionError):
    """Something did not happen in time: connect, an answer, a send, the rest of a packet, or a
    PINGRESP (dead link). The connection is closed when this is raised from I/O."""


def _b(s):
    return s.encode() if isinstance(s, str) else s


def rl_size(n):
    """Bytes needed to encode the remaining length n."""
    if n < 0 or n > MAX_RL:
        raise ValueError("remaining length %d out of range 0..%d" % (n, MAX_RL))
    k = 1
    while n > 127:
        n >>= 7
        k += 1
    return k


def put_rl(buf, off, n):
    """Write remaining length n at buf[off]; return the offset after it."""
    rl_size(n)
    while True:
        b = n & 0x7F
        n >>= 7
        buf[off] = b | 0x80 if n else b
        off += 1
        if not n:
            return off


def _new(first, n):
    # one bytearray for the whole packet: fixed header + n bytes; returns (buf, offset of body)
    buf = bytearray(1 + rl_size(n) + n)
    buf[0] = first
    return buf, put_rl(buf, 1, n)


def _put_str(buf, off, s):
    n = len(s)
    buf[off] = n >> 8
    buf[off + 1] = n & 0xFF
    buf[off + 2:off + 2 + n] = s
    return off + 2 + n


def _check_str(s, what):
    if len(s) > 65535:
        raise ValueError("%s longer than 65535 bytes" % what)
    return s


def connect(client_id, user=None, password=None, keepalive=0, clean=True, will=None):
    """CONNECT; will: None or (topic, message, qos, retain), the last will."""
    cid = _check_str(_b(client_id), "client id")
    if not 0 <= keepalive <= 65535:
        raise ValueError("keepalive %r out of range 0..65535 s" % (keepalive,))
    if password is not None and user is None:
        raise ValueError("MQTT 3.1.1 has no password without a user name")
    flags = 0x02 if clean else 0
    n = 12 + len(cid)
    if will is not None:
        wt = _topic(will[0], False)
        wm = _check_str(_b(will[1]), "will message")
        if will[2] not in (0, 1, 2):
            raise ValueError("will qos %r: expected 0, 1 or 2" % (will[2],))
        flags |= 0x04 | will[2] << 3 | (0x20 if will[3] else 0)
        n += 4 + len(wt) + len(wm)
    if user is not None:
        user = _check_str(_b(user), "user name")
        flags |= 0x80
        n += 2 + len(user)
    if password is not None:
        password = _check_str(_b(password), "password")
        flags |= 0x40
        n += 2 + len(password)
    buf, o = _new(CONNECT, n)
    buf[o:o + 7] = b"\x00\x04MQTT\x04"
    buf[o + 7] = flags
    buf[o + 8] = keepalive >> 8
    buf[o + 9] = keepalive & 0xFF
    o = _put_str(buf, o + 10, cid)
    if will is not None:
        o = _put_str(buf, _put_str(buf, o, wt), wm)
    if user is not None:
        o = _put_str(buf, o, user)
    if password is not None:
        _put_str(buf, o, password)
    return buf


def _topic(topic, wild):
    t = _check_str(_b(topic), "topic")
    if not t:
        raise ValueError("empty topic")
    if not wild and (b"+" in t or b"#" in t):
        raise ValueError("wildcard in a publish topic %r" % (topic,))
    return t


def _check_pid(pid):
    if not 0 < pid <= 65535:
        raise ValueError("packet id %r out of range 1..65535" % (pid,))


def publish(topic, msg, qos=0, retain=False, dup=False, pid=0):
    m = _b(msg)
    buf = publish_head(topic, len(m), qos, retain, dup, pid)
    buf.extend(m)
    return buf


def publish_head(topic, size, qos=0, retain=False, dup=False, pid=0):
    """A PUBLISH packet up to its payload (fixed header, topic, packet id) for a payload of
    `size` bytes sent after it: a large payload goes out as it is, never copied into a packet."""
    t = _topic(topic, False)
    if qos not in (0, 1, 2):
        raise ValueError("qos %r: expected 0, 1 or 2" % (qos,))
    if qos:
        _check_pid(pid)
    head = 2 + len(t) + (2 if qos else 0)
    n = head + size  # the remaining length counts the payload
    buf = bytearray(1 + rl_size(n) + head)
    buf[0] = PUBLISH | (0x08 if dup else 0) | qos << 1 | (1 if retain else 0)
    o = _put_str(buf, put_rl(buf, 1, n), t)
    if qos:
        buf[o] = pid >> 8
        buf[o + 1] = pid & 0xFF
    return buf


def subscribe(pid, topic, qos=0):
    t = _topic(topic, True)
    _check_pid(pid)
    if qos not in (0, 1, 2):
        raise ValueError("qos %r: expected 0, 1 or 2" % (qos,))
    buf, o = _new(SUBSCRIBE, 5 + len(t))
    buf[o] = pid >> 8
    buf[o + 1] = pid & 0xFF
    o = _put_str(buf, o + 2, t)
    buf[o] = qos
    return buf


def unsubscribe(pid, topic):
    t = _topic(topic, True)
    _check_pid(pid)
    buf, o = _new(UNSUBSCRIBE, 4 + len(t))
    buf[o] = pid >> 8
    buf[o + 1] = pid & 0xFF
    _put_str(buf, o + 2, t)
    return buf


def ack(first, pid, buf=None):
    """PUBACK/PUBREC/PUBREL/PUBCOMP/UNSUBACK for pid, written into buf (4 bytes) when given."""
    _check_pid(pid)
    if buf is None:
        buf = bytearray(4)
    buf[0] = first
    buf[1] = 2
    buf[2] = pid >> 8
    buf[3] = pid & 0xFF
    return buf


# -- decoding a packet body (the bytes after the fixed header) -----------------------------------

def _err(msg, *args):
    return MQTTProtocolError(msg % args if args else msg)


def parse_connack(body):
    """(session_present, return_code)"""
    if len(body) != 2:
        raise _err("CONNACK of %d bytes, expected 2", len(body))
    if body[0] & 0xFE:
        raise _err("CONNACK flags 0x%02x: reserved bits set", body[0])
    return bool(body[0] & 1), body[1]


def parse_pid(name, body):
    """The packet id of a PUBACK/PUBREC/PUBREL/PUBCOMP/UNSUBACK body."""
    if len(body) != 2:
        raise _err("%s of %d bytes, expected 2", name, len(body))
    pid = body[0] << 8 | body[1]
    if not pid:
        raise _err("%s with packet id 0", name)
    return pid


def parse_suback(body):
    """(pid, first return code); we send one topic per SUBSCRIBE."""
    if len(body) < 3:
        raise _err("SUBACK of %d bytes, expected at least 3", len(body))
    pid = body[0] << 8 | body[1]
    rc = body[2]
    if not pid or rc not in (0, 1, 2, SUBACK_FAILURE):
        raise _err("SUBACK with packet id %d, return code 0x%02x", pid, rc)
    return pid, rc


def parse_publish(first, body):
    """(qos, pid, topic_end, msg_start): the topic is body[2:topic_end], the message
    body[msg_start:]; pid is 0 for QoS 0."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise _err("PUBLISH with QoS 3")
    n = len(body)
    if n < 2:
        raise _err("PUBLISH of %d bytes: no topic", n)
    end = 2 + (body[0] << 8 | body[1])
    start = end + (2 if qos else 0)
    if end == 2 or start > n:
        raise _err("PUBLISH topic length %d does not fit a body of %d bytes", end - 2, n)
    pid = 0
    if qos:
        pid = body[end] << 8 | body[end + 1]
        if not pid:
            raise _err("PUBLISH QoS %d with packet id 0", qos)
    return qos, pid, end, start


class Reader:
    """Incremental reader of one packet at a time.

    Loop: `mv = r.want()`, read up to len(mv) bytes into it, `pkt = r.got(n)`; pkt is None until a
    packet is complete, then (first byte, body bytearray). The body is refused once its size is
    known and over `limit` (bytes of the whole packet, fixed header included); within it, the body
    buffer grows as bytes arrive, by at most `chunk` bytes ahead of them. A view from want()
    is only good until the next got(): the buffer may move when it grows. A MemoryError from
    got() (no heap for the buffer) leaves the reader reset, between packets; the stream it read
    is broken all the same (the packet's bytes are lost): close the connection.
    """

    def __init__(self, limit=16384, chunk=CHUNK):
        self.limit = limit
        self.chunk = chunk
        self._h = bytearray(5)
        self._hm = memoryview(self._h)
        self.reset()

    def reset(self):
        self._hn = 0  # fixed header bytes read
        self.rl = -1  # remaining length once known
        self._body = None
        self._bn = 0  # body bytes read

    def busy(self):
        """True in the middle of a packet."""
        return self._hn > 0

    def progress(self):
        """(bytes read, bytes expected or -1) of the packet under way, for error messages."""
        if self.rl < 0:
            return self._hn, -1
        return self._hn + self._bn, self._hn + self.rl

    def want(self):
        if self.rl >= 0:
            # a fresh view each time: CPython refuses to grow a bytearray a view still holds
            return memoryview(self._body)[self._bn:]
        if self._hn == 0:
            return self._hm[0:2]  # every packet has at least 2 bytes
        return self._hm[self._hn:self._hn + 1]

    def got(self, n):
        if self.rl >= 0:
            self._bn += n
            if self._bn == self.rl:
                return self._done()
            b = self._body
            if self._bn == len(b):
                k = min(self.chunk, self.rl - self._bn)
                try:
                    b.extend(bytes(k))  # MicroPython grows it in place when the heap allows
                except MemoryError:
                    self.reset()  # the packet is lost: the stream is broken, and so is this
                    raise
                except Exception:  # CPython's BufferError (a caller holds a view): a new one
                    nb = bytearray(len(b) + k)
                    nb[:len(b)] = b
                    self._body = nb
            return None
        h = self._h
        if self._hn == 0 and n:
            t = h[0] >> 4
            if t == 0 or t == 15:
                raise _err("reserved packet type %d (first byte 0x%02x)", t, h[0])
        self._hn += n
        hn = self._hn
        if hn < 2:
            return None
        if h[hn - 1] & 0x80:
            if hn == 5:
                raise _err("remaining length longer than 4 bytes")
            return None
        rl = 0
        for i in range(hn - 1, 0, -1):
            rl = rl << 7 | (h[i] & 0x7F)
        if hn + rl > self.limit:
            raise MQTTPacketTooLarge(hn + rl, self.limit, "incoming packet 0x%02x" % h[0])
        if rl == 0:
            return self._done()
        try:
            self._body = bytearray(min(rl, self.chunk))
        except MemoryError:
            self.reset()  # not left mid-packet without a buffer
            raise
        self.rl = rl
        return None

    def _done(self):
        pkt = (self._h[0], self._body if self._body is not None else b"")
        self.reset()
        return pkt
