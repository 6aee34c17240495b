"""The emulator's broker layer against a real Mosquitto: TLS, seed 002's topic rights, device
users bound to their client id, credentials changed while running, persistent sessions across a
restart, and process hygiene.

paho-mqtt plays the devices, the bootstrap relay and the connector, over TLS verified against the
broker's generated CA with the host name `localhost`. The bootstrap user is not a Mosquitto user:
the emulator's front serves it (test_emulator_sessions.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from microcot_host.emulator import broker as broker_mod
from microcot_host.emulator import certs
from microcot_host.emulator.broker import Broker, BrokerError, Credentials
from microcot_host.emulator.certs import client_ssl_context, ensure_ca_and_server

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0      # longest wait for something that must happen
QUIET = 0.4     # how long we listen for something that must not happen
DENIED = 0x80   # SUBACK failure code of MQTT 3.1.1


class Peer:
    """A paho client with blocking helpers and a bounded wait on everything."""

    def __init__(self, broker: Broker, client_id: str, user: str, password: str,
                 clean_session: bool = True, host: str = "localhost") -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: mqtt.ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._sub_event = threading.Condition()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session)
        c.username_pw_set(user, password)
        c.tls_set_context(client_ssl_context(broker.ca_cert))
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.disconnected.set()
        c.on_message = lambda cl, ud, msg: self.messages.put(msg)
        c.on_subscribe = self._on_subscribe
        self.client = c
        self.broker = broker
        self.host = host

    def _on_connect(self, client, userdata, flags, rc, props=None):
        self.connack = rc
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, rcs, props=None):
        with self._sub_event:
            self._subacks[mid] = [r.value for r in rcs]
            self._sub_event.notify_all()

    def connect(self) -> Peer:
        self.client.connect(self.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"
        return self

    def ok(self) -> Peer:
        self.connect()
        assert not self.connack.is_failure, f"connect refused: {self.connack}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        _, mid = self.client.subscribe(topic, qos)
        with self._sub_event:
            assert self._sub_event.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def get(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def nothing(self, quiet: float = QUIET) -> list[tuple[str, bytes]]:
        time.sleep(quiet)
        out = []
        while not self.messages.empty():
            m = self.messages.get_nowait()
            out.append((m.topic, m.payload))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_connack(broker: Broker, user: str, password: str, client_id: str | None = None) -> int:
    """The CONNACK return code byte itself, as a device's own MQTT client would see it."""
    def s(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b
    var = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30)  # 3.1.1, user+password, clean
    cid = user if client_id is None else client_id
    body = var + s(cid.encode()) + s(user.encode()) + s(password.encode())
    assert len(body) < 128
    ctx = client_ssl_context(broker.ca_cert)
    with socket.create_connection(("localhost", broker.port), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = tls.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
    assert ack[:2] == b"\x20\x02", ack
    return ack[3]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), reserved=("devicebootstrap",)) as b:
        b.add_device("8949000000000000001", "pw-device-one")
        b.add_device("8949000000000000002", "pw-device-two")
        yield b


DEV1, DEV2 = "8949000000000000001", "8949000000000000002"


@pytest.fixture
def peers():
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def dev(broker, peers, device_id=DEV1, password=None, clean=True, client_id=None) -> Peer:
    pw = password or {DEV1: "pw-device-one", DEV2: "pw-device-two"}[device_id]
    p = Peer(broker, client_id or device_id, device_id, pw, clean_session=clean)
    peers.append(p)
    return p


def connector(broker, peers, *subs: str) -> Peer:
    cred = broker.connector_credentials()
    p = Peer(broker, f"connector-{len(peers)}", cred.user, cred.password).ok()
    peers.append(p)
    for t in subs:
        assert p.subscribe(t) == 1
    return p


def relay(broker, peers) -> Peer:
    cred = broker.relay_credentials()
    p = Peer(broker, f"relay-{len(peers)}", cred.user, cred.password).ok()
    peers.append(p)
    return p


# -- the device's two directions ----------------------------------------------------------------

def test_device_publishes_connector_receives(broker, peers):
    conn = connector(broker, peers, "ms/+", "bs/+")
    d = dev(broker, peers).ok()
    d.publish(f"ms/{DEV1}", b"15,X\n100,dev")
    m = conn.get()
    assert (m.topic, m.payload) == (f"ms/{DEV1}", b"15,X\n100,dev")
    d.publish(f"bs/{DEV1}", b"X\x00\x00\x64", qos=0)
    assert conn.get().topic == f"bs/{DEV1}"


