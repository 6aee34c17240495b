# The agent's offline queue and its reconnect pacing (agent.py), pure logic plus a flash file.
#
# Queue: what the device wants to send (SmartREST rows as str, one line each), oldest first.
#   put() appends to a list in memory (at most `mem` items). When that list is full and a file is
#   configured, the whole list is appended to the file (`spill`); the file holds the older items,
#   memory the newer ones, so the order is always: file items, then memory items. With the file
#   full too (at most `file_max` items), the oldest items are dropped to make room, and counted in
#   `dropped` (the agent reports that number as an event and resets it). Without a file, the
#   oldest item in memory is dropped.
#   peek()/pop() take from the front: the file first (read in chunks at a byte offset, never the
#   whole file at once), then memory. A drained file is removed; a file whose consumed head is
#   larger than its live part is rewritten (compacted), so it stays within about twice its bound.
#   Items left in the file survive a reboot: a new Queue on the same path takes them up again
#   (at least once: items taken from the file but not yet compacted away are sent again after a
#   reboot). flush() moves memory to the file, e.g. before a restart. A line torn by a power cut
#   while spilling is cut off when the file is taken up again.
#   An item is a str without a line break, at most MAX_ITEM bytes as UTF-8.
#   pop(sent) and done(pending) are the durable queue's interface (outlog.Log, the setting
#   "durable"); here `sent` is ignored and done() does nothing. make() builds the agent's queue.
#
# Backoff: exponential back-off with "equal jitter": the n-th delay is drawn uniformly from
#   [d/2, d] with d = min(cap, base * 2**n), from os.urandom (hal.random_bytes); reset() after a
#   connection that worked.
import os

from . import hal

MAX_ITEM = 480  # bytes of one queued row
_CHUNK = 512  # bytes read from the file at a time; > MAX_ITEM + 1, so a chunk holds a line


