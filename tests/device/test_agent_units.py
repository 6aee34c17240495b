# The agent's pure logic on both runtimes: the offline queue (order, bounds, spill to flash,
# drop-oldest, the drop count, taking a file up again), the reconnect back-off, the bootstrap
# secret and answer, answer dispatch by message id, operation rows -> handlers, the c8y_Command
# table, and queued rows -> text and binary payloads. No network: the agent runs without a client.
# Modules are imported where they are used: on a board the heap is the agent's budget.
import os

from dt import free, raises, rmtree, scratch_dir

from microcot import ops
from microcot.outq import Backoff, Queue, uniform

XID = "microcotT"
TEMPLATES = "\n".join([
    "# a comment line: before the 15 line",
    "15," + XID,
    "10,110,POST,/measurement/measurements,application/json,,%%,"
    "UNSIGNED STRING STRING NUMBER STRING DATE STRING,"
    '"{""source"":{""id"":""%%""},""%%"":{""%%"":{""value"":%%,""unit"":""%%""}},'
    '""time"":""%%"",""type"":""%%""}"',
    "10,111,POST,/event/events,application/json,,%%,UNSIGNED STRING STRING DATE,"
    '"{""source"":{""id"":""%%""},""type"":""%%"",""text"":""%%"",""time"":""%%""}"',
    "10,114,PUT,/alarm/alarms/%%,application/json,application/json,%%,UNSIGNED STRING,"
    '"{""status"":""%%""}"',
    "10,150,POST,/x,application/json,,%%,NOW UNSIGNED,\"{}\"",
    "",
])


def _drain(q):
    out = []
    while len(q):
        out.append(q.peek())
        q.pop()
    return out


def _file_size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


# -- offline queue -----------------------------------------------------------------------------

def test_queue_keeps_order_in_memory():
    q = Queue(mem=8)
    assert len(q) == 0 and q.peek() is None
    for i in range(5):
        q.put("r%d" % i)
    assert len(q) == 5 and q.peek() == "r0"
    assert _drain(q) == ["r0", "r1", "r2", "r3", "r4"]
    q.pop()  # popping an empty queue is harmless
    assert q.dropped == 0


def test_queue_without_file_drops_oldest_and_counts():
    q = Queue(mem=3)
    for i in range(7):
        q.put(str(i))
    assert q.dropped == 4
    assert _drain(q) == ["4", "5", "6"]


def test_queue_rejects_bad_items():
    q = Queue(mem=2)
    raises(ValueError, q.put, "two\nlines")
    raises(ValueError, q.put, "cr\rhere")
    raises(ValueError, q.put, "x" * 481)
    raises(TypeError, q.put, b"bytes")
    raises(ValueError, Queue, 0)
    q.put("\u00e4" * 240)  # 480 bytes as UTF-8: the limit counts bytes
    assert len(q) == 1


def test_queue_spills_to_file_in_order():
    d = scratch_dir("qspill")
    path = d + "/q.txt"
    try:
        q = Queue(mem=3, path=path, file_max=10)
        for i in range(8):
            q.put("row-%d" % i)
        assert len(q) == 8 and q.in_file() == 6 and q.dropped == 0
        assert _file_size(path) > 0
        # newer items keep arriving while the file drains: the order holds
        assert q.peek() == "row-0"
        q.pop()
        q.put("row-8")
        q.put("row-9")
        assert _drain(q) == ["row-%d" % i for i in range(1, 10)]
        assert _file_size(path) == -1  # a drained file is removed
    finally:
        rmtree(d)


def test_queue_drops_oldest_when_memory_and_file_are_full():
    d = scratch_dir("qfull")
    path = d + "/q.txt"
    try:
        q = Queue(mem=2, path=path, file_max=4)
        for i in range(1, 11):
            q.put(str(i))
        assert len(q) == 6 and q.dropped == 4
        assert _drain(q) == ["5", "6", "7", "8", "9", "10"]
        q.dropped = 0
        # a long outage: the file stays bounded (compacted), the newest survive
        for i in range(200):
            q.put("item-%03d" % i)
        assert len(q) == 6 and q.dropped == 194
        assert _file_size(path) <= 2 * 4 * len("item-000\n")
        assert _drain(q) == ["item-%03d" % i for i in range(194, 200)]
    finally:
        rmtree(d)


