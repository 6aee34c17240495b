"""MQTT sessions bound to identities, on a running `Emulator` (its MQTT front and Mosquitto).

- a device user connects only with its own ID as client id: another device's ID is CONNACK 5,
  and the device that owns the ID keeps its connection and its operations;
- the shared bootstrap user's sessions live in the front, apart from the devices' sessions: the
  client id must be a valid device ID (else CONNACK 2), it reads only `sr/<client id>` (any
  other SUBSCRIBE gets 0x80), writes only `ss/<client id>`, and never disturbs a connected
  device with the same ID; its persistent session keeps an answer while it is away;
- the emulator's own users (connector, admin, relay) are refused on the public port;
- a CONNECT with a will is refused (CONNACK 5), a retained PUBLISH closes the connection, MQTT 5
  gets CONNACK 1;
- hostile connections are bounded: a CONNECT must come first, whole, in time and small enough,
  a bootstrap session must keep its keep-alive, connections over the limit are closed at once;
- with Mosquitto stopped the front answers CONNACK 3, and serves again once it is back.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import string
import struct
import threading
import time

import pytest
from emulator_fixtures import (
    DENIED,
    QUIET,
    REGISTRATION,
    WAIT,
    XID,
    Device,
    device,
    new_iccid,
    rest,
    wait_for,
)

from microcot import xtea
from microcot_host.emulator import Emulator
from microcot_host.emulator.broker import ADMIN_USER, CONNECTOR_USER
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.emulator.front import Front

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu-sessions"), availability_interval=0) as e:
        iccid = new_iccid()
        d = device(e.connection, iccid, e.add_device(iccid))
        try:
            assert d.request(REGISTRATION).startswith("20,")
        finally:
            d.close()
        yield e


@pytest.fixture(scope="module")
def conn(emu):
    return emu.connection


# -- raw MQTT -------------------------------------------------------------------------------------

def _s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _rl(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, user: str | None, password: str | None, keepalive: int = 30,
                   clean: bool = True, will: tuple[str, bytes] | None = None,
                   flags_extra: int = 0) -> bytes:
    flags = (0x02 if clean else 0) | flags_extra
    payload = _s(client_id.encode())
    if will is not None:
        flags |= 0x04 | 0x08  # will, QoS 1
        payload += _s(will[0].encode()) + _s(will[1])
    if user is not None:
        flags |= 0x80
        payload += _s(user.encode())
    if password is not None:
        flags |= 0x40
        payload += _s(password.encode())
    body = _s(b"MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + payload
    return b"\x10" + _rl(len(body)) + body


class Raw:
    """One TLS connection to the emulator's MQTT port, byte by byte."""

    def __init__(self, conn: dict) -> None:
        ctx = client_ssl_context(conn["ca_cert"])
        raw = socket.create_connection((conn["mqtt_host"], conn["mqtt_port"]), timeout=WAIT)
        self.sock = ctx.wrap_socket(raw, server_hostname=conn["mqtt_host"])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int, timeout: float = WAIT) -> bytes:
        """n bytes, or fewer when the server closed the connection."""
        self.sock.settimeout(timeout)
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                break
            out += chunk
        return out

    def closed(self, timeout: float = WAIT) -> bool:
        """True once the server closed the connection (within timeout)."""
        return self.recv(1, timeout) == b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connack(conn: dict, packet: bytes) -> int:
    """The CONNACK return code for one CONNECT packet."""
    r = Raw(conn)
    try:
        r.send(packet)
        ack = r.recv(4)
        assert ack[:2] == b"\x20\x02", ack
        return ack[3]
    finally:
        r.close()


def secret16() -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(16))


def self_create(d: Device) -> str:
    assert d.ask("100," + d.id) == "50,2,404,Not Found"
    mo = d.ask(f"101,{d.id},sessions device").split("\n")[1].split(",")[2]
    assert d.ask(f"102,{mo},{d.id}") == f"87,1,{XID}\n200,2,{d.id},{mo}"
    return mo


def watch_disconnect(d: Device) -> threading.Event:
    lost = threading.Event()
    d.client.on_disconnect = lambda *a: lost.set()
    return lost


def boot(conn: dict, client_id: str, clean: bool = True) -> Device:
    return Device(conn, client_id, conn["bootstrap_user"], conn["bootstrap_password"],
                  clean_session=clean)


# -- device users ---------------------------------------------------------------------------------

