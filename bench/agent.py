"""The device agent on MicroPython: QoS 1 throughput against paho-mqtt, peak heap, smallest heap.

1. Throughput. One platform emulator (Mosquitto with TLS + SmartREST engine). A board (the
   ESP32's 32-bit model at its budget, else the developer board) runs microcot's agent with
   pre-provisioned credentials; once it is set up, it measures N values as fast as its queue
   drains (topped up to 32 rows, so the flash spill stays out of it), in text SmartREST (ms/) and
   then in binary (bs/). Rate = N / (first measure() -> the last PUBACK), timed on the board. The
   peer: paho-mqtt on CPython in a process of its own (bench/_paho_rate.py), a second device of
   the same emulator publishing the same rows (built with the firmware's own encoders) with QoS 1
   and the same window of 8 messages in flight, timed from the first publish() to the last
   PUBACK. Runs alternate agent, paho, agent, ... (5 of each kind), medians are compared. Both
   over TLS 1.2+ verified against the emulator's CA; the platform must store all N of each run.
   `--old` also runs the earlier peer (paho inside this process, sharing the emulator's GIL).
2. Heap, per board model (--boards: board files; each runs its runtime, e.g. esp32-generic on
   the i386-esp32 build, rp2-pico-w on i386-rp2). A full session of the example application
   (main.py) on a fresh board with a SIM: the ICCID is read, the bootstrap runs (XTEA), the
   templates are registered, the device creates itself, measures every second and executes the
   c8y_Commands `uptime` and `mem` (the free heap after a collection, while connected). Done at
   the board file's budget 3 times, and with the heapsize bisected to 4 KiB and the result
   confirmed 3 times. On the faithful models the same again with each of the agent's heap
   measures switched off (microcot.json `reserve`, `unload`, `restarts`) and with all of them
   off: which of them a board still needs. A boot.py registers sys.atexit(print
   micropython.mem_peak()), so the last boot of the first session reports its peak.

    python bench/agent.py [--n 1000] [--no-heap] [--no-rate] [--boards B1,B2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this script is named agent.py: keep its directory off the path (microcot.agent is meant)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "firmware")]

import paho.mqtt.client as mqtt  # noqa: E402

from microcot import binrest, smartrest  # noqa: E402
from microcot import store as host_store  # noqa: E402
from microcot_host import boards, deploy, fidelity, transport  # noqa: E402
from microcot_host.demo import BoardLog, new_iccid  # noqa: E402
from microcot_host.emulator import Emulator  # noqa: E402
from microcot_host.emulator.certs import client_ssl_context  # noqa: E402
from microcot_host.vboard.heapcal import free_for_heapsize  # noqa: E402
from microcot_host.vboard.models import heap_for, make_board, micropython_for  # noqa: E402

XID = "microcot2"
INFLIGHT = 8  # the agent's MQTT client (mqtt.py max_inflight); paho gets the same window
REPS = 5  # runs of each kind, agent and paho interleaved; the median is reported
T0 = 1767225600  # 2026-01-01T00:00:00Z: the measurements' times, k seconds on
TYPES_110 = ["UNSIGNED", "STRING", "STRING", "NUMBER", "STRING", "DATE", "STRING"]

RATE_SCRIPT = """
import os, time
from microcot.agent import Agent
a = Agent(log=False, queue=[64, 0])
try:
    a.start(%(id)r)
except MemoryError as e:  # as step() does at the ESP32's budget: the connect loads the rest
    print('start:', e)
if not a.run(seconds=30, until=lambda: a.ready):
    raise SystemExit('not ready')
print('MO', a.mo)
N = %(n)d
def rate(kind):
    k = [0]
    def fill():
        while k[0] < N and len(a.q) < 32:
            k[0] += 1
            a.measure('c8y_Temperature', 'T', 20 + (k[0] %% 50) / 10, 'C',
                      type='mc_Bench' + kind, t=%(t0)d + k[0])
        return k[0] >= N and not len(a.q) and not a._c.pending()
    e = a.errors
    t0 = time.ticks_ms()
    ok = a.run(seconds=120, until=fill)
    print('RATE', kind, ok, N, time.ticks_diff(time.ticks_ms(), t0))
    # the host says when the platform has stored them all: runs must not queue up behind
    # each other in the platform (it answers 429 beyond 2000 requests waiting per device)
    a.run(seconds=120, until=lambda: exists('/go-' + kind))
    print('ERRORS', kind, a.errors - e)
