# Seeded fuzz of the decoders of what the platform sends (issue 14): mqttpkt (Reader and the
# packet parsers), smartrest, binrest, templates (the agent fed hostile messages:
# test_agent_inbound.py). Each
# fuzz_<decoder>(rng, n) feeds n random and mutated inputs (bit flips, truncation, splicing,
# huge declared lengths, 5000-digit integers, rows of hundreds of fields) to its decoder, takes
# the decoder's documented errors (its module's ERRORS) as a rejection and lets anything else
# propagate; it returns {"inputs", "accepted", "rejected"}. The tests below run a seeded subset on
# both runtimes; tools/fuzz.py runs the big counts (docs/guides/device-tests.md).
from dt import Rng, raises
from wsfuzz import _count, _pick, inputs, mutate

from microcot import binrest, mqttpkt, smartrest, templates, utf8


def _big():
    """The huge tokens of the fuzz: more digits than any integer field may have, a row of more
    fields than a row may have (the 5000-digit case has a test of its own: 5 KB in one piece is
    much of a small board's heap)."""
    return [b"9" * 40, b"1" + b",x" * 300]


# -- mqttpkt -----------------------------------------------------------------------------------

def _mqtt_seeds():
    P = mqttpkt
    return [
        bytes((P.CONNACK, 2, 0, 0)), bytes((P.CONNACK, 2, 1, 5)),
        bytes(P.publish("mr/8949", b"202,1,5,10,echo hi")),
        bytes(P.publish("br/8949", b"45,1,x", qos=1, pid=7)),
        bytes(P.publish("mr/8949", b"x" * 200, qos=2, pid=65535, dup=True, retain=True)),
        bytes(P.ack(P.PUBACK, 1)), bytes(P.ack(P.PUBREC, 2)), bytes(P.ack(P.PUBREL, 3)),
        bytes(P.ack(P.PUBCOMP, 4)), bytes(P.ack(P.UNSUBACK, 5)),
        bytes((P.SUBACK, 3, 0, 9, 1)), bytes((P.SUBACK, 3, 0, 9, 0x80)),
        bytes((P.PINGRESP, 0)), bytes((P.DISCONNECT, 0)),
    ]


_MQTT_TOKENS = (b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x01", b"\x30",
                b"\x32\x7f", b"\x00\x00", b"\xf0", b"\x00", b"\x90\x02\x00\x00")


def _mqtt_parse(first, body):
    # what a driver does with a complete packet: the parser of its type
    P = mqttpkt
    t = first & 0xF0
    if t == P.CONNACK:
        P.parse_connack(body)
    elif t == P.PUBLISH:
        qos, pid, end, start = P.parse_publish(first, body)
        assert 2 < end <= start <= len(body) and (pid > 0) == (qos > 0)
    elif t == P.SUBACK:
        P.parse_suback(body)
    elif t in (P.PUBACK, P.PUBREC, 0x60, P.PUBCOMP, P.UNSUBACK):
        assert P.parse_pid("ack", body) > 0


def fuzz_mqttpkt(rng, n):
    """Byte streams of 1 to 3 (mutated) packets through a Reader in reads of random sizes, each
    complete packet through the parser of its type."""
    P = mqttpkt
    seeds = _mqtt_seeds()
    ok = 0
    for data in inputs(rng, n, seeds, _MQTT_TOKENS):
        if rng.below(3) == 0:
            data = data + mutate(rng, _pick(rng, seeds), seeds, _MQTT_TOKENS)
        r = P.Reader(limit=_pick(rng, (16, 64, 300, 16384)), chunk=_pick(rng, (8, 64, 1024)))
        step = 1 + rng.below(40)
        i = 0
        try:
            while i < len(data):
                mv = r.want()
                k = min(len(mv), len(data) - i, step)
                mv[:k] = data[i:i + k]
                i += k
                pkt = r.got(k)
                if pkt is not None:
                    _mqtt_parse(pkt[0], pkt[1])
            ok += 1
        except P.ERRORS:
            pass
    return _count(n, ok)


# -- smartrest ---------------------------------------------------------------------------------

_SR_SEEDS = (
    b"87,1,myXID\n601,2,89490200001234567890,12345",
    b"50,2,404,Not Found",
    b'40,"No template for this X-ID."',
    b"20,12345",
    b"41,3,Bad value type: FOO\r\n41,Duplicate message identifiers are not allowed",
    b'87,3,microcotT\n202,1,7,10,"echo ""hi"", there"\n203,1,9,11\n206,1,77,hot,ACTIVE,10',
    b'70,1,8949,t-emu,device_8949,"pa,ss\nword"',
    b"86,60,5,STOP\n42,1,Malformed request line\n45,2,Invalid message arguments",
    b"205,1,t-emu,emu.example.com\n\n\n207,,5,10,fw,1.0,http://x/fw.bin,",
)
_SR_TOKENS = (b",", b'"', b'""', b"\n", b"\r", b"\r\n", b"\t", b" ", b"\x00", b"\xff",
              b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"0", b"4294967296", b"87,", b"41,")