def test_queue_file_survives_a_reboot_and_flush():
    d = scratch_dir("qboot")
    path = d + "/q.txt"
    try:
        q = Queue(mem=4, path=path, file_max=20)
        for i in range(6):
            q.put("a%d" % i)
        q.flush()  # before a restart: memory goes to flash
        assert q.in_file() == 6
        q2 = Queue(mem=4, path=path, file_max=20)  # the next boot
        assert len(q2) == 6
        q2.put("b0")
        assert _drain(q2) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0"]
        # a power cut in the middle of a spill leaves a torn last line: it is cut off
        with open(path, "wb") as f:
            f.write(b"c0\nc1\nc2-tor")
        q3 = Queue(mem=4, path=path, file_max=20)
        assert _drain(q3) == ["c0", "c1"]
        with open(path, "wb") as f:
            f.write(b"only-torn")
        assert len(Queue(mem=4, path=path, file_max=20)) == 0
        assert _file_size(path) == -1
    finally:
        rmtree(d)


def test_queue_clear():
    d = scratch_dir("qclear")
    path = d + "/q.txt"
    try:
        q = Queue(mem=1, path=path, file_max=5)
        for i in range(4):
            q.put(str(i))
        q.clear()
        assert len(q) == 0 and _file_size(path) == -1
    finally:
        rmtree(d)


# -- back-off ----------------------------------------------------------------------------------

def test_backoff_grows_with_jitter_within_bounds():
    b = Backoff(1000, 8000)
    ceilings = []
    for _ in range(6):
        d = b.ceiling()
        ceilings.append(d)
        v = b.next()
        assert d // 2 <= v <= d, (v, d)
    assert ceilings == [1000, 2000, 4000, 8000, 8000, 8000]
    seen = set()
    for _ in range(20):
        v = b.next()
        assert 4000 <= v <= 8000
        seen.add(v)
    assert len(seen) > 5  # jitter: not one fixed value
    b.reset()
    assert b.ceiling() == 1000 and 500 <= b.next() <= 1000
    raises(ValueError, Backoff, 0, 10)
    raises(ValueError, Backoff, 100, 10)


def test_uniform_bounds():
    for n in (1, 2, 3, 26, 1000, 60001):
        for _ in range(20):
            v = uniform(n)
            assert 0 <= v < n
    assert uniform(0) == 0


# -- bootstrap ---------------------------------------------------------------------------------

def test_secret_alphabet_length_and_rejection():
    from microcot import bootstrap

    for _ in range(20):
        s = bootstrap.new_secret()
        assert len(s) == 16 and bootstrap.valid_secret(s)
        assert all("A" <= c <= "Z" for c in s)
    # bytes 234..255 would favour A-V: they are drawn again, never mapped
    fed = [bytes([234, 255, 0, 25, 26, 233] + [1] * 14), bytes([2] * 20)]
    calls = []

    def rand(n):
        calls.append(n)
        return fed[len(calls) - 1][:n]

    s = bootstrap.new_secret(rand)
    assert s == "AZAZ" + "B" * 12, s
    assert not bootstrap.valid_secret("ABCDEFGHIJKLMNOp")
    assert not bootstrap.valid_secret("ABC")
    assert not bootstrap.valid_secret(None)
    free("bootstrap", "store")


def test_bootstrap_answer_decrypts_and_bad_padding_is_clear():
    from microcot import bootstrap, xtea

    secret = "QWERTYUIOPASDFGH"
    pw = "Secret-Password-12345"
    cipher = xtea.encrypt_ecb(secret.encode(), xtea.pad(pw.encode()))
    assert bootstrap.password(secret, cipher) == pw
    e = raises(bootstrap.BootstrapError, bootstrap.password, "ZZZZZZZZZZZZZZZZ", cipher)
    assert "does not decrypt" in str(e) and "padding" in str(e)
    assert pw not in str(e) and secret not in str(e)
    e = raises(bootstrap.BootstrapError, bootstrap.password, secret, cipher[:-1])
    assert "XTEA blocks" in str(e)
    raises(bootstrap.BootstrapError, bootstrap.password, secret, b"")
    free("bootstrap", "store", "xtea")