def test_a_device_user_cannot_take_another_devices_client_id(emu, conn):
    a_id, b_id = new_iccid(), new_iccid()
    a_pw, b_pw = emu.add_device(a_id), emu.add_device(b_id)
    b = device(conn, b_id, b_pw)
    try:
        mo = self_create(b)
        lost = watch_disconnect(b)
        assert connack(conn, connect_packet(b_id, a_id, a_pw, clean=False)) == 5
        thief = Device(conn, b_id, a_id, a_pw)
        thief.client.connect(conn["mqtt_host"], conn["mqtt_port"], keepalive=30)
        thief.client.loop_start()
        try:
            assert thief.connected.wait(WAIT)
            assert thief.connack.is_failure and thief.connack.value == 135  # CONNACK 5
        finally:
            thief.client.loop_stop()
        assert not lost.wait(QUIET), "B was kicked off by A's attempt"
        op = emu.create_operation(mo, {"c8y_Restart": {}})
        assert b.get("mr/" + b_id).decode() == f"87,1,{XID}\n203,1,{op['id']},{mo}"
    finally:
        b.close()
    assert connack(conn, connect_packet(a_id, a_id, a_pw)) == 0  # A with its own ID is fine


def test_the_emulators_own_users_are_refused_on_the_public_port(emu, conn):
    cred = emu.broker.connector_credentials()
    assert connack(conn, connect_packet(CONNECTOR_USER, cred.user, cred.password)) == 5
    assert connack(conn, connect_packet("x-" + ADMIN_USER, ADMIN_USER, "whatever")) == 5
    assert connack(conn, connect_packet("anonymous", None, None)) == 5


# -- the bootstrap user ---------------------------------------------------------------------------

def test_the_bootstrap_user_never_disturbs_a_connected_device(emu, conn):
    b_id = new_iccid()
    b = device(conn, b_id, emu.add_device(b_id))
    try:
        mo = self_create(b)
        lost = watch_disconnect(b)
        intruder = boot(conn, b_id, clean=False).connect()  # B's own ID, as a re-bootstrap would
        try:
            assert intruder.subscribe("sr/" + b_id) == 1
            assert intruder.subscribe("mr/" + b_id) == DENIED
            op = emu.create_operation(mo, {"c8y_Restart": {}})
            assert b.get("mr/" + b_id).decode() == f"87,1,{XID}\n203,1,{op['id']},{mo}"
            assert intruder.nothing("mr/" + b_id, 0.1) == []
        finally:
            intruder.close()
        assert not lost.wait(QUIET), "the bootstrap login kicked the device off"
        assert b.request("15," + XID).startswith("20,")  # still served
    finally:
        b.close()


def test_the_bootstrap_user_reads_and_writes_only_its_own_topics(emu, conn):
    own, other = new_iccid(), new_iccid()
    spy = boot(conn, own).connect()
    try:
        assert spy.subscribe("sr/" + other) == DENIED
        for topic in ("sr/+", "sr/#", "#", "+/" + own, "mr/" + own, "ss/" + own, "sr/" + own + "/x",
                      "sr", "$SYS/#", "$CONTROL/dynamic-security/v1/response"):
            assert spy.subscribe(topic) == DENIED, topic
        assert spy.subscribe("sr/" + own, qos=0) == 0
        assert spy.subscribe("sr/" + own, qos=1) == 1
        spy.publish("ss/" + other, secret16().encode())  # acknowledged, and dropped
        spy.publish("ms/" + own, b"15," + XID.encode())
        # the other device's own bootstrap: its answer never reaches the spy
        with _auto_accept(emu):
            password = _bootstrap(conn, other)
        assert len(password) == 20
        assert spy.nothing("sr/" + other) == [] and spy.nothing("sr/" + own, 0) == []
        assert spy.connected.is_set()
    finally:
        spy.close()
    # only the other device's request exists: the spy's forged secret made none for it twice
    assert rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + own)[0] == 404


def test_the_bootstrap_client_id_must_be_a_device_id(emu, conn):
    user, pw = conn["bootstrap_user"], conn["bootstrap_password"]
    for bad in ("", "a/b", "sr/+", "#", "x" * 200, " lead"):
        assert connack(conn, connect_packet(bad, user, pw)) == 2, bad
    assert connack(conn, connect_packet(new_iccid(), user, pw + "x")) == 5
    assert connack(conn, connect_packet("AABBCCDDEEFF", user, pw)) == 0


def test_a_bootstrap_answer_waits_in_the_persistent_session(emu, conn):
    dev_id, secret = new_iccid(), secret16()
    b = boot(conn, dev_id, clean=False).connect()
    assert b.subscribe("sr/" + dev_id) == 1
    b.publish("ss/" + dev_id, secret.encode())
    wait_for(lambda: rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + dev_id)[1]
             .get("status") == "PENDING_ACCEPTANCE")
    b.close()
    emu.accept(dev_id)  # answered while the device is away
    time.sleep(0.2)
    again = boot(conn, dev_id, clean=False).connect()  # no new SUBSCRIBE: the session has it
    try:
        cipher = again.get("sr/" + dev_id)
        password = xtea.unpad(xtea.decrypt_ecb(secret.encode(), cipher)).decode()
    finally:
        again.close()
    assert connack(conn, connect_packet(dev_id, dev_id, password)) == 0
    # a clean session forgets it: nothing is delivered any more
    fresh = boot(conn, dev_id, clean=True).connect()
    try:
        assert fresh.nothing("sr/" + dev_id) == []
    finally:
        fresh.close()


