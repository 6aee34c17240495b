# A scripted network for the MQTT client's device tests (test_mqttclient.py,
# test_fuzz_mqttclient.py): it stands in for the `socket` and `select` modules that microcot.mqtt
# imported, on CPython and on MicroPython alike, so a "broker" is a list of byte chunks.
#
#   net = FakeNet(mqtt)                       # patches mqtt.socket and mqtt.select
#   conn = net.add(CONNACK_OK, b"...", EOF)   # the next connection: what the broker sends
#   ...client code...
#   conn.sent                                 # what the client wrote
#   net.restore()
#
# A read returns the next chunk (as much as fits), None while nothing is queued (would block),
# 0 for EOF (the broker closed). Every connect() takes the next connection added; with none left
# the connect is refused (OSError), as from a host where nobody listens.

EOF = None
CONNACK_OK = b"\x20\x02\x00\x00"


class FakeConn:
    def __init__(self, chunks):
        self.chunks = [bytes(c) if c is not None else None for c in chunks]
        self.sent = bytearray()
        self.closed = False

    def settimeout(self, t):
        pass

    def setblocking(self, flag):
        pass

    def connect(self, addr):
        pass

    def fileno(self):
        return -1

    def feed(self, *chunks):
        for c in chunks:
            self.chunks.append(bytes(c) if c is not None else None)

    def _read(self, buf):
        if self.closed:
            raise OSError(9, "closed")
        if not self.chunks:
            return None
        c = self.chunks[0]
        if c is None:
            return 0
        n = min(len(buf), len(c))
        buf[0:n] = c[0:n]
        if n == len(c):
            self.chunks.pop(0)
        else:
            self.chunks[0] = c[n:]
        return n

    readinto = _read
    recv_into = _read

    def write(self, b):
        if self.closed:
            raise OSError(9, "closed")
        self.sent += b
        return len(b)

    send = write

    def close(self):
        self.closed = True

    def packets(self):
        """The packets the client sent: [(first byte, body bytes)]."""
        from microcot.mqttpkt import Reader

        r = Reader(1 << 20)
        out = []
        data = bytes(self.sent)
        i = 0
        while i < len(data):
            mv = r.want()
            n = min(len(mv), len(data) - i)
            mv[0:n] = data[i:i + n]
            i += n
            p = r.got(n)
            if p is not None:
                out.append((p[0], bytes(p[1])))
        return out


class _Poll:
    def register(self, obj, mask=0):
        pass

    def unregister(self, obj):
        pass

    def modify(self, obj, mask):
        pass

    def poll(self, ms=-1):
        return []


class _Select:
    POLLIN = 1
    POLLOUT = 4

    def poll(self):
        return _Poll()


class FakeNet:
    SOCK_STREAM = 1

    def __init__(self, mod):
        self.mod = mod
        self.saved = (mod.socket, mod.select)
        self.conns = []  # added, not yet connected
        self.used = []  # connected, in order
        mod.socket = self
        mod.select = _Select()

    def add(self, *chunks):
        c = FakeConn(chunks)
        self.conns.append(c)
        return c

    def restore(self):
        self.mod.socket, self.mod.select = self.saved

    # the socket module's part that microcot.mqtt uses
    def getaddrinfo(self, host, port, af=0, kind=0):
        return [(2, 1, 0, "", ("192.0.2.1", port))]

    def socket(self, af=2, kind=1):
        if not self.conns:
            raise OSError(111, "connection refused (no scripted broker left)")
        c = self.conns.pop(0)
        self.used.append(c)
        return c
