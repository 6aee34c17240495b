# Seeded fuzz of the MQTT client driver (microcot.mqtt) against a hostile broker, on both
# runtimes: every input is a CONNACK and a stream of packets a broker could send, mutated (bit
# flips, truncation, splicing, huge declared lengths, duplication), played through the scripted
# network of fakenet.py. The driver's documented outcome for anything it cannot take is an
# MQTTException or MQTTMemoryError (mqtt.ERRORS) with the connection closed; any other exception
# fails the run.
# The packet codec's own fuzz is test_fuzz_mqtt.py's; tools/fuzz.py runs fuzz_client with big
# counts.
from dt import Rng

from microcot import mqttpkt as P

BOARD_REQUIRES = ("socket", "ssl")

# what a broker sends: CONNACK first, then any of these
_CONNACK = b"\x20\x02\x00\x00"
_SEEDS = (
    P.publish("mr/dev", b"200,1,2"),
    P.publish("mr/dev", b"510,dev", qos=1, pid=5),
    P.publish("mr/dev", b"q2", qos=2, pid=7),
    P.publish("mr/dev", b"q2", qos=2, pid=7, dup=True),
    P.ack(P.PUBREL, 7),
    P.ack(P.PUBACK, 9),
    P.ack(P.PUBCOMP, 3),
    P.ack(P.UNSUBACK, 4),
    b"\x90\x03\x00\x02\x01",  # SUBACK
    b"\xd0\x00",  # PINGRESP
    P.publish("mr/dev", b"x" * 300, qos=1, pid=11),
)
_HUGE = (b"\xff\xff\xff\x7f", b"\x80\x80\x80\x01", b"\xa0\x1f", b"\xff\xff\xff\xff\x01",
         b"\x81\x10")


def _mutate(rng, data):
    b = bytearray(data)
    k = rng.below(6)
    if k == 0 and b:  # bit flips
        for _ in range(1 + rng.below(3)):
            i = rng.below(len(b))
            b[i] ^= 1 << rng.below(8)
    elif k == 1 and b:  # truncation
        b = b[:rng.below(len(b))]
    elif k == 2:  # random bytes spliced in
        i = rng.below(len(b) + 1)
        b[i:i] = rng.bytes(1 + rng.below(8))
    elif k == 3 and b:  # a huge (or long) remaining length after some first byte
        i = rng.below(len(b))
        b[i + 1:i + 2] = _HUGE[rng.below(len(_HUGE))]
    elif k == 4:  # a piece repeated
        i = rng.below(len(b) + 1)
        b[i:i] = b[rng.below(len(b) + 1):][:1 + rng.below(16)]
    else:  # a random first byte
        if b:
            b[rng.below(len(b))] = rng.u32() & 0xFF
    return bytes(b)


def fuzz_client(rng, n):
    """Play n mutated broker streams against one MQTTClient; count {"inputs", "accepted",
    "rejected"} (rejected: the documented MQTTException/MQTTMemoryError, connection closed)."""
    from fakenet import EOF, FakeNet

    from microcot import mqtt

    net = FakeNet(mqtt)
    accepted = rejected = 0
    got = []
    c = mqtt.MQTTClient("fuzz", "broker", timeout=1, max_packet=2048)
    c.note = lambda m: None
    c.set_callback(lambda t, m: got.append(len(m)) if len(got) < 8 else None)
    try:
        for _ in range(n):
            stream = b"".join(_SEEDS[rng.below(len(_SEEDS))] for _ in range(1 + rng.below(4)))
            if rng.below(8) == 0:
                stream = _mutate(rng, _CONNACK) + stream
            else:
                stream = _CONNACK + _mutate(rng, stream)
            chunks = []
            i = 0
            while i < len(stream):  # the broker's bytes arrive in random pieces
                k = 1 + rng.below(64)
                chunks.append(stream[i:i + k])
                i += k
            if rng.below(2):
                chunks.append(EOF)
            net.add(*chunks)
            c.drop_pending()
            del got[:]
            try:
                c.connect(timeout=0.01)  # a CONNACK cut short without EOF: waits this long
                for _ in range(16):
                    if c.poll(0) is None:
                        break
                accepted += 1
            except mqtt.ERRORS:
                if c.isconnected():
                    raise AssertionError("an error left the connection open: %r" % stream)
                rejected += 1
            c.close()
            del net.used[:]  # a board's heap holds no history of 300 connections
    finally:
        net.restore()
    return {"inputs": n, "accepted": accepted, "rejected": rejected}


def test_fuzz_client_seeded():
    import sys

    # a few seconds everywhere: 200 inputs take 0.1 s on the unix port, an MCU (rp2) takes 60
    # in about as long as the unix port its 200 (the emulated RP2040: 5 s)
    n = 60 if sys.platform == "rp2" else 200
    r = fuzz_client(Rng(1414), n)
    assert r["inputs"] == r["accepted"] + r["rejected"] == n
    assert r["accepted"] > n // 10 and r["rejected"] > n // 10, r  # both outcomes exercised
