"""The device agent on MicroPython: QoS 1 throughput against paho-mqtt, peak heap, smallest heap.

1. Throughput. One platform emulator (Mosquitto with TLS + SmartREST engine). A virtual board
   (the MicroPython unix port, default heap) runs microcot's agent with pre-provisioned
   credentials; once it is set up, it measures N values as fast as its queue drains (topped up
   to 32 rows, so the flash spill stays out of it), in text SmartREST (ms/) and then in binary
   (bs/). Rate = N / (first measure() -> the last PUBACK), timed on the board. Then paho-mqtt on
   CPython, as a second device of the same emulator, publishes the same rows (built with the
   firmware's own encoders, with its own managed object id) with QoS 1 and the same window of 8
   messages in flight as the agent, timed from the first publish() to the last PUBACK. Both over
   TLS 1.2+ verified against the emulator's CA. The platform must store all N of each run.
2. Peak heap. A full session of the example application (main.py) on a fresh virtual board with a
   SIM: boot 1 reads the ICCID, boot 2 bootstraps (XTEA), boot 3 registers the templates, creates
   the device, measures every second and executes a c8y_Command. A boot.py registers
   sys.atexit(print micropython.mem_peak()), so each boot reports its own peak (every boot is a
   fresh interpreter, as after a reset on a board).
3. Smallest heap. The same full session with `--heap` bisected (VirtualBoard(heap=...)): the
   smallest heap with which the session completes (device created, 2 measurements, the operation
   SUCCESSFUL) with no MemoryError and no crash.

    python bench/agent.py [--n 1000] [--no-heap] [--json]
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
from microcot_host import boards, deploy, transport  # noqa: E402
from microcot_host.demo import BoardLog, new_iccid  # noqa: E402
from microcot_host.emulator import Emulator  # noqa: E402
from microcot_host.emulator.certs import client_ssl_context  # noqa: E402
from microcot_host.vboard import VirtualBoard  # noqa: E402

XID = "microcot1"
INFLIGHT = 8  # the agent's MQTT client (mqtt.py max_inflight); paho gets the same window
PAHO_DEFAULT_INFLIGHT = 20
REPS = 3  # runs of each kind; the median is reported
T0 = 1767225600  # 2026-01-01T00:00:00Z: the measurements' times, k seconds on
TYPES_110 = ["UNSIGNED", "STRING", "STRING", "NUMBER", "STRING", "DATE", "STRING"]

RATE_SCRIPT = """
import os, time
from microcot.agent import Agent
a = Agent(log=False, queue=[64, 0])
a.start(%(id)r)
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


def agent_rates(emu: Emulator, work: Path, n: int) -> dict:
    device = new_iccid()
    password = emu.add_device(device)
    vb = VirtualBoard("bench-agent-rate", flash_dir=work / "rate-flash").start()
    try:
        t = transport.open_board(vb.port)
        try:
            deploy.deploy_transport(t, boards.load("virtual"), app=True,
                                    config=settings(emu.connection))
            host_store.root(str(vb.flash_dir / "store"))
            host_store.save("cred", {"id": device, "password": password,
                                     "source": "provisioned", "ok": False})
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
                    (vb.flash_dir / f"go-{kind}").write_text("")

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


def paho_rates(emu: Emulator, n: int, inflight: int = INFLIGHT) -> dict:
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
        for kind in [f"{k}{r}" for k in ("Text", "Binary") for r in range(REPS)]:
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


# ---- 2./3. a full session: peak heap per boot, smallest heap --------------------------------


def template_flash(emu: Emulator, work: Path) -> Path:
    """Firmware, app and settings deployed once (at the default heap); main.py kept aside as
    main.bench so that a board started on a copy does not run it before we listen."""
    flash = work / "template-flash"
    vb = VirtualBoard("bench-agent-deploy", flash_dir=flash).start()
    try:
        deploy.deploy(vb.port, board="virtual", app=True, config=settings(emu.connection))
    finally:
        vb.stop()
    (flash / "main.py").rename(flash / "main.bench")
    return flash


def session(emu: Emulator, work: Path, template: Path, heap: int | None, peaks: bool,
            timeout: float = 40) -> dict:
    """One full session on a fresh board: {"ok", "why", "seconds", "peaks"}."""
    iccid = new_iccid()
    flash = work / f"flash-{iccid[-6:]}"
    shutil.copytree(template, flash)
    if peaks:
        (flash / "boot.py").write_text(PEAK_BOOT)
    vb = VirtualBoard("bench-agent-heap", heap=heap, iccid=iccid, flash_dir=flash).start()
    log = None
    res: dict = {"ok": False, "why": "", "peaks": []}
    t0 = time.monotonic()
    try:
        log = BoardLog(vb.port)
        (flash / "main.bench").rename(flash / "main.py")
        log.write(b"\x04")  # soft reset: main.py runs

        def failed() -> str | None:
            if vb.crashes:
                return "crashed"
            line = log.find("MemoryError")
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

        if not wait("self-creation", mo) or not wait(
                "2 measurements", lambda: stored(emu, mo(), "c8y_Temperature") >= 2):
            return res
        op = emu.create_operation(mo(), {"c8y_Command": {"text": "uptime"}})
        if not wait("c8y_Command", lambda: emu.api.handle(
                "GET", f"/devicecontrol/operations/{op['id']}").body["status"] == "SUCCESSFUL"):
            return res
        res["ok"] = True
        res["seconds"] = time.monotonic() - t0
        if peaks:  # Ctrl-C ends main.py, Ctrl-D soft-resets: atexit prints boot 3's peak
            log.write(b"\x03")
            time.sleep(0.5)
            log.write(b"\x04")
            end = time.monotonic() + 10
            while time.monotonic() < end and sum(1 for x in log.lines if x.startswith("PEAK")) < 3:
                time.sleep(0.1)
        res["peaks"] = [[int(v) for v in x.split()[1:3]] for x in log.lines
                        if x.startswith("PEAK ")]
        return res
    finally:
        if log is not None:
            log.close()
        vb.stop()
        shutil.rmtree(flash, ignore_errors=True)


