"""`microcot provision`: CSV validation, and provisioning virtual boards (idempotence, --rotate,
resuming after a crash, an unplugged board, a CSV given as input) with the secrets kept out of
every output, log and ledger. The tests marked `both` run with the SQLite ledger and with the
PostgreSQL ledger (a throwaway server, tests/host/pg_fixtures.py)."""

from __future__ import annotations

import json
import logging
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_fixtures import read_doc
from click.testing import CliRunner, Result

from microcot import identity
from microcot_host import fleetcsv, provision
from microcot_host.provision import Options, Provisioner
from microcot_host.provision_cli import provision as provision_cli
from microcot_host.provision_ledger import FAILED, PENDING, VERIFIED, Books, Keys
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(120)

HEADER = "ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL"
GOOD_PW = "Kessel-Pw-4711x"  # distinctive: tests grep for it


def iccid(n: int, prefix: str = "8949020") -> str:
    payload = prefix + "%012d" % n
    return payload + identity.luhn_check_digit(payload)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(provision_cli, list(args), catch_exceptions=False)


def no_secret(texts: list[str | bytes], passwords: list[str]) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for pw in passwords:
            assert pw.encode() not in data, "a password leaked"


# -- csv validate -------------------------------------------------------------------------------

def _validate(tmp_path: Path, text: str, *extra: str) -> Result:
    f = tmp_path / "in.csv"
    f.write_text(text)
    return invoke("csv", "validate", str(f), *extra)


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    r = _validate(tmp_path, f"{HEADER}\nd1;{GOOD_PW};mqtt;Kessel 1;{iccid(1)};1\n")
    assert r.exit_code == 0, r.output
    assert "1 device row(s), separator ';': OK" in r.stdout
    no_secret([r.output], [GOOD_PW])


@pytest.mark.parametrize("text, where", [
    ("ID;CREDENTIALS;TYPE;NAME;ICCID\n", "line 1: missing column SHELL"),
    ("ID|CREDENTIALS|TYPE|NAME|ICCID|SHELL\n", "line 1: unknown separator '|'"),
    (f"{HEADER}\nd1;{GOOD_PW};mqtt;N1\n", "line 2, column ICCID: missing value"),
    (f"{HEADER}\nd1;;mqtt;N1;{iccid(1)};1\n", "line 2, column CREDENTIALS: empty"),
    (f"{HEADER}\nd1;{GOOD_PW};MQTT;N1;{iccid(1)};1\n", "line 2, column TYPE: must be 'mqtt'"),
    (f"{HEADER}\nd1;{GOOD_PW};mqtt;N1;{iccid(1)};yes\n", "line 2, column SHELL: must be 0 or 1"),
    (f"{HEADER}\nd1;{GOOD_PW};mqtt;N1;{iccid(1)};1\nd1;{GOOD_PW};mqtt;N2;{iccid(2)};1\n",
     "line 3, column ID: duplicate ID 'd1', first on line 2"),
    (f"{HEADER}\nd1;{GOOD_PW};mqtt;N1;{iccid(1)};1\nd2;{GOOD_PW};mqtt;N2;{iccid(1)};1\n",
     f"line 3, column ICCID: duplicate ICCID {iccid(1)}"),
    (f"{HEADER}\nd1;{GOOD_PW};mqtt;N1;{iccid(1)[:-1]}{(int(iccid(1)[-1]) + 1) % 10};1\n",
     "line 2, column ICCID: Luhn check failed"),
    (f"{HEADER}\nd1;kesselpassword;mqtt;N1;{iccid(1)};1\n",
     "line 2, column CREDENTIALS: weak: 1 of 4 character classes"),
])
def test_validate_reports_each_problem_with_line_and_column(tmp_path: Path, text: str,
                                                            where: str) -> None:
    r = _validate(tmp_path, text)
    assert r.exit_code == 1, r.output
    assert f"in.csv: {where}" in r.stdout, r.output
    assert "problem(s)" in r.stderr
    no_secret([r.output], [GOOD_PW, "kesselpassword"])


