# KICS tag values (microcot.kics): the seed 001 examples decoded, every field type, exact 64-bit
# integers, the subscription argument, and the sans-I/O Session fed with SignalR bytes.
import gc
import json

from dt import raises, skip

from microcot import kics as k
from microcot import signalr as s

RS = b"\x1e"

# seed 001, "Example of a forwarded tag value in JSON format", verbatim (ts and mask are 2**64)
SEED_VALUE = """{
"n": "TagStructure1",
"ts": 18446744073709551616,
"dn": "r",
"mp": 1,
"d":
{
"value":
{
"t": "d",
"v": 3.1415,
"x": 1
},
"quality":
{
"t": "s",
"v": "good",
"m": "q"
},
"mask":
{
"t": "u",
"v": 18446744073709551616
},
"enumfield":
{
"t": "e",
"n": "SwitchState",
"v": 0,
"s": "Off"
},
"strucfield":
{
"t": "st",
"v":
{
"v1":
{
"t": "d",
"v": 3.1415
},
"q2":
{
"t": "s",
"v": "good",
"m": "q"
}
}
},
"unionfield":
{
"t": "un",
"v":
{
"_":
{
"t": "u",
"v": 42
},
"low4bits":
{
"t": "u",
"v": 10
},
"high4bits":
{
"t": "u",
"v": 2
}
}
}
}
}"""

# seed 001, "Example subscription confirmation"
SEED_CONFIRMATION = ('{ "confirmation": { "result": "ok", "tagIdentifier": { "tagName": '
                     '"Asdu_1_object_1001", "assetName": "Asset 079" }, "tagId": 102 } }')
# seed 001, "Example request argument"
SEED_REQUEST = ('{ "tagIdentifiers": [ { "tagName": "Asdu_1_object_1001", "assetName": "Asset 079" },'
                ' { "tagName": "Asdu_1_object_1003", "assetName": "Asset 079" } ], "streamConfig": '
                '{ "samplingRateHz": 1 } }')

U64_MAX = 18446744073709551615
I64_MIN = -9223372036854775808


def _check_seed_value(tv):
    assert tv.type_name == "TagStructure1" and tv.direction == "r" and tv.mp == 1
    assert tv.ts == 18446744073709551616
    assert sorted(tv.fields) == ["enumfield", "mask", "quality", "strucfield", "unionfield", "value"]
    assert tv.main is tv["value"] and tv.x == 3.1415 and tv["value"].type == "d"
    assert tv["mask"].value == 18446744073709551616 and tv["mask"].type == "u"
    e = tv["enumfield"].value
    assert (e.name, e.value, e.string) == ("SwitchState", 0, "Off")
    assert e == k.EnumValue("SwitchState", 0, "Off")
    st = tv["strucfield"]
    assert st.type == "st" and st["v1"].value == 3.1415 and st["q2"].marker == "q"
    assert tv.get("strucfield.q2").path == "strucfield.q2"
    un = tv["unionfield"]
    assert un.type == "un" and (un["_"].value, un["low4bits"].value, un["high4bits"].value) == (42, 10, 2)
    # markers: the shallowest field carrying each; every marked field in `marked`
    assert tv.markers["q"] is tv["quality"] and tv.markers["q"].value == "good"
    assert [f.path for f in tv.marked] == ["quality", "strucfield.q2"]
    assert not any(f.main for f in (tv["quality"], tv["mask"], st["v1"]))
    assert tv.to_py()["unionfield"] == {"_": 42, "low4bits": 10, "high4bits": 2}
    assert tv.to_py()["enumfield"] == ("SwitchState", 0, "Off")
    assert tv.get("nope") is None and tv.get("mask.x") is None


def test_seed_value_decodes():
    _check_seed_value(k.decode_tag_value(json.loads(SEED_VALUE), 102))