def test_bootstrap_resumes_only_its_own_ongoing_secret():
    from microcot import bootstrap

    ok = {"state": "ONGOING", "id": "8949", "secret": "ABCDEFGHIJKLMNOP"}
    assert bootstrap.pending("8949", ok) == "ABCDEFGHIJKLMNOP"
    assert bootstrap.pending("8950", ok) is None  # another device's (a swapped SIM)
    assert bootstrap.pending("8949", None) is None
    assert bootstrap.pending("8949", dict(ok, state="DONE")) is None
    assert bootstrap.pending("8949", dict(ok, secret="short")) is None
    b = bootstrap.Bootstrap("8949", None, doc=ok)
    assert b.resumed and b.secret == "ABCDEFGHIJKLMNOP"
    assert not bootstrap.Bootstrap("8949", None).resumed
    free("bootstrap", "store")


def test_bootstrap_delay_bounds():
    from microcot import bootstrap

    for _ in range(20):
        assert 0 <= bootstrap.delay_ms(0, 60) <= 60000
        assert 1500 <= bootstrap.delay_ms(1.5, 2) <= 2000
    assert bootstrap.delay_ms(0, 0) == 0
    raises(ValueError, bootstrap.delay_ms, 5, 1)
    free("bootstrap", "store")


# -- operations --------------------------------------------------------------------------------

def test_operation_rows_parse():
    op = ops.parse((202, ["17", "42", "ls -l"]))
    assert (op.id, op.rtid, op.device, op.values, op.text) == ("17", 202, "42", ["ls -l"], "ls -l")
    assert ops.parse((203, ["18", "42"])).text == ""
    raises(ValueError, ops.parse, (202, ["17"]))
    raises(ValueError, ops.parse, (202, ["x", "42"]))


