"""The SmartREST path in worker processes (workers.py, sessions.py; docs/guides/emulator-scaling.md).

The emulator runs with two worker processes, each with its own MQTT 5 session on the same
Mosquitto serving half of the devices. Devices are chosen so that both workers have some. A
device's messages carry a sequence number; the measurement each stores gets its id from the one
counter every process draws from inside its write transaction, so ids follow commit order: a
device's stored values sorted by id must be its sequence, and every value must be stored once.

- order: devices publish all their rows at once (nothing waits for an answer); answers come back
  in order and the stored rows are in order;
- kill -9 of one worker under load: the supervisor starts it again under the same client id, its
  session's unacknowledged and queued messages come back to it, and every row is stored exactly
  once, in order (the devices' connections never break, so nothing may be stored twice);
- a layout change (1 -> 2 -> 1 processes) while the broker holds queued messages for the old
  sessions: they are served, once and in order, and the old sessions are gone;
- an operation created over REST reaches the device through its worker.

The tests of worker processes run on both stores (the `database_url` fixture): SQLite, whose
writers queue on a flock, and PostgreSQL, whose transactions run side by side (model_pg.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from emulator_fixtures import WAIT, Device, device, new_iccid, rest, wait_for

from microcot_host.emulator import Emulator, service
from microcot_host.emulator.model import SINGLE_CONNECTOR, Model
from microcot_host.emulator.sessions import SETTING, layout
from microcot_host.emulator.workers import partition, worker_client_id

pytestmark = pytest.mark.timeout(180)

SEED = 20240613
XID = "mcWorkers1"
REGISTRATION = "\n".join([
    "15," + XID,
    # seed 002: the collection a device uses first holds the pending-operations template
    "10,500,GET,/devicecontrol/operations?status=PENDING&agentId=%%,,application/json,%%,"
    "UNSIGNED,",
    "10,901,POST,/measurement/measurements,application/json,application/json,%%,"
    "NOW UNSIGNED STRING NUMBER,"
    '"{""time"":""%%"",""source"":{""id"":""%%""},""type"":""%%"",'
    '""c8y_Seq"":{""n"":{""value"":%%,""unit"":""n""}}}"',
    # seed 002: a collection is deleted through its own template
    "10,114,DELETE,/inventory/managedObjects/%%,,,%%,UNSIGNED,",
    "11,900,,$.c8y_Seq,$.type,$.c8y_Seq.n.value",
    "11,203,$.operations,$.c8y_Restart,$.id,$.deviceId",
])


def ids_for_both(per_worker: int, n: int = 2) -> list[str]:
    """Fresh device IDs, `per_worker` of them in each of n partitions."""
    buckets: dict[int, list[str]] = defaultdict(list)
    while any(len(buckets[k]) < per_worker for k in range(n)):
        i = new_iccid()
        k = partition(i, n)
        if len(buckets[k]) < per_worker:
            buckets[k].append(i)
    return [i for k in range(n) for i in buckets[k]]


class Fleet:
    """Devices with credentials, a managed object and a bound session, connected."""

    def __init__(self, emu: Emulator, ids: list[str],
                 passwords: dict[str, str] | None = None, register: bool = True) -> None:
        """`passwords`: of devices already given credentials (else add_device here);
        `register`: the first device registers the template collection."""
        assert emu.api is not None
        self.conn = emu.connection
        self.mo: dict[str, str] = {}
        self.pw: dict[str, str] = {}
        self.dev: dict[str, Device] = {}
        self.infos: list[Any] = []
        for n, i in enumerate(ids):
            self.pw[i] = passwords[i] if passwords else emu.add_device(i)
            r = emu.api.handle("POST", "/inventory/managedObjects",
                               {"name": i, "c8y_IsDevice": {}}, user=i)
            self.mo[i] = str(r.body["id"])
            emu.api.handle("POST", f"/identity/globalIds/{self.mo[i]}/externalIds",
                           {"type": "c8y_Serial", "externalId": i}, user=i)
            d = device(self.conn, i, self.pw[i])
            if n == 0 and register:
                assert d.request(REGISTRATION).startswith("20,")
            self.dev[i] = d
            # the first request row binds the device to the collection (its template 500)
            assert d.ask(f"901,{self.mo[i]},c8y_Warm,0", xid=XID).endswith(",c8y_Warm,0")

    def send(self, i: str, seq: int, kind: str) -> None:
        """Publish one row without waiting for anything."""
        body = f"15,{XID}\n901,{self.mo[i]},{kind},{seq}"
        self.infos.append(self.dev[i].client.publish("ms/" + i, body.encode(), qos=1))

    def wait_acked(self) -> None:
        """Until the broker acknowledged every row sent."""
        for info in self.infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
        self.infos.clear()

    def answers(self, i: str, count: int) -> list[int]:
        out = []
        for _ in range(count):
            text = self.dev[i].get("mr/" + i).decode()
            row = text.split("\n")[-1].split(",")
            assert row[0] == "900", text
            out.append(int(float(row[3])))
        return out

    def close(self) -> None:
        for d in self.dev.values():
            d.close()


def stored(conn: dict[str, Any], kind: str) -> dict[str, list[tuple[int, int]]]:
    """Device MO id -> [(measurement id, value)] of type `kind`, all pages."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    page = 1
    while True:
        status, doc = rest(conn, "GET", f"/measurement/measurements?type={kind}&pageSize=2000"
                                        f"&currentPage={page}")
        assert status == 200, doc
        for m in doc["measurements"]:
            out[m["source"]["id"]].append((int(m["id"]), int(m["c8y_Seq"]["n"]["value"])))
        if len(doc["measurements"]) < 2000:
            return out
        page += 1


