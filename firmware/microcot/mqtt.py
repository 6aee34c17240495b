# MQTT 3.1.1 client with the umqtt.simple API shape, for MicroPython and CPython.
#
#   c = MQTTClient("ID", "broker", user="ID", password=pw, keepalive=60,
#                  ssl=tls_context(cafile="/ca.pem"))       # port defaults to 8883 with TLS
#   c.set_callback(lambda topic, msg: ...)                    # both bytes
#   c.set_last_will("st/ID", b"gone", retain=False, qos=0)   # before connect(), as in umqtt
#   c.connect(clean_session=False)                            # -> session present
#   c.subscribe("mr/ID", qos=1)                               # -> granted QoS, or MQTTSubscribeError
#   pid = c.publish("ms/ID", b"200,1", qos=1)                 # QoS 1: returns at once with the id
#   c.poll(100)                                               # never blocks longer than asked
#
# umqtt's forms of TLS, always verified unless switched off explicitly:
# - ssl=<SSLContext>: used as given (wrap_socket with server_hostname = server); a context that
#   does not verify gets a warning at the first connect.
# - ssl=True with ssl_params: a context made at connect() from "cadata" (PEM or DER), "cafile" or
#   "ca_certs" (a path), "cert_reqs" (ssl.CERT_NONE switches verification off, with a warning;
#   CERT_OPTIONAL verifies like CERT_REQUIRED: a handshake never goes on past a failed check),
#   "verify" (False: off), "server_hostname", "cert"/"key" (a client certificate: passed to
#   load_cert_chain), "do_handshake" (accepted; the handshake is always done in connect()).
#   Another key is a ValueError at connect(). Without a CA: the board's configured CA ("ca" of
#   BOARD_CONFIG, the agent's settings: a path or the PEM text), else CPython's default trust
#   store; on MicroPython, which has none, connect() fails with MQTTTLSError before a socket is
#   opened. Verification is never skipped for want of a CA.
# - A broker that refuses the will (or anything) with CONNACK n raises MQTTConnectError, .code n.
#
# Beyond umqtt:
# - poll(timeout_ms) / check_msg() read non-blocking (select.poll on the socket; TLS data already
#   decrypted is read before waiting, so nothing stays stuck in the TLS layer), send PINGREQ when
#   nothing was sent or received for `keepalive` seconds, and declare the link dead (MQTTTimeout)
#   when nothing arrived for 1.5 x keepalive or a PINGREQ stayed unanswered for keepalive (that
#   happens only while other packets still arrive). `timeout` (seconds) bounds connect (TCP, TLS,
#   CONNACK), SUBACK, a send that makes no progress, and the rest of a packet once it started.
# - QoS 1 publish is pipelined: publish() returns the packet id (1..65535, never 0, ids in use are
#   skipped), at most `max_inflight` wait for PUBACK (publish waits up to `timeout` for room);
#   pending(), wait_puback(pid, timeout_ms). Unacknowledged messages stay in the client across
#   connections and are re-sent, oldest first, with DUP set and their original ids, by every
#   successful connect(): with a persistent session MQTT 3.1.1 requires it; without one (clean
#   session, or the broker lost it) the broker treats them as new messages, which QoS 1 allows
#   (at least once) and which loses nothing. drop_pending() forgets them.
# - QoS 1 and 2 receive; QoS 2 ids awaiting PUBREL are remembered (bounded) so a DUP is delivered
#   once; they are kept across a reconnect that finds the session present.
# - A PUBACK, PUBREC, PUBCOMP, SUBACK or UNSUBACK for an id we do not wait for is ignored,
#   noted (self.note, print by default; `log` is umqtt.robust's method) and counted in
#   self.stray: after a reconnect a late or repeated acknowledgement is harmless, and closing a
#   working link over it would be worse. A PUBREL for an unknown id is answered with PUBCOMP, as
#   the protocol asks.
# - Incoming packets are bounded by max_packet (whole packet, default 16 KiB): a larger one is
#   refused (MQTTPacketTooLarge, connection closed) once its remaining length is read, before
#   anything is allocated for it; an outgoing PUBLISH over the limit is refused before sending.
#   A packet is read with readinto into one bytearray of its size; the callback gets topic and
#   message as bytes copied from it, so a message costs about twice its size while delivered.
#   When even that allocation fails the connection is closed and MQTTMemoryError raised.
# - A hostile or broken broker (a malformed or oversized packet, garbage for a CONNACK, a close in
#   the middle of a packet) costs the connection, never the client: the connection is closed and
#   the error raised is an MQTTException (MQTTProtocolError, MQTTPacketTooLarge,
#   MQTTConnectionError, MQTTTimeout) or MQTTMemoryError; the next connect() starts clean.
# - The callback runs inside poll(); if it raises, the exception leaves poll() and the message is
#   not acknowledged (QoS 1/2: the broker delivers it again after the next reconnect).
# - All errors are MQTTException subclasses (mqttpkt.py); I/O errors close the connection, and
#   the in-flight messages stay for the next connect(). Out of memory is a MemoryError; in the
#   TLS handshake it is MQTTMemoryError naming the handshake, the free heap and what mbedTLS
#   could not allocate, also where mbedTLS reports it as an untrusted certificate (hal.tls_oom).
# - No QoS 2 publish. A will is sent as set; the Cloud of Things broker refuses it (seed 002),
#   so the agent never sets one.
import select
import socket  # noqa: F401 (mqttconn opens sockets through it: the device tests replace it)

