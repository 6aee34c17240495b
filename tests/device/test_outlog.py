# The durable queue (outlog.Log, the agent's setting "durable") on both runtimes: order, bounds,
# acknowledgement, taking a file up again, and power cuts. A cut is simulated with an in-memory
# filesystem that stops at a chosen step (an open for writing, a write, a remove, a rename): a
# write it stops in leaves a prefix of its bytes, as on FAT; littlefs would leave none. A seeded
# workload (puts, sends, PUBACKs, flushes) is cut at every step, and at every byte of a record's
# write; after each cut a new Log on the same files must deliver every row that put() accepted
# and that the broker had not acknowledged, in order, nothing torn, few duplicates.
import os
import sys

from dt import Rng, free, raises, rmtree, scratch_dir

from microcot import outlog
from microcot.outlog import COMMIT, Log


class PowerCut(Exception):
    pass


class _File:
    def __init__(self, fl, path):
        self.fl = fl
        self.path = path
        self.pos = 0

    def read(self, n=-1):
        d = self.fl.files[self.path]
        b = bytes(d[self.pos:] if n < 0 else d[self.pos:self.pos + n])
        self.pos += len(b)
        return b

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else len(self.fl.files[self.path]) + off
        return self.pos

    def tell(self):
        return self.pos

    def write(self, b):
        d = self.fl.files[self.path]
        if self.fl.step("write", len(b)):
            d.extend(b[:self.fl.torn_at(len(b))])
            raise PowerCut()
        d.extend(b)
        self.fl.wbytes += len(b)
        return len(b)

    def flush(self):
        pass

    def close(self):
        pass


class Flash:
    """In-memory files. Step number `cut` (counting from 0: opens for writing, writes, removes,
    renames) is where the power goes: it does nothing, or for a write the first `tear` bytes
    (negative: all but that many), and raises PowerCut; so does every step after it. fat: rename
    onto an existing file fails, as on FAT."""

    def __init__(self, cut=-1, tear=0, fat=False, record=False):
        self.files = {}
        self.cut = cut
        self.tear = tear
        self.fat = fat
        self.steps = 0
        self.kinds = [] if record else None  # (kind, bytes) of each step: the cuts to make
        self.wbytes = 0

    def power_on(self):
        self.cut = -1
        self.steps = 0

    def step(self, kind, n=0):
        if 0 <= self.cut <= self.steps:
            self.steps += 1
            return True
        self.steps += 1
        if self.kinds is not None:
            self.kinds.append((kind, n))
        return False

    def torn_at(self, n):
        return max(0, min(n, self.tear if self.tear >= 0 else n + self.tear))

    def open(self, path, mode):
        if mode == "rb":
            if path not in self.files:
                raise OSError(2)
        else:
            if self.step("open"):
                raise PowerCut()
            if mode == "wb" or path not in self.files:
                self.files[path] = bytearray()
        return _File(self, path)

    def remove(self, path):
        if path not in self.files:
            raise OSError(2)
        if self.step("remove"):
            raise PowerCut()
        del self.files[path]

    def rename(self, old, new):
        if old not in self.files or self.fat and new in self.files:
            raise OSError(2)
        if self.step("rename"):
            raise PowerCut()
        self.files[new] = self.files.pop(old)

    def sync(self, f):
        pass


P = "/q/queue.log"


def row(n):
    return "%d:" % n + "x" * (n * 7 % 41)


def num(item):
    return int(item.split(":")[0])


def drain(q):
    out = []
    while len(q):
        out.append(q.peek())
        q.pop()
    return out


def test_order_acknowledgement_and_steady_state_writes():
    fl = Flash()
    q = Log(P, 50, fl)
    assert len(q) == 0 and q.peek() is None
    for i in range(5):
        q.put(row(i))
    assert len(q) == 5 and fl.files[P].count(b"\n") == 5
    assert drain(q) == [row(i) for i in range(5)]
    assert q.in_flight() == 5 and P in fl.files  # sent, not acknowledged: still on flash
    q.done(2)  # three PUBACKs
    assert q.in_flight() == 2 and P in fl.files
    q.done(0)
    assert q.in_flight() == 0 and P not in fl.files  # all acknowledged: the file goes
    # a device measuring while connected: per row one append and one remove, nothing else
    w = q.writes
    for i in range(10):
        q.put(row(i))
        q.pop()
        q.done(1)
        q.done(0)
    assert q.writes - w == 20 and P not in fl.files


