# mqtt.MQTTClient.connect's first part, a module of its own: resolving the broker, the TCP
# connection and the TLS handshake are code a connected client does not run again until the next
# connect(), so a device agent unloads this module while it is connected (agent.py, _DROP).
# The socket module is mqtt's own attribute (the device tests put a scripted network there).
from . import hal
from .mqttpkt import MQTTConnectionError, MQTTException, MQTTMemoryError, MQTTTimeout, MQTTTLSError
from .tlsctx import _text

try:
    from errno import EAGAIN, ETIMEDOUT
except ImportError:  # pragma: no cover
    EAGAIN, ETIMEDOUT = 11, 110


def _is_timeout(e):
    return getattr(e, "errno", None) in (ETIMEDOUT, EAGAIN) or type(e).__name__ in (
        "timeout", "TimeoutError")


def open_socket(c, deadline, ms, where):
    """Client c's socket to its broker, TLS wrapped when c has a context: (socket, the TCP one).
    Raises what MQTTClient.connect documents; closes what it opened when it fails."""
    from . import mqtt as m

    ctx = c._context()
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
