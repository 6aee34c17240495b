# c8y_LogfileRequest on the device without a broker: the ISO 8601 parser, the line filter (dates,
# search text, maximum lines), secrets masked in the ring, oplog.upload against a fake socket,
# and oplog.handle driven to the end with a fake MQTT client and a fake HTTPS server (the
# multipart body it sends, the 115 row, the 134 row it returns). Runs on CPython and on boards.
from dt import raises

from microcot import httpget, oplog, smartrest, tpl
from microcot.logring import Ring
from microcot.ops import Failed, Op
from microcot.state import State as RealState

T0 = 1704067200  # 2024-01-01T00:00:00Z


def test_parse_time():
    p = oplog.parse_time
    assert p("") is None
    assert p("2024-01-01T00:00:00.000Z") == T0
    assert p("2024-01-01T00:00:00Z") == T0
    assert p("2024-01-01T01:00:00+01:00") == T0
    assert p("2024-01-01T01:00:00.123456+0100") == T0
    assert p("2023-12-31T22:30:00-01:30") == T0
    assert p("2024-01-01T01:00+01") == T0
    assert p("2024-01-01") == T0
    assert p("1970-01-01T00:00:00Z") == 0
    assert p("2000-03-01T12:34:56Z") == 951914096
    assert p("2024-02-29T23:59:59Z") == 1709251199
    for bad in ("yesterday", "2024-1-01", "2024-01-01T1:00", "2024-13-01T00:00:00Z",
                "2024-01-01T00:00:00+1", "2024-01-01T00:00:00Q", "2024-01-01T25:00:00Z"):
        e = raises(Failed, p, bad, "dateFrom")
        assert "dateFrom" in str(e), bad


def _items():
    return [(T0 + 10 * i, "line %d %s" % (i, "even" if i % 2 == 0 else "odd")) for i in range(10)]


def test_select_dates_search_and_latest_lines():
    items = _items()
    sel = lambda lo=None, hi=None, text="", most=1000: list(  # noqa: E731
        oplog.select(items, lo, hi, text, most))
    every = sel()
    assert len(every) == 10
    assert every[0] == "2024-01-01T00:00:00Z line 0 even\n"
    assert every[-1] == "2024-01-01T00:01:30Z line 9 odd\n"
    # both ends included
    assert [x.split()[2] for x in sel(T0 + 20, T0 + 50)] == ["2", "3", "4", "5"]
    assert [x.split()[2] for x in sel(lo=T0 + 80)] == ["8", "9"]
    assert [x.split()[2] for x in sel(hi=T0 + 10)] == ["0", "1"]
    # a case-sensitive substring
    assert [x.split()[2] for x in sel(text="odd")] == ["1", "3", "5", "7", "9"]
    assert sel(text="ODD") == []
    # the latest `most` of the matching lines, oldest first
    assert [x.split()[2] for x in sel(text="even", most=2)] == ["6", "8"]
    assert [x.split()[2] for x in sel(T0, T0 + 50, "odd", 2)] == ["3", "5"]
    assert sel(most=0) == []


def test_ring_masks_secrets_and_stays_bounded():
    r = Ring(200)
    r.mask("topsecretpw")
    r.mask("abc")  # too short to be a password worth masking (it would mangle the log)
    r.add("connect with topsecretpw now", T0)
    assert r.lines() == [(T0, "connect with *** now")]
    r.add("late secret NEWSECRET1", T0 + 1)
    r.mask("NEWSECRET1")  # registered after the line was kept: masked when read
    got = list(oplog.select(r.lines(), None, None, "", 10, r))
    assert got[1] == "2024-01-01T00:00:01Z late secret ***\n"
    for i in range(50):
        r.add("x" * 30, T0 + 2 + i)
    assert r.used <= 200 and r.dropped > 0
    r.add("y" * 500, T0 + 99)
    assert len(r.lines()[-1][1]) <= 160


