"""Throughput, latency and loss of the platform emulator under many MQTT devices, against
Mosquitto's own QoS 1 relay measured in the same run.

    python bench/emulator.py [--devices 1,10,50] [--rows 20] [--window 1] [--max-devices 1000]
                             [--procs 1] [--quick] [--json FILE]

For each N of the list (default 1, 10, 50, 100, 250, 500, 1000, capped by --max-devices):

1. emulator: N paho devices (MQTT 3.1.1, TLS verified against the emulator's CA, clean_session
   False, QoS 1) publish `15,<X-ID>\\n901,<mo>,<type>,<seq>` on ms/<ID>. Template 901 posts a
   measurement (`NOW UNSIGNED STRING NUMBER`: time from the platform, source, type, value);
   response template 900 answers `900,<line>,<type>,<value>` on mr/<ID>, which the connector
   publishes only after the engine has stored the measurement. Latency = publish() called ->
   that answer received by the device. rows/s = timed rows / (first publish -> last answer).
   Afterwards every row is looked up through the REST API (`GET /measurement/measurements?
   type=<step type>`, all pages): lost = sent but not stored, dup = stored more than once. A
   step has loss when a row was not stored, a row was never answered, or a device could not
   connect; a row answered after --row-timeout is counted as late, not lost.
2. relay: the same N device users on a second Mosquitto started by the same `Broker` class (same
   binary, same generated configuration, same TLS, same dynamic-security users and ACLs) with
   no connector; the same payloads on ms/<ID> go to one subscriber per load process, logged in as
   the connector user with clean_session False and QoS 1 like the connector. Latency = publish
   -> the subscriber receives it (one broker hop, where the emulator's path is device -> broker
   -> connector -> engine -> SQLite -> connector -> broker -> device).

Both phases use the same load pattern: every device keeps at most --window rows unanswered (1:
publish the next row when the previous one is answered; 0: all rows at once) and sends --rows
timed rows after one untimed warm-up row (which also makes the connector fetch each device's
pending operations once, as on a device's first request). A row unanswered for --row-timeout
seconds counts as timed out and its device goes on. Stepping stops after the first N with
loss. Mosquitto's log lines about dropped messages, socket errors and timeouts, and the
emulator's own warnings, are reported per step.

Setup, reported in the first table: one emulator on a temporary data directory, the template
collection registered through `Emulator.engine.process` (what the first device would send), each
device given broker credentials with `Emulator.add_device` (Mosquitto's dynamic-security plugin,
which saves its whole user file after every change, so this grows with the number of devices), and a
managed object created with `Api.handle("POST", "/inventory/managedObjects")` plus its ICCID as
`c8y_Serial` external ID, owned by the device user (what seed 002's self-creation ends with).

Load generation: --procs worker processes (bench/_mqttload.py), each driving its share of the
devices on one selector loop with paho's manual network calls, so no thread per client. The
machine has 2 cores that the emulator (one Python process: connector, engine, SQLite), Mosquitto
and the load processes share: CPU % of wall time of each is printed so one can see which of them
limited a step. Exit status 0 whatever the figures; no timing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "firmware"))

from microcot import identity  # noqa: E402
from microcot_host.emulator import Emulator  # noqa: E402
from microcot_host.emulator.broker import Broker, find_mosquitto  # noqa: E402

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
DEFAULT_STEPS = (1, 10, 50, 100, 250, 500, 1000)
QUICK_STEPS = (1, 10, 50)
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

def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
    return ordered[int(k)]


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
    mode: str
    n: int
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
    errors: list[str] = field(default_factory=list)
    cpu_py: float = float("nan")      # emulator process, % of wall time
    cpu_broker: float = float("nan")  # Mosquitto, % of wall time
    cpu_load: float = float("nan")    # all load processes, % of wall time
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
        # a row answered after --row-timeout was slow, not lost: it stays out of this
        return not self.ok or self.lost > 0 or self.unanswered > 0


@dataclass
class Bench:
    args: argparse.Namespace
    emu: Emulator
    relay: Broker
    workers: list[Worker]
    devices: list[tuple[str, str, str]]   # (ICCID, password, managed object id)
    warn: Warnings

    def _emu_cpu(self) -> float:
        """CPU seconds of the emulator: this process and its worker processes (--workers)."""
        pool = self.emu.pool
        return self_cpu() + (sum(proc_cpu(p) for p in pool.pids()) if pool else 0.0)

    def phase(self, mode: str, n: int, step: int) -> PhaseResult:
        a = self.args
        res = PhaseResult(mode, n)
        broker = self.emu.broker if mode == "emulator" else self.relay
        assert broker is not None
        tail = LogTail(broker.log_file)
        self.warn.take()
        devs = self.devices[:n]
        mtype = f"bench-{step}" + ("" if mode == "emulator" else "r")
        if mode == "emulator":
            # devices reach the emulator where real ones do: its MQTT front (TLS), not the
            # Mosquitto behind it (plain loopback, the connector's)
            c = self.emu.connection
            where = {"host": c["mqtt_host"], "port": c["mqtt_port"], "ca_cert": c["ca_cert"]}
        else:
            where = {"host": broker.host, "port": broker.port, "ca_cert": str(broker.ca_cert)}
        common = {
            "cmd": "phase", "mode": mode, **where, "xid": XID, "tid": TID, "type": mtype,
            "rows": a.rows, "window": a.window, "row_timeout": a.row_timeout,
            "phase_timeout": a.phase_timeout, "grace": 5.0, "connect_timeout": 120.0,
        }
        cred = broker.connector_credentials()
        parts = [(w, devs[k::len(self.workers)], k) for k, w in enumerate(self.workers)]
        parts = [p for p in parts if p[1]]
        for w, share, k in parts:
            w.send({**common, "devices": share,
                    "subscriber": (cred.user, cred.password), "subscriber_id": f"bench-relay-{k}"})
        readies = [w.recv() for w, _, _ in parts]
        res.ok = all(r["ready"] for r in readies)
        res.connect_s = max(r["connect_s"] for r in readies)
        res.warm_s = max(r["warm_s"] for r in readies)
        for r in readies:
            res.errors += r["errors"]
        py0, br0, t0 = self._emu_cpu(), proc_cpu(broker.pid), time.monotonic()
        main0 = self_cpu()
        for w, _, _ in parts:
            w.send({"cmd": "go" if res.ok else "abort"})
        done = [w.recv() for w, _, _ in parts]
        wall = time.monotonic() - t0
        py1, br1 = self._emu_cpu(), proc_cpu(broker.pid)
        if mode == "emulator" and self.emu.pool is not None:
            main = 100 * (self_cpu() - main0) / wall
            print(f"N={n}: CPU % of wall: main process (front, REST, bootstrap) {main:.0f}, "
                  f"worker processes {100 * (py1 - py0) / wall - main:.0f}", file=sys.stderr)
        for r in done:
            res.errors += r["errors"]
        res.rows = n * a.rows
        if res.ok:
            lat = sorted(x for r in done for x in r["lat"])
            res.answered = sum(r["answered"] for r in done)
            for key in ("dup", "late", "timed_out", "stale"):
                setattr(res, key, sum(r[key] for r in done))
            span = max(r["t_last"] for r in done) - min(r["t_first"] for r in done)
            res.rate = res.answered / span if span > 0 else float("nan")
            res.p50, res.p90, res.p99 = (percentile(lat, p) * 1000 for p in (50, 90, 99))
            res.pmax = lat[-1] * 1000 if lat else float("nan")
            res.cpu_broker = 100 * (br1 - br0) / wall
            res.cpu_load = 100 * sum(r["cpu"] for r in done) / wall
            if mode == "emulator":
                res.cpu_py = 100 * (py1 - py0) / wall
        if mode == "emulator":
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
    relay_s: list[float] = []

    def relay_users() -> None:
        t = time.monotonic()
        for dev, password in creds:
            relay.add_device(dev, password)
        relay_s.append(time.monotonic() - t)

    # the two Mosquittos are separate processes: fill them at the same time
    th = threading.Thread(target=relay_users, name="relay-users")
    th.start()
    t0 = time.monotonic()
    for dev, password in creds:
        emu.add_device(dev, password)
    took = time.monotonic() - t0
    times[f"emulator credentials, {n} devices (add_device, {1000 * took / n:.0f} ms each)"] = took
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
    times[f"managed objects + external IDs, {n} devices (REST API)"] = time.monotonic() - t0
    th.join()
    took = relay_s[0] if relay_s else float("nan")
    times[f"relay broker users, {n} devices (meanwhile, {1000 * took / n:.0f} ms each)"] = took
    return devices, times


# -- report -------------------------------------------------------------------------------------

def _f(x: float, spec: str) -> str:
    if x != x:  # nan: not measured
        return format("-", ">" + spec.split(".")[0])
    return format(x, spec)


def _lat(ph: PhaseResult) -> str:
    return "".join(" " + _f(x, "7.1f") for x in (ph.p50, ph.p90, ph.p99, ph.pmax))


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.3f}" if a / b < 0.1 else f"{a / b:.2f}"


def print_report(args: argparse.Namespace, setup: dict[str, float],
                 results: list[tuple[PhaseResult, PhaseResult | None]], steps: list[int],
                 total_s: float) -> None:
    print()
    print(f"emulator benchmark: rows per device {args.rows}, window {args.window} "
          f"({'unlimited' if not args.window else 'rows unanswered per device'}), "
          f"load processes {args.procs}, {os.cpu_count()} CPUs, {_versions()}")
    # other work on the machine shows up in every figure: say how busy it was
    print(f"machine load average (1 min) at start {args.loadavg_start:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'Setup':<68}seconds")
    for k, v in setup.items():
        print(f"  {k:<66}{v:7.2f}")
    print()
    print("Throughput and end-to-end latency (ms), QoS 1, TLS; relay = the same payloads through "
          "a plain Mosquitto")
    lat = "".join(f" {x:>7}" for x in ("p50", "p90", "p99", "max"))
    head = (f"{'N':>5} {'rows':>6} | {'emulator rows/s':>15}{lat} | {'relay rows/s':>12}{lat} | "
            f"{'emulator / relay: rows/s':>24} {'p50':>6} {'p99':>6}")
    print(head)
    print("-" * len(head))
    for e, r in results:
        rr = r or PhaseResult("relay", e.n)
        print(f"{e.n:>5} {e.rows:>6} | {_f(e.rate, '15.0f')}{_lat(e)} | {_f(rr.rate, '12.0f')}"
              f"{_lat(rr)} | {_ratio(e.rate, rr.rate):>24} {_ratio(e.p50, rr.p50):>6} "
              f"{_ratio(e.p99, rr.p99):>6}")
    print()
    print("Rows stored (REST API check of every row incl. the warm-up row) and CPU in % of wall "
          "time during the timed rows")
    head = (f"{'N':>5} {'connect s':>9} {'expected':>8} {'stored':>7} {'lost':>5} {'dup':>4} "
            f"{'dup ans':>7} {'timeout':>7} {'late':>5} {'errors':>6} | {'emulator py':>11} "
            f"{'mosquitto':>9} "
            f"{'load':>5} | {'relay: mosquitto':>16} {'load':>5}")
    print(head)
    print("-" * len(head))
    for e, r in results:
        rr = r or PhaseResult("relay", e.n)
        expected = e.n * (args.rows + 1)
        print(f"{e.n:>5} {e.connect_s:9.1f} {expected:>8} {e.stored:>7} {e.lost:>5} "
              f"{e.stored_dup:>4} {e.dup:>7} {e.timed_out:>7} {e.late:>5} {len(e.errors):>6} | "
              f"{_f(e.cpu_py, '11.0f')} {_f(e.cpu_broker, '9.0f')} {_f(e.cpu_load, '5.0f')} | "
              f"{_f(rr.cpu_broker, '16.0f')} {_f(rr.cpu_load, '5.0f')}")
    print("  connect s: the slowest load process connecting and subscribing its devices (TLS)\n"
          "  dup: rows stored more than once; dup ans: answers received twice\n"
          f"  timeout: rows unanswered after --row-timeout ({args.row_timeout:g} s); late: "
          "answered after that (slow, not lost)\n"
          f"  CPU: 100 = one core of {os.cpu_count()}; a load figure near 100 x load processes "
          "means the Python load\n  generator, not the broker, set the pace (the relay's case)")
    notes = []
    for e, r in results:
        for ph in (e, r):
            if ph is None:
                continue
            if ph.errors:
                notes.append(f"N={ph.n} {ph.mode}: {len(ph.errors)} error(s), e.g. "
                             + "; ".join(ph.errors[:3]))
            if ph.broker_log:
                notes.append(f"N={ph.n} {ph.mode}: Mosquitto log "
                             + ", ".join(f"{k} x{v}" for k, v in ph.broker_log.items())
                             + (": " + " | ".join(ph.broker_samples) if ph.broker_samples else ""))
            if ph.warnings:
                notes.append(f"N={ph.n} {ph.mode}: {ph.warnings} emulator warning(s), e.g. "
                             + " | ".join(ph.warning_samples))
            if ph.stale:
                notes.append(f"N={ph.n} {ph.mode}: {ph.stale} late answer(s) of an earlier step")
    if notes:
        print()
        print("Notes")
        for n in notes:
            print("  " + n)
    print()
    # stepping stops at the first lossy N, so every earlier step was clean
    lossy = next((e for e, _ in results if e.lossy), None)
    clean = [(e, r) for e, r in results if not e.lossy]
    print(f"largest N with no row lost: {clean[-1][0].n if clean else 'none'} "
          f"(steps run: {', '.join(str(e.n) for e, _ in results)}; asked: "
          f"{', '.join(map(str, steps))})")
    if lossy is not None:
        why = []
        if not lossy.ok:
            why.append("not every device connected and got its warm-up row answered")
        if lossy.lost:
            why.append(f"{lossy.lost} rows not stored")
        if lossy.unanswered:
            why.append(f"{lossy.unanswered} rows never answered ({lossy.timed_out} after "
                       f"{args.row_timeout:g} s, {lossy.late} of them later)")
        why += [f"Mosquitto: {k} x{v}" for k, v in lossy.broker_log.items()]
        why += lossy.errors[:2]
        print(f"first N with loss: {lossy.n} ({'; '.join(why)})")
    else:
        print("first N with loss: none")
    headline = clean[-1] if clean else (results[-1] if results else None)
    if headline is not None and headline[1] is not None:
        e, r = headline
        print(f"emulator / mosquitto relay = {_ratio(e.rate, r.rate)} (rows/s), "
              f"{_ratio(e.p50, r.p50)} (p50 latency), {_ratio(e.p99, r.p99)} (p99 latency) "
              f"at N={e.n}")
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
    p.add_argument("--max-devices", type=int, default=1000,
                   help="cap on N (default 1000)")
    p.add_argument("--rows", type=int, default=None,
                   help="timed rows per device and step (default 20, --quick 10)")
    p.add_argument("--window", type=int, default=1,
                   help="rows a device may have unanswered (default 1; 0 = all at once)")
    # one: with --window 1 a second process did not raise the relay's figure on 2 cores (the
    # processes and Mosquitto then wait for each other's time slices); it helps --window 0
    p.add_argument("--procs", type=int, default=1,
                   help="load-generator processes (default 1)")
    p.add_argument("--row-timeout", type=float, default=30.0,
                   help="seconds after which an unanswered row counts as timed out")
    p.add_argument("--phase-timeout", type=float, default=600.0,
                   help="cap in seconds on the timed rows of one phase")
    p.add_argument("--no-relay", action="store_true", help="skip the Mosquitto relay phases")
    p.add_argument("--workers", type=int, default=1,
                   help="the emulator's connector processes (--workers of `microcot emulator`;"
                        " their CPU counts as the emulator's)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: N = {','.join(map(str, QUICK_STEPS))}, 10 rows (< 30 s)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    a = p.parse_args(argv)
    if a.devices:
        steps = sorted({int(x) for x in a.devices.split(",") if x.strip()})
    else:
        steps = list(QUICK_STEPS if a.quick else DEFAULT_STEPS)
    a.steps = [n for n in steps if 0 < n <= a.max_devices]
    if not a.steps:
        p.error("no N left between 1 and --max-devices")
    if a.rows is None:
        a.rows = 10 if a.quick else 20
    if a.rows < 1 or a.window < 0 or a.procs < 1:
        p.error("--rows and --procs must be at least 1, --window at least 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg_start = os.getloadavg()[0]
    t_start = time.monotonic()
    warn = Warnings()
    logging.getLogger("microcot_host").addHandler(warn)
    logging.getLogger("microcot_host").setLevel(logging.WARNING)
    n_max = max(args.steps)
    setup: dict[str, float] = {}
    results: list[tuple[PhaseResult, PhaseResult | None]] = []
    with tempfile.TemporaryDirectory(prefix="microcot-bench-") as tmp:
        t0 = time.monotonic()
        with Emulator(Path(tmp) / "emulator", worker_processes=args.workers) as emu:
            setup["emulator started (Mosquitto, model, REST, connector)"] = time.monotonic() - t0
            t0 = time.monotonic()
            relay = Broker(Path(tmp) / "relay")
            relay.start()
            setup["relay Mosquitto started"] = time.monotonic() - t0
            workers: list[Worker] = []
            try:
                devices, times = setup_devices(emu, relay, n_max)
                setup.update(times)
                t0 = time.monotonic()
                workers = [Worker() for _ in range(args.procs)]
                setup[f"{args.procs} load process(es) started"] = time.monotonic() - t0
                bench = Bench(args, emu, relay, workers, devices, warn)
                for step, n in enumerate(args.steps, 1):
                    try:
                        e = bench.phase("emulator", n, step)
                        r = None if args.no_relay else bench.phase("relay", n, step)
                    except RuntimeError as exc:   # a load process died: report what we have
                        print(f"N={n}: {exc}", file=sys.stderr)
                        break
                    results.append((e, r))
                    print(f"N={n}: emulator {_f(e.rate, '.0f')} rows/s p50 {_f(e.p50, '.1f')} ms"
                          f", relay {_f(r.rate if r else float('nan'), '.0f')} rows/s, "
                          f"lost {e.lost}, timed out {e.timed_out}", file=sys.stderr, flush=True)
                    if e.lossy:
                        break
            finally:
                for w in workers:
                    w.close()
                relay.stop()
    print_report(args, setup, results, args.steps, time.monotonic() - t_start)
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "setup_s": setup,
            "steps": [{"emulator": e.__dict__, "relay": r.__dict__ if r else None}
                      for e, r in results]}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
