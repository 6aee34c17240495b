"""How the emulator's SmartREST path scales over processes that share one SQLite file, without
MQTT: the part of a device message that the database serialises.

    python bench/sqlite_writers.py [--procs 1,2] [--devices 20] [--rows 300] [--lock sqlite,flock]

The parent makes a database (platform.sqlite in a temporary folder) with bench/emulator.py's
template collection and `--devices` devices (managed object, c8y_Serial external ID, bound
session). Then, for each process count P and each lock mode, P processes (spawned, each with its
own Model, Api and Engine on the file) run `--rows` messages for each of their share of the
devices (`15,<X-ID>\\n901,<mo>,<type>,<seq>`, one measurement each) exactly as the connector runs
one: `Model.atomic(outer=engine.lock)` around `Engine.process` and `Model.note_applied`.

`--render after` (the default) renders the answer after the commit, as the connector does since
Engine.process_later; `inside` renders it inside the transaction, as before.

Lock modes: `sqlite` is the model alone (BEGIN IMMEDIATE; a writer that finds the database
locked waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms between tries); `flock`
is `Model(shared=True)`, what the emulator's worker processes use: an exclusive fcntl.flock on a
file next to the database before BEGIN IMMEDIATE, dropped after COMMIT, so writers queue in the
kernel and the next one runs as soon as the lock is free.

Prints per run: rows/s over the slowest process's wall time, CPU seconds per row, and the mean
time per message from its transaction's first write (BEGIN IMMEDIATE) to COMMIT, which is the
part no other process can run at the same time: 1 / that time bounds the rows/s of any number of
processes on this file. No timing is asserted; the figures depend on the machine (`nproc`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))
sys.path.insert(0, str(HERE.parent / "firmware"))

from microcot_host.emulator.api import Api  # noqa: E402
from microcot_host.emulator.connector import message_digest  # noqa: E402
from microcot_host.emulator.engine import Engine  # noqa: E402
from microcot_host.emulator.model import Model  # noqa: E402

XID = "mcBench1"
REGISTRATION = "\n".join([
    "15," + XID,
    "10,500,GET,/devicecontrol/operations?status=PENDING&agentId=%%,,application/json,%%,"
    "UNSIGNED,",
    "10,901,POST,/measurement/measurements,application/json,application/json,%%,"
    "NOW UNSIGNED STRING NUMBER,"
    '"{""time"":""%%"",""source"":{""id"":""%%""},""type"":""%%"",'
    '""c8y_Bench"":{""v"":{""value"":%%,""unit"":""n""}}}"',
    "11,900,,$.c8y_Bench,$.type,$.c8y_Bench.v.value",
])


def setup(path: Path, devices: int) -> list[tuple[str, str]]:
    """(device user, managed object id) of `devices` ready devices."""
    with Model(path) as model:
        api = Api(model)
        engine = Engine(api)
        assert engine.process(REGISTRATION, user="dev0").startswith(b"20,")
        out = []
        for i in range(devices):
            user = f"dev{i}"
            r = api.handle("POST", "/inventory/managedObjects",
                           {"name": user, "c8y_IsDevice": {}}, user=user)
            mo = str(r.body["id"])
            api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                       {"type": "c8y_Serial", "externalId": user}, user=user)
            assert engine.process(f"15,{XID}\n901,{mo},warm,0".encode(), user=user)
            out.append((user, mo))
        return out


def child(path: str, mine: list[tuple[str, str]], rows: int, lock: str, render: str, base: int,
          ready: mp.Queue, go: mp.Event, out: mp.Queue) -> None:
    model = Model(path, shared=lock == "flock")
    api = Api(model)
    engine = Engine(api)
    for user, _ in mine:  # sessions and the collection into the caches, as a warm worker has
        engine.collection_for_device(user)
    held: list[float] = []

    begin, end = model._begin_atomic, model._end_atomic
    state = {"t": 0.0}

    def timed_begin() -> None:
        st = getattr(model._local, "atomic", None)
        first = st is not None and not st.begun
        begin()
        if first:
            state["t"] = time.perf_counter()

    def timed_end(st, commit):  # type: ignore[no-untyped-def]
        began = st.begun
        try:
            end(st, commit)
        finally:
            if began:
                held.append(time.perf_counter() - state["t"])

    model._begin_atomic = timed_begin  # type: ignore[method-assign]
    model._end_atomic = timed_end  # type: ignore[method-assign]
    ready.put(os.getpid())
    go.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    mid = base
    for seq in range(rows):
        for user, mo in mine:
            body = f"15,{XID}\n901,{mo},bench,{seq}".encode()
            mid += 1
            if render == "inside":  # as the connector did before Engine.process_later
                with model.atomic(outer=engine.lock):
                    answer = engine.process(body, user=user)
                    model.note_applied(mid, message_digest("ms/" + user, body))
            else:
                with model.atomic(outer=engine.lock):
                    later = engine.process_later(body, user=user)
                    model.note_applied(mid, message_digest("ms/" + user, body))
                answer = later()
            assert answer.startswith(b"87,"), answer
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    out.put({"wall": wall, "cpu": cpu, "n": rows * len(mine), "held": sum(held) / len(held)})
    model.close()


def run(path: Path, devs: list[tuple[str, str]], procs: int, rows: int, lock: str,
        render: str) -> dict:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    ps = []
    for k in range(procs):
        mine = devs[k::procs]
        p = ctx.Process(target=child, args=(str(path), mine, rows, lock, render,
                                            (k + 1) * 10**7, ready, go, out))
        p.start()
        ps.append(p)
    for _ in ps:
        ready.get(timeout=60)
    go.set()
    results = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(10)
    n = sum(r["n"] for r in results)
    wall = max(r["wall"] for r in results)
    return {"procs": procs, "lock": lock, "render": render, "rows": n, "rows_s": n / wall,
            "cpu_ms_row": 1000 * sum(r["cpu"] for r in results) / n,
            "held_ms": 1000 * sum(r["held"] for r in results) / len(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--lock", default="sqlite,flock")
    ap.add_argument("--render", default="after",
                    help="inside,after: the response templates inside the transaction or after "
                         "its commit (Engine.process_later, what the connector does)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    print(f"{os.cpu_count()} cores; {a.devices} devices x {a.rows} rows per run")
    print(f"{'procs':>5} {'lock':>6} {'render':>6} {'rows/s':>8} {'CPU ms/row':>11} "
          f"{'tx ms/msg':>10} {'bound rows/s':>12}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "platform.sqlite"
        devs = setup(path, a.devices)
        for procs in map(int, a.procs.split(",")):
            for lock in a.lock.split(","):
                for render in a.render.split(","):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(path) + ".writers")
                    r = run(path, devs, procs, a.rows, lock, render)
                    results.append(r)
                    print(f"{r['procs']:>5} {r['lock']:>6} {render:>6} {r['rows_s']:>8.0f} "
                          f"{r['cpu_ms_row']:>11.3f} {r['held_ms']:>10.3f} "
                          f"{1000 / r['held_ms']:>12.0f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
