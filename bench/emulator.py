"""Throughput, latency, loss and memory of the platform emulator under many MQTT devices, against
Mosquitto relaying the same rows between C clients, measured in the same run.

    python bench/emulator.py [--devices 100,1000,5000] [--rows 20] [--window 1] [--reps 3]
                             [--procs 1] [--workers 1] [--database URL] [--quick] [--json FILE]

Three kinds of phase, for each N of the list, on the same N devices (the same users, each with its
ICCID as client id, on brokers made by the same `Broker` class: same Mosquitto binary, generated
configuration, dynamic-security users and ACLs, TLS certificate), with the same rows at QoS 1:

    emulator  paho devices -> the emulator's MQTT front (TLS) -> its Mosquitto -> connector ->
              engine -> SQLite -> the answer `900,<line>,<type>,<seq>` on mr/<ID> -> Mosquitto ->
              front (TLS) -> observer
    relay-c   the peer: mosquitto_pub devices -> Mosquitto (TLS listener) -> observer
    relay-py  the emulator's own load generator on the peer: paho devices -> Mosquitto -> observer

The observer is a C client in every phase: one `mosquitto_sub` per load process (QoS 1, persistent
session, TLS to the public port like the devices), logged in as a bench user that may read the
completion topics (mr/+ on the emulator, ms/+ on the relay). A row is done when the observer has
it. bench/_mqttload.py runs both kinds of device and the observer; see its docstring.

Why this is the fair comparison
-------------------------------
"Mosquitto relaying between C clients" measures what it costs to carry a QoS 1 row over TLS from N
device connections to one consumer when only C code touches it: an upper bound for the emulator,
whose first half is that very relay (devices, TLS, Mosquitto, a consumer) and whose second half
(store, answer) comes on top. A ratio against it means something only if (1) both face the same
offered load: the same devices, rows, QoS and window of rows in flight per device; (2) the load
generator sets the pace of neither; (3) both count a row as done at the same kind of event. The
earlier version of this bench broke (2) for its relay: one Python process published every row with
paho and received every relayed copy at ~90% of a core, so the relay's figure was the generator's
and the emulator looked like 0.3-0.6x of it, while against C clients it was ~0.18x.

The emulator cannot be driven by mosquitto_pub: a SmartREST 1.0 message is two lines (`15,<X-ID>`
then the row), `mosquitto_pub -l` sends every line as a message of its own, and `-f`/`-m` with
`--repeat` send one fixed payload (rows could not be told apart, nor timed one by one). So the
emulator's devices are paho clients on one selector loop, publishing only; the receiving side is C
in every phase (3), and every phase runs the same load process: same window logic, same observer,
same points in time for the latency. (2) is checked in every run by relay-py, the emulator's own
generator driving the peer: while relay-py stays well above the emulator's rate, that generator is
not what limits the emulator, since it drives a faster system faster. The relay's row is the
emulator's with a blank for its line break, since mosquitto_pub sends lines (relay-py sends the
same bytes, so relay-c and relay-py differ in the generator only). Both generators share the
machine's cores with what they measure, and neither is free: a process per device costs the C
side wake-ups and context switches on every row, so with 5,000 devices relay-py ran faster than
relay-c here, and with 100 as fast. Both ratios are printed: emulator / relay-c is the issue's
yardstick, the smaller of the two is the stricter.

Method
------
Every device keeps at most --window rows incomplete (default 1: the next row when the previous one
is done) and sends --rows timed rows after one untimed warm-up row (which also makes the connector
fetch each device's pending operations once, as on a device's first request, and proves that a
mosquitto_pub connected). rows/s = timed rows done / (first row sent -> last row done); latency =
the row handed to the device (paho's publish(), or the line written to mosquitto_pub's stdin) ->
the observer's line for it read by the load process. For each N the phases run interleaved --reps
times (emulator, relay-c, relay-py, emulator, ...), so load from elsewhere on the machine hits all
alike; the tables give the median of the runs (rows/s also its range).

Checked in every run: emulator: every row of every device, warm-up row included, looked up through
the REST API (`GET /measurement/measurements?type=<phase type>`, all pages) for its source, type
and value (lost = not stored, dup = stored more than once, strays = stored but never sent), and
every answer counted (dup answers); relay: every row received once and byte for byte as sent. A
row not done within --row-timeout counts as timed out, one done later as late (slow, not lost).
Stepping stops after the first N where the emulator lost a row.

Memory (RSS, sampled at the end of each phase's timed rows; peak = VmHWM at the end): the
emulator's process, i.e. this bench's process, which hosts it, plus any process it starts itself
(its worker processes with --workers), against each Mosquitto. CPU is given in % of wall time of one
core, per process group, during the timed rows.

N devices need N+ file descriptors in each Mosquitto, in the front and in a load process (a socket
or a pipe per device): the soft RLIMIT_NOFILE is raised to the hard limit at start, and the brokers
and load processes inherit it. --workers N runs the emulator's SmartREST path in N worker
processes (`microcot emulator --workers`); --database URL puts its storage on PostgreSQL.

Setup, the first table: one emulator on a temporary data directory; the template collection
registered through `Emulator.engine.process` (what the first device would send); every device's
credentials with `Emulator.add_devices` (broker.py, "Adding many devices": with no device
connected it writes the users into Mosquitto's file around a restart, instead of two commands per
device whose cost grows with the fleet); the relay's users written before its Mosquitto starts
(`Broker.add_devices`); per device a managed object (`Api.handle("POST",
"/inventory/managedObjects")`) with its ICCID as `c8y_Serial` external ID, owned by the device
user. Exit status 0 whatever the figures; no timing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import pickle
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "firmware"))

from _mqttload import proc_cpu, proc_rss, raise_fd_limit  # noqa: E402

from microcot import identity  # noqa: E402
from microcot_host.emulator import Emulator  # noqa: E402
from microcot_host.emulator.broker import Broker, BrokerError, find_mosquitto  # noqa: E402
from microcot_host.emulator.model_pg import display  # noqa: E402

XID = "mcBench1"
TID = 901
REGISTRATION = "\n".join([
    "15," + XID,
    # seed 002: the collection a device uses first must have template 500 (pending operations)
    "10,500,GET,/devicecontrol/operations?status=PENDING&agentId=%%,,application/json,%%,"
    "UNSIGNED,",
    f"10,{TID},POST,/measurement/measurements,application/json,application/json,%%,"
    "NOW UNSIGNED STRING NUMBER,"
    '"{""time"":""%%"",""source"":{""id"":""%%""},""type"":""%%"",'
    '""c8y_Bench"":{""v"":{""value"":%%,""unit"":""n""}}}"',
    "11,900,,$.c8y_Bench,$.type,$.c8y_Bench.v.value",
])
KINDS = ("emulator", "relay-c", "relay-py")
DEFAULT_STEPS = (100, 1000, 5000)
QUICK_STEPS = (10, 100)
INFLIGHT = 20   # QoS 1 messages in flight per device: paho's default, given to mosquitto_pub too
OBSERVER_ROLE = "mcbench-observer"
LOG_PATTERNS = {  # Mosquitto log line fragment -> short name in the report
    "Outgoing messages are being dropped": "dropped",
    "exceeded timeout": "keepalive timeout",
    "Socket error": "socket error",
    "out of memory": "out of memory",
    "not authorised": "not authorised",
    "Denied PUBLISH": "denied publish",
}


# -- load processes -------------------------------------------------------------------------

class Worker:
    """One bench/_mqttload.py process; requests and replies are pickled dicts on its pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_mqttload.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        pickle.dump(obj, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            reply: dict[str, Any] = pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"load process {self.proc.pid} ended "
                               f"(exit {self.proc.wait()})") from None
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send({"cmd": "quit"})
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- measurement helpers ----------------------------------------------------------------------