def test_connector_reaches_subscribed_device_with_qos1(broker, peers):
    conn = connector(broker, peers)
    d = dev(broker, peers, clean=False).ok()
    assert d.subscribe(f"mr/{DEV1}", qos=1) == 1
    assert d.subscribe(f"br/{DEV1}", qos=1) == 1
    conn.publish(f"mr/{DEV1}", b"510,1,op")
    m = d.get()
    assert (m.topic, m.payload, m.qos) == (f"mr/{DEV1}", b"510,1,op", 1)
    conn.publish(f"br/{DEV1}", b"\x01")
    assert d.get().topic == f"br/{DEV1}"


# -- what a device may not do -------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    f"mr/{DEV2}",            # another device's operations
    "mr/#", "mr/+", f"+/{DEV1}", "#", "+/+",   # wildcards
    f"ms/{DEV1}", f"bs/{DEV1}",                # its own publish topics are write-only
    f"sr/{DEV1}", f"ss/{DEV1}", "$SYS/#", "$CONTROL/dynamic-security/v1/response",
])
def test_device_subscription_refused(broker, peers, topic):
    d = dev(broker, peers).ok()
    assert d.subscribe(topic) == DENIED


def test_device_publish_outside_its_topics_reaches_nobody(broker, peers):
    conn = connector(broker, peers, "ms/+", "bs/+", "ss/+")
    other = dev(broker, peers, DEV2).ok()
    assert other.subscribe(f"mr/{DEV2}") == 1
    bootstrapping = relay(broker, peers)
    assert bootstrapping.subscribe(f"sr/{DEV1}") == 1
    d = dev(broker, peers).ok()
    for topic in (f"mr/{DEV1}", f"mr/{DEV2}", f"ms/{DEV2}", f"bs/{DEV2}", f"sr/{DEV1}",
                  f"ss/{DEV1}"):
        d.publish(topic, b"forged")
    d.publish("$CONTROL/dynamic-security/v1",
              json.dumps({"commands": [{"command": "deleteClient", "username": DEV2}]}))
    d.publish(f"ms/{DEV1}", b"sentinel")  # in order behind the forged ones
    assert conn.get().payload == b"sentinel"
    assert conn.nothing() == [] and other.nothing() == [] and bootstrapping.nothing() == []
    assert d.connected.is_set() and not d.disconnected.is_set()
    assert broker.has_device(DEV2)  # the forged $CONTROL command did nothing


# -- sessions bound to identities; the bootstrap relay ----------------------------------------

def test_a_device_connects_only_with_its_own_client_id(broker, peers):
    conn = connector(broker, peers)
    owner = dev(broker, peers, DEV2, clean=False).ok()
    assert owner.subscribe(f"mr/{DEV2}") == 1
    owner.close()  # away: its persistent session keeps what comes
    conn.publish(f"mr/{DEV2}", b"510,1,queued-for-dev2")
    thief = dev(broker, peers, DEV1, client_id=DEV2).connect()
    assert thief.connack.is_failure and thief.connack.value == 135  # CONNACK 5
    assert raw_connack(broker, DEV1, "pw-device-one", client_id=DEV2) == 5
    assert raw_connack(broker, DEV1, "pw-device-one", client_id="") == 5
    back = dev(broker, peers, DEV2, clean=False).ok()
    assert back.get().payload == b"510,1,queued-for-dev2"  # the session was not taken over
    live = dev(broker, peers, DEV1).ok()
    dev(broker, peers, DEV2, client_id=DEV1).connect()
    assert not live.disconnected.wait(QUIET)


def test_the_relay_carries_bootstrap_topics_only(broker, peers):
    conn = connector(broker, peers, "ss/+", "ms/+")
    r = relay(broker, peers)
    assert r.subscribe("sr/+") == 1
    for topic in ("#", "mr/+", "ms/+", "ss/+", "sr/#", "$SYS/#", f"mr/{DEV1}"):
        assert r.subscribe(topic) == DENIED, topic
    r.publish(f"ms/{DEV1}", b"not-a-device")
    r.publish("ss/NEWDEV", b"SECRETSECRETSECR")
    m = conn.get()
    assert (m.topic, m.payload) == ("ss/NEWDEV", b"SECRETSECRETSECR")
    assert conn.nothing() == []
    conn.publish("sr/NEWDEV", b"answer")
    conn.publish(f"mr/{DEV1}", b"not-for-the-relay")
    m = r.get()
    assert (m.topic, m.payload) == ("sr/NEWDEV", b"answer")
    assert r.nothing() == []


