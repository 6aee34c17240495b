"""Property tests (CPython, hypothesis) of the decoders of what the platform sends: mqttpkt,
smartrest, binrest, templates. Any input raises only the module's documented ERRORS; a valid
packet reads back whole however the stream is split; a body buffer is never more than a chunk
ahead of what arrived; integers are refused by their length; and the device suite's seeded fuzz
functions (tests/device/test_fuzz_mqtt.py) hold for seeds hypothesis picks. (Not named
test_fuzz_mqtt.py: pytest cannot collect two test modules of one basename in folders without
__init__.py.)"""

import contextlib
import importlib.util
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microcot import binrest, mqttpkt, smartrest
from microcot import templates as tp

DEVICE_TESTS = Path(__file__).resolve().parents[1] / "device"
settings.register_profile("fuzz_mqtt", deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fuzz_mqtt")


def _device(name: str):
    # not under its own name: pytest imports tests/device/test_fuzz_mqtt.py as test_fuzz_mqtt
    if str(DEVICE_TESTS) not in sys.path:
        sys.path.insert(0, str(DEVICE_TESTS))  # its `from dt import ...`, as its conftest does
    spec = importlib.util.spec_from_file_location("device_" + name, DEVICE_TESTS / (name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dt = _device("dt")
fz = _device("test_fuzz_mqtt")


def _feed(r: mqttpkt.Reader, data: bytes, splits: list[int]) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    k = 0
    while i < len(data):
        mv = r.want()
        n = min(len(mv), len(data) - i, splits[k % len(splits)] if splits else len(data))
        k += 1
        mv[:n] = data[i:i + n]
        i += n
        pkt = r.got(n)
        if pkt is not None:
            out.append((pkt[0], bytes(pkt[1])))
    return out


# -- mqttpkt -----------------------------------------------------------------------------------

splits = st.lists(st.integers(1, 64), max_size=8)


@given(st.binary(max_size=300), splits, st.sampled_from((16, 200, 16384)),
       st.sampled_from((1, 7, 1024)))
def test_any_stream_raises_only_the_documented_errors(data, sp, limit, chunk):
    r = mqttpkt.Reader(limit=limit, chunk=chunk)
    try:
        for first, body in _feed(r, data, sp):
            fz._mqtt_parse(first, body)
    except mqttpkt.ERRORS:
        pass


@given(st.integers(0, 255), st.binary(max_size=40))
def test_any_body_raises_only_the_documented_errors(first, body):
    for fn in (mqttpkt.parse_connack, mqttpkt.parse_suback,
               lambda b: mqttpkt.parse_pid("PUBACK", b), lambda b: mqttpkt.parse_publish(first, b)):
        with contextlib.suppress(mqttpkt.ERRORS):
            fn(body)


topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="+#\x00"),
                 min_size=1, max_size=30)


@given(topics, st.binary(max_size=3000), st.integers(0, 2), st.integers(1, 65535), splits,
       st.sampled_from((1, 5, 64, 1024)))
def test_a_publish_reads_back_whole_however_split(topic, msg, qos, pid, sp, chunk):
    pkt = bytes(mqttpkt.publish(topic, msg, qos=qos, pid=pid if qos else 0))
    stream = pkt + bytes(mqttpkt.ack(mqttpkt.PUBACK, pid)) + pkt
    got = _feed(mqttpkt.Reader(limit=4096, chunk=chunk), stream, sp)
    assert [f & 0xF0 for f, _ in got] == [0x30, 0x40, 0x30]
    first, body = got[0]
    q, p, end, start = mqttpkt.parse_publish(first, body)
    assert (q, p) == (qos, pid if qos else 0)
    assert body[2:end].decode() == topic and body[start:] == msg and got[2] == got[0]


@given(st.integers(2, 16384), st.integers(0, 3000), st.sampled_from((16, 256, 1024)))
def test_the_body_buffer_stays_a_chunk_ahead_of_what_arrived(declared, sent, chunk):
    r = mqttpkt.Reader(limit=16384 + 5, chunk=chunk)
    head = bytearray(5)
    end = mqttpkt.put_rl(head, 1, declared)
    head[0] = 0x30
    _feed(r, bytes(head[:end]), [])
    arrived = 0
    sent = min(sent, declared - 1)
    while arrived < sent:
        mv = r.want()
        n = min(len(mv), sent - arrived, 333)
        arrived += n
        assert r.got(n) is None
    assert len(r._body) <= arrived + chunk and len(r._body) <= declared


# -- smartrest ---------------------------------------------------------------------------------

csv_soup = st.text(st.sampled_from('0123456789,"\n\r ab\t\x00\u00e4'), max_size=80)


@given(st.one_of(st.binary(max_size=120), csv_soup, csv_soup.map(str.encode)),
       st.sampled_from((None, (202, 206))))
def test_smartrest_raises_only_error_for_any_body(body, ids):
    for fn in (lambda: smartrest.parse(body, ids, max_rows=3), lambda: list(
            smartrest.records(body, ids)), lambda: smartrest.parse_rows(body, max_rows=3)):
        try:
            fn()
        except smartrest.ERRORS as e:
            assert e.line >= 1 and e.column >= 1 and str(e).startswith("line %d column " % e.line)


@given(st.text("0123456789", min_size=1, max_size=6000))
def test_integers_are_refused_by_their_length(digits):
    body = "%s,1\n202,%s,x" % (digits, digits)
    if len(digits.lstrip("0")) <= smartrest.MAX_DIGITS:
        recs = smartrest.parse(body)
        assert recs[0].code == int(digits) and recs[1].line == int(digits)
    else:
        try:
            smartrest.parse(body)
        except smartrest.Error as e:
            assert (e.line, e.column) == (1, 1) and len(str(e)) < 200
        else:
            raise AssertionError("accepted %d digits" % len(digits))


# -- binrest -----------------------------------------------------------------------------------

@given(st.one_of(st.binary(max_size=80), st.sampled_from(fz._bin_seeds())), splits)
def test_binrest_raises_only_error_for_any_payload(data, cuts):
    for c in cuts:
        data = data[: c % (len(data) + 1)] + data[c % (len(data) + 1) + 1:]
    try:
        binrest.decode(data, fz._lookup)
    except binrest.ERRORS as e:
        assert e.code in (42, 43, 45) and 0 <= e.position <= len(data)


# -- templates ---------------------------------------------------------------------------------

tpl_soup = st.lists(st.sampled_from(fz._TPL_TOKENS + (b"9" * 5000, b"a", b"/x", b"\n10,")),
                    max_size=30).map(b"".join)


@given(st.one_of(tpl_soup, st.binary(max_size=80), tpl_soup.map(lambda b: b"15,X1\n" + b)))
def test_templates_raise_only_template_error_for_any_body(body):
    try:
        tp.Collection.from_body(body)
    except tp.ERRORS as e:
        assert type(e) is tp.TemplateError and e.code == 41 and e.message
        assert e.line is None or e.line >= 1


fields = st.sampled_from(("10", "11", "15", "", "GET", "POST", "/a/%%", "%%", "STRING",
                          "NOW x", "$.a", "$", "a/b", "{}", " 7 ", "4294967296", "9" * 5000))


@given(st.lists(st.lists(fields, max_size=10), max_size=5))
def test_templates_from_any_rows_raise_only_template_error(rows):
    with contextlib.suppress(tp.ERRORS):
        tp.Collection.from_rows([["15", "myXID"], *rows])


# -- the device suite's fuzz functions, seeds from hypothesis ---------------------------------

@settings(max_examples=25)
@given(st.integers(1, 2**32 - 1))
def test_the_seeded_fuzz_functions_hold_for_any_seed(seed):
    for fn in (fz.fuzz_mqttpkt, fz.fuzz_smartrest, fz.fuzz_binrest, fz.fuzz_templates):
        got = fn(dt.Rng(seed), 30)
        assert got["inputs"] == 30 and got["accepted"] + got["rejected"] == 30
