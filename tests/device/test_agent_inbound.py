# The agent fed hostile messages on mr/ (issue 14): a message that is not valid SmartREST, or
# that would make it keep too much, is dropped and logged from its first defect on, the rows
# before it handled; the connection stays up (no exception leaves the client's callback, so the
# message is acknowledged and not delivered again). Runs through Agent.step with a stand-in for
# the MQTT client, like test_agent_units.py's agent without a network.
from dt import free, rmtree, scratch_dir

_AGENT_TPL = ("15,microcotT\n10,130,PUT,/devicecontrol/operations/%%,application/json,,%%,"
              'UNSIGNED,"{""status"":""EXECUTING""}"\n')


class _Client:
    """Stands in for mqtt.MQTTClient: poll() delivers the next message to the callback, as the
    real one does from inside poll(); what the agent publishes is kept. msgs: functions that
    make the payloads (made one at a time: a small board's heap)."""

    max_inflight = 8

    def __init__(self, s, topic, msgs):
        self.s = s
        self.topic = topic
        self.msgs = list(msgs)
        self.sent = []
        self.closed = False

    def poll(self, ms=0):
        if not self.msgs:
            return None
        self.s.on_msg(self.topic, self.msgs.pop(0)())
        return 0x30

    def publish(self, topic, msg, retain=False, qos=0):
        self.sent.append((topic, bytes(msg)))
        return len(self.sent)

    def pending(self):
        return 0

    def close(self):
        self.closed = True

    def disconnect(self):
        self.closed = True


def test_the_agent_drops_and_logs_hostile_messages_and_stays_connected():
    from microcot.agent import Agent
    from microcot.state import UP

    d = scratch_dir("afuzz")
    try:
        with open(d + "/t.csv", "w") as f:
            f.write(_AGENT_TPL)
        a = Agent({"store": d, "xid": "microcotT", "log": False, "queue": [8, 0],
                   "templates": d + "/t.csv", "reserve": 0, "log_ring": 0})
        s = a.s
        s.id = "TESTDEV1"
        s.mo = "10"
        s.state = UP
        s.ready = True
        logged = []
        a.log = s.log = logged.append
        import sys

        # past CPython's int() limit of 4300 digits; 5 KB in one piece is too much of a small
        # board's heap beside the agent, where int() would make a bignum of it
        n = 5000 if sys.implementation.name == "cpython" else 2000
        ran = []
        a.command("echo", lambda args: ran.append(args) or args)
        t = b"mr/TESTDEV1"
        hostile = [
            lambda: b'87,1,microcotT\n"unterminated',
            lambda: b"9" * n + b",1",  # a message identifier of n digits
            lambda: b"202,1," + b"9" * n + b",10,echo big",  # an operation id of n digits
            lambda: b"202,1,5" + b",x" * 400,  # more fields than a row may have
            lambda: b"\xff\xfe not UTF-8",
            lambda: b"1,1\n" * 1000,  # 1000 rows: read one at a time, none kept
            lambda: "".join(["206,1,%d,t%d,ACTIVE,10\n" % (i, i) for i in range(100)]).encode(),
            lambda: b"202,1,7,10,echo fine",  # and then a good one
        ]
        s.c = c = _Client(s, t, hostile)
        for _ in range(3):
            a.step(0)
        assert s.state == UP and s.ready and not c.closed, logged
        assert not c.msgs
        assert ran == ["fine"], (ran, logged)
        assert len(a.alarms) <= 32
        unreadable = [m for m in logged if m.startswith("unreadable on ") and "mr/TESTDEV1" in m]
        assert len(unreadable) == 4, logged
        assert any("operation row 202" in m for m in logged), logged  # the 5000-digit id
        assert all(len(m) < 400 for m in logged), [len(m) for m in logged]
        assert [m for _, m in c.sent] == [b"15,microcotT\n130,7",
                                           b"15,microcotT\n133,7,echo fine,fine"]
        # the rows before a defect are handled: here an operation
        c.msgs = [lambda: b'202,1,8,10,echo early\n202,1,9,10,"echo late']
        a.step(0)
        assert ran == ["fine", "early"] and s.state == UP
    finally:
        rmtree(d)
        free("agent", "link", "create", "session", "ident", "store", "ops", "outq", "state",
             "logring")
