"""Property tests of the device protocol cores (CPython only): every encoder/decoder pair
round-trips, decoders fed garbage raise only their documented errors, and our XTEA agrees with the
independent PyPI `xtea` package (which also re-checks the device tests' XTEA vectors)."""

import importlib.util
import math
import struct
from pathlib import Path

import pytest
import xtea as ref_xtea
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from microcot import binrest, smartrest
from microcot import templates as tp
from microcot import xtea as our_xtea

DEVICE_TESTS = Path(__file__).resolve().parents[1] / "device"
settings.register_profile("cores", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cores")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, DEVICE_TESTS / (name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_two_xtea_modules_are_distinct():
    assert Path(our_xtea.__file__).parent.name == "microcot"
    assert "site-packages" in ref_xtea.__file__
    assert hasattr(ref_xtea, "MODE_ECB") and hasattr(our_xtea, "encrypt_ecb_py")


# -- XTEA ------------------------------------------------------------------------------------

keys = st.binary(min_size=16, max_size=16)
blocks = st.integers(0, 40).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n))


def _ref(key):
    return ref_xtea.new(key, mode=ref_xtea.MODE_ECB)


def test_device_vectors_agree_with_reference_package():
    v = _load("vec_xtea")
    cases = list(v.PUBLISHED) + list(v.BOTAN) + [(v.ECB_KEY, v.ECB_PLAIN, v.ECB_CIPHER)]
    for k, p, c in cases:
        assert _ref(bytes.fromhex(k)).encrypt(bytes.fromhex(p)).hex() == c
    padded = our_xtea.pad(v.BOOT_PASSWORD.encode())
    assert _ref(v.BOOT_KEY.encode()).encrypt(padded).hex() == v.BOOT_CIPHER


@given(keys, blocks)
def test_xtea_ecb_matches_reference(key, data):
    c = _ref(key).encrypt(data)
    assert our_xtea.encrypt_ecb(key, data) == c
    assert our_xtea.encrypt_ecb_py(key, data) == c
    assert our_xtea.decrypt_ecb(key, c) == data
    assert _ref(key).decrypt(c) == data


@given(keys, st.binary(min_size=8, max_size=8))
def test_xtea_block_matches_reference(key, block):
    c = our_xtea.encrypt_block(key, block)
    assert c == _ref(key).encrypt(block)
    assert our_xtea.decrypt_block(key, c) == block


@given(keys, st.binary(max_size=100))
def test_pad_encrypt_decrypt_unpad_roundtrip(key, data):
    p = our_xtea.pad(data)
    assert len(p) % 8 == 0 and 0 < len(p) - len(data) <= 8
    assert our_xtea.unpad(our_xtea.decrypt_ecb(key, our_xtea.encrypt_ecb(key, p))) == data


@given(st.binary(max_size=40))
def test_unpad_garbage_raises_only_valueerror(data):
    try:
        out = our_xtea.unpad(data)
    except ValueError as e:
        assert "padding" in str(e)
        return
    assert our_xtea.pad(out) == data


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_xtea_bad_sizes_raise_valueerror(key, data):
    assume(len(key) != 16 or len(data) % 8)
    with pytest.raises(ValueError):
        our_xtea.decrypt_ecb(key, data)


# -- SmartREST text ----------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
values = st.lists(st.one_of(text, st.none(), st.integers(-(2**40), 2**40)), max_size=6)
xids = st.from_regex(r"[A-Za-z0-9_]{0,6}[A-Za-z][A-Za-z0-9_]{0,6}", fullmatch=True)
tids = st.integers(0, 2**32 - 1)


def _as_text(v):
    return "" if v is None else str(v)


@given(text)
def test_quote_is_one_field(v):
    assert smartrest.parse_rows("100," + smartrest.quote(v)) == [["100", v]]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_quote_float_reads_back(f):
    assert float(smartrest.quote(f)) == f


@given(xids, st.lists(st.tuples(tids, values), max_size=5))
def test_request_parse_rows_roundtrip(xid, rows):
    body = smartrest.request(xid, [[tid] + vals for tid, vals in rows])
    assert isinstance(body, bytes) and not body.endswith(b"\n")
    got = smartrest.parse_rows(body)
    assert got[0] == ["15", xid]
    assert got[1:] == [[str(tid)] + [_as_text(v) for v in vals] for tid, vals in rows]


