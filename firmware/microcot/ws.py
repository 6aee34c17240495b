"""WebSocket client (RFC 6455, RFC 7692) with the interface of the seed's FB_IotWebSocketClient.

    c = WebSocketClient("example.com", uri="/feed", tls={"ca": "/ca.der"},
                        headers={"Authorization": "Bearer " + token})
    c.on_message = lambda content, content_type: print(bytes(content))
    c.connect()
    while c.active:
        c.execute(10)                # cyclically: connect progress, keep-alive, receive, dispatch
        ...                          # c.send_message("hello") whenever c.connected

Inputs are constructor arguments and attributes, read at connect(); after changing one, call
connect(reconfig=True). The seed's inputs: host ("" = localhost), port (None = 80, 443 with tls),
uri, protocol (one or a comma-separated list), origin, tls, per_message_deflate (True, or a dict
of RFC 7692 parameters, see microcot.wspmd), keep_alive, keep_alive_interval and
keep_alive_close_timeout (s: a ping after that long without traffic from the server, the
connection closed when the next that long brings nothing either), connect_response_timeout (s,
for each of TCP connect, TLS handshake and the handshake answer), max_recv_frame_size=0x10000,
max_recv_msg_size=0x100000, max_send_frame_size=0x4000. Beyond the seed: headers (a dict or pairs,
e.g. Authorization), close_timeout (s to wait for the server's Close), send_timeout (s a blocked
send may take). Only the name lookup blocks; connecting, sending the request and waiting for the
answer proceed in execute(), which never waits longer than its wait_ms.

Outputs are attributes: `error`, `error_code`, `state` (the seed's WS_STATUS_* numbers, module
constants here), `connected`, `close_reason`; and, beyond the seed, `active` (a connection or its
close handshake under way), `error_msg` (what went wrong, in words), `http_status` (of the
handshake answer), `protocol_selected`, `extensions` (the agreed permessage-deflate parameters or
None), `can_compress` and `sent_compressed` (whether send_message(..., compress=True) really
compressed: where the runtime cannot, the message goes uncompressed).

Overridable (subclass, or assign a function to the instance attribute):
    check_protocol(protocol) -> bool       the subprotocol the server chose ("" for none)
    on_message(content, content_type)      content: a memoryview valid during the call;
                                           content_type WS_CONTENT_TEXT / WS_CONTENT_BINARY
                                           (messages are reassembled, so WS_CONTENT_CONTINUATION
                                           is never passed); return S_FALSE to have the same
                                           message delivered again on the next execute()
    on_close(status_code, content)         once per connection when it ends: the server's close
                                           code and reason, else the code we closed with, 1006
                                           when the connection broke without a Close
execute() never raises. An exception from one of the handlers fails the connection: Close 1011
(internal error) is sent, state becomes WS_STATUS_INTERNAL_ERROR with error=True, error_msg
names the exception and `handler_error` holds it, and the loop goes on (connect() again to
reconnect). Why not log it and carry on: a handler that stopped half-way may have left the
application's state inconsistent, and the message is lost; the close tells the server (RFC 6455
7.4.1, 1011), the outputs tell the application, and a reconnect starts from a clean state, as for
any other failure. On_close raising after the connection has ended only sets handler_error and
error_msg. What a server sends can never raise out of execute() either: a protocol violation
closes with 1002 (WS_STATUS_PROTOCOL_ERROR), invalid UTF-8 with 1007, a frame or message over the
limits with 1009 (WS_STATUS_INVALID_MSG_SIZE), a bad compressed payload with 1007
(WS_STATUS_DECOMPRESS_ERROR), a heap too small for a message with 1009 (WS_STATUS_NOMEMORY), and
an unexpected error of this module with 1011 (WS_STATUS_INTERNAL_ERROR).

States: WS_STATUS_SOCK_NO_CONN before connect and after a clean close, WS_STATUS_BUSY while
connecting, WS_STATUS_SUCCESS while open, WS_STATUS_FINALIZE_DISCONNECT during the close
handshake, an error status (with error=True) when something failed. error_code is the HTTP status
for a refused handshake, the close code for a protocol failure, the OS errno for socket errors.

TLS (`tls`: any value other than None and False means TLS with verification: True and {} the
defaults, or a Tls, a dict or any object with these attributes; the seed's ST_IotSocketTls
names such as sCA, bNoServerCertCheck are accepted in a dict too): ca, cert, key_file (a path, or
the PEM text / DER bytes), key_pwd, crl, ciphers, version ("tlsv1.2": the lowest version
accepted), no_server_cert_check, psk_identity, psk_key. The server certificate and host name are
verified unless no_server_cert_check. What the runtime's ssl cannot honour fails at connect with
the matching WS_STATUS_TLS_* state and error_msg: on MicroPython CRL, PSK, key_pwd, ciphers and
versions other than TLS 1.2, and a missing ca (there is no system store); PSK on CPython < 3.13.

Memory: a receive buffer of RX_SIZE, a send buffer of at most TX_CHUNK + 14 bytes, 4 * KEYS
bytes of masking keys, and the message buffer, which grows with the bytes that arrive (never with the length a header declares:
at most wsframe.Reader.GROW_MAX ahead of them) up to max_recv_msg_size and is kept for the next
messages; a frame or message over the limits is refused from its header (close 1009), never
stored. A TLS handshake that runs out of memory ends in WS_STATUS_SOCK_NOMEM with an error_msg
naming the handshake, the free heap and what mbedTLS could not allocate, also where mbedTLS calls
it an untrusted certificate (hal.tls_oom).
"""

