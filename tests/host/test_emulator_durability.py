"""Nothing lost after PUBACK: `kill -9` of a running emulator under load, three times.

The emulator runs as users run it (`python -m microcot_host emulator --data-dir D`, a process of
its own). DEVICES paho devices (MQTT 3.1.1, TLS, clean_session=False, QoS 1) publish ROWS
measurements each in bursts, every one with a value of its own (device * 1000 + row). While they
publish, the emulator is killed with SIGKILL at seeded random moments and started again on the
same data directory (and ports); the devices reconnect by themselves and paho sends again what
the broker had not acknowledged. At the end every measurement whose PUBACK a device received must
be stored, and stored once.

QoS 1 itself may duplicate one message: a PUBLISH whose PUBACK was lost with the connection is sent
again by the device (DUP), and the broker cannot tell it from a new one. Only those may appear twice
(and they are counted); every other row must be stored exactly once, which is the connector's
promise: it acknowledges a message to the broker only after its row is committed, and a message
the broker delivers again after a crash is recognised and not executed twice.

Two in-process tests check the two rules that make this exactly once, each at the moment that
matters: a message delivered again (DUP) after its row was committed is only acknowledged, and a
new message under a packet id that an old record names is executed all the same. A third one
checks what acknowledging late costs: a device whose requests hang keeps more messages
unacknowledged than Mosquitto's window of a client (max_inflight_messages), and other devices
are still served (the connector asks for a window of its own, MQTT 5's Receive Maximum).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from emulator_fixtures import REGISTRATION, XID, device, multipart, new_iccid, rest, wait_for

from microcot_host.emulator import Emulator
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.emulator.connector import message_digest
from microcot_host.emulator.model import Model

pytestmark = pytest.mark.timeout(120)

SEED = 20240612
DEVICES = 50
ROWS = 40
BURST = 5            # rows of every device published at once, then a pause of PACE seconds:
PACE = 0.2           # the connector has a backlog most of the time, as under real load
KILLS = 3


def _mosquittos(data: Path) -> list[int]:
    """Pids of Mosquitto processes whose command line names a file under `data`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mosquitto" in cmd and str(data) in cmd:
            found.append(int(entry.name))
    return found