from . import hal
from .mqttpkt import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    SUBACK_FAILURE,
    MQTTConnectError,
    MQTTConnectionError,
    MQTTException,
    MQTTMemoryError,
    MQTTPacketTooLarge,
    MQTTProtocolError,
    MQTTSubscribeError,
    MQTTTimeout,
    MQTTTLSError,
    Reader,
    ack,
    parse_pid,
    parse_publish,
    parse_suback,
)
from .mqttpkt import publish as _publish_pkt
from .mqttpkt import publish_head as _publish_head
from .mqttpkt import subscribe as _subscribe_pkt
from .mqttpkt import unsubscribe as _unsubscribe_pkt
from .tlsctx import _text, tls_context  # noqa: F401 (mqtt.tls_context: the old name)

__all__ = (
    "MQTTClient", "BOARD_CONFIG", "ERRORS", "tls_context", "MQTTException", "MQTTProtocolError",
    "MQTTPacketTooLarge", "MQTTConnectError", "MQTTSubscribeError", "MQTTConnectionError",
    "MQTTTLSError", "MQTTTimeout", "MQTTMemoryError",
)

try:
    from errno import EAGAIN, ETIMEDOUT
except ImportError:  # pragma: no cover
    EAGAIN, ETIMEDOUT = 11, 110

_MP = hal.family() != "cpython"
# what a broker, however hostile, can make connect(), poll() and the calls that wait raise (the
# connection is then closed); the callback's own exceptions pass through as they are
ERRORS = (MQTTException, MQTTMemoryError)
# the agent's settings: ssl=True without a CA takes the board's from its "ca"
BOARD_CONFIG = "/microcot.json"
_PINGREQ = bytes((PINGREQ, 0))
_DISCONNECT = bytes((DISCONNECT, 0))
_Q2_MAX = 32
# QoS 1 payloads larger than this go out after their header instead of copied into one packet
# (two writes, two TLS records: for small messages one is cheaper)
_SPLIT = 512
_NAMES = {0x40: "PUBACK", 0x50: "PUBREC", 0x60: "PUBREL", 0x70: "PUBCOMP", 0xB0: "UNSUBACK"}


def _log(msg):
    print("mqtt:", msg)


