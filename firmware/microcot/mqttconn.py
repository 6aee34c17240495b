# mqtt.MQTTClient.connect, a module of its own: resolving the broker, the TCP connection, the TLS
# handshake and CONNACK are code a connected client does not run again until the next connect(),
# so a device agent unloads this module while it is connected (agent.py, _DROP). The socket and
# select modules are mqtt's own attributes (the device tests put a scripted network there).
from . import hal
from .mqttpkt import (
    CONNACK,
    MQTTConnectError,
    MQTTConnectionError,
    MQTTException,
    MQTTMemoryError,
    MQTTProtocolError,
    MQTTTimeout,
    MQTTTLSError,
    parse_connack,
)
from .mqttpkt import connect as _connect_pkt
from .tlsctx import _text

try:
    from errno import EAGAIN, ETIMEDOUT
except ImportError:  # pragma: no cover
    EAGAIN, ETIMEDOUT = 11, 110


def _is_timeout(e):
    return getattr(e, "errno", None) in (ETIMEDOUT, EAGAIN) or type(e).__name__ in (
        "timeout", "TimeoutError")


def connect(c, clean_session, timeout, m):
    """MQTTClient.connect of client c (mqtt.py documents it). m: mqtt.py's module, whose socket,
    select and _MP it uses (passed in, not imported: mqtt.py imports this module)."""

    c.close()
    ms = int((c.timeout if timeout is None else timeout) * 1000)
    deadline = hal.ticks_add(hal.ticks_ms(), ms)
    where = "%s:%d" % (c.server, c.port)
    # what can fail without the network fails before a socket exists
    will = None
    if c.lw_topic:
        will = (c.lw_topic, c.lw_msg, c.lw_qos, c.lw_retain)
    pkt = _connect_pkt(c.client_id, c.user, c.pswd, c.keepalive, clean_session, will)
    s, raw = open_socket(c, deadline, ms, where, m)
    c.sock = s
    c._po = s if hasattr(s, "fileno") else raw  # MicroPython's TLS socket: poll the TCP one
    c._pl = m.select.poll()
    c._pl.register(c._po, m.select.POLLIN)
    c._rd = s.readinto if m._MP else s.recv_into  # both non-blocking, both into a buffer
    c._wr = s.write if m._MP else s.send
    c._t_rx = hal.ticks_ms()
    c._send(pkt, deadline)
    pkt = c._read(c._left(deadline))
    if pkt is None:
        c._fail(MQTTTimeout("no CONNACK from %s within %d ms" % (where, ms)))
    if pkt[0] != CONNACK:
        c._fail(MQTTProtocolError("expected CONNACK, got packet 0x%02x" % pkt[0]))
    try:
        present, code = parse_connack(pkt[1])
    except MQTTException as e:
        c._fail(e)
    if code:
        c._fail(MQTTConnectError(code))
    if not present:
        c._q2 = []
    for item in c._out:
        item[1][0] |= 0x08  # DUP
        c._send(item[1])
        if item[2] is not None:
            c._send(item[2])
    return present


def context(c):
    """Client c's SSLContext, or None without TLS (ssl=True: made from ssl_params now)."""
    ctx = c.ssl
    if not ctx:
        return None
    if ctx is True:
        ctx = c.ssl = c._ssl_params_context()
    if not c._warned and ctx.verify_mode == 0:  # CERT_NONE
        c._warned = True
        c.note("WARNING: TLS to %s without certificate verification" % c.server)
    return ctx


def open_socket(c, deadline, ms, where, m):
    """Client c's socket to its broker, TLS wrapped when c has a context: (socket, the TCP one).
    Raises what MQTTClient.connect documents; closes what it opened when it fails. m: as in
    connect()."""

    ctx = context(c)
    try:
        ai = m.socket.getaddrinfo(c.server, c.port, 0, m.socket.SOCK_STREAM)[0]
    except (OSError, IndexError) as e:  # IndexError: no address at all
        raise MQTTConnectionError("cannot resolve %s: %s" % (c.server, _text(e)))
    try:
        s = m.socket.socket(ai[0], m.socket.SOCK_STREAM)
    except OSError as e:  # out of sockets or buffers (lwIP: ENFILE, ENOBUFS)
        raise MQTTConnectionError("no socket for %s: %s" % (where, _text(e)))
    raw = s
    try:
        s.settimeout(ms / 1000)
        s.connect(ai[-1])
        if ctx is not None:
            s.settimeout(max(1, c._left(deadline)) / 1000)
            host = c.ssl_params.get("server_hostname", c.server)
            try:
                s = ctx.wrap_socket(s, server_hostname=host)
            except (OSError, ValueError, MemoryError) as e:
                if isinstance(e, OSError) and _is_timeout(e):
                    raise
                oom = hal.tls_oom(e, where)
                if oom:
                    raw.close()
                    raise MQTTMemoryError(oom)
                raise MQTTTLSError("TLS handshake with %s failed: %s%s"
                                   % (where, _text(e), hal.clock_hint()))
        s.setblocking(False)
    except OSError as e:
        s.close()
        if s is not raw:
            raw.close()
        if _is_timeout(e):
            raise MQTTTimeout("connect to %s: no answer within %d ms" % (where, ms))
        raise MQTTConnectionError("connect to %s failed: %s" % (where, _text(e)))
    except MQTTException:
        s.close()
        raise
    return s, raw
