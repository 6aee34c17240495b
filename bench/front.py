"""What the emulator's MQTT front costs a device: QoS 1 publishes through the front vs straight to
Mosquitto, measured in the same run.

    python bench/front.py [--messages 1000] [--size 100] [--trials 3]

Three paths, one device user with the same credentials on each:

- `mosquitto-tls`: Mosquitto's own TLS listener (what devices used before the front);
- `front`: the front (front.py: TLS, CONNECT check, then the stream copied both ways) before a
  Mosquitto on plain loopback (what the emulator runs now);
- `mosquitto-plain`: that loopback Mosquitto directly, without TLS (the floor).

Each trial runs a fresh client process (paho-mqtt, MQTT 3.1.1, clean session) per path, the paths
interleaved: `--messages` publishes of `--size` bytes on ms/<ID>, once one at a time (the next
after the PUBACK of the previous: latency) and once all at once (then wait for every PUBACK:
throughput). Nobody subscribes, so only the broker's side of a publish is measured. The median
of `--trials` is printed, with the ratio to `mosquitto-tls`, and the front's CPU time per message
(its event loop's thread's CPU clock, over both parts of a trial: TLS, the CONNECT check and the
copying both ways; the handshake is in it once per trial). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))
sys.path.insert(0, str(HERE.parent / "firmware"))

from microcot_host.emulator.broker import Broker  # noqa: E402
from microcot_host.emulator.certs import ensure_ca_and_server  # noqa: E402
from microcot_host.emulator.front import Front, server_context  # noqa: E402

DEV, PW = "AABBCCDDEEFF", "bench-password"

CLIENT = r"""
import json, ssl, sys, threading, time
import paho.mqtt.client as mqtt
cfg = json.loads(sys.argv[1])
c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cfg["id"],
                protocol=mqtt.MQTTv311, clean_session=True)
c.username_pw_set(cfg["id"], cfg["pw"])
if cfg["ca"]:
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    c.tls_set_context(ctx)
c.max_inflight_messages_set(0)
c.max_queued_messages_set(0)
up = threading.Event()
c.on_connect = lambda *a: up.set()
c.connect("localhost", cfg["port"], keepalive=60)
c.loop_start()
assert up.wait(10)
msg = b"x" * cfg["size"]
n = cfg["n"]
t0 = time.perf_counter()
for _ in range(n):
    c.publish("ms/" + cfg["id"], msg, qos=1).wait_for_publish(10)
one = time.perf_counter() - t0
t0 = time.perf_counter()
infos = [c.publish("ms/" + cfg["id"], msg, qos=1) for _ in range(n)]
for i in infos:
    i.wait_for_publish(30)
burst = time.perf_counter() - t0
c.disconnect()
c.loop_stop()
print(json.dumps({"one": one, "burst": burst}))
"""


def run_client(port: int, ca: str | None, n: int, size: int) -> dict[str, float]:
    cfg = {"id": DEV, "pw": PW, "port": port, "ca": ca, "n": n, "size": size}
    out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cfg)], capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thread_cpu(ident: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process so far."""
    return 0.0 if ident is None else time.clock_gettime(time.pthread_getcpuclockid(ident))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="microcot-bench-front-") as tmp:
        tls_broker = Broker(Path(tmp) / "tls")
        plain = Broker(Path(tmp) / "plain", tls=False)
        tls_broker.start()
        plain.start()
        files = ensure_ca_and_server(Path(tmp) / "front")
        front = Front("127.0.0.1", 0, server_context(files), lambda: ("127.0.0.1", plain.port))
        front.start()
        try:
            for b in (tls_broker, plain):
                b.add_device(DEV, PW)
            paths = {
                "mosquitto-tls": (tls_broker.port, str(tls_broker.ca_cert)),
                "front": (front.port, str(files.ca_cert)),
                "mosquitto-plain": (plain.port, None),
            }
            results: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
            front_cpu: list[float] = []
            tid = front._thread.ident if front._thread is not None else None
            for _ in range(a.trials):
                for name, (port, ca) in paths.items():
                    cpu0 = thread_cpu(tid)
                    results[name].append(run_client(port, ca, a.messages, a.size))
                    if name == "front":
                        front_cpu.append(thread_cpu(tid) - cpu0)
        finally:
            front.stop()
            plain.stop()
            tls_broker.stop()
    base = {k: statistics.median(r[k] for r in results["mosquitto-tls"]) for k in ("one", "burst")}
    print(f"{a.messages} QoS 1 publishes of {a.size} B, median of {a.trials} trials "
          "(interleaved):")
    print(f"{'path':16} {'one at a time':>22} {'all at once':>22}")
    for name, rs in results.items():
        cells = []
        for k in ("one", "burst"):
            t = statistics.median(r[k] for r in rs)
            cells.append(f"{t:6.3f} s {a.messages / t:7.0f}/s {t / base[k]:4.2f}x")
        print(f"{name:16} {cells[0]:>22} {cells[1]:>22}")
    per_msg = statistics.median(front_cpu) / (2 * a.messages)
    print(f"the front's CPU: {per_msg * 1e6:.0f} us per message (median of {a.trials} trials, "
          f"{2 * a.messages} messages each)")


if __name__ == "__main__":
    main()
