# The agent's durable queue (setting "durable"; outq.make builds it): every item is on flash
# before put() returns, so a power cut loses nothing put() accepted. Same interface as
# outq.Queue; imported only in durable mode, so the RAM queue's heap stays as it was.
#
# One append-only file of records, one line each:
#     <crc32 of kind and payload: 8 hex><kind><payload>\n     kind " ": an item; "#": a mark
# A mark "T f1 f2 .." says: the items numbered below T (from 0, in file order) are consumed,
# except f1, f2 .. (sent, not yet acknowledged). put() writes one record in one write() and
# closes the file (littlefs commits a file on close; CPython also fsyncs); nothing but a chunk
# read ahead is kept in RAM.
#
# Sending: pop() hands the oldest waiting item out (sent=True: it is in flight until
# acknowledged; sent=False: consumed at once, a row dropped as bad). done(pending), called with
# the MQTT client's number of messages awaiting PUBACK, takes that many in-flight items as still
# unacknowledged and the older ones as acknowledged: a broker acknowledges QoS 1 in the order it
# received them (MQTT 3.1.1 section 4.6), and other messages in flight only make the count more
# careful. So an item leaves the file only after its PUBACK. Consumption reaches flash lazily:
# the file is removed once everything in it is consumed and nothing is in flight; it is rewritten
# (compacted: in-flight and waiting items only, through <path>.tmp and a rename) once its
# consumed head is larger than the rest; otherwise a mark is appended every COMMIT consumed
# items and by flush().
#
# After a power cut (a new Log on the same path): a record whose checksum fails or whose line is
# incomplete is dropped (counted in `torn`), never delivered; items in flight and items consumed
# after the last mark are delivered again (at least once: at most COMMIT + the client's in-flight
# window of duplicates); a file with consumed items is compacted once. An interrupted
# compaction is finished from its temporary file (complete before the original goes).
#
# Bound: at most `file_max` items wait (len()); when full, the oldest waiting item is dropped and
# counted in `dropped`, as in outq.Queue. The file holds at most about twice the waiting and
# in-flight items, plus a mark per COMMIT consumed ones.
# Wear: `writes` counts the file operations that change flash (appends, marks, removes,
# rewrites), `wbytes` the bytes written (bench/durable.py).
import os

from .store import _OsFs

try:
    from binascii import crc32
except ImportError:  # a port without binascii.crc32: store.py has it in software
    from .store import _crc32 as crc32

MAX_ITEM = 480  # bytes of one item, as outq.MAX_ITEM (outq imports this module; only make() back)
_CHUNK = 512  # bytes read at a time: > MAX_ITEM + 10, so a chunk holds a record
COMMIT = 16  # consumed items noted on flash at the latest: the duplicates a cut may cause
ITEM = b" "
MARK = b"#"


class _Os(_OsFs):
    """The filesystem as the log uses it (the store's, and sync); tests swap in one that cuts
    the power."""

    def sync(self, f):
        f.flush()
        fsync = getattr(os, "fsync", None)  # CPython; MicroPython's close() commits
        if fsync is not None and hasattr(f, "fileno"):
            fsync(f.fileno())


def record(kind, payload):
    """One record line (bytes)."""
    return b"%08x%s%s\n" % (crc32(payload, crc32(kind)), kind, payload)


def parse(line):
    """(kind, payload) of a record line without its line break, or None when it fails."""
    if len(line) < 9:
        return None
    kind = line[8:9]
    p = line[9:]
    if kind != ITEM and kind != MARK or b"%08x" % crc32(p, crc32(kind)) != line[:8]:
        return None
    return kind, p


def _mark(p):
    """(T, [f1, ..]) of a mark's payload, or None."""
    try:
        v = [int(x) for x in p.split(b" ")]
    except ValueError:
        return None
    if not v or min(v) < 0:
        return None
    return v[0], [x for x in v[1:] if x < v[0]]


