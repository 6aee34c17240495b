"""The device's MQTT client (firmware/microcot/mqtt.py).

(a) On MicroPython (the unix port, as on the virtual board) against the real broker, Mosquitto over
    TLS verified with the emulator's CA: a script runs in `micropython` and reports JSON lines,
    paho-mqtt plays the connector. Verified TLS, a wrong CA and a wrong host name refused, CONNACK 5
    as the typed error, and a QoS 1 message that survives a broker crash by its DUP re-send.
(b) On CPython against a scripted fake broker (a thread with a socket) for what a real broker
    never does: malformed and hostile packets, unknown packet ids, refusals, silence.

Timing assertions only bound from above, generously: CI machines are slow and loaded.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from microcot import mqtt
from microcot import mqttpkt as P
from microcot_host.emulator.broker import Broker
from microcot_host.emulator.certs import ensure_ca_and_server

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = Path(sys.executable).parent / "micropython"
DEV, PW = "8949000000000000042", "pw-mqtt-client"
WAIT = 10.0

# -- (a) MicroPython against Mosquitto ------------------------------------------------------------

MP_SCRIPT = r"""
import sys, json, gc, time
sys.path.insert(0, %(firmware)r)
from microcot.mqtt import MQTTClient, tls_context, MQTTException
with open(sys.argv[1]) as f:  # a file: the unix port dies on an argument of 256+ characters
    cfg = json.load(f)
ID = cfg["id"]

def out(**kw):
    print(json.dumps(kw))

def err(e):
    return {"cls": type(e).__name__, "msg": str(e), "code": getattr(e, "code", None)}

def client(password, ctx, host="localhost", keepalive=30, **kw):
    c = MQTTClient(ID, host, cfg["port"], user=ID, password=password, keepalive=keepalive,
                   ssl=ctx, **kw)
    got = []
    c.set_callback(lambda t, m: got.append([t.decode(), m.decode()]))
    return c, got

mode = cfg["mode"]
if mode == "roundtrip":
    gc.collect()
    before = gc.mem_alloc()
    c, got = client(cfg["pw"], tls_context(cafile=cfg["ca"]), keepalive=1)
    sp = c.connect(clean_session=False)
    gc.collect()
    conn_heap = gc.mem_alloc() - before
    granted = c.subscribe("mr/" + ID, 1)
    pid = c.publish("ms/" + ID, b"hello", qos=1)
    acked = c.wait_puback(pid, 10000)
    t0 = time.ticks_ms()
    while not got and time.ticks_diff(time.ticks_ms(), t0) < 10000:
        c.poll(200)
    t0 = time.ticks_ms()
    idle = c.poll(300)  # nothing more comes: poll waits the 300 ms and no longer
    poll_ms = time.ticks_diff(time.ticks_ms(), t0)
    while time.ticks_diff(time.ticks_ms(), t0) < 2500:  # keep-alive 1 s: pings keep it up
        c.poll(100)
    alive = c.isconnected()
    c.disconnect()
    out(sp=sp, granted=granted, pid=pid, acked=acked, got=got, pending=c.pending(),
        idle=idle, poll_ms=poll_ms, alive=alive, conn_heap=conn_heap)
elif mode == "refusals":
    res = {}
    for name, pw, ctx, kw in (
            ("wrong_ca", cfg["pw"], tls_context(cafile=cfg["other_ca"]), {}),
            ("wrong_host", cfg["pw"], tls_context(cafile=cfg["ca"]),
             {"ssl_params": {"server_hostname": "wrong.example"}}),
            ("wrong_password", "not-" + cfg["pw"], tls_context(cafile=cfg["ca"]), {}),
            ("unverified", cfg["pw"], tls_context(verify=False), {})):
        c, got = client(pw, ctx, **kw)
        try:
            c.connect()
            res[name] = "connected"
            c.disconnect()
        except MQTTException as e:
            res[name] = err(e)
    c, got = client(cfg["pw"], tls_context(cafile=cfg["ca"]))
    c.connect()
    try:
        c.subscribe("mr/someone-else", 1)
        res["foreign_sub"] = "granted"
    except MQTTException as e:
        res["foreign_sub"] = err(e)
    res["after_sub"] = c.isconnected()
    c.disconnect()
    if "silent_port" in cfg:
        c = MQTTClient(ID, "localhost", cfg["silent_port"], ssl=tls_context(cafile=cfg["ca"]),
                       timeout=1)
        t0 = time.ticks_ms()
        try:
            c.connect()
            res["silent"] = "connected"
        except MQTTException as e:
            res["silent"] = err(e)
        res["silent_ms"] = time.ticks_diff(time.ticks_ms(), t0)
    out(**res)
