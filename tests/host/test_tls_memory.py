"""Out of memory in a TLS handshake says so (issue 9), on the board model where it happens.

On the i386-rp2 build mbedTLS allocates from the GC heap, as on a Pico W. A handshake that runs
out of memory fails there as ENOMEM (the 16 KiB buffers), as MBEDTLS_ERR_X509_ALLOC_FAILED, or,
when an allocation fails while a signature of the chain is checked, as "The certificate is not
correctly signed by the trusted CA", the very message of a wrong CA. The MQTT client (mqtt.py) and
the WebSocket client (ws.py) must report all of these as out of memory ("TLS handshake with
HOST:PORT ran out of memory (N bytes free); ..."), and a really untrusted certificate still as a
certificate error.

A script on the board fragments its heap the way a long-running agent does: it fills the heap
with small blocks and frees one run of them of a chosen size (where the TLS buffers go) and
optionally holes elsewhere (plenty of free memory, in pieces), then connects to the emulator's
Mosquitto over TLS. It scans the size of the run from too small to enough.

The build comes from settings (microcot_host.fidelity): MICROCOT_FIDELITY_DIR or
MICROCOT_MICROPYTHON_I386_RP2; without it the tests skip with the reason, unless
MICROCOT_REQUIRE_FIDELITY=1 (CI), where a missing build fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from microcot_host import fidelity
from microcot_host.emulator.broker import Broker
from microcot_host.emulator.certs import ensure_ca_and_server

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
DEV, PW = "8949000000000000077", "pw-tls-memory"

SCRIPT = r"""
import sys, json, gc
sys.path.insert(0, %(firmware)r)
with open(sys.argv[1]) as f:
    cfg = json.load(f)
from microcot import hal
from microcot.mqtt import MQTTClient, tls_context, MQTTException, MQTTMemoryError
if cfg["client"] == "ws":
    from microcot import ws as W
    from microcot import wstls, wsframe, wspmd  # imported before the heap is filled