def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
for r in range(%(reps)d):
    rate('Text%%d' %% r)
a.binary = True
for r in range(%(reps)d):
    rate('Binary%%d' %% r)
a.close()
"""

# mem_peak() on the unix port counts every allocation and subtracts only explicit frees, not what
# the GC reclaims (a loop allocating 3 MB in a 200 KB heap reports 3 MB): it is the bytes a boot
# allocated in all. The live heap after a collection is printed with it.
PEAK_BOOT = """import sys, gc, micropython
def _peak():
    gc.collect()
    print('PEAK', micropython.mem_peak(), gc.mem_alloc())
sys.atexit(_peak)
"""


def settings(conn: dict, **over) -> dict:
    s = {"host": conn["mqtt_host"], "port": conn["mqtt_port"], "tls": True,
         "ca": Path(conn["ca_cert"]).read_text(), "bootstrap_user": conn["bootstrap_user"],
         "bootstrap_password": conn["bootstrap_password"], "bootstrap_delay": [0, 0.5],
         "interval": 1, "keepalive": 30, "timeout": 10, "backoff": [0.5, 4]}
    s.update(over)
    return s


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def stored(emu: Emulator, mo: str, mtype: str) -> int:
    r = emu.api.handle("GET", f"/measurement/measurements?source={mo}&type={mtype}"
                              "&pageSize=2000")
    return len(r.body["measurements"]) if r.status == 200 else -1


def wait_stored(emu: Emulator, mo: str, mtype: str, n: int, timeout: float = 60) -> float:
    """Seconds until the platform holds n measurements of mtype on mo."""
    t0 = time.monotonic()
    while stored(emu, mo, mtype) < n:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the platform stored {stored(emu, mo, mtype)} of {n} {mtype}")
        time.sleep(0.05)
    return time.monotonic() - t0


# ---- 1. throughput ------------------------------------------------------------------------


class PahoPeer:
    """paho-mqtt in a process of its own (bench/_paho_rate.py), as a second device of the same
    emulator with its own managed object; runs on request, between the agent's runs."""

    def __init__(self, emu: Emulator, inflight: int = INFLIGHT) -> None:
        import subprocess

        conn = emu.connection
        self.emu = emu
        self.device = new_iccid()
        password = emu.add_device(self.device)
        r = emu.api.handle("POST", "/inventory/managedObjects",
                           {"name": f"paho {self.device}", "c8y_IsDevice": {}})
        self.mo = r.body["id"]
        emu.api.handle("POST", f"/identity/globalIds/{self.mo}/externalIds",
                       {"type": "c8y_Serial", "externalId": self.device})
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name(
            "_paho_rate.py"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask({"host": conn["mqtt_host"], "port": conn["mqtt_port"], "ca": conn["ca_cert"],
                   "device": self.device, "password": password, "mo": self.mo,
                   "inflight": inflight, "xid": XID, "t0": T0})
        self.res: dict = {"mo": self.mo, "text": [], "binary": []}

    def _ask(self, req: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the paho peer process ended")
        return json.loads(line)

    def run(self, kind: str, n: int) -> None:
        r = self._ask({"kind": kind, "n": n})
        if not r["ok"] or r["errors"]:
            raise RuntimeError(f"paho {kind}: {r['acked']} of {n} acknowledged, errors "
                               f"{r['errors']}")
        after = wait_stored(self.emu, self.mo, "mc_Bench" + kind, n)
        self.res[kind.rstrip("0123456789").lower()].append(
            {"n": n, "seconds": r["seconds"], "stored_after": after})

    def close(self) -> None:
        if self.proc.poll() is None:
            self._ask_quit()
        self.proc.wait(10)

    def _ask_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.flush()


def agent_rates(emu: Emulator, work: Path, n: int, between=None) -> dict:
    """The agent's runs; `between(kind)` runs after each one is stored, before the next starts
    (the peer's run of the same kind: runs interleaved)."""
    device = new_iccid()
    password = emu.add_device(device)
    # the ESP32's model at its budget where the builds are here, else the developer board
    board = "esp32-generic" if fidelity.missing("i386-esp32") is None else "virtual"
    print(f"  the agent on {board} ({boards.load(board).runtime})", flush=True)
    vb = make_board(board, name="bench-agent-rate", flash_dir=work / "rate-flash").start()
    try:
        t = transport.open_board(vb.port)
        try:
            deploy.deploy_transport(t, boards.load(board), app=True,
                                    config=settings(emu.connection))
            host_store.root(str(work / "rate-flash" / "store"))
            host_store.save("cred", {"id": device, "password": password,
                                     "source": "provisioned", "ok": False})
            transport.soft_reset(t)  # the agent runs in a freshly booted board's heap
            res: dict = {"text": [], "binary": []}
            lines: list[str] = []

            def on_line(data: bytes) -> None:
                # each RATE line: wait until the platform stored them, then let the board go on
                lines.append(data.decode(errors="replace"))
                text = "".join(lines)
                m = re.search(r"MO (\d+)", text)
                for kind, ok, cnt, ms in re.findall(r"RATE (\w+) (\w+) (\d+) (\d+)", text):
                    if kind in done:
                        continue
                    done.add(kind)
                    if ok != "True":
                        raise RuntimeError(f"the agent did not finish its {kind} run:\n{text}")
                    res["mo"] = m.group(1)
                    after = wait_stored(emu, m.group(1), "mc_Bench" + kind, n)
                    res[kind.rstrip("0123456789").lower()].append(
                        {"n": int(cnt), "seconds": int(ms) / 1000, "stored_after": after})
                    if between is not None:
                        between(kind)
                    (work / "rate-flash" / f"go-{kind}").write_text("")

            done: set[str] = set()
            out = transport.run(t, RATE_SCRIPT % {"id": device, "n": n, "t0": T0,
                                                   "reps": REPS}, timeout=600,
                                on_output=on_line).decode()
        finally:
            transport.close(t)
    finally:
        vb.stop()
    errors = [int(x) for x in re.findall(r"ERRORS \w+ (\d+)", out)]
    if len(errors) != 2 * REPS or any(errors):
        raise RuntimeError(f"the platform answered the agent's rows with errors:\n{out}")
    return res


def paho_rates(emu: Emulator, n: int, inflight: int = INFLIGHT, reps: int = 3) -> dict:
    """The old peer: paho inside this process, which also runs the emulator (they share a GIL),
    after the agent's runs rather than between them. Kept to show the difference once."""
    conn = emu.connection
    device = new_iccid()
    password = emu.add_device(device)
    r = emu.api.handle("POST", "/inventory/managedObjects",
                       {"name": f"paho {device}", "c8y_IsDevice": {}})
    mo = r.body["id"]
    emu.api.handle("POST", f"/identity/globalIds/{mo}/externalIds",
                   {"type": "c8y_Serial", "externalId": device})
    done = threading.Event()
    acked = [0]
    want = [0]
    errors: list[bytes] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                    protocol=mqtt.MQTTv311, clean_session=False)
    c.username_pw_set(device, password)
    c.tls_set_context(client_ssl_context(conn["ca_cert"]))
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *a, **k: connected.set()

    def on_publish(client, userdata, mid, rc=None, props=None):
        acked[0] += 1
        if acked[0] >= want[0]:
            done.set()

    c.on_publish = on_publish
    c.on_message = lambda client, userdata, msg: errors.append(msg.payload)
    c.connect(conn["mqtt_host"], conn["mqtt_port"], keepalive=30)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("paho: no CONNACK")
        c.subscribe([("mr/" + device, 1), ("br/" + device, 1)])
        res: dict = {"mo": mo, "text": [], "binary": []}
        for kind in [f"{k}{r}" for k in ("Text", "Binary") for r in range(reps)]:
            rows = []
            for k in range(1, n + 1):
                v = [int(mo), "c8y_Temperature", "T", 20 + (k % 50) / 10, "C", T0 + k,
                     "mc_Bench" + kind]
                if kind.startswith("Text"):
                    v[5] = iso(v[5])
                    rows.append(("ms/" + device, smartrest.request(XID, [[110, *v]])))
                else:
                    rows.append(("bs/" + device, binrest.encode(XID, 110, TYPES_110, v)))
            acked[0] = 0
            want[0] = n
            done.clear()
            t0 = time.monotonic()
            for topic, payload in rows:
                c.publish(topic, payload, qos=1)
            if not done.wait(120):
                raise RuntimeError(f"paho: {acked[0]} of {n} acknowledged")
            secs = time.monotonic() - t0
            res[kind.rstrip("0123456789").lower()].append(
                {"n": n, "seconds": secs,
                 "stored_after": wait_stored(emu, mo, "mc_Bench" + kind, n)})
        if errors:
            raise RuntimeError(f"the platform answered paho's rows with errors: {errors[:3]}")
        return res
    finally:
        c.disconnect()
        c.loop_stop()


# ---- 2./3. a full session: peak heap per boot, smallest heap, per board model ----------------

# The agent's heap measures, switched off one at a time and all together (microcot.json keys)
VARIANTS = {
    "all measures": {},
    "no reserve block": {"reserve": 0},
    "no unloading": {"unload": False},
    "no boots of their own": {"restarts": False},
    "none of them": {"reserve": 0, "unload": False, "restarts": False},
}


def template_flash(emu: Emulator, work: Path, board: str) -> Path:
    """Firmware, app and settings deployed once (at a roomy heap); main.py kept aside as
    main.bench so that a board started on a copy does not run it before we listen."""
    flash = work / f"template-{board}"
    vb = make_board(board, name="bench-agent-deploy", heap="1m", flash_dir=flash).start()
    try:
        deploy.deploy(vb.port, board=board, app=True, config=settings(emu.connection))
    finally:
        vb.stop()
    (flash / "main.py").rename(flash / "main.bench")
    return flash


def session(emu: Emulator, work: Path, template: Path, board: str, heap: int | None,
            peaks: bool, over: dict | None = None, timeout: float = 40) -> dict:
    """One full session on a fresh board: {"ok", "why", "seconds", "peaks", "free"}; heap None:
    the board file's budget."""
    iccid = new_iccid()
    flash = work / f"flash-{iccid[-6:]}"
    shutil.copytree(template, flash)
    if over:
        cfg = json.loads((flash / "microcot.json").read_text())
        cfg.update(over)
        (flash / "microcot.json").write_text(json.dumps(cfg))
    if peaks:
        (flash / "boot.py").write_text(PEAK_BOOT)
    vb = make_board(board, name="bench-agent-heap", heap=heap, iccid=iccid,
                    flash_dir=flash).start()
    log = None
    res: dict = {"ok": False, "why": "", "peaks": [], "free": None}
    t0 = time.monotonic()
    try:
        log = BoardLog(vb.port)
        (flash / "main.bench").rename(flash / "main.py")
        log.write(b"\x04")  # soft reset: main.py runs

        def failed() -> str | None:
            if getattr(vb, "crashes", 0):
                return "crashed"
            line = log.find("MemoryError") or log.find("ran out of memory")
            return line if line else None

        def wait(what: str, fn) -> bool:
            while time.monotonic() - t0 < timeout:
                why = failed()
                if why:
                    res["why"] = f"{what}: {why}"
                    return False
                if fn():
                    return True
                time.sleep(0.1)
            res["why"] = f"{what}: not within {timeout:g} s"
            return False

        def mo() -> str | None:
            r = emu.api.handle("GET", f"/identity/externalIds/c8y_Serial/{iccid}")
            return r.body["managedObject"]["id"] if r.status == 200 else None

        def command(text: str) -> dict | None:
            op = emu.create_operation(mo(), {"c8y_Command": {"text": text}})
            done: dict = {}

            def finished() -> bool:
                body = emu.api.handle("GET", f"/devicecontrol/operations/{op['id']}").body
                done.update(body)
                return body["status"] == "SUCCESSFUL"
            return done if wait(f"c8y_Command {text}", finished) else None

        if not wait("self-creation", mo) or not wait(
                "2 measurements", lambda: stored(emu, mo(), "c8y_Temperature") >= 2):
            return res
        if command("uptime") is None:
            return res
        # the free heap (after a collection) while connected, from the device itself
        got = command("mem")
        if got is None:
            return res
        res["free"] = int(got["c8y_Command"]["result"].split()[0])
        res["ok"] = True
        res["seconds"] = time.monotonic() - t0
        if peaks:  # Ctrl-C ends main.py, Ctrl-D soft-resets: atexit prints the last boot's peak
            log.write(b"\x03")
            time.sleep(0.5)
            log.write(b"\x04")
            end = time.monotonic() + 10
            while time.monotonic() < end and not any(x.startswith("PEAK") for x in log.lines):
                time.sleep(0.1)
        res["peaks"] = [[int(v) for v in x.split()[1:3]] for x in log.lines
                        if x.startswith("PEAK ")]
        return res
    finally:
        if log is not None:
            log.close()
        vb.stop()
        shutil.rmtree(flash, ignore_errors=True)


def smallest_heap(run, lo: int, hi: int, step: int = 4096) -> tuple[int, list[tuple[int, str]]]:
    """Bisect the heap between lo (fails) and hi (works) to `step`, then confirm the result 3
    more times (fragmentation varies from run to run); (smallest, trials)."""
    trials = []
    while hi - lo > step:
        mid = (lo + hi) // 2 // 1024 * 1024
        r = run(mid)
        trials.append((mid, "ok" if r["ok"] else r["why"]))
        print(f"    heapsize {mid // 1024}k: {'ok' if r['ok'] else 'fails (' + r['why'] + ')'}",
              flush=True)
        if r["ok"]:
            hi = mid
        else:
            lo = mid
    while True:
        bad = [r for r in (run(hi) for _ in range(3)) if not r["ok"]]
        trials.append((hi, "ok" if not bad else bad[0]["why"]))
        if not bad:
            return hi, trials
        print(f"    heapsize {hi // 1024}k fails on a repeat: {bad[0]['why']}", flush=True)
        hi += step


def heap_report(emu: Emulator, work: Path, board: str, variants: list[str]) -> dict:
    """Per heap-measure variant on one board model: passes at the budget (3 of 3), the free heap
    while connected there, the smallest heapsize (and the free heap after boot it means)."""
    bdef = boards.load(board)
    mp = micropython_for(bdef.runtime)
    template = template_flash(emu, work, board)
    out: dict = {"runtime": bdef.runtime, "budget": bdef.heap_budget,
                 "budget_heapsize": heap_for(bdef, bdef.runtime), "variants": {}}
    first = session(emu, work, template, board, None, peaks=True)
    out["peaks"] = first["peaks"]
    for name in variants:
        over = VARIANTS[name]
        print(f"  {board} ({bdef.runtime}), {name} ...", flush=True)
        at_budget = [session(emu, work, template, board, None, peaks=False, over=over)
                     for _ in range(3)]
        row: dict = {"at_budget": sum(r["ok"] for r in at_budget),
                     "why": next((r["why"] for r in at_budget if not r["ok"]), ""),
                     "free_connected": [r["free"] for r in at_budget if r["ok"]]}

        def run(h: int, over: dict = over) -> dict:
            return session(emu, work, template, board, h, peaks=False, over=over)
        if run(1024 * 1024)["ok"]:
            low, trials = smallest_heap(run, 32 * 1024, 1024 * 1024)
            row.update(smallest=low, smallest_free=free_for_heapsize(mp, low), trials=trials)
        out["variants"][name] = row
    return out


def print_heap(report: dict) -> None:
    for board, r in report.items():
        print(f"\n{board}: runtime {r['runtime']}, budget {r['budget']:,} B free after boot "
              f"(heapsize {r['budget_heapsize']:,})")
        names = ("boot 1, read the ICCID", "boot 2, bootstrap", "boot 3, connected")
        for name, (peak, live) in zip(names, r.get("peaks", []), strict=False):
            print(f"  {name}: {peak:,} B allocated in all, {live:,} B live at the end")
        print(f"  {'heap measures':<24} {'at budget':>9} {'free while connected':>21} "
              f"{'smallest heapsize':>18} {'= free after boot':>18}")
        for name, v in r["variants"].items():
            free = v["free_connected"]
            fc = f"{min(free):,}-{max(free):,}" if free else "-"
            sm = f"{v['smallest']:,}" if "smallest" in v else "fails at 1 MiB"
            sf = f"{v['smallest_free']:,}" if "smallest_free" in v else "-"
            print(f"  {name:<24} {v['at_budget']:>7}/3 {fc:>21} {sm:>18} {sf:>18}"
                  + (f"   ({v['why'][:90]})" if v["why"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="measurements per throughput run")
    ap.add_argument("--no-heap", action="store_true", help="skip peak heap and bisection")
    ap.add_argument("--no-rate", action="store_true", help="skip the throughput runs")
    ap.add_argument("--old", action="store_true",
                    help="also run the old peer (paho inside this process, after the agent)")
    ap.add_argument("--boards", default="esp32-generic,rp2-pico-w,virtual",
                    help="board files whose models the heap part runs on (comma-separated)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict = {}
    work = Path(tempfile.mkdtemp(prefix="microcot-bench-agent-"))
    try:
        with Emulator(work / "emu", auto_accept=True) as emu:
            if not args.no_rate:
                print(f"throughput: {args.n} QoS 1 measurements per run, TLS, "
                      f"{INFLIGHT} in flight, agent and paho (own process) interleaved ...",
                      flush=True)
                peer = PahoPeer(emu)
                try:
                    report["agent"] = agent_rates(emu, work, args.n,
                                                  lambda kind: peer.run(kind, args.n))
                finally:
                    peer.close()
                report["paho"] = peer.res
                if args.old:
                    report["paho_inproc"] = paho_rates(emu, args.n)
            if not args.no_heap:
                report["heap"] = {}
                for board in args.boards.split(","):
                    bdef = boards.load(board)
                    variants = list(VARIANTS) if bdef.runtime in fidelity.FAITHFUL \
                        else ["all measures"]
                    report["heap"][board] = heap_report(emu, work, board, variants)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print()
    if "agent" in report:
        print_rates(report, args.n)
    if "heap" in report:
        print("\nthe example application's full session (ICCID, bootstrap with XTEA, templates, "
              "self-creation, 2 measurements, c8y_Command uptime and mem) per board model")
        print_heap(report["heap"])


def print_rates(report: dict, n: int) -> None:
    peers = [w for w in ("paho", "paho_inproc") if w in report]
    med = {who: {k: statistics.median(r["n"] / r["seconds"] for r in report[who][k])
                 for k in ("text", "binary")} for who in ("agent", *peers)}
    print(f"QoS 1 measurements/s over TLS, {INFLIGHT} in flight, median of the runs of {n} "
          "(agent and paho interleaved, paho in its own process)")
    head = f"{'':<18} {'agent (MicroPython)':>20} {'paho (CPython)':>15} {'agent/paho':>11}"
    if "paho_inproc" in report:
        head += f" {'old peer':>9} {'old ratio':>10}"
    print(head)
    for kind in ("text", "binary"):
        ra, rp = med["agent"][kind], med["paho"][kind]
        line = f"{kind + ' SmartREST':<18} {ra:>20.0f} {rp:>15.0f} {ra / rp:>10.2f}x"
        if "paho_inproc" in report:
            ro = med["paho_inproc"][kind]
            line += f" {ro:>9.0f} {ra / ro:>9.2f}x"
        print(line)
    if "paho_inproc" in report:
        print("  old peer: paho inside the bench's process (sharing the emulator's GIL), run "
              "after the agent's runs, median of 3")
    for who in ("agent", *peers):
        runs = ", ".join(f"{r['n'] / r['seconds']:.0f}" for k in ("text", "binary")
                         for r in report[who][k])
        print(f"  {who} runs (text..., binary...): {runs}")
    worst = max(r["stored_after"] for who in ("agent", *peers) for k in ("text", "binary")
                for r in report[who][k])
    print(f"  all {n} of every run stored by the platform, at most {worst:.2f} s after "
          "the last PUBACK")


if __name__ == "__main__":
    main()
