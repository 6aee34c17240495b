# The MQTT client's I/O-free parts (microcot.mqtt): its import needs the port's socket and ssl,
# which a board without a network stack (the plain Pico) lacks, so these run only where they exist.
from dt import raises, rmtree, scratch_dir

from microcot import mqttpkt as P

BOARD_REQUIRES = ("socket", "ssl")
H = bytes.fromhex


def test_client_without_io():
    from microcot import mqtt

    assert mqtt.MQTTException is P.MQTTException
    c = mqtt.MQTTClient("id", "host")
    assert c.port == 1883 and not c.isconnected() and c.pending() == 0
    assert mqtt.MQTTClient("id", "host", ssl=True).port == 8883
    raises(mqtt.MQTTConnectionError, c.publish, "t", b"x", qos=1)
    raises(mqtt.MQTTConnectionError, c.poll, 0)
    raises(ValueError, c.publish, "t", b"x", qos=2)
    # packet ids run 1..65535, never 0, skipping ids still in flight
    c._pid = 65534
    c._out = [[65535, None], [1, None]]
    assert c._newpid() == 2
    c._pid = 65535
    assert c._newpid() == 2


def test_pem_to_der():
    from microcot import tlsctx

    pem = b"junk\n-----BEGIN CERTIFICATE-----\nAAEC\nAwQ=\n-----END CERTIFICATE-----\n" \
          b"-----BEGIN CERTIFICATE-----\r\n/w==\r\n-----END CERTIFICATE-----\r\n"
    assert tlsctx._der_certs(pem) == [H("0001020304"), H("ff")]
    assert tlsctx._der_certs(pem.decode()) == [H("0001020304"), H("ff")]
    assert tlsctx._der_certs(H("3082")) == [H("3082")]
    raises(ValueError, tlsctx._der_certs, b"-----BEGIN CERTIFICATE-----\nAAEC\n")


def test_tls_context_refuses_a_bad_ca_and_verifies_by_default():
    from microcot import mqtt

    e = raises(ValueError, mqtt.tls_context, cadata=b"not a certificate")
    assert "cadata" in str(e)
    e = raises(ValueError, mqtt.tls_context, cadata=b"-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n")
    assert "not a valid CA certificate" in str(e)
    ctx = mqtt.tls_context(verify=False)
    assert ctx.verify_mode == 0


# -- umqtt parity and a hostile broker, over a scripted network (fakenet.py) ----------------------

# a self-signed P-256 CA (a test vector: a CA the board's settings can name)
TEST_CA = """-----BEGIN CERTIFICATE-----
MIIBjDCCATOgAwIBAgIUR654aurUg7jkd0BreLGPUQks9g0wCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQbWljcm9jb3QgdGVzdCBDQTAgFw0yNjEyMDUxMjM3MTNaGA8y
MTI2MTExMTEyMzcxM1owGzEZMBcGA1UEAwwQbWljcm9jb3QgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABGELE1oyQG8T5sYgJAfJmfR6uJpKAdJr92K7
RSGl3OWq1rPkz6N4pwCEI59FWwLblbz5YsGe8u+hH+6Q2Ks8u3ujUzBRMB0GA1Ud
DgQWBBT8Szdag5WX/xWe1Lp61rPW6fkUhjAfBgNVHSMEGDAWgBT8Szdag5WX/xWe
1Lp61rPW6fkUhjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIDQt
7GCSEkK2ld4KovaCTgCrwbj33TyBpVMFrj5cwAKKAiBh+KC0BMUGq7pPJI3AYaCL
9s+P8pLCmHRoPI1KQbJiAw==
-----END CERTIFICATE-----
"""


def _net():
    from fakenet import FakeNet

    from microcot import mqtt

    return FakeNet(mqtt)


def _on_mp():
    import sys

    return sys.implementation.name == "micropython"