def test_rejects_bad_items_and_settings():
    fl = Flash()
    q = Log(P, 3, fl)
    raises(ValueError, q.put, "two\nlines")
    raises(ValueError, q.put, "cr\rhere")
    raises(ValueError, q.put, "x" * 481)
    raises(TypeError, q.put, b"bytes")
    raises(ValueError, Log, P, 0, fl)
    raises(ValueError, Log, "", 3, fl)
    q.put("\u00e4" * 240)  # 480 bytes as UTF-8: the limit counts bytes
    assert drain(q) == ["\u00e4" * 240]
    from microcot import settings

    assert settings.check({"durable": True, "queue": [16, 0]}).startswith("durable:")
    assert settings.check({"durable": True, "queue": [16, 1]}) is None
    assert settings.why("durable", "yes") is not None
    free("settings")


def test_bound_drops_oldest_and_the_file_stays_small():
    fl = Flash()
    q = Log(P, 4, fl)
    for i in range(10):
        q.put(row(i))
    assert len(q) == 4 and q.dropped == 6
    assert drain(q) == [row(i) for i in range(6, 10)]
    q.done(0)
    q.dropped = 0
    # a long outage: the file stays bounded (compacted), the newest survive
    for i in range(300):
        q.put("item-%03d" % i)
        assert len(fl.files[P]) <= 2 * 5 * len(outlog.record(outlog.ITEM, b"item-000")) + 200
    assert len(q) == 4 and q.dropped == 296
    # a power cut: the drops noted on flash (a mark every COMMIT) do not come back
    got = drain(Log(P, 4, fl))
    assert got[-4:] == ["item-%03d" % i for i in range(296, 300)] and len(got) <= 4 + COMMIT
    q.flush()  # noted: none
    assert drain(Log(P, 4, fl)) == ["item-%03d" % i for i in range(296, 300)]
    # with rows in flight during the outage they stay, however many are dropped after them
    q3 = Log(P, 3, Flash())
    for i in range(3):
        q3.put(row(i))
    q3.pop()
    q3.pop()
    for i in range(3, 200):
        q3.put(row(i))
    assert q3.in_flight() == 2 and len(q3) == 3
    assert len(q3.fs.files[P]) < 2000
    q3.done(0)
    assert drain(q3) == [row(i) for i in range(197, 200)]


def test_sent_but_unacknowledged_rows_come_again_after_a_cut():
    fl = Flash()
    q = Log(P, 50, fl)
    for i in range(6):
        q.put(row(i))
    for _ in range(4):
        q.pop()
    q.done(2)  # rows 0 and 1 acknowledged, 2 and 3 in flight
    q2 = Log(P, 50, fl)  # power cut: nothing was noted, all six come again (at least once)
    assert drain(q2) == [row(i) for i in range(6)]
    q.flush()  # a clean restart notes what was acknowledged: only 2 and 3 come again
    q3 = Log(P, 50, fl)
    assert drain(q3) == [row(i) for i in range(2, 6)]
    q3.done(0)
    assert P not in fl.files


def test_marks_bound_the_duplicates_and_the_file_is_compacted_at_boot():
    fl = Flash()
    q = Log(P, 500, fl)
    for i in range(100):
        q.put(row(i))
    for i in range(40):  # a backlog sent, acknowledged with 3 in flight
        q.pop()
        q.done(3)
    q2 = Log(P, 500, fl)
    got = drain(q2)
    assert got[-60:] == [row(i) for i in range(40, 100)]
    dup = len(got) - 60
    assert 3 <= dup <= COMMIT + 3, dup
    assert fl.files[P].count(b"#") == 0  # compacted: items only


def test_damaged_records_are_dropped_never_delivered():
    fl = Flash()
    q = Log(P, 50, fl)
    for i in range(4):
        q.put(row(i))
    d = fl.files[P]
    d[9] ^= 0x01  # a flipped bit in row 0 (FAT after a cut)
    fl.files[P] = d + b"0123abcd x-torn"  # and a record cut short
    q2 = Log(P, 50, fl)
    assert q2.torn == 2
    assert drain(q2) == [row(i) for i in range(1, 4)]
    q2.put(row(9))  # the next record starts on a line of its own
    assert drain(Log(P, 50, fl)) == [row(i) for i in range(1, 4)] + [row(9)]
    fl.files[P] = bytearray(b"garbage" * 200)  # no line break at all
    assert len(Log(P, 50, fl)) == 0 and P not in fl.files