elif mode == "fake":
    # plain TCP against the scripted fake broker: the same client code paths without TLS
    res = {}
    c = MQTTClient("mp", "127.0.0.1", cfg["port"], keepalive=0, timeout=3, max_packet=4096)
    got = []
    c.set_callback(lambda t, m: got.append([t.decode(), m.decode()]))
    c.connect()
    res["kinds"] = [c.poll(3000) for _ in range(4)]
    res["got"] = got
    t0 = time.ticks_ms()
    res["idle"] = c.poll(250)
    res["poll_ms"] = time.ticks_diff(time.ticks_ms(), t0)
    try:
        c.poll(3000)
    except MQTTException as e:
        res["oversized"] = err(e)
    res["oversized_ms"] = time.ticks_diff(time.ticks_ms(), t0) - res["poll_ms"]
    c.keepalive = 1
    c.connect()
    t0 = time.ticks_ms()
    try:
        while time.ticks_diff(time.ticks_ms(), t0) < 10000:
            c.poll(100)
    except MQTTException as e:
        res["dead"] = err(e)
    res["dead_ms"] = time.ticks_diff(time.ticks_ms(), t0)
    out(**res)
elif mode == "crash":
    c, got = client(cfg["pw"], tls_context(cafile=cfg["ca"]), timeout=5)
    c.connect(clean_session=False)
    out(step="connected")
    sys.stdin.readline()                      # the broker is frozen now
    pid = c.publish("ms/" + ID, b"survives", qos=1)
    out(step="published", pid=pid, pending=c.pending())
    t0 = time.ticks_ms()
    lost = None
    while lost is None and time.ticks_diff(time.ticks_ms(), t0) < 20000:
        try:
            c.poll(200)
        except MQTTException as e:
            lost = err(e)
    out(step="lost", error=lost, pending=c.pending())
    sys.stdin.readline()                      # the broker is back, the connector listens
    sp = c.connect(clean_session=False)
    acked = c.wait_puback(pid, 10000)
    out(step="reconnected", sp=sp, acked=acked, pending=c.pending())
    c.disconnect()
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("mqttc"))
    b.start()
    b.add_device(DEV, PW)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def mp_script(tmp_path_factory):
    if not MICROPYTHON.exists():
        pytest.skip(f"no MicroPython unix port at {MICROPYTHON}")
    p = tmp_path_factory.mktemp("mp") / "mqtt_probe.py"
    p.write_text(MP_SCRIPT % {"firmware": str(FIRMWARE)})
    return p


def mp_cfg(broker, mode, **kw):
    return dict(mode=mode, id=DEV, pw=PW, port=broker.port, ca=str(broker.ca_cert), **kw)