def check_once_in_order(fleet: Fleet, kind: str, rows: int) -> None:
    got = stored(fleet.conn, kind)
    for i, mo in fleet.mo.items():
        values = [v for _, v in sorted(got.get(mo, []))]
        assert values == list(range(rows)), f"{i}: {values}"


def count(conn: dict[str, Any], kind: str) -> int:
    return sum(len(v) for v in stored(conn, kind).values())


# -- partition and schema -----------------------------------------------------------------------

def test_partition_is_stable_and_spreads_devices():
    assert [partition(f"89490200000000000{n:03d}", 2) for n in range(8)] == \
        [partition(f"89490200000000000{n:03d}", 2) for n in range(8)]
    rnd = random.Random(SEED)
    ids = ["8949%016d" % rnd.randrange(10**16) for _ in range(2000)]
    for n in (2, 3, 8):
        sizes = [0] * n
        for i in ids:
            sizes[partition(i, n)] += 1
        assert min(sizes) > 0.8 * len(ids) / n, sizes
    assert worker_client_id(0, 2) == "microcot-connector-1-of-2"
    assert set(layout(2)) == {SINGLE_CONNECTOR, "microcot-connector-1-of-2",
                              "microcot-connector-2-of-2"}


def test_applied_records_of_schema_3_belong_to_the_single_connector(tmp_path: Path):
    import sqlite3

    from microcot_host.emulator import model as model_module

    path = tmp_path / "platform.sqlite"
    db = sqlite3.connect(path)
    for v in range(3):
        db.executescript(model_module._MIGRATIONS[v])
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO applied_messages VALUES (7, x'0102')")
    db.commit()
    db.close()
    with Model(path) as m:
        assert m.applied_messages() == {7: b"\x01\x02"}
        assert m.applied_messages("microcot-connector-1-of-2") == {}
        m.note_applied(7, b"\x03", "microcot-connector-1-of-2")  # same mid, other session
        assert m.applied_messages() == {7: b"\x01\x02"}
        m.forget_session(SINGLE_CONNECTOR)
        assert m.applied_messages() == {}
        assert m.applied_messages("microcot-connector-1-of-2") == {7: b"\x03"}


