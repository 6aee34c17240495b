"""Heap of the MQTT client (firmware/microcot/mqtt.py) at its default limits, on the faithful
32-bit board models (i386-esp32: TLS outside the GC heap; i386-rp2: mbedTLS in the GC heap).

One round, as a device makes it: import, a client with a verified TLS context (the broker's CA),
connect, subscribe (QoS 1), publish (QoS 1, PUBACK), receive the echo a connector sends back,
disconnect; with a 64 B message and with the largest the default max_packet (16 KiB) admits;
against Mosquitto over TLS (the emulator's broker, microcot_host.emulator.broker) with paho as
the echoing connector. The firmware is compiled to .mpy for the model's architecture, as
deployed. Reported: what each step holds after a collection (gc.mem_alloc deltas) and the
smallest interpreter heap with which the round passes (bisected to 1 KiB, confirmed 3 times),
with the free heap after boot it means. The same for umqtt.robust's client (firmware/umqtt).

    python bench/mqtt_heap.py [--runtimes i386-esp32,i386-rp2] [--json]

No peer: this is a measurement, not a comparison.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "firmware"))

import paho.mqtt.client as paho  # noqa: E402

from microcot_host import deploy, transport  # noqa: E402
from microcot_host.emulator.broker import Broker  # noqa: E402
from microcot_host.vboard.heapcal import free_for_heapsize  # noqa: E402
from microcot_host.vboard.models import micropython_for  # noqa: E402

DEV, PW = "8949000000000000077", "pw-mqtt-heap"
# the largest message whose PUBLISH (topic mr/<ID>, QoS 1) fits the default max_packet of 16 KiB
BIG = 16384 - 4 - (2 + 3 + len(DEV)) - 2

PROBE = r"""
import gc, sys, time
sys.path[:0] = [%(lib)r]
gc.collect()
base = gc.mem_alloc()
steps = []
def step(name):
    gc.collect()
    steps.append([name, gc.mem_alloc() - base])
if %(robust)r:
    from umqtt.robust import MQTTClient
else:
    from microcot.mqtt import MQTTClient
from microcot.tlsctx import tls_context
step("import")
got = []
c = MQTTClient(%(id)r, "localhost", %(port)d, user=%(id)r, password=%(pw)r, keepalive=30,
               ssl=tls_context(cafile=%(ca)r))
c.set_callback(lambda t, m: got.append(len(m)))
step("client and TLS context (CA loaded)")
c.connect(clean_session=True)
step("connected")
c.subscribe("mr/" + %(id)r, 1)
pid = c.publish("ms/" + %(id)r, b"x" * %(size)d, qos=1)  # umqtt.robust: returns after the PUBACK
if pid:
    c.wait_puback(pid, 10000)
t0 = time.ticks_ms()
while not got and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    c.wait_msg(200)
assert got, "no echo"
step("after subscribe, publish, echo received")
c.disconnect()
step("disconnected")
print("RESULT", steps)
"""


class Echo:
    """paho as the platform: echoes every ms/<ID> message to mr/<ID>."""

    def __init__(self, broker: Broker) -> None:
        cred = broker.connector_credentials()
        ready: queue.Queue[bool] = queue.Queue()
        c = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2,
                        client_id=f"heap-{time.monotonic_ns()}", protocol=paho.MQTTv311)
        c.username_pw_set(cred.user, cred.password)
        c.tls_set_context(broker.client_ssl_context())
        c.on_connect = lambda cl, ud, fl, rc, pr=None: cl.subscribe("ms/+", 1)
        c.on_subscribe = lambda *a: ready.put(True)
        c.on_message = lambda cl, ud, m: cl.publish(
            "mr/" + m.topic.split("/", 1)[1], m.payload, qos=1)
        c.connect("localhost", broker.port, keepalive=30)
        c.loop_start()
        ready.get(timeout=10)
        self.client = c

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def build(lib: Path, arch: str | None) -> None:
    for pkg in ("microcot", "umqtt"):
        (lib / pkg).mkdir(parents=True)
        for src in sorted((ROOT / "firmware" / pkg).glob("*.py")):
            deploy.compile_module(src, f"{pkg}/{src.name}", arch, lib / pkg)


def run(mp: str, lib: Path, broker: Broker, heap: int | None, robust: bool, size: int
        ) -> list | None:
    code = PROBE % {"lib": str(lib), "id": DEV, "pw": PW, "port": broker.port,
                    "ca": str(broker.ca_cert), "robust": robust, "size": size}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    cmd = [mp] + (["-X", f"heapsize={heap}"] if heap else []) + [f.name]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        Path(f.name).unlink()
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            import ast

            return ast.literal_eval(line[7:])
    return None


def smallest(mp: str, lib: Path, broker: Broker, robust: bool, size: int, lo: int = 16 * 1024,
             hi: int = 256 * 1024) -> int | None:
    if run(mp, lib, broker, hi, robust, size) is None:
        return None
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 512 * 512
        if run(mp, lib, broker, mid, robust, size) is not None:
            hi = mid
        else:
            lo = mid
    while not all(run(mp, lib, broker, hi, robust, size) is not None for _ in range(3)):
        hi += 1024
    return hi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtimes", default="i386-esp32,i386-rp2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        broker.add_device(DEV, PW)
        echo = Echo(broker)
        try:
            for rt in args.runtimes.split(","):
                mp = micropython_for(rt)
                mpy = int(subprocess.run([mp, "-c", "import sys; print(sys.implementation._mpy)"],
                                         capture_output=True, text=True, timeout=30).stdout)
                lib = Path(tmp) / rt
                build(lib, transport.MPY_ARCHES[mpy >> 10])
                for robust, size in ((False, 64), (True, 64), (False, BIG)):
                    name = (f"{rt} {'umqtt.robust' if robust else 'microcot.mqtt'}, "
                            f"{size} B message")
                    res = run(mp, lib, broker, None, robust, size)
                    if res is None:
                        out[name] = {"error": "the round failed"}
                        continue
                    steps = res
                    heap = smallest(mp, lib, broker, robust, size)
                    out[name] = {"held": dict(steps), "smallest_heapsize": heap,
                                 "free_after_boot_at_it": free_for_heapsize(mp, heap)
                                 if heap else None}
                    if not args.json:
                        print(f"{name}:")
                        for k, v in steps:
                            print(f"  {k:42s} {v:7d} B held")
                        print(f"  smallest heap for the round: "
                              f"{heap} B (free after boot {out[name]['free_after_boot_at_it']} B)",
                              flush=True)
        finally:
            echo.close()
            broker.stop()
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