def smallest_heap(emu: Emulator, work: Path, template: Path, lo: int, hi: int,
                  step: int = 4096) -> tuple[int, list[tuple[int, str]]]:
    """Bisect the heap between lo (fails) and hi (works) to `step`; (smallest, trials)."""
    trials = []
    while hi - lo > step:
        mid = (lo + hi) // 2 // 1024 * 1024
        r = session(emu, work, template, mid, peaks=False)
        trials.append((mid, "ok" if r["ok"] else r["why"]))
        print(f"  --heap {mid // 1024}k: {'ok' if r['ok'] else 'fails (' + r['why'] + ')'}",
              flush=True)
        if r["ok"]:
            hi = mid
        else:
            lo = mid
    return hi, trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="measurements per throughput run")
    ap.add_argument("--no-heap", action="store_true", help="skip peak heap and bisection")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict = {}
    work = Path(tempfile.mkdtemp(prefix="microcot-bench-agent-"))
    try:
        with Emulator(work / "emu", auto_accept=True) as emu:
            print(f"throughput: {args.n} QoS 1 measurements per run, TLS, "
                  f"{INFLIGHT} in flight ...", flush=True)
            report["agent"] = agent_rates(emu, work, args.n)
            report["paho"] = paho_rates(emu, args.n)
            report["paho20"] = paho_rates(emu, args.n, PAHO_DEFAULT_INFLIGHT)
            if not args.no_heap:
                template = template_flash(emu, work)
                print("peak heap of a full session (default heap) ...", flush=True)
                report["session"] = session(emu, work, template, None, peaks=True)
                if not report["session"]["ok"]:
                    raise RuntimeError(f"the session failed: {report['session']['why']}")
                print("smallest heap (bisection) ...", flush=True)
                hi = 512 * 1024
                if not session(emu, work, template, hi, peaks=False)["ok"]:
                    raise RuntimeError("the session fails even with a 512 KiB heap")
                low, trials = smallest_heap(emu, work, template, 32 * 1024, hi)
                # fragmentation varies from run to run: the result must pass 3 more times
                while True:
                    bad = [r for r in (session(emu, work, template, low, peaks=False)
                                       for _ in range(3)) if not r["ok"]]
                    trials.append((low, "ok" if not bad else bad[0]["why"]))
                    if not bad:
                        break
                    print(f"  --heap {low // 1024}k fails on a repeat: {bad[0]['why']}")
                    low += 4096
                report["smallest_heap"] = low
                report["trials"] = trials
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print()
    med = {who: {k: statistics.median(r["n"] / r["seconds"] for r in report[who][k])
                 for k in ("text", "binary")} for who in ("agent", "paho", "paho20")}
    print(f"QoS 1 measurements/s, median of {REPS} runs of {args.n}")
    print(f"{'':<18} {'agent (MicroPython)':>20} {'paho (CPython)':>15} {'agent/paho':>11} "
          f"{'paho, 20 in flight':>19}")
    for kind in ("text", "binary"):
        ra, rp, r20 = med["agent"][kind], med["paho"][kind], med["paho20"][kind]
        print(f"{kind + ' SmartREST':<18} {ra:>20.0f} {rp:>15.0f} {ra / rp:>10.2f}x {r20:>19.0f}")
    for who in ("agent", "paho"):
        runs = ", ".join(f"{r['n'] / r['seconds']:.0f}" for k in ("text", "binary")
                         for r in report[who][k])
        print(f"  {who} runs (text..., binary...): {runs}")
    worst = max(r["stored_after"] for who in ("agent", "paho") for k in ("text", "binary")
                for r in report[who][k])
    print(f"  all {args.n} of every run stored by the platform, at most {worst:.2f} s after "
          "the last PUBACK")
    if "session" in report:
        s = report["session"]
        names = ("boot 1: read the ICCID", "boot 2: bootstrap (XTEA)",
                 "boot 3: templates, creation, data, operation")
        print(f"\n{'a full session, default heap':<46} {'allocated (mem_peak)':>21} "
              f"{'live at the end':>16}")
        for name, (peak, live) in zip(names, s["peaks"], strict=False):
            print(f"{name:<46} {peak:>13} ({peak / 1024:>5.1f} KiB) {live:>7} "
                  f"({live / 1024:.1f} KiB)")
        print(f"\nsmallest --heap for the full session: {report['smallest_heap']} bytes "
              f"({report['smallest_heap'] // 1024} KiB; bisected to 4 KiB: "
              + ", ".join(f"{h // 1024}k {'ok' if w == 'ok' else 'fails'}"
                          for h, w in report["trials"]) + ")")


if __name__ == "__main__":
    main()
