"""Bytes on the wire per measurement: binary SmartREST vs text SmartREST vs Cumulocity REST JSON.

The reason binary SmartREST exists is the cellular bill. For a few representative measurements
this counts what the device and the platform exchange, built with the firmware's own encoders
(microcot.binrest, microcot.smartrest, microcot.mqttpkt) from the device's template collection
(firmware/templates.csv, template 110 = one series of one measurement):

  binary   MQTT PUBLISH QoS 1 on bs/<ICCID> (fixed header, topic, packet id, binrest payload)
           + the broker's PUBACK (4 bytes)
  text     MQTT PUBLISH QoS 1 on ms/<ICCID> (`15,<X-ID>` line + rows) + PUBACK
  REST     HTTP/1.1 POST /measurement/measurements with the JSON the template would make, with
           Host, Authorization (Basic, tenant/device user and a 20-character password),
           Content-Type, Accept and Content-Length headers; answered with a 201 without body
           (a lower bound: the platform normally echoes the measurement)

Not counted, the same for all three or paid once per connection: TCP/IP headers, TLS records
(5-byte header + ~16-byte tag per record), the TCP/TLS/MQTT connection set-up. MQTT keeps its
connection open; REST is counted with a kept-alive connection too (a new one per measurement
would add a TLS handshake of several kilobytes).

    python bench/payload.py [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "firmware"))

from microcot import binrest, mqttpkt, smartrest  # noqa: E402
from microcot.templates import Collection  # noqa: E402

ICCID = "89490200001234567892"  # 20 digits, as a Telekom SIM
MO = 173224901  # a managed object id of the size the platform hands out
TENANT = "t12345678"
HOST = f"{TENANT}.ram.m2m.telekom.com"
PASSWORD = "x" * 20  # the length the emulator's bootstrap issues; only its length matters here
SEED_TIME = 1505385420  # 2017-09-14T12:37:00+02:00, the seed's measurement
PUBACK = len(mqttpkt.ack(0x40, 1))

# Two templates the device's collection does not have, added for the comparison only: 190, a
# 3-series measurement in ONE row (same shape as 110); 191, the seed's measurement with its
# constant strings (fragment, series, unit, type) in the template, so a row carries only the MO
# id, the value and the time - what binary SmartREST is best at.
EXTRA_TEMPLATES = (
    '10,190,POST,/measurement/measurements,application/json,,%%,'
    'UNSIGNED STRING STRING NUMBER STRING STRING NUMBER STRING STRING NUMBER STRING DATE STRING,'
    '"{""source"":{""id"":""%%""},""%%"":{""%%"":{""value"":%%,""unit"":""%%""},'
    '""%%"":{""value"":%%,""unit"":""%%""},""%%"":{""value"":%%,""unit"":""%%""}},'
    '""time"":""%%"",""type"":""%%""}"',
    '10,191,POST,/measurement/measurements,application/json,,%%,UNSIGNED NUMBER DATE,'
    '"{""source"":{""id"":""%%""},""c8y_Temperature"":{""0"":{""value"":%%,""unit"":""°C""}},'
    '""time"":""%%"",""type"":""c8y_Temperature""}"')


def collection() -> Collection:
    """The device's templates (firmware/templates.csv from its 15 line on) + EXTRA_TEMPLATES."""
    text = (ROOT / "firmware" / "templates.csv").read_text()
    body = text[text.index("\n15,") + 1:] if not text.startswith("15,") else text
    return Collection.from_body("\n".join([body.rstrip("\n"), *EXTRA_TEMPLATES]))


