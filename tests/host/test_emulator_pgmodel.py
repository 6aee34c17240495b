"""The emulator's platform data in PostgreSQL (model_pg.py) where it differs from SQLite: two
processes writing at once, the schema's versions, the URL's password. The model's and the API's
behaviour on both stores is test_emulator_api.py's (the `model_store` fixture); worker processes
on both, test_emulator_workers.py's; a device's whole life through the emulator on PostgreSQL,
test_emulator_e2e.py's restart test (the `database_url` fixture).

Concurrency is made, not hoped for: one process holds its transaction open until the server
shows the other process waiting for one of its locks (pg_locks), then commits."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from emulator_fixtures import device, new_iccid, rest, wait_for

from microcot_host.emulator import Emulator
from microcot_host.emulator.model import _MIGRATIONS, Page, open_model
from microcot_host.emulator.model_pg import PgModel, StoreError
from microcot_host.emulator.service import EmulatorError

pytestmark = pytest.mark.timeout(120)

SEED = 20261205
ALARM = {"type": "c8y_Race", "text": "both at once", "severity": "MAJOR",
         "time": "2026-12-05T12:00:00.000Z"}
# fork: the other process starts in milliseconds (spawn imports for seconds); it opens a model
# of its own and never touches this one's connections (it ends with os._exit, which closes none)
_fork = mp.get_context("fork")


def _create_alarm(url: str, source: str, out: Connection) -> None:
    """In a process of its own: one create_alarm, its result sent back."""
    with open_model(url) as m:
        out.send(m.create_alarm({**ALARM, "source": {"id": source}}))


def _burst(url: str, source: str, n: int, start: Any, out: Connection) -> None:
    """In a process of its own: after `start`, n measurements and n alarms of one type."""
    with open_model(url) as m:
        start.wait()
        ids = []
        for k in range(n):
            ids.append(int(m.create_measurement({"source": {"id": source}, "type": "c8y_Burst",
                                                 "time": "2026-12-05T12:00:00Z",
                                                 "c8y_Burst": {"k": {"value": k}}})["id"]))
            m.create_alarm({**ALARM, "source": {"id": source}, "text": f"k={k}"})
        out.send(ids)


def _waiting(url: str) -> int:
    """Lock requests not granted now, of any session of the database."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
        return int(row[0]) if row else 0


def _in_process(target: Any, *args: Any) -> tuple[Any, Connection]:
    mine, theirs = _fork.Pipe()
    p = _fork.Process(target=target, args=(*args, theirs), daemon=True)
    p.start()
    theirs.close()
    return p, mine


@pytest.mark.parametrize("first_commits", [True, False], ids=["commit", "rollback"])
def test_two_processes_creating_one_alarm_at_once_get_one_alarm(postgres_url: str,
                                                                first_commits: bool):
    """This process inserts the alarm and keeps its transaction open; another process creates
    the same alarm (source, type) meanwhile and waits on the open alarms' unique index. After
    the commit it counts into the same alarm (count 2); after a rollback its own is the one."""
    with open_model(postgres_url) as m:
        source = m.create_managed_object({"name": "racer", "c8y_IsDevice": {}})["id"]

        class Undo(Exception):
            pass

        proc = None
        with contextlib.nullcontext() if first_commits else pytest.raises(Undo), m.atomic():
            mine, new = m.create_alarm({**ALARM, "source": {"id": source}})
            assert new and mine["count"] == 1
            proc, pipe = _in_process(_create_alarm, postgres_url, source)
            assert wait_for(lambda: _waiting(postgres_url) > 0, 30.0)
            assert not pipe.poll()  # still waiting for this transaction
            if not first_commits:
                raise Undo
        assert proc is not None
        theirs, their_new = pipe.recv()
        proc.join(10)
        alarms, total = m.query_alarms(Page(0, 10), source=int(source))
        assert total == 1
        if first_commits:
            assert (their_new, theirs["id"], theirs["count"]) == (False, mine["id"], 2)
        else:
            assert their_new and theirs["count"] == 1 and theirs["id"] != mine["id"]
        assert alarms[0]["id"] == theirs["id"] and alarms[0]["count"] == theirs["count"]


def test_two_busy_processes_draw_unique_ids_and_count_one_alarm(postgres_url: str):
    """Two processes write measurements and the same alarm as fast as they can: every id is
    drawn once (a SEQUENCE, not a counter row), each process's ids rise, and the alarm is one,
    counted by both."""
    n = 60
    with open_model(postgres_url) as m:
        source = m.create_managed_object({"name": "busy", "c8y_IsDevice": {}})["id"]
        start = _fork.Event()
        procs = [_in_process(_burst, postgres_url, source, n, start) for _ in range(2)]
        start.set()
        got = [pipe.recv() for _, pipe in procs]
        for p, _ in procs:
            p.join(10)
        for ids in got:
            assert ids == sorted(ids) and len(ids) == n
        everything = got[0] + got[1]
        assert len(set(everything)) == 2 * n
        alarms, total = m.query_alarms(Page(0, 10), source=int(source))
        assert total == 1 and alarms[0]["count"] == 2 * n
        # the ids of every kind come from the one sequence: the alarm's is none of these
        assert int(alarms[0]["id"]) not in everything
        _, stored = m.query_measurements(Page(0, 1), source=int(source))
        assert stored == 2 * n