def test_an_older_data_directory_is_brought_up_to_date(tmp_path):
    """Before the front, the bootstrap user lived in Mosquitto (an acl_file and a catch-all deny
    role for everybody else) and devices could use any client id."""
    with Broker(tmp_path) as b:
        b.add_device("OLDDEV", "pw-old")
    path = tmp_path / "dynamic-security.json"
    cfg = json.loads(path.read_text())
    deny = {"rolename": "microcot-deny-rest", "acls": []}
    cfg["roles"] += [deny, {"rolename": "microcot-bootstrap", "acls": []}]
    for c in cfg["clients"]:
        if c["username"] == "OLDDEV":
            c.pop("clientid", None)
            c["roles"].append({"rolename": "microcot-deny-rest", "priority": 0})
    boot_user = dict(next(c for c in cfg["clients"] if c["username"] == "OLDDEV"),
                     username="devicebootstrap",
                     roles=[{"rolename": "microcot-bootstrap", "priority": 10}])
    cfg["clients"].append(boot_user)
    path.write_text(json.dumps(cfg))
    (tmp_path / "bootstrap.acl").write_text("pattern write ss/%c\npattern read sr/%c\n")
    with Broker(tmp_path) as b:
        assert raw_connack(b, "OLDDEV", "pw-old") == 0
        assert raw_connack(b, "OLDDEV", "pw-old", client_id="OTHER") == 5
        assert raw_connack(b, "devicebootstrap", "pw-old") == 5
    cfg = json.loads(path.read_text())
    assert {r["rolename"] for r in cfg["roles"]}.isdisjoint({"microcot-deny-rest",
                                                             "microcot-bootstrap"})
    assert "devicebootstrap" not in {c["username"] for c in cfg["clients"]}
    assert not (tmp_path / "bootstrap.acl").exists()
    assert "acl_file" not in (tmp_path / "mosquitto.conf").read_text()


def test_connector_rights(broker, peers):
    conn = connector(broker, peers)
    for topic in ("#", "mr/+", "sr/+", "br/+", "$SYS/#"):
        assert conn.subscribe(topic) == DENIED, topic
    spy = connector(broker, peers, "ms/+")
    conn.publish(f"ms/{DEV1}", b"connector must not impersonate a device")
    assert spy.nothing() == []


# -- authentication -----------------------------------------------------------------------------

def test_wrong_password_and_unknown_user_get_connack_5(broker, peers):
    # seed 002 lists 4 (bad user name or password) and 5 (not authorized) for a refused device;
    # Mosquitto 2.0 answers 5 to both
    assert raw_connack(broker, DEV1, "wrong") == 5
    assert raw_connack(broker, "8949999999999999999", "whatever") == 5
    assert raw_connack(broker, DEV1, "pw-device-one") == 0
    p = dev(broker, peers, password="wrong").connect()
    assert p.connack.is_failure and p.connack.value == 135  # paho's name for CONNACK 5


def test_removed_device_is_kicked_refused_and_can_come_back(broker, peers):
    dev_id = "AABBCCDDEEFF"
    broker.add_device(dev_id, "first-password")
    assert broker.has_device(dev_id)
    p = dev(broker, peers, dev_id, password="first-password").ok()
    assert p.subscribe(f"mr/{dev_id}") == 1

    assert broker.remove_device(dev_id) is True
    assert p.disconnected.wait(WAIT), "the live connection of a deleted device stays open"
    p.client.loop_stop()
    assert raw_connack(broker, dev_id, "first-password") in (4, 5)
    assert not broker.has_device(dev_id)
    assert broker.remove_device(dev_id) is False

    broker.add_device(dev_id, "second-password")  # re-bootstrap
    assert raw_connack(broker, dev_id, "first-password") == 5
    assert raw_connack(broker, dev_id, "second-password") == 0
    broker.add_device(dev_id, "third-password")   # existing device: only the password changes
    assert raw_connack(broker, dev_id, "second-password") == 5
    q = dev(broker, peers, dev_id, password="third-password").ok()
    assert q.subscribe(f"mr/{dev_id}") == 1 and q.subscribe(f"mr/{DEV1}") == DENIED