def test_shared_models_queue_writers_on_a_flock(tmp_path: Path):
    """Model(shared=True): a write transaction holds the writers' flock from its first write to
    its end, so other processes' writers wait in the kernel (not in SQLite's busy handler)."""
    path = tmp_path / "platform.sqlite"
    with Model(path, shared=True) as a:
        lock = Path(str(path) + ".writers")
        assert lock.stat().st_mode & 0o777 == 0o600
        # another open file: flocks of it conflict with the model's
        with open(lock, "rb") as probe:
            def free() -> bool:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                fcntl.flock(probe, fcntl.LOCK_UN)
                return True

            assert free()
            with a.atomic():
                a.set_setting("k", "1")
                assert not free()  # held by the open transaction
            assert free()
            a.set_setting("k", "2")
            assert free()


# -- two worker processes -----------------------------------------------------------------------

def test_two_workers_keep_each_devices_order(tmp_path: Path, database_url: str | None):
    rows = 40
    with Emulator(tmp_path / "emu", worker_processes=2, database_url=database_url) as emu:
        assert emu.pool is not None and all(emu.pool.pids())
        fleet = Fleet(emu, ids_for_both(3))
        try:
            watched = next(iter(fleet.mo.values()))
            assert rest(fleet.conn, "PUT", f"/inventory/managedObjects/{watched}", {
                "c8y_RequiredAvailability": {"responseInterval": 10}})[0] == 200
            for seq in range(rows):  # interleaved over devices, nothing waits
                for i in fleet.mo:
                    fleet.send(i, seq, "c8y_Order")
            for i in fleet.mo:
                assert fleet.answers(i, rows) == list(range(rows)), i
            check_once_in_order(fleet, "c8y_Order", rows)
            recorded = json.loads(emu.model.get_setting(SETTING))
            assert recorded == layout(2)
            # availability lives in the main process; the workers report the devices' messages
            assert wait_for(lambda: "lastMessage" in rest(
                fleet.conn, "GET", f"/inventory/managedObjects/{watched}")[1].get(
                    "c8y_Availability", {}), WAIT)
        finally:
            fleet.close()


def test_bulk_added_devices_are_served_by_their_workers(tmp_path: Path, monkeypatch):
    """Emulator.add_devices with workers: the quiet path (broker restarted with the users in its
    file) and the batched commands; in both, each worker subscribed its share before the users
    existed, so the devices' first rows are served, once and in order."""
    monkeypatch.setattr(service, "QUIET_RESTART_AT", 4)
    rows = 10
    with Emulator(tmp_path / "emu", worker_processes=2) as emu:
        quiet = {i: f"Quiet-Password-{k}" for k, i in enumerate(ids_for_both(3))}
        pid = emu.broker.pid
        emu.add_devices(list(quiet.items()))
        assert emu.broker.pid != pid  # the quiet path: restarted with the users
        fleet = Fleet(emu, list(quiet), quiet)
        try:
            # a device is connected now: the next batch goes in commands to the running broker
            batched = {i: f"Batch-Password-{k}" for k, i in enumerate(ids_for_both(2))}
            pid = emu.broker.pid
            emu.add_devices(list(batched.items()))
            assert emu.broker.pid == pid
            more = Fleet(emu, list(batched), batched, register=False)
            try:
                for seq in range(rows):
                    for f in (fleet, more):
                        for i in f.mo:
                            f.send(i, seq, "c8y_Bulk")
                for f in (fleet, more):
                    for i in f.mo:
                        assert f.answers(i, rows) == list(range(rows)), i
                    check_once_in_order(f, "c8y_Bulk", rows)
            finally:
                more.close()
        finally:
            fleet.close()


def test_an_operation_reaches_its_device_through_its_worker(tmp_path: Path,
                                                           database_url: str | None):
    with Emulator(tmp_path / "emu", worker_processes=2, database_url=database_url) as emu:
        fleet = Fleet(emu, ids_for_both(1))
        try:
            for i, mo in fleet.mo.items():
                op = emu.create_operation(mo, {"c8y_Restart": {}})
                got = fleet.dev[i].get("mr/" + i).decode()
                assert f"203,1,{op['id']},{mo}" in got, got
        finally:
            fleet.close()