def test_schema_is_numbered_as_sqlites_and_a_newer_one_is_refused(postgres_url: str):
    import psycopg

    with open_model(postgres_url) as m:
        assert isinstance(m, PgModel)
    with open_model(postgres_url) as m:  # a second start migrates nothing
        assert m.create_managed_object({"name": "x"})["id"] == "10001"
    with psycopg.connect(postgres_url, autocommit=True) as c:
        assert c.execute("SELECT version FROM schema_version").fetchone()[0] == len(_MIGRATIONS)
        cols = dict(c.execute("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = 'applied_messages'").fetchall())
        assert cols == {"client": "text", "mid": "bigint", "digest": "bytea"}
        c.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(StoreError, match="newer than this emulator"):
        open_model(postgres_url)


def test_the_databases_password_is_never_shown(tmp_path: Path, postgres_url: str,
                                               postgres_server: Any,
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.DEBUG)
    password = postgres_server.password
    assert password in postgres_url
    with Emulator(tmp_path / "emu", database_url=postgres_url, https=False) as emu:
        assert password not in emu.database and "***" in emu.database
        assert not (emu.data_dir / "platform.sqlite").exists()
    wrong = postgres_url.replace(password, "Not-The-Password-42")
    with pytest.raises(EmulatorError) as err:
        Emulator(tmp_path / "emu2", database_url=wrong, https=False).start()
    assert "password authentication failed" in str(err.value)
    assert "Not-The-Password-42" not in str(err.value)

    # the command line, with the URL from the environment
    from test_emulator_cli import Running

    monkeypatch.setenv("MICROCOT_EMULATOR_DATABASE", postgres_url)
    run = Running(tmp_path / "emu3")
    try:
        run.wait_for_line("Running", 60.0)
        assert run.terminate() == 0
    finally:
        run.kill()
    assert run.proc.stderr is not None
    shown = "".join(run.out) + run.proc.stderr.read() + caplog.text
    assert "database    postgresql://microcot:***@" in shown, shown
    assert password not in shown


def test_two_emulators_share_one_database(tmp_path: Path, postgres_url: str):
    """Two emulators (as on two hosts) on one database: what a device sends through one is
    read through the other's REST API, and their ids never collide."""
    with Emulator(tmp_path / "a", database_url=postgres_url, https=False) as a, \
            Emulator(tmp_path / "b", database_url=postgres_url, https=False) as b:
        iccid = new_iccid()
        password = a.add_device(iccid)
        d = device(a.connection, iccid, password)
        try:
            mo = a.api.handle("POST", "/inventory/managedObjects",
                              {"name": iccid, "c8y_IsDevice": {}}, user=iccid).body["id"]
            other = b.api.handle("POST", "/inventory/managedObjects", {"name": "on b"}).body
            assert int(other["id"]) > int(mo)
            # the device is served by its own emulator's connector
            assert d.request("15,noSuchX1") == "40,Template not found."
            b.api.handle("POST", "/measurement/measurements", {
                "source": {"id": mo}, "type": "c8y_T", "time": "2026-12-05T12:00:00Z",
                "c8y_T": {"T": {"value": 21.5}}})
        finally:
            d.close()
        status, found = rest(b.connection, "GET", f"/inventory/managedObjects/{mo}")
        assert status == 200 and found["name"] == iccid
        assert rest(a.connection, "GET", f"/inventory/managedObjects/{other['id']}")[0] == 200
        status, ms = rest(a.connection, "GET", f"/measurement/measurements?source={mo}")
        assert [m["c8y_T"]["T"]["value"] for m in ms["measurements"]] == [21.5]


def test_connections_ended_by_the_server_are_replaced(postgres_url: str):
    """A server restart or an administrator's pg_terminate_backend ends the pooled connections:
    the call that finds its connection ended fails, and the next one gets a new connection."""
    import psycopg

    with open_model(postgres_url) as m:
        mo = m.create_managed_object({"name": "before"})["id"]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                "application_name = 'microcot emulator' AND datname = current_database()"
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        failed = 0
        for _ in range(3):  # one thread used the model: one idle connection, one failure
            try:
                assert m.get_managed_object(mo)["name"] == "before"
            except psycopg.OperationalError:
                failed += 1
        assert failed == 1
        assert m.update_managed_object(mo, {"name": "after"})["name"] == "after"