class Queue:
    def __init__(self, mem=32, path=None, file_max=0):
        if mem < 1:
            raise ValueError("queue: mem must be at least 1")
        self.mem = mem
        self.path = path if path and file_max > 0 else None
        self.file_max = file_max if self.path else 0
        self.dropped = 0
        self._m = []  # newest items
        self._fn = 0  # items in the file not yet taken
        self._off = 0  # byte offset of the first of them
        self._size = 0  # bytes in the file
        self._rd = []  # lines (bytes) read ahead from _off
        if self.path:
            self._take_up()

    def __len__(self):
        return self._fn + len(self._m)

    def in_file(self):
        return self._fn

    def put(self, item):
        """Append an item (str); drops the oldest when everything is full."""
        if not isinstance(item, str):
            raise TypeError("queue: items are str")
        if "\n" in item or "\r" in item:
            raise ValueError("queue: an item must be one line")
        if len(item.encode()) > MAX_ITEM:
            raise ValueError("queue: item of %d bytes exceeds %d" % (len(item.encode()), MAX_ITEM))
        if len(self._m) >= self.mem:
            if self.file_max:
                self._spill()
            else:
                self._m.pop(0)
                self.dropped += 1
        self._m.append(item)

    def peek(self):
        """The oldest item, or None when empty."""
        if self._fn:
            if not self._rd:
                self._read_ahead()
            return self._rd[0].decode()
        return self._m[0] if self._m else None

    def pop(self, sent=True):
        """Remove the oldest item (what peek() returned)."""
        if self._fn:
            if not self._rd:
                self._read_ahead()
            line = self._rd.pop(0)
            self._off += len(line) + 1
            self._fn -= 1
            if not self._fn:
                self._remove()
        elif self._m:
            self._m.pop(0)

    def flush(self):
        """Move the items in memory to the file (no-op without a file)."""
        if self.file_max and self._m:
            self._spill()

    def clear(self):
        self._m = []
        self._rd = []
        if self.path:
            self._remove()

    def done(self, pending):
        pass

    # -- the file -------------------------------------------------------------------------------

    def _spill(self):
        n = len(self._m)
        over = self._fn + n - self.file_max
        if over > 0:  # the oldest go: from the file first, then from memory
            k = min(over, self._fn)
            for _ in range(k):
                self.pop()
            self.dropped += k
            if over > k:
                del self._m[: over - k]
                self.dropped += over - k
        if self._fn and self._off > self._size - self._off:
            self._compact()
        elif not self._fn:
            self._remove()
        if self._m:
            with open(self.path, "ab") as f:  # row by row: no buffer of them all on the heap
                for item in self._m:
                    b = item.encode()
                    f.write(b)
                    f.write(b"\n")
                    self._size += len(b) + 1
            self._fn += len(self._m)
        self._m = []

    def _read_ahead(self):
        with open(self.path, "rb") as f:
            f.seek(self._off)
            buf = f.read(_CHUNK)
        end = buf.rfind(b"\n")
        if end < 0:
            raise OSError("queue file %s: no line at offset %d" % (self.path, self._off))
        self._rd = buf[:end].split(b"\n")[: self._fn]

    def _remove(self):
        self._fn = self._off = self._size = 0
        self._rd = []
        try:
            os.remove(self.path)
        except OSError:
            pass

    def _compact(self):
        self._rewrite(self._off, self._size)
        self._size -= self._off
        self._off = 0
        self._rd = []

    def _rewrite(self, start, end):
        # the file becomes its bytes [start, end), through a temporary file and a rename
        tmp = self.path + ".tmp"
        with open(self.path, "rb") as src:
            src.seek(start)
            with open(tmp, "wb") as dst:
                left = end - start
                while left > 0:
                    b = src.read(min(_CHUNK, left))
                    if not b:
                        break
                    dst.write(b)
                    left -= len(b)
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.rename(tmp, self.path)

    def _take_up(self):
        # count the complete lines of a file left from before; cut off a torn last line
        n = size = last = 0
        try:
            with open(self.path, "rb") as f:
                while True:
                    b = f.read(_CHUNK)
                    if not b:
                        break
                    n += b.count(b"\n")
                    i = b.rfind(b"\n")
                    if i >= 0:
                        last = size + i + 1
                    size += len(b)
        except OSError:
            return
        if not n:
            self._remove()
            return
        if last < size:
            self._rewrite(0, last)
        self._fn = n
        self._size = last


def make(mem, folder, file_max, durable=False):
    """The agent's queue in `folder`: a Queue spilling to queue.txt, or with durable a Log in
    queue.log (outlog.py, imported only then). Items the other kind left on flash (the setting
    changed) are moved over first, oldest first (outlog.make); a power cut while moving may send
    some twice."""
    folder = folder.rstrip("/")
    if not durable:
        try:
            os.stat(folder + "/queue.log")
        except OSError:  # the usual case: outlog's code stays off the heap
            return Queue(mem, folder + "/queue.txt", file_max)
    from .outlog import make

    return make(mem, folder, file_max, durable, Queue)


class Backoff:
    def __init__(self, base_ms=2000, cap_ms=300000):
        if base_ms < 1 or cap_ms < base_ms:
            raise ValueError("backoff: need 1 <= base <= cap")
        self.base = base_ms
        self.cap = cap_ms
        self.n = 0

    def ceiling(self):
        """d of the next delay (the delay lies in [d/2, d])."""
        d = self.base
        for _ in range(self.n):
            d *= 2
            if d >= self.cap:
                return self.cap
        return min(d, self.cap)

    def next(self):
        d = self.ceiling()
        if d < self.cap:
            self.n += 1
        half = d // 2
        return half + uniform(d - half + 1)

    def reset(self):
        self.n = 0


def uniform(n):
    """An unbiased random int in [0, n) from os.urandom (rejection sampling on 32 bits)."""
    if n <= 1:
        return 0
    limit = (1 << 32) - (1 << 32) % n
    while True:
        b = hal.random_bytes(4)
        v = (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]
        if v < limit:
            return v % n
