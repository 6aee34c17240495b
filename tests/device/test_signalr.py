# SignalR JSON hub protocol (microcot.signalr): framing, messages, the client state machine.
# Message vectors are the examples of the ASP.NET Core SignalR hub protocol specification
# (HubProtocol.md, "JSON Encoding"), so the decoder is checked against text we did not write.
import json

from dt import raises

from microcot import signalr as s

RS = b"\x1e"

SPEC = [
    b'{"type":1,"invocationId":"123","target":"Send","arguments":[42,"Test Message"]}',
    b'{"type":1,"target":"Send","arguments":[42,"Test Message"]}',
    b'{"type":4,"invocationId":"123","target":"Send","arguments":[42]}',
    b'{"type":1,"invocationId":"123","target":"Send","arguments":[],"streamIds":["1"]}',
    b'{"type":2,"invocationId":"123","item":42}',
    b'{"type":3,"invocationId":"123","result":42}',
    b'{"type":3,"invocationId":"123","error":"It didn\'t work!"}',
    b'{"type":3,"invocationId":"123"}',
    b'{"type":5,"invocationId":"123"}',
    b'{"type":6}',
    b'{"type":7}',
    b'{"type":7,"error":"Connection closed because of an error!","allowReconnect":true}',
]


def J(rec):
    assert rec.endswith(RS) and rec.count(RS) == 1, rec
    return json.loads(rec[:-1])


def test_handshake_request_and_response():
    assert J(s.handshake_request()) == {"protocol": "json", "version": 1}
    assert s.parse_handshake_request(s.handshake_request()[:-1]) == ("json", 1)
    assert s.parse_handshake_response(b"{}") is None
    assert s.parse_handshake_response(b'{"minorVersion":1}') is None
    e = raises(s.HandshakeError, s.parse_handshake_response,
               b'{"error":"Requested protocol \'messagepack\' is not available."}')
    assert "messagepack" in str(e)
    raises(s.SignalRError, s.parse_handshake_response, b'{"type":6}')
    raises(s.SignalRError, s.parse_handshake_response, b"[]")
    raises(s.SignalRError, s.parse_handshake_request, b'{"protocol":"json"}')


def test_spec_examples_parse():
    m = [s.parse(r) for r in SPEC]
    assert (m[0].type, m[0].invocation_id, m[0].target, m[0].arguments) == \
        (1, "123", "Send", [42, "Test Message"])
    assert m[1].invocation_id is None and m[1].target == "Send"
    assert (m[2].type, m[2].invocation_id, m[2].arguments) == (4, "123", [42])
    assert m[3].stream_ids == ["1"]
    assert (m[4].type, m[4].item) == (2, 42)
    assert (m[5].has_result, m[5].result, m[5].error) == (True, 42, None)
    assert (m[6].has_result, m[6].error) == (False, "It didn't work!")
    assert (m[7].has_result, m[7].result, m[7].error) == (False, None, None)
    assert (m[8].type, m[8].invocation_id) == (5, "123")
    assert m[9].type == 6
    assert (m[10].error, m[10].allow_reconnect) == (None, False)
    assert (m[11].error, m[11].allow_reconnect) == ("Connection closed because of an error!", True)
    # a null result is a result
    r = s.parse(b'{"type":3,"invocationId":"1","result":null}')
    assert r.has_result and r.result is None