def test_validate_reports_every_problem_and_json(tmp_path: Path) -> None:
    text = (f"{HEADER}\nd1;{GOOD_PW};tcp;N1;{iccid(1)};1\n"
            f"d2;Qz7%kX;mqtt;N2;{iccid(2)};2\n")
    r = _validate(tmp_path, text, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["rows"] == 2 and doc["separator"] == ";"
    got = {(p["line"], p["column"], p["position"]) for p in doc["problems"]}
    assert got == {(2, "TYPE", 3), (3, "CREDENTIALS", 2), (3, "SHELL", 6)}
    no_secret([r.output], [GOOD_PW, "Qz7%kX"])


# -- pieces -------------------------------------------------------------------------------------

def test_generated_passwords_are_strong_and_distinct() -> None:
    pws = {provision.generate_password() for _ in range(200)}
    assert len(pws) == 200
    for pw in pws:
        assert len(pw) == provision.PASSWORD_LEN and set(pw) <= set(provision.ALPHABET)
        row = f"{HEADER}\nd;{pw};mqtt;N;{iccid(1)};0\n"
        assert fleetcsv.parse(row, check_weak=True).ok


def test_ledger_and_vault_hold_no_password(tmp_path: Path) -> None:
    with Books(tmp_path / "p" / "prov.db") as b:
        b.vault.put("dev1", GOOD_PW)
        h = b.keys.cred_hash("dev1", GOOD_PW)
        b.ledger.begin("dev1", external_id="dev1", name="n", shell="0", id_source="mac",
                       board_serial="00", port="/dev/x", cred_hash=h, cred_origin="csv",
                       new_password=True)
        assert b.vault.get("dev1") == GOOD_PW
        assert b.keys.matches(b.ledger.get("dev1").cred_hash, "dev1", GOOD_PW)
        assert not b.keys.matches(h, "dev2", GOOD_PW)
        paths = b.paths
    # another key derives other hashes: the ledger alone says nothing about the password
    assert Keys(b"\x01" * 32).cred_hash("dev1", GOOD_PW) != h
    assert paths.secrets.name == "prov.secrets.db" and paths.key.name == "prov.key"
    for p in (paths.ledger, paths.secrets, paths.key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        no_secret([p.read_bytes()], [GOOD_PW])
    assert stat.S_IMODE(paths.ledger.parent.stat().st_mode) == 0o700


def test_name_template_is_checked() -> None:
    provision.check_template("Device {id} ({source})")
    with pytest.raises(ValueError, match="name template"):
        provision.check_template("Device {nope}")


# -- virtual boards -----------------------------------------------------------------------------

class Fleet:
    """Virtual boards with distinct ICCIDs (one without a modem: its ID is its MAC)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.boards: list[VirtualBoard] = []

    def start(self, n: int, mac_only: int | None = None) -> list[VirtualBoard]:
        for i in range(n):
            k = len(self.boards)
            vb = VirtualBoard(f"prov-{k}", iccid=None if i == mac_only else iccid(100 + k),
                              flash_dir=self.root / f"flash{k}")
            self.boards.append(vb.start())
        return self.boards[-n:]

    def restart(self, vb: VirtualBoard) -> VirtualBoard:
        """The same board plugged in again (same flash and SIM, a new port)."""
        vb.stop()
        again = VirtualBoard(vb.name, iccid=vb.iccid, flash_dir=vb.flash_dir).start()
        self.boards[self.boards.index(vb)] = again
        return again

    def stop(self) -> None:
        for vb in self.boards:
            vb.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


def stored_cred(vb: VirtualBoard) -> dict:
    """The board's "cred" document, read from its flash directory (store.py's slot format)."""
    cred = read_doc(vb.flash_dir, "cred")
    assert cred is not None, f"{vb.name}: no credentials on the board"
    return cred


@dataclass(frozen=True)
class Where:
    """The books a test provisions into: a SQLite file, or a PostgreSQL database."""

    ledger: str  # a path or a URL
    key: Path

    def args(self) -> list[str]:
        return ["--ledger", self.ledger, "--key-file", str(self.key)]

    def books(self) -> Books:
        return Books(self.ledger, self.key)


@pytest.fixture
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    """SQLite unless a test is parametrized with `both` (indirect)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return Where(request.getfixturevalue("postgres_url"), tmp_path / "ledger" / "pg.key")
    return Where(str(tmp_path / "ledger" / "provisioning.db"),
                 tmp_path / "ledger" / "provisioning.key")


both = pytest.mark.parametrize("where", ["sqlite", "postgresql"], indirect=True)


def run_cli(where: Where, boards: list[VirtualBoard], *extra: str) -> Result:
    args = [*where.args(), "--json"]
    for vb in boards:
        args += ["--port", vb.port]
    return CliRunner().invoke(provision_cli, args + list(extra), catch_exceptions=False)


def results(r: Result) -> dict[str, dict]:
    return {b["port"]: b for b in json.loads(r.stdout)["boards"]}


def read_csv(path: Path) -> dict[str, fleetcsv.FleetRow]:
    parsed = fleetcsv.parse(path.read_text(), check_weak=True)
    assert parsed.ok, parsed.messages()
    return {r.iccid: r for r in parsed.rows}


@both
def test_provision_then_again_changes_nothing(tmp_path: Path, fleet: Fleet, where: Where,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    boards = fleet.start(3, mac_only=2)
    out = tmp_path / "fleet.csv"
    r1 = run_cli(where, boards, "--out", str(out), "--name-template", "Device {id}",
                 "--shell", "1")
    assert r1.exit_code == 0, r1.output
    res = results(r1)
    assert [res[vb.port]["result"] for vb in boards] == ["written"] * 3
    assert all(res[vb.port]["deployed"] for vb in boards)  # fresh boards: microcot deployed
    assert [res[vb.port]["id_source"] for vb in boards] == ["iccid", "iccid", "mac"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = read_csv(out)
    ids = [res[vb.port]["device_id"] for vb in boards]
    assert sorted(rows) == sorted(ids) and ids[:2] == [boards[0].iccid, boards[1].iccid]
    assert ids[2] == boards[2].mac.hex().upper()
    passwords = []
    for vb, did in zip(boards, ids, strict=True):
        row = rows[did]
        assert (row.id, row.type, row.name, row.shell) == (did, "mqtt", f"Device {did}", "1")
        cred = stored_cred(vb)
        assert cred == {"id": did, "password": row.credentials, "source": "provisioned",
                        "ok": False}
        passwords.append(row.credentials)
    assert len(set(passwords)) == 3
    with where.books() as b:
        recs = {r.device_id: r for r in b.ledger.all()}
        assert {r.status for r in recs.values()} == {VERIFIED}
        assert recs[ids[0]].board_serial == boards[0].mac.hex() and recs[ids[0]].port == boards[0].port
        assert all(b.keys.matches(recs[d].cred_hash, d, p) for d, p in zip(ids, passwords,
                                                                             strict=True))
    first_csv = out.read_bytes()

    r2 = run_cli(where, boards, "--out", str(out), "--name-template", "Device {id}",
                 "--shell", "1")
    assert r2.exit_code == 0, r2.output
    assert {b["result"] for b in results(r2).values()} == {"unchanged"}
    assert not any(b["deployed"] for b in results(r2).values())
    assert out.read_bytes() == first_csv
    assert [stored_cred(vb)["password"] for vb in boards] == passwords

    # the human-readable form and the status listing mask them too
    r3 = CliRunner().invoke(provision_cli, [*where.args(), "-p", boards[0].port])
    assert r3.exit_code == 0 and "unchanged" in r3.stdout and "***" in r3.stdout
    # a new NAME changes the ledger and the CSV, not the board
    r5 = run_cli(where, boards[:1], "--out", str(out), "--name-template", "Boiler {id}")
    assert results(r5)[boards[0].port]["result"] == "updated"
    assert read_csv(out)[ids[0]].name == f"Boiler {ids[0]}"
    assert stored_cred(boards[0])["password"] == passwords[0]
    r4 = invoke("status", *where.args())
    assert r4.exit_code == 0 and "verified" in r4.stdout
    no_secret([r1.output, r2.output, r3.output, r4.output, r5.output, caplog.text,
               *stored_bytes(where)], passwords)


def stored_bytes(where: Where) -> list[bytes]:
    """Everything the ledger and the vault hold, as bytes: the files, or every table's rows."""
    if not where.ledger.startswith("postgresql://"):
        ledger = Path(where.ledger)
        return [ledger.read_bytes(), ledger.with_name("provisioning.secrets.db").read_bytes()]
    import psycopg

    with psycopg.connect(where.ledger) as conn:
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE "
                                             "schemaname = 'public'")]
        assert {"devices", "events", "secrets", "claims", "meta"} <= set(tables)
        return [repr(conn.execute(f"SELECT * FROM {t}").fetchall()).encode() for t in tables]


@both
def test_rotate_issues_new_passwords(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    boards = fleet.start(2)
    out = tmp_path / "fleet.csv"
    assert run_cli(where, boards, "--out", str(out)).exit_code == 0
    before = read_csv(out)
    r = run_cli(where, boards, "--out", str(out), "--rotate")
    assert r.exit_code == 0, r.output
    assert {b["result"] for b in results(r).values()} == {"written"}
    after = read_csv(out)
    assert sorted(after) == sorted(before)
    for did, row in after.items():
        assert row.credentials != before[did].credentials
        assert (row.id, row.name, row.shell) == (before[did].id, before[did].name,
                                                 before[did].shell)
    for vb in boards:
        assert stored_cred(vb)["password"] == after[vb.iccid].credentials
    with where.books() as b:
        assert {r.generation for r in b.ledger.all()} == {2}
        assert {b.vault.get(d) for d in after} == {r.credentials for r in after.values()}
    # and rotating settles: the next plain run changes nothing
    r = run_cli(where, boards, "--out", str(out))
    assert {b["result"] for b in results(r).values()} == {"unchanged"}
    assert read_csv(out) == after
    no_secret([r.output], [x.credentials for x in (*before.values(), *after.values())])


@both
def test_csv_rows_are_used_and_checked(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    boards = fleet.start(3)
    src = tmp_path / "in.csv"
    other = iccid(999)  # a device that is not connected: ignored
    src.write_text(f"{HEADER}\n"
                   f"kessel-1;{GOOD_PW};mqtt;Kessel 1;{boards[0].iccid};1\n"
                   f"{boards[1].iccid};{GOOD_PW}2;mqtt;Kessel 2;{boards[1].iccid};0\n"
                   f"x;{GOOD_PW}3;mqtt;Elsewhere;{other};0\n")
    out = tmp_path / "fleet.csv"
    r = run_cli(where, boards, "--csv", str(src), "--out", str(out))
    assert r.exit_code == 0, r.output
    res = results(r)
    assert [res[vb.port]["origin"] for vb in boards] == ["csv", "csv", "generated"]
    rows = read_csv(out)
    assert other not in rows and len(rows) == 3
    assert (rows[boards[0].iccid].id, rows[boards[0].iccid].credentials,
            rows[boards[0].iccid].name, rows[boards[0].iccid].shell) == (
        "kessel-1", GOOD_PW, "Kessel 1", "1")
    assert rows[boards[1].iccid].credentials == GOOD_PW + "2"
    assert stored_cred(boards[0])["password"] == GOOD_PW
    # the same again, now without the input CSV: the vault remembers
    r = run_cli(where, boards, "--out", str(out))
    assert {b["result"] for b in results(r).values()} == {"unchanged"}
    assert read_csv(out) == rows
    no_secret([r.output], [GOOD_PW])

    # export writes every verified device of the ledger, also without the boards
    exported = tmp_path / "all.csv"
    e = invoke("export", "--out", str(exported), *where.args())
    assert e.exit_code == 0, e.output
    assert read_csv(exported) == rows and stat.S_IMODE(exported.stat().st_mode) == 0o600


def test_bad_input_csv_touches_no_board(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    (vb,) = fleet.start(1)
    src = tmp_path / "in.csv"
    src.write_text(f"{HEADER}\nd1;weakweakweak;mqtt;N;{vb.iccid};1\n")
    r = run_cli(where, [vb], "--csv", str(src))
    assert r.exit_code == 1
    assert "line 2, column CREDENTIALS: weak" in r.output and "--allow-weak" in r.output
    assert not (vb.flash_dir / "store").exists()
    no_secret([r.output], ["weakweakweak"])
    r = run_cli(where, [vb], "--csv", str(src), "--allow-weak")
    assert r.exit_code == 0 and stored_cred(vb)["password"] == "weakweakweak"


def test_csv_row_with_another_iccid_fails_that_board(tmp_path: Path, fleet: Fleet,
                                                    where: Where) -> None:
    a, b = fleet.start(2)
    src = tmp_path / "in.csv"
    src.write_text(f"{HEADER}\n{a.iccid};{GOOD_PW};mqtt;N;{iccid(4242)};1\n")
    r = run_cli(where, [a, b], "--csv", str(src))
    assert r.exit_code == 1
    res = results(r)
    assert res[a.port]["result"] == "failed" and "fix the ICCID column" in res[a.port]["detail"]
    assert res[b.port]["result"] == "written"
    assert f"1 of 2 board(s) failed: {a.port} ({a.iccid})" in r.stderr


class Crash(BaseException):
    """A crash of the provisioning process (not an Exception: nothing catches it)."""


@both
@pytest.mark.parametrize("after_write", [False, True])
def test_resume_after_a_crash(tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                              after_write: bool, where: Where) -> None:
    (vb,) = fleet.start(1)
    real = provision.write_credentials

    def crashing(t, root, did, pw):
        if after_write:
            real(t, root, did, pw)
        raise Crash

    monkeypatch.setattr(provision, "write_credentials", crashing)
    with where.books() as b, pytest.raises(Crash):
        Provisioner(b, options=Options()).run([vb.port])
    with where.books() as b:
        assert b.ledger.get(vb.iccid).status == PENDING
        pending_pw = b.vault.get(vb.iccid)
    assert pending_pw
    assert (vb.flash_dir / "store" / "cred.a").exists() == after_write
    monkeypatch.setattr(provision, "write_credentials", real)

    out = tmp_path / "fleet.csv"
    r = run_cli(where, [vb], "--out", str(out))
    assert r.exit_code == 0, r.output
    assert results(r)[vb.port]["result"] == ("confirmed" if after_write else "written")
    # the password of the interrupted run is the one that ends up on the board and in the CSV
    assert stored_cred(vb)["password"] == pending_pw == read_csv(out)[vb.iccid].credentials
    with where.books() as b:
        assert b.ledger.get(vb.iccid).status == VERIFIED
        assert b.ledger.get(vb.iccid).generation == 1
        assert [e[5] for e in b.ledger.events(vb.iccid)][-1] == VERIFIED


@both
def test_an_unplugged_board_fails_alone(tmp_path: Path, fleet: Fleet, where: Where,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    boards = fleet.start(3)
    victim = boards[1]
    real = provision.write_credentials

    def unplug_victim(t, root, did, pw):
        if did == victim.iccid:
            victim.stop()  # pulled out just before its credentials are written
        real(t, root, did, pw)

    monkeypatch.setattr(provision, "write_credentials", unplug_victim)
    out = tmp_path / "fleet.csv"
    r = run_cli(where, boards, "--out", str(out))
    assert r.exit_code == 1
    res = results(r)
    assert [res[vb.port]["result"] for vb in boards] == ["written", "failed", "written"]
    assert "unplugged?" in res[victim.port]["detail"]
    assert f"1 of 3 board(s) failed: {victim.port} ({victim.iccid})" in r.stderr
    assert sorted(read_csv(out)) == sorted([boards[0].iccid, boards[2].iccid])
    with where.books() as b:
        rec = b.ledger.get(victim.iccid)
        assert rec.status == FAILED and "unplugged" in rec.error
        pw = b.vault.get(victim.iccid)
    monkeypatch.setattr(provision, "write_credentials", real)

    # plugged in again (a new port): only it is provisioned, the others are unchanged
    boards[1] = fleet.restart(victim)
    r = run_cli(where, boards, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert [results(r)[vb.port]["result"] for vb in boards] == ["unchanged", "written",
                                                               "unchanged"]
    assert read_csv(out)[victim.iccid].credentials == pw == stored_cred(boards[1])["password"]
    no_secret([r.output], [pw])


def test_two_boards_with_one_id(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    a = fleet.start(1)[0]
    twin = VirtualBoard("prov-twin", iccid=a.iccid, flash_dir=tmp_path / "twin").start()
    fleet.boards.append(twin)
    r = run_cli(where, [a, twin])
    assert r.exit_code == 1
    got = sorted(b["result"] for b in results(r).values())
    assert got == ["failed", "written"]
    assert "two boards would share one identity" in r.stderr


def test_no_deploy_fails_a_bare_board(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    (vb,) = fleet.start(1)
    r = run_cli(where, [vb], "--no-deploy")
    assert r.exit_code == 1
    assert "microcot is not deployed" in results(r)[vb.port]["detail"]


def test_ledger_is_readable_sql(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    (vb,) = fleet.start(1)
    assert run_cli(where, [vb]).exit_code == 0
    con = sqlite3.connect(tmp_path / "ledger" / "provisioning.db")
    (row,) = con.execute("SELECT device_id, status, port, board_serial, cred_hash "
                         "FROM devices").fetchall()
    assert row[:4] == (vb.iccid, "verified", vb.port, vb.mac.hex())
    assert row[4].startswith("hmac-sha256:")
    steps = [s for (s,) in con.execute("SELECT status FROM events ORDER BY seq")]
    assert steps == ["pending", "written", "verified"]
    con.close()


def test_the_stored_id_wins_as_in_the_agent(tmp_path: Path, fleet: Fleet, where: Where) -> None:
    """The agent keeps the ID it stored ("dev") even when the SIM changed: the credentials must
    belong to that ID, or the agent would ignore them and bootstrap."""
    from microcot_host import deploy, transport

    (vb,) = fleet.start(1)
    old = iccid(777)
    deploy.deploy(vb.port)
    t = transport.open_board(vb.port)
    try:
        transport.run(t, "from microcot import store\nstore.save('dev', {'id': %r, "
                         "'src': 'iccid'})" % old)
    finally:
        transport.close(t)
    r = run_cli(where, [vb])
    assert r.exit_code == 0, r.output
    got = results(r)[vb.port]
    assert (got["device_id"], got["id_source"]) == (old, "iccid")
    assert f"stored ID {old} is not its hardware's {vb.iccid}" in got["detail"]
    assert stored_cred(vb)["id"] == old


def test_export_and_status_need_an_existing_ledger(tmp_path: Path) -> None:
    for cmd in (["export", "--out", str(tmp_path / "x.csv")], ["status"]):
        r = invoke(*cmd, "--ledger", str(tmp_path / "none.db"))
        assert r.exit_code == 1 and "does not exist" in r.output
    assert not list(tmp_path.iterdir())  # and nothing was made


def test_out_directory_is_checked_before_any_board(tmp_path: Path) -> None:
    r = invoke("--port", "/dev/null", "--out", str(tmp_path / "nope" / "fleet.csv"),
               "--ledger", str(tmp_path / "l.db"))
    assert r.exit_code == 2 and "is not a directory" in r.output


def test_a_device_id_is_not_given_to_a_second_board_later(tmp_path: Path, fleet: Fleet,
                                                          where: Where) -> None:
    """A twin in a later run (a cloned ID, a SIM moved to a new board): refused, naming the board
    the ledger has; --reassign gives the ID to the new board."""
    (a,) = fleet.start(1)
    assert run_cli(where, [a]).exit_code == 0
    twin = VirtualBoard("prov-later-twin", iccid=a.iccid, flash_dir=tmp_path / "twin").start()
    fleet.boards.append(twin)
    r = run_cli(where, [twin])
    assert r.exit_code == 1
    detail = results(r)[twin.port]["detail"]
    assert f"belongs to board {a.mac.hex()}" in detail and "--reassign" in detail
    assert not (twin.flash_dir / "store" / "cred.a").exists()
    with where.books() as b:  # the record stays the first board's, the refusal is an event
        rec = b.ledger.get(a.iccid)
        assert (rec.status, rec.board_serial) == (VERIFIED, a.mac.hex())
        assert [e[5] for e in b.ledger.events(a.iccid)][-1] == FAILED
    r = run_cli(where, [twin], "--reassign")
    assert r.exit_code == 0 and results(r)[twin.port]["result"] == "written"
    with where.books() as b:
        assert b.ledger.get(a.iccid).board_serial == twin.mac.hex()