def peak_rss(pid: int) -> int:
    """VmHWM of a process in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
    return ordered[int(k)]


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


class LogTail:
    """New lines of a log file since the last call, matched against LOG_PATTERNS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def take(self) -> tuple[Counter[str], list[str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode("utf-8", "replace")
                self.offset = f.tell()
        except OSError:
            return Counter(), []
        hits: Counter[str] = Counter()
        samples: list[str] = []
        for line in text.splitlines():
            for frag, name in LOG_PATTERNS.items():
                if frag in line:
                    hits[name] += 1
                    if len(samples) < 3:
                        samples.append(line.strip()[:160])
        return hits, samples


class Warnings(logging.Handler):
    """The emulator's own warnings and errors (connector 429s, slow requests, failures)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 3:
            self.samples.append(f"{record.name}: {record.getMessage()[:160]}")

    def take(self) -> tuple[int, list[str]]:
        n, s = self.count, self.samples
        self.count, self.samples = 0, []
        return n, s


@dataclass
class PhaseResult:
    kind: str
    n: int
    rep: int
    ok: bool = True
    connect_s: float = 0.0
    warm_s: float = 0.0
    rows: int = 0
    answered: int = 0
    rate: float = float("nan")
    p50: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    pmax: float = float("nan")
    dup: int = 0
    late: int = 0
    timed_out: int = 0
    stale: int = 0
    mismatch: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_emulator: float = float("nan")  # the emulator's process(es), % of one core
    cpu_broker: float = float("nan")    # the phase's Mosquitto
    cpu_load: float = float("nan")      # load processes with their mosquitto_pub children
    cpu_observer: float = float("nan")  # the observers (mosquitto_sub)
    rss_emulator: int = 0               # bytes, at the end of the timed rows
    rss_broker: int = 0
    rss_load: int = 0                   # PSS: the load process and its mosquitto_pubs
    stored: int = 0
    lost: int = 0
    stored_dup: int = 0
    broker_log: dict[str, int] = field(default_factory=dict)
    broker_samples: list[str] = field(default_factory=list)
    warnings: int = 0
    warning_samples: list[str] = field(default_factory=list)

    @property
    def unanswered(self) -> int:
        return self.timed_out - self.late

    @property
    def lossy(self) -> bool:
        # a row done after --row-timeout was slow, not lost: it stays out of this
        return (not self.ok or self.lost > 0 or self.unanswered > 0 or self.mismatch > 0
                or self.stored_dup > 0)


@dataclass
class Bench:
    args: argparse.Namespace
    emu: Emulator
    relay: Broker
    workers: list[Worker]
    devices: list[tuple[str, str, str]]   # (ICCID, password, managed object id)
    observers: dict[str, list[tuple[str, str]]]   # "emulator"/"relay" -> (user, password)
    warn: Warnings
    tmp: Path

    def emulator_pids(self) -> list[int]:
        """This process and any process the emulator started (not brokers, not load)."""
        others = {self.relay.pid, self.emu.broker.pid if self.emu.broker else None}
        others |= {w.proc.pid for w in self.workers}
        return [os.getpid()] + [p for p in children(os.getpid()) if p not in others]

    def phase(self, kind: str, n: int, step: int, rep: int) -> PhaseResult:
        a = self.args
        res = PhaseResult(kind, n, rep)
        on_emulator = kind == "emulator"
        broker = self.emu.broker if on_emulator else self.relay
        assert broker is not None and broker.pid is not None
        tail = LogTail(broker.log_file)
        self.warn.take()
        devs = self.devices[:n]
        mtype = f"bench-{step}-{rep}-{kind}"
        if on_emulator:
            # devices reach the emulator where real ones do: its MQTT front (TLS), not the
            # Mosquitto behind it (plain loopback, the connector's)
            c = self.emu.connection
            where = {"host": c["mqtt_host"], "port": c["mqtt_port"], "ca_cert": c["ca_cert"]}
        else:
            where = {"host": broker.host, "port": broker.port, "ca_cert": str(broker.ca_cert)}
        common = {
            "cmd": "phase", "mode": "emulator" if on_emulator else "relay",
            "publisher": "c" if kind == "relay-c" else "py", **where, "xid": XID, "tid": TID,
            "type": mtype, "single_line": not on_emulator, "rows": a.rows, "window": a.window,
            "inflight": INFLIGHT, "row_timeout": a.row_timeout, "phase_timeout": a.phase_timeout,
            "grace": 5.0, "connect_timeout": 180.0,
            "done_prefix": "mr/" if on_emulator else "ms/",
        }
        observers = self.observers["emulator" if on_emulator else "relay"]
        parts = [(w, devs[k::len(self.workers)], k) for k, w in enumerate(self.workers)]
        parts = [p for p in parts if p[1]]
        workdirs = []
        for w, share, k in parts:
            workdir = self.tmp / "load" / f"{mtype}-{k}"
            workdir.mkdir(parents=True, mode=0o700)
            workdirs.append(workdir)
            user, password = observers[k]
            w.send({**common, "devices": share, "workdir": str(workdir),
                    "observer": {"user": user, "password": password}})
        readies = [w.recv() for w, _, _ in parts]
        res.ok = all(r["ready"] for r in readies)
        res.connect_s = max(r["connect_s"] for r in readies)
        res.warm_s = max(r["warm_s"] for r in readies)
        for r in readies:
            res.errors += r["errors"]
        emu_pids = self.emulator_pids()
        em0 = sum(proc_cpu(p) for p in emu_pids)
        br0, t0 = proc_cpu(broker.pid), time.monotonic()
        for w, _, _ in parts:
            w.send({"cmd": "go" if res.ok else "abort"})
        done = [w.recv() for w, _, _ in parts]
        wall = time.monotonic() - t0
        em1, br1 = sum(proc_cpu(p) for p in emu_pids), proc_cpu(broker.pid)
        res.rss_emulator = sum(proc_rss(p) for p in self.emulator_pids())
        res.rss_broker = proc_rss(broker.pid)
        for r in done:
            res.errors += r["errors"]
        for workdir in workdirs:   # the options files hold passwords: gone with the phase
            shutil.rmtree(workdir, ignore_errors=True)
        res.rows = n * a.rows
        if res.ok:
            lat = sorted(x for r in done for x in r["lat"])
            res.answered = sum(r["answered"] for r in done)
            for key in ("dup", "late", "timed_out", "stale", "mismatch"):
                setattr(res, key, sum(r[key] for r in done))
            span = max(r["t_last"] for r in done) - min(r["t_first"] for r in done)
            res.rate = res.answered / span if span > 0 else float("nan")
            res.p50, res.p90, res.p99 = (percentile(lat, p) * 1000 for p in (50, 90, 99))
            res.pmax = lat[-1] * 1000 if lat else float("nan")
            res.cpu_broker = 100 * (br1 - br0) / wall
            res.cpu_load = 100 * sum(r["cpu"] for r in done) / wall
            res.cpu_observer = 100 * sum(r["cpu_observer"] for r in done) / wall
            res.cpu_emulator = 100 * (em1 - em0) / wall
            res.rss_load = sum(r["rss"] for r in done)
        if on_emulator:
            self._check_stored(res, mtype, devs)
        hits, res.broker_samples = tail.take()
        res.broker_log = dict(hits)
        res.warnings, res.warning_samples = self.warn.take()
        return res

    def _check_stored(self, res: PhaseResult, mtype: str, devs: list[tuple[str, str, str]]
                      ) -> None:
        connector = self.emu.connector
        assert connector is not None and self.emu.api is not None
        connector.lanes.wait_idle(10.0)   # rows still queued in the connector get stored first
        stored: Counter[tuple[str, int]] = Counter()
        page = 1
        while True:
            r = self.emu.api.handle("GET", f"/measurement/measurements?type={mtype}"
                                    f"&pageSize=2000&currentPage={page}")
            if r.status != 200 or not isinstance(r.body, dict):
                res.errors.append(f"GET measurements: {r.status} {r.reason}")
                break
            for m in r.body.get("measurements", []):
                value = m.get("c8y_Bench", {}).get("v", {}).get("value")
                stored[(m["source"]["id"], int(value))] += 1
            if "next" not in r.body or not r.body.get("measurements"):
                break
            page += 1
        # the warm-up row 0 is checked too: it went the same way
        expected = {(mo, seq) for _, _, mo in devs for seq in range(self.args.rows + 1)}
        res.stored = sum(1 for k in expected if stored[k])
        res.lost = len(expected) - res.stored
        res.stored_dup = sum(c - 1 for c in stored.values() if c > 1)
        strays = sum(c for k, c in stored.items() if k not in expected)
        if strays:
            res.errors.append(f"{strays} stored rows that were never sent")


# -- setup --------------------------------------------------------------------------------------

def iccid(i: int) -> str:
    """A Luhn-valid 20-digit ICCID per device number, as the tests make them."""
    body = "8949024%012d" % i
    return body + str(identity.luhn_check_digit(body))


def add_observers(broker: Broker, prefix: str, count: int) -> list[tuple[str, str]]:
    """Bench users that may read `<prefix>+` (the completion topics), with their user name as
    their only client id. The Broker has no public call for a user that reads every device's
    topic, on purpose: this is the bench's own, through the broker's command channel."""
    acls = [{"acltype": kind, "topic": prefix + "+", "allow": True, "priority": 0}
            for kind in ("subscribePattern", "publishClientReceive")]
    users = [(f"mcbench-obs-{k}", secrets.token_urlsafe(15)) for k in range(count)]
    commands: list[dict[str, Any]] = [{"command": "createRole", "rolename": OBSERVER_ROLE,
                                       "acls": acls}]
    commands += [{"command": "createClient", "username": u, "password": p, "clientid": u,
                  "roles": [{"rolename": OBSERVER_ROLE, "priority": 10}]} for u, p in users]
    for answer in broker._commands(commands):
        if answer.get("error"):
            raise SystemExit(f"observer user: {answer.get('command')}: {answer['error']}")
    return users


def setup_devices(emu: Emulator, relay: Broker, n: int) -> tuple[list[tuple[str, str, str]],
                                                                   dict[str, float]]:
    assert emu.api is not None and emu.engine is not None
    times: dict[str, float] = {}
    t0 = time.monotonic()
    answer = emu.engine.process(REGISTRATION, user=iccid(0)).decode()
    if not answer.startswith("20,"):
        raise SystemExit(f"template registration refused: {answer}")
    times["templates registered (engine)"] = time.monotonic() - t0
    creds = [(iccid(i), secrets.token_urlsafe(15)) for i in range(n)]
    t0 = time.monotonic()
    relay.add_devices(creds)   # still stopped: written into its file
    relay.start()
    took = time.monotonic() - t0
    times[f"relay: {n} device users written, Mosquitto started"] = took
    t0 = time.monotonic()
    emu.add_devices(creds)
    took = time.monotonic() - t0
    times[f"emulator: {n} devices' credentials (add_devices, {1000 * took / n:.2f} ms each)"] = took
    t0 = time.monotonic()
    devices = []
    for dev, password in creds:
        r = emu.api.handle("POST", "/inventory/managedObjects",
                           {"name": f"bench {dev}", "type": "c8y_MQTTDevice",
                            "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}, user=dev)
        if r.status != 201 or not isinstance(r.body, dict):
            raise SystemExit(f"creating the managed object of {dev} failed: {r.status}")
        mo = str(r.body["id"])
        r = emu.api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                           {"type": "c8y_Serial", "externalId": dev}, user=dev)
        if r.status != 201:
            raise SystemExit(f"registering the external ID of {dev} failed: {r.status}")
        devices.append((dev, password, mo))
    times[f"emulator: managed objects + external IDs, {n} devices (REST API)"] = \
        time.monotonic() - t0
    return devices, times


def emulator_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for Emulator from --workers and --database."""
    out: dict[str, Any] = {"worker_processes": args.workers}
    if args.database:
        if "database_url" not in inspect.signature(Emulator).parameters:
            raise SystemExit("--database: PostgreSQL storage is not in this emulator yet")
        out["database_url"] = args.database
    return out


# -- report -------------------------------------------------------------------------------------

def _f(x: float, spec: str) -> str:
    if x != x:  # nan: not measured
        return format("-", ">" + spec.split(".")[0])
    return format(x, spec)


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.3f}" if a / b < 0.1 else f"{a / b:.2f}"


def _mb(x: float) -> str:
    return _f(x / 2**20 if x == x else x, "7.0f")


@dataclass
class Step:
    """The runs of one N: every rep of every kind."""
    n: int
    runs: dict[str, list[PhaseResult]] = field(default_factory=dict)

    def med(self, kind: str, attr: str) -> float:
        return median([float(getattr(r, attr)) for r in self.runs.get(kind, [])])

    def span(self, kind: str, attr: str) -> tuple[float, float]:
        xs = [float(getattr(r, attr)) for r in self.runs.get(kind, [])]
        xs = [x for x in xs if x == x]
        return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))

    def total(self, kind: str, attr: str) -> int:
        return sum(int(getattr(r, attr)) for r in self.runs.get(kind, []))

    @property
    def lossy(self) -> bool:
        return any(r.lossy for r in self.runs.get("emulator", []))