def test_builders_round_trip():
    m = s.parse(s.invocation("Send", [1, "a"], "7", ["s1"])[:-1])
    assert (m.type, m.target, m.arguments, m.invocation_id, m.stream_ids) == (1, "Send", [1, "a"], "7", ["s1"])
    assert "invocationId" not in J(s.invocation("Send", []))
    m = s.parse(s.stream_invocation("0", "GetTagValuesStream", [{"a": None}])[:-1])
    assert (m.type, m.invocation_id, m.target, m.arguments) == (4, "0", "GetTagValuesStream", [{"a": None}])
    assert J(s.stream_item("3", {"x": 1})) == {"type": 2, "invocationId": "3", "item": {"x": 1}}
    assert J(s.completion("3")) == {"type": 3, "invocationId": "3"}
    assert J(s.completion("3", result=None)) == {"type": 3, "invocationId": "3", "result": None}
    assert J(s.completion("3", error="bad")) == {"type": 3, "invocationId": "3", "error": "bad"}
    assert J(s.cancel_invocation("3")) == {"type": 5, "invocationId": "3"}
    assert J(s.ping()) == {"type": 6}
    assert J(s.close()) == {"type": 7}
    assert J(s.close("boom", True)) == {"type": 7, "error": "boom", "allowReconnect": True}
    assert J(s.handshake_response()) == {}
    assert J(s.handshake_response("no")) == {"error": "no"}
    # non-ASCII text survives
    assert s.parse(s.invocation("Send", ["grüße"])[:-1]).arguments == ["grüße"]


def test_parse_errors_say_what():
    for rec, word in (
        (b'{"target":"x"}', "type"),
        (b'{"type":"1"}', "type"),
        (b'{"type":true}', "type"),
        (b'{"type":1,"arguments":[]}', "target"),
        (b'{"type":1,"target":"x"}', "arguments"),
        (b'{"type":1,"target":"x","arguments":{}}', "arguments"),
        (b'{"type":4,"target":"x","arguments":[]}', "invocationId"),
        (b'{"type":2,"invocationId":"1"}', "item"),
        (b'{"type":2,"item":1}', "invocationId"),
        (b'{"type":3,"invocationId":"1","result":1,"error":"e"}', "both"),
        (b'{"type":3,"invocationId":1}', "invocationId"),
        (b'{"type":7,"allowReconnect":"yes"}', "allowReconnect"),
        (b'{"type":1,"target":"x","arguments":[],"streamIds":"1"}', "streamIds"),
        (b"not json", "JSON"),
        (b"[1]", "object"),
        (b"\xff\xfe", "UTF-8"),
    ):
        e = raises(s.SignalRError, s.parse, rec)
        assert word in str(e), (rec, str(e))


def test_unknown_types_parse_as_bare_messages():
    assert s.parse(b'{"type":8,"sequenceId":1}').type == 8
    assert s.parse(b'{"type":42}').type == 42


def test_records_several_per_frame_and_split_anywhere():
    stream = b"".join(r + RS for r in SPEC)
    assert s.Records().feed(stream) == SPEC
    for cut in range(1, len(stream)):
        r = s.Records()
        got = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert got == SPEC, cut
    r = s.Records()
    got = []
    for i in range(len(stream)):  # byte by byte
        got += r.feed(stream[i:i + 1])
    assert got == SPEC and r.pending() == 0


def test_records_input_kinds_and_empty_records():
    r = s.Records()
    assert r.feed(RS + RS + b'{"type":6}' + RS + RS) == [b'{"type":6}']
    assert r.feed('{"type":6}\x1e') == [b'{"type":6}']
    assert r.feed(bytearray(b'{"type":6}\x1e{"ty')) == [b'{"type":6}']
    assert r.pending() == 4
    assert r.feed(memoryview(b'pe":6}\x1e')) == [b'{"type":6}']


def test_records_bounded():
    r = s.Records(16)
    assert r.feed(b"x" * 16 + RS) == [b"x" * 16]
    raises(s.SignalRError, r.feed, b"x" * 17 + RS)
    r.feed(b"x" * 10)
    e = raises(s.SignalRError, r.feed, b"x" * 7)
    assert "16" in str(e)
    assert r.pending() == 0  # the over-long record is dropped, the next one parses
    r.feed(b"x" * 10)
    raises(s.SignalRError, r.feed, b"x" * 7 + RS)
    assert r.feed(b"{}" + RS) == [b"{}"]


