# MQTT 3.1.1 packet core (microcot.mqttpkt) and the client's I/O-free parts: byte-exact vectors
# worked out from the MQTT 3.1.1 specification, run on CPython and on a board.
from dt import raises

from microcot import mqttpkt as P

H = bytes.fromhex


def feed(r, data, step=1000):
    """Run data through Reader r in reads of at most `step` bytes; the packets, bodies as bytes."""
    out = []
    i = 0
    while i < len(data):
        mv = r.want()
        n = min(len(mv), len(data) - i, step)
        mv[:n] = data[i:i + n]
        i += n
        pkt = r.got(n)
        if pkt is not None:
            out.append((pkt[0], bytes(pkt[1])))
    return out


def test_connect_vectors():
    mqtt4 = "00044d51545404"  # protocol name "MQTT", level 4
    assert P.connect("abc") == H("100f" + mqtt4 + "02" "0000" "0003616263")
    assert P.connect(b"abc", clean=False, keepalive=60) == H("100f" + mqtt4 + "00" "003c" "0003616263")
    assert P.connect("abc", "u", "p", 60, False) == H(
        "1015" + mqtt4 + "c0" "003c" "0003616263" "000175" "000170")
    assert P.connect("abc", "u", None, 300, True) == H(
        "1012" + mqtt4 + "82" "012c" "0003616263" "000175")
    # a password without a user does not exist in 3.1.1; keep-alive fits 16 bits
    raises(ValueError, P.connect, "abc", None, "p")
    raises(ValueError, P.connect, "abc", keepalive=65536)


def test_publish_vectors():
    assert P.publish("a/b", b"hi") == H("30070003612f626869")
    assert P.publish("a/b", "hi", qos=1, retain=True, dup=True, pid=10) == H("3b090003612f62000a6869")
    assert P.publish(b"a/b", b"hi", qos=2, pid=0x1234) == H("34090003612f6212346869")
    assert P.publish("a/b", b"") == H("30050003612f62")
    big = P.publish("t", bytes(200), qos=1, pid=1)
    assert big[:8] == H("32cd010001740001") and len(big) == 3 + 205
    raises(ValueError, P.publish, "a/b", b"x", qos=1)  # QoS 1 needs a packet id
    raises(ValueError, P.publish, "a/b", b"x", qos=1, pid=65536)
    raises(ValueError, P.publish, "a/+", b"x")
    raises(ValueError, P.publish, "", b"x")
    raises(ValueError, P.publish, "a", b"x", qos=3)


def test_subscribe_unsubscribe_ack_vectors():
    assert P.subscribe(1, "mr/X", 1) == H("820900010004" "6d722f58" "01")
    assert P.subscribe(0xFFFF, "ms/+", 0) == H("8209ffff0004" "6d732f2b" "00")
    assert P.unsubscribe(2, "mr/X") == H("a20800020004" "6d722f58")
    assert P.ack(P.PUBACK, 0x0102) == H("40020102")
    buf = bytearray(4)
    assert P.ack(P.PUBREL, 7, buf) is buf and buf == H("62020007")
    raises(ValueError, P.ack, P.PUBACK, 0)
    raises(ValueError, P.subscribe, 0, "x")