def test_last_will_goes_into_connect_and_a_refusal_is_umqtts_exception_with_the_code():
    from fakenet import CONNACK_OK
    from umqtt.simple import MQTTClient, MQTTException

    from microcot import mqtt

    net = _net()
    try:
        c = MQTTClient("dev1", "broker", user="u", password="p", keepalive=30)
        raises(ValueError, c.set_last_will, "st/+", b"x")
        raises(ValueError, c.set_last_will, "st/1", b"x", qos=3)
        c.set_last_will("st/dev1", "offline", retain=True, qos=1)
        net.add(b"\x20\x02\x00\x05")  # the emulator's front: a will is "not authorized"
        e = raises(MQTTException, c.connect)
        assert e.args[0] == 5 and e.code == 5 and "not authorized" in str(e)
        assert not c.isconnected() and net.used[0].closed
        kind, body = net.used[0].packets()[0]
        assert kind == P.CONNECT
        # flags: user, password, will retain, will QoS 1, will, clean session
        assert body[7] == 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02, hex(body[7])
        assert body[10:] == (b"\x00\x04dev1\x00\x07st/dev1\x00\x07offline\x00\x01u\x00\x01p")
        # the core client raises its own class for it, with the code
        core = mqtt.MQTTClient("dev1", "broker")
        core.set_last_will(b"st/dev1", b"x")
        net.add(b"\x20\x02\x00\x05")
        assert raises(mqtt.MQTTConnectError, core.connect).code == 5
        # without a will the CONNECT has none; the same client connects
        c.lw_topic = None
        net.add(CONNACK_OK)
        assert c.connect() is False and c.isconnected()
        assert net.used[-1].packets()[0][1][7] == 0xC2
    finally:
        net.restore()


def test_ssl_true_without_a_ca_never_skips_verification():
    from microcot import mqtt

    saved = mqtt.BOARD_CONFIG
    d = scratch_dir("mqtt_ca")
    mqtt.BOARD_CONFIG = d + "/none.json"
    net = _net()
    try:
        c = mqtt.MQTTClient("id", "broker", ssl=True)  # never raises here
        assert c.port == 8883
        if _on_mp():
            # no CA anywhere: the connect fails, clearly, before a socket exists
            e = raises(mqtt.MQTTTLSError, c.connect)
            assert "no CA certificate" in str(e) and "broker:8883" in str(e), str(e)
            assert net.used == []
            # umqtt.simple's client: an OSError, as a failed handshake is in umqtt
            from umqtt.simple import MQTTClient

            e = raises(OSError, MQTTClient("id", "broker", ssl=True).connect)
            assert e.args[0] == 103 and "no CA certificate" in str(e), e
        else:  # CPython: its default trust store, verified
            assert c._ssl_params_context().verify_mode == 2
        # the board's configured CA (the agent's settings: PEM text or a path)
        import json

        with open(mqtt.BOARD_CONFIG, "w") as f:
            json.dump({"host": "x", "ca": TEST_CA}, f)
        ctx = mqtt.MQTTClient("id", "broker", ssl=True)._ssl_params_context()
        assert ctx.verify_mode == 2  # CERT_REQUIRED
        # umqtt's ssl_params keys; CERT_OPTIONAL still verifies; CERT_NONE is explicit and loud
        for p in ({"cadata": TEST_CA}, {"cadata": TEST_CA, "cert_reqs": 1},
                  {"cadata": TEST_CA, "server_hostname": "h", "do_handshake": True}):
            assert mqtt.MQTTClient("id", "b", ssl=True, ssl_params=p)._ssl_params_context() \
                .verify_mode == 2
        notes = []
        c = mqtt.MQTTClient("id", "broker", ssl=True, ssl_params={"cert_reqs": 0})
        c.note = notes.append
        assert c._context().verify_mode == 0 and "without certificate verification" in notes[0]
        e = raises(ValueError, mqtt.MQTTClient("id", "b", ssl=True,
                                               ssl_params={"ca": "x"})._context)
        assert "'ca'" in str(e)
    finally:
        net.restore()
        mqtt.BOARD_CONFIG = saved
        try:
            rmtree(d)
        except OSError:
            pass