def test_a_bootstrap_session_speaks_qos_2_unsubscribes_and_can_be_taken_over(emu, conn):
    dev_id, secret = new_iccid(), secret16().encode()
    user, pw = conn["bootstrap_user"], conn["bootstrap_password"]
    first = Raw(conn)
    try:
        first.send(connect_packet(dev_id, user, pw, clean=False))
        assert first.recv(4) == b"\x20\x02\x00\x00"
        sub = _s(("sr/" + dev_id).encode()) + b"\x02"
        first.send(b"\x82" + _rl(2 + len(sub)) + b"\x00\x07" + sub)
        assert first.recv(5) == b"\x90\x03\x00\x07\x02"
        body = _s(("ss/" + dev_id).encode()) + b"\x00\x09" + secret
        first.send(bytes([0x34]) + _rl(len(body)) + body)   # QoS 2
        assert first.recv(4) == b"\x50\x02\x00\x09"          # PUBREC
        first.send(bytes([0x3C]) + _rl(len(body)) + body)   # the same again, DUP
        assert first.recv(4) == b"\x50\x02\x00\x09"
        first.send(b"\x62\x02\x00\x09")                       # PUBREL
        assert first.recv(4) == b"\x70\x02\x00\x09"          # PUBCOMP
        unsub = _s(("sr/" + dev_id).encode())
        first.send(b"\xa2" + _rl(2 + len(unsub)) + b"\x00\x0a" + unsub)
        assert first.recv(4) == b"\xb0\x02\x00\x0a"
        wait_for(lambda: rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + dev_id)[0]
                 == 200)
        second = Raw(conn)  # the same client id again: the first connection goes
        try:
            second.send(connect_packet(dev_id, user, pw, clean=False))
            assert second.recv(4) == b"\x20\x02\x01\x00"  # its session was there
            assert first.closed()
        finally:
            second.close()
    finally:
        first.close()


def test_mqtt_5_gets_connack_1(emu, conn):
    dev_id = new_iccid()
    pw = emu.add_device(dev_id)
    pkt = bytearray(connect_packet(dev_id, dev_id, pw))
    assert pkt[8] == 4
    pkt[8] = 5
    assert connack(conn, bytes(pkt)) == 1


def test_a_large_publish_passes_the_front(emu, conn):
    dev_id = new_iccid()
    d = device(conn, dev_id, emu.add_device(dev_id))
    try:
        info = d.client.publish("ms/" + dev_id, b"15," + XID.encode() + b"\n" + b"9" * 200_000,
                                qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()  # Mosquitto's PUBACK: the 200 KB packet arrived whole
        d.get("mr/" + dev_id)       # the platform's answer to it, whatever it says
        assert d.request("15," + XID).startswith("20,")  # the connection is still good
    finally:
        d.close()


# -- seed 002: no last will, no retained messages -------------------------------------------------

def test_a_connect_with_a_will_is_refused(emu, conn):
    dev_id = new_iccid()
    pw = emu.add_device(dev_id)
    will = ("ms/" + dev_id, b"15," + XID.encode() + b"\n400,c8y_Gone,the device is gone")
    assert connack(conn, connect_packet(dev_id, dev_id, pw, will=will)) == 5
    assert connack(conn, connect_packet(dev_id, conn["bootstrap_user"],
                                        conn["bootstrap_password"], will=("ss/" + dev_id, b"x"))
                   ) == 5
    assert connack(conn, connect_packet(dev_id, dev_id, pw)) == 0


@pytest.mark.parametrize("who", ["device", "bootstrap"])
def test_a_retained_publish_closes_the_connection(emu, conn, who):
    dev_id = new_iccid()
    if who == "device":
        user, pw, topic = dev_id, emu.add_device(dev_id), "ms/" + dev_id
    else:
        user, pw, topic = conn["bootstrap_user"], conn["bootstrap_password"], "ss/" + dev_id
    r = Raw(conn)
    try:
        r.send(connect_packet(dev_id, user, pw))
        assert r.recv(4) == b"\x20\x02\x00\x00"
        t = topic.encode()
        body = _s(t) + b"\x00\x01" + secret16().encode()
        r.send(bytes([0x33]) + _rl(len(body)) + body)  # PUBLISH QoS 1, retain
        assert r.closed()
    finally:
        r.close()
    if who == "bootstrap":
        time.sleep(QUIET)
        assert rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + dev_id)[0] == 404