def test_command_table():
    t = {"echo": lambda args: args, "fail": lambda args: 1 // 0}
    assert ops.run(t, "echo  hello world ") == "hello world"
    assert ops.run(t, "echo") == ""
    e = raises(ops.Failed, ops.run, t, "rm -rf /")
    assert str(e) == "unknown command: rm"
    assert "unknown command" in str(raises(ops.Failed, ops.run, t, ""))
    raises(ZeroDivisionError, ops.run, t, "fail now")
    assert len(ops.run(t, "echo " + "x" * 3000)) == ops.MAX_RESULT
    assert ops.reason(ops.Failed("no")) == "no"
    assert ops.reason(ZeroDivisionError("divide")) == "ZeroDivisionError: divide"
    from microcot.agent import Agent

    raises(ValueError, Agent({"store": "."}, queue=[4, 0], log=False, reserve=0).command,
           "two words", len)


# -- the agent without a network ---------------------------------------------------------------

def _agent(d, **kw):
    from microcot.agent import Agent

    with open(d + "/t.csv", "w") as f:
        f.write(TEMPLATES)
    cfg = {"store": d, "xid": XID, "log": False, "queue": [32, 0], "templates": d + "/t.csv",
           "reserve": 0}
    cfg.update(kw)
    a = Agent(cfg)
    a.s.id = "TESTDEV1"  # as start() would find it, without the modem
    return a


def test_agent_dispatches_answers_by_message_id():
    d = scratch_dir("adisp")
    try:
        a = _agent(d, http_user="{tenant}/device_{id}")
        e = raises(ops.Failed, a.s.http_user)  # the tenant is not known yet
        assert "needs the tenant" in str(e)
        seen = []
        a.on_error = lambda code, line, text: seen.append((code, line, text))
        a.s.ans = []  # as create.ask waits for an answer
        a._on_msg(b"mr/TESTDEV1", b"87,1," + XID.encode() + b"\n205,1,t-emu,emu.example.com")
        assert a.tenant == "t-emu"
        assert a.s.http_user() == "t-emu/device_TESTDEV1"  # the HTTPS user names it now
        assert [r.code for r in a.s.ans] == [205]
        a.s.ans = None
        a._on_msg(b"mr/TESTDEV1", b"87,1," + XID.encode() + b"\n206,1,77,overheat,ACTIVE,10")
        assert a.alarms[("10", "overheat")] == ["77", "ACTIVE"]
        a._on_msg(b"br/TESTDEV1", b"45,1,Invalid parameter at position '1'")
        a._on_msg(b"mr/TESTDEV1", b'50,2,404,Not Found')
        assert a.errors == 2 and a.last_error == (50, 2, "404,Not Found")
        assert seen == [(45, 1, "Invalid parameter at position '1'"), (50, 2, "404,Not Found")]
        a._on_msg(b"mr/TESTDEV1", b'"unterminated')  # unreadable: logged, nothing else
        assert a.errors == 2
        # operation rows are not answers: they wait for the operation handling
        a.s.ans = None
        a._on_msg(b"mr/TESTDEV1", b"87,1," + XID.encode() + b"\n202,1,5,10,echo x")
        assert a.s.ans is None and a.s.ops == [(202, ["5", "10", "echo x"])]
    finally:
        rmtree(d)


def test_operations_reach_their_handlers_with_statuses():
    from microcot import link

    d = scratch_dir("aops")
    try:
        a = _agent(d)
        a.s.mo = "10"
        a.s.ready = True  # but without a client: status rows wait in a.s.st
        a.command("echo", lambda args: 'said "%s"' % args)
        got = []
        a.child("kid", handler=lambda op: got.append((op.child, op.rtid, op.id)))
        a.s.kids["kid"][2] = "11"
        a.operation(203, "c8y_Restart", lambda op: None)  # not the real restart here
        x = XID.encode()
        a._on_msg(b"mr/TESTDEV1", b"87,5," + x + b"\n202,1,7,10,echo hi\n202,1,8,10,format c:"
                  b"\n203,1,9,11\n202,1,10,99,echo lost\n202,1,7,10,echo hi")
        link.handle_ops(a.s)
        assert got == [("kid", 203, "9")]
        p = b"15," + x + b"\n"
        assert a.s.st == [
            p + b"130,7", p + b'133,7,echo hi,"said \\""hi\\"""',
            p + b"130,8", p + b"132,8,unknown command: format",
            p + b"130,9", p + b"131,9",
            p + b"132,10,no handler for c8y_Command on device 99",
        ]  # operation 7 came twice (QoS 1): executed once
        assert a.stats["ops"] == 4
        a.s.st = []
        a.child("mute")  # a child without a handler: its operations fail
        a.s.kids["mute"][2] = "12"
        a._on_msg(b"mr/TESTDEV1", b"203,1,11,12")
        link.handle_ops(a.s)
        assert a.s.st == [p + b"132,11,no handler for c8y_Restart on device 12"]
    finally:
        rmtree(d)


def test_queued_rows_become_text_and_binary_payloads():
    from microcot import binrest, link
    from microcot.agent import iso

    d = scratch_dir("aenc")
    try:
        a = _agent(d)
        assert link.types_of(d + "/t.csv", 150) == ["UNSIGNED"]  # NOW takes no value
        raises(ValueError, link.types_of, d + "/t.csv", 999)
        t = 1505392620
        a.measure("c8y_Temperature", "T", 21.5, "C", t=t)
        a.child("kid")
        a.event("door", 'opened, "left"', t=t, source="kid")
        assert len(a.q) == 2
        assert link.encode(a.s, a.q.peek()) is None  # the MO id is not known yet: it waits
        a.s.mo = "10"
        topic, body = link.encode(a.s, a.q.peek())
        assert topic == "ms/TESTDEV1"
        assert body == (b"15," + XID.encode() + b"\n110,10,c8y_Temperature,T,21.5,C,"
                        + iso(t).encode() + b",c8y_Temperature")
        assert iso(t) == "2017-09-14T12:37:00Z"
        a.q.pop()
        assert link.encode(a.s, a.q.peek()) is None  # the child's MO is not known yet either
        a.s.kids["kid"][2] = "11"
        assert link.encode(a.s, a.q.peek())[1].endswith(b'111,11,door,"opened, \\""left\\""",'
                                                 + iso(t).encode())
        a.s.binary = True
        topic, body = link.encode(a.s, a.q.peek())
        assert topic == "bs/TESTDEV1"
        assert body == binrest.encode(XID, 111, ["UNSIGNED", "STRING", "STRING", "DATE"],
                                      [11, "door", 'opened, \\"left\\"', t])
        a.q.pop()
        a.alarms[("10", "hot")] = ["77", "ACTIVE"]
        a.alarm_status("hot", "ACKNOWLEDGED")
        assert link.encode(a.s, a.q.peek())[1] == binrest.encode(XID, 114, ["UNSIGNED", "STRING"],
                                                         [77, "ACKNOWLEDGED"])
        raises(ValueError, a.alarm_status, "cold", "ACKNOWLEDGED")
        raises(ValueError, a.alarm, "hot", "x", "SEVERE")
        raises(ValueError, a.alarm, "hot", "x", "MAJOR", "OPEN")
        raises(ValueError, a.measure, "c8y_T", "T", "warm")
        raises(ValueError, a.event, "e", "x", source="nobody")
        raises(ValueError, a.child, "*")
    finally:
        rmtree(d)


def test_store_reads_through_the_agent_read_only_what_a_file_holds():
    d = scratch_dir("adb")
    try:
        a = _agent(d)
        db = a.s.db()
        db.save("x", {"id": "8949", "n": [1, 2]})
        assert db.load("x") == {"id": "8949", "n": [1, 2]} and db.status("x") == "ok"
        db.save("x", {"id": "8949", "n": [3]})
        assert db.load("x") == {"id": "8949", "n": [3]}
        db.delete("x")
        assert db.load("x", "gone") == "gone"
        f = db.fs().open(d + "/t.csv", "rb")
        try:
            head = f.read(3)
            assert head == b"# a"
            rest = f.read(100000)  # asks for more than the file holds: gets the rest only
            assert len(rest) == len(TEMPLATES.encode()) - 3
        finally:
            f.close()
        db.fs(False)
        db.root("/store")
    finally:
        rmtree(d)


def test_json_escaping_of_values():
    from microcot.agent import js

    assert js("plain text") == "plain text"
    assert js('a "b" \\ c') == 'a \\"b\\" \\\\ c'
    assert js("line\nbreak\t") == "line\\u000abreak\\u0009"


def test_timers_fire_across_the_tick_wrap_and_too_long_periods_are_refused():
    from microcot import hal

    d = scratch_dir("atick")
    P = hal.TICKS_PERIOD
    try:
        a = _agent(d)
        fired = []
        hal.ticks_at(P - 400)
        a._next = hal.ticks_add(hal.ticks_ms(), 600000)  # no connect attempt in this test
        a.every(1, lambda: fired.append(hal.ticks_ms()))
        a.step(0)
        assert fired == []
        hal.ticks_at(P - 100)
        a.step(0)
        assert fired == []
        hal.ticks_at(700)  # 1.1 s later, past the wrap
        a._next = hal.ticks_add(hal.ticks_ms(), 600000)
        a.step(0)
        assert len(fired) == 1 and fired[0] < 1000
        a.step(0)
        assert len(fired) == 1  # the next one is due at about 1600
        hal.ticks_at(1700)
        a._next = hal.ticks_add(hal.ticks_ms(), 600000)
        a.step(0)
        assert len(fired) == 2
        # a period ticks_add cannot span on this board is refused when it is set, not misfired
        raises(ValueError, a.every, (P >> 2) // 1000 + 1, lambda: None)
        raises(ValueError, a.every, 0, lambda: None)
        a.every(86400, lambda: None)  # a day is fine everywhere
    finally:
        hal.ticks_at(None)
        rmtree(d)


# -- the operation in progress, resumed after a reboot (ops.py, create.finish) -------------------

def test_resume_rules_of_an_operation_found_at_boot():
    from microcot.create import found, outcome

    rec = {"id": "41", "kind": "c8y_Restart", "rtid": 203, "stage": "reset", "started": 1}
    assert found(rec) is rec
    assert found({"restart": "9"}) == {"id": "9", "kind": "c8y_Restart", "rtid": 203,
                                       "stage": "reset"}  # the record before it was general
    assert found(None) is None and found({"id": "x1"}) is None and found([1]) is None
    assert outcome(rec, lambda r: r["stage"] == "reset") == (True, None)
    assert outcome(dict(rec, stage="run"), lambda r: r["stage"] == "reset") == (
        False, "interrupted by a reboot (stage run)")
    assert outcome(rec, None) == (False, "interrupted by a reboot (stage reset)")
    assert outcome(rec, lambda r: "flash image corrupt") == (False, "flash image corrupt")
    assert outcome(rec, lambda r: 1 // 0)[1].startswith("ZeroDivisionError")
    # a child's operation has no resume hook of the device's
    assert outcome(dict(rec, child="kid"), lambda r: True)[0] is False


def test_an_interrupted_operation_is_reported_once_and_not_run_again():
    from microcot import create, link

    d = scratch_dir("aresume")
    try:
        a = _agent(d)
        a.s.mo = "10"
        s = a.s
        ran = []
        a.operation(207, "c8y_Thing", lambda op: ran.append(op.id),
                    resume=lambda rec: rec["stage"] == "written")
        s.oprec = {"id": "55", "kind": "c8y_Thing", "rtid": 207, "stage": "written",
                   "started": 1}
        s.db().save("op", s.oprec)
        assert create.resumed(s, s.oprec) == (131, 55)
        assert create.resumed(s, dict(s.oprec, stage="run")) == (
            132, 55, "interrupted by a reboot (stage run)")
        assert create.resumed(s, dict(s.oprec, rtid=202)) == (
            132, 55, "interrupted by a reboot (stage written)")  # c8y_Command: no resume

        class Client:  # what finish() needs of the MQTT client
            def __init__(self):
                self.sent = []

            def publish(self, topic, body, qos=0):
                self.sent.append(bytes(body))
                return len(self.sent)

            def wait_puback(self, pid):
                pass

        s.c = Client()
        create.finish(s)
        p = b"15," + XID.encode() + b"\n"
        assert s.c.sent == [p + b"131,55"] and a.ready
        assert s.db().load("op") is None  # reported once: the record is gone
        # the broker delivers the operation again: it is not run again
        a._on_msg(b"mr/TESTDEV1", b"207,1,55,10")
        link.handle_ops(s)
        assert ran == [] and len(s.c.sent) == 1
        a._on_msg(b"mr/TESTDEV1", b"207,1,56,10")
        link.handle_ops(s)
        assert ran == ["56"] and s.c.sent[1:] == [p + b"130,56", p + b"131,56"]
    finally:
        rmtree(d)


def test_an_operation_keeps_a_record_while_it_runs():
    from microcot import link

    d = scratch_dir("arec")
    try:
        a = _agent(d)
        a.s.mo = "10"
        a.s.ready = True
        seen = []

        def thing(op):
            seen.append(a.s.db().load("op"))
            op.stage("half")
            seen.append(a.s.db().load("op")["stage"])

        a.operation(207, "c8y_Thing", thing)
        a._on_msg(b"mr/TESTDEV1", b"207,1,60,10")
        link.handle_ops(a.s)
        assert seen[0]["id"] == "60" and seen[0]["kind"] == "c8y_Thing"
        assert seen[0]["rtid"] == 207 and seen[0]["stage"] == "run"
        assert seen[1] == "half"
        assert a.s.db().load("op") is None  # done: the record is gone
    finally:
        rmtree(d)


def test_a_stepped_operation_advances_a_chunk_per_turn():
    from microcot import link

    d = scratch_dir("astep")
    try:
        a = _agent(d)
        a.s.mo = "10"
        a.s.ready = True
        s = a.s
        done = []

        def update(op):
            for i in range(3):
                done.append(i)
                yield
            return (133, "update", "3 chunks")  # a success row of its own

        a.operation(207, "c8y_Thing", update)
        a.command("echo", lambda args: args)
        a._on_msg(b"mr/TESTDEV1", b"207,1,70,10\n202,1,71,10,echo hi")
        link.handle_ops(s)
        p = b"15," + XID.encode() + b"\n"
        assert done == [] and s.st == [p + b"130,70"] and s.job is not None
        link.handle_ops(s)  # the other operation waits for the stepped one
        assert len(s.ops) == 1
        for n in range(3):
            link.advance(s)
            assert done == list(range(n + 1))
        assert s.job is not None and s.db().load("op")["id"] == "70"
        link.advance(s)  # its return value reports it
        assert s.job is None and s.st[-1] == p + b"133,70,update,3 chunks"
        assert s.db().load("op") is None
        link.handle_ops(s)
        assert s.st[-2:] == [p + b"130,71", p + b"133,71,echo hi,hi"]

        def broken(op):
            yield
            raise ValueError("chunk 2 failed")

        a.operation(208, "c8y_Other", broken)
        a._on_msg(b"mr/TESTDEV1", b"208,1,72,10")
        link.handle_ops(s)
        link.advance(s)
        link.advance(s)
        assert s.st[-1] == p + b"132,72,ValueError: chunk 2 failed" and s.job is None
    finally:
        rmtree(d)


# -- the self-creation conversation without a broker (create.py, sans-I/O) ---------------------

def _rows(text):
    from microcot.smartrest import parse

    return parse(text.encode())


def test_self_creation_conversation_for_a_new_device():
    free("binrest", "link")  # loaded by earlier tests: the ESP32 model needs the room
    from microcot import create

    d = scratch_dir("aconv")
    try:
        a = _agent(d, log_ring=256)  # a small ring: the 106 row names the log
        s = a.s
        s.dev = {"id": "TESTDEV1", "src": "iccid", "imsi": "262011234567890"}
        db = s.db()
        conv = create.self_create(s, db)
        p = "15," + XID + "\n"
        body, what = next(conv)
        assert body == (p + "100,TESTDEV1").encode() and "lookup" in what
        body, what = conv.send(_rows("50,1,404,Not Found"))
        assert body == (p + '101,TESTDEV1,microcot TESTDEV1').encode()
        body, what = conv.send(_rows("201,1,4711"))
        assert db.load("dev")["mo"] == "4711"  # stored before anything else
        assert body == (p + "102,4711,TESTDEV1").encode()
        body, what = conv.send(_rows("200,1,TESTDEV1,4711"))
        lines = body.decode().split("\n")
        assert lines[1].startswith("103,4711,TESTDEV1,")
        assert lines[2] == "104,4711,TESTDEV1,262011234567890"
        ops = ("c8y_Command", "c8y_Configuration", "c8y_Firmware", "c8y_LogfileRequest",
               "c8y_Restart", "c8y_SendConfiguration", "c8y_SoftwareUpdate")
        assert lines[3] == '106,4711,"%s","""agent"""' % ",".join('""%s""' % o for o in ops)
        assert lines[4] == "107,4711,10"  # c8y_RequiredAvailability: cfg "availability"
        raises(StopIteration, conv.send, _rows("201,1,4711\n201,2,4711\n201,3,4711\n"
                                               "201,4,4711"))
        assert s.mo == "4711" and s.stats["created"] and db.load("dev")["info"]
        # the next boot: found by its external ID, nothing changed, nothing more is sent
        s.mo = None
        conv = create.self_create(s, db)
        next(conv)
        raises(StopIteration, conv.send, _rows("200,1,TESTDEV1,4711"))
        assert s.mo == "4711"
        # an answer it cannot use ends it with the answer named
        conv = create.self_create(s, db)
        next(conv)
        e = raises(Exception, conv.send, _rows("50,1,500,Server Error"))
        assert "external ID lookup: 50 500,Server Error" in str(e)
    finally:
        rmtree(d)