def _connected(net, cls=None, **kw):
    from fakenet import CONNACK_OK

    from microcot import mqtt

    c = (cls or mqtt.MQTTClient)("id", "broker", timeout=2, **kw)
    c.note = lambda m: None
    got = []
    c.set_callback(lambda t, m: got.append((t, m)))
    conn = net.add(CONNACK_OK)
    c.connect()
    return c, conn, got


# what a hostile or broken broker sends once connected, and the error class the client raises
HOSTILE = (
    (b"\x30\x04\x00\x09ab", "MQTTProtocolError"),  # topic longer than the packet
    (b"\x36\x05\x00\x01a\x00\x01", "MQTTProtocolError"),  # QoS 3
    (b"\x32\x05\x00\x01a\x00\x00", "MQTTProtocolError"),  # QoS 1 with packet id 0
    (b"\x30\xff\xff\xff\xff\x01", "MQTTProtocolError"),  # remaining length of 5 bytes
    (b"\x30\xff\xff\xff\x7f", "MQTTPacketTooLarge"),  # 256 MiB declared
    (b"\x30\x80\x80\x01", "MQTTPacketTooLarge"),  # 16 KiB + 1: just over the limit
    (b"\x00\x00", "MQTTProtocolError"),  # reserved packet type 0
    (b"\xf0\x00", "MQTTProtocolError"),  # reserved packet type 15
    (b"\xd0\x01\x00", "MQTTProtocolError"),  # PINGRESP with a body
    (b"\x20\x02\x00\x00", "MQTTProtocolError"),  # a second CONNACK
    (b"\x42\x02\x00\x01", "MQTTProtocolError"),  # PUBACK with reserved flags
    (b"\x90\x03\x00\x01\x07", "MQTTProtocolError"),  # SUBACK with return code 7
    (b"\x40\x03\x00\x01\x00", "MQTTProtocolError"),  # PUBACK of 3 bytes
    (b"\x30\x0a\x00\x01a", "MQTTConnectionError"),  # closed in the middle of a packet
    (b"\x30", "MQTTConnectionError"),  # closed in the middle of a fixed header
    (b"", "MQTTConnectionError"),  # closed between packets
)


def test_a_hostile_broker_costs_the_connection_never_the_client():
    from fakenet import CONNACK_OK, EOF

    from microcot import mqtt

    net = _net()
    try:
        for data, cls in HOSTILE:
            c, conn, got = _connected(net)
            conn.feed(data, EOF)
            try:
                while c.poll(0) is not None:
                    pass
                raise AssertionError("no error for %r" % data)
            except mqtt.MQTTException as e:
                assert type(e).__name__ == cls, (data, type(e).__name__, str(e))
            assert not c.isconnected() and conn.closed, data
            assert c._rx._body is None  # nothing of the packet is kept
            # the same client connects again and works
            net.add(CONNACK_OK, b"\x30\x05\x00\x01tok")
            c.connect()
            assert c.poll(0) == 0x30 and got == [(b"t", b"ok")], (data, got)
            c.close()
    finally:
        net.restore()


