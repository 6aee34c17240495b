"""Faults that must not lose data (issue 4), on a virtual board running the real firmware.

* power cut during credential writes: the interpreter is SIGKILLed (VirtualBoard.power_cut) at
  random moments while a script on the board rewrites the credentials document in a loop; after
  each restart the board's own store.load() must give the last complete generation or the one
  being written, never anything else.
* broker restarts mid-session, 20 times, while the agent measures with a sequence number every
  0.1 s and operations are created before, during and after the restarts: every measurement
  1..n arrives (a QoS 1 duplicate only as the same measurement), every operation runs once on
  the board and is SUCCESSFUL with its result.
* deleted device credentials (REST DELETE /devicecontrol/deviceCredentials/<ID>) while main.py
  runs: the broker refuses the credentials that worked (CONNACK 5), the agent deletes them,
  bootstraps again (auto-accept), finds its managed object by its external ID and measures on
  the same managed object; no second device is created.
"""

from __future__ import annotations

import ast
import os
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fidelity_fixtures import need_runtime

from microcot import store as host_store
from microcot_host import boards, deploy, transport
from microcot_host.vboard import VirtualBoard
from microcot_host.vboard.models import make_board

# the agent's faults run on each faithful board at its budget (as test_agent_e2e.py's life)
AGENT_BOARDS = pytest.mark.parametrize("board_file", [
    pytest.param(b, id=b) for b in
    os.environ.get("MICROCOT_AGENT_BOARDS", "esp32-generic,rp2-pico-w").split(",")])


def agent_board(board_file: str, name: str, flash: Path, iccid: str | None = None):
    need_runtime(boards.load(board_file).runtime)
    return make_board(board_file, name=name, iccid=iccid, flash_dir=flash).start()

pytestmark = pytest.mark.timeout(240)

ICCID = "89490200001234567892"
CUTS = 200

# On the board: check what survived the last cut (with the board's own store code), then rewrite
# the credentials forever, announcing each generation before writing it. Printing goes straight
# to the supervisor's pipe (the unix port does not buffer stdout), so a line the host sees was out
# before the write after it started.
WRITER = """
from microcot import store
store.root('/store')
d = store.load('cred')
print('L', repr(d), store.status('cred'))
n = %d
while True:
    print('W', n)
    store.save('cred', {'id': %r, 'password': 'gen%%08d' %% n, 'source': 'bootstrap', 'ok': True})
    n += 1
"""

BANNER_END = b'for more information.\r\n>>> '


def cred(n: int) -> dict:
    return {"id": ICCID, "password": "gen%08d" % n, "source": "bootstrap", "ok": True}


def where_cut(store_dir: Path) -> str:
    """Which step of store.save() the cut interrupted, from what it left on the flash."""
    tmp = store_dir / "cred.tmp"
    slots = sum((store_dir / f"cred.{s}").exists() for s in "ab")
    if not tmp.exists():
        return "between writes" if slots == 2 else "first write"
    if host_store._parse(tmp.read_bytes()) is None:
        return "writing the new slot (torn)"
    return "new slot complete, before the rename" if slots == 2 else \
        "old slot removed, before the rename"


