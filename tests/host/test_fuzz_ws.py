"""Property tests (hypothesis, CPython) of the WebSocket/SignalR/KICS decoders (issue 14): for any
input they raise only their module's ERRORS, and the limits hold (a frame header never buys more
buffer than the bytes received plus Reader.GROW_MAX; JSON and st nesting refused past their
MAX_DEPTH, accepted up to it). The seeded fuzz of the same decoders, on both runtimes, is
tests/device/test_fuzz_ws.py."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from microcot import kics, signalr, wspmd  # noqa: E402
from microcot import wsframe as F  # noqa: E402

_props = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_header = st.sampled_from([b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", b"\x82\x7e\x80\x00",
                           b"\x01\x7e\xff\xff", b"\x81\x05", b"\x88\x02", b"\x89\x7d"])


@_props
@given(st.lists(st.one_of(_header, st.binary(max_size=300)), max_size=8),
       st.lists(st.integers(1, 500), min_size=1, max_size=8), st.booleans())
def test_reader_raises_only_protocol_errors_and_stays_bounded(parts, steps, rsv1):
    data = b"".join(parts)
    r = F.Reader(0x10000, 0x20000, rsv1)
    i = 0
    with contextlib.suppress(*F.ERRORS):
        while i < len(data):
            k = steps[i % len(steps)]
            used, _ = r.feed(memoryview(data)[i:i + k])
            i += used
            assert len(r.buf) <= i + F.Reader.GROW_MAX


@_props
@given(st.text(max_size=300))
def test_handshake_answer_raises_only_handshake_errors(text):
    with contextlib.suppress(*F.ERRORS):
        status, _, hdrs = F.parse_response(("HTTP/1.1 " + text).encode())
        F.check_response(status, hdrs, "dGhlIHNhbXBsZSBub25jZQ==", ["chat"])


@_props
@given(st.text(max_size=120), st.sampled_from([{"client_max_window_bits": True},
                                               {"server_max_window_bits": 12}, {}]))
def test_extension_answer_raises_only_handshake_errors(text, opts):
    with contextlib.suppress(*wspmd.ERRORS):
        wspmd.accept("permessage-deflate; " + text, opts)


@_props
@given(st.binary(max_size=200), st.integers(9, 15), st.booleans())
def test_inflate_raises_only_its_errors(data, bits, takeover):
    with contextlib.suppress(*wspmd.ERRORS):
        assert len(wspmd.Inflater(bits, takeover).inflate(data, 1000)) <= 1000


@_props
@given(st.integers(1, 3000), st.sampled_from(["[", '{"a":']))
def test_json_depth_limit(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    if depth <= signalr.MAX_DEPTH:
        signalr.loads(text)
    else:
        try:
            signalr.loads(text)
        except signalr.SignalRError as e:
            assert "deeper than" in str(e) and "$" in str(e)
        else:
            raise AssertionError("depth %d accepted" % depth)


@_props
@given(st.binary(max_size=400))
def test_signalr_raises_only_its_errors_and_the_hub_never(data):
    with contextlib.suppress(*signalr.ERRORS):
        signalr.parse(data)
    h = signalr.HubConnection(max_record_size=256)
    h.start(0)
    for ev in h.receive(b"{}\x1e" + data + b"\x1e", 1):
        assert isinstance(ev, signalr.Message)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 80), 2 ** 80),
                  st.floats(allow_nan=False), st.text(max_size=6),
                  st.text(alphabet="0123456789²٣-", max_size=60))
_json = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.sampled_from(["t", "v", "n", "s", "m", "x", "a"]),
                                       kids, max_size=4), max_leaves=20)


@_props
@given(_json, st.integers(0, 40))
def test_kics_decoders_raise_only_kics_errors(obj, levels):
    field = {"t": "u", "v": obj}
    for _ in range(levels):
        field = {"t": "st", "v": {"a": field}}
    try:
        kics.decode_field("f", field)
    except kics.KicsDecodeError as e:
        assert len(str(e)) < 300
    else:
        assert levels < kics.MAX_DEPTH
    with contextlib.suppress(*kics.ERRORS):
        kics.parse_item({"value": {"tagId": 1, "tagValue": {"d": {"f": obj}}}})
    with contextlib.suppress(*kics.ERRORS):
        kics.decode_tag_value(json.dumps(obj))
    for t in kics.FIELD_TYPES:
        with contextlib.suppress(*kics.ERRORS):
            kics.decode_field("f", {"t": t, "v": obj, "n": "E", "s": "S"})