def test_big_integers_exact():
    text = '{"a":18446744073709551615,"b":-9223372036854775808,"c":18446744073709551616}'
    v = s.loads(text)
    assert v["a"] == 18446744073709551615 and v["c"] == 18446744073709551616
    assert v["b"] == -9223372036854775808
    # the fallback for ports whose ints stop at 64 bits: long literals become exact strings,
    # floats and text inside strings stay untouched
    q = s.quote_big_ints('{"a":18446744073709551615,"s":"12345678901234567890",'
                         '"f":1.2345678901234567890,"e":12345678901234567890e3,"n":-9223372036854775809,'
                         '"k":"\\"12345678901234567890","small":123}')
    v = json.loads(q)
    assert v["a"] == "18446744073709551615" and v["n"] == "-9223372036854775809"
    assert v["s"] == "12345678901234567890" and v["k"] == '"12345678901234567890'
    assert isinstance(v["f"], float) and isinstance(v["e"], float) and v["small"] == 123
    assert s.quote_big_ints('{"a":1}') == '{"a":1}'


def _connected(**kw):
    h = s.HubConnection(**kw)
    h.start(0)
    assert J(h.data_to_send(0)) == {"protocol": "json", "version": 1}
    assert h.data_to_send(0) == b""
    ev = h.receive(b"{}" + RS, 10)
    assert [e.type for e in ev] == [s.HANDSHAKE] and h.state == s.CONNECTED
    return h


def test_hub_handshake_then_messages_in_one_frame():
    h = s.HubConnection()
    raises(s.SignalRError, h.stream, "x", [])  # not connected yet
    h.start(0)
    h.data_to_send(0)
    ev = h.receive(b'{}\x1e{"type":1,"target":"Hello","arguments":[1]}\x1e{"type":6}\x1e', 5)
    assert [e.type for e in ev] == [s.HANDSHAKE, s.INVOCATION]
    assert ev[1].target == "Hello"


def test_hub_stream_items_and_completion():
    h = _connected()
    iid = h.stream("GetTagValuesStream", [{"x": 1}])
    assert iid == "0" and h.streams == {"0": "GetTagValuesStream"}
    assert J(h.data_to_send(20)) == {"type": 4, "invocationId": "0", "target": "GetTagValuesStream",
                                     "arguments": [{"x": 1}]}
    ev = h.receive(b'{"type":2,"invocationId":"0","item":{"a":1}}\x1e{"type":2,"invocationId":"0","it', 30)
    assert len(ev) == 1 and ev[0].item == {"a": 1}
    ev = h.receive(b'em":2}\x1e{"type":3,"invocationId":"0","error":"bad"}\x1e', 31)
    assert [(e.type, e.item, e.error) for e in ev] == [(2, 2, None), (3, None, "bad")]
    assert h.streams == {}
    assert h.invoke("Add", [1, 2]) == "1"
    assert h.invoke("Log", ["x"], expect_result=False) is None
    out = h.data_to_send(40)
    assert out.count(RS) == 2
    h.cancel("1")
    assert J(h.data_to_send(41)) == {"type": 5, "invocationId": "1"}


def test_hub_ping_when_idle_and_server_timeout():
    h = _connected(keep_alive_interval=15000, server_timeout=30000)
    assert h.tick(14999) == [] and h.data_to_send(14999) == b""
    assert h.tick(15000) == []
    assert J(h.data_to_send(15000)) == {"type": 6}
    h.tick(15001)
    assert h.data_to_send(15001) == b""  # sent 1 ms ago: no second ping
    assert h.receive(s.ping(), 20000) == []  # a server ping is no event but proves it alive
    assert h.tick(49999) == []
    ev = h.tick(50000)
    assert len(ev) == 1 and ev[0].type == s.CLOSE and ev[0].local
    assert ev[0].error == s.SERVER_TIMEOUT_TEXT and ev[0].allow_reconnect
    assert h.state == s.CLOSED
    assert h.receive(b"{}" + RS, 50001) == []  # closed: input ignored
    assert h.tick(90000) == []