class EmulatorProcess:
    """`python -m microcot_host emulator` in a process of its own, on fixed ports."""

    def __init__(self, data: Path, log: Path) -> None:
        self.data = data
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.ports: list[str] = []

    def start(self) -> dict[str, Any]:
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "microcot_host", "emulator", "--data-dir", str(self.data),
                 *self.ports], stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # the banner ends with "Running"
            seen.append(line)
            if line.startswith("Running"):
                break
        else:
            raise AssertionError(f"the emulator did not start: {seen}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        conn = json.loads((self.data / "connection.json").read_text())
        if not self.ports:  # the same ports on every restart, so the devices find it again
            self.ports = ["--mqtt-port", str(conn["mqtt_port"]),
                          "--http-port", conn["http_url"].rsplit(":", 1)[1],
                          "--https-port", conn["https_url"].rsplit(":", 1)[1]]
        return conn

    def kill(self) -> None:
        """SIGKILL; returns once its Mosquitto (SIGTERM from the kernel) has saved and ended."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not _mosquittos(self.data), 15.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Publisher:
    """One device: paho with its own network thread, reconnecting by itself; remembers which
    values the broker acknowledged and which were unacknowledged when a connection broke (paho
    sends those again: QoS 1 may then deliver them twice)."""

    def __init__(self, conn: dict[str, Any], iccid: str, password: str) -> None:
        self.id = iccid
        self.acked: set[int] = set()
        self.resent: set[int] = set()
        self._values: dict[int, int] = {}   # paho mid -> value, until acknowledged
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=iccid,
                        protocol=mqtt.MQTTv311, clean_session=False)
        c.username_pw_set(iccid, password)
        c.tls_set_context(client_ssl_context(conn["ca_cert"]))
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 0.5)
        c.on_connect = lambda *a: self.connected.set()
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c
        c.connect(conn["mqtt_host"], conn["mqtt_port"], keepalive=30)
        c.loop_start()
        assert self.connected.wait(10), f"{iccid} did not connect"

    def publish(self, mo: str, value: int) -> None:
        body = f"15,{XID}\n115,{mo},{value}".encode()
        # not under our lock: paho calls on_publish holding its own, which publish() takes too
        info = self.client.publish("ms/" + self.id, body, qos=1)
        with self._lock:
            if info.mid in self._early:  # acknowledged before publish() returned
                self._early.discard(info.mid)
                self.acked.add(value)
            else:
                self._values[info.mid] = value

    def _on_publish(self, client, userdata, mid, rc, props=None) -> None:
        with self._lock:
            value = self._values.pop(mid, None)
            if value is None:
                self._early.add(mid)
            else:
                self.acked.add(value)

    def _on_disconnect(self, client, userdata, flags, rc, props=None) -> None:
        self.connected.clear()
        with self._lock:
            self.resent.update(self._values.values())

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._values)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _setup_devices(conn: dict[str, Any]) -> list[tuple[str, str]]:
    """DEVICES bulk-registered devices, each self-created as seed 002 does it (its own
    managed object with its ICCID as external ID); (ICCID, password) pairs."""
    ids = [new_iccid() for _ in range(DEVICES)]
    rows = [f"d{i};Durable-Pass-{i:04d};mqtt;D{i};{iccid};1" for i, iccid in enumerate(ids)]
    body, ctype = multipart("fleet.csv", "\n".join(["ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL", *rows])
                            .encode())
    status, summary = rest(conn, "POST", "/devicecontrol/bulkNewDeviceRequests", body, ctype)
    assert status == 201 and summary["numberOfCreated"] == DEVICES, summary
    return [(iccid, f"Durable-Pass-{i:04d}") for i, iccid in enumerate(ids)]


def _self_create(conn: dict[str, Any], iccid: str, password: str, register: bool) -> str:
    """Over MQTT as the device: (templates,) lookup, create, external ID; the MO id."""
    d = device(conn, iccid, password)
    try:
        if register:
            assert d.request(REGISTRATION).startswith("20,")
        assert d.ask("100," + iccid) == "50,2,404,Not Found"
        mo = d.ask(f"101,{iccid},dur {iccid}").split("\n")[1].split(",")[2]
        assert d.ask(f"102,{mo},{iccid}").endswith(f",{iccid},{mo}")
        return mo
    finally:
        d.close()


def _stored(conn: dict[str, Any]) -> Counter[int]:
    """How often each value is stored (template 115's measurements, type c8y_T, all pages)."""
    values: Counter[int] = Counter()
    page = 1
    while True:
        status, doc = rest(conn, "GET", f"/measurement/measurements?type=c8y_T&pageSize=2000"
                                        f"&currentPage={page}")
        assert status == 200, doc
        got = doc["measurements"]
        for m in got:
            values[int(m["c8y_Temperature"]["T"]["value"])] += 1
        if len(got) < 2000:
            return values
        page += 1


def _settle(predicate, timeout: float) -> bool:
    """Poll predicate() until it holds or `timeout` seconds passed; whether it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_kill_9_under_load_loses_and_duplicates_nothing_acknowledged(tmp_path):
    rnd = random.Random(SEED)
    emu = EmulatorProcess(tmp_path / "emu", tmp_path / "emulator.log")
    pubs: list[Publisher] = []
    try:
        conn = emu.start()
        creds = _setup_devices(conn)
        mos = [_self_create(conn, iccid, pw, i == 0) for i, (iccid, pw) in enumerate(creds)]
        pubs = [Publisher(conn, iccid, pw) for iccid, pw in creds]

        done = threading.Event()

        def load() -> None:
            for first in range(0, ROWS, BURST):
                for i, p in enumerate(pubs):
                    for row in range(first, min(first + BURST, ROWS)):
                        p.publish(mos[i], i * 1000 + row)
                time.sleep(PACE)
            done.set()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        kills = []
        for _ in range(KILLS):
            pause = rnd.uniform(0.3, 0.9)  # seeded: a moment while rows are in flight
            time.sleep(pause)
            emu.kill()
            kills.append(round(pause, 2))
            conn = emu.start()
        assert done.wait(60), "the load did not finish"
        # every row acknowledged by the broker (paho sends again after each reconnect)
        _settle(lambda: all(p.unacked == 0 for p in pubs), 30.0)
        acked = set().union(*(p.acked for p in pubs))
        resent = set().union(*(p.resent for p in pubs))
        assert len(acked) == DEVICES * ROWS, f"{DEVICES * ROWS - len(acked)} never acknowledged"
        # the connector catches up: every acknowledged row arrives in the database (a lost one
        # never does: wait a while, then count)
        _settle(lambda: set(_stored(conn)) >= acked, 15.0)
        time.sleep(0.5)  # anything late that would make a duplicate
        stored = _stored(conn)
        lost = acked - set(stored)
        dups = {v: n for v, n in stored.items() if n > 1}
        again = (tmp_path / "emulator.log").read_text().count("took effect before")
        print(f"\nkill -9 after {kills} s: acknowledged {len(acked)}, stored {len(stored)} "
              f"values in {sum(stored.values())} rows, lost {len(lost)}, duplicated "
              f"{len(dups)} ({len(set(dups) & resent)} of them sent twice by their device; "
              f"{len(resent)} rows were unacknowledged at a disconnect); {again} delivered "
              "again by the broker after taking effect")
        assert not lost, sorted(lost)[:20]
        assert set(stored) <= acked  # nothing stored that was never sent
        assert not set(dups) - resent, {v: dups[v] for v in sorted(set(dups) - resent)[:20]}
        assert all(n <= 2 for n in dups.values()), dups
    finally:
        for p in pubs:
            p.close()
        emu.stop()
        for pid in _mosquittos(tmp_path / "emu"):  # never leave a broker behind
            os.kill(pid, signal.SIGTERM)


# -- the rules, one at a time, in process -------------------------------------------------------

def _rows_of(conn: dict[str, Any], mo: str, value: int) -> int:
    _, doc = rest(conn, "GET", f"/measurement/measurements?source={mo}&pageSize=2000")
    return sum(m["c8y_Temperature"]["T"]["value"] == value for m in doc["measurements"])


def test_a_message_delivered_again_after_its_commit_is_not_executed_again(tmp_path, monkeypatch):
    with Emulator(tmp_path / "emu") as emu:
        conn = emu.connection
        iccid = new_iccid()
        password = emu.add_device(iccid)
        mo = _self_create(conn, iccid, password, register=True)
        client = emu.connector._client
        ack = client.ack
        swallowed: list[int] = []

        def lost_ack(mid: int, qos: int):
            # the crash's effect: the row is committed, the PUBACK never reaches the broker
            if not swallowed:
                swallowed.append(mid)
                client.socket().shutdown(socket.SHUT_RDWR)
                return 0
            return ack(mid, qos)

        monkeypatch.setattr(client, "ack", lost_ack)
        d = device(conn, iccid, password)
        try:
            d.publish("ms/" + iccid, f"15,{XID}\n115,{mo},7001".encode())
            wait_for(lambda: swallowed)
            # the connector reconnects; the broker delivers the message again (DUP, same mid):
            # acknowledged, and once that is proven, its record goes
            wait_for(lambda: swallowed[0] not in emu.model.applied_messages(), 10.0)
            assert _rows_of(conn, mo, 7001) == 1
            d.publish("ms/" + iccid, f"15,{XID}\n115,{mo},7002".encode())  # and on it goes
            wait_for(lambda: _rows_of(conn, mo, 7002) == 1)
            assert _rows_of(conn, mo, 7001) == 1
        finally:
            d.close()


def test_a_new_message_under_a_recorded_packet_id_is_executed(tmp_path):
    data = tmp_path / "emu"
    emu = Emulator(data)
    with emu:
        conn = emu.connection
        iccid = new_iccid()
        password = emu.add_device(iccid)
        mo = _self_create(conn, iccid, password, register=True)
    # records left from before, for every packet id, of the very message the device sends next
    # (as if an acknowledgement was received but its record not yet deleted at a crash)
    payload = f"15,{XID}\n115,{mo},7100".encode()
    digest = message_digest("ms/" + iccid, payload)
    with Model(data / "platform.sqlite") as model, model.atomic():
        for mid in range(1, 65536):
            model.note_applied(mid, digest)
    with emu:
        conn = emu.connection
        d = device(conn, iccid, password)
        try:
            for _ in range(2):  # new messages (no DUP): both executed
                d.publish("ms/" + iccid, payload)
            wait_for(lambda: _rows_of(conn, mo, 7100) == 2)
        finally:
            d.close()


def test_a_device_with_more_hanging_requests_than_the_brokers_window_stalls_nobody(
        tmp_path, monkeypatch):
    with Emulator(tmp_path / "emu") as emu:
        conn = emu.connection
        conf = emu.broker.conf_file.read_text()
        window = int(re.search(r"^max_inflight_messages (\d+)$", conf, re.M).group(1))
        slow_id, quick_id = new_iccid(), new_iccid()
        slow = device(conn, slow_id, emu.add_device(slow_id))
        quick = device(conn, quick_id, emu.add_device(quick_id))
        release = threading.Event()
        process = emu.engine.process_later  # what the connector calls

        def hanging(body, user=None, **kw):
            if user == slow_id:
                release.wait(20)
            return process(body, user, **kw)

        monkeypatch.setattr(emu.engine, "process_later", hanging)
        try:
            assert quick.request(REGISTRATION).startswith("20,")
            for _ in range(window + 50):  # all unacknowledged until released
                slow.client.publish("ms/" + slow_id, f"15,{XID}\n113".encode(), qos=1)
            wait_for(lambda: emu.connector.lanes.queued >= window + 49)
            assert quick.ask("113").startswith(f"87,1,{XID}\n205,2,")
            release.set()
            for _ in range(window + 50):
                assert slow.get("mr/" + slow_id).decode().startswith(f"87,1,{XID}\n205,2,")
        finally:
            release.set()
            slow.close()
            quick.close()