def test_seed_value_as_json_text_decodes_alike():
    # the seed writes "tagValue": "<JSON object with tag data>": a JSON string holding the object
    tv = k.decode_tag_value(SEED_VALUE, 102)
    _check_seed_value(tv)
    item = json.loads(json.dumps({"value": {"tagId": 102, "tagValue": SEED_VALUE}}))
    tv = k.parse_item(item, {102: ("Asset 079", "Asdu_1_object_1001")})
    assert tv.tag == ("Asset 079", "Asdu_1_object_1001") and tv.tag_id == 102
    _check_seed_value(tv)


def test_seed_confirmation_and_request():
    c = k.parse_item(json.loads(SEED_CONFIRMATION))
    assert c.ok and c.result == "ok" and c.tag == ("Asset 079", "Asdu_1_object_1001") and c.tag_id == 102
    c = k.parse_item({"confirmation": {"result": "notFound",
                                       "tagIdentifier": {"tagName": "T", "assetName": "A"}}})
    assert not c.ok and c.result == k.NOT_FOUND and c.tag == ("A", "T") and c.tag_id is None
    req = k.subscription_request([("Asset 079", "Asdu_1_object_1001"),
                                  {"assetName": "Asset 079", "tagName": "Asdu_1_object_1003"}], 1)
    assert req == json.loads(SEED_REQUEST)
    assert k.subscription_request([("a", "t")])["streamConfig"] == {"samplingRateHz": None}
    assert k.subscription_request([("a", "t")], 0.5)["streamConfig"]["samplingRateHz"] == 0.5


def test_subscription_request_errors():
    for tags, rate, word in (
        ([], None, "at least one"),
        ("a/t", None, "list"),
        ([("a", "")], None, "tagIdentifiers[0].tagName"),
        ([("a", "t"), (None, "t")], None, "tagIdentifiers[1].assetName"),
        ([("a", "t", "x")], None, "(assetName, tagName)"),
        ([{"tagName": "t"}], None, "assetName"),
        ([("a", "t")], 0, "samplingRateHz"),
        ([("a", "t")], -1, "samplingRateHz"),
        ([("a", "t")], "5", "samplingRateHz"),
        ([("a", "t")], True, "samplingRateHz"),
    ):
        e = raises(k.KicsArgumentError, k.subscription_request, tags, rate)
        assert word in str(e), (tags, rate, str(e))


def _field(obj):
    return k.decode_field("f", obj)


def test_every_field_type():
    assert _field({"t": "u", "v": U64_MAX}).value == U64_MAX
    assert _field({"t": "u", "v": "18446744073709551615"}).value == U64_MAX  # sent as a string
    assert _field({"t": "u", "v": 0}).value == 0
    assert _field({"t": "i", "v": I64_MIN}).value == I64_MIN
    assert _field({"t": "i", "v": "-9223372036854775808"}).value == I64_MIN
    assert _field({"t": "i", "v": 7.0}).value == 7 and isinstance(_field({"t": "i", "v": 7.0}).value, int)
    assert _field({"t": "b", "v": True}).value is True
    assert _field({"t": "b", "v": 0}).value is False
    d = _field({"t": "d", "v": 2})
    assert d.value == 2.0 and isinstance(d.value, float)
    assert _field({"t": "d", "v": -1.5e-300}).value == -1.5e-300
    assert _field({"t": "d", "v": "Infinity"}).value == float("inf")
    nan = _field({"t": "d", "v": "NaN"}).value
    assert nan != nan
    assert _field({"t": "s", "v": "Grüße ✓"}).value == "Grüße ✓"
    assert _field({"t": "t", "v": 1700000000123456}).value == 1700000000123456
    e = _field({"t": "e", "n": "OpType", "v": 2, "s": "PULSE_OFF"}).value
    assert (e.name, e.value, e.string) == ("OpType", 2, "PULSE_OFF")
    assert _field({"t": "e", "n": "Mode", "v": "A", "s": "Auto"}).value.value == "A"
    f = _field({"t": "st", "v": {"in": {"t": "un", "v": {"_": {"t": "u", "v": U64_MAX},
                                                         "s": {"t": "i", "v": -1}}}}})
    assert f["in"]["_"].value == U64_MAX and f["in"]["s"].value == -1
    assert f["in"]["s"].path == "f.in.s"
    assert _field({"t": "u", "v": 1, "x": 1}).main and not _field({"t": "u", "v": 1, "x": 0}).main
    for code in k.MARKERS:
        assert _field({"t": "s", "v": "", "m": code}).marker == code