def _would_block(e):
    return getattr(e, "errno", None) == EAGAIN or type(e).__name__ in (
        "BlockingIOError", "SSLWantReadError", "SSLWantWriteError")


class MQTTClient:
    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0,
                 ssl=None, ssl_params=None, timeout=10, max_packet=16384, max_inflight=8):
        self.client_id = client_id
        self.server = server
        self.port = port or (8883 if ssl else 1883)
        self.user = user
        self.pswd = password
        self.keepalive = keepalive
        self.ssl = ssl
        self.ssl_params = ssl_params or {}
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.cb = None
        self.note = _log
        self.lw_topic = None  # the last will (set_last_will), umqtt's attribute names
        self.lw_msg = None
        self.lw_qos = 0
        self.lw_retain = False
        self.stray = 0  # acknowledgements for ids we were not waiting for
        self.sock = None
        self._po = None  # the object registered with select.poll
        self._pl = None
        self._rd = None
        self._wr = None
        self._rx = Reader(max_packet)
        self._ab = bytearray(4)  # PUBACK/PUBREC/PUBCOMP are written from here
        self._pid = 0
        # [pid, packet, None] or [pid, header, payload] of unacknowledged QoS 1 publishes, oldest
        # first
        self._out = []
        self._q2 = []  # QoS 2 ids received, PUBREC sent, PUBREL not yet
        self._wait = None  # [pid, return code or None] of a SUBSCRIBE/UNSUBSCRIBE under way
        self._t_tx = self._t_rx = 0
        self._t_ping = None
        self._warned = False

    # -- umqtt API -------------------------------------------------------------------------------

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        """The message the broker publishes when the connection ends without DISCONNECT; sent
        with every connect() from now on. ValueError for a topic or QoS the protocol forbids."""
        from .mqttopt import last_will  # rarely used: its code stays off the heap until then

        last_will(self, topic, msg, retain, qos)

    def connect(self, clean_session=True, timeout=None):
        """Open the connection and return the session-present flag of CONNACK.

        Raises MQTTConnectError (.code) for a refused CONNACK, MQTTTLSError, MQTTTimeout or
        MQTTConnectionError otherwise. Then re-sends the unacknowledged QoS 1 messages."""
        # code a connected client does not run again until the next connect(): the agent
        # unloads it while connected
        import sys

        from .mqttconn import connect

        return connect(self, clean_session, timeout, sys.modules[__name__])

    def disconnect(self):
        if self.sock is not None:
            try:
                self._send(_DISCONNECT)
            except MQTTException:
                pass
        self.close()

    def ping(self):
        self._send(_PINGREQ)
        self._t_ping = hal.ticks_ms()

    def publish(self, topic, msg, retain=False, qos=0):
        """Send a message. QoS 0: returns None once written. QoS 1: returns the packet id once
        written; the message stays in the client until its PUBACK (see pending, wait_puback) and
        is re-sent by the next connect() if the link fails, also when this call raises an
        MQTTConnectionError after taking it (such an error has .pid)."""
        if qos not in (0, 1):
            raise ValueError("publish: qos %r not supported (0 or 1)" % (qos,))
        if not qos:
            pkt = _publish_pkt(topic, msg, 0, retain)
            self._check_size(len(pkt))
            self._send(pkt)
            return None
        self._connected()
        if len(self._out) >= self.max_inflight:
            deadline = hal.ticks_add(hal.ticks_ms(), int(self.timeout * 1000))
            while len(self._out) >= self.max_inflight:
                left = self._left(deadline)
                if left <= 0:
                    raise MQTTTimeout("publish: %d messages await PUBACK, none came within %d ms"
                                      % (len(self._out), int(self.timeout * 1000)))
                self.poll(left)
        pid = self._newpid()
        m = msg.encode() if isinstance(msg, str) else msg
        if len(m) > _SPLIT:
            # header and payload go out one after the other, and the payload is kept as given
            # until its PUBACK: a few KiB (the template registration) are never copied
            item = [pid, _publish_head(topic, len(m), 1, retain, False, pid), m]
        else:
            item = [pid, _publish_pkt(topic, m, 1, retain, False, pid), None]
        self._check_size(len(item[1]) + (len(m) if item[2] is not None else 0))
        self._out.append(item)
        try:
            self._send(item[1])
            if item[2] is not None:
                self._send(item[2])
        except MQTTConnectionError as e:
            e.pid = pid
            raise
        return pid

    def subscribe(self, topic, qos=0):
        """Subscribe and wait for SUBACK (delivering messages meanwhile); return the granted QoS.
        A refusal (0x80) raises MQTTSubscribeError naming the topic."""
        rc = self._request(_subscribe_pkt, topic, (qos,), "SUBACK")
        if rc == SUBACK_FAILURE:
            raise MQTTSubscribeError(topic, rc)
        return rc

    def unsubscribe(self, topic):
        self._request(_unsubscribe_pkt, topic, (), "UNSUBACK")

    def check_msg(self):
        return self.poll(0)

    def wait_msg(self, timeout_ms=None):
        """Block until one packet was handled (its type, e.g. 0x30) or timeout_ms passed (None)."""
        if timeout_ms is not None:
            return self.poll(timeout_ms)
        while True:
            t = self.poll(60000)
            if t is not None:
                return t

    # -- beyond umqtt -------------------------------------------------------------------------

    def isconnected(self):
        return self.sock is not None

    def poll(self, timeout_ms=0):
        """Handle at most one incoming packet, waiting up to timeout_ms for it; service the
        keep-alive. Returns the packet type handled (0x30 PUBLISH, 0x40 PUBACK, ...) or None."""
        self._connected()
        deadline = hal.ticks_add(hal.ticks_ms(), timeout_ms)
        while True:
            due = self._keepalive()
            left = self._left(deadline)
            pkt = self._read(max(0, min(left, due)))
            if pkt is not None:
                return self._handle(pkt[0], pkt[1])
            if self._left(deadline) <= 0:
                self._keepalive()
                return None

    def pending(self):
        """Number of QoS 1 messages waiting for their PUBACK."""
        return len(self._out)

    def wait_puback(self, pid, timeout_ms=None):
        """True once pid is acknowledged (or was never pending), False after timeout_ms
        (default: `timeout`); the link stays up."""
        if timeout_ms is None:
            timeout_ms = int(self.timeout * 1000)
        deadline = hal.ticks_add(hal.ticks_ms(), timeout_ms)
        while self._find(pid) >= 0:
            left = self._left(deadline)
            if left <= 0:
                return False
            self.poll(left)
        return True

    def drop_pending(self):
        """Forget the unacknowledged QoS 1 messages; returns how many there were."""
        n = len(self._out)
        self._out = []
        return n

    def close(self):
        """Close the connection without DISCONNECT (unacknowledged messages are kept)."""
        s, self.sock = self.sock, None
        if s is not None:
            try:
                self._pl.unregister(self._po)
            except Exception:
                pass
            try:
                s.close()
            except OSError:
                pass
            if self._po is not s:
                try:
                    self._po.close()
                except OSError:
                    pass
        self._po = self._pl = self._rd = self._wr = None
        self._rx.reset()
        self._t_ping = None
        self._wait = None

    # -- internals ----------------------------------------------------------------------------

    def _context(self):
        from .mqttconn import context

        return context(self)

    def _ssl_params_context(self):
        # ssl=True: umqtt's legacy form; the context is made here, at connect(), so that a
        # missing CA is an error of the connection, never of the constructor
        from .mqttopt import ssl_params_context  # rarely used: off the heap until then

        return ssl_params_context(self, BOARD_CONFIG)

    def _connected(self):
        if self.sock is None:
            raise MQTTConnectionError("not connected")

    def _check_size(self, n):
        if n > self._rx.limit:
            raise MQTTPacketTooLarge(n, self._rx.limit, "PUBLISH")

    def _left(self, deadline):
        return hal.ticks_diff(deadline, hal.ticks_ms())

    def _fail(self, exc):
        self.close()
        raise exc

    def _find(self, pid):
        out = self._out
        for i in range(len(out)):
            if out[i][0] == pid:
                return i
        return -1

    def _newpid(self):
        p = self._pid
        while True:
            p = p % 65535 + 1
            if self._find(p) < 0 and not (self._wait and self._wait[0] == p):
                self._pid = p
                return p

    def _request(self, build, topic, args, name):
        self._connected()
        pid = self._newpid()
        self._wait = [pid, None]
        ms = int(self.timeout * 1000)
        deadline = hal.ticks_add(hal.ticks_ms(), ms)
        try:
            self._send(build(pid, topic, *args))
            while self._wait[1] is None:
                left = self._left(deadline)
                if left <= 0:
                    self._fail(MQTTTimeout("no %s for %r within %d ms" % (name, topic, ms)))
                self.poll(left)
            return self._wait[1]
        finally:
            self._wait = None

    def _wait_io(self, mask, ms):
        pl = self._pl
        pl.modify(self._po, mask)
        pl.poll(ms)

    def _send(self, buf, deadline=None):
        self._connected()
        if deadline is None:
            deadline = hal.ticks_add(hal.ticks_ms(), int(self.timeout * 1000))
        mv = memoryview(buf)
        n = 0
        size = len(buf)
        while n < size:
            try:
                k = self._wr(mv[n:])
            except OSError as e:
                if not _would_block(e):
                    self._fail(MQTTConnectionError("send failed: %s" % _text(e)))
                k = None
            if k:
                n += k
                continue
            left = self._left(deadline)
            if left <= 0:
                self._fail(MQTTTimeout("send stalled: %d of %d bytes written" % (n, size)))
            self._wait_io(select.POLLOUT, left)
        self._t_tx = hal.ticks_ms()

    def _read(self, wait_ms):
        """One complete packet (first byte, body) or None when none completed within wait_ms."""
        rx = self._rx
        deadline = hal.ticks_add(hal.ticks_ms(), wait_ms)
        while True:
            try:
                k = self._rd(rx.want())
            except OSError as e:
                if not _would_block(e):
                    self._fail(MQTTConnectionError("receive failed: %s" % _text(e)))
                k = None
            if k is None:
                left = self._left(deadline)
                if left <= 0:
                    return None
                self._wait_io(select.POLLIN, left)
                continue
            if k == 0:
                got, exp = rx.progress()
                self._fail(MQTTConnectionError(
                    "connection closed by the broker" + (
                        " in the middle of a packet (%d of %s bytes)" % (
                            got, exp if exp >= 0 else "?") if rx.busy() else "")))
            self._t_rx = hal.ticks_ms()
            try:
                pkt = rx.got(k)
            except MQTTException as e:
                self._fail(e)
            except MemoryError:
                # the body's allocation (within max_packet) failed: the reader is mid-packet
                # without a buffer, so only a new connection goes on from here
                got, exp = rx.progress()
                self._fail(MQTTMemoryError("incoming packet of %d bytes (within max_packet %d): "
                                           "no memory for it; connection closed"
                                           % (exp, rx.limit)))
            if pkt is not None:
                return pkt

    def _keepalive(self):
        """Ping or fail as due; return ms until the next check is due."""
        now = hal.ticks_ms()
        idle_rx = hal.ticks_diff(now, self._t_rx)
        due = 600000
        rx = self._rx
        if rx.busy():
            ms = int(self.timeout * 1000)
            if idle_rx >= ms:
                got, exp = rx.progress()
                self._fail(MQTTTimeout("incomplete packet: %d of %s bytes, nothing more for %d ms"
                                       % (got, exp if exp >= 0 else "?", idle_rx)))
            due = ms - idle_rx
        ka = self.keepalive * 1000
        if not ka:
            return due
        dead = ka + ka // 2
        if idle_rx >= dead:
            self._fail(MQTTTimeout("link dead: nothing from the broker for %d ms (keep-alive %d s)"
                                   % (idle_rx, self.keepalive)))
        if self._t_ping is not None:
            age = hal.ticks_diff(now, self._t_ping)
            if age >= ka:
                self._fail(MQTTTimeout("link dead: PINGREQ unanswered for %d ms (keep-alive %d s)"
                                       % (age, self.keepalive)))
            due = min(due, ka - age)
        else:
            idle_tx = hal.ticks_diff(now, self._t_tx)
            if idle_tx >= ka or idle_rx >= ka:
                self.ping()
                due = min(due, ka)
            else:
                due = min(due, ka - idle_tx, ka - idle_rx)
        return max(1, min(due, dead - idle_rx))

    def _ack(self, first, pid):
        self._send(ack(first, pid, self._ab))

    def _handle(self, first, body):
        kind = first & 0xF0
        try:
            if kind == PUBLISH:
                self._on_publish(first, body)
                return kind
            if first & 0x0F != (2 if kind == 0x60 else 0):
                raise MQTTProtocolError("packet 0x%02x: reserved flags are not %d"
                                        % (first, 2 if kind == 0x60 else 0))
            if kind == 0xD0:  # PINGRESP
                if body:
                    raise MQTTProtocolError("PINGRESP with a body of %d bytes" % len(body))
                self._t_ping = None
            elif kind == 0x90:  # SUBACK
                pid, rc = parse_suback(body)
                self._answer(pid, rc, "SUBACK")
            elif kind in _NAMES:
                pid = parse_pid(_NAMES[kind], body)
                if kind == 0x40:
                    i = self._find(pid)
                    if i >= 0:
                        self._out.pop(i)
                    else:
                        self._stray("PUBACK", pid)
                elif kind == 0x60:  # PUBREL
                    if pid in self._q2:
                        self._q2.remove(pid)
                    else:
                        self._stray("PUBREL", pid)
                    self._ack(PUBCOMP, pid)
                elif kind == 0xB0:
                    self._answer(pid, 0, "UNSUBACK")
                else:  # PUBREC, PUBCOMP: we never publish with QoS 2
                    self._stray(_NAMES[kind], pid)
            else:
                raise MQTTProtocolError("unexpected packet 0x%02x from the broker" % first)
        except MQTTProtocolError as e:
            self._fail(e)
        return kind

    def _answer(self, pid, rc, name):
        w = self._wait
        if w is not None and w[0] == pid:
            w[1] = rc
        else:
            self._stray(name, pid)

    def _stray(self, name, pid):
        self.stray += 1
        self.note("%s for unknown packet id %d ignored" % (name, pid))

    def _on_publish(self, first, body):
        qos, pid, end, start = parse_publish(first, body)
        if qos == 2:
            if pid in self._q2:  # a DUP of a message already delivered
                self._ack(PUBREC, pid)
                return
            if len(self._q2) >= _Q2_MAX:
                raise MQTTProtocolError("more than %d QoS 2 messages await PUBREL" % _Q2_MAX)
        mv = memoryview(body)
        try:
            topic = bytes(mv[2:end])
            msg = bytes(mv[start:]) if self.cb is not None else None
        except MemoryError:
            self._fail(MQTTMemoryError("PUBLISH of %d bytes: no memory to deliver it; connection "
                                       "closed (QoS 1/2: delivered again after a reconnect)"
                                       % len(body)))
        if self.cb is not None:
            self.cb(topic, msg)
        else:
            self.note("message on %r dropped: no callback set" % topic)
        if qos == 1:
            self._ack(PUBACK, pid)
        elif qos == 2:
            self._q2.append(pid)
            self._ack(PUBREC, pid)
