"""What Mosquitto (the installed one, 2.0.11 here) does with MQTT 5 shared subscriptions, for the
emulator's scaling design (docs/guides/emulator-scaling.md).

    python bench/share_probe.py [--messages 400]

A plain Mosquitto on a free loopback port (anonymous, persistence on, the emulator's
max_inflight_messages 100 and max_queued_messages) and paho clients, MQTT 5, QoS 1:

1. order: two members of `$share/g/ms/+` (persistent sessions, acknowledging at once) and one
   device publishing `--messages` numbered messages on ms/DEV. Prints which member got which
   numbers: per message, not per topic, so one device's messages are split between members.
2. a dead member: member A acknowledges nothing (manual acknowledgement) and is then cut off
   without DISCONNECT (its socket closed, as by kill -9); more messages are published; then A
   comes back with the same client id and its session. Prints what the live member B received
   (A's unacknowledged ones? the new ones meant for A?) and what A received on its return.

Prints facts, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TOPIC = "ms/DEV"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        conf = folder / "m.conf"
        conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true",
            f"user {pwd.getpwuid(os.getuid()).pw_name}", "persistence true",
            f"persistence_location {folder}/", "max_inflight_messages 100",
            "max_queued_messages 200000", f"log_dest file {folder}/m.log", "log_type all", ""]))
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)])
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Member:
    """A shared-subscription member: records the numbers it gets; acknowledges them unless
    `hold` (manual acknowledgement, never sent)."""

    def __init__(self, port: int, cid: str, group: str, hold: bool = False) -> None:
        self.got: list[tuple[int, bool]] = []   # (number, dup flag)
        self.hold = hold
        self.lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=cid, protocol=mqtt.MQTTv5, manual_ack=True)
        self.c.on_message = self._msg
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_connect = lambda c, *a: c.subscribe(group, qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0xFFFFFFFF
        props.ReceiveMaximum = 1000
        self.c.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.c.loop_start()
        assert ready.wait(10)

    def _msg(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((int(msg.payload), bool(msg.dup)))
        if not self.hold:
            client.ack(msg.mid, msg.qos)

    def numbers(self) -> list[int]:
        with self.lock:
            return [n for n, _ in self.got]

    def cut(self) -> None:
        """Close the socket without DISCONNECT, as a killed process would."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish(port: int, numbers: range) -> None:
    p = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="dev",
                    protocol=mqtt.MQTTv311)
    p.connect("127.0.0.1", port)
    p.loop_start()
    infos = [p.publish(TOPIC, str(n).encode(), qos=1) for n in numbers]
    for i in infos:
        i.wait_for_publish(10)
    p.disconnect()
    p.loop_stop()


def settle(pred: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:  # type: ignore[operator]
        time.sleep(0.05)


def runs(numbers: list[int]) -> str:
    """The numbers as ranges with their step: '1,3,5..399 (every 2nd)' style summary."""
    if not numbers:
        return "none"
    steps = {b - a for a, b in zip(numbers, numbers[1:], strict=False)}
    head = ",".join(map(str, numbers[:6]))
    return f"{len(numbers)} messages: {head},... last {numbers[-1]}; steps {sorted(steps)[:5]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    n = ap.parse_args().messages
    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    print(version.splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        m = Mosquitto(Path(tmp))
        try:
            g1, g2 = "$share/g1/ms/+", "$share/g2/ms/+"
            print("\n1. one device, two members of", g1)
            a, b = Member(m.port, "w-a", g1), Member(m.port, "w-b", g1)
            publish(m.port, range(1, n + 1))
            settle(lambda: len(a.numbers()) + len(b.numbers()) >= n)
            print("  member a:", runs(a.numbers()))
            print("  member b:", runs(b.numbers()))
            a.close()
            b.close()

            print("\n2. member a acknowledges nothing, then dies (socket closed, no DISCONNECT)")
            a = Member(m.port, "w-a2", g2, hold=True)
            b = Member(m.port, "w-b2", g2)
            publish(m.port, range(1, n + 1))
            settle(lambda: len(a.numbers()) + len(b.numbers()) >= n)
            held = a.numbers()
            print("  before: a holds", len(held), "unacknowledged, b got", len(b.numbers()),
                  "; the rest waits in a's session:", n - len(held) - len(b.numbers()))
            a.cut()
            time.sleep(0.5)
            before_b = len(b.numbers())
            publish(m.port, range(n + 1, 2 * n + 1))
            settle(lambda: len(b.numbers()) - before_b >= n, 3.0)
            new_b = b.numbers()[before_b:]
            print(f"  after a died: b got {len(new_b)} of the {n} new messages and "
                  f"{len(set(new_b) & set(held))} of a's {len(held)} unacknowledged ones")
            a2 = Member(m.port, "w-a2", g2)  # same client id, same session
            settle(lambda: len(a2.got) >= len(held) + n - len(new_b), 5.0)
            back = a2.got
            dups = sum(1 for _, d in back if d)
            print(f"  a back (same client id): got {len(back)} messages, {dups} with DUP "
                  f"(its unacknowledged ones again), "
                  f"{len({x for x, _ in back} - set(held))} new ones queued for it while away")
            everything = set(b.numbers()) | {x for x, _ in back}
            print(f"  all {2 * n} delivered to someone: {everything == set(range(1, 2 * n + 1))}")
            a2.close()
            b.close()

            print("\n3. step 1's members disconnected cleanly; their sessions persist: are "
                  "they still in", g1, "?")
            c = Member(m.port, "w-c", g1)
            publish(m.port, range(1, n + 1))
            settle(lambda: len(c.numbers()) >= n, 3.0)
            print(f"  a live member c got {len(c.numbers())} of {n}: the offline members' "
                  "share is queued in their sessions")
            ra, rb = Member(m.port, "w-a", g1), Member(m.port, "w-b", g1)
            settle(lambda: len(ra.numbers()) + len(rb.numbers()) + len(c.numbers()) >= n, 5.0)
            print(f"  a and b back: {len(ra.numbers())} and {len(rb.numbers())} queued for them")
            for x in (c, ra, rb):
                x.close()
        finally:
            m.stop()


if __name__ == "__main__":
    main()
