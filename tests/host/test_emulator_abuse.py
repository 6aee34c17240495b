"""A hostile device against the emulator, over every way in, while a well-behaved device is served.

Device A (bulk-registered, credentials of its own) tries to reach device B: over MQTT (paho and
raw packets: another client id, another device's topics, a will, a retained message, garbage),
over REST (with its own credentials, and anonymously) and through SmartREST (text and binary:
templates that leave the device API, another device's objects, JSON injection, hostile ids).
Each attempt must fail the way the platform fails it, and throughout, device W publishes a
measurement every few milliseconds and must get every one stored and its operation delivered.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from emulator_fixtures import (
    DENIED,
    REGISTRATION,
    WAIT,
    XID,
    Device,
    device,
    new_iccid,
    raw_connack,
    rest,
    wait_for,
)
from test_emulator_e2e import self_create

from microcot_host.emulator import Emulator
from microcot_host.emulator.certs import client_ssl_context

pytestmark = pytest.mark.timeout(180)

FORBIDDEN = 403


class Watched:
    """Device W: one measurement every few milliseconds from a thread, answers checked."""

    def __init__(self, d: Device, mo: str) -> None:
        self.d = d
        self.mo = mo
        self.sent: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            # template 105: a measurement (seed_templates.py), its value the sequence number
            row = f"105,c8y_T,T,{n},C,2026-12-05T00:00:00.000Z,{self.mo},c8y_T"
            info = self.d.client.publish("ms/" + self.d.id, f"15,{XID}\n{row}".encode(), qos=1)
            info.wait_for_publish(WAIT)
            if not info.is_published():
                self.failures.append(f"measurement {n} was not acknowledged")
            else:
                self.sent.append(n)
            time.sleep(0.02)

    def __enter__(self) -> Watched:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(WAIT)


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("abuse")) as e:
        yield e


@pytest.fixture(scope="module")
def conn(emu):
    return emu.connection


@pytest.fixture(scope="module")
def fleet(emu, conn):
    """A, B and W: registered, self-created, connected; the template collection registered."""
    out = {}
    for name in ("A", "B", "W"):
        iccid = new_iccid()
        password = emu.add_device(iccid)
        d = device(conn, iccid, password)
        if name == "A":
            assert d.request(REGISTRATION).startswith("20,")
        else:
            assert d.request("15," + XID).startswith("20,")
        out[name] = (d, password, self_create(d, f"abuse {name}"))
    yield out
    for d, _, _ in out.values():
        d.close()


def test_a_hostile_device_reaches_nothing_of_another(emu, conn, fleet):
    a, a_password, a_mo = fleet["A"]
    b, b_password, b_mo = fleet["B"]
    w, _, w_mo = fleet["W"]
    rng = random.Random(12)
    with Watched(w, w_mo) as watched:
        _mqtt_abuse(conn, a, a_password, b, b_password, rng)
        _rest_abuse(conn, a, a_password, b, b_mo, a_mo)
        _smartrest_abuse(conn, a, b, b_mo, rng)
        # B is still connected and served: a request answers, an operation reaches it
        assert b.request("15," + XID).startswith("20,")
        status, op = rest(conn, "POST", "/devicecontrol/operations",
                          {"deviceId": b_mo, "c8y_Restart": {}})
        assert status == 201
        assert b.get("mr/" + b.id).decode() == f"87,1,{XID}\n203,1,{op['id']},{b_mo}"
    assert watched.failures == []
    assert len(watched.sent) > 20
    # every acknowledged measurement of W is stored, once
    def stored() -> list[float]:
        s, body = rest(conn, "GET", f"/measurement/measurements?source={w_mo}&pageSize=2000")
        assert s == 200
        return [m["c8y_T"]["T"]["value"] for m in body["measurements"]]
    wait_for(lambda: len(stored()) >= len(watched.sent), WAIT)
    values = stored()
    assert sorted(values) == [float(n) for n in watched.sent]


def _mqtt_abuse(conn, a: Device, a_password: str, b: Device, b_password: str,
                rng: random.Random) -> None:
    # A's credentials with B's client id: refused at CONNECT, B's session untouched
    assert raw_connack(conn, a.id, a_password, client_id=b.id) == 5
    # the bootstrap user with B's client id: never B's session
    boot = Device(conn, b.id, conn["bootstrap_user"], conn["bootstrap_password"])
    with _tolerant(boot):
        if boot.connack is not None and not boot.connack.is_failure:
            assert boot.subscribe("sr/" + a.id) == DENIED
    # another device's topics, wildcards
    assert a.subscribe("mr/" + b.id) == DENIED
    assert a.subscribe("#") == DENIED
    assert a.subscribe("ms/" + a.id) == DENIED   # write-only (seed 002)
    a.publish("ms/" + b.id, f"15,{XID}\n106,1,99".encode())  # dropped by the broker
    assert b.nothing("mr/" + b.id, 0.3) == []
    # a will: refused (seed 002: "LastWill nicht unterstützt")
    assert _connack_with_will(conn, a.id, a_password) != 0
    # garbage after a good CONNECT: the connection goes, the broker stays
    for _ in range(5):
        _garbage(conn, a.id, a_password, rng)
    # B was never disconnected by any of it
    assert b.client.is_connected()


class _tolerant:
    def __init__(self, d: Device) -> None:
        self.d = d

    def __enter__(self) -> Device:
        self.d.connected.clear()
        self.d.client.connect(self.d.conn["mqtt_host"], self.d.conn["mqtt_port"], keepalive=30)
        self.d.client.loop_start()
        self.d.connected.wait(WAIT)
        return self.d

    def __exit__(self, *exc: object) -> None:
        self.d.close()


def _tls(conn) -> ssl.SSLSocket:
    raw = socket.create_connection((conn["mqtt_host"], conn["mqtt_port"]), timeout=WAIT)
    return client_ssl_context(conn["ca_cert"]).wrap_socket(raw, server_hostname=conn["mqtt_host"])


def _s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _connect_packet(client_id: str, user: str, password: str, will: bool = False) -> bytes:
    flags = 0xC2 | (0x04 if will else 0)
    body = _s(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 30) + _s(client_id.encode())
    if will:
        body += _s(("ms/" + user).encode()) + _s(b"15,x")
    body += _s(user.encode()) + _s(password.encode())
    return bytes([0x10, len(body)]) + body


def _connack_with_will(conn, user: str, password: str) -> int:
    with _tls(conn) as t:
        t.sendall(_connect_packet(user, user, password, will=True))
        ack = t.recv(4)
    # a closed connection without CONNACK counts as refused too
    return ack[3] if len(ack) == 4 and ack[0] == 0x20 else -1


def _garbage(conn, user: str, password: str, rng: random.Random) -> None:
    with _tls(conn) as t:
        t.sendall(_connect_packet(user + "-x", user, password))
        t.recv(4)
        t.sendall(rng.randbytes(rng.randrange(1, 300)))
        t.settimeout(2)
        try:
            while t.recv(4096):
                pass
        except (OSError, TimeoutError):
            pass


def _rest_abuse(conn, a: Device, a_password: str, b: Device, b_mo: str, a_mo: str) -> None:
    def as_a(method: str, path: str, body=None, ctype="application/json"):
        return rest(conn, method, path, body, ctype, user=a.id, password=a_password)

    # another device's objects and data
    for method, path in (("GET", f"/inventory/managedObjects/{b_mo}"),
                         ("PUT", f"/inventory/managedObjects/{b_mo}"),
                         ("DELETE", f"/inventory/managedObjects/{b_mo}"),
                         ("GET", f"/identity/externalIds/c8y_Serial/{b.id}"),
                         ("GET", f"/devicecontrol/deviceCredentials/{b.id}"),
                         ("DELETE", f"/devicecontrol/deviceCredentials/{b.id}"),
                         ("GET", "/devicecontrol/newDeviceRequests"),
                         ("GET", f"/measurement/measurements?source={b_mo}")):
        status, _ = as_a(method, path, {"name": "mine"} if method == "PUT" else None)
        assert status in (FORBIDDEN, 404), (method, path, status)
    # listing shows A its own only
    status, body = as_a("GET", "/inventory/managedObjects?pageSize=2000")
    assert status == 200 and {m["id"] for m in body["managedObjects"]} <= {a_mo} | {
        m["id"] for m in body["managedObjects"] if m.get("owner") == a.id}
    assert b_mo not in {m["id"] for m in body["managedObjects"]}
    # a bulk registration giving B a password of A's choosing
    csv = f"ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n{b.id};Chosen-by-A-123;mqtt;x;{b.id};1\n"
    status, _ = as_a("POST", "/devicecontrol/bulkNewDeviceRequests", csv.encode(), "text/csv")
    assert status == FORBIDDEN
    # the owner is who asks, never the body
    status, mo = as_a("POST", "/inventory/managedObjects", {"name": "n", "owner": "admin"})
    assert status in (201, 422)
    if status == 201:
        assert mo["owner"] == a.id
    # anonymous: nothing at all
    for path in ("/inventory/managedObjects", f"/devicecontrol/deviceCredentials/{b.id}"):
        status, _ = rest(conn, "GET", path, user="nobody", password="nothing")
        assert status == 401
    # hostile bodies and parameters: answered, never a 500
    deep = "[" * 5000 + "]" * 5000
    for method, path, body in (("POST", "/inventory/managedObjects", deep.encode()),
                               ("GET", "/inventory/managedObjects?currentPage=1e20", None),
                               ("GET", "/inventory/managedObjects?currentPage=99999999999999999999",
                                None),
                               ("POST", "/measurement/measurements",
                                b'{"source":{"id":"%s"},"type":"t","time":"2026-01-01T00:00:00Z",'
                                b'"c8y_T":{"T":{"value":NaN}}}' % a_mo.encode()),
                               ("POST", "/measurement/measurements",
                                ('{"source":{"id":"%s"},"type":"t","time":"2026-01-01T00:00:00Z",'
                                 '"c8y_T":{"T":{"value":%s}}}' % (a_mo, "9" * 400)).encode())):
        status, answer = as_a(method, path, body)
        assert 400 <= status < 500, (path, status, answer)
        assert isinstance(answer, dict) and "error" in answer, answer


def _smartrest_abuse(conn, a: Device, b: Device, b_mo: str, rng: random.Random) -> None:
    # a collection whose template deletes credentials: refused with 41, naming it
    xid = "abuse" + a.id[-6:]
    out = a.request(f"15,{xid}\n10,990,DELETE,/devicecontrol/deviceCredentials/%%,,,%%,STRING,")
    assert out.startswith("41,") and "990" in out, out
    # template 104 (the device's supported operations) on B's managed object: 403, B unchanged
    assert a.ask(f"104,{b_mo}") == "50,2,403,Forbidden"
    status, mo = rest(conn, "GET", f"/inventory/managedObjects/{b_mo}")
    assert status == 200 and "c8y_SupportedOperations" not in mo
    # JSON injection through a STRING value (template 108: a child device's name): a literal
    # name of an object A owns, never a field of it
    injected = 'n","c8y_IsDevice":{},"owner":"admin'
    out = a.ask('108,"n"",""c8y_IsDevice"":{},""owner"":""admin"')
    assert not any(r.startswith("201,") for r in out.split("\n")), out  # no c8y_IsDevice
    status, body = rest(conn, "GET", "/inventory/managedObjects?type=c8y_ChildDevice&pageSize=2000")
    made = [m for m in body["managedObjects"] if m["name"] == injected]
    assert len(made) == 1 and made[0]["owner"] == a.id and "c8y_IsDevice" not in made[0], made
    # hostile ids and random rows: always a well-formed answer
    assert a.ask("9" * 5000 + ",1").startswith("43,2,Invalid message identifier")
    for _ in range(40):
        row = ",".join(rng.choice(["100", "106", b_mo, "x" * rng.randrange(50), "-1", "1e999",
                                   '""', "\\", "\x00"]) for _ in range(rng.randrange(1, 6)))
        out = a.ask(row)
        assert all(line[:2].isdigit() for line in out.split("\n") if line), out
    # binary SmartREST: random payloads are answered, the connection survives
    a.subscribe("br/" + a.id)
    for _ in range(20):
        a.publish("bs/" + a.id, rng.randbytes(rng.randrange(1, 200)))
    a.nothing("br/" + a.id, 0.3)
    assert a.client.is_connected()
    json.dumps(out)  # the answers are text