response_codes = st.integers(0, 10**6).filter(lambda c: c not in smartrest._BUILTIN)


@given(st.lists(st.tuples(response_codes, st.integers(1, 10**6), st.lists(text, max_size=4)),
                max_size=6), st.booleans())
def test_response_rows_parse_back(rows, crlf):
    body = ("\r\n" if crlf else "\n").join(
        smartrest.row([code, line] + vals) for code, line, vals in rows
    )
    assert smartrest.parse(body.encode()) == [
        smartrest.Record(code, line, vals) for code, line, vals in rows
    ]


@given(st.integers(1, 99), xids, st.integers(1, 10**4), text, text)
def test_builtin_rows_parse_back(n, xid, line, msg, reason):
    body = "\n".join((
        smartrest.row((87, n, xid)),
        smartrest.row((50, line, 404, reason)),
        smartrest.row((42, line, msg)),
        smartrest.row((20, line)),
    ))
    assert smartrest.parse(body) == [
        smartrest.Record(87, None, [str(n), xid]),
        smartrest.Record(50, line, ["404", reason]),
        smartrest.Record(42, line, [msg]),
        smartrest.Record(20, None, [str(line)]),
    ]


csv_soup = st.text(st.sampled_from('0123456789,"\n\r ab\t'), max_size=60)


@given(st.one_of(st.binary(max_size=80), csv_soup, text))
def test_parse_garbage_raises_only_valueerror(body):
    try:
        recs = smartrest.parse(body)
    except ValueError as e:
        assert "line " in str(e) and " column " in str(e)
        return
    assert all(isinstance(r.code, int) for r in recs)


@given(csv_soup)
def test_parse_rows_garbage_raises_only_valueerror(body):
    try:
        smartrest.parse_rows(body)
    except ValueError as e:
        assert "line " in str(e) and " column " in str(e)


# -- binary SmartREST --------------------------------------------------------------------------

bin_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=12)
BIN_VALUES = {
    binrest.STRING: bin_text,
    binrest.UNSIGNED: st.integers(0, 2**32 - 1),
    binrest.INTEGER: st.integers(-(2**31), 2**31 - 1),
    binrest.NUMBER: st.floats(width=32, allow_nan=False, allow_infinity=False),
    binrest.DATE: st.integers(0, 2**32 - 1),
}
type_lists = st.lists(st.sampled_from(binrest.TYPES), max_size=6)


@st.composite
def payloads(draw):
    # (xid, tid) drawn from a few of each so that templates repeat; one type list per template,
    # as a template cache has it
    xid_pool = draw(st.lists(xids, min_size=1, max_size=3))
    table = {}
    out = []
    for _ in range(draw(st.integers(1, 5))):
        xid = draw(st.sampled_from(xid_pool))
        tid = draw(st.sampled_from((0, 1, 500, 65535)) | st.integers(0, 65535))
        types = table.get((xid, tid))
        if types is None:
            types = table[(xid, tid)] = draw(type_lists)
        out.append((xid, tid, types, [draw(BIN_VALUES[t]) for t in types]))
    return out, table


def _same(a, b):
    # -0.0 == 0.0 hides a sign; compare floats by their bits
    if isinstance(a, float):
        return struct.pack(">f", a) == struct.pack(">f", b)
    return a == b and type(a) is type(b)


@given(payloads())
def test_binrest_roundtrip(pt):
    msgs, table = pt
    payload = binrest.encode_many(msgs)
    assert payload == b"".join(binrest.encode(*m) for m in msgs)
    got = binrest.decode(payload, lambda x, t: table.get((x, t)))
    assert [(x, t) for x, t, _ in got] == [(m[0], m[1]) for m in msgs]
    for (_, _, vals), m in zip(got, msgs, strict=True):
        assert len(vals) == len(m[3]) and all(_same(a, b) for a, b in zip(vals, m[3], strict=True))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_binrest_number_is_float32(f):
    try:
        msg = binrest.encode("x", 1, [binrest.NUMBER], [f])
    except ValueError:
        assert abs(f) >= 2.0**128 - 2.0**103
        return
    (got,) = binrest.decode(msg, lambda x, t: [binrest.NUMBER])[0][2]
    assert got == struct.unpack(">f", struct.pack(">f", f))[0] and math.isfinite(got)


