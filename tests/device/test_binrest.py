from dt import Rng, raises

from microcot import binrest as br
from microcot.binrest import DATE, INTEGER, NUMBER, STRING, UNSIGNED

# The seed spells the X-ID bytes of its example out: 109, 121, 88, 73, 68, 0 ("myXID" + NUL).
SEED_XID = bytes((109, 121, 88, 73, 68, 0))

# Templates of the vectors: (xid, tid) -> types
TEMPLATES = {
    ("myXID", 1): [UNSIGNED, STRING],  # operation SUCCESSFUL: OP-ID, result
    ("myXID", 2): [UNSIGNED],  # operation FAILED: OP-ID
    ("myXID", 300): [STRING, UNSIGNED, INTEGER, NUMBER, DATE],
    ("myXID", 65535): [],
    ("other", 7): [INTEGER, INTEGER],
}


def lookup(xid, tid):
    return TEMPLATES.get((xid, tid))


# Independent, hand-assembled bytes (not produced by the encoder).
OP_RESULT = SEED_XID + bytes((0, 1, 0, 0, 48, 57)) + b"ls -l\x00"  # OP-ID 12345, "ls -l"
ALL_TYPES = (
    SEED_XID
    + bytes.fromhex("012c")  # TID 300
    + bytes.fromhex("c2b04300")  # STRING "°C"
    + bytes.fromhex("ffffffff")  # UNSIGNED 4294967295
    + bytes.fromhex("fffffffe")  # INTEGER -2
    + bytes.fromhex("43c5a000")  # NUMBER 395.25
    + bytes.fromhex("59ba77ec")  # DATE 2017-09-14T12:37:00Z
)
ALL_VALUES = ["°C", 4294967295, -2, 395.25, 1505392620]
ALL_TYPES_LIST = [STRING, UNSIGNED, INTEGER, NUMBER, DATE]


def test_type_constants():
    assert (STRING, UNSIGNED, INTEGER, NUMBER, DATE) == (
        "STRING", "UNSIGNED", "INTEGER", "NUMBER", "DATE")
    assert br.TYPES == (STRING, UNSIGNED, INTEGER, NUMBER, DATE)


def test_encode_seed_shaped_message():
    assert br.encode("myXID", 1, [UNSIGNED, STRING], [12345, "ls -l"]) == OP_RESULT
    assert br.encode("myXID", 2, [UNSIGNED], [12345]) == SEED_XID + b"\x00\x02\x00\x00\x30\x39"
    assert br.encode("myXID", 65535, [], []) == SEED_XID + b"\xff\xff"


def test_encode_every_type():
    assert br.encode("myXID", 300, ALL_TYPES_LIST, ALL_VALUES) == ALL_TYPES
    assert br.encode("myXID", 300, ALL_TYPES_LIST, ["", 0, -2147483648, -1.5, 0]) == (
        SEED_XID + bytes.fromhex("012c" "00" "00000000" "80000000" "bfc00000" "00000000"))
    # ints are fine where a NUMBER is expected
    assert br.encode("x", 0, [NUMBER], [2]) == b"x\x00\x00\x00\x40\x00\x00\x00"


def test_decode_vectors():
    assert br.decode(OP_RESULT, lookup) == [("myXID", 1, [12345, "ls -l"])]
    assert br.decode(ALL_TYPES, lookup) == [("myXID", 300, ALL_VALUES)]
    assert br.decode(bytearray(ALL_TYPES), lookup) == [("myXID", 300, ALL_VALUES)]
    assert br.decode(memoryview(ALL_TYPES), lookup) == [("myXID", 300, ALL_VALUES)]


def test_several_messages_in_one_payload():
    msgs = [
        ("myXID", 2, [UNSIGNED], [1]),
        ("myXID", 1, [UNSIGNED, STRING], [12345, "ls -l"]),
        ("other", 7, [INTEGER, INTEGER], [-1, 1]),
        ("myXID", 65535, [], []),
        ("myXID", 300, ALL_TYPES_LIST, ALL_VALUES),
    ]
    payload = br.encode_many(msgs)
    assert payload == b"".join(br.encode(*m) for m in msgs)
    assert payload[:10] == SEED_XID + b"\x00\x02\x00\x00"
    assert br.decode(payload, lookup) == [(m[0], m[1], m[3]) for m in msgs]
    assert br.encode_many(iter(msgs[:1])) == br.encode(*msgs[0])