def test_a_compaction_cut_short_is_finished_from_its_temporary_file():
    for fat in (False, True):
        fl = Flash(fat=fat)
        q = Log(P, 500, fl)
        for i in range(20):
            q.put(row(i))
        for i in range(12):
            q.pop()
        q.done(0)  # the consumed head is larger than the rest: compacted
        assert drain(Log(P, 500, fl)) == [row(i) for i in range(12, 20)]
        # the FAT way: the file removed, the rename not done yet
        fl.files[P + ".tmp"] = fl.files.pop(P)
        assert drain(Log(P, 500, fl)) == [row(i) for i in range(12, 20)]
        fl.files[P + ".tmp"] = bytearray(b"stale")  # a temporary file beside the log: ignored
        q = Log(P, 500, fl)
        assert P + ".tmp" not in fl.files and drain(q) == [row(i) for i in range(12, 20)]


def workload(q, steps, seen):
    """Seeded puts, sends (up to 4 in flight), PUBACKs and flushes; `seen` notes what happened
    (a cut ends it anywhere)."""
    rng = Rng(7)
    fly = seen["fly"]
    n = 0
    for i in range(steps):
        r = rng.below(20)
        # a backlog grows, is sent while rows come in, then drains
        put, send = (12, 15) if 3 * i < steps else (3, 9) if 4 * i < 3 * steps else (0, 8)
        if r < put:
            seen["trying"] = n
            q.put(row(n))
            seen["accepted"] = n + 1
            n += 1
        elif r < send:
            if len(q) and len(fly) < 4:
                fly.append(num(q.peek()))
                q.pop()
        elif r < 19:
            if fly:
                seen["acked"].append(fly.pop(0))
            q.done(len(fly))
        else:
            q.flush()
        if i == steps - 10:  # all sent and acknowledged: the file goes, a new one starts
            while len(q) or fly:
                while len(q) and len(fly) < 4:
                    fly.append(num(q.peek()))
                    q.pop()
                seen["acked"].append(fly.pop(0))
                q.done(len(fly))


def check_after_cut(fl, seen, where):
    acked = seen["acked"]
    q = Log(P, 1000, fl)
    got = drain(q)
    nums = [num(x) for x in got]
    for x in got:  # nothing torn: each item is a row exactly as put
        assert x == row(num(x)), (where, x)
    assert nums == sorted(nums) and len(set(nums)) == len(nums), (where, nums)
    lost = [i for i in range(seen["accepted"]) if i not in acked and i not in nums]
    assert not lost, (where, "lost", lost)
    assert all(i < seen["accepted"] or i == seen["trying"] for i in nums), (where, nums)
    dup = [i for i in nums if i in acked]
    assert len(dup) <= COMMIT + 4, (where, dup)
    assert q.torn <= 1, where
    q.done(0)
    assert P not in fl.files and P + ".tmp" not in fl.files, where
    return len(dup)


STEPS = 100
# every cut on CPython and the unix-port models; a microcontroller (the RP2040 firmware in its
# emulator runs this test over 100x slower) makes every STRIDE-th, from a seeded start
STRIDE = 1 if sys.platform in ("linux", "darwin", "win32") else 20


def run_cut(cut, tear, fat):
    fl = Flash(cut, tear, fat)
    seen = {"accepted": 0, "trying": -1, "acked": [], "fly": []}
    try:
        workload(Log(P, 1000, fl), STEPS, seen)
    except PowerCut:
        pass
    fl.power_on()
    return check_after_cut(fl, seen, (cut, tear, fat))


def test_a_power_cut_at_every_step_of_a_workload_loses_nothing_accepted():
    for fat in (False, True):
        dry = Flash(fat=fat, record=True)
        seen = {"accepted": 0, "trying": -1, "acked": [], "fly": []}
        workload(Log(P, 1000, dry), STEPS, seen)
        kinds = dry.kinds
        # the workload puts, sends, marks, compacts and removes
        assert seen["accepted"] > 25 and len(seen["acked"]) > 25
        assert ("rename", 0) in kinds and ("remove", 0) in kinds, kinds
        cuts = dups = 0
        for k in range(Rng(len(kinds)).below(STRIDE), len(kinds) + 1, STRIDE):
            tears = (0,)
            if k < len(kinds) and kinds[k][0] == "write":
                tears = (0, 1, 9, -1)  # nothing, the checksum cut, the kind, all but the end
            for tear in tears:
                dups += run_cut(k, tear, fat)
                cuts += 1
        assert cuts * STRIDE > 150, cuts
        print("durable queue: %d cuts (fat=%s), %d rows sent again in all" % (cuts, fat, dups))