def fuzz_smartrest(rng, n):
    """Response bodies (bytes, sometimes as str) through parse, parse with response ids,
    records() and parse_rows."""
    seeds = list(_SR_SEEDS) + _big()
    tokens = _SR_TOKENS + tuple(_big())
    ok = 0
    for data in inputs(rng, n, seeds, tokens):
        how = rng.below(4)
        body = data
        if rng.below(4) == 0 and utf8.bad(data) < 0:
            body = data.decode()  # as text (MicroPython would also decode surrogates)
        try:
            if how == 0:
                for r in smartrest.parse(body):
                    assert isinstance(r.code, int) and (r.line is None or r.line >= 0)
            elif how == 1:
                smartrest.parse(body, response_ids=(202, 206), max_rows=4)
            elif how == 2:
                for r in smartrest.records(body):
                    assert r.code >= 0
            else:
                for row in smartrest.parse_rows(body, max_rows=16):
                    assert row and len(row) <= smartrest.MAX_FIELDS
            ok += 1
        except smartrest.ERRORS as e:
            assert e.line >= 1 and e.column >= 1
    return _count(n, ok)


# -- binrest -----------------------------------------------------------------------------------

_TABLE = {
    ("myXID", 102): [binrest.UNSIGNED, binrest.NUMBER],
    ("myXID", 100): [binrest.STRING],
    ("myXID", 0): [],
    ("myXID", 65535): [binrest.STRING, binrest.INTEGER, binrest.DATE, binrest.STRING],
    ("x", 1): [binrest.NUMBER, binrest.NUMBER],
}


def _lookup(xid, tid):
    return _TABLE.get((xid, tid))


def _bin_seeds():
    B = binrest
    return [
        B.encode("myXID", 102, _TABLE[("myXID", 102)], [4711, 21.5]),
        B.encode("myXID", 100, [B.STRING], ["Kessel \u00fcberhitzt"]),
        B.encode_many([("myXID", 0, [], []), ("x", 1, _TABLE[("x", 1)], [-1.5e38, 0.0]),
                       ("myXID", 65535, _TABLE[("myXID", 65535)], ["a", -2**31, 2**32 - 1, ""])]),
        b"unknownXID\x00\x00\x01",
    ]


_BIN_TOKENS = (b"\x00", b"\x00\x00", b"myXID\x00", b"\x7f\x80\x00\x00", b"\xff\xc0\x00\x00",
               b"\xff", b"\xc3", b"\x00\x66", b"\xff\xff")


def fuzz_binrest(rng, n):
    """Payloads of 1 to 3 (mutated) binary messages through decode with a template table."""
    seeds = _bin_seeds()
    ok = 0
    for data in inputs(rng, n, seeds, _BIN_TOKENS):
        try:
            out = binrest.decode(data, _lookup)
            for xid, tid, values in out:
                assert len(values) == len(_TABLE[(xid, tid)])
            ok += 1
        except binrest.ERRORS as e:
            assert e.code in (42, 43, 45) and e.index >= 1
    return _count(n, ok)


# -- templates ---------------------------------------------------------------------------------

_TPL_SEEDS = (
    b"15,myXID\n10,100,GET,/identity/externalIds/c8y_Serial/%%,,application/json,%%,STRING,\n"
    b'10,102,POST,/measurement/measurements,application/json,,%%,UNSIGNED NUMBER NOW,'
    b'"{""source"":{""id"":""%%""},""c8y_T"":{""T"":{""value"":%%}},""time"":""%%""}"\n'
    b"11,600,$.externalId,$.managedObject.id,$.managedObject.id\n"
    b"10,500,GET,/devicecontrol/operations?status=PENDING,,,,,",
    b"15,X1\n11,202,$.operations,$.c8y_Command,$.id,$.deviceId,$.c8y_Command.text\r\n"
    b"11,203,,$.c8y_Restart,$.id,$.deviceId\n10,114,PUT,/alarm/alarms/%%,application/json,"
    b'application/json,%%,UNSIGNED STRING,"{""status"":""%%""}"',
    b"15,microcotT\n\n10,4294967295,DELETE,/x/%%,,,%%,UNSIGNED,\n",
)
_TPL_TOKENS = (b",", b'"', b"\n", b"\r", b"%%", b"$.", b"[", b"]", b"?", b"*", b"..", b"15,",
               b"10,", b"11,", b"GET", b"POST", b"STRING ", b"NOW", b"\xff", b"4294967296",
               b"0000000000000000000001")