def test_a_collection_deleted_in_one_worker_is_gone_in_the_other(tmp_path: Path):
    with Emulator(tmp_path / "emu", worker_processes=2) as emu:
        ids = ids_for_both(1)
        fleet = Fleet(emu, ids)  # ids[0] registered the collection: it may delete it
        try:
            owner, other = ids
            status, found = rest(fleet.conn, "GET", "/identity/externalIds/"
                                                    f"c8y_SmartRestDeviceIdentifier/{XID}")
            assert status == 200, found
            coll = found["managedObject"]["id"]
            assert fleet.dev[other].request("15," + XID) == f"20,{coll}"  # cached there too
            # deleted by its own template; no response template matches: no answer
            fleet.dev[owner].publish("ms/" + owner, f"15,{XID}\n114,{coll}")
            assert wait_for(lambda: fleet.dev[other].request("15," + XID)
                            == "40,Template not found.", WAIT)
        finally:
            fleet.close()


def test_kill_9_of_a_worker_loses_and_duplicates_nothing(tmp_path: Path,
                                                         database_url: str | None):
    rnd = random.Random(SEED)
    rows, burst = 60, 10
    with Emulator(tmp_path / "emu", worker_processes=2, database_url=database_url) as emu:
        pool = emu.pool
        assert pool is not None
        fleet = Fleet(emu, ids_for_both(4))
        try:
            victim = rnd.randrange(2)
            kill_at = rnd.randrange(burst, rows - burst)  # after this row is sent
            old = pool.pids()[victim]
            assert old is not None
            for first in range(0, rows, burst):
                for seq in range(first, first + burst):
                    for i in fleet.mo:
                        fleet.send(i, seq, "c8y_Kill")
                    if seq == kill_at:
                        os.kill(old, signal.SIGKILL)
            assert wait_for(lambda: pool.pids()[victim] not in (None, old), 30.0)
            total = rows * len(fleet.mo)
            assert wait_for(lambda: count(fleet.conn, "c8y_Kill") >= total, 60.0, 0.3)
            check_once_in_order(fleet, "c8y_Kill", rows)
        finally:
            fleet.close()


def test_changing_the_number_of_workers_serves_what_old_sessions_held(
        tmp_path: Path, database_url: str | None):
    data = tmp_path / "emu"
    rows = 8
    with Emulator(data, database_url=database_url) as emu:
        fleet = Fleet(emu, ids_for_both(2))
        ids, mos, pws = list(fleet.mo), dict(fleet.mo), dict(fleet.pw)
        assert emu.connector is not None
        emu.connector.stop()  # the broker queues for its session from now on
        for seq in range(rows):
            for i in ids:
                fleet.send(i, seq, "c8y_Layout")
        fleet.wait_acked()  # every row is at the broker
        fleet.close()

    with Emulator(data, worker_processes=2, database_url=database_url) as emu:
        fleet = reconnect(emu, ids, mos, pws)
        try:
            for i in ids:  # the answers queued for the devices' sessions, then new rows
                assert fleet.answers(i, rows) == list(range(rows))
            assert emu.model is not None
            assert json.loads(emu.model.get_setting(SETTING)) == layout(2)
            assert emu.pool is not None
            threading.Thread(target=emu.pool.stop).start()  # workers away: their sessions queue
            assert wait_for(lambda: emu.pool.pids() == [None, None], 20.0)
            for seq in range(rows, 2 * rows):
                for i in ids:
                    fleet.send(i, seq, "c8y_Layout")
            fleet.wait_acked()
        finally:
            fleet.close()

    with Emulator(data, database_url=database_url) as emu:
        fleet = reconnect(emu, ids, mos, pws)
        try:
            for i in ids:
                assert fleet.answers(i, rows) == list(range(rows, 2 * rows))
            for seq in range(2 * rows, 3 * rows):  # one connector again: each row once
                for i in ids:
                    fleet.send(i, seq, "c8y_Layout")
            for i in ids:
                assert fleet.answers(i, rows) == list(range(2 * rows, 3 * rows))
            check_once_in_order(fleet, "c8y_Layout", 3 * rows)
            assert emu.model is not None
            assert json.loads(emu.model.get_setting(SETTING)) == layout(1)
        finally:
            fleet.close()


