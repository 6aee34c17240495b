"""paho-mqtt as the peer of bench/agent.py, in a process of its own (so it does not share the
emulator's GIL, as it did when it ran inside the bench's process).

Talks JSON lines over stdin/stdout. First line in: the settings {host, port, ca, device,
password, mo, inflight, xid, t0}; it connects (MQTT 3.1.1, TLS verified, clean_session False) and
answers {"ready": true}. Then per run {"kind": "Text0"|"Binary3", "n": N}: publishes the N rows
(SmartREST 110 measurements built with the firmware's own encoders) with QoS 1 and at most
`inflight` in flight, and answers {"seconds": first publish() -> last PUBACK, "errors": [...]}
with any error rows the platform sent on mr/ or br/. {"quit": true} ends it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "firmware")]

import paho.mqtt.client as mqtt  # noqa: E402

from microcot import binrest, smartrest  # noqa: E402
from microcot_host.emulator.certs import client_ssl_context  # noqa: E402

TYPES_110 = ["UNSIGNED", "STRING", "STRING", "NUMBER", "STRING", "DATE", "STRING"]


def rows(cfg: dict, kind: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    dev, mo = cfg["device"], int(cfg["mo"])
    for k in range(1, n + 1):
        v: list = [mo, "c8y_Temperature", "T", 20 + (k % 50) / 10, "C", cfg["t0"] + k,
                   "mc_Bench" + kind]
        if kind.startswith("Text"):
            v[5] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v[5]))
            out.append(("ms/" + dev, smartrest.request(cfg["xid"], [[110, *v]])))
        else:
            out.append(("bs/" + dev, binrest.encode(cfg["xid"], 110, TYPES_110, v)))
    return out


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    acked = [0]
    want = [0]
    done = threading.Event()
    errors: list[str] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                    client_id=cfg["device"], protocol=mqtt.MQTTv311, clean_session=False)
    c.username_pw_set(cfg["device"], cfg["password"])
    c.tls_set_context(client_ssl_context(cfg["ca"]))
    c.max_inflight_messages_set(cfg["inflight"])
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *a, **k: connected.set()

    def on_publish(client: mqtt.Client, userdata: object, mid: int, rc: object = None,
                   props: object = None) -> None:
        acked[0] += 1
        if acked[0] >= want[0]:
            done.set()

    c.on_publish = on_publish
    c.on_message = lambda client, userdata, msg: errors.append(msg.payload.decode(errors="replace"))
    c.connect(cfg["host"], cfg["port"], keepalive=30)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise SystemExit("paho: no CONNACK")
        c.subscribe([("mr/" + cfg["device"], 1), ("br/" + cfg["device"], 1)])
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("quit"):
                break
            batch = rows(cfg, req["kind"], req["n"])  # built before the clock starts
            acked[0], want[0] = 0, req["n"]
            done.clear()
            errors.clear()
            t0 = time.monotonic()
            for topic, payload in batch:
                c.publish(topic, payload, qos=1)
            ok = done.wait(120)
            secs = time.monotonic() - t0
            print(json.dumps({"seconds": secs, "acked": acked[0], "ok": ok,
                              "errors": errors[:3]}), flush=True)
    finally:
        c.disconnect()
        c.loop_stop()


if __name__ == "__main__":
    main()