def test_bad_names_are_refused_before_reaching_the_broker(broker):
    for bad in ("", "a/b", "mr/#", "+", "#", "$SYS", "%c", "x" * 200, "microcot-connector"):
        with pytest.raises(BrokerError):
            broker.add_device(bad, "pw")
    with pytest.raises(BrokerError):
        broker.add_device("123", "")
    for reserved in ("devicebootstrap", "microcot-bootstrap-relay", "microcot-admin"):
        with pytest.raises(BrokerError, match="reserved"):
            broker.add_device(reserved, "pw")


def test_no_password_in_files_anyone_can_read(broker):
    log = broker.log_file.read_text()
    assert "createClient" in log  # the plugin logs commands...
    for pw in ("pw-device-one", "pw-device-two", "first-password",
               broker.connector_credentials().password, broker.relay_credentials().password):
        assert pw not in log  # ...but masks their passwords
    assert "password='" not in repr(broker.connector_credentials())
    for name in ("broker-secrets.json", "dynamic-security.json", "mosquitto.conf",
                 "mosquitto.log", "tls/server.key", "tls/ca.key"):
        assert (broker.data_dir / name).stat().st_mode & 0o077 == 0, name


# -- broker behaviour ---------------------------------------------------------------------------

def test_retained_flag_is_not_stored(broker, peers):
    d = dev(broker, peers).ok()
    assert d.subscribe(f"mr/{DEV1}") == 1
    conn = connector(broker, peers)
    conn.publish(f"mr/{DEV1}", b"retained?", retain=True)
    # Mosquitto with retain_available false drops a client that sets the flag
    assert conn.disconnected.wait(WAIT)
    assert d.nothing() == []
    d.close()
    late = dev(broker, peers).ok()
    assert late.subscribe(f"mr/{DEV1}") == 1
    assert late.nothing() == []


def test_oversized_packet_closes_the_connection(broker, peers):
    conn = connector(broker, peers, "ms/+")
    d = dev(broker, peers).ok()
    d.publish(f"ms/{DEV1}", b"x" * (broker.max_packet_size + 1))
    assert d.disconnected.wait(WAIT)
    assert conn.nothing() == []


def test_tls_is_verified(broker, tmp_path):
    def handshake(ctx: ssl.SSLContext, name: str) -> None:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as raw, \
                ctx.wrap_socket(raw, server_hostname=name):
            pass

    handshake(client_ssl_context(broker.ca_cert), "localhost")
    handshake(client_ssl_context(broker.ca_cert), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        handshake(client_ssl_context(broker.ca_cert), "broker.example.com")
    other_ca = ensure_ca_and_server(tmp_path).ca_cert
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_ssl_context(other_ca), "localhost")
    # plain MQTT on the TLS port gets no CONNACK
    with socket.create_connection(("127.0.0.1", broker.port), timeout=2) as raw:
        raw.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x00")
        try:
            data = raw.recv(4)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert not data.startswith(b"\x20\x02")


# -- sessions and restarts ----------------------------------------------------------------------

def test_offline_qos1_messages_survive_reconnect_and_restart(tmp_path):
    peers: list[Peer] = []
    with Broker(tmp_path / "data") as b:
        b.add_device("DURABLE1", "durable-pw")
        try:
            d = dev(b, peers, "DURABLE1", "durable-pw", clean=False).ok()
            assert d.subscribe("mr/DURABLE1") == 1
            d.close()
            conn = connector(b, peers)
            conn.publish("mr/DURABLE1", b"op-while-offline")
            time.sleep(0.2)
            d = dev(b, peers, "DURABLE1", "durable-pw", clean=False).ok()
            assert d.get().payload == b"op-while-offline"
            d.close()

            conn.publish("mr/DURABLE1", b"op-across-restart")
            time.sleep(0.2)
            port = b.port
            conn.client.loop_stop()
            b.restart()
            assert b.port == port
            d = dev(b, peers, "DURABLE1", "durable-pw", clean=False).ok()
            m = d.get()
            assert (m.payload, m.qos) == (b"op-across-restart", 1)
            assert d.nothing() == []
            # users made while running survive, the connector's password too
            connector(b, peers)
        finally:
            for p in peers:
                p.close()