def reconnect(emu: Emulator, ids: list[str], mos: dict[str, str],
              pws: dict[str, str]) -> Fleet:
    """The same devices on a restarted emulator (their persistent sessions)."""
    fleet = Fleet.__new__(Fleet)
    fleet.conn, fleet.mo, fleet.pw = emu.connection, mos, pws
    fleet.dev = {i: device(emu.connection, i, pws[i]) for i in ids}
    fleet.infos = []
    return fleet


# -- as users run it ----------------------------------------------------------------------------

def test_cli_workers_bootstrap_register_and_die_with_the_emulator(tmp_path: Path):
    """`microcot emulator --workers 2`: a device bootstraps (the main process's connector, the
    acceptance, its worker's subscription before its broker user exists) and is served by its
    worker; bulk-registered devices too; kill -9 of the emulator ends its workers and broker."""
    from test_emulator_cli import Running, cli, processes_using

    from microcot import xtea

    data = tmp_path / "emu"
    run = Running(data, "--workers", "2")
    try:
        run.wait_for_line("Running")
        banner = "".join(run.out)
        line = next(x for x in run.out if "SmartREST" in x)
        pids = [int(p) for p in line.split("pids ")[1].rstrip(")\n").split(", ")]
        assert "2 worker processes" in line and len(pids) == 2, banner
        conn = json.loads((data / "connection.json").read_text())

        iccid = new_iccid()
        secret = b"QWERTYUIOPASDFGH"
        boot = Device(conn, iccid, conn["bootstrap_user"], conn["bootstrap_password"]).connect()
        try:
            assert boot.subscribe("sr/" + iccid) == 1
            boot.publish("ss/" + iccid, secret)
            wait_for(lambda: "PENDING_ACCEPTANCE" in cli("emulator", "devices", "--data-dir",
                                                          str(data)).stdout)
            r = cli("emulator", "accept", iccid, "--data-dir", str(data))
            assert r.returncode == 0, r.stderr
            password = xtea.unpad(xtea.decrypt_ecb(secret, boot.get("sr/" + iccid))).decode()
        finally:
            boot.close()
        d = device(conn, iccid, password)
        assert d.request("15,noSuchX1") == "40,Template not found."
        d.close()

        ids = ids_for_both(2)
        fleet = tmp_path / "fleet.csv"
        fleet.write_text("ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n" + "".join(
            f"d{n};Fleet-Pass-{n:02d};mqtt;D{n};{i};1\n" for n, i in enumerate(ids)))
        r = cli("emulator", "register", str(fleet), "--data-dir", str(data))
        assert r.returncode == 0 and "4 created" in r.stdout, r.stdout + r.stderr
        for n, i in enumerate(ids):
            d = device(conn, i, f"Fleet-Pass-{n:02d}")
            assert d.request("15,noSuchX1") == "40,Template not found."
            d.close()

        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
        assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids)
                        and not processes_using(data), 30.0, 0.1)
    finally:
        run.kill()


def test_the_answer_is_rendered_after_the_commit(tmp_path: Path, monkeypatch):
    """The write transaction, which other processes wait for, holds the requests, not the
    response templates' JSONPaths (Engine.process_later in the connector)."""
    from microcot_host.emulator import engine as engine_module

    with Emulator(tmp_path / "emu") as emu:
        assert emu.model is not None
        db = emu.model._db
        seen: list[bool] = []
        extract = engine_module.engine_paths.extract

        def watched(t, doc):  # type: ignore[no-untyped-def]
            seen.append(db.in_transaction)
            return extract(t, doc)

        monkeypatch.setattr(engine_module.engine_paths, "extract", watched)
        fleet = Fleet(emu, [new_iccid()])
        try:
            i = next(iter(fleet.mo))
            fleet.send(i, 7, "c8y_After")
            assert fleet.answers(i, 1) == [7]
            assert seen and not any(seen), seen
        finally:
            fleet.close()