RL = (
    (0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
    (2097151, "ffff7f"), (2097152, "80808001"), (268435455, "ffffff7f"),
)


def test_remaining_length_encoding():
    for n, hexed in RL:
        buf = bytearray(5)
        end = P.put_rl(buf, 0, n)
        assert buf[:end] == H(hexed), n
        assert P.rl_size(n) == end
    raises(ValueError, P.rl_size, 268435456)
    raises(ValueError, P.rl_size, -1)


def test_remaining_length_decoding_without_allocation():
    # small bodies are read; large declared lengths are refused before any body exists, and the
    # refusal reports the size: header + remaining length
    for n, hexed in RL:
        r = P.Reader(limit=200)
        hdr = H("30" + hexed)
        if n <= 197:
            pkts = feed(r, hdr + bytes(n), step=1)
            assert pkts == [(0x30, bytes(n))], n
        else:
            e = raises(P.MQTTPacketTooLarge, feed, r, hdr)
            assert e.size == len(hdr) + n and e.limit == 200, (n, e.size)
            assert "200" in str(e)


def test_remaining_length_of_five_bytes_is_a_protocol_error():
    e = raises(P.MQTTProtocolError, feed, P.Reader(), H("30ffffffff7f"))
    assert "4 bytes" in str(e)
    e = raises(P.MQTTProtocolError, feed, P.Reader(), H("3080808080"), 1)
    assert not isinstance(e, P.MQTTPacketTooLarge)


def test_reader_splits_packets_and_resumes_across_reads():
    stream = H("20020001") + P.publish("mr/X", b"payload", qos=1, pid=3) + H("d000") + H("9003000501")
    for step in (1, 2, 3, 7, 1000):
        r = P.Reader()
        got = feed(r, stream, step)
        assert [t for t, _ in got] == [0x20, 0x32, 0xD0, 0x90], step
        assert got[0][1] == H("0001") and got[2][1] == b""
        assert not r.busy()
    r = P.Reader()
    assert feed(r, H("3209000400")) == [] and r.busy()
    assert r.progress() == (5, 11)
    r.reset()
    assert not r.busy()


def test_reader_refuses_reserved_types_and_exact_limit():
    raises(P.MQTTProtocolError, feed, P.Reader(), H("0000"))
    raises(P.MQTTProtocolError, feed, P.Reader(), H("f000"))
    assert feed(P.Reader(limit=10), H("3008") + bytes(8)) == [(0x30, bytes(8))]
    e = raises(P.MQTTPacketTooLarge, feed, P.Reader(limit=10), H("3009"))
    assert e.size == 11


def test_parse_connack_suback_pid():
    assert P.parse_connack(H("0100")) == (True, 0)
    assert P.parse_connack(H("0005")) == (False, 5)
    raises(P.MQTTProtocolError, P.parse_connack, H("00"))
    raises(P.MQTTProtocolError, P.parse_connack, H("0200"))
    assert P.parse_suback(H("000501")) == (5, 1)
    assert P.parse_suback(H("000580")) == (5, 0x80)
    raises(P.MQTTProtocolError, P.parse_suback, H("0005"))
    raises(P.MQTTProtocolError, P.parse_suback, H("000503"))
    assert P.parse_pid("PUBACK", H("ffff")) == 0xFFFF
    e = raises(P.MQTTProtocolError, P.parse_pid, "PUBREL", H("000102"))
    assert "PUBREL" in str(e)
    raises(P.MQTTProtocolError, P.parse_pid, "PUBACK", H("0000"))


def test_parse_publish():
    pkt = P.publish("mr/X", b"msg", qos=2, dup=True, pid=9)
    qos, pid, end, start = P.parse_publish(pkt[0], pkt[2:])
    body = pkt[2:]
    assert (qos, pid) == (2, 9) and body[2:end] == b"mr/X" and body[start:] == b"msg"
    pkt = P.publish("t", b"")
    assert P.parse_publish(pkt[0], pkt[2:]) == (0, 0, 3, 3)
    raises(P.MQTTProtocolError, P.parse_publish, 0x36, H("0001740001"))  # QoS 3
    raises(P.MQTTProtocolError, P.parse_publish, 0x30, H("00"))
    raises(P.MQTTProtocolError, P.parse_publish, 0x30, H("000574"))  # topic longer than body
    raises(P.MQTTProtocolError, P.parse_publish, 0x32, H("000174"))  # no room for the id
    raises(P.MQTTProtocolError, P.parse_publish, 0x32, H("0001740000"))  # packet id 0
    raises(P.MQTTProtocolError, P.parse_publish, 0x30, H("0000"))  # empty topic


def test_errors_share_one_hierarchy_and_name_the_code():
    texts = {1: "protocol version", 2: "identifier rejected", 3: "server unavailable",
             4: "bad user name or password", 5: "not authorized"}
    for code, text in texts.items():
        e = P.MQTTConnectError(code)
        assert e.code == code and text in str(e) and isinstance(e, P.MQTTException)
    assert "unknown" in str(P.MQTTConnectError(9))
    e = P.MQTTSubscribeError("mr/X", 0x80)
    assert "'mr/X'" in str(e) and "0x80" in str(e) and e.topic == "mr/X"
    for cls in (P.MQTTProtocolError, P.MQTTPacketTooLarge, P.MQTTConnectionError, P.MQTTTimeout,
                P.MQTTTLSError):
        assert issubclass(cls, P.MQTTException)
    assert issubclass(P.MQTTTimeout, P.MQTTConnectionError)