def fuzz_templates(rng, n):
    """Registration bodies (mutated) through Collection.from_body."""
    seeds = list(_TPL_SEEDS)
    tokens = _TPL_TOKENS + tuple(_big())
    ok = 0
    for data in inputs(rng, n, seeds, tokens):
        try:
            c = templates.Collection.from_body(data)
            for t in c:
                assert 0 <= t.tid <= 0xFFFFFFFF
            ok += 1
        except templates.ERRORS as e:
            assert e.code == 41 and e.message
    return _count(n, ok)


# -- the suite's subset ------------------------------------------------------------------------
# sized so a board runs each in a few seconds; the seeds differ per decoder

def _run(fn, seed, n):
    got = fn(Rng(seed), n)
    assert got["inputs"] == n and got["accepted"] + got["rejected"] == n, got
    assert got["accepted"] and got["rejected"], got  # both paths are exercised
    return got


def test_fuzz_mqttpkt_subset():
    _run(fuzz_mqttpkt, 14001, 300)


def test_fuzz_smartrest_subset():
    _run(fuzz_smartrest, 14002, 300)


def test_fuzz_binrest_subset():
    _run(fuzz_binrest, 14003, 300)


def test_fuzz_templates_subset():
    _run(fuzz_templates, 14004, 200)


def test_every_decoder_documents_its_errors():
    for mod, errs in ((mqttpkt, (mqttpkt.MQTTProtocolError,)), (smartrest, (smartrest.Error,)),
                      (binrest, (binrest.Error,)), (templates, (templates.TemplateError,))):
        assert errs == mod.ERRORS, mod
    assert issubclass(mqttpkt.MQTTPacketTooLarge, mqttpkt.ERRORS)
    for e in (smartrest.Error, binrest.Error, templates.TemplateError):
        assert issubclass(e, ValueError)  # callers that caught ValueError still catch them


# -- the cases -------------------------------------------------------------------------

def test_every_csv_defect_of_a_registration_is_a_template_error():
    TE = templates.TemplateError
    for body, line, where in (
        (b'15,X1\n10,100,GET,"/a,,,,,', 2, "column 12, field 4"),  # unterminated quote
        (b'15,X1\n10,100,GET,"/a"x,,,,,', 2, "column 16, field 4"),  # text after the quote
        (b'15,X1\n10,100,GET,/a",,,,,', 2, "column 14, field 4"),  # quote in an unquoted field
        (b"15,X1\n10,100,GET,/a\r,,,,,", 2, "column 14, field 4"),  # bare CR
        (b"15,X1\n10,100,GET,/\xff,,,,,", 2, "column 13"),  # not UTF-8
        (b"15,X1\n11,100,,$.a" + b",$.b" * 300, 2, "field 257"),  # a row over MAX_FIELDS
    ):
        e = raises(TE, templates.Collection.from_body, body)
        assert e.message == templates.E_CSV and e.line == line, (body[:30], str(e))
        assert e.detail.startswith(where) or where in e.detail, (where, e.detail)
    for body in (b"10,100,GET,/a,,,,,", b"15,X1,extra\n10,100,GET,/a,,,,,", b"15,12345",
                 b"15,", b"", b"15,my XID"):
        e = raises(TE, templates.Collection.from_body, body)
        assert e.message == templates.E_XID and e.line == 1, (body, str(e))
    e = raises(TE, templates.Collection.from_rows, [["10", "100", "GET", "/a", "", "", "", "", ""]])
    assert e.message == templates.E_XID


def test_a_5000_digit_id_is_refused_by_its_length():
    import gc

    gc.collect()
    digits = b"9" * 5000
    e = raises(templates.TemplateError, templates.Collection.from_body,
               b"15,X1\n10," + digits + b",GET,/a,,,,,")
    assert e.message == templates.E_ID and e.line == 2 and len(str(e)) < 200
    raises(templates.TemplateError, templates.Collection.from_body,
           b"15,X1\n10,00000000000" + digits + b",GET,/a,,,,,")
    assert templates.Collection.from_body(b"15,X1\n10,0004294967295,GET,/a,,,,,").request(
        4294967295) is not None  # leading zeros are not digits of the value
    e = raises(smartrest.Error, smartrest.parse, digits + b",1")
    assert e.line == 1 and e.column == 1 and "at most 10 digits" in str(e) and len(str(e)) < 200
    e = raises(smartrest.Error, smartrest.parse, b"50,1,ok\n202," + digits + b",5")
    assert (e.line, e.column) == (2, 5)
    # 41's line number is optional: a field that is not one is the message
    assert smartrest.parse(b"41," + digits) == [smartrest.Record(41, None, [digits.decode()])]
    raises(ValueError, smartrest.check_xid, digits.decode())  # all digits, however many
    raises(ValueError, smartrest.request, "X1", [[digits.decode()]])