def test_power_cut_during_credential_writes(tmp_path: Path) -> None:
    vb = VirtualBoard("t-faults-power", flash_dir=tmp_path / "flash").start()
    t = None
    try:
        t = transport.open_board(vb.port)
        deploy.deploy_transport(t, boards.load("virtual"))
        rng = random.Random()
        allowed: list = [None]  # nothing written yet
        n = 1
        seen = Counter()
        t0 = time.monotonic()
        for i in range(CUTS + 1):
            t.enter_raw_repl(soft_reset=False)
            t.exec_raw_no_follow(WRITER % (n, ICCID))
            out = b""
            while not re.search(rb"L .*\r\n", out):
                out += t.read_until(1, b"\n", timeout=10)
            m = re.search(rb"L (.*) (\w+)\r\n", out)
            loaded, status = ast.literal_eval(m.group(1).decode()), m.group(2).decode()
            # the board's store found a complete document, the old or the new one
            assert status in ("ok", "missing") and loaded in allowed, (
                f"cut {i}: stored {loaded} ({status}), expected one of {allowed}")
            if i == CUTS:
                break
            time.sleep(rng.uniform(0.0, 0.02))
            vb.power_cut()
            out += t.read_until(1, BANNER_END, timeout=10)
            written = [int(x) for x in re.findall(rb"(?m)^W (\d+)\r$", out)]
            # the last announced generation was being written (or done), the one before it was
            # complete; with only one announced, what the board loaded at the start is the old one
            old = cred(written[-2]) if len(written) > 1 else loaded
            allowed = [old, cred(written[-1])] if written else [loaded]
            seen[where_cut(vb.flash_dir / "store")] += 1
            n = (written[-1] if written else n) + 1
        took = time.monotonic() - t0
        print(f"\n{CUTS} power cuts in {took:.1f} s ({vb.crashes} restarts); cut during: "
              + ", ".join(f"{k} {v}" for k, v in seen.most_common()))
        assert vb.crashes == CUTS
        # the cuts really land inside store.save(), not only between two writes (a torn slot
        # is rarer: writing it takes microseconds of the save's ~0.6 ms, see where_cut's counts)
        assert sum(v for k, v in seen.items() if k not in ("between writes", "first write")) \
            >= CUTS // 2, seen
    finally:
        if t is not None:
            transport.close(t)
        vb.stop()


# ---- broker restarts ---------------------------------------------------------------------------

RESTARTS = 20

# On the board over the raw REPL: the agent with pre-provisioned credentials, a measurement with
# a sequence number every 0.1 s, and a c8y_Command `seq <k>` that records each k it runs. The
# host ends the run with `seq stop`: then measuring stops and the run ends once everything is
# acknowledged by the broker.
SEQ_AGENT = """
from microcot.agent import Agent
a = Agent()
a.start(%(id)r)
n = [0]
ran = []
stop = [False]
def tick():
    if not stop[0]:
        n[0] += 1
        a.measure('mc_Seq', 'n', n[0], '', type='mc_Seq')
a.every(0.1, tick)
def seq(args):
    ran.append(args)
    if args == 'stop':
        stop[0] = True
    return 'ran ' + args
a.command('seq', seq)
ok = a.run(seconds=%(limit)d, until=lambda: stop[0] and a.ready and not len(a.q)
           and not a._c.pending())
a.close()
print('RAN', ' '.join(ran))
print('DONE', ok, n[0], a.errors, a.q.dropped, a.stats['connects'])
"""


def agent_settings(conn: dict, **over) -> dict:
    s = {"host": conn["mqtt_host"], "port": conn["mqtt_port"], "tls": True,
         "ca": Path(conn["ca_cert"]).read_text(), "bootstrap_user": conn["bootstrap_user"],
         "bootstrap_password": conn["bootstrap_password"], "bootstrap_delay": [0, 1],
         "keepalive": 5, "timeout": 5, "backoff": [0.2, 1], "interval": 1}
    s.update(over)
    return s


def provision(vb: VirtualBoard, device_id: str, password: str) -> None:
    """Credentials on the board's flash, as `microcot provision` leaves them (host-side store,
    the same code and format)."""
    old = host_store.root()
    host_store.root(str(vb.flash_dir / "store"))
    try:
        host_store.save("cred", {"id": device_id, "password": password,
                                 "source": "provisioned", "ok": False})
    finally:
        host_store.root(old)


def rest(emu, method: str, path: str, body=None):
    r = emu.api.handle(method, path, body)
    return r.status, r.body