def test_a_power_cut_at_every_byte_of_a_record():
    ref = Flash()
    q = Log(P, 100, ref)
    for i in range(3):
        q.put(row(i))
    size = len(outlog.record(outlog.ITEM, row(40).encode()))
    for tear in range(size):
        fl = Flash()
        q = Log(P, 100, fl)
        for i in range(3):
            q.put(row(i))
        fl.cut = fl.steps + 1  # the open goes through, the write stops after `tear` bytes
        fl.tear = tear
        raises(PowerCut, q.put, row(40))
        fl.power_on()
        assert drain(Log(P, 100, fl)) == [row(i) for i in range(3)], tear


def test_make_moves_rows_between_the_two_kinds():
    from microcot.outq import Queue, make

    d = scratch_dir("qmake")
    try:
        q = make(2, d, 50)  # RAM, spilling to queue.txt
        for i in range(5):
            q.put(row(i))
        q.flush()
        assert q.in_file() == 5
        q = make(2, d + "/", 50, True)  # the setting turned on: the rows move into the log
        assert isinstance(q, Log) and drain(q) == [row(i) for i in range(5)]
        q.done(0)
        q.put(row(5))
        q.put(row(6))
        q = make(2, d, 50, False)  # and off again: the log's rows move back
        assert isinstance(q, Queue) and drain(q) == [row(5), row(6)]
        assert sorted(os.listdir(d)) == []
    finally:
        rmtree(d)


def test_on_the_real_filesystem():
    d = scratch_dir("qlog")
    try:
        p = d + "/queue.log"
        q = Log(p, 20)
        for i in range(25):
            q.put(row(i))
        assert q.dropped == 5
        q.pop()
        q.pop()
        q.done(1)
        q.flush()
        q = Log(p, 20)  # a restart: row 5 was acknowledged, row 6 was in flight
        assert drain(q) == [row(i) for i in range(6, 25)]
        q.done(0)
        assert os.listdir(d) == []
    finally:
        rmtree(d)


class _Client:
    """The MQTT client as link.flush uses it: publish() takes a message, pending() counts the
    ones awaiting PUBACK."""

    max_inflight = 8

    def __init__(self):
        self.out = []

    def publish(self, topic, msg, qos=0):
        self.out.append(msg)
        return len(self.out)

    def pending(self):
        return len(self.out)


def test_the_agent_in_durable_mode_keeps_a_row_on_flash_until_its_puback():
    from microcot import link
    from microcot.agent import Agent

    d = scratch_dir("adur")
    try:
        with open(d + "/t.csv", "w") as f:
            f.write("15,microcotT\n10,110,POST,/measurement/measurements,application/json,,%%,"
                    "UNSIGNED STRING STRING NUMBER STRING DATE STRING,\"{}\"\n")
        a = Agent({"store": d, "xid": "microcotT", "log": False, "queue": [4, 100],
                   "templates": d + "/t.csv", "reserve": 0, "durable": True})
        assert isinstance(a.q, Log)
        a.s.id = "TESTDEV1"
        a.s.mo = "10"
        for i in range(3):
            a.measure("c8y_T", "T", i, "C", t=1505392620)
            with open(d + "/queue.log", "rb") as f:  # on flash when measure() returns
                assert f.read().count(b"\n") == i + 1
        a.s.c = c = _Client()
        link.flush(a.s)
        assert len(c.out) == 3 and len(a.q) == 0 and a.q.in_flight() == 3
        assert os.stat(d + "/queue.log")[6] > 0  # sent, not acknowledged: still on flash
        c.out.pop(0)  # a PUBACK
        link.flush(a.s)
        assert a.q.in_flight() == 2
        c.out = []
        link.flush(a.s)
        assert a.q.in_flight() == 0 and "queue.log" not in os.listdir(d)
    finally:
        rmtree(d)