def cfg_file(cfg: dict) -> str:
    """The script's settings as a JSON file: `micropython` (1.29 unix port) stops with
    "FATAL: uncaught NLR" when a command-line argument is 256 characters or longer."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="mqtt-cfg-")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    return path


def run_mp(script, cfg, heap=None):
    path = cfg_file(cfg)
    cmd = [str(MICROPYTHON)] + (["-X", f"heapsize={heap}"] if heap else []) + [str(script), path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=40)
    finally:
        os.unlink(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), proc.stdout


class Connector:
    """paho as the platform side: receives ms/+ and can publish to mr/<ID>."""

    def __init__(self, broker: Broker, echo: bool = False) -> None:
        cred = broker.connector_credentials()
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.ready = threading.Event()
        c = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                        client_id=f"conn-{time.monotonic_ns()}", protocol=paho.MQTTv311)
        c.username_pw_set(cred.user, cred.password)
        c.tls_set_context(broker.client_ssl_context())
        c.on_connect = lambda cl, ud, fl, rc, pr=None: cl.subscribe("ms/+", 1)
        c.on_subscribe = lambda *a: self.ready.set()

        def on_message(cl, ud, msg):
            self.messages.put(msg)
            if echo:
                cl.publish("mr/" + msg.topic.split("/", 1)[1], b"echo:" + msg.payload, qos=1)

        c.on_message = on_message
        c.connect("localhost", broker.port, keepalive=30)
        c.loop_start()
        assert self.ready.wait(WAIT), "connector: no SUBACK"
        self.client = c

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_micropython_over_verified_tls_publishes_subscribes_and_receives(broker, mp_script):
    conn = Connector(broker, echo=True)
    try:
        res, stdout = run_mp(mp_script, mp_cfg(broker, "roundtrip"))
        m = conn.messages.get(timeout=WAIT)
    finally:
        conn.close()
    assert (m.topic, m.payload, m.qos) == (f"ms/{DEV}", b"hello", 1)
    assert res["granted"] == 1 and res["acked"] is True and res["pending"] == 0
    assert res["pid"] == 2  # the SUBSCRIBE took id 1
    assert res["got"] == [[f"mr/{DEV}", "echo:hello"]]
    # poll(300) under TLS on MicroPython returns after about 300 ms, never much later
    assert res["idle"] is None and 290 <= res["poll_ms"] < 2000, res
    assert res["alive"] is True  # PINGREQ/PINGRESP over TLS with a keep-alive of 1 s
    assert "WARNING" not in stdout


def test_micropython_refuses_wrong_ca_and_host_and_types_connack_5(broker, mp_script, tmp_path):
    other = ensure_ca_and_server(tmp_path / "other").ca_cert

    def silent(accept):  # a TLS server that never answers the handshake
        accept().wait_closed()

    fake = Fake(silent)
    res, stdout = run_mp(mp_script, mp_cfg(broker, "refusals", other_ca=str(other),
                                           silent_port=fake.port))
    fake.finish()
    assert res["wrong_ca"]["cls"] == "MQTTTLSError", res
    assert res["wrong_host"]["cls"] == "MQTTTLSError", res
    assert "CN" in res["wrong_host"]["msg"] or "name" in res["wrong_host"]["msg"].lower(), res
    # Mosquitto 2.0 answers a wrong password with 5 (see broker.py)
    assert res["wrong_password"]["cls"] == "MQTTConnectError", res
    assert res["wrong_password"]["code"] == 5 and "not authorized" in res["wrong_password"]["msg"]
    # verification off is possible, but only explicitly and never quietly
    assert res["unverified"] == "connected"
    assert "WARNING: TLS certificate verification disabled" in stdout
    assert "without certificate verification" in stdout
    # the broker's SUBACK 0x80 for another device's topic, with the link still up
    assert res["foreign_sub"]["cls"] == "MQTTSubscribeError", res
    assert "'mr/someone-else'" in res["foreign_sub"]["msg"] and res["after_sub"] is True
    # the connect timeout also bounds a TLS handshake that never completes
    assert res["silent"]["cls"] == "MQTTTimeout" and res["silent_ms"] < 5000, res


def test_micropython_qos1_message_survives_a_broker_crash(broker, mp_script):
    path = cfg_file(mp_cfg(broker, "crash"))
    proc = subprocess.Popen([str(MICROPYTHON), str(mp_script), path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[dict] = queue.Queue()

    def reader():
        for ln in proc.stdout:
            if ln.startswith("{"):
                lines.put(json.loads(ln))

    threading.Thread(target=reader, daemon=True).start()

    def step(name):
        try:
            msg = lines.get(timeout=30)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no '{name}' from micropython: {proc.stderr.read()}")
        assert msg.get("step") == name, msg
        return msg

    conn = None
    try:
        step("connected")
        # freeze the broker so the PUBLISH is written but never acknowledged, then crash it
        os.kill(broker.pid, signal.SIGSTOP)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        pub = step("published")
        assert pub["pending"] == 1
        time.sleep(0.3)
        os.kill(broker.pid, signal.SIGKILL)
        lost = step("lost")
        assert lost["error"]["cls"] in ("MQTTConnectionError", "MQTTTimeout"), lost
        assert lost["pending"] == 1
        broker.restart()
        conn = Connector(broker)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        back = step("reconnected")
        # Mosquitto was killed before it saved the session (sp False): re-sent all the same
        assert back["acked"] is True and back["pending"] == 0, (pub, lost, back)
        m = conn.messages.get(timeout=WAIT)
        assert (m.topic, m.payload) == (f"ms/{DEV}", b"survives")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if conn:
            conn.close()
        os.unlink(path)
        if broker.running:
            os.kill(broker.pid, signal.SIGCONT)  # in case the test failed while it was frozen
        else:
            broker.restart()


def test_micropython_against_the_fake_broker(mp_script):
    seen = {}

    def script(accept):
        link = accept()
        link.connack()
        link.send(P.publish("mr/X", b"q1", qos=1, pid=5) + P.publish("mr/X", b"q2", qos=2, pid=7)
                  + P.publish("mr/X", b"q2", qos=2, pid=7, dup=True) + P.ack(P.PUBREL, 7))
        seen["acks"] = [link.recv() for _ in range(4)]
        time.sleep(0.6)  # the client's poll(250) finds nothing
        link.send(bytes.fromhex("30ffffff7f"))
        link.wait_closed()
        link = accept()
        link.connack()
        seen["dead"] = []
        try:
            while True:
                seen["dead"].append(link.recv()[0])  # PINGREQ, never answered
        except (EOFError, OSError):
            pass

    fake = Fake(script)
    res, _ = run_mp(mp_script, {"mode": "fake", "id": "mp", "port": fake.port})
    fake.finish()
    assert res["kinds"] == [0x30, 0x30, 0x30, 0x60]
    assert res["got"] == [["mr/X", "q1"], ["mr/X", "q2"]]
    assert seen["acks"] == [(0x40, b"\x00\x05"), (0x50, b"\x00\x07"), (0x50, b"\x00\x07"),
                            (0x70, b"\x00\x07")]
    assert res["idle"] is None and 240 <= res["poll_ms"] < 3000, res
    assert res["oversized"]["cls"] == "MQTTPacketTooLarge" and res["oversized_ms"] < 2000, res
    assert res["dead"]["cls"] == "MQTTTimeout" and "link dead" in res["dead"]["msg"], res
    assert 1000 <= res["dead_ms"] < 6000 and seen["dead"][:1] == [P.PINGREQ], (res, seen)


def test_cpython_client_over_verified_tls(broker):
    conn = Connector(broker, echo=True)
    got = []
    c = mqtt.MQTTClient(DEV, "localhost", broker.port, user=DEV, password=PW, keepalive=30,
                        ssl=True, ssl_params={"cafile": str(broker.ca_cert)})
    c.set_callback(lambda t, m: got.append((t, m)))
    try:
        c.connect()
        assert c.subscribe(f"mr/{DEV}", 1) == 1
        pid = c.publish(f"ms/{DEV}", b"cpy", qos=1)
        assert c.wait_puback(pid, 5000)
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            c.poll(100)
        assert got == [(f"mr/{DEV}".encode(), b"echo:cpy")]
        c.disconnect()
    finally:
        conn.close()
    ctx = mqtt.tls_context(cafile=str(broker.ca_cert))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # a CA given as PEM bytes works as well, a PEM string too
    pem = broker.ca_cert.read_bytes()
    for cadata in (pem, pem.decode()):
        c = mqtt.MQTTClient(DEV, "localhost", broker.port, user=DEV, password=PW,
                            ssl=mqtt.tls_context(cadata=cadata))
        c.connect()
        c.disconnect()


# -- (b) CPython against a scripted fake broker ----------------------------------------------------

class Link:
    """The fake broker's side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(WAIT)
        self.reader = P.Reader(limit=1 << 20)

    def recv(self) -> tuple[int, bytes]:
        while True:
            mv = self.reader.want()
            n = self.sock.recv_into(mv)
            if not n:
                raise EOFError("client closed")
            pkt = self.reader.got(n)
            if pkt:
                return pkt[0], bytes(pkt[1])

    def expect(self, kind: int) -> bytes:
        first, body = self.recv()
        assert first & 0xF0 == kind & 0xF0, hex(first)
        return first, body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, limit: float = WAIT) -> None:
        """Swallow what the client sends until it closes the connection (or `limit` passes)."""
        self.sock.settimeout(limit)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def connack(self, code: int = 0, sp: bool = False) -> bytes:
        _, body = self.expect(P.CONNECT)
        self.send(bytes((0x20, 2, 1 if sp else 0, code)))
        return body


