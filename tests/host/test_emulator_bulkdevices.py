"""Many devices at once: `Broker.add_devices` (batched commands while Mosquitto runs, its user file
while it is stopped), `Emulator.add_devices` (an idle broker restarts with the users in its file,
a busy one gets commands), one model transaction for their records, and the record's hash.

paho-mqtt plays the devices over TLS verified against the broker's CA; every check is on what a
device sees (CONNACK, SUBACK, an answer on mr/), not on timing.
"""

from __future__ import annotations

import hashlib
import threading

import paho.mqtt.client as mqtt
import pytest
from emulator_fixtures import REGISTRATION, WAIT, device, new_iccid, raw_connack

from microcot_host.emulator import Emulator, model, service
from microcot_host.emulator.broker import Broker
from microcot_host.emulator.certs import client_ssl_context

pytestmark = pytest.mark.timeout(60)

DENIED = 0x80


def connack(broker: Broker, user: str, password: str) -> int:
    """The CONNACK code a device user gets straight from a (TLS) Broker."""
    return raw_connack({"mqtt_host": "localhost", "mqtt_port": broker.port,
                        "ca_cert": str(broker.ca_cert)}, user, password)


def suback(broker: Broker, user: str, password: str, topic: str) -> int:
    done = threading.Event()
    codes: list[int] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=user,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.tls_set_context(client_ssl_context(broker.ca_cert))
    c.on_connect = lambda cl, *a: cl.subscribe(topic, 1)
    c.on_subscribe = lambda cl, ud, mid, rcs, props=None: (codes.extend(r.value for r in rcs),
                                                            done.set())
    c.connect("localhost", broker.port, keepalive=30)
    c.loop_start()
    try:
        assert done.wait(WAIT), "no SUBACK"
    finally:
        c.disconnect()
        c.loop_stop()
    return codes[0]


def test_broker_add_devices_while_running_creates_and_updates(tmp_path):
    with Broker(tmp_path / "b") as b:
        b.add_device("dev-old", "Old-Password-1")
        # more than one batch, a device twice and a known one: each ends with its last password
        pairs = [(f"dev-{k}", f"Password-{k}") for k in range(60)]
        pairs += [("dev-old", "New-Password-1"), ("dev-3", "Second-Password-3")]
        b.add_devices(pairs)
        assert connack(b, "dev-0", "Password-0") == 0
        assert connack(b, "dev-59", "Password-59") == 0
        assert connack(b, "dev-3", "Second-Password-3") == 0
        assert connack(b, "dev-3", "Password-3") == 5
        assert connack(b, "dev-old", "New-Password-1") == 0
        assert connack(b, "dev-old", "Old-Password-1") == 5
        # each got its own topics only
        assert suback(b, "dev-1", "Password-1", "mr/dev-1") == 1
        assert suback(b, "dev-1", "Password-1", "mr/dev-2") == DENIED


def test_broker_add_devices_while_stopped_go_into_its_file(tmp_path):
    b = Broker(tmp_path / "b")
    b.add_devices([("dev-early", "Early-Password-1")])   # never started yet
    b.start()
    try:
        b.add_device("dev-kept", "Kept-Password-1")
        b.add_device("dev-changed", "Before-Password-1")
        port = b.port
    finally:
        b.stop()
    b.add_devices([("dev-new", "New-Password-1"), ("dev-changed", "After-Password-1")])
    b.start()
    try:
        assert b.port == port
        assert connack(b, "dev-early", "Early-Password-1") == 0
        assert connack(b, "dev-kept", "Kept-Password-1") == 0
        assert connack(b, "dev-new", "New-Password-1") == 0
        assert connack(b, "dev-changed", "After-Password-1") == 0
        assert connack(b, "dev-changed", "Before-Password-1") == 5
        assert b.has_device("dev-new")
        assert suback(b, "dev-new", "New-Password-1", "mr/dev-new") == 1
        assert suback(b, "dev-new", "New-Password-1", "mr/dev-kept") == DENIED
        # the written users are the plugin's own afterwards: a command still changes them
        b.add_device("dev-new", "Third-Password-1")
        assert connack(b, "dev-new", "Third-Password-1") == 0
        assert connack(b, "dev-new", "New-Password-1") == 5
    finally:
        b.stop()