def test_rows_and_fields_are_bounded():
    row = b"202,1" + b",x" * (smartrest.MAX_FIELDS - 2)
    assert len(smartrest.parse(row)[0].values) == smartrest.MAX_FIELDS - 2
    e = raises(smartrest.Error, smartrest.parse, b"20,1\n" + row + b",y")
    assert e.line == 2 and "more than %d fields" % smartrest.MAX_FIELDS in str(e)
    row = None
    many = b"20,1\n" * (smartrest.MAX_ROWS + 1)
    e = raises(smartrest.Error, smartrest.parse, many)
    assert e.line == smartrest.MAX_ROWS + 1 and "rows" in str(e)
    assert sum(1 for _ in smartrest.records(many * 8)) == 8 * (smartrest.MAX_ROWS + 1)
    assert len(smartrest.parse(b"20,1\n" * 3, max_rows=None)) == 3
    raises(smartrest.Error, smartrest.parse_rows, b"a\nb\nc", max_rows=2)
    got = []
    e = raises(smartrest.Error, lambda: [got.append(r.code) for r in smartrest.records(
        b'20,1\n21,2\n"22')])
    assert got == [20, 21] and e.line == 3  # records() yields the rows before the defect


def test_a_reader_out_of_memory_is_left_between_packets():
    import sys

    if sys.implementation.name == "cpython":
        return  # CPython would allocate the 64 MiB; a board's heap cannot
    r = mqttpkt.Reader(limit=1 << 27, chunk=1 << 27)  # the whole declared body at once
    hdr = b"\x30\x80\x80\x80\x20"  # 64 MiB declared
    try:
        for k in range(len(hdr)):
            r.want()[:1] = hdr[k:k + 1]
            r.got(1)
    except MemoryError:
        pass
    else:
        raise AssertionError("64 MiB allocated")
    assert not r.busy() and r.rl == -1 and r._body is None  # before: rl set, no buffer
    pkt = None
    for b in b"\xd0\x00":
        r.want()[:1] = bytes((b,))
        pkt = r.got(1)
    assert pkt == (0xD0, b"")


def test_utf8_is_strict_alike_on_both_runtimes():
    # MicroPython's decoder takes surrogates (ED A0 80), which CPython's refuses: the decoders
    # check for themselves, so a body is text or not the same way on a board and on a host
    for bad, col in ((b"\xed\xa0\x80", 6), (b"\xc0\x80", 6), (b"\xe0\x80\x80", 6),
                     (b"\xf0\x80\x80\x80", 6), (b"\xf4\x90\x80\x80", 6), (b"\xf5", 6),
                     (b"ok\xed\xbf\xbf", 8), (b"\xe2\x82", 6), (b"\x80", 6)):
        e = raises(smartrest.Error, smartrest.parse, b"20,1\n41,1," + bad)
        assert (e.line, e.column) == (2, col) and "UTF-8" in str(e), (bad, str(e))
        e = raises(binrest.Error, binrest.decode, b"myXID\x00\x00\x64" + bad + b"\x00", _lookup)
        assert e.code == 45, bad
    for good in ("\u00e4", "\u20ac", "\ud7ff", "\ue000", "\U0001d11e", "\U0010ffff"):
        assert smartrest.parse(("41,1," + good).encode())[0].values == [good]
        assert binrest.decode(b"myXID\x00\x00\x64" + good.encode() + b"\x00", _lookup) == [
            ("myXID", 100, [good])]


def test_a_header_claiming_16_kib_costs_a_chunk_not_16_kib():
    import gc

    P = mqttpkt
    r = P.Reader()  # the client's default limit, 16 KiB
    hdr = b"\x30\xf9\x7f"  # PUBLISH, remaining length 16377: within the limit
    gc.collect()
    before = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
    for k in range(len(hdr)):
        mv = r.want()
        mv[:1] = hdr[k:k + 1]
        assert r.got(1) is None
    mv = None
    grown = (gc.mem_alloc() - before) if hasattr(gc, "mem_alloc") else 0
    assert len(r._body) == P.CHUNK and r.busy(), len(r._body)
    assert grown < P.CHUNK + 512, grown
    # the declared bytes still arrive whole, in reads of any size, the buffer a chunk ahead
    r = P.Reader(limit=3000, chunk=256)
    body = b"\x00\x04mr/X" + (bytes(range(256)) * 12)[:2990]
    data = b"\x30" + bytes((len(body) & 0x7F | 0x80, len(body) >> 7)) + body
    i = 0
    pkt = None
    while pkt is None:
        mv = r.want()
        if r.rl > 0:
            assert len(r._body) <= i - 3 + 256
        k = min(len(mv), 100)
        mv[:k] = data[i:i + k]
        i += k
        pkt = r.got(k)
    assert pkt[0] == 0x30 and bytes(pkt[1]) == body and not r.busy() and i == len(data)
    assert P.parse_publish(pkt[0], pkt[1])[2] == 6