class Fake:
    """A broker that runs `script(accept)` in a thread; accept() returns the next Link."""

    def __init__(self, script) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(WAIT)
        self.port = self.srv.getsockname()[1]
        self.error: BaseException | None = None
        self.links: list[Link] = []
        self.log: list = []
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def accept(self) -> Link:
        s, _ = self.srv.accept()
        link = Link(s)
        self.links.append(link)
        return link

    def _run(self, script) -> None:
        try:
            script(self.accept)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "fake broker script did not end"
        for link in self.links:
            link.sock.close()
        self.srv.close()
        if self.error:
            raise self.error

    def client(self, **kw) -> mqtt.MQTTClient:
        kw.setdefault("timeout", 3)
        c = mqtt.MQTTClient("fake-client", "127.0.0.1", self.port, **kw)
        c.note = self.log.append
        return c


def until_error(c: mqtt.MQTTClient, limit: float = 10.0, step_ms: int = 100):
    """Poll until the client raises; return (exception, seconds)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            c.poll(step_ms)
        except mqtt.MQTTException as e:
            return e, time.monotonic() - t0
    pytest.fail(f"no error within {limit} s")


def test_connack_return_codes_are_typed_errors():
    def script(accept):
        for code in (1, 2, 3, 4, 5):
            accept().connack(code)

    fake = Fake(script)
    texts = {1: "protocol version", 2: "identifier rejected", 3: "server unavailable",
             4: "bad user name or password", 5: "not authorized"}
    for code in (1, 2, 3, 4, 5):
        c = fake.client(user="u", password="p")
        with pytest.raises(mqtt.MQTTConnectError) as ei:
            c.connect()
        assert ei.value.code == code and texts[code] in str(ei.value)
        assert f"CONNACK {code}" in str(ei.value) and not c.isconnected()
    fake.finish()


def test_connect_bytes_and_session_present():
    seen = {}

    def script(accept):
        link = accept()
        seen["connect"] = link.connack(sp=True)
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client(user="dev", password="secret", keepalive=7)
    assert c.connect(clean_session=False) is True
    c.disconnect()
    fake.finish()
    assert seen["connect"] == bytes(P.connect("fake-client", "dev", "secret", 7, False)[2:])


def test_connect_timeout_when_the_broker_stays_silent():
    def script(accept):
        link = accept()
        link.expect(P.CONNECT)
        link.wait_closed()

    fake = Fake(script)
    t0 = time.monotonic()
    with pytest.raises(mqtt.MQTTTimeout, match="no CONNACK"):
        fake.client().connect(timeout=0.5)
    assert time.monotonic() - t0 < 5
    fake.finish()


def test_remaining_length_of_five_bytes_closes_with_a_protocol_error():
    def script(accept):
        link = accept()
        link.connack()
        link.send(bytes.fromhex("30ffffffff7f"))
        link.wait_closed()

    fake = Fake(script)
    c = fake.client()
    c.connect()
    e, _ = until_error(c)
    assert type(e) is mqtt.MQTTProtocolError and "longer than 4 bytes" in str(e)
    assert not c.isconnected()
    fake.finish()


def test_oversized_packet_refused_at_once_without_allocating_it():
    def script(accept):
        link = accept()
        link.connack()
        link.send(bytes.fromhex("30ffffff7f"))  # 268435455 bytes announced, none sent
        link.wait_closed()

    fake = Fake(script)
    c = fake.client(max_packet=4096)
    c.connect()
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(mqtt.MQTTPacketTooLarge) as ei:
            c.poll(5000)
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.5, "the refusal must not wait for the payload"
    assert peak < 1 << 20, f"{peak} bytes allocated"
    assert ei.value.size == 5 + 268435455 and ei.value.limit == 4096
    assert "268435460" in str(ei.value) and "4096" in str(ei.value)
    assert not c.isconnected()
    fake.finish()
    # and outgoing: a publish over the limit is refused before anything is sent
    c2 = mqtt.MQTTClient("x", "127.0.0.1", max_packet=100)
    with pytest.raises(mqtt.MQTTPacketTooLarge):
        c2.publish("t", bytes(200))


def test_truncated_packet_then_close_names_what_was_missing():
    def script(accept):
        link = accept()
        link.connack()
        link.send(bytes.fromhex("300a0003612f62") + b"x")  # 8 of 12 bytes
        time.sleep(0.2)
        link.sock.close()

    fake = Fake(script)
    c = fake.client()
    c.connect()
    e, _ = until_error(c)
    assert type(e) is mqtt.MQTTConnectionError
    assert "middle of a packet (8 of 12 bytes)" in str(e)
    fake.finish()


def test_truncated_packet_that_stalls_times_out_and_poll_still_returns_on_time():
    def script(accept):
        link = accept()
        link.connack()
        link.send(bytes.fromhex("300a0003612f62"))
        link.wait_closed()

    fake = Fake(script)
    c = fake.client(timeout=1)
    c.connect()
    t0 = time.monotonic()
    assert c.poll(100) is None  # a partial packet does not make poll wait for the rest
    assert time.monotonic() - t0 < 1.0
    e, took = until_error(c)
    assert type(e) is mqtt.MQTTTimeout and "incomplete packet: 7 of 12 bytes" in str(e)
    assert took < 5
    fake.finish()


def test_poll_never_blocks_longer_than_asked():
    def script(accept):
        link = accept()
        link.connack()
        link.wait_closed()

    fake = Fake(script)
    c = fake.client(keepalive=60)
    c.connect()
    for ms in (0, 50, 300):
        t0 = time.monotonic()
        assert c.poll(ms) is None
        elapsed = time.monotonic() - t0
        assert ms / 1000 - 0.02 <= elapsed < ms / 1000 + 1.5, (ms, elapsed)
    assert c.check_msg() is None
    c.close()
    fake.finish()


def test_keepalive_pings_on_time_and_survives_with_pingresp():
    pings = []

    def script(accept):
        link = accept()
        link.connack()
        while True:
            try:
                first, _ = link.recv()
            except (EOFError, OSError):
                return
            if first == P.PINGREQ:
                pings.append(time.monotonic())
                link.send(b"\xd0\x00")

    fake = Fake(script)
    c = fake.client(keepalive=1)
    c.connect()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.2:
        c.poll(100)
    c.disconnect()
    fake.finish()
    assert len(pings) >= 2, pings  # due at ~1 s and ~2 s
    assert pings[0] - t0 < 2.5


def test_dead_link_detected_when_pingresp_never_comes():
    seen = []

    def script(accept):
        link = accept()
        link.connack()
        try:
            while True:
                seen.append(link.recv()[0])  # never answers
        except (EOFError, OSError):
            pass

    fake = Fake(script)
    c = fake.client(keepalive=1)
    c.connect()
    e, took = until_error(c)
    assert type(e) is mqtt.MQTTTimeout and "link dead" in str(e), e
    assert 1.0 <= took < 6, took  # 1.5 x keep-alive, generously bounded
    assert P.PINGREQ in seen and not c.isconnected()
    fake.finish()


def test_qos1_publish_pipelined_then_resent_with_dup_on_reconnect():
    got = {}

    def script(accept):
        link = accept()
        link.connack()
        a = link.expect(P.PUBLISH)
        b = link.expect(P.PUBLISH)
        got["first"] = (a, b)
        link.send(P.ack(P.PUBACK, 1))  # only the first is acknowledged
        time.sleep(0.3)
        link.sock.close()
        link = accept()
        link.connack(sp=True)
        got["again"] = link.expect(P.PUBLISH)
        link.send(P.ack(P.PUBACK, 2))
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    c.connect(clean_session=False)
    assert c.publish("ms/X", b"one", qos=1) == 1
    assert c.publish("ms/X", b"two", qos=1) == 2
    assert c.pending() == 2
    e, _ = until_error(c)
    assert isinstance(e, mqtt.MQTTConnectionError)
    assert c.pending() == 1  # "one" was acknowledged before the link broke
    assert c.connect(clean_session=False) is True
    assert c.wait_puback(2, 3000) and c.pending() == 0
    c.disconnect()
    fake.finish()
    (f1, b1), (f2, b2) = got["first"]
    assert f1 == f2 == 0x32 and b1.endswith(b"one") and b2.endswith(b"two")
    fa, ba = got["again"]
    assert fa == 0x3A and ba == b2, "re-sent with DUP, same packet id and payload"


def test_a_large_qos1_payload_goes_out_uncopied_and_is_resent_whole():
    """Above the split size the header and the payload are written one after the other (the
    payload never copied into a packet); on the wire it is one PUBLISH, resent whole with DUP."""
    big = bytes(range(256)) * 16 + b"end"  # 4099 bytes, like the template registration
    got = {}

    def script(accept):
        link = accept()
        link.connack()
        got["first"] = link.expect(P.PUBLISH)
        time.sleep(0.3)
        link.sock.close()
        link = accept()
        link.connack(sp=True)
        got["again"] = link.expect(P.PUBLISH)
        link.send(P.ack(P.PUBACK, 1))
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    c.connect(clean_session=False)
    assert c.publish("ms/X", big, qos=1) == 1
    assert c._out[0][2] is big  # kept as given, not copied
    e, _ = until_error(c)
    assert isinstance(e, mqtt.MQTTConnectionError)
    assert c.connect(clean_session=False) is True
    assert c.wait_puback(1, 3000) and c.pending() == 0
    c.disconnect()
    fake.finish()
    f1, b1 = got["first"]
    fa, ba = got["again"]
    assert f1 == 0x32 and bytes(P.publish("ms/X", big, 1, pid=1)).endswith(b1)
    assert b1.endswith(big) and fa == 0x3A and ba == b1


def test_inflight_window_is_bounded():
    def script(accept):
        link = accept()
        link.connack()
        for _ in range(2):
            link.expect(P.PUBLISH)
        link.wait_closed()  # no PUBACK

    fake = Fake(script)
    c = fake.client(max_inflight=2, timeout=0.5)
    c.connect()
    c.publish("t", b"1", qos=1)
    c.publish("t", b"2", qos=1)
    with pytest.raises(mqtt.MQTTTimeout, match="await PUBACK"):
        c.publish("t", b"3", qos=1)
    assert c.pending() == 2 and c.isconnected()
    assert c.wait_puback(1, 100) is False
    c.close()
    fake.finish()


def test_packet_ids_wrap_and_skip_zero():
    ids = []

    def script(accept):
        link = accept()
        link.connack()
        for _ in range(3):
            _, body = link.expect(P.PUBLISH)
            pid = int.from_bytes(body[3:5], "big")
            ids.append(pid)
            link.send(P.ack(P.PUBACK, pid))
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    c.connect()
    c._pid = 65534
    pids = [c.publish("t", b"x", qos=1) for _ in range(3)]
    for p in pids:
        assert c.wait_puback(p, 3000)
    c.disconnect()
    fake.finish()
    assert pids == ids == [65535, 1, 2]


def test_unknown_packet_ids_are_ignored_and_logged_pubrel_answered():
    got = {}

    def script(accept):
        link = accept()
        link.connack()
        link.send(P.ack(P.PUBACK, 77) + P.ack(0x50, 78) + P.ack(P.PUBCOMP, 79))
        link.send(P.ack(P.PUBREL, 80))
        got["pubcomp"] = link.expect(P.PUBCOMP)
        link.send(b"\x90\x03\x00\x51\x01")  # SUBACK nobody waits for
        link.expect(P.PINGREQ)
        link.send(b"\xd0\x00")
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    c.connect()
    kinds = [c.poll(2000) for _ in range(5)]
    assert kinds == [0x40, 0x50, 0x70, 0x60, 0x90]
    c.ping()
    assert c.poll(2000) == 0xD0 and c.isconnected()
    c.disconnect()
    fake.finish()
    assert got["pubcomp"] == (P.PUBCOMP, b"\x00\x50")
    assert c.stray == 5
    assert "PUBACK for unknown packet id 77 ignored" in fake.log
    assert "PUBREL for unknown packet id 80 ignored" in fake.log


@pytest.mark.parametrize("data, text", [
    (bytes.fromhex("4102000a"), "reserved flags"),        # PUBACK with flags
    (bytes.fromhex("6002000a"), "reserved flags"),        # PUBREL without its 0x2
    (bytes.fromhex("400100"), "PUBACK of 1 bytes"),
    (bytes.fromhex("40020000"), "packet id 0"),
    (bytes.fromhex("20020000"), "unexpected packet 0x20"),  # a second CONNACK
    (bytes.fromhex("d00100"), "PINGRESP with a body"),
    (bytes.fromhex("3603000174"), "QoS 3"),
    (bytes.fromhex("0000"), "reserved packet type 0"),
])
def test_malformed_packets_are_protocol_errors(data, text):
    def script(accept):
        link = accept()
        link.connack()
        link.send(data)
        link.wait_closed()

    fake = Fake(script)
    c = fake.client()
    c.connect()
    e, _ = until_error(c)
    assert isinstance(e, mqtt.MQTTProtocolError) and text in str(e), e
    assert not c.isconnected()
    fake.finish()


def test_suback_failure_names_the_topic():
    def script(accept):
        link = accept()
        link.connack()
        _, body = link.expect(P.SUBSCRIBE)
        link.send(b"\x30\x06\x00\x01t" + b"mid")  # a message before the SUBACK is delivered
        link.send(bytes((0x90, 3)) + body[:2] + b"\x80")
        _, body = link.expect(P.SUBSCRIBE)
        link.send(bytes((0x90, 3)) + body[:2] + b"\x01")
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    got = []
    c.set_callback(lambda t, m: got.append((t, m)))
    c.connect()
    with pytest.raises(mqtt.MQTTSubscribeError) as ei:
        c.subscribe("mr/other", 1)
    assert ei.value.topic == "mr/other" and ei.value.code == 0x80
    assert "'mr/other'" in str(ei.value) and "0x80" in str(ei.value)
    assert got == [(b"t", b"mid")] and c.isconnected()
    assert c.subscribe("mr/mine", 1) == 1
    c.disconnect()
    fake.finish()


def test_qos1_and_qos2_receive_with_duplicate_qos2_delivered_once():
    acks = []

    def script(accept):
        link = accept()
        link.connack()
        link.send(P.publish("mr/X", b"q1", qos=1, pid=5))
        acks.append(link.expect(P.PUBACK))
        link.send(P.publish("mr/X", b"q2", qos=2, pid=7))
        acks.append(link.expect(0x50))
        link.send(P.publish("mr/X", b"q2", qos=2, pid=7, dup=True))
        acks.append(link.expect(0x50))
        link.send(P.ack(P.PUBREL, 7))
        acks.append(link.expect(P.PUBCOMP))
        link.send(P.publish("mr/X", b"q2 again", qos=2, pid=7))  # id free again: a new message
        acks.append(link.expect(0x50))
        link.send(P.ack(P.PUBREL, 7))
        acks.append(link.expect(P.PUBCOMP))
        link.expect(P.DISCONNECT)

    fake = Fake(script)
    c = fake.client()
    got = []
    c.set_callback(lambda t, m: got.append((t, m)))
    c.connect()
    for _ in range(6):
        assert c.poll(3000) is not None
    c.disconnect()
    fake.finish()
    assert got == [(b"mr/X", b"q1"), (b"mr/X", b"q2"), (b"mr/X", b"q2 again")]
    assert acks == [(0x40, b"\x00\x05"), (0x50, b"\x00\x07"), (0x50, b"\x00\x07"),
                    (0x70, b"\x00\x07"), (0x50, b"\x00\x07"), (0x70, b"\x00\x07")]


def test_tls_handshake_that_never_completes_times_out():
    def script(accept):
        accept().wait_closed()

    fake = Fake(script)
    c = fake.client(ssl=mqtt.tls_context(), ssl_params={"server_hostname": "localhost"})
    t0 = time.monotonic()
    with pytest.raises(mqtt.MQTTTimeout, match="no answer within 700 ms"):
        c.connect(timeout=0.7)
    assert time.monotonic() - t0 < 4
    fake.finish()


def test_connection_refused_and_tls_to_a_plain_server_are_clear_errors():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(mqtt.MQTTConnectionError, match="connect to 127.0.0.1"):
        mqtt.MQTTClient("x", "127.0.0.1", port).connect(timeout=2)

    def script(accept):
        link = accept()
        link.sock.recv(100)
        link.send(b"not TLS at all\r\n" * 4)

    fake = Fake(script)
    c = fake.client(ssl=mqtt.tls_context(cafile=None), ssl_params={"server_hostname": "localhost"})
    with pytest.raises(mqtt.MQTTTLSError, match="TLS handshake"):
        c.connect()
    fake.finish()


def test_ssl_true_without_a_ca_verifies_against_the_default_store_or_the_boards_ca(
        broker, tmp_path, monkeypatch):
    """umqtt's `ssl=True` with no CA in ssl_params: never an unverified link. On CPython the
    default trust store (which does not hold the emulator's CA: the handshake fails, clearly);
    with the board's settings naming the CA (as on a board), it connects."""
    monkeypatch.setattr(mqtt, "BOARD_CONFIG", str(tmp_path / "microcot.json"))
    c = mqtt.MQTTClient(DEV, "localhost", broker.port, user=DEV, password=PW, ssl=True,
                        ssl_params={"server_hostname": "localhost"})
    with pytest.raises(mqtt.MQTTTLSError) as ei:
        c.connect()
    assert "certificate verify failed" in str(ei.value)
    (tmp_path / "microcot.json").write_text(json.dumps({"ca": str(broker.ca_cert)}))
    c = mqtt.MQTTClient(DEV, "localhost", broker.port, user=DEV, password=PW, ssl=True)
    c.connect()
    c.disconnect()


def test_last_will_is_sent_and_mosquitto_publishes_it(broker):
    """The will reaches a broker that takes it (the emulator's front refuses it: see
    test_umqtt_programs.py): the connection dies without DISCONNECT and Mosquitto publishes it."""
    conn = Connector(broker)
    try:
        c = mqtt.MQTTClient(DEV, "localhost", broker.port, user=DEV, password=PW, keepalive=30,
                            ssl=mqtt.tls_context(cafile=str(broker.ca_cert)))
        c.set_last_will(f"ms/{DEV}", b"gone", qos=1)
        c.connect()
        c.close()  # no DISCONNECT: the broker sends the will
        m = conn.messages.get(timeout=WAIT)
        assert (m.topic, m.payload, m.qos) == (f"ms/{DEV}", b"gone", 1)
    finally:
        conn.close()