def fill(big, holes):
    # the whole heap in blocks of 240 bytes, then a run of `big` bytes free and `holes` holes
    gc.collect()
    chunks = []
    try:
        while True:
            chunks.append(bytearray(240))
    except MemoryError:
        pass
    k = big // 256 + 1
    mid = len(chunks) // 2
    for i in range(mid, mid + k):
        chunks[i] = None
    step = max(2, (len(chunks) - k) // max(1, holes))
    n = 0
    for i in range(0, len(chunks), step):
        if n >= holes:
            break
        if chunks[i] is not None and not (mid <= i < mid + k):
            chunks[i] = None
            n += 1
    gc.collect()
    return chunks

def mqtt_try(ctx):
    c = MQTTClient(cfg["id"], "localhost", cfg["port"], user=cfg["id"], password=cfg["pw"],
                   ssl=ctx, timeout=10)
    try:
        c.connect()
        c.disconnect()
        return ["connected", ""]
    except MemoryError as e:
        return [type(e).__name__, str(e)]
    except MQTTException as e:
        return [type(e).__name__, str(e)]

def ws_try(tls):
    c = W.WebSocketClient("localhost", cfg["port"], "/", tls=tls, connect_response_timeout=5)
    c.connect()
    n = 0
    while c.state == W.WS_STATUS_BUSY and n < 500:
        c.execute(10)
        n += 1
    st, msg = c.state, c.error_msg
    if c.state != W.WS_STATUS_SOCK_NO_CONN and not c.error:
        c.disconnect()
    return [st, msg]

def attempt(ca, big, holes):
    if cfg["client"] == "ws":
        tls = {"ca": ca}
        chunks = fill(big, holes)
        r = ws_try(tls)
    else:
        ctx = tls_context(cafile=ca)
        chunks = fill(big, holes)
        r = mqtt_try(ctx)
    chunks = None
    gc.collect()
    return r

res = {"scan": []}
if cfg["client"] == "ws":
    res["wrong_ca"] = ws_try({"ca": cfg["other_ca"]})
else:
    res["wrong_ca"] = mqtt_try(tls_context(cafile=cfg["other_ca"]))
res["tls_heap"] = hal._tls_heap
for big in cfg["bigs"]:
    for holes in (0, 200):
        res["scan"].append([big, holes] + attempt(cfg["ca"], big, holes))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def rp2_binary() -> Path:
    try:
        return fidelity.i386_binary("i386-rp2")
    except fidelity.FidelityMissing as exc:
        if fidelity.required():
            pytest.fail(f"MICROCOT_REQUIRE_FIDELITY=1 but the i386-rp2 build is missing: {exc}")
        pytest.skip(f"the i386-rp2 board model is not available here: {exc}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("tlsmem"))
    b.start()
    b.add_device(DEV, PW)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    return str(ensure_ca_and_server(tmp_path_factory.mktemp("otherca")).ca_cert)


def run_board(binary: Path, tmp_path: Path, cfg: dict, heap: str = "300k") -> dict:
    script = tmp_path / "tls_memory_probe.py"
    script.write_text(SCRIPT % {"firmware": str(FIRMWARE)})
    fd, path = tempfile.mkstemp(suffix=".json", prefix="tlsmem-", dir=tmp_path)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.run([str(binary), "-X", f"heapsize={heap}", str(script), path],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1])


BIGS = list(range(16000, 29000, 1000)) + list(range(29000, 34001, 250))  # finer near the edge
# the WebSocket client holds its receive buffer (RX_SIZE) before the handshake starts
WS_BIGS = list(range(16000, 29000, 1000)) + list(range(29000, 44001, 500))


def cfg_for(broker, other_ca, client):
    return {"client": client, "id": DEV, "pw": PW, "port": broker.port,
            "ca": str(broker.ca_cert), "other_ca": other_ca,
            "bigs": WS_BIGS if client == "ws" else BIGS}


def test_mqtt_tls_out_of_memory_is_a_memory_error_and_a_wrong_ca_a_certificate_error(
        rp2_binary, broker, other_ca, tmp_path):
    res = run_board(rp2_binary, tmp_path, cfg_for(broker, other_ca, "mqtt"))
    # a wrong CA, with memory to spare: the certificate error it always was
    cls, msg = res["wrong_ca"]
    assert cls == "MQTTTLSError" and "not correctly signed" in msg, res["wrong_ca"]
    assert res["tls_heap"] is True  # the CA load showed mbedTLS allocating from the GC heap
    where = "TLS handshake with localhost:%d ran out of memory (" % broker.port
    outcomes = {}
    for big, holes, cls, msg in res["scan"]:
        # never a certificate error for the right CA: out of memory, or connected
        assert cls in ("MQTTMemoryError", "connected"), (big, holes, cls, msg)
        if cls == "MQTTMemoryError":
            assert msg.startswith(where) and " bytes free); mbedTLS could not allocate " in msg
            kind = "verify" if "not correctly signed" in msg else "enomem" if "ENOMEM" in msg \
                else "other"
            outcomes.setdefault(kind, []).append((big, holes))
        else:
            outcomes.setdefault("connected", []).append((big, holes))
    # the scan met the buffers failing (ENOMEM), the chain check failing (what used to read as an
    # untrusted certificate), and enough memory
    assert "enomem" in outcomes and "verify" in outcomes and "connected" in outcomes, outcomes
    assert max(b for b, _ in outcomes["connected"]) == BIGS[-1]


def test_ws_tls_out_of_memory_is_sock_nomem_and_a_wrong_ca_verify_fail(
        rp2_binary, broker, other_ca, tmp_path):
    from microcot import wsframe as F

    res = run_board(rp2_binary, tmp_path, cfg_for(broker, other_ca, "ws"))
    st, msg = res["wrong_ca"]
    assert st == F.WS_STATUS_TLS_VERIFY_FAIL and "not correctly signed" in msg, res["wrong_ca"]
    where = "TLS handshake with localhost:%d ran out of memory (" % broker.port
    kinds = set()
    for big, holes, st, msg in res["scan"]:
        # Mosquitto does not speak HTTP: past TLS the upgrade fails, which is fine here
        assert st != F.WS_STATUS_TLS_VERIFY_FAIL, (big, holes, st, msg)
        if st == F.WS_STATUS_SOCK_NOMEM:
            assert msg.startswith(where), (big, holes, msg)
            kinds.add("verify" if "not correctly signed" in msg else "other")
        else:
            kinds.add("past-tls")
    assert {"verify", "other", "past-tls"} <= kinds, res["scan"]