import socket
import sys
from os import urandom

from microcot import wsframe as F
from microcot.hal import ticks_diff, ticks_ms

try:
    import select
except ImportError:
    select = None

try:
    import ssl
except ImportError:
    ssl = None

_MP = sys.implementation.name == "micropython"
if _MP:
    _AGAIN = ()
else:
    _AGAIN = (BlockingIOError, InterruptedError)
    if ssl is not None:
        _AGAIN += (ssl.SSLWantReadError, ssl.SSLWantWriteError)

S_OK = 0  # on_message: message taken
S_FALSE = 1  # on_message: deliver the same message again on the next execute()

RX_SIZE = 4096  # receive buffer; also the largest handshake answer head
TX_CHUNK = 4096  # send buffer (plus a header): larger frames are masked and written in chunks
# masking keys fetched per urandom() call. Few calls, not only for their cost: the bytes object
# urandom returns is garbage that lands between the call frames MicroPython allocates on the heap
# (functions with more than 11 words of state) and makes each later frame's allocation scan past
# it; echoing 16 B, 16 keys a call cost 51k instructions per echo in gc_alloc, 64 about 13k.
KEYS = 64
DRAIN_MS = 500  # after both Close frames, how long the server's TCP close is awaited
_EAGAIN = (11, 35, 115, 36, 114, 119)  # EAGAIN/EWOULDBLOCK/EINPROGRESS/EALREADY on Linux, BSD
_POLLOUT = 4
_POLLERR = 8 | 16  # POLLERR | POLLHUP

_IDLE, _TCP, _TLS, _REQ, _RESP, _OPEN, _CLOSING, _DRAIN = range(8)

def __getattr__(name):
    # the WS_STATUS_*, WS_CONTENT_*, CLOSE_* and OP_* constants of microcot.wsframe, without a
    # second copy of them in this module's globals
    if name[:3] in ("WS_", "CLO", "OP_"):
        return getattr(F, name)
    if name == "Tls":
        from microcot import wstls

        return wstls.Tls
    if name == "__all__":  # from microcot.ws import *
        return [k for k in dir(F) if k[:3] in ("WS_", "CLO", "OP_")] + [
            "WebSocketClient", "S_OK", "S_FALSE", "Tls", "RX_SIZE"]
    raise AttributeError(name)


def _errno(e):
    a = e.args[0] if e.args else 0
    if isinstance(a, int):
        return a
    s = str(a)  # MicroPython unix: '[addrinfo error -2]'
    j = len(s) - (1 if s.endswith("]") else 0)
    i = j
    while i and (s[i - 1].isdigit() or s[i - 1] == "-"):
        i -= 1
    try:
        return int(s[i:j])
    except ValueError:
        return 0


def _read_error(e):
    """What a read that raised e returns: None when nothing is available now, 0 at a TLS
    close; else e is raised."""
    if isinstance(e, _AGAIN):
        return None
    if isinstance(e, OSError):
        if _errno(e) in _EAGAIN:
            return None
        if ssl is not None and not _MP and isinstance(e, ssl.SSLZeroReturnError):
            return 0
    raise e


def _tls_error(e, c):
    from microcot import hal, wstls

    m = hal.tls_oom(e, "%s:%d" % (c.host, c.port))  # mbedTLS out of memory, however it says it
    if m:
        return F.ConnectError(F.WS_STATUS_SOCK_NOMEM, m, _errno(e) if isinstance(e, OSError) else 0)
    err = wstls.handshake_error(e)
    err.code = _errno(e)
    return err


def _conn_fail(e):
    n = _errno(e)
    if n in (111, 61, 10061):
        st = F.WS_STATUS_SOCK_CONN_REFUSED
    elif n in (113, 101, 65, 51, 10065):
        st = F.WS_STATUS_SOCK_CONN_HOSTUNREACH
    elif n in (110, 60, 10060):
        st = F.WS_STATUS_SOCK_CONN_TIMEDOUT
    elif n == 12:
        st = F.WS_STATUS_SOCK_NOMEM
    else:
        st = F.WS_STATUS_SOCK_CONN_FAILED
    return F.ConnectError(st, "TCP connect failed: %r" % (e,), n)


class _Cfg:
    pass


