"""Property tests (CPython, hypothesis) of the MQTT client driver against a hostile broker: whatever
bytes follow the CONNACK, in whatever pieces they arrive, the client either takes them or raises
one of mqtt.ERRORS with the connection closed, and connects again afterwards. The seeded subset
that also runs on boards is tests/device/test_fuzz_mqttclient.py."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "device"))

from fakenet import CONNACK_OK, EOF, FakeNet  # noqa: E402

from microcot import mqtt  # noqa: E402
from microcot import mqttpkt as P  # noqa: E402

SEEDS = [P.publish("mr/d", b"x", qos=1, pid=3), P.ack(P.PUBREL, 4), b"\xd0\x00",
         b"\x90\x03\x00\x01\x01", P.publish("mr/d", b"y" * 200, qos=2, pid=9)]

# a stream: seed packets and random bytes in any order, cut into pieces
streams = st.lists(st.one_of(st.sampled_from(SEEDS), st.binary(max_size=12)), max_size=8).map(
    b"".join)


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=streams, cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       eof=st.booleans(), max_packet=st.sampled_from([64, 300, 16384]))
def test_any_stream_from_the_broker_is_taken_or_costs_only_the_connection(data, cuts, eof,
                                                                          max_packet):
    net = FakeNet(mqtt)
    try:
        c = mqtt.MQTTClient("d", "broker", timeout=1, max_packet=max_packet)
        c.note = lambda m: None
        c.set_callback(lambda t, m: None)
        chunks, i, k = [], 0, 0
        while i < len(data):
            n = cuts[k % len(cuts)]
            chunks.append(data[i:i + n])
            i += n
            k += 1
        conn = net.add(CONNACK_OK, *chunks, *([EOF] if eof else []))
        c.connect()
        try:
            for _ in range(64):
                if c.poll(0) is None:
                    break
        except mqtt.ERRORS:
            assert not c.isconnected() and conn.closed
            assert c._rx._body is None
        net.add(CONNACK_OK, b"\x30\x04\x00\x01tm")
        got = []
        c.set_callback(lambda t, m: got.append(m))
        c.connect()
        assert c.poll(0) == 0x30 and got == [b"m"]
    finally:
        net.restore()