# -- hostile connections --------------------------------------------------------------------------

def test_a_connect_must_come_first_whole_and_in_time(emu, conn):
    front = emu.front
    saved = front.connect_timeout
    front.connect_timeout = 0.5
    try:
        silent = Raw(conn)  # says nothing after the TLS handshake
        half = Raw(conn)    # starts a CONNECT and stops
        pkt = connect_packet("AABBCCDDEE01", "AABBCCDDEE01", "pw")
        half.send(pkt[:5])
        assert silent.closed() and half.closed()
        for first in (b"\x82\x05\x00\x01\x00\x00\x00",             # SUBSCRIBE before CONNECT
                      b"\x10\xff\xff\xff\x7f",                       # 256 MB CONNECT
                      pkt[:9] + bytes([pkt[9] | 0x01]) + pkt[10:],   # reserved flag set
                      pkt[:9] + bytes([0x40]) + pkt[10:]):           # password without user
            r = Raw(conn)
            try:
                r.send(first)
                assert r.closed(), first
            finally:
                r.close()
        for r in (silent, half):
            r.close()
    finally:
        front.connect_timeout = saved
    assert connack(conn, connect_packet("AABBCCDDEE02", conn["bootstrap_user"],
                                        conn["bootstrap_password"])) == 0


def test_connections_over_the_limit_are_closed_at_once():
    """A front of its own (plain TCP, nothing behind it): the third connection of two allowed."""
    front = Front("127.0.0.1", 0, None, lambda: ("127.0.0.1", 9), max_connections=2)
    front.start()
    socks = []
    try:
        for _ in range(2):
            socks.append(socket.create_connection(("127.0.0.1", front.port), timeout=WAIT))
        wait_for(lambda: front.connections == 2)
        with socket.create_connection(("127.0.0.1", front.port), timeout=WAIT) as third:
            assert third.recv(1) == b""  # closed without a byte
        socks[0].close()
        wait_for(lambda: front.connections == 1)
        with socket.create_connection(("127.0.0.1", front.port), timeout=WAIT) as again:
            again.sendall(connect_packet("AABBCCDDEEFF", "AABBCCDDEEFF", "pw"))
            assert again.recv(4) == b"\x20\x02\x00\x03"  # nothing behind it: CONNACK 3
    finally:
        for s in socks:
            s.close()
        front.stop()


def test_a_bootstrap_session_that_misses_its_keep_alive_is_closed(emu, conn):
    r = Raw(conn)
    try:
        r.send(connect_packet(new_iccid(), conn["bootstrap_user"], conn["bootstrap_password"],
                              keepalive=1))
        assert r.recv(4) == b"\x20\x02\x00\x00"
        r.send(b"\xc0\x00")  # PINGREQ
        assert r.recv(2) == b"\xd0\x00"
        t0 = time.monotonic()
        assert r.closed(timeout=5)
        assert time.monotonic() - t0 >= 1.0  # 1.5 times the keep-alive, not at once
    finally:
        r.close()


def test_a_stopped_broker_answers_connack_3_and_a_restarted_one_serves_again(emu, conn):
    dev_id = new_iccid()
    pw = emu.add_device(dev_id)
    emu.broker.stop()
    try:
        assert connack(conn, connect_packet(dev_id, dev_id, pw)) == 3
        assert connack(conn, connect_packet(dev_id, conn["bootstrap_user"],
                                            conn["bootstrap_password"])) == 3
    finally:
        emu.broker.start()
    d = device(conn, dev_id, pw)
    try:
        assert d.request("15," + XID).startswith("20,")
    finally:
        d.close()
    with _auto_accept(emu):
        assert len(wait_for(lambda: _try(lambda: _bootstrap(conn, new_iccid())), WAIT)) == 20


# -- helpers ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _auto_accept(emu):
    emu.connector.auto_accept = True
    try:
        yield
    finally:
        emu.connector.auto_accept = False


def _bootstrap(conn: dict, dev_id: str) -> str:
    secret = secret16()
    b = boot(conn, dev_id, clean=False)
    try:
        b.connect()
        assert b.subscribe("sr/" + dev_id) == 1
        b.publish("ss/" + dev_id, secret.encode())
        cipher = b.get("sr/" + dev_id)
    finally:
        b.close()
    return xtea.unpad(xtea.decrypt_ecb(secret.encode(), cipher)).decode()


def _try(fn):
    try:
        return fn()
    except AssertionError:
        return None