@given(st.one_of(st.binary(max_size=60), payloads().map(lambda pt: binrest.encode_many(pt[0]))),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       st.integers(0, 60))
def test_binrest_decode_garbage_raises_only_error(data, flips, cut):
    data = bytearray(data[: max(0, len(data) - cut)])
    for i, b in flips:
        if data:
            data[i % len(data)] = b
    lookup_table = {}

    def lookup(xid, tid):
        # every template "exists" with a type list derived from its id, so decoding goes deep
        if tid % 7 == 0:
            return None
        return lookup_table.setdefault((xid, tid), [binrest.TYPES[(tid + k) % 5] for k in range(tid % 4)])

    try:
        out = binrest.decode(bytes(data), lookup)
    except binrest.Error as e:
        assert e.code in (42, 43, 45) and str(e).startswith(str(e.code) + " ")
        assert e.index >= 1 and 0 <= e.position <= len(data)
        return
    assert out


# -- templates ---------------------------------------------------------------------------------

path_seg = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True)
json_path = st.lists(path_seg, min_size=1, max_size=3).map(lambda p: "$." + ".".join(p))
free_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="%"),
                    max_size=15)
ids = st.integers(0, 2**32 - 1).filter(lambda i: i not in tp.RESERVED_IDS)


@st.composite
def request_templates(draw, tid):
    method = draw(st.sampled_from(tp.METHODS))
    params = draw(st.lists(st.sampled_from(tp.PARAM_TYPES), max_size=5))
    body = method in ("POST", "PUT")
    in_uri = draw(st.integers(0, len(params))) if body else len(params)
    uri = "/" + draw(path_seg) + "".join("/%%" for _ in range(in_uri))
    uri += draw(st.sampled_from(("", "?a=b,c", '?q="x"')))
    template = ""
    if body:
        rest = len(params) - in_uri
        template = '{"t":' + draw(free_text) + "".join(
            ',"v%d":"%%%%"' % k for k in range(rest)
        ) + "}"
    ph = "%%" if params or draw(st.booleans()) else ""
    ctype = "application/json" if body else ""
    accept = draw(st.sampled_from(("", "application/json", "text/csv")))
    return (tid, method, uri, ctype, accept, ph, params, template)


@st.composite
def collections(draw):
    c = tp.Collection(draw(xids))
    for tid in draw(st.lists(ids, unique=True, max_size=8)):
        if draw(st.booleans()):
            c.add_request(*draw(request_templates(tid)))
        else:
            base = draw(st.sampled_from(("", "$", "$.operations", "$.managedObject")))
            cond = draw(json_path)
            vals = draw(st.lists(json_path, min_size=1, max_size=3))
            c.add_response(tid, base, cond, vals)
    return c


@given(collections())
def test_templates_registration_roundtrip(c):
    body = c.registration()
    again = tp.Collection.from_body(body)
    assert again == c
    assert again.registration() == body
    for t in c:
        if isinstance(t, tp.Request):
            assert c.types_of(t.tid) == [p for p in t.params if p != "NOW"]
            assert again.lookup(c.xid, t.tid) == c.types_of(t.tid)


@given(collections(), st.data())
def test_templates_binary_messages_decode_with_collection_lookup(c, data):
    reqs = [t for t in c if isinstance(t, tp.Request) and t.tid <= 0xFFFF]
    assume(reqs)
    msgs = []
    for t in data.draw(st.lists(st.sampled_from(reqs), min_size=1, max_size=4)):
        vals = [data.draw(BIN_VALUES[ty]) for ty in c.types_of(t.tid)]
        msgs.append((t.tid, vals))
    payload = b"".join(c.encode(tid, vals) for tid, vals in msgs)
    got = binrest.decode(payload, c.lookup)
    assert [(x, t) for x, t, _ in got] == [(c.xid, tid) for tid, _ in msgs]


@given(st.lists(st.lists(csv_soup, max_size=10), max_size=4))
def test_templates_from_garbage_rows_raise_only_valueerror(rows):
    try:
        tp.Collection.from_rows([["15", "myXID"]] + rows)
    except tp.TemplateError as e:
        assert e.code == 41 and e.message
    except ValueError:
        pass
