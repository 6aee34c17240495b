# The agent's log lines in a bounded ring in RAM, for c8y_LogfileRequest (oplog.py).
#
# Every line the agent logs (agent.log) is kept with its time (Unix seconds) until the ring's
# size in bytes is used up; then the oldest lines go. A line is cut to MAX_LINE characters.
# Secrets (the device's password, the bootstrap password, the WLAN password: State.secret) are
# replaced by "***" before a line is kept, so an uploaded log never holds one.
#
# The lines live in ONE bytearray of `size` bytes, allocated once: records of 4 bytes time,
# 2 bytes length and the UTF-8 text, oldest first; a line that does not fit moves the newer
# records down over the oldest. Kept as Python strings instead (one tuple and one str per line),
# 2,048 characters took 5,760 B in many small pieces, and that fragmentation left the Pico W
# model's mbedTLS without its TLS buffers (ENOMEM with 87 KB free, measured).
from .state import now

MAX_LINE = 160
MAX_SECRETS = 8
_HEAD = 6  # time (4 bytes, big-endian), length (2 bytes)


class Ring:
    def __init__(self, size=2048):
        self.size = size
        self.buf = bytearray(size)
        self.used = 0  # bytes of records
        self.count = 0  # records
        self._secrets = []
        self.dropped = 0  # lines pushed out since the start

    def mask(self, secret):
        secret = str(secret)
        if len(secret) >= 4 and secret not in self._secrets:
            if len(self._secrets) >= MAX_SECRETS:
                self._secrets.pop(0)
            self._secrets.append(secret)

    def clean(self, text):
        """text with every registered secret replaced by "***" (also applied when lines are
        read: a secret registered after a line was kept is masked all the same)."""
        for sec in self._secrets:
            if sec in text:
                text = text.replace(sec, "***")
        return text

    def add(self, text, t=None):
        text = self.clean(str(text))
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE - 3] + "..."
        b = text.encode()
        need = _HEAD + len(b)
        if need > self.size:
            return
        buf = self.buf
        mv = memoryview(buf)
        if self.used + need > self.size:
            k = 0
            while self.used - k + need > self.size:
                k += _HEAD + (buf[k + 4] << 8 | buf[k + 5])
                self.count -= 1
                self.dropped += 1
            mv[0:self.used - k] = mv[k:self.used]
            self.used -= k
        t = (now() if t is None else t) & 0xFFFFFFFF
        i = self.used
        buf[i] = t >> 24
        buf[i + 1] = t >> 16 & 255
        buf[i + 2] = t >> 8 & 255
        buf[i + 3] = t & 255
        buf[i + 4] = len(b) >> 8
        buf[i + 5] = len(b) & 255
        mv[i + _HEAD:i + need] = b
        self.used += need
        self.count += 1

    def __len__(self):
        return self.count

    def lines(self):
        """(Unix seconds, text) of every line kept, oldest first (a new list)."""
        out = []
        buf = self.buf
        i = 0
        while i < self.used:
            n = buf[i + 4] << 8 | buf[i + 5]
            t = buf[i] << 24 | buf[i + 1] << 16 | buf[i + 2] << 8 | buf[i + 3]
            out.append((t, str(buf[i + _HEAD:i + _HEAD + n], "utf-8")))
            i += _HEAD + n
        return out
