"""How many device messages one Python process can take from Mosquitto and hand to worker
processes: the limit of a "one MQTT ingress, N workers behind pipes" design
(docs/guides/emulator-scaling.md).

    python bench/ingress_probe.py [--devices 4] [--messages 20000]

A plain Mosquitto on a free loopback port (the emulator's inflight and queue limits); `--devices`
mosquitto_pub processes (C, `-l`: one QoS 1 message per stdin line) publish `--messages` each on
ms/<device>; the ingress is paho-mqtt, MQTT 5, persistent session, manual acknowledgement, a
Receive Maximum of 20000, as the connector logs in. Modes:

- `ack`: the ingress acknowledges each message in on_message (nothing else: paho's ceiling);
- `pipes`: it sends each message (mid, topic, payload, pickled) to one of 2 worker processes
  over a pipe chosen by the device (a per-device order), the worker sends the mid back at once,
  and a thread of the ingress acknowledges it: the ingress's whole share of a message in that
  design, with workers that do no work.

Prints messages/s and the ingress process's CPU time per message (every thread): on a machine
with more cores than this one, 1 / CPU time is what the ingress can carry at most, whatever the
workers do. No timing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))

from share_probe import Mosquitto  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def echo_worker(conn: Connection) -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        mid, _topic, _payload = pickle.loads(data)
        conn.send_bytes(mid.to_bytes(4, "big"))


class Ingress:
    def __init__(self, port: int, mode: str, total: int) -> None:
        self.mode = mode
        self.total = total
        self.count = 0
        self.done = threading.Event()
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"ingress-{mode}", protocol=mqtt.MQTTv5, manual_ack=True)
        if mode == "pipes":
            ctx = mp.get_context("spawn")
            for _ in range(2):
                a, b = ctx.Pipe()
                p = ctx.Process(target=echo_worker, args=(b,), daemon=True)
                p.start()
                self.pipes.append(a)
                self.procs.append(p)
            for a in self.pipes:
                threading.Thread(target=self._acks, args=(a,), daemon=True).start()
        self.c.on_message = self._msg
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_connect = lambda c, *a: c.subscribe("ms/+", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0xFFFFFFFF
        props.ReceiveMaximum = 20000
        self.c.connect("127.0.0.1", port, clean_start=True, properties=props)
        self.c.loop_start()
        assert ready.wait(10)
        self._plock = [threading.Lock() for _ in self.pipes]

    def _msg(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self.mode == "ack":
            client.ack(msg.mid, msg.qos)
            self._counted()
            return
        k = hash(msg.topic) % len(self.pipes)
        self.pipes[k].send_bytes(pickle.dumps((msg.mid, msg.topic, bytes(msg.payload))))

    def _acks(self, conn: Connection) -> None:
        while True:
            try:
                mid = int.from_bytes(conn.recv_bytes(), "big")
            except (EOFError, OSError):
                return
            self.c.ack(mid, 1)
            self._counted()

    def _counted(self) -> None:
        self.count += 1  # one writer per mode... and in `pipes` two threads: close enough
        if self.count >= self.total:
            self.done.set()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        for a in self.pipes:
            a.send_bytes(b"")
        for p in self.procs:
            p.join(5)


def publishers(port: int, devices: int, n: int) -> list[subprocess.Popen[bytes]]:
    ps = []
    for d in range(devices):
        p = subprocess.Popen(["mosquitto_pub", "-p", str(port), "-h", "127.0.0.1", "-q", "1",
                              "-V", "mqttv311", "-i", f"dev{d}", "-t", f"ms/dev{d}", "-l"],
                             stdin=subprocess.PIPE)
        ps.append(p)
    # one line is one message (`-l`), so the SmartREST line break becomes a space here
    lines = b"".join(b"15,mcBench1 901,10001,bench,%d\n" % i for i in range(n))
    for p in ps:
        assert p.stdin is not None
        p.stdin.write(lines)
        p.stdin.close()
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--modes", default="ack,pipes")
    a = ap.parse_args()
    print(f"{os.cpu_count()} cores; {a.devices} publishers x {a.messages} messages")
    with tempfile.TemporaryDirectory() as tmp:
        m = Mosquitto(Path(tmp))
        try:
            for mode in a.modes.split(","):
                total = a.devices * a.messages
                ing = Ingress(m.port, mode, total)
                c0, t0 = cpu(), time.perf_counter()
                ps = publishers(m.port, a.devices, a.messages)
                ok = ing.done.wait(300)
                wall = time.perf_counter() - t0
                used = cpu() - c0
                for p in ps:
                    p.wait(30)
                print(f"  {mode:>6}: {ing.count} of {total} in {wall:.2f} s = "
                      f"{ing.count / wall:.0f} msg/s; ingress CPU {1e6 * used / ing.count:.0f} "
                      f"us/msg (ceiling {ing.count / used:.0f} msg/s per core)"
                      + ("" if ok else " TIMED OUT"), flush=True)
                ing.close()
        finally:
            m.stop()


if __name__ == "__main__":
    main()