def test_ring_is_one_buffer_keeping_the_newest_lines_in_order():
    r = Ring(120)
    buf = r.buf
    for i in range(40):
        r.add("line %d: grün" % i, T0 + i)  # UTF-8: more bytes than characters
    got = r.lines()
    assert r.buf is buf and len(buf) == 120 and r.used <= 120
    assert [t for t, _ in got] == list(range(T0 + 40 - len(got), T0 + 40))
    assert got[-1][1] == "line 39: grün" and len(r) == len(got) and r.dropped == 40 - len(got)
    r.add("z" * 150, T0 + 50)  # larger than the whole ring: not kept
    assert r.lines() == got


class Sock:
    """Records what is sent; answers `answer` once the whole request is in."""

    def __init__(self, answer):
        self.answer = answer
        self.sent = b""
        self.pos = 0
        self.closed = False

    def write(self, b):
        self.sent += bytes(b)
        return len(b)

    def readinto(self, buf, n):
        n = min(n, 100, len(self.answer) - self.pos)  # in pieces
        buf[:n] = self.answer[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self):
        self.closed = True


def _drive(g):
    steps = 0
    try:
        while True:
            next(g)
            steps += 1
    except StopIteration as e:
        return (e.args[0] if e.args else None), steps


def test_upload_streams_pieces_with_content_length():
    socks = []

    def opener(host, port, ctx, timeout):
        assert (host, port) == ("h.example", 8443)
        socks.append(Sock(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"))
        return socks[-1]

    pieces = ["line %d\n" % i for i in range(200)]
    size = sum(len(p) for p in pieces)
    st, steps = _drive(oplog.upload("https://h.example:8443/event/events/7/binaries", size,
                                iter(pieces), "text/plain", user="t1/dev", password="pw",
                                ssl_context=object(), opener=opener))
    assert st == 201
    assert steps > size // 512  # a yield per buffer sent: MQTT keeps alive meanwhile
    s = socks[0]
    head, _, body = s.sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /event/events/7/binaries HTTP/1.1\r\nHost: h.example:8443\r\n")
    assert b"\r\nContent-Length: %d\r\n" % size in head + b"\r\n"
    assert b"\r\nAuthorization: Basic dDEvZGV2OnB3" in head  # t1/dev:pw
    assert body == "".join(pieces).encode()
    assert s.closed
    # a wrong size is caught before the request ends; an error status names the answer
    raises(ValueError, _drive, oplog.upload("https://h.example:8443/x", size + 1, iter(pieces),
                                        "text/plain", ssl_context=object(), opener=opener))
    raises(ValueError, _drive, oplog.upload("https://h.example:8443/x", 3, iter(pieces),
                                        "text/plain", ssl_context=object(), opener=opener))

    def refusing(host, port, ctx, timeout):
        return Sock(b'HTTP/1.1 409 Conflict\r\nContent-Length: 30\r\n\r\n{"message":"exists already"}')

    e = raises(httpget.HTTPStatusError, _drive, oplog.upload("https://h.example:8443/x", 2, ["ab"],
                                                   "text/plain", ssl_context=object(),
                                                   opener=refusing))
    assert e.status == 409 and "exists already" in str(e)
    raises(ValueError, oplog.upload("http://h/x", 1, ["a"], "text/plain", user="u",
                                password="p").send, None)


class Client:
    def __init__(self):
        self.pub = []

    def publish(self, topic, msg, qos=0):
        self.pub.append((topic, msg))


class State:
    """The few fields of state.State that oplog uses."""

    tenant = None
    http_user = RealState.http_user  # the real rule for the device's HTTPS user

    def __init__(self):
        self.cfg = {"http_user": "{id}", "rest_url": "https://c8y.example/", "host": "x",
                    "timeout": 5, "ca": None}
        self.id = "dev1"
        self.mo = "42"
        self.cred = {"password": "devicepassword"}
        self.ctx = object()
        self.ans = None
        self.c = Client()
        self.ring = Ring(4096)
        self.logged = []
        self.ring.mask(self.cred["password"])

    def body(self, row):
        return ("15,X\n%s" % row).encode()

    def log(self, text):
        self.logged.append(text)

    def room(self):
        pass


def test_handle_refusals():
    s = State()
    e = raises(Failed, oplog.handle, s, Op("9", tpl.R_LOGFILE, "42", ["syslog", "", "", "", "5"]))
    assert "syslog" in str(e) and "agent" in str(e)
    raises(Failed, oplog.handle, s, Op("9", tpl.R_LOGFILE, "42", ["agent", "x", "", "", "5"]))
    e = raises(Failed, oplog.handle, s, Op("9", tpl.R_LOGFILE, "42", ["agent", "", "", "", "-1"]))
    assert "maximumLines" in str(e)
    s.ring = None
    raises(Failed, oplog.handle, s, Op("9", tpl.R_LOGFILE, "42", ["agent", "", "", "", "5"]))


def test_handle_creates_the_event_uploads_and_reports():
    s = State()
    for i in range(20):
        s.ring.add("step %d %s" % (i, "devicepassword" if i == 13 else "ok"), T0 + i)
    socks = []

    def opener(host, port, ctx, timeout):
        assert (host, port, ctx) == ("c8y.example", 443, s.ctx)
        socks.append(Sock(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"))
        return socks[-1]

    op = Op("77", tpl.R_LOGFILE, "42", ["agent", "2024-01-01T00:00:05Z",
                                        "2024-01-01T01:00:15+01:00", "step 1", "3"])
    g = oplog.handle(s, op)
    saved = oplog.open_socket
    oplog.open_socket = opener
    try:
        next(g)  # the event is asked for
        topic, msg = s.c.pub[0]
        assert topic == "ms/dev1"
        row = smartrest.parse_rows(msg.decode().split("\n", 1)[1])[0]
        assert row[0] == "115" and row[1] == "42" and row[4] == "77"
        assert row[2] == "agent log: 3 lines"
        next(g)  # no answer yet: it waits
        s.ans = smartrest.parse(b"212,1,555,76")  # another operation's event: not ours
        next(g)
        assert not socks
        s.ans = smartrest.parse(b"212,1,556,77")
        res, _ = _drive(g)
    finally:
        oplog.open_socket = saved
    url = "https://c8y.example/event/events/556/binaries"
    assert res == (tpl.LOG_DONE, "agent", "2024-01-01T00:00:05Z", "2024-01-01T01:00:15+01:00",
                   "step 1", 3, url)
    assert s.ans is None
    sent = socks[0].sent
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /event/events/556/binaries HTTP/1.1\r\n")
    n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert n == len(body)
    ctype = head.split(b"Content-Type: ")[1].split(b"\r\n")[0]
    b = ctype.split(b"boundary=")[1]
    assert ctype.startswith(b"multipart/form-data; ") and len(b) > 10
    assert body.endswith(b"\r\n--" + b + b"--\r\n")
    assert b'name="object"\r\n\r\n{"name":"agent.log","type":"text/plain"}\r\n' in body
    part = body.split(b'filename="agent.log"\r\nContent-Type: text/plain\r\n\r\n')[1]
    text = part.split(b"\r\n--" + b)[0].decode()
    # within 00:00:05..00:00:15, containing "step 1", the latest 3 (10..15 match: 13, 14, 15)
    assert text == ("2024-01-01T00:00:13Z step 13 ***\n2024-01-01T00:00:14Z step 14 ok\n"
                    "2024-01-01T00:00:15Z step 15 ok\n")
    assert b"devicepassword" not in sent.split(b"Authorization")[0] + body


def test_handle_without_an_event_answer_fails_naming_the_error():
    s = State()
    s.cfg["timeout"] = 0  # no waiting: the answer comes while publishing
    s.ring.add("one", T0)

    def publish(topic, msg, qos=0):
        s.ans = smartrest.parse(b"50,1,422,Unprocessable")

    s.c.publish = publish
    g = oplog.handle(s, Op("78", tpl.R_LOGFILE, "42", ["agent", "", "", "", ""]))
    e = raises(Failed, _drive, g)
    assert "event" in str(e) and "422" in str(e)
    assert s.ans is None