def _err(payload, code, message, index, position, param=None):
    e = raises(br.Error, br.decode, payload, lookup)
    assert isinstance(e, ValueError)
    assert e.code == code, (payload, e.code)
    assert e.message == message, (payload, e.message)
    assert str(e) == "%d %s" % (code, message)
    assert (e.index, e.position, e.param) == (index, position, param), (
        payload, e.index, e.position, e.param)


def test_decode_errors_42_no_xid():
    m = "Malformed Request: no X-Id found in binary message '%d' around byte '%d'"
    _err(b"", 42, m % (1, 0), 1, 0)
    _err(b"myXID", 42, m % (1, 0), 1, 0)
    _err(b"\x00\x00\x02\x00\x00\x00\x01", 42, m % (1, 0), 1, 0)  # empty X-ID
    _err(b"\xffXID\x00\x00\x02", 42, m % (1, 0), 1, 0)  # X-ID not UTF-8
    first = br.encode("myXID", 2, [UNSIGNED], [5])
    _err(first + b"myX", 42, m % (2, 12), 2, 12)


def test_decode_errors_42_no_template_id():
    m = "Malformed Request: no Template ID found in binary message '%d' around byte '%d'"
    _err(SEED_XID, 42, m % (1, 6), 1, 6)
    _err(SEED_XID + b"\x00", 42, m % (1, 6), 1, 6)
    _err(OP_RESULT + SEED_XID + b"\x01", 42, m % (2, len(OP_RESULT) + 6), 2, len(OP_RESULT) + 6)


def test_decode_errors_43_unknown_template():
    m = "Invalid template identifier: template with X-ID '%s' and Template ID '%d' not found in cache"
    _err(SEED_XID + b"\x00\x03", 43, m % ("myXID", 3), 1, 8)
    _err(b"nope\x00\x00\x01", 43, m % ("nope", 1), 1, 7)
    _err(OP_RESULT + b"other\x00\x00\x01", 43, m % ("other", 1), 2, len(OP_RESULT) + 8)


def test_decode_errors_45_bad_parameter():
    m = "Invalid parameter at position '%d': Expected type '%s' in binary message '%d' around byte '%d'"
    # UNSIGNED cut short: 3 of its 4 bytes
    _err(SEED_XID + b"\x00\x02\x00\x00\x30", 45, m % (1, "UNSIGNED", 1, 8), 1, 8, 1)
    # STRING without its NUL
    _err(OP_RESULT[:-1], 45, m % (2, "STRING", 1, 12), 1, 12, 2)
    # STRING that is not UTF-8
    _err(SEED_XID + b"\x00\x01\x00\x00\x00\x01\xc3\x28\x00", 45, m % (2, "STRING", 1, 12), 1, 12, 2)
    # every type cut short, in a second message
    n = len(OP_RESULT)
    for cut, p, t, at in ((9, 1, "STRING", 8), (14, 2, "UNSIGNED", 12), (18, 3, "INTEGER", 16),
                          (22, 4, "NUMBER", 20), (27, 5, "DATE", 24)):
        _err(OP_RESULT + ALL_TYPES[:cut], 45, m % (p, t, 2, n + at), 2, n + at, p)
    # NUMBER that is NaN or infinite
    TEMPLATES[("myXID", 9)] = [NUMBER]
    try:
        _err(SEED_XID + b"\x00\x09\x7f\xc0\x00\x00", 45, m % (1, "NUMBER", 1, 8), 1, 8, 1)
        _err(SEED_XID + b"\x00\x09\xff\x80\x00\x00", 45, m % (1, "NUMBER", 1, 8), 1, 8, 1)
    finally:
        del TEMPLATES[("myXID", 9)]


