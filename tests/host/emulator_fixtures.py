"""Helpers for the platform emulator's end-to-end tests: paho-mqtt as the device.

Every client speaks MQTT 3.1.1 over TLS verified against the emulator's CA (connection.json's
`ca_cert`), with clean_session=False and QoS 1, as seed 002 asks of a device.
"""

from __future__ import annotations

import base64
import itertools
import json
import queue
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
from seed_templates import TEMPLATES

from microcot import identity
from microcot_host.emulator.certs import client_ssl_context

WAIT = 10.0     # longest wait for something that must happen
QUIET = 0.5     # how long we listen for something that must not happen
DENIED = 0x80   # SUBACK failure code of MQTT 3.1.1

XID = "mcE2E1"

REGISTRATION = "\n".join(["15," + XID, *TEMPLATES])

_ids = itertools.count(1)


def new_iccid() -> str:
    """A fresh, Luhn-valid 20-digit ICCID per call (unique within a test run)."""
    payload = "894902%05d%08d" % (next(_ids), int(time.time()) % 10**8)
    return payload + str(identity.luhn_check_digit(payload))


class Device:
    """A paho client playing a device (or the bootstrap client) with bounded blocking helpers."""

    def __init__(self, conn: dict[str, Any], client_id: str, user: str, password: str,
                 clean_session: bool = False) -> None:
        self.conn = conn
        self.messages: dict[str, queue.Queue[bytes]] = {}
        self._mlock = threading.Lock()
        self.connack: mqtt.ReasonCode | None = None
        self.connected = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._sub_cv = threading.Condition()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session)
        c.username_pw_set(user, password)
        c.tls_set_context(client_ssl_context(conn["ca_cert"]))
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        self.id = client_id

    def _on_connect(self, client, userdata, flags, rc, props=None):
        self.connack = rc
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        self.queue(msg.topic).put(bytes(msg.payload))

    def _on_subscribe(self, client, userdata, mid, rcs, props=None):
        with self._sub_cv:
            self._subacks[mid] = [r.value for r in rcs]
            self._sub_cv.notify_all()

    def queue(self, topic: str) -> queue.Queue[bytes]:
        with self._mlock:
            return self.messages.setdefault(topic, queue.Queue())

    def connect(self) -> Device:
        self.connected.clear()
        self.client.connect(self.conn["mqtt_host"], self.conn["mqtt_port"], keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"
        assert not self.connack.is_failure, f"connect refused: {self.connack}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        _, mid = self.client.subscribe(topic, qos)
        with self._sub_cv:
            assert self._sub_cv.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(WAIT)

    def get(self, topic: str, timeout: float = WAIT) -> bytes:
        try:
            return self.queue(topic).get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: nothing on {topic} within {timeout} s") from None

    def nothing(self, topic: str, quiet: float = QUIET) -> list[bytes]:
        time.sleep(quiet)
        q = self.queue(topic)
        out = []
        while not q.empty():
            out.append(q.get_nowait())
        return out

    def request(self, body: str, timeout: float = WAIT) -> str:
        """Publish a SmartREST body on ms/<ID> and return the answer on mr/<ID>."""
        self.publish("ms/" + self.id, body.encode())
        return self.get("mr/" + self.id, timeout).decode()

    def ask(self, *rows: str, xid: str = XID) -> str:
        return self.request("\n".join(["15," + xid, *rows]))

    def brequest(self, payload: bytes, timeout: float = WAIT) -> str:
        """Publish a binary SmartREST payload on bs/<ID> and return the answer on br/<ID>."""
        self.publish("bs/" + self.id, payload)
        return self.get("br/" + self.id, timeout).decode()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def device(conn: dict[str, Any], device_id: str, password: str, binary: bool = False) -> Device:
    """A connected device subscribed to mr/<ID> (and br/<ID>)."""
    d = Device(conn, device_id, device_id, password).connect()
    assert d.subscribe("mr/" + device_id) == 1
    if binary:
        assert d.subscribe("br/" + device_id) == 1
    return d


def raw_connack(conn: dict[str, Any], user: str, password: str,
                client_id: str | None = None) -> int:
    """The CONNACK return code byte itself, as a device's own MQTT client sees it (client id:
    the user name by default, the only one a device user may use)."""
    def s(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b
    var = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30)  # 3.1.1, user+password, clean
    cid = user if client_id is None else client_id
    body = var + s(cid.encode()) + s(user.encode()) + s(password.encode())
    assert len(body) < 128
    ctx = client_ssl_context(conn["ca_cert"])
    with socket.create_connection((conn["mqtt_host"], conn["mqtt_port"]), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname=conn["mqtt_host"]) as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = tls.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
    assert ack[:2] == b"\x20\x02", ack
    return ack[3]


def rest(conn: dict[str, Any], method: str, path: str, body: Any = None,
         content_type: str = "application/json", user: str | None = None,
         password: str | None = None) -> tuple[int, Any]:
    """One REST call over HTTP with Basic auth (the admin by default); (status, JSON or None)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(conn["http_url"] + path, data=data, method=method)
    cred = f"{user or conn['admin_user']}:{password or conn['admin_password']}"
    req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    return status, (json.loads(raw) if raw else None)


def multipart(filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one part named `file`, and its content type."""
    boundary = "----microcot" + str(next(_ids))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: text/csv\r\n\r\n").encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_for(predicate, timeout: float = WAIT, step: float = 0.02):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