def test_two_brokers_at_once(tmp_path):
    with Broker(tmp_path / "a") as a, Broker(tmp_path / "b") as b:
        assert a.port != b.port
        a.add_device("ONLYONA", "pw-a")
        assert raw_connack(a, "ONLYONA", "pw-a") == 0
        assert raw_connack(b, "ONLYONA", "pw-a") == 5
        # each broker has its own CA
        assert a.ca_cert.read_bytes() != b.ca_cert.read_bytes()


def test_plain_listener_when_tls_is_off(tmp_path):
    with Broker(tmp_path, tls=False) as b:
        assert b.ca_cert is None and b.client_ssl_context() is None
        b.add_device("PLAIN1", "pw-plain")
        got = threading.Event()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="PLAIN1",
                        protocol=mqtt.MQTTv311)
        c.username_pw_set("PLAIN1", "pw-plain")
        c.on_connect = lambda cl, ud, fl, rc, pr: rc.is_failure or got.set()
        c.connect(b.host, b.port)
        c.loop_start()
        try:
            assert got.wait(WAIT)
        finally:
            c.disconnect()
            c.loop_stop()


def test_one_data_dir_one_broker(tmp_path):
    with Broker(tmp_path) as a:
        with pytest.raises(BrokerError, match="in use"):
            Broker(tmp_path).start()
        assert a.running


def test_stop_leaves_no_process(tmp_path):
    b = Broker(tmp_path)
    b.start()
    pid = b.pid
    assert pid and _alive(pid)
    assert b.start_seconds is not None and b.start_seconds < 5
    b.stop()
    assert not _alive(pid)
    b.stop()  # idempotent
    with pytest.raises(BrokerError, match="not running"):
        b.add_device("X1", "pw")


def test_broker_dies_with_its_parent(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from microcot_host.emulator.broker import Broker
        b = Broker({str(tmp_path)!r}); b.start()
        print(b.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == -signal.SIGKILL, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + WAIT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "mosquitto outlived the process that started it"


def test_requested_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match="already in use"):
            Broker(tmp_path, port=port).start()


def test_free_port_race_is_retried(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        real = broker_mod.free_port
        ports = iter([taken])
        monkeypatch.setattr(broker_mod, "free_port", lambda host: next(ports, None) or real(host))
        with Broker(tmp_path) as b:
            assert b.port != taken and b.running


def test_missing_mosquitto_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROCOT_MOSQUITTO", str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(BrokerError, match=r"mosquitto.*make setup.*apt-get install mosquitto"):
        Broker(tmp_path / "d").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): it is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# -- certificates -------------------------------------------------------------------------------

def test_certs_are_reused_and_renewed_when_needed(tmp_path, monkeypatch):
    files = ensure_ca_and_server(tmp_path)
    tls = tmp_path / "tls"

    def stamp():
        return {p.name: p.read_bytes() for p in tls.iterdir()}

    first = stamp()
    assert ensure_ca_and_server(tmp_path) == files
    assert stamp() == first  # idempotent
    assert (tls / "ca.key").stat().st_mode & 0o777 == 0o600
    assert files.server_key.stat().st_mode & 0o777 == 0o600

    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650

    ensure_ca_and_server(tmp_path, hostnames=("localhost", "emulator.lan"))
    second = stamp()
    assert second["ca.pem"] == first["ca.pem"] and second["server.pem"] != first["server.pem"]

    # two years on the server certificate is about to expire; the CA is not
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=certs.SERVER_DAYS - 10)
    monkeypatch.setattr(certs, "_now", lambda: later)
    ensure_ca_and_server(tmp_path, hostnames=("localhost", "emulator.lan"))
    third = stamp()
    assert third["ca.pem"] == first["ca.pem"] and third["server.pem"] != second["server.pem"]

    # a broken key file is replaced, not fatal
    files.server_key.write_text("garbage")
    ensure_ca_and_server(tmp_path)
    assert b"PRIVATE KEY" in files.server_key.read_bytes()


def test_credentials_repr_masks_password():
    assert "hunter2" not in repr(Credentials("u", "hunter2"))