_INPUTS = ("host", "port", "uri", "protocol", "origin", "tls", "per_message_deflate",
           "keep_alive", "keep_alive_interval", "keep_alive_close_timeout",
           "connect_response_timeout", "max_recv_frame_size", "max_recv_msg_size",
           "max_send_frame_size", "headers", "close_timeout", "send_timeout")


class WebSocketClient:
    """The seed's FB_IotWebSocketClient (see the module docstring)."""

    def __init__(self, host="", port=None, uri="/", protocol="", origin="", tls=None,
                 per_message_deflate=False, keep_alive=True, keep_alive_interval=30,
                 keep_alive_close_timeout=10, connect_response_timeout=10,
                 max_recv_frame_size=0x10000, max_recv_msg_size=0x100000,
                 max_send_frame_size=0x4000, headers=None, close_timeout=5, send_timeout=10):
        self.host = host
        self.port = port
        self.uri = uri
        self.protocol = protocol
        self.origin = origin
        self.tls = tls
        self.per_message_deflate = per_message_deflate
        self.keep_alive = keep_alive
        self.keep_alive_interval = keep_alive_interval
        self.keep_alive_close_timeout = keep_alive_close_timeout
        self.connect_response_timeout = connect_response_timeout
        self.max_recv_frame_size = max_recv_frame_size
        self.max_recv_msg_size = max_recv_msg_size
        self.max_send_frame_size = max_send_frame_size
        self.headers = headers
        self.close_timeout = close_timeout
        self.send_timeout = send_timeout
        # outputs
        self.error = False
        self.error_code = 0
        self.error_msg = ""
        self.state = F.WS_STATUS_SOCK_NO_CONN
        self.connected = False
        self.close_reason = 0
        self.http_status = 0
        self.protocol_selected = ""
        self.extensions = None
        self.can_compress = False
        self.sent_compressed = False
        self._c = None
        self._ctx = None
        self._ph = _IDLE
        self._raw = None
        self._s = None
        self._poll = None
        self._rx = None
        self._tx = bytearray(0)
        self._reader = None
        self._infl = None
        self._defl = None
        self._pending = None
        self._closed_cb = False
        self._discard = False
        self._uexc = None
        self.handler_error = None  # the last exception raised by a handler
        self._keys = b""
        self._ki = 0
        self._rxv = None
        self._txs = None  # the last small frame's view of the send buffer
        self._kb = bytearray(4)  # the masking key of a frame sent by _small()

    @property
    def active(self):
        """True from connect() until the connection, close handshake included, has ended."""
        return self._ph != _IDLE

    # --- overridables ----------------------------------------------------------------------------

    def check_protocol(self, protocol):
        return True

    def on_message(self, content, content_type):
        return S_OK

    def on_close(self, status_code, content):
        return S_OK

    # --- connect ---------------------------------------------------------------------------------

    def _snapshot(self):
        c = _Cfg()
        for k in _INPUTS:
            setattr(c, k, getattr(self, k))
        if c.tls is not None and c.tls is not False:  # {} too: TLS with the defaults
            from microcot import wstls

            try:
                c.tls = wstls.tls_of(c.tls)
            except (TypeError, ValueError) as e:
                raise F.ConnectError(F.WS_STATUS_TLS_SETUP, "bad tls setting: %s" % (e,))
        else:
            c.tls = None
        if not c.port:
            c.port = 443 if c.tls else 80
        c.host = c.host or "localhost"
        p = c.protocol
        c.protocols = [x.strip() for x in p.split(",")] if isinstance(p, str) else list(p or ())
        c.protocols = [x for x in c.protocols if x]
        pmd = c.per_message_deflate
        if pmd:
            from microcot import wspmd

            if not wspmd.inflate_available():
                raise F.ConnectError(F.WS_STATUS_SOCK_NOT_SUPPORTED, "no zlib/deflate module for "
                            "per_message_deflate")
            c.pmd_opts = wspmd.default_options() if pmd is True else pmd
            c.ext = wspmd.offer(c.pmd_opts)
        else:
            c.ext = None
        self._c = c
        self._ctx = None
        if c.tls:
            from microcot import wstls

            self._ctx = wstls.context(c.tls)

    def _configure(self):
        try:
            self._snapshot()
        except (ValueError, TypeError) as e:  # a per_message_deflate dict out of range
            self._c = None
            raise F.ConnectError(F.WS_STATUS_CONNECT_REQ_INTERNAL_ERROR, "bad setting: %s" % (e,))
        except F.ConnectError:
            self._c = None
            raise

    def connect(self, reconfig=False):
        """Start connecting (execute() carries it on); True when under way or connected."""
        if self._ph != _IDLE:
            if not reconfig:
                return True
            if self._ph == _OPEN:  # a polite end of the old connection
                self.close_reason = F.CLOSE_NORMAL
                try:
                    self._frame(F.OP_CLOSE, F.close_payload(F.CLOSE_NORMAL))
                except OSError:
                    pass
            self._finish()
        self.error = False
        self.error_code = 0
        self.error_msg = ""
        self.handler_error = None
        self.close_reason = 0
        self.http_status = 0
        self.protocol_selected = ""
        self.extensions = None
        self.can_compress = False
        self._pending = None
        self._closed_cb = False
        self._discard = False
        self.state = F.WS_STATUS_BUSY
        try:
            if reconfig or self._c is None:
                self._c = None
                self._configure()
            self._start()
        except F.ConnectError as e:
            self._error(e.status, e.msg, e.code)
            self._close_sock()
            return False
        except MemoryError:
            self._error(F.WS_STATUS_SOCK_NOMEM, "out of memory while connecting")
            self._close_sock()
            return False
        except Exception as e:  # check_protocol raising on an answer already there: as execute()
            self._failed(e)
            return not self.error
        return True

    def _start(self):
        c = self._c
        if not (0 < c.port < 65536):
            raise F.ConnectError(F.WS_STATUS_SOCK_CONN_INVAL, "port %r out of range" % (c.port,))
        self._key = F.make_key()
        try:
            self._req = F.request(c.host, c.port, c.uri, self._key, ", ".join(c.protocols),
                                  c.origin, c.ext, c.headers, bool(c.tls))
        except F.HandshakeError as e:
            raise F.ConnectError(e.status, e.msg)
        try:
            ai = socket.getaddrinfo(c.host, c.port, 0, socket.SOCK_STREAM)[0]
        except OSError as e:
            n = _errno(e)
            st = F.WS_STATUS_SOCK_NOT_FOUND if n in (-2, -5, 8, 7, 202) else F.WS_STATUS_SOCK_ERR_EAI
            raise F.ConnectError(st, "cannot resolve %r: %r" % (c.host, e), n)
        try:
            s = socket.socket(ai[0], ai[1], ai[2])
        except OSError as e:
            raise F.ConnectError(F.WS_STATUS_SOCK_ERR_CREATE, "socket: %r" % (e,), _errno(e))
        self._raw = self._s = s
        try:
            s.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY: frames go out as written
        except (OSError, AttributeError):
            pass
        s.setblocking(False)
        try:
            s.connect(ai[-1])
        except OSError as e:
            if _errno(e) not in _EAGAIN:
                raise _conn_fail(e)
        if self._rx is None:
            self._rx = bytearray(RX_SIZE)
            self._rxv = memoryview(self._rx)
        self._rs = self._re = 0
        self._poll = select.poll()
        self._poll.register(s, _POLLOUT)
        self._ph = _TCP
        self._t0 = ticks_ms()
        self._progress()

    def _timed_out(self, secs):
        return ticks_diff(ticks_ms(), self._t0) >= secs * 1000

    def _progress(self):
        c = self._c
        if self._ph == _TCP:
            ev = self._poll.poll(0)
            if not ev:
                if self._timed_out(c.connect_response_timeout):
                    raise F.ConnectError(F.WS_STATUS_SOCK_CONN_TIMEDOUT, "TCP connect to %s:%d timed out"
                                % (c.host, c.port), 110)
                return
            if ev[0][1] & _POLLERR:
                raise _conn_fail(self._sock_error())
            self._poll.modify(self._raw, 1)  # POLLIN from now on
            if self._ctx:
                try:
                    self._s = self._ctx.wrap_socket(self._raw, server_hostname=c.host,
                                                    do_handshake_on_connect=False)
                except Exception as e:
                    raise _tls_error(e, c)
                self._ph = _REQ if _MP else _TLS
            else:
                self._ph = _REQ
            self._sent = 0
        if self._ph == _TLS:  # CPython: the TLS handshake, non-blocking
            try:
                self._s.do_handshake()
            except _AGAIN:
                if self._timed_out(c.connect_response_timeout):
                    raise F.ConnectError(F.WS_STATUS_TLS_HANDSHAKE_FAIL, "TLS handshake timed out", 110)
                return
            except (OSError, ValueError, MemoryError) as e:
                raise _tls_error(e, c)
            self._ph = _REQ
        if self._ph == _REQ:  # on MicroPython with TLS the first write drives the handshake
            try:
                while self._sent < len(self._req):
                    k = self._write(memoryview(self._req)[self._sent:])
                    if k is None:
                        if self._timed_out(c.connect_response_timeout):
                            if self._ctx:
                                raise F.ConnectError(F.WS_STATUS_TLS_HANDSHAKE_FAIL,
                                            "TLS handshake timed out", 110)
                            raise F.ConnectError(F.WS_STATUS_CONNECT_REQ_SEND_ERROR,
                                        "sending the request timed out", 110)
                        return
                    self._sent += k
            except F.ConnectError:
                raise
            except (OSError, ValueError, MemoryError) as e:
                if self._ctx and _MP:
                    raise _tls_error(e, c)
                if isinstance(e, MemoryError):
                    raise
                raise F.ConnectError(F.WS_STATUS_CONNECT_REQ_SEND_ERROR, "sending the request: %r" % (e,),
                            _errno(e))
            self._ph = _RESP
            self._t0 = ticks_ms()
        if self._ph == _RESP:
            self._response()

    def _sock_error(self):
        s = self._raw
        if hasattr(s, "getsockopt"):
            n = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return OSError(n, "connect failed")
        try:
            s.send(b"\0")
        except OSError as e:
            return e
        return OSError(0, "connect failed")

    def _response(self):
        c = self._c
        rx = self._rx
        eof = False
        while self._re < len(rx):
            n = self._read(memoryview(rx)[self._re:])
            if n is None:
                break
            if n == 0:
                eof = True
                break
            self._re += n
        end = bytes(memoryview(rx)[:self._re]).find(b"\r\n\r\n")
        if end < 0:
            if eof:
                raise F.ConnectError(F.WS_STATUS_SOCK_CONN_LOST, "connection closed before the "
                                     "handshake answer was complete")
            if self._re == len(rx):
                raise F.ConnectError(F.WS_STATUS_CONNECT_RES_PARSE_ERROR, "handshake answer "
                                     "head over %d bytes" % len(rx))
            if self._timed_out(c.connect_response_timeout):
                raise F.ConnectError(F.WS_STATUS_CONNECT_RES_TIMEDOUT, "no handshake answer "
                                     "within %ss" % c.connect_response_timeout)
            return
        try:
            status, _, hdrs = F.parse_response(memoryview(rx)[:end])
            self.http_status = status
            proto = F.check_response(status, hdrs, self._key, c.protocols)
            cfg = None
            ext = hdrs.get("sec-websocket-extensions", "")
            if c.ext:
                from microcot import wspmd

                cfg = wspmd.accept(ext, c.pmd_opts)
            elif ext:
                raise F.HandshakeError(F.WS_STATUS_CONNECT_RES_INVALID_EXTENSION,
                                       "server answered extensions %r, none offered" % ext, 101)
        except F.HandshakeError as e:
            raise F.ConnectError(e.status, e.msg, e.http)
        self.protocol_selected = proto
        if not self._user(self.check_protocol, proto):
            raise F.ConnectError(F.WS_STATUS_CONNECT_RES_INVALID, "check_protocol refused subprotocol %r"
                        % proto, 101)
        self.extensions = cfg
        self._reader = F.Reader(c.max_recv_frame_size, c.max_recv_msg_size, cfg is not None)
        self._infl = self._defl = None
        if cfg:
            from microcot import wspmd

            self._infl = wspmd.Inflater(cfg["sbits"], not cfg["snct"])
            self._defl = wspmd.Deflater(cfg["cbits"], not cfg["cnct"])
            self.can_compress = self._defl.ok
        self._rs = end + 4
        self._ph = _OPEN
        self.state = F.WS_STATUS_SUCCESS
        self.connected = True
        self._last_rx = ticks_ms()
        self._ping_at = None

    # --- raw I/O ---------------------------------------------------------------------------------

    def _read(self, mv):
        """n > 0 bytes, 0 at EOF, None when nothing is available now."""
        try:
            if _MP:
                return self._s.readinto(mv)
            return self._s.recv_into(mv)
        except Exception as e:
            return _read_error(e)

    def _write(self, mv):
        try:
            if _MP:
                return self._s.write(mv)
            return self._s.send(mv)
        except _AGAIN:
            return None
        except OSError as e:
            if _errno(e) in _EAGAIN:
                return None
            raise

    def _write_all(self, mv, i=-1):
        """Write all of mv, i bytes of which are written already (-1: none tried yet)."""
        if i < 0:
            i = self._write(mv)
        n = len(mv)
        if i == n:  # the usual case: the socket took it all
            return
        i = i or 0
        t0 = ticks_ms()
        while i < n:
            k = self._write(mv[i:])
            if k is None:
                left = self._c.send_timeout * 1000 - ticks_diff(ticks_ms(), t0)
                if left <= 0:
                    raise OSError(110, "send timed out")
                self._poll.modify(self._raw, _POLLOUT)
                self._poll.poll(left if left < 50 else 50)
                self._poll.modify(self._raw, 1)
                continue
            i += k

    def _frame(self, op, payload, fin=True, rsv1=False):
        """Write one frame, masked with a fresh key, through the send buffer of at most
        TX_CHUNK + 14 bytes: a longer payload goes out in chunks of TX_CHUNK."""
        n = len(payload)
        c = n if n < TX_CHUNK else TX_CHUNK
        if len(self._tx) < c + 14:
            self._tx = bytearray(c + 14)
            self._txs = None
        tx = self._tx
        k = self._ki
        if k >= len(self._keys):  # masking keys come KEYS at a time: one urandom call
            self._keys = urandom(4 * KEYS)
            k = 0
        self._ki = k + 4
        key = self._keys[k:k + 4]
        _, h = F.header(op, n, fin, rsv1, key, tx)
        i = 0
        while True:
            tx[h:h + c] = payload[i:i + c]
            F.mask(tx, h, h + c, key)  # i is a multiple of 4 here: the key stays in phase
            self._write_all(memoryview(tx)[:h + c])
            i += c
            if i >= n:
                return
            h = 0
            c = n - i if n - i < TX_CHUNK else TX_CHUNK

    def _small(self, op, data, n, rsv1):
        """_frame() for a whole message of at most TX_CHUNK bytes in one frame: the key copied
        into a kept 4-byte buffer, the payload straight into the send buffer."""
        tx = self._tx
        if len(tx) < n + 14:
            tx = self._tx = bytearray(n + 14)
            self._txs = None
        k = self._ki
        if k >= len(self._keys):
            self._keys = urandom(4 * KEYS)
            k = 0
        self._ki = k + 4
        keys = self._keys
        kb = self._kb
        kb[0] = keys[k]
        kb[1] = keys[k + 1]
        kb[2] = keys[k + 2]
        kb[3] = keys[k + 3]
        if n < 126:  # put_header()'s case inline: a call frame less
            tx[0] = 0xC0 | op if rsv1 else 0x80 | op
            tx[1] = 0x80 | n
            tx[2:6] = kb
            h = 6
        else:
            h = F.put_header(tx, op, n, True, rsv1, kb)
        tx[h:h + n] = data
        F.mask(tx, h, h + n, kb)
        v = self._txs  # the last frame's view of the send buffer, reused for the same length
        if v is None or len(v) != h + n:
            v = self._txs = memoryview(tx)[:h + n]
        w = self._write(v)
        if w != h + n:
            self._write_all(v, w or 0)

    # --- sending ---------------------------------------------------------------------------------

    def send_message(self, data, text=True, compress=False):
        """Send one message, fragmented into frames of max_send_frame_size; True when sent.
        compress=True compresses where the connection can (can_compress); otherwise the message
        goes uncompressed and sent_compressed tells so."""
        self.sent_compressed = False
        if self._ph != _OPEN:
            return False
        if isinstance(data, str):
            data = data.encode()
        elif text and not F.valid_utf8(data):
            raise ValueError("text message is not valid UTF-8")
        comp = False
        if compress and self._defl is not None and self._defl.ok:
            data = self._defl.deflate(data)
            comp = True
        n = len(data)
        fs = self._c.max_send_frame_size or n or 1
        op = F.OP_TEXT if text else F.OP_BINARY
        if n <= fs and n <= TX_CHUNK:  # one frame through the send buffer, no slices
            try:
                self._small(op, data, n, comp)
            except OSError as e:
                self._lost(e)
                return False
            self.sent_compressed = comp
            return True
        mv = memoryview(data)
        i = 0
        try:
            while True:
                k = n - i if n - i <= fs else fs
                fin = i + k >= n
                self._frame(op if i == 0 else F.OP_CONT, mv[i:i + k], fin, comp and i == 0)
                i += k
                if fin:
                    break
        except OSError as e:
            self._lost(e)
            return False
        self.sent_compressed = comp
        return True

    # --- closing ---------------------------------------------------------------------------------

    def disconnect(self, code=F.CLOSE_NORMAL, reason=""):
        """Start the close handshake (execute() completes it); while connecting, drop at once."""
        if self._ph == _OPEN:
            p = F.close_payload(code, reason)
            self.connected = False
            self.state = F.WS_STATUS_FINALIZE_DISCONNECT
            self.close_reason = code
            try:
                self._frame(F.OP_CLOSE, p)
            except OSError:
                self._finish()
                return True
            self._ph = _CLOSING
            self._t0 = ticks_ms()
            self._discard = False
        elif self._ph != _IDLE and self._ph < _OPEN:
            self._close_sock()
            self.state = F.WS_STATUS_SOCK_NO_CONN
        return True

    def _error(self, status, msg, code=0):
        self.error = True
        self.state = status
        self.error_msg = msg
        self.error_code = code
        self.connected = False

    def _fail(self, code, status, msg):
        """Fail the connection: send Close(code), then wait (discarding) for the server's end."""
        self._error(status, msg, code)
        self.close_reason = code
        if self._ph == _OPEN:
            try:
                self._frame(F.OP_CLOSE, F.close_payload(code))
            except OSError:
                self._finish()
                return
            self._ph = _CLOSING
            self._t0 = ticks_ms()
            self._discard = True
        else:
            self._finish()

    def _lost(self, e=None):
        if self._ph in (_CLOSING, _DRAIN):  # the server ended the close handshake
            self._finish()
            return
        st = F.WS_STATUS_SOCK_CONN_LOST
        if e is not None and ssl is not None and not _MP and isinstance(e, ssl.SSLError):
            st = F.WS_STATUS_SOCK_ERR_TLS
        self._error(st, "connection lost" + (": %r" % (e,) if e is not None else ""),
                    _errno(e) if e is not None else 0)
        if not self._closed_cb:
            self.close_reason = F.CLOSE_ABNORMAL
        self._finish()

    def _close_sock(self):
        s = self._s
        self._s = None
        if s is not None:
            try:
                s.close()
            except Exception:
                pass
        if self._raw is not None and self._raw is not s:
            try:
                self._raw.close()
            except Exception:
                pass
        self._raw = None
        self._poll = None
        self._ph = _IDLE
        self.connected = False

    def _finish(self):
        was = self._ph >= _OPEN
        self._close_sock()
        if not self.error:
            self.state = F.WS_STATUS_SOCK_NO_CONN
        if was and not self._closed_cb:
            self._closed_cb = True
            try:
                self._user(self.on_close, self.close_reason or F.CLOSE_ABNORMAL, b"")
            except Exception as e:  # the connection has ended already: only recorded
                self._uexc = None
                self.handler_error = e
                self.error_msg = "on_close raised %r" % (e,)

    # --- the cycle -------------------------------------------------------------------------------

    def execute(self, wait_ms=0):
        """One cycle: connect progress, keep-alive, receive and dispatch. Waits up to wait_ms
        for data when there is nothing to do (0: never waits). Never raises: an exception
        raised by on_message, on_close or check_protocol fails the connection (close 1011,
        WS_STATUS_INTERNAL_ERROR, `handler_error`), see the module docstring."""
        if self._ph == _IDLE:
            return
        try:
            if self._ph < _OPEN:
                self._progress()
                if self._ph < _OPEN:
                    if wait_ms and self._poll:
                        self._poll.poll(wait_ms)
                    return
            if self._pending is not None and self._deliver(*self._pending):
                return
            waited = False
            if wait_ms and self._s is self._raw and self._rs >= self._re:
                # plain TCP, nothing buffered here: the kernel knows whether data waits, and
                # a read that finds nothing costs as much as this wait
                self._wait(wait_ms)
                waited = True
            got = self._receive()
            if self._ph >= _OPEN:
                self._timers()
            if not (got or waited) and wait_ms and self._ph != _IDLE and self._pending is None \
                    and self._wait(wait_ms):
                self._receive()  # what came while waiting is taken now, not a call later
        except Exception as e:
            self._failed(e)

    def _wait(self, ms):
        """Wait up to ms for the socket to be readable; True when it is. Through ipoll()
        where there is one (MicroPython): it reuses its result, poll() allocates a list."""
        p = self._poll
        if _MP:
            try:
                for _ in p.ipoll(ms):
                    return True
                return False
            except AttributeError:  # a poll object without ipoll()
                pass
        return bool(p.poll(ms))

    def _failed(self, e):
        """The documented state for an exception out of a cycle."""
        if e is self._uexc:
            self._uexc = None
            self.handler_error = e
            msg = "a handler raised %r" % (e,)
            if self._ph == _OPEN:
                self._fail(F.CLOSE_INTERNAL_ERROR, F.WS_STATUS_INTERNAL_ERROR, msg)
            else:
                self._error(F.WS_STATUS_INTERNAL_ERROR, msg, F.CLOSE_INTERNAL_ERROR)
                if self._ph < _OPEN:
                    self._close_sock()
        elif isinstance(e, F.ConnectError):
            self._error(e.status, e.msg, e.code)
            self._close_sock()
        elif isinstance(e, F.ProtocolError):
            self._fail(e.code, e.status, e.msg)
        elif isinstance(e, MemoryError):
            self._fail(F.CLOSE_TOO_BIG, F.WS_STATUS_NOMEMORY, "out of memory for a message")
        elif isinstance(e, OSError):
            self._lost(e)
        else:  # a bug here, not the server's doing: the loop goes on all the same
            self._fail(F.CLOSE_INTERNAL_ERROR, F.WS_STATUS_INTERNAL_ERROR,
                       "internal error: %r" % (e,))

    def _user(self, fn, *args):
        """Call a handler; its exception is marked so that _failed() tells it from ours."""
        try:
            return fn(*args)
        except Exception as e:
            self._uexc = e
            raise

    def _deliver(self, content, ctype):
        """Hand a message to on_message; True when it asked to get it again."""
        self._pending = None
        try:  # not through _user(): no bound method and argument tuple per message
            r = self.on_message(content, ctype)
        except Exception as e:
            self._uexc = e
            raise
        if r == S_FALSE and r is not True:
            self._pending = (content, ctype)
            self._last_rx = ticks_ms()
            return True
        return False

    def _receive(self):
        """Read and dispatch until the socket has nothing more, a handler asks to stop, or a
        message was delivered with nothing left in the receive buffer (the next execute()
        reads on: no read that would find nothing after each message)."""
        rd = self._reader
        rxv = self._rxv
        budget = 4 * RX_SIZE + self._c.max_recv_frame_size
        got = False
        while budget > 0 and self._ph >= _OPEN:
            if self._rs < self._re:
                if self._discard:
                    self._rs = self._re
                    continue
                self._rs = rd.take(rxv, self._rs, self._re)
                ev = rd.ev
                if ev:
                    if self._event(ev):
                        return True
                    if ev == F.EV_MSG and self._rs >= self._re:
                        return True
                continue
            t = None if self._discard else rd.target()
            if t is not None and len(t) < 512:
                t = None
            try:  # _read() inline: a heap-allocated call frame less per read
                if _MP:
                    n = self._s.readinto(rxv if t is None else t)
                else:
                    n = self._s.recv_into(rxv if t is None else t)
            except Exception as e:
                n = _read_error(e)
            if n is None:
                break
            if n == 0:
                self._lost()
                return got
            got = True
            budget -= n
            self._last_rx = ticks_ms()
            self._ping_at = None
            if t is None:
                self._rs = 0
                self._re = n
            else:
                ev = rd.put(n)
                if ev:
                    if self._event(ev):
                        return True
                    if ev == F.EV_MSG:
                        return True
        return got

    def _content(self, n):
        """A memoryview of the first n bytes of the message buffer, the last one reused for a
        message of the same size (no allocation); the reader drops it when it replaces its
        buffer, so it never holds an old one."""
        rd = self._reader
        v = rd.view
        if v is None or len(v) != n:
            v = rd.view = memoryview(rd.buf)[:n]
        return v

    def _event(self, kind):
        """Act on a reader event (its kind, the fields on the reader); True to stop reading
        for this cycle."""
        rd = self._reader
        if kind == F.EV_MSG:
            op = rd.ev_op
            content = self._content(rd.ev_n)
            if rd.ev_comp:
                content = self._infl.inflate(content, self._c.max_recv_msg_size)
                if op == F.OP_TEXT and not F.valid_utf8(content):
                    raise F.ProtocolError(F.CLOSE_INVALID_DATA, F.WS_STATUS_PROTOCOL_ERROR,
                                          "text message is not valid UTF-8")
            if self._ph != _OPEN:
                return False  # closing: late data is dropped
            # _deliver() inline: a heap-allocated call frame less per message
            ctype = F.WS_CONTENT_TEXT if op == F.OP_TEXT else F.WS_CONTENT_BINARY
            self._pending = None
            try:
                r = self.on_message(content, ctype)
            except Exception as e:
                self._uexc = e
                raise
            if r == S_FALSE and r is not True:
                self._pending = (content, ctype)
                self._last_rx = ticks_ms()
                return True
            return False
        if kind == F.EV_PING:
            if self._ph == _OPEN:
                self._frame(F.OP_PONG, rd.ev_payload)
            return False
        if kind == F.EV_PONG:
            return False
        # close
        code, reason = rd.ev_code, rd.ev_reason
        if self._ph == _OPEN:
            self.connected = False
            self.state = F.WS_STATUS_FINALIZE_DISCONNECT
            try:
                self._frame(F.OP_CLOSE, F.close_payload(None if code == F.CLOSE_NO_STATUS else code))
            except OSError:
                pass
        self._ph = _DRAIN
        self._t0 = ticks_ms()
        if not self.error:
            self.close_reason = code
        if not self._closed_cb:
            self._closed_cb = True
            self._user(self.on_close, code, reason)
        return True

    def _timers(self):
        c = self._c
        now = ticks_ms()
        if self._ph >= _CLOSING:  # _CLOSING or _DRAIN (not `in` a tuple: built on each call)
            # _CLOSING: our Close is out, the server's awaited for close_timeout. _DRAIN: both
            # are through; the server should now close TCP, but one behind TLS may wait for us
            # (it cannot half-close), so we close after DRAIN_MS (RFC 6455 7.1.1 allows it).
            limit = c.close_timeout * 1000
            if self._ph == _DRAIN and limit > DRAIN_MS:
                limit = DRAIN_MS
            if ticks_diff(now, self._t0) >= limit:
                self._finish()
            return
        if not (c.keep_alive and c.keep_alive_interval) or self._pending is not None:
            return
        if self._ping_at is None:
            if ticks_diff(now, self._last_rx) >= c.keep_alive_interval * 1000:
                self._frame(F.OP_PING, b"microcot")
                self._ping_at = now
        elif ticks_diff(now, self._ping_at) >= c.keep_alive_close_timeout * 1000:
            self._fail(F.CLOSE_INTERNAL_ERROR, F.WS_STATUS_KEEP_ALIVE_TIMEDOUT,
                       "no pong within %ss" % c.keep_alive_close_timeout)
            self._finish()