def print_report(args: argparse.Namespace, setup: dict[str, float], steps: list[Step],
                 peaks: dict[str, int], total_s: float) -> None:
    kinds = args.kinds
    print()
    print(f"emulator benchmark: rows per device {args.rows}, window {args.window} "
          f"({'unlimited' if not args.window else 'rows incomplete per device'}), "
          f"{args.reps} interleaved runs per N (median), load processes {args.procs}, "
          f"emulator worker processes {args.workers}, storage "
          f"{'PostgreSQL' if args.database else 'SQLite'}, {os.cpu_count()} CPUs, {_versions()}")
    # other work on the machine shows up in every figure: say how busy it was
    print(f"machine load average (1 min) at start {args.loadavg_start:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'Setup':<74}seconds")
    for k, v in setup.items():
        print(f"  {k:<72}{v:7.2f}")
    print()
    print("Throughput (rows/s, median and range of the runs) and latency (ms, medians), QoS 1, TLS")
    head = f"{'N':>5} {'rows':>6} |"
    for k in kinds:
        head += f" {k + ' rows/s':>22} {'p50':>7} {'p99':>7} |"
    head += f" {'emulator/relay-c':>16} {'emulator/relay-py':>17}"
    print(head)
    print("-" * len(head))
    for s in steps:
        line = f"{s.n:>5} {s.n * args.rows:>6} |"
        for k in kinds:
            lo, hi = s.span(k, "rate")
            rng = f"({_f(lo, '.0f')}-{_f(hi, '.0f')})"
            line += (f" {_f(s.med(k, 'rate'), '8.0f')} {rng:>13} {_f(s.med(k, 'p50'), '7.1f')} "
                     f"{_f(s.med(k, 'p99'), '7.1f')} |")
        line += (f" {_ratio(s.med('emulator', 'rate'), s.med('relay-c', 'rate')):>16} "
                 f"{_ratio(s.med('emulator', 'rate'), s.med('relay-py', 'rate')):>17}")
        print(line)
    print()
    print("Rows checked, all runs of each N together (emulator: every row incl. the warm-up row "
          "looked up through the REST API; relay: every row received byte for byte)")
    head = (f"{'N':>5} {'expected':>8} {'stored':>8} {'lost':>5} {'dup':>4} {'dup ans':>7} "
            f"{'timeout':>7} {'late':>5} {'errors':>6} |")
    for k in kinds[1:]:
        head += f" {k + ' lost':>13} {'mismatch':>8} |"
    print(head)
    print("-" * len(head))
    for s in steps:
        runs = s.runs.get("emulator", [])
        line = (f"{s.n:>5} {len(runs) * s.n * (args.rows + 1):>8} "
                f"{s.total('emulator', 'stored'):>8} "
                f"{s.total('emulator', 'lost'):>5} {s.total('emulator', 'stored_dup'):>4} "
                f"{s.total('emulator', 'dup'):>7} {s.total('emulator', 'timed_out'):>7} "
                f"{s.total('emulator', 'late'):>5} "
                f"{sum(len(r.errors) for r in runs):>6} |")
        for k in kinds[1:]:
            lost = sum(r.unanswered + (0 if r.ok else r.rows) for r in s.runs.get(k, []))
            line += f" {lost:>13} {s.total(k, 'mismatch'):>8} |"
        print(line)
    print()
    print("CPU (% of one core, during the timed rows) and memory (RSS in MB at the end of the "
          "timed rows), medians")
    head = (f"{'N':>5} | {'emulator':>8} {'its mosq':>8} {'load':>5} {'obs':>4} | "
            f"{'relay-c mosq':>12} {'load':>5} {'obs':>4} | {'relay-py mosq':>13} {'load':>5} | "
            f"{'RSS emulator':>12} {'its mosq':>8} {'relay mosq':>10} {'load c':>7} "
            f"{'load py':>7}")  # load: PSS
    print(head)
    print("-" * len(head))
    for s in steps:
        print(f"{s.n:>5} | {_f(s.med('emulator', 'cpu_emulator'), '8.0f')} "
              f"{_f(s.med('emulator', 'cpu_broker'), '8.0f')} "
              f"{_f(s.med('emulator', 'cpu_load'), '5.0f')} "
              f"{_f(s.med('emulator', 'cpu_observer'), '4.0f')} | "
              f"{_f(s.med('relay-c', 'cpu_broker'), '12.0f')} "
              f"{_f(s.med('relay-c', 'cpu_load'), '5.0f')} "
              f"{_f(s.med('relay-c', 'cpu_observer'), '4.0f')} | "
              f"{_f(s.med('relay-py', 'cpu_broker'), '13.0f')} "
              f"{_f(s.med('relay-py', 'cpu_load'), '5.0f')} | "
              f"{_mb(s.med('emulator', 'rss_emulator')):>12} "
              f"{_mb(s.med('emulator', 'rss_broker')):>8} "
              f"{_mb(median([s.med(k, 'rss_broker') for k in ('relay-c', 'relay-py')])):>10} "
              f"{_mb(s.med('relay-c', 'rss_load')):>7} {_mb(s.med('relay-py', 'rss_load')):>7}")
    print("  emulator: its process (this bench's, which hosts it: connector, engine, SQLite, "
          "front, REST);\n  load: the load process with its mosquitto_pub children (relay-c) or "
          "its paho devices (py), its\n  memory as PSS (shared pages split between processes); "
          "obs: the observers (mosquitto_sub);\n  100 = one core of "
          f"{os.cpu_count()}. Peak RSS (VmHWM) at the end: emulator process "
          f"{peaks['emulator'] / 2**20:.0f} MB, its Mosquitto "
          f"{peaks['emulator_broker'] / 2**20:.0f} MB, relay Mosquitto "
          f"{peaks['relay_broker'] / 2**20:.0f} MB")
    notes = []
    for s in steps:
        for k in kinds:
            for ph in s.runs.get(k, []):
                where = f"N={ph.n} {ph.kind} run {ph.rep + 1}"
                if ph.errors:
                    notes.append(f"{where}: {len(ph.errors)} error(s), e.g. "
                                 + "; ".join(ph.errors[:3]))
                if ph.broker_log:
                    notes.append(f"{where}: Mosquitto log " + ", ".join(
                        f"{k2} x{v}" for k2, v in ph.broker_log.items())
                        + (": " + " | ".join(ph.broker_samples) if ph.broker_samples else ""))
                if ph.warnings:
                    notes.append(f"{where}: {ph.warnings} emulator warning(s), e.g. "
                                 + " | ".join(ph.warning_samples))
                if ph.stale:
                    notes.append(f"{where}: {ph.stale} late completion(s) of an earlier run")
    if notes:
        print()
        print("Notes")
        for note in notes:
            print("  " + note)
    print()
    clean = [s for s in steps if not s.lossy]
    lossy = next((s for s in steps if s.lossy), None)
    print(f"largest N with no row lost by the emulator: {clean[-1].n if clean else 'none'} "
          f"(N run: {', '.join(str(s.n) for s in steps)}; asked: "
          f"{', '.join(map(str, args.steps))})")
    if lossy is not None:
        runs = lossy.runs["emulator"]
        print(f"first N with loss: {lossy.n} (lost {sum(r.lost for r in runs)}, never answered "
              f"{sum(r.unanswered for r in runs)}, stored twice {sum(r.stored_dup for r in runs)}"
              f", runs not ready {sum(not r.ok for r in runs)})")
    for s in steps:
        e = s.med("emulator", "rate")
        if "relay-c" in kinds:
            print(f"N={s.n}: emulator / Mosquitto relaying between C clients = "
                  f"{_ratio(e, s.med('relay-c', 'rate'))} (rows/s), "
                  f"{_ratio(s.med('emulator', 'p50'), s.med('relay-c', 'p50'))} (p50 latency), "
                  f"{_ratio(s.med('emulator', 'p99'), s.med('relay-c', 'p99'))} (p99 latency)"
                  f"{'' if not s.lossy else ', with loss'}")
        if "relay-py" in kinds:
            print(f"N={s.n}: emulator / Mosquitto relaying from the emulator's own load generator "
                  f"= {_ratio(e, s.med('relay-py', 'rate'))} (rows/s)")
    print(f"total run time {total_s:.0f} s")