def test_connack_garbage_is_a_protocol_error_and_a_close_mid_connack_a_connection_error():
    from fakenet import EOF

    from microcot import mqtt

    cases = (
        (b"\x20\x03\x00\x00\x00", "MQTTProtocolError"),  # CONNACK of 3 bytes
        (b"\x20\x02\x02\x00", "MQTTProtocolError"),  # reserved flag bits
        (b"\x21\x02\x00\x00", "MQTTProtocolError"),  # flags in the first byte
        (b"\x20\x00", "MQTTProtocolError"),  # empty
        (b"\x30\x03\x00\x01a", "MQTTProtocolError"),  # a PUBLISH first
        (b"\x20\xff\xff\xff\x7f", "MQTTPacketTooLarge"),
        (b"\xff\xff", "MQTTProtocolError"),
        (b"\x20\x02\x00", "MQTTConnectionError"),  # closed mid-CONNACK
        (b"", "MQTTConnectionError"),
    )
    net = _net()
    try:
        for data, cls in cases:
            c = mqtt.MQTTClient("id", "broker", timeout=2)
            conn = net.add(data, EOF)
            e = raises(mqtt.MQTTException, c.connect)
            assert type(e).__name__ == cls, (data, type(e).__name__, str(e))
            assert not c.isconnected() and conn.closed
        # CONNACK 0x80 (not an MQTT 3.1.1 code) is still a refusal with its code
        net.add(b"\x20\x02\x00\x80")
        assert raises(mqtt.MQTTConnectError, mqtt.MQTTClient("id", "b").connect).code == 0x80
        # no socket at all (lwIP out of sockets): an MQTTConnectionError, not a bare OSError
        raises(mqtt.MQTTConnectionError, mqtt.MQTTClient("id", "b").connect)
    finally:
        net.restore()


def test_umqtt_simple_turns_a_broken_link_into_oserror_and_keeps_refusals_apart():
    from fakenet import EOF
    from umqtt.simple import MQTTClient, MQTTException

    net = _net()
    try:
        c, conn, got = _connected(net, MQTTClient)
        conn.feed(b"\x30\x05\x00\x01tok")
        assert c.check_msg() == 0x30 and got == [(b"t", b"ok")]
        assert c.check_msg() is None
        # SUBACK 0x80: MQTTException, code as args[0], the link stays up
        conn.feed(b"\x90\x03\x00\x01\x80")
        e = raises(MQTTException, c.subscribe, "mr/other", 1)
        assert e.args[0] == 0x80 and c.isconnected()
        # QoS 1 publish returns once its PUBACK is in, as in umqtt
        conn.feed(b"\x40\x02\x00\x02")
        assert c.publish("ms/id", b"m", qos=1) is None and c.pending() == 0
        # a malformed packet breaks the link: OSError (ECONNRESET), the cause in the text
        conn.feed(b"\x36\x05\x00\x01a\x00\x01")
        e = raises(OSError, c.check_msg)
        assert e.args[0] == 104 and "QoS 3" in str(e) and not c.isconnected()
        assert type(e.error).__name__ == "MQTTProtocolError"
        raises(OSError, c.wait_msg)  # not connected
        # a link that fails before the PUBACK: OSError, the message is not kept for a re-send
        c, conn, got = _connected(net, MQTTClient)
        conn.feed(EOF)
        raises(OSError, c.publish, "ms/id", b"m", qos=1)
        assert c.pending() == 0
        # no PUBACK within `timeout`: OSError ETIMEDOUT, connection closed, the message dropped
        c, conn, got = _connected(net, MQTTClient)
        c.timeout = 0.05
        e = raises(OSError, c.publish, "ms/id", b"m", qos=1)
        assert e.args[0] == 110 and "no PUBACK" in str(e) and c.pending() == 0, e
        assert not c.isconnected() and conn.closed
        # an oversized publish is refused before sending, the link stays up
        e = raises(MQTTException, _connected(net, MQTTClient, max_packet=64)[0].publish,
                   "t", b"x" * 100)
        assert not isinstance(e, OSError)
    finally:
        net.restore()


