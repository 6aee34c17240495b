"""Several provisioning stations, one ledger in PostgreSQL (a throwaway server: pg_fixtures.py).

The promise: stations that provision at the same time, with CSVs that overlap (copies of one
provider's file, one of them edited), never hand out a device twice: one device ID ends up on
one board, with one password that the ledger, the vault and the board agree on, and one CSV ID
belongs to one device. Shown end to end with two `microcot provision` processes on virtual boards,
and with many stations of the real Provisioner on in-memory boards (fast enough for hundreds of
claims); the pieces (the claim, the unique index under a real race, the key binding) one by one.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_fixtures import read_doc
from click.testing import CliRunner
from fidelity_fixtures import unavailable

from microcot import identity
from microcot_host import fleetcsv, provision, transport
from microcot_host.pgserver import PgServer, PgServerError
from microcot_host.provision import Options, Outcome, Provisioner, nonce_hash
from microcot_host.provision_cli import provision as provision_cli
from microcot_host.provision_ledger import (
    VERIFIED,
    Books,
    LedgerBusy,
    LedgerConflict,
    LedgerError,
    load_key,
)
from microcot_host.provision_ledger_pg import display, secure_conninfo
from microcot_host.vboard import VirtualBoard

try:
    import psycopg
except ImportError:  # the tests that need it say so (pg_fixtures.py), collection goes on
    psycopg = None

pytestmark = pytest.mark.timeout(120)

HEADER = "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL"
# what a board that lost its device ID to another board or station is told
LOST = ("being provisioned by another station", "two boards would share one identity")
CSV_CLASH = "one row for two devices"


def iccid(n: int) -> str:
    payload = "8949031%012d" % n
    return payload + identity.luhn_check_digit(payload)


def strong_password(rng: random.Random) -> str:
    return "Pw-" + "".join(rng.choice("abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                           for _ in range(16)) + "!7"


def csv_text(rows: list[tuple[str, str, str]]) -> str:
    """(ID, password, ICCID) rows as a mass-registration CSV."""
    return HEADER + "\n" + "".join(f"{i};{pw};mqtt;Kessel {i};{ic};1\n" for i, pw, ic in rows)


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    """One key, copied to each of two stations (as the guide says to do)."""
    a, b = tmp_path / "station-a" / "provisioning.key", tmp_path / "station-b" / "p.key"
    load_key(a)
    b.parent.mkdir(mode=0o700)
    shutil.copy2(a, b)
    return a, b


# -- two `microcot provision` processes on virtual boards ----------------------------------------

def stored_cred(vb: VirtualBoard) -> dict | None:
    return read_doc(vb.flash_dir, "cred")


def test_two_stations_with_overlapping_csvs_hand_out_each_device_once(
        tmp_path: Path, postgres_url: str, key_files: tuple[Path, Path]) -> None:
    rng = random.Random(13)
    n = [iccid(i) for i in range(8)]
    pw = {ic: strong_password(rng) for ic in n}
    # copies of one provider CSV: A has rows 0-5, B rows 2-7; B's copy was edited so that n7
    # got the ID that n1 has in A's: one ID, two devices
    csv_a = [(f"kessel-{i}", pw[n[i]], n[i]) for i in range(0, 6)]
    csv_b = [(f"kessel-{i}", pw[n[i]], n[i]) for i in range(2, 7)] + [("kessel-1", pw[n[7]], n[7])]
    # boards: n2 and n3 are on both stations at once (twins: two boards, one ID each)
    at_a = [("a", i) for i in (0, 1, 2, 3)]
    at_b = [("b", i) for i in (2, 3, 6, 7)]
    boards = {(s, i): VirtualBoard(f"pg-{s}{i}", iccid=n[i], flash_dir=tmp_path / f"flash-{s}{i}")
              for s, i in at_a + at_b}
    for vb in boards.values():
        vb.start()
    try:
        procs = {}
        for s, key, rows, mine in (("a", key_files[0], csv_a, at_a),
                                   ("b", key_files[1], csv_b, at_b)):
            (tmp_path / f"{s}.csv").write_text(csv_text(rows))
            args = [sys.executable, "-m", "microcot_host", "provision", "--key-file", str(key),
                    "--csv", str(tmp_path / f"{s}.csv"), "--out", str(tmp_path / f"out-{s}.csv"),
                    "--json"]
            for k in mine:
                args += ["--port", boards[k].port]
            env = {**os.environ, "MICROCOT_LEDGER": postgres_url,
                   "MICROCOT_HOME": str(tmp_path / f"home-{s}")}
            procs[s] = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        done = {s: p.communicate(timeout=90) for s, p in procs.items()}
        outs = {s: json.loads(o) for s, (o, _) in done.items()}
        by_port = {b["port"]: b for doc in outs.values() for b in doc["boards"]}
        result = {k: by_port[vb.port] for k, vb in boards.items()}

        # each device once: one board of a twin pair, one of the two devices with one CSV ID
        ok = {k: r for k, r in result.items() if r["result"] == "written"}
        assert Counter(r["device_id"] for r in ok.values()) == Counter(
            {n[0]: 1, n[2]: 1, n[3]: 1, n[6]: 1, n[1] if ("a", 1) in ok else n[7]: 1}), result
        for i in (2, 3):
            loser = result[("b", i)] if ("a", i) in ok else result[("a", i)]
            assert loser["result"] == "failed" and any(w in loser["detail"] for w in LOST), loser
        clash = result[("b", 7)] if ("a", 1) in ok else result[("a", 1)]
        assert clash["result"] == "failed" and CSV_CLASH in clash["detail"], clash
        # the losers' boards were never written; the winners hold what the CSVs say
        for k, vb in boards.items():
            cred = stored_cred(vb)
            if k in ok:
                assert cred is not None and (cred["id"], cred["password"]) == (n[k[1]], pw[n[k[1]]])
            else:
                assert cred is None, k
        for s, mine in (("a", at_a), ("b", at_b)):  # exit code 1 where a board failed
            assert procs[s].returncode == (0 if all(k in ok for k in mine) else 1)
        rows = {s: fleetcsv.parse((tmp_path / f"out-{s}.csv").read_text()).rows for s in "ab"}
        got = [r.iccid for s in "ab" for r in rows[s]]
        assert sorted(got) == sorted(r["device_id"] for r in ok.values())  # disjoint, complete
        assert all(r.credentials == pw[r.iccid] for s in "ab" for r in rows[s])

        # the shared ledger: verified on the winning board, each CSV ID once; export has all
        st = CliRunner().invoke(provision_cli, ["status", "--json", "--key-file",
                                                str(key_files[0])],
                                env={"MICROCOT_LEDGER": postgres_url}, catch_exceptions=False)
        assert st.exit_code == 0, st.output
        recs = {r["device_id"]: r for r in json.loads(st.stdout)}
        assert set(recs) == {r["device_id"] for r in ok.values()}
        for k in ok:
            rec = recs[n[k[1]]]
            assert (rec["status"], rec["board_serial"]) == (VERIFIED, boards[k].mac.hex())
        assert len({r["external_id"] for r in recs.values()}) == len(recs)
        exported = tmp_path / "all.csv"
        ex = CliRunner().invoke(provision_cli, ["export", "--out", str(exported), "--ledger",
                                                postgres_url, "--key-file", str(key_files[1])],
                                catch_exceptions=False)
        assert ex.exit_code == 0, ex.output
        assert sorted(r.iccid for r in fleetcsv.parse(exported.read_text()).rows) == sorted(got)
        said = "".join(o + e for o, e in done.values()) + st.output + ex.output
        assert not any(p in said for p in pw.values()), "a password leaked"
    finally:
        for vb in boards.values():
            vb.stop()


# -- many stations of the real Provisioner on in-memory boards ----------------------------------

@dataclass
class MemBoard:
    """A board that answers provision.probe and write_credentials from memory."""

    port: str
    device_id: str
    serial: str
    cred: dict | None = None
    writes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def mem_boards(monkeypatch: pytest.MonkeyPatch) -> dict[str, MemBoard]:
    boards: dict[str, MemBoard] = {}

    def probe(t: MemBoard, modem_ms: int = 0, nonce: str | None = None) -> tuple[dict, str]:
        nonce = nonce or secrets.token_hex(16)
        with t.lock:
            facts: dict = {"microcot": "test", "store": "/store", "hw_id": t.device_id,
                           "hw_source": "iccid", "serial": t.serial}
            if t.cred is not None:
                facts["cred"] = {"id": t.cred["id"], "source": "provisioned", "ok": False,
                                 "hash": nonce_hash(nonce, t.cred["password"])}
                facts["cred_status"] = "ok"
        return facts, nonce

    def write(t: MemBoard, root: str, did: str, pw: str) -> None:
        time.sleep(0.002)  # a board takes a while: the other stations run meanwhile
        with t.lock:
            t.cred = {"id": did, "password": pw}
            t.writes += 1

    monkeypatch.setattr(provision, "probe", probe)
    monkeypatch.setattr(provision, "write_credentials", write)
    monkeypatch.setattr(transport, "open_board", lambda port, **kw: boards[port])
    monkeypatch.setattr(transport, "close", lambda t: None)
    monkeypatch.setattr(provision, "_usb_serials", dict)
    return boards


def test_many_stations_on_one_ledger_never_hand_out_a_device_twice(
        tmp_path: Path, postgres_url: str, mem_boards: dict[str, MemBoard]) -> None:
    """Four stations, 48 device IDs, 84 boards: a third of the IDs on two to four stations at
    once (twins), CSV windows that overlap, some devices with no row (generated passwords,
    different per station: the dangerous case), two rows whose copies disagree on the ID."""
    rng = random.Random(2024)
    stations, ids = 4, [iccid(1000 + i) for i in range(48)]
    pw = {d: strong_password(rng) for d in ids}
    key = tmp_path / "provisioning.key"
    load_key(key)
    csvs: list[list[fleetcsv.FleetRow]] = []
    for s in range(stations):
        window = ids[s * 10: s * 10 + 20]  # overlapping windows; the last ids have no row
        csvs.append([fleetcsv.FleetRow(0, f"k-{d[-6:]}", pw[d], "mqtt", f"K {d[-6:]}", d, "1")
                     for d in window])
    # the edited copy: station 3's row of ids[47] has the ID of ids[0]'s row (station 0's)
    clash_a, clash_b = ids[0], ids[47]
    csvs[3] = [r for r in csvs[3] if r.iccid != clash_b] + [
        fleetcsv.FleetRow(0, f"k-{clash_a[-6:]}", pw[clash_b], "mqtt", "edited", clash_b, "1")]
    placed: dict[int, list[str]] = {s: [] for s in range(stations)}
    for i, d in enumerate(ids):
        home = 0 if d == clash_a else 3 if d == clash_b else i % stations
        where = [home]
        if i % 3 == 0 and d not in (clash_a, clash_b):  # twins on 2-4 stations
            where += rng.sample([s for s in range(stations) if s != home], rng.randint(1, 3))
        for s in where:
            port = f"/dev/mem-{s}-{d[-6:]}"
            mem_boards[port] = MemBoard(port, d, secrets.token_hex(8))
            placed[s].append(port)

    outcomes: dict[int, list[Outcome]] = {}
    start = threading.Barrier(stations)

    def station(s: int) -> None:
        with Books(postgres_url, key) as books:
            p = Provisioner(books, fleetcsv.FleetCsv(csvs[s], [], ";"), Options(workers=8))
            start.wait()
            outcomes[s] = p.run(placed[s])

    threads = [threading.Thread(target=station, args=(s,)) for s in range(stations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == list(range(stations)), "a station did not finish"
    every = [o for s in range(stations) for o in outcomes[s]]
    assert len(every) == len(mem_boards) > len(ids) * 1.5

    won = Counter(o.device_id for o in every if o.result == provision.WRITTEN_R)
    clash_winner = clash_a if won[clash_a] else clash_b
    assert won == Counter(d for d in ids if d in (clash_winner,) or d not in (clash_a, clash_b))
    for o in every:
        if o.result != provision.WRITTEN_R:
            assert o.result == "failed", o
            why = (CSV_CLASH,) if o.device_id in (clash_a, clash_b) else LOST
            assert any(w in o.detail for w in why), o
    holders = Counter(b.device_id for b in mem_boards.values() if b.cred is not None)
    assert holders == won  # one board per device holds credentials; every loser none
    assert all(b.writes <= 1 for b in mem_boards.values())
    with Books(postgres_url, key) as books:
        recs = {r.device_id: r for r in books.ledger.all()}
        assert set(recs) == set(won)
        for b in mem_boards.values():
            if b.cred is None:
                continue
            rec = recs[b.device_id]
            assert (rec.status, rec.board_serial, rec.generation) == (VERIFIED, b.serial, 1)
            assert b.cred["password"] == books.vault.get(b.device_id)
            assert books.keys.matches(rec.cred_hash, b.device_id, b.cred["password"])
            begun = [e for e in books.ledger.events(b.device_id) if e[5] == "pending"]
            assert [e[4] for e in begun] == [b.serial]  # one start, on the winning board
        assert len({r.external_id for r in recs.values()}) == len(recs)


# -- the pieces ---------------------------------------------------------------------------------

def test_a_claim_holds_a_device_id_for_one_station(postgres_url: str, tmp_path: Path) -> None:
    key = tmp_path / "k"
    with Books(postgres_url, key) as a, Books(postgres_url, key) as b:
        claim = a.ledger.claim("dev-1")
        with pytest.raises(LedgerBusy, match="being provisioned by another station"):
            b.ledger.claim("dev-1")
        b.ledger.claim("dev-2").release()  # other IDs are free
        claim.release()
        again = b.ledger.claim("dev-1")
        again.release()
        # a station that dies (its connection ends) leaves nothing claimed
        lost = a.ledger.claim("dev-3")
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # pg_class: this db's
            # with a timeout it waits until the backend is gone (and its locks with it)
            ended = admin.execute("SELECT pg_terminate_backend(pid, 30000) FROM pg_locks l "
                                  "JOIN pg_class c ON c.oid = l.relation WHERE c.relname = "
                                  "'claims' AND l.mode = 'RowShareLock' AND l.pid <> "
                                  "pg_backend_pid()").fetchall()
            assert ended == [(True,)]
        b.ledger.claim("dev-3").release()
        with pytest.raises(LedgerError, match="claim of device ID dev-3 was lost"):
            lost.check()
        lost.release()


def test_one_csv_id_one_device_even_when_two_stations_insert_at_once(
        postgres_url: str, tmp_path: Path) -> None:
    """The check in the transaction sees nothing while another station's insert is not yet
    committed (READ COMMITTED); the unique index makes the second wait and then fail."""
    with Books(postgres_url, tmp_path / "k") as books:
        h = books.keys.cred_hash("dev-b", "x")
        first = psycopg.connect(postgres_url)  # station A, in the middle of its begin()
        first.execute("INSERT INTO devices VALUES ('dev-a', 'kessel-1', 'n', '1', NULL, 's-a', "
                      "'/dev/a', 'pending', NULL, 'csv', 1, NULL, 't', 't')")
        errors: list[BaseException] = []

        def station_b() -> None:
            try:
                books.ledger.begin("dev-b", external_id="kessel-1", name="n", shell="1",
                                   id_source="iccid", board_serial="s-b", port="/dev/b",
                                   cred_hash=h, cred_origin="csv", new_password=True)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=station_b)
        t.start()
        with psycopg.connect(postgres_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while not watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND wait_event_type = 'Lock'"
                                    ).fetchone()[0]:
                assert time.monotonic() < deadline, "station B never waited for station A"
                time.sleep(0.01)
        first.commit()
        first.close()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], LedgerConflict), errors
        assert "'kessel-1' is the ID of device dev-a already" in str(errors[0])
        assert books.ledger.get("dev-b") is None


def test_a_station_with_another_key_is_refused(postgres_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first.key"
    with Books(postgres_url, first) as books:
        books.vault.put("dev-1", "Secret-Pw-4711!")
    other = tmp_path / "other.key"
    load_key(other)
    with pytest.raises(LedgerError, match="is not the key of the ledger"):
        Books(postgres_url, other)
    missing = tmp_path / "not-copied.key"
    with pytest.raises(LedgerError, match="copy that key file here"):
        Books(postgres_url, missing)
    assert not missing.exists()  # no new key that would write what nobody else can read
    with Books(postgres_url, first) as books:
        assert books.vault.get("dev-1") == "Secret-Pw-4711!"


def test_status_and_export_need_a_ledger_and_never_show_the_url_password(
        postgres_url: str, postgres_server: PgServer, tmp_path: Path) -> None:
    key = tmp_path / "k"
    r = CliRunner().invoke(provision_cli, ["status", "--ledger", postgres_url, "--key-file",
                                           str(key)])
    assert r.exit_code == 1 and "does not exist" in r.output  # no key: nothing made
    load_key(key)
    r = CliRunner().invoke(provision_cli, ["status", "--ledger", postgres_url, "--key-file",
                                           str(key)])
    assert r.exit_code == 1 and "holds no provisioning ledger" in r.output, r.output
    with psycopg.connect(postgres_url) as conn:  # and nothing was made in the database
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
    Books(postgres_url, key).close()
    r = CliRunner().invoke(provision_cli, ["status", "--ledger", postgres_url, "--key-file",
                                           str(key)])
    assert r.exit_code == 0, r.output
    assert postgres_server.password not in r.output and "microcot:***@" in r.output
    bad = postgres_url.replace(postgres_server.password, "wrong-password")
    r = CliRunner().invoke(provision_cli, ["status", "--ledger", bad, "--key-file", str(key)])
    assert r.exit_code == 1 and "password authentication failed" in r.output
    assert "wrong-password" not in r.output


def test_tls_is_verified_for_a_remote_ledger(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    if psycopg is None:
        unavailable("the PostgreSQL driver psycopg is missing: pip install -e '.[test]'")
    for var in ("PGSSLMODE", "PGSSLROOTCERT", "PGHOST", "PGHOSTADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    remote = secure_conninfo("postgresql://st@ledger.factory.example/books")
    assert "sslmode=verify-full" in remote and "sslrootcert=system" in remote
    own_ca = secure_conninfo("postgresql://st@db.example/b?sslrootcert=/etc/ca.pem")
    assert "sslmode=verify-full" in own_ca and "sslrootcert=/etc/ca.pem" in own_ca
    assert "sslmode=disable" in secure_conninfo("postgresql://db.example/b?sslmode=disable")
    for local in ("postgresql://u@127.0.0.1:5/b", "postgresql://u@localhost/b",
                  "postgresql:///b?host=/run/postgresql"):
        assert "sslmode" not in secure_conninfo(local), local
    assert display("postgresql://st:s3cret@h/b?password=x2&sslmode=require") == (
        "postgresql://st:***@h/b?password=***&sslmode=require")


# -- the throwaway server ----------------------------------------------------------------------

def test_the_throwaway_server_takes_passwords_on_loopback_only(
        postgres_server: PgServer) -> None:
    url = postgres_server.url()
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url.replace(postgres_server.password, "guess"))
    base = postgres_server.socket_dir
    assert oct(base.stat().st_mode & 0o777) == "0o700"
    assert postgres_server.password not in repr(postgres_server)


def test_the_throwaway_server_folder_and_its_way(tmp_path: Path,
                                                 postgres_server: PgServer) -> None:
    """Its own folder goes away with it; as root (the server runs as `postgres`), a folder the
    `postgres` user cannot reach is refused up front, naming the parent in the way. (The
    session's server is asked for only so that a missing PostgreSQL is reported as such.)"""
    if os.geteuid() == 0:
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o700)
        with pytest.raises(PgServerError, match=r"`postgres` user .* cannot enter /tmp/\S+ "
                                                r"\(mode 0700\)"):
            PgServer(closed / "pg").start()
    with PgServer() as pg:
        base = pg.socket_dir
        assert (pg.data_dir / "PG_VERSION").exists()
    assert not base.exists()