@pytest.fixture
def emu(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "QUIET_RESTART_AT", 5)
    with Emulator(tmp_path / "emu") as e:
        yield e


def test_emulator_add_devices_restarts_an_idle_broker_with_them(emu):
    pid = emu.broker.pid
    pairs = [(new_iccid(), f"Bulk-Password-{k}") for k in range(8)]
    emu.add_devices(pairs)
    assert emu.broker.pid != pid          # restarted, with the users in its file
    assert all(emu.api.model.check_credentials(d, p) for d, p in pairs)
    assert emu.api.model.get_credentials(pairs[0][0])["source"] == "emulator"
    # the connector is back: a device's request is answered
    d = device(emu.connection, *pairs[-1])
    try:
        assert d.request(REGISTRATION).startswith("20,")
    finally:
        d.close()


def test_emulator_add_devices_with_a_device_connected_sends_commands(emu):
    first = (new_iccid(), "First-Password-1")
    emu.add_device(*first)
    d = device(emu.connection, *first)
    try:
        pid = emu.broker.pid
        pairs = [(new_iccid(), f"Bulk-Password-{k}") for k in range(8)]
        emu.add_devices(pairs)
        assert emu.broker.pid == pid      # nobody was cut off
        assert d.client.is_connected()
        assert d.request(REGISTRATION).startswith("20,")
        assert raw_connack(emu.connection, *pairs[0]) == 0
    finally:
        d.close()


def test_a_change_during_a_broker_restart_waits_for_it(emu):
    broker = emu.broker
    errors: list[BaseException] = []

    def change() -> None:
        try:
            emu.add_device(late[0], late[1])
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    late = (new_iccid(), "Late-Password-1")
    with broker.changes:             # as Emulator.add_devices holds it around its restart
        broker.stop()
        t = threading.Thread(target=change)
        t.start()
        t.join(0.4)
        assert t.is_alive() and not errors   # waiting, not failing on a stopped broker
        broker.start()
    t.join(WAIT)
    assert not t.is_alive() and not errors
    assert raw_connack(emu.connection, *late) == 0


def test_model_records_many_in_one_go_and_old_hashes_still_verify(tmp_path, monkeypatch):
    m = model.Model(tmp_path / "p.sqlite")
    monkeypatch.setattr(model, "PBKDF2_ITERATIONS", 10_000)   # a record of an earlier version
    m.record_credentials("dev-a", "Old-Password-1", "bulk")
    monkeypatch.undo()
    new = m.record_credentials_many([("dev-b", "Password-b"), ("dev-a", "Password-a"),
                                     ("dev-b", "Password-b2")], "emulator")
    assert new == [True, False, False]
    assert m.check_credentials("dev-a", "Password-a")
    assert not m.check_credentials("dev-a", "Old-Password-1")
    assert m.check_credentials("dev-b", "Password-b2")
    m.record_credentials("dev-c", "Old-Password-3", "bulk")
    rows = {r[0]: r[1:] for r in m._read("SELECT id, iterations, salt, hash FROM "
                                          "device_credentials", ())}
    iterations, salt, digest = rows["dev-c"]
    assert iterations == model.PBKDF2_ITERATIONS
    assert digest == hashlib.pbkdf2_hmac("sha256", b"Old-Password-3", salt, iterations)
    # a record made with 10,000 rounds keeps them and verifies
    m2 = model.Model(tmp_path / "q.sqlite")
    monkeypatch.setattr(model, "PBKDF2_ITERATIONS", 10_000)
    m2.record_credentials("dev-z", "Ten-Thousand-1", "bulk")
    monkeypatch.undo()
    assert m2.check_credentials("dev-z", "Ten-Thousand-1")
    assert m2._read("SELECT iterations FROM device_credentials", ())[0][0] == 10_000