def test_hub_handshake_refused_and_timeout():
    h = s.HubConnection(handshake_timeout=1000)
    h.start(0)
    ev = h.receive(b'{"error":"The protocol \'json\' is not supported."}\x1e', 5)
    assert ev[0].type == s.CLOSE and "handshake refused" in ev[0].error and not ev[0].allow_reconnect
    h.start(100)  # a new connection resets everything
    assert h.state == s.HANDSHAKING and h.error is None
    assert h.tick(1099) == []
    ev = h.tick(1100)
    assert ev[0].type == s.CLOSE and "timed out" in ev[0].error


def test_hub_server_close_and_bad_records():
    h = _connected()
    ev = h.receive(b'{"type":7,"error":"bye","allowReconnect":true}\x1e{"type":6}\x1e', 20)
    assert [(e.type, e.error, e.allow_reconnect, e.local) for e in ev] == [(7, "bye", True, False)]
    assert h.state == s.CLOSED and h.error == "bye"
    raises(s.SignalRError, h.invoke, "x", [])
    h = _connected()
    ev = h.receive(b'{"type":2,"item":1}\x1e', 20)
    assert ev[0].type == s.CLOSE and ev[0].local and "invocationId" in ev[0].error
    h = _connected(max_record_size=64)
    ev = h.receive(b"x" * 65, 20)
    assert ev[0].type == s.CLOSE and "64" in ev[0].error
    h = _connected()
    assert h.receive(b'{"type":9,"sequenceId":3}\x1e{"type":8,"sequenceId":1}\x1e', 20) == []
    ev = h.connection_lost("reset by peer")
    assert ev.type == s.CLOSE and ev.local and ev.allow_reconnect and h.state == s.DISCONNECTED
    assert h.connection_lost() is None


def _nested(depth, inner="1"):
    return "[" * depth + inner + "]" * depth


def test_deep_json_refused_before_parsing_with_the_path():
    # issue 14: deep JSON let RecursionError through on CPython (and costs a list per level on
    # MicroPython); now a SignalRError naming the path, at any depth over MAX_DEPTH
    ok = '{"type":1,"target":"t","arguments":%s}' % _nested(s.MAX_DEPTH - 1)
    assert s.parse(ok.encode()).arguments
    for depth in (s.MAX_DEPTH, 100, 1500):
        rec = '{"type":1,"target":"t","arguments":[{"a":%s}]}' % _nested(depth)
        e = raises(s.SignalRError, s.parse, rec.encode())
        assert "deeper than %d" % s.MAX_DEPTH in str(e) and "$.arguments[0].a" in str(e), str(e)
    e = raises(s.SignalRError, s.loads, "[1,[2," + _nested(40) + "]]")
    assert "($[1][1][0][0]" in str(e), str(e)
    # brackets inside strings (escaped quotes too) do not count
    text = r'{"a":"%s","b":"\\","c":"\\\"[[[["}' % ("[" * 100)
    v = s.loads(text)
    assert v["a"] == "[" * 100 and v["b"] == "\\" and v["c"] == '\\"[[[['


def test_hub_deep_record_is_a_local_close_not_an_exception():
    h = _connected()
    ev = h.receive(('{"type":2,"invocationId":"1","item":%s}' % _nested(500)).encode() + RS, 20)
    assert [(e.type, e.local) for e in ev] == [(s.CLOSE, True)] and h.state == s.CLOSED
    assert "deeper than" in ev[0].error


def test_records_from_a_memoryview_without_copying_the_message():
    data = bytearray(b'{"type":6}' + RS + b'{"type":7}' + RS + b'{"ty')
    r = s.Records()
    assert r.feed(memoryview(data)) == [b'{"type":6}', b'{"type":7}']
    assert r.pending() == 4
    big = bytearray(b"x" * 1500 + RS)
    assert r.feed(memoryview(big)[:1501]) == [b'{"ty' + b"x" * 1500]
    assert (s.SignalRError,) == s.ERRORS