def _versions() -> str:
    import paho.mqtt
    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True,
                             timeout=5).stdout
        mosq = out.splitlines()[0] if out else "mosquitto ?"
    except (OSError, subprocess.TimeoutExpired):
        mosq = "mosquitto ?"
    return f"{mosq}, paho-mqtt {paho.mqtt.__version__}"


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", help="comma list of N to step through "
                   f"(default {','.join(map(str, DEFAULT_STEPS))})")
    p.add_argument("--max-devices", type=int, default=5000, help="cap on N (default 5000)")
    p.add_argument("--rows", type=int, default=None,
                   help="timed rows per device and run (default 20, --quick 10)")
    p.add_argument("--window", type=int, default=1,
                   help="rows a device may have incomplete (default 1; 0 = all at once)")
    p.add_argument("--reps", type=int, default=3,
                   help="interleaved runs of each kind per N; the median is reported (default 3)")
    p.add_argument("--procs", type=int, default=1, help="load processes (default 1)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"phases to run, a comma list of {', '.join(KINDS)} (default all)")
    p.add_argument("--workers", type=int, default=1,
                   help="emulator worker processes (default 1)")
    p.add_argument("--database", help="PostgreSQL URL for the emulator's storage "
                   "(bench/emulator_pg.py runs this on a throwaway server)")
    p.add_argument("--row-timeout", type=float, default=30.0,
                   help="seconds after which an incomplete row counts as timed out")
    p.add_argument("--phase-timeout", type=float, default=600.0,
                   help="cap in seconds on the timed rows of one run")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: N = {','.join(map(str, QUICK_STEPS))}, 10 rows "
                   "(under a minute)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    a = p.parse_args(argv)
    if a.devices:
        steps = sorted({int(x) for x in a.devices.split(",") if x.strip()})
    else:
        steps = list(QUICK_STEPS if a.quick else DEFAULT_STEPS)
    a.steps = [n for n in steps if 0 < n <= a.max_devices]
    if not a.steps:
        p.error("no N left between 1 and --max-devices")
    a.kinds = [k for k in KINDS if k in {x.strip() for x in a.kinds.split(",")}]
    if "emulator" not in a.kinds:
        p.error("--kinds must include emulator")
    if a.rows is None:
        a.rows = 10 if a.quick else 20
    if a.rows < 1 or a.window < 0 or a.procs < 1 or a.reps < 1 or a.workers < 1:
        p.error("--rows, --reps, --procs and --workers must be at least 1, --window at least 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = emulator_options(args)
    if "relay-c" in args.kinds and not (shutil.which("mosquitto_pub")
                                        and shutil.which("mosquitto_sub")):
        raise SystemExit("mosquitto_pub/mosquitto_sub not found: install Debian's "
                         "mosquitto-clients (tools/setup-system.sh does)")
    if not shutil.which("mosquitto_sub"):
        raise SystemExit("mosquitto_sub not found: install Debian's mosquitto-clients")
    args.loadavg_start = os.getloadavg()[0]
    raise_fd_limit()   # before the brokers start: they inherit it
    t_start = time.monotonic()
    warn = Warnings()
    logging.getLogger("microcot_host").addHandler(warn)
    logging.getLogger("microcot_host").setLevel(logging.WARNING)
    n_max = max(args.steps)
    setup: dict[str, float] = {}
    steps: list[Step] = []
    peaks = {"emulator": 0, "emulator_broker": 0, "relay_broker": 0}
    with tempfile.TemporaryDirectory(prefix="microcot-bench-") as tmp:
        t0 = time.monotonic()
        with Emulator(Path(tmp) / "emulator", **options) as emu:
            setup["emulator started (Mosquitto, model, REST, front, connector)"] = \
                time.monotonic() - t0
            relay = Broker(Path(tmp) / "relay")
            workers: list[Worker] = []
            try:
                devices, times = setup_devices(emu, relay, n_max)
                setup.update(times)
                assert emu.broker is not None
                t0 = time.monotonic()
                observers = {"emulator": add_observers(emu.broker, "mr/", args.procs),
                             "relay": add_observers(relay, "ms/", args.procs)}
                workers = [Worker() for _ in range(args.procs)]
                setup[f"observer users, {args.procs} load process(es) started"] = \
                    time.monotonic() - t0
                bench = Bench(args, emu, relay, workers, devices, observers, warn, Path(tmp))
                for step_no, n in enumerate(args.steps, 1):
                    step = Step(n)
                    try:
                        for rep in range(args.reps):
                            for kind in args.kinds:
                                r = bench.phase(kind, n, step_no, rep)
                                step.runs.setdefault(kind, []).append(r)
                                print(f"N={n} run {rep + 1} {kind}: {_f(r.rate, '.0f')} rows/s, "
                                      f"p50 {_f(r.p50, '.1f')} ms, p99 {_f(r.p99, '.1f')} ms, "
                                      f"lost {r.lost + r.unanswered}, errors {len(r.errors)}",
                                      file=sys.stderr, flush=True)
                    except RuntimeError as exc:   # a load process died: report what we have
                        print(f"N={n}: {exc}", file=sys.stderr)
                        steps.append(step)
                        break
                    steps.append(step)
                    if step.lossy:
                        break
                peaks = {"emulator": sum(peak_rss(p) for p in bench.emulator_pids()),
                         "emulator_broker": peak_rss(emu.broker.pid or 0),
                         "relay_broker": peak_rss(relay.pid or 0)}
            except BrokerError as exc:
                raise SystemExit(f"broker: {exc}") from None
            finally:
                for w in workers:
                    w.close()
                relay.stop()
    print_report(args, setup, steps, peaks, time.monotonic() - t_start)
    if args.json:
        args.json.write_text(json.dumps({
            # the database URL without its password
            "args": {k: (display(v) if k == "database" and v else v)
                     for k, v in vars(args).items() if k != "json"},
            "setup_s": setup, "peak_rss": peaks,
            "steps": [{"n": s.n, "runs": {k: [r.__dict__ for r in v] for k, v in s.runs.items()}}
                      for s in steps]}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