class Log:
    durable = True

    def __init__(self, path, file_max, fs=None):
        if not path or file_max < 1:
            raise ValueError("queue log: needs a path and file_max >= 1")
        self.path = path
        self.file_max = file_max
        self.fs = fs or _Os()
        self.mem = 0
        self.dropped = 0
        self.torn = 0  # records found damaged at take-up (cut while written), not delivered
        self.writes = 0
        self.wbytes = 0
        self._reset()
        self._take_up()

    def _reset(self):
        self._n = 0  # items in the file
        self._t = 0  # items handed out or dropped: the number of the next to hand out
        self._off = 0  # where to read on for item _t
        self._size = 0
        self._fly = []  # (number, start, length) of items in flight, oldest first
        self._skip = 0  # items consumed since the last mark (not noted on flash)
        self._rd = []  # (payload, start, end) of the next items, read ahead

    def __len__(self):
        return self._n - self._t

    def in_file(self):
        return self._n - self._t

    def in_flight(self):
        return len(self._fly)

    def put(self, item):
        """Append an item (str) to the file; returns once it is on flash. When file_max items
        wait already, the oldest waiting one is dropped."""
        if not isinstance(item, str):
            raise TypeError("queue: items are str")
        if "\n" in item or "\r" in item:
            raise ValueError("queue: an item must be one line")
        b = item.encode()
        if len(b) > MAX_ITEM:
            raise ValueError("queue: item of %d bytes exceeds %d" % (len(b), MAX_ITEM))
        self._append(record(ITEM, b))
        self._n += 1
        if self._n - self._t > self.file_max:
            self.pop(False)
            self.dropped += 1

    def peek(self):
        """The oldest waiting item, or None."""
        if self._t >= self._n:
            return None
        if not self._rd:
            self._read_ahead()
        return self._rd[0][0].decode()

    def pop(self, sent=True):
        """Hand out the oldest waiting item (what peek() returned): sent, it stays in the file
        until done() finds it acknowledged; else it is consumed now."""
        if self._t >= self._n:
            return
        if not self._rd:
            self._read_ahead()
        e = self._rd.pop(0)
        self._off = e[2]
        if sent:
            self._fly.append((self._t, e[1], e[2] - e[1]))
            self._t += 1
        else:
            self._t += 1
            self._skip += 1
            self._commit(False)

    def done(self, pending):
        """The client has `pending` messages awaiting PUBACK: older in-flight items are
        acknowledged."""
        k = len(self._fly) - pending
        if k > 0:
            del self._fly[:k]
            self._skip += k
        if self._skip:
            self._commit(False)

    def flush(self):
        """Note all consumption on flash (before a restart): nothing acknowledged comes again."""
        if self._skip:
            self._commit(True)

    def clear(self):
        self._remove()

    # -- the file -------------------------------------------------------------------------------

    def _append(self, rec):
        f = self.fs.open(self.path, "ab")
        try:
            f.write(rec)
            self.fs.sync(f)
        finally:
            f.close()
        self._size += len(rec)
        self.writes += 1
        self.wbytes += len(rec)

    def _commit(self, force):
        if self._t >= self._n and not self._fly:
            self._remove()  # everything consumed
            return
        fly = 0
        for e in self._fly:
            fly += e[2]
        if self._off - fly > self._size - self._off + fly:  # consumed bytes over the rest
            self._compact()
        elif force or self._skip >= COMMIT:
            m = b"%d" % self._t
            for e in self._fly:
                m += b" %d" % e[0]
            self._append(record(MARK, m))
            self._skip = 0

    def _remove(self):
        if self._size:
            self.writes += 1
        self._reset()
        try:
            self.fs.remove(self.path)
        except OSError:
            pass

    def _records(self, off):
        """(kind or None, payload, start, end, line) of each complete line from byte `off` on
        (line without its line break); a run without a line break longer than a chunk comes
        as one damaged line. Close it when not read to the end (MicroPython does not)."""
        f = self.fs.open(self.path, "rb")
        try:
            while True:
                f.seek(off)
                b = f.read(_CHUNK)
                if not b:
                    return
                pos = 0
                while True:
                    nl = b.find(b"\n", pos)
                    if nl < 0:
                        break
                    line = b[pos:nl]
                    r = parse(line)
                    yield (r[0] if r else None), (r[1] if r else b""), off + pos, off + nl + 1, line
                    pos = nl + 1
                if not pos:
                    if len(b) < _CHUNK:
                        return  # an incomplete last line
                    pos = len(b)
                    yield None, b"", off, off + pos, b""
                off += pos
        finally:
            f.close()

    def _read_ahead(self):
        left = self._n - self._t
        rd = self._rd
        g = self._records(self._off)
        try:
            for r in g:
                if r[0] == ITEM:
                    rd.append((r[1], r[2], r[3]))
                    if len(rd) >= left or r[3] - self._off >= _CHUNK:
                        break
        finally:
            g.close()
        if not rd:
            raise OSError("queue log %s: no item at offset %d" % (self.path, self._off))

    def _compact(self):
        fly = [e[0] for e in self._fly]
        n, out, kept = self._rewrite(fly, self._t)
        self._rd = []
        # the in-flight items come first in the new file, the waiting ones after them
        self._fly = [(i, kept[i], kept[i + 1] - kept[i]) for i in range(len(kept) - 1)]
        self._t = len(self._fly)
        self._off = kept[-1]
        self._n = n
        self._size = out
        self._skip = 0

    def _rewrite(self, keep, t):
        """The file becomes its items numbered in keep or from t on, in order, without marks
        and damaged lines: (items, bytes, [starts of the kept items numbered below t, then
        where the others begin])."""
        tmp = self.path + ".tmp"
        fs = self.fs
        dst = fs.open(tmp, "wb")
        n = out = i = mid = 0
        kept = []
        g = self._records(0)
        try:
            for r in g:
                if r[0] != ITEM:
                    continue
                if i >= t or i in keep:
                    dst.write(r[4])
                    dst.write(b"\n")
                    if i < t:
                        kept.append(out)
                    out += len(r[4]) + 1
                    if i < t:
                        mid = out
                    n += 1
                i += 1
            fs.sync(dst)
        finally:
            g.close()
            dst.close()
        kept.append(mid)
        self.writes += 1
        self.wbytes += out
        self._replace(tmp)
        return n, out, kept

    def _replace(self, tmp):
        # tmp is complete: rename it over the file (atomic on littlefs and POSIX); FAT cannot,
        # so there the file goes first, and a cut in between leaves tmp for _take_up
        try:
            self.fs.rename(tmp, self.path)
        except OSError:
            self.fs.remove(self.path)
            self.fs.rename(tmp, self.path)

    def _take_up(self):
        # what an earlier boot left: an interrupted compaction first, then count the items,
        # find the last mark, drop damaged records, and compact away what was consumed
        tmp = self.path + ".tmp"
        fs = self.fs
        try:
            fs.open(self.path, "rb").close()
            have = True
        except OSError:
            have = False
        try:
            if have:
                fs.remove(tmp)  # incomplete, or left after its rename
            else:
                fs.rename(tmp, self.path)  # the original was removed: tmp is complete
                have = True
        except OSError:
            pass
        if not have:
            return
        n = end = 0
        t, fly = 0, []
        for r in self._records(0):
            if r[0] == ITEM:
                n += 1
            elif r[0] == MARK and _mark(r[1]) is not None:
                t, fly = _mark(r[1])
            else:
                self.torn += 1
            end = r[3]
        f = fs.open(self.path, "rb")
        try:
            f.seek(0, 2)
            size = f.tell()
        finally:
            f.close()
        if size > end:
            self.torn += 1  # a last line cut short
        t = min(t, n)
        if not n or t >= n and not fly:
            self._size = size
            self._remove()
            return
        self._size = size
        if t or size > end:
            n, size, _ = self._rewrite(fly, t)
        self._n = n
        self._size = size


def make(mem, folder, file_max, durable, Queue):
    """outq.make's part for a queue.log on flash or the setting "durable": the queue of the kind
    asked for, with the items the other kind left on flash moved over, oldest first. Queue:
    outq's RAM queue class (passed in: outq imports this module)."""

    txt = folder + "/queue.txt"
    log = folder + "/queue.log"
    if durable:
        q = Log(log, file_max)
        old = Queue(1, txt, 1 << 30)
    else:
        q = Queue(mem, txt, file_max)
        old = Log(log, 1 << 30)
    while len(old):
        q.put(old.peek())
        old.pop(False)
    q.flush()
    old.clear()
    return q