def test_decode_errors_name_the_field():
    for obj, words in (
        ({"t": "st", "v": {"a": {"t": "zz", "v": 1}}}, ("f.a", "zz")),
        ({"t": "st", "v": {"a": {"t": "u"}}}, ("f.a", "'v'")),
        ({"t": "u", "v": -1}, ("f", "negative")),
        ({"t": "u", "v": "-5"}, ("f", "negative")),
        ({"t": "u", "v": 1.5}, ("f", "integer")),
        ({"t": "u", "v": 1e30}, ("f", "integer")),
        ({"t": "u", "v": "12a"}, ("f", "integer")),
        ({"t": "i", "v": True}, ("f", "boolean")),
        ({"t": "b", "v": 2}, ("f", "boolean")),
        ({"t": "d", "v": "3.5"}, ("f", "number")),
        ({"t": "s", "v": 5}, ("f", "string")),
        ({"t": "e", "v": 1, "s": "On"}, ("f", "'n'")),
        ({"t": "e", "v": None, "n": "E", "s": "On"}, ("f", "enum")),
        ({"t": "un", "v": [1]}, ("f", "object")),
        ({"t": "s", "v": "", "m": 1}, ("f", "marker")),
        ([1], ("f", "object")),
    ):
        e = raises(k.KicsDecodeError, _field, obj)
        for w in words:
            assert w in str(e), (obj, str(e))
    raises(k.KicsDecodeError, k.decode_tag_value, {"n": "x"})
    raises(k.KicsDecodeError, k.decode_tag_value, "{not json")
    raises(k.KicsDecodeError, k.decode_tag_value, {"d": {}, "dn": "x"})
    raises(k.KicsDecodeError, k.parse_item, {"other": 1})
    raises(k.KicsDecodeError, k.parse_item, {"value": {"tagId": 1}})
    raises(k.KicsDecodeError, k.parse_item, {"confirmation": {"tagId": 1}})
    raises(k.KicsDecodeError, k.parse_item, [])


def test_exact_integers_through_a_signalr_record():
    item = ('{"value":{"tagId":7,"tagValue":{"n":"T","ts":1700000000000001,"d":{'
            '"u":{"t":"u","v":18446744073709551615,"x":1},"i":{"t":"i","v":-9223372036854775808}}}}}')
    rec = ('{"type":2,"invocationId":"0","item":%s}' % item).encode() + RS
    m = s.parse(s.Records().feed(rec)[0])
    tv = k.parse_item(m.item)
    assert tv.x == U64_MAX and tv["i"].value == I64_MIN and tv.ts == 1700000000000001
    # on a port with 64-bit ints only, the record is read with long literals quoted: same result
    m = s.parse(json.loads(s.quote_big_ints(rec[:-1].decode())))
    tv = k.parse_item(m.item)
    assert tv.x == U64_MAX and tv["i"].value == I64_MIN


def test_classify_error():
    for text in ("Excessive number of connections", "HubException: too many connections",
                 "An error about an excessive number of connections."):
        assert isinstance(k.classify_error(text), k.KicsSubscriptionLimitError), text
    e = k.classify_error("tagIdentifiers[0].tagName is required")
    assert type(e) is k.KicsSubscriptionError and "tagName" in str(e)


# -- Session ------------------------------------------------------------------------------------

TAGS = [("Asset 079", "Asdu_1_object_1001"), ("Asset 079", "nope")]