def test_encode_errors_name_the_parameter():
    cases = (
        (("myXID", 1, [UNSIGNED, STRING], [-1, "a"]), "parameter 1"),
        (("myXID", 1, [UNSIGNED, STRING], [1 << 32, "a"]), "parameter 1"),
        (("myXID", 1, [UNSIGNED, STRING], [1, "a\x00b"]), "parameter 2"),
        (("myXID", 1, [UNSIGNED, STRING], [1, 5]), "parameter 2"),
        (("x", 1, [STRING, INTEGER], ["a", 1 << 31]), "parameter 2"),
        (("x", 1, [STRING, INTEGER], ["a", -(1 << 31) - 1]), "parameter 2"),
        (("x", 1, [DATE, NUMBER], [0, float("nan")]), "parameter 2"),
        (("x", 1, [DATE, NUMBER], [0, float("inf")]), "parameter 2"),
        (("x", 1, [DATE, NUMBER], [0, "1.5"]), "parameter 2"),
        (("x", 1, [DATE, NUMBER], [-1, 1.5]), "parameter 1"),
        (("x", 1, [DATE, NUMBER], [1.5, 1.5]), "parameter 1"),
        (("x", 1, [DATE, "FLOAT"], [0, 1.5]), "parameter 2"),
        (("x", 1, [DATE, "NOW"], [0, 1]), "NOW"),
        (("x", 1, [DATE, NUMBER], [0]), "values"),
        (("x", 65536, [], []), "65535"),
        (("x", -1, [], []), "65535"),
        (("", 1, [], []), "X-ID"),
        (("a\x00b", 1, [], []), "X-ID"),
    )
    for args, what in cases:
        e = raises(ValueError, br.encode, *args)
        assert not isinstance(e, br.Error)
        assert what in str(e), (args, str(e))
    e = raises(ValueError, br.encode_many, [("x", 1, [], []), ("x", 1, [UNSIGNED], [-5])])
    assert "message 2" in str(e) and "parameter 1" in str(e)
    raises(ValueError, br.encode_many, [])


def test_decode_random_bytes_only_raises_error():
    r = Rng(99)
    good = br.encode_many(
        [("myXID", 300, ALL_TYPES_LIST, ALL_VALUES), ("myXID", 1, [UNSIGNED, STRING], [7, "ok"])]
    )
    for i in range(300):
        if i % 3 == 0:
            data = r.bytes(r.below(40))
        else:
            data = bytearray(good[: r.below(len(good) + 1)])
            for _ in range(r.below(3)):
                if data:
                    data[r.below(len(data))] = r.below(256)
        try:
            out = br.decode(data, lookup)
        except br.Error:
            continue
        assert isinstance(out, list) and out


def test_date_and_number_hold_on_32_bit_boards():
    # DATE is u32 Unix seconds: past 2**30 (2004) a 32-bit board's small ints end, past 2**31
    # (2038) an i32 would; the whole u32 range goes through, as heap ints where need be
    look = lambda x, t: [DATE, NUMBER]  # noqa: E731
    for t in (2**30 - 1, 2**30, 1796444166, 2**31 - 1, 2**31, 2**32 - 1):
        p = br.encode("x", 1, [DATE, NUMBER], [t, 1.5])
        assert p[4:8] == bytes(((t >> 24) & 255, (t >> 16) & 255, (t >> 8) & 255, t & 255))
        assert br.decode(p, look) == [("x", 1, [t, 1.5])]
    raises(ValueError, br.encode, "x", 1, [DATE, NUMBER], [2**32, 1.5])
    # NUMBER is binary32, which is what a float is on a single-precision board: what comes back
    # is the same float32 on every runtime (exact ones exactly), and encoding it again gives the
    # same bytes; the largest finite float32 passes (on a board the double limit is inf)
    for v, raw in ((16777216, "4b800000"), (16777217, "4b800000"), (395.25, "43c5a000"),
                   (0.5, "3f000000"), (-2.0, "c0000000"), (3.4028234663852886e38, "7f7fffff"),
                   (23.45, "41bb999a"), (0.1, "3dcccccd")):
        p = br.encode("x", 1, [DATE, NUMBER], [0, v])
        assert p[8:] == bytes.fromhex(raw), (v, p[8:])
        back = br.decode(p, look)[0][2][1]
        assert br.encode("x", 1, [DATE, NUMBER], [0, back]) == p, (v, back)
    assert br.decode(br.encode("x", 1, [DATE, NUMBER], [0, 16777217]), look)[0][2][1] == 16777216
    raises(ValueError, br.encode, "x", 1, [DATE, NUMBER], [0, 2**128])
