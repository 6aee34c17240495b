# The MQTT client's I/O-free parts (microcot.mqtt): its import needs the port's socket and ssl,
# which a board without a network stack (the plain Pico) lacks, so these run only where they exist.
from dt import raises

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
