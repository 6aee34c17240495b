# A scripted server behind a fake socket module for microcot.ws (both runtimes): the client's
# driver code runs unchanged while the test decides every byte it receives.
from microcot import ws as W
from microcot import wsframe as F


class Sock:
    """Answers the opening handshake, then hands out `chunks` (after the client has sent
    something beyond its request when `after_client` is set), then EOF when `eof`."""

    def __init__(self, chunks, after_client=False, eof=True, answer=None):
        self.out = bytearray()
        self.chunks = list(chunks)
        self.after_client = after_client
        self.eof = eof
        self.answer = answer
        self.req = 0  # length of the request head, once it is complete
        self.pending = []  # the handshake answer, then the chunks once released
        self.at = 0  # bytes of pending[0] already handed out
        self.closed = False

    def setsockopt(self, *a):
        pass

    def setblocking(self, flag):
        pass

    def connect(self, addr):
        pass

    def close(self):
        self.closed = True

    def send(self, mv):
        if self.closed:
            raise OSError(32, "closed")
        self.out += bytes(mv)
        if not self.req:
            i = self.out.find(b"\r\n\r\n")
            if i >= 0:
                self.req = i + 4
                head = bytes(self.out[:i]).decode()
                key = [ln.split(":", 1)[1].strip() for ln in head.split("\r\n")
                       if ln.lower().startswith("sec-websocket-key:")][0]
                ans = self.answer or ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                                      % F.accept_key(key)).encode()
                self.pending = [ans]
        return len(mv)

    write = send

    def recv_into(self, mv):
        if self.closed:
            raise OSError(9, "closed")
        q = self.pending
        if not q:
            if self.req and (not self.after_client or len(self.out) > self.req) and self.chunks:
                self.pending = q = self.chunks
                self.chunks = []
            elif self.req and self.eof and not self.chunks:
                return 0
            else:
                raise OSError(11, "EAGAIN")
        c = q[0]
        i = self.at
        k = len(c) - i if len(c) - i < len(mv) else len(mv)
        mv[:k] = memoryview(c)[i:i + k]  # no copies of the rest: heaps are measured through this
        if i + k < len(c):
            self.at = i + k
        else:
            q.pop(0)
            self.at = 0
        return k

    readinto = recv_into


class _Poll:
    def register(self, s, ev=0):
        pass

    def modify(self, s, ev):
        pass

    def poll(self, timeout=-1):
        return [(None, 4)]  # writable: the TCP connect is through at once


class _SocketModule:
    SOCK_STREAM = 1
    SOL_SOCKET = 1
    SO_ERROR = 4

    def __init__(self, socks):
        self.socks = list(socks)

    def getaddrinfo(self, host, port, af=0, kind=0):
        return [(2, 1, 0, "", ("127.0.0.1", port))]

    def socket(self, *a):
        # one scripted socket per connection; the last one serves any further connection
        return self.socks.pop(0) if len(self.socks) > 1 else self.socks[0]


class _SelectModule:
    def poll(self):
        return _Poll()


class Patched:
    """with Patched(sock, ...): microcot.ws uses the fake sockets (one per connection) and poll."""

    def __init__(self, *socks):
        self.socks = socks

    def __enter__(self):
        self.saved = (W.socket, W.select)
        W.socket = _SocketModule(self.socks)
        W.select = _SelectModule()
        return self.socks[0]

    def __exit__(self, *exc):
        W.socket, W.select = self.saved
        return False


def frames(payloads, op=F.OP_TEXT):
    """Server frames (unmasked) of the payloads, one message each."""
    return [F.encode(op, p) for p in payloads]