def wait_for(what: str, fn, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def external_mo(emu, device_id: str) -> str | None:
    st, body = rest(emu, "GET", f"/identity/externalIds/c8y_Serial/{device_id}")
    return body["managedObject"]["id"] if st == 200 else None


def measurements(emu, mo: str, mtype: str) -> list[dict]:
    out, page = [], 1
    while True:
        st, body = rest(emu, "GET", f"/measurement/measurements?source={mo}&type={mtype}"
                                    f"&pageSize=2000&currentPage={page}")
        assert st == 200, body
        out += body["measurements"]
        if len(body["measurements"]) < 2000:
            return out
        page += 1


@AGENT_BOARDS
def test_broker_restarts_lose_nothing(tmp_path: Path, board_file: str) -> None:
    from microcot_host.emulator import Emulator

    device_id = "89490200001234567801"
    with Emulator(tmp_path / "emu") as emu:
        conn = emu.connection
        password = emu.add_device(device_id)
        vb = agent_board(board_file, "t-faults-broker", tmp_path / "flash")
        t = None
        try:
            t = transport.open_board(vb.port)
            deploy.deploy_transport(t, boards.load(board_file), app=True,
                                    config=agent_settings(conn))
            provision(vb, device_id, password)
            # the agent starts on a freshly booted board, as on a device: deploy's import check
            # leaves names and fragments behind that a real boot does not have
            transport.soft_reset(t)
            out: list[bytes] = []
            done = threading.Event()
            result: dict = {}

            def board() -> None:
                try:
                    result["out"] = transport.run(t, SEQ_AGENT % {"id": device_id, "limit": 150},
                                                  timeout=170, on_output=out.append)
                except Exception as e:  # reported by the main thread
                    result["error"] = e
                finally:
                    done.set()

            runner = threading.Thread(target=board, daemon=True)
            runner.start()
            try:
                mo = wait_for("the device's managed object",
                              lambda: external_mo(emu, device_id))
                wait_for("the first measurement", lambda: measurements(emu, mo, "mc_Seq"))
            except AssertionError as exc:
                board_said = b"".join(out).decode(errors="replace")[-3000:]
                raise AssertionError(f"{exc}; the board said:\n{board_said}") from None
            rng = random.Random()
            ops: dict[str, str] = {}  # operation id -> k
            t0 = time.monotonic()

            def operation(k: str) -> None:
                ops[emu.create_operation(mo, {"c8y_Command": {"text": f"seq {k}"}})["id"]] = k

            for i in range(RESTARTS):
                time.sleep(rng.uniform(0.3, 1.5))
                k = str(i)
                during = None
                if i % 3 == 0:  # an operation created while the device is connected,
                    operation(k)
                elif i % 3 == 1:  # while the broker stops and starts (~0.2 s),
                    during = threading.Timer(rng.uniform(0.0, 0.2), operation, (k,))
                    during.start()
                emu.broker.restart()
                if during is not None:
                    during.join()
                if i % 3 == 2:  # or while the device reconnects
                    operation(k)
                assert not done.is_set(), b"".join(out).decode(errors="replace")
            restarts_took = time.monotonic() - t0
            stop = emu.create_operation(mo, {"c8y_Command": {"text": "seq stop"}})["id"]
            assert done.wait(120), "the agent did not finish"
            assert "error" not in result, (result.get("error"), b"".join(out))
            text = result["out"].decode(errors="replace")
            ran = re.search(r"RAN (.*)\r?\n", text).group(1).split()
            m = re.search(r"DONE (\w+) (\d+) (\d+) (\d+) (\d+)", text)
            assert m and m.group(1) == "True", text
            sent, dropped, connects = int(m.group(2)), int(m.group(4)), int(m.group(5))
            assert dropped == 0

            # every operation executed once on the board, and SUCCESSFUL with its result
            assert sorted(ran) == sorted([*ops.values(), "stop"]), ran
            for oid, k in [*ops.items(), (stop, "stop")]:
                op = wait_for(f"operation {oid} SUCCESSFUL", lambda oid=oid: (
                    lambda o: o if o["status"] == "SUCCESSFUL" else None)(
                        rest(emu, "GET", f"/devicecontrol/operations/{oid}")[1]), timeout=10)
                assert op["c8y_Command"]["result"] == f"ran {k}", op

            # every measurement 1..sent arrived; a duplicate (a QoS 1 re-send) is the same one
            def complete() -> list[dict] | None:
                ms = measurements(emu, mo, "mc_Seq")
                return ms if {m["mc_Seq"]["n"]["value"] for m in ms} >= set(
                    range(1, sent + 1)) else None

            ms = wait_for("all measurements", complete, timeout=15) or []
            by_n: dict[int, list[tuple]] = {}
            for x in ms:
                by_n.setdefault(x["mc_Seq"]["n"]["value"], []).append(
                    (x["time"], x["mc_Seq"]["n"].get("unit")))
            assert sorted(by_n) == list(range(1, sent + 1))
            dups = {n: v for n, v in by_n.items() if len(v) > 1}
            assert all(len(set(v)) == 1 for v in dups.values()), dups
            print(f"\n{RESTARTS} broker restarts in {restarts_took:.1f} s: {sent} measurements "
                  f"all arrived ({sum(len(v) - 1 for v in dups.values())} duplicates), "
                  f"{len(ops) + 1} operations executed once each, {connects} connects")
            # every restart cut the link; two that fall into one back-off pause are one outage
            # to the agent, so it may reconnect a little less often than the broker restarted
            assert connects >= RESTARTS * 3 // 4, connects
        finally:
            if t is not None:
                transport.close(t)
            vb.stop()


# ---- deleted credentials -----------------------------------------------------------------------


@AGENT_BOARDS
def test_deleted_credentials_rebootstrap_same_device(tmp_path: Path, board_file: str) -> None:
    from microcot_host.demo import BoardLog
    from microcot_host.emulator import Emulator

    iccid = "89490200001234567819"
    with Emulator(tmp_path / "emu", auto_accept=True) as emu:
        conn = emu.connection
        vb = agent_board(board_file, "t-faults-cred", tmp_path / "flash", iccid)
        log = None
        try:
            t = transport.open_board(vb.port)
            try:
                deploy.deploy_transport(t, boards.load(board_file), app=True,
                                        config=agent_settings(conn))
            finally:
                transport.close(t)
            log = BoardLog(vb.port)
            log.write(b"\x04")  # soft reset: main.py runs the agent, which bootstraps
            board = lambda: "\n".join(log.lines)  # noqa: E731
            mo = wait_for("the device's managed object", lambda: external_mo(emu, iccid))
            wait_for("a measurement", lambda: measurements(emu, mo, "c8y_Temperature"))
            # (passwords stay out of assertions: pytest would print their values)
            first = stored_password(vb)
            works = bool(first) and emu.api.model.check_credentials(iccid, first)
            assert works, "the board's first credentials are not the platform's"

            st, _ = rest(emu, "DELETE", f"/devicecontrol/deviceCredentials/{iccid}")
            assert st == 204
            t_deleted = time.time()
            # refused (CONNACK 4/5 with credentials that worked): deleted, bootstrapped again
            wait_for("the refusal", lambda: log.find("credentials that worked before were "
                                                     "refused"), timeout=30)
            wait_for("new credentials", lambda: (lambda p: p and p != first)(stored_password(vb)),
                     timeout=30)
            works = emu.api.model.check_credentials(iccid, stored_password(vb))
            assert works, "the board's new credentials are not the platform's\n" + board()
            # the same managed object, and new measurements on it
            before = {m["id"] for m in measurements(emu, mo, "c8y_Temperature")}
            wait_for("a measurement after the re-bootstrap", lambda: [
                m for m in measurements(emu, mo, "c8y_Temperature") if m["id"] not in before],
                timeout=30)
            assert external_mo(emu, iccid) == mo
            print(f"\nre-bootstrapped and measuring on managed object {mo} again "
                  f"{time.time() - t_deleted:.1f} s after the credentials were deleted")
            st, devs = rest(emu, "GET", "/inventory/managedObjects?fragmentType=c8y_IsDevice"
                                        "&pageSize=100")
            mine = [d["id"] for d in devs["managedObjects"]
                    if d.get("c8y_Hardware", {}).get("serialNumber") == iccid]
            assert mine == [mo], board()
            st, req = rest(emu, "GET", f"/devicecontrol/newDeviceRequests/{iccid}")
            assert st == 200 and req["status"] == "ACCEPTED"
            assert log.find("bootstrap: credentials received and stored"), board()
        finally:
            if log is not None:
                log.close()
            vb.stop()


def stored_password(vb: VirtualBoard) -> str | None:
    """The password the board has stored (read with the host-side store: same code, same
    format); never printed."""
    old = host_store.root()
    host_store.root(str(vb.flash_dir / "store"))
    try:
        c = host_store.load("cred")
    finally:
        host_store.root(old)
    return c.get("password") if isinstance(c, dict) else None