def _rec(obj):
    return json.dumps(obj).encode() + RS


def _item(iid, item):
    return _rec({"type": 2, "invocationId": iid, "item": item})


def _conf(tag, result, tid):
    return {"confirmation": {"result": result, "tagIdentifier": {"assetName": tag[0], "tagName": tag[1]},
                             "tagId": tid}}


class Log:
    def __init__(self):
        self.values = []
        self.status = []
        self.errors = []


def _session(rate=None, **kw):
    log = Log()
    ses = k.Session(TAGS, rate, on_value=log.values.append,
                    on_status=lambda t, r: log.status.append((t, r)), on_error=log.errors.append, **kw)
    return ses, log


def _subscribe(ses, log, now=0):
    ses.connection_made(now)
    assert ses.state == k.HANDSHAKE
    assert json.loads(ses.data_to_send(now)[:-1]) == {"protocol": "json", "version": 1}
    ses.receive(b"{}" + RS, now + 1)
    assert ses.state == k.SUBSCRIBING
    inv = json.loads(ses.data_to_send(now + 1)[:-1])
    assert inv["type"] == 4 and inv["target"] == "GetTagValuesStream"
    assert inv["arguments"] == [ses.request]
    return inv["invocationId"]


def test_session_subscribes_confirms_and_decodes():
    ses, log = _session(2)
    assert ses.request["streamConfig"]["samplingRateHz"] == 2
    iid = _subscribe(ses, log)
    ses.receive(_item(iid, _conf(TAGS[0], "ok", 102)), 5)
    assert ses.state == k.SUBSCRIBING and ses.tag_status[TAGS[1]] is None
    ses.receive(_item(iid, _conf(TAGS[1], "notFound", None)), 6)
    assert ses.state == k.SUBSCRIBED
    assert ses.tag_status == {TAGS[0]: "ok", TAGS[1]: "notFound"}
    assert log.status == [(TAGS[0], "ok"), (TAGS[1], "notFound")]
    ses.receive(_item(iid, {"value": {"tagId": 102, "tagValue": SEED_VALUE}}) +
                _item("other", {"value": {"tagId": 102, "tagValue": SEED_VALUE}}), 7)
    assert len(log.values) == 1 and log.values[0].tag == TAGS[0]
    assert ses.values[TAGS[0]] is log.values[0]
    _check_seed_value(ses.values[TAGS[0]])
    # an item that cannot be decoded is reported and skipped; the stream goes on
    ses.receive(_item(iid, {"value": {"tagId": 102, "tagValue": {"d": {"a": {"t": "?", "v": 1}}}}}), 8)
    assert isinstance(log.errors[-1], k.KicsDecodeError) and not ses.close_requested
    ses.receive(_item(iid, {"value": {"tagId": 555, "tagValue": {"d": {}}}}), 9)
    assert ses.values[555].tag is None  # a tag id the confirmations did not name


def test_session_resubscribes_after_reconnect():
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.receive(_item(iid, _conf(TAGS[0], "ok", 102)), 5)
    ses.connection_lost("reset")
    assert ses.state == k.WAITING and ses.retry
    assert ses.tag_status[TAGS[0]] is None and log.status[-1] == (TAGS[0], None)
    iid2 = _subscribe(ses, log, 1000)  # the same request again, on the new connection
    ses.receive(_item(iid2, _conf(TAGS[0], "ok", 102)) + _item(iid2, _conf(TAGS[1], "ok", 103)), 1005)
    assert ses.state == k.SUBSCRIBED


def test_session_one_subscription_error_is_retried_others_are_not():
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.receive(_rec({"type": 3, "invocationId": iid,
                      "error": "Excessive number of connections: one subscription is active"}), 5)
    assert isinstance(ses.error, k.KicsSubscriptionLimitError) and ses.error is log.errors[-1]
    assert ses.close_requested and ses.retry
    ses.connection_lost()
    assert ses.state == k.WAITING
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.receive(_rec({"type": 3, "invocationId": iid, "error": "tagIdentifiers: bad"}), 5)
    assert type(ses.error) is k.KicsSubscriptionError and not ses.retry and ses.close_requested
    ses.connection_lost()
    assert ses.state == k.FAILED