def iso(t: int) -> str:
    """DATE as text, the agent's form (microcot.agent.iso): UTC seconds with Z."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Case:
    name: str
    rows: list[tuple[int, list]]  # (template id, binary values) per measurement row
    measurements: int  # measurements the rows make on the platform


def render(c: Collection, tid: int, values: list) -> tuple[str, str, str, str]:
    """(method, uri, content type, JSON body) the platform makes of one row (the template with
    its placeholders filled as raw text, the URI's first)."""
    t = c.request(tid)
    text = [iso(v) if ty == "DATE" else _num(v) if ty == "NUMBER" else str(v)
            for v, ty in zip(values, t.binary_types(), strict=True)]
    uri = t.uri
    while t.placeholder and t.placeholder in uri:
        uri = uri.replace(t.placeholder, text.pop(0), 1)
    body = t.template
    for v in text:
        body = body.replace(t.placeholder, v, 1)
    return t.method, uri, t.content_type, body


def _num(v: float) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def mqtt_bytes(topic: str, payload: bytes) -> int:
    return len(mqttpkt.publish(topic, payload, qos=1, pid=1)) + PUBACK


def binary_payload(c: Collection, case: Case) -> bytes:
    return binrest.encode_many([(c.xid, tid, c.types_of(tid), v) for tid, v in case.rows])


def text_payload(c: Collection, case: Case) -> bytes:
    rows = []
    for tid, v in case.rows:
        types = c.types_of(tid)
        rows.append([tid] + [iso(x) if ty == "DATE" else x for x, ty in zip(v, types, strict=True)])
    return smartrest.request(c.xid, rows)


def rest_request(c: Collection, case: Case) -> tuple[bytes, bytes]:
    """(HTTP request, HTTP response) posting the same measurements as one request: a single
    measurement, or a measurement collection for several."""
    docs = [json.loads(render(c, tid, v)[3]) for tid, v in case.rows]
    if len(docs) == 1:
        body = json.dumps(docs[0], separators=(",", ":"), ensure_ascii=False)
        media = "application/vnd.com.nsn.cumulocity.measurement+json"
    else:
        body = json.dumps({"measurements": docs}, separators=(",", ":"), ensure_ascii=False)
        media = "application/vnd.com.nsn.cumulocity.measurementcollection+json"
    raw = body.encode()
    auth = base64.b64encode(f"{TENANT}/device_{ICCID}:{PASSWORD}".encode()).decode()
    head = (f"POST /measurement/measurements HTTP/1.1\r\n"
            f"Host: {HOST}\r\n"
            f"Authorization: Basic {auth}\r\n"
            f"Content-Type: {media}\r\n"
            f"Accept: {media}\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n")
    response = ("HTTP/1.1 201 Created\r\n"
                "Date: Thu, 14 Sep 2017 10:37:01 GMT\r\n"
                "Content-Length: 0\r\n"
                "Connection: keep-alive\r\n\r\n")
    return head.encode() + raw, response.encode()


def cases() -> list[Case]:
    seed = [MO, "c8y_Temperature", "0", 395.3, "°C", SEED_TIME, "c8y_Temperature"]
    phases = [[MO, "c8y_Voltage", f"L{i}", v, "V", SEED_TIME, "c8y_Voltage"]
              for i, v in ((1, 230.4), (2, 229.8), (3, 231.1))]
    three = [MO, "c8y_Voltage", "L1", 230.4, "V", "L2", 229.8, "V", "L3", 231.1, "V",
             SEED_TIME, "c8y_Voltage"]
    small = [MO, "c8y_Humidity", "h", 45, "%", SEED_TIME, "c8y_Humidity"]
    return [
        Case("seed: 395.3 °C, 1 series", [(110, seed)], 1),
        Case("humidity 45 %, 1 series", [(110, small)], 1),
        Case("seed, constants in template 191", [(191, [MO, 395.3, SEED_TIME])], 1),
        Case("3 series, 1 row (template 190)", [(190, three)], 1),
        Case("3 series as 3 rows of 110", [(110, p) for p in phases], 3),
        Case("10 x seed in one message", [(110, seed)] * 10, 10),
    ]


def measure(c: Collection, case: Case) -> dict:
    b = binary_payload(c, case)
    t = text_payload(c, case)
    req, resp = rest_request(c, case)
    # the firmware's decoder must read back what we count (the platform decodes with it too)
    assert len(binrest.decode(b, c.lookup)) == len(case.rows)
    n = case.measurements
    return {
        "case": case.name, "measurements": n,
        "binary": {"payload": len(b), "wire": mqtt_bytes("bs/" + ICCID, b)},
        "text": {"payload": len(t), "wire": mqtt_bytes("ms/" + ICCID, t)},
        "rest": {"payload": len(req) - req.index(b"\r\n\r\n") - 4, "request": len(req),
                 "response": len(resp), "wire": len(req) + len(resp)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    c = collection()
    rows = [measure(c, k) for k in cases()]
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    print(f"bytes on the wire per measurement (device ID = 20-digit ICCID, X-ID {c.xid!r}, "
          f"MO id {MO}); MQTT: PUBLISH QoS 1 + PUBACK, REST: request + a 201 without body\n")
    w = 32
    print(f"{'measurement':<{w}} {'binary':>7} {'text':>7} {'REST':>7}  "
          f"{'text/bin':>8} {'REST/bin':>8}")
    for r in rows:
        n = r["measurements"]
        b, t, h = (r[k]["wire"] / n for k in ("binary", "text", "rest"))
        print(f"{r['case']:<{w}} {b:>7.1f} {t:>7.1f} {h:>7.1f}  {t / b:>7.2f}x {h / b:>7.2f}x")
    print("\nwhere the bytes go (whole message, not per measurement)\n")
    print(f"{'measurement':<{w}} {'bin pay':>7} {'txt pay':>7} {'JSON':>6} {'HTTP req':>8} "
          f"{'HTTP resp':>9} {'MQTT hdr':>8}")
    for r in rows:
        hdr = r["binary"]["wire"] - r["binary"]["payload"] - PUBACK
        print(f"{r['case']:<{w}} {r['binary']['payload']:>7} {r['text']['payload']:>7} "
              f"{r['rest']['payload']:>6} {r['rest']['request']:>8} {r['rest']['response']:>9} "
              f"{hdr:>8}")
    print(f"\nMQTT header = fixed header + topic ({len('bs/' + ICCID)} + 2 bytes) + packet id (2); "
          f"the PUBACK adds {PUBACK} bytes to each MQTT message.")


if __name__ == "__main__":
    main()