def test_umqtt_robust_reconnects_over_a_broken_link_and_publishes_once():
    from fakenet import CONNACK_OK, EOF
    from umqtt.robust import MQTTClient

    net = _net()
    try:
        c, conn1, got = _connected(net, MQTTClient)
        delays, logs = [], []
        c.delay = delays.append
        c.log = lambda in_reconnect, e: logs.append((in_reconnect, type(e).__name__))
        # the broker sends garbage: check_msg reconnects (clean_session False) and goes on
        conn1.feed(b"\x30\xff\xff\xff\x7f")
        net.add(b"\x20\x02\x00\x00", EOF)  # a CONNACK, then the link drops at once
        net.add(b"\x20\x02\x00")  # closed in the middle of the CONNACK (no EOF: timeout)
        net.add(CONNACK_OK, b"\x30\x05\x00\x01tok")
        c.timeout = 0.05
        # attempt 1: garbage, reconnected; attempt 2: EOF, reconnect fails once (a CONNACK cut
        # short), then succeeds; after its 2 attempts check_msg returns None, as umqtt.robust's
        assert c.check_msg() is None
        assert logs == [(False, "MQTTLinkError"), (False, "MQTTLinkError"),
                        (True, "MQTTLinkError")], logs
        assert delays == [1]
        assert c.check_msg() == 0x30 and got == [(b"t", b"ok")]
        assert [p[1][7] & 0x02 for p in (u.packets()[0] for u in net.used[1:])] == [0, 0, 0]
        # a QoS 1 publish whose link dies before the PUBACK is sent again on the new link, once
        c.timeout = 2
        c2, conn, got = _connected(net, MQTTClient)
        c2.delay = delays.append
        c2.log = lambda in_reconnect, e: logs.append((in_reconnect, type(e).__name__))
        conn.feed(EOF)
        conn5 = net.add(CONNACK_OK, b"\x40\x02\x00\x02")
        assert c2.publish("ms/id", b"once", qos=1) is None and c2.pending() == 0
        pubs = [p for p in conn5.packets() if p[0] & 0xF0 == 0x30]
        assert len(pubs) == 1 and pubs[0][0] == 0x32, pubs  # no DUP re-send beside the retry
        assert conn5.packets()[0][1][7] & 0x02 == 0  # reconnect(): clean_session False
        # wait_msg reconnects as well; a refusal is not retried: it leaves reconnect()
        conn5.feed(EOF)
        net.add(b"\x20\x02\x00\x05")
        e = raises(Exception, c2.wait_msg)
        assert e.args[0] == 5, e
    finally:
        net.restore()


def test_no_memory_for_an_incoming_packet_closes_the_connection():
    """A header within max_packet whose body the heap cannot hold: the connection is closed with
    MQTTMemoryError (before: the reader stayed mid-packet without a buffer and the next poll
    raised TypeError); umqtt.simple's client raises OSError ENOMEM, so umqtt.robust reconnects."""
    from fakenet import CONNACK_OK
    from umqtt.simple import MQTTClient

    from microcot import mqtt

    class Tight(P.Reader):  # the body's allocation fails, as on a fragmented heap
        def got(self, n):
            pkt = P.Reader.got(self, n)
            if self.rl > 1000 and self._bn == 0:
                self._body = self._bm = None
                raise MemoryError("memory allocation failed, allocating %d bytes" % self.rl)
            return pkt

    net = _net()
    try:
        cases = [(mqtt.MQTTClient, 4096, b"\x30\xa0\x1f")]  # 4000 bytes declared
        if _on_mp():  # a real one: 64 MiB within max_packet, far beyond any board's heap
            cases.append((mqtt.MQTTClient, 1 << 27, b"\x30\x80\x80\x80\x20"))
        cases.append((MQTTClient, 4096, b"\x30\xa0\x1f"))
        for cls, limit, head in cases:
            c, conn, got = _connected(net, cls, max_packet=limit)
            if limit == 4096:
                c._rx = Tight(limit)
            conn.feed(head + b"\x00\x01t")
            if cls is MQTTClient:
                e = raises(OSError, c.check_msg)
                assert e.args[0] == 12 and isinstance(e.error, mqtt.MQTTMemoryError), e
            else:
                e = raises(MemoryError, c.poll, 0)
                assert isinstance(e, mqtt.MQTTMemoryError) and "connection closed" in str(e)
            assert not c.isconnected() and conn.closed
            net.add(CONNACK_OK, b"\x30\x05\x00\x01tok")
            c.connect()
            assert c.poll(0) == 0x30 and got == [(b"t", b"ok")]
            c.close()
    finally:
        net.restore()