def test_session_close_timeout_and_handshake():
    ses, log = _session(keep_alive_interval=1000, server_timeout=3000)
    _subscribe(ses, log)
    ses.tick(1001)
    assert json.loads(ses.data_to_send(1001)[:-1]) == {"type": 6}
    ses.tick(3001)
    assert isinstance(ses.error, k.KicsConnectionError) and "timeout" in str(ses.error)
    assert ses.retry and ses.close_requested
    ses, log = _session()
    _subscribe(ses, log)
    ses.receive(_rec({"type": 7, "error": "shutting down"}), 5)
    assert "shutting down" in str(ses.error) and not ses.retry
    ses, log = _session()
    _subscribe(ses, log)
    ses.receive(_rec({"type": 7, "allowReconnect": True}), 5)
    assert ses.retry and ses.close_requested
    ses, log = _session()
    ses.connection_made(0)
    ses.receive(_rec({"error": "The protocol 'json' is not supported."}), 1)
    assert "not supported" in str(ses.error) and not ses.retry
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.receive(_rec({"type": 3, "invocationId": iid}), 5)  # the server ended the stream
    assert isinstance(ses.error, k.KicsConnectionError) and ses.retry


def test_session_confirmation_spelling_and_values_before_confirmations():
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.receive(_item(iid, _conf(("ASSET 079", "asdu_1_object_1001"), "ok", 102)) +
                _item(iid, _conf(("Other", "Tag"), "ok", 7)), 5)
    assert ses.tag_status[TAGS[0]] == "ok" and ses.tag_ids == {102: TAGS[0]}
    assert log.status == [(TAGS[0], "ok")]  # a tag we did not ask for is not reported
    assert ses.state == k.SUBSCRIBING
    ses.receive(_item(iid, {"value": {"tagId": 102, "tagValue": {"d": {}}}}), 6)
    assert ses.state == k.SUBSCRIBED and log.values[0].tag == TAGS[0]


def test_session_subscribe_replaces_while_connected():
    ses, log = _session()
    iid = _subscribe(ses, log)
    ses.subscribe([("A", "B")], 5)
    out = s.Records().feed(ses.data_to_send(10))
    assert [json.loads(r)["type"] for r in out] == [5, 4]
    assert json.loads(out[0])["invocationId"] == iid
    new = json.loads(out[1])
    assert new["arguments"][0]["tagIdentifiers"] == [{"tagName": "B", "assetName": "A"}]
    assert ses.tag_status == {("A", "B"): None} and ses.invocation_id == new["invocationId"]
    raises(k.KicsArgumentError, ses.subscribe, [], None)


def _deep_st(levels):
    f = {"t": "u", "v": 1}
    for _ in range(levels):
        f = {"t": "st", "v": {"a": f}}
    return f


def _deep_st_text(levels):
    # json.dumps' spacing: 100 levels make the issue's 3 KB record
    return '{"t": "st", "v": {"a": ' * levels + '{"t": "u", "v": 1}' + "}}" * levels


def test_deep_st_record_is_a_kics_error():
    # issue 14: a tag value of 100 nested `st` levels (3 KB) raised RuntimeError (recursion) on
    # MicroPython and escaped Session.receive; now a KicsDecodeError naming the path
    assert k.decode_field("f", _deep_st(k.MAX_DEPTH - 1)).value["a"].type == "st"
    for levels in (k.MAX_DEPTH, 100):
        e = raises(k.KicsDecodeError, k.decode_field, "f", _deep_st(levels))
        assert "deeper than %d" % k.MAX_DEPTH in str(e) and "f.a.a" in str(e), str(e)


def test_deep_st_record_through_the_session_asks_for_a_reconnect():
    # the 3 KB record of the issue through SignalR and the Session: no exception, and the
    # client goes to reconnect (the JSON is deeper than signalr.MAX_DEPTH too)
    # (as text: MicroPython's json.dumps itself runs out of stack on 200 levels)
    gc.collect()
    try:  # the test's input, one piece of 2.6 KB, built in place
        rec = bytearray(b'{"type":2,"invocationId":"0","item":{"value":{"tagId":7,"tagValue":'
                        b'{"d":{"f":')
        for _ in range(100):
            rec += b'{"t": "st", "v": {"a": '
        rec += b'{"t": "u", "v": 1}' + b"}}" * 100 + b"}}}}}" + RS
    except MemoryError:
        skip("the 2.6 KB record does not fit in one piece beside kics and signalr unfrozen "
             "(%d B free)" % gc.mem_free())
    assert len(rec) > 2500
    errors = []
    ses = k.Session([("A", "T")], on_error=errors.append)
    ses.connection_made(0)
    ses.receive(b"{}" + RS, 1)
    ses.receive(rec, 2)
    assert ses.close_requested and ses.retry and isinstance(ses.error, k.KicsConnectionError)
    # the same value as JSON text inside the item: the JSON limit of that text applies
    item = {"value": {"tagId": 7, "tagValue": '{"d":{"f":%s}}' % _deep_st_text(100)}}
    raises(k.KicsDecodeError, k.parse_item, item)
    # a value within the JSON limit but over the field limit: skipped, the stream goes on
    ses = k.Session([("A", "T")], on_error=errors.append)
    ses.connection_made(0)
    ses.receive(b"{}" + RS, 1)
    rec = ('{"type":2,"invocationId":"0","item":{"value":{"tagId":7,"tagValue":{"d":{"f":%s}}}}}'
           % _deep_st_text(k.MAX_DEPTH + 2)).encode() + RS
    ses.receive(rec, 2)
    assert not ses.close_requested and isinstance(ses.error, k.KicsDecodeError)


def test_integer_limits_and_unicode_digits():
    for v in ("1" * (k.MAX_INT_DIGITS + 1), "-" + "9" * 5000, 10 ** 60):
        e = raises(k.KicsDecodeError, _field, {"t": "i", "v": v})
        assert "digits" in str(e) and len(str(e)) < 200
    assert _field({"t": "u", "v": "9" * k.MAX_INT_DIGITS}).value == int("9" * k.MAX_INT_DIGITS)
    # "²" passed str.isdigit(), and int() refused it: the field then held the text "²"
    for v in ("²", "1²", "٣"):
        raises(k.KicsDecodeError, _field, {"t": "u", "v": v})
    # an integer beyond any double for a d field raised OverflowError on CPython (MicroPython
    # makes it inf, as it does 1e999)
    try:
        f = _field({"t": "d", "v": 10 ** 400})
    except k.KicsDecodeError:
        pass
    else:
        assert f.value == float("inf")


def test_hostile_values_give_bounded_messages():
    deep = [1]
    for _ in range(300):
        deep = [deep]
    for obj in (deep, {"t": deep, "v": 1}, {"t": "s", "v": deep}, {"t": "s", "v": "x",
                                                                     "m": deep}):
        e = raises(k.KicsDecodeError, _field, obj)
        assert len(str(e)) < 200
    raises(k.KicsDecodeError, k.parse_item, deep)
    e = raises(k.KicsDecodeError, k.parse_item, dict(("k%d" % i, i) for i in range(100)))
    assert len(str(e)) < 200
    # tag names that are not strings could not be looked up (unhashable: TypeError)
    for ti in ({"assetName": [1], "tagName": "T"}, {"assetName": "A", "tagName": {"x": 1}}):
        raises(k.KicsDecodeError, k.parse_item, {"confirmation": {"result": "ok",
                                                                  "tagIdentifier": ti}})
    assert (k.KicsError,) == k.ERRORS
