"""Our KICS tag-value client (microcot.kics.TagValueClient over microcot.ws) against the emulator,
on CPython in-process and on MicroPython (the unix port, TLS verified against the emulator's CA,
a 100 KB heap like a board's): every field type decoded to what the emulator sent, re-subscription
after a dropped connection and after a SignalR close, 401 as KicsAuthError, the one-subscription
rule, the SignalR server timeout."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import threading
import time

import pytest
from fidelity_fixtures import need_runtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microcot import kics, signalr
from microcot_host import boards
from microcot_host.deploy import compile_module
from microcot_host.kics_emulator import KicsEmulator, default_tags
from microcot_host.paths import firmware_dir
from microcot_host.vboard.models import heap_for, micropython_for

TOKEN = "client-test-token"
SEED_TAG = ("Asset 079", "Asdu_1_object_1001")
ALL_TAGS = [t.key for t in default_tags()]
MISSING = ("Asset 079", "missing")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kics-client")


@pytest.fixture
def emu(data_dir):
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, ping_interval=0.5) as e:
        yield e


def _client(emu, tags=ALL_TAGS, token=TOKEN, **kw):
    log = {"values": [], "status": [], "errors": []}
    kw.setdefault("reconnect_interval", 0.1)
    c = kics.TagValueClient("localhost", token, tags, kw.pop("rate", None), port=emu.port,
                            tls={"ca": str(emu.ca_cert)}, on_value=log["values"].append,
                            on_status=lambda t, r: log["status"].append((t, r)),
                            on_error=log["errors"].append, **kw)
    return c, log


def _run(c, until, timeout=5.0):
    end = time.monotonic() + timeout
    while not until():
        if time.monotonic() > end:
            raise AssertionError(f"timed out: {c!r}, error {c.error!r}")
        c.execute(10)


def _expected_py(fields):
    """The emulator's wire fields in the shape of Field.to_py()."""
    out = {}
    for name, f in fields.items():
        t = f["t"]
        if t in ("st", "un"):
            out[name] = _expected_py(f["v"])
        elif t == "e":
            out[name] = (f["n"], f["v"], f["s"])
        elif t == "d":
            out[name] = float(f["v"])
        else:
            out[name] = f["v"]
    return out


# MicroPython on ESP32 and RP2 boards (and their 32-bit models) has single-precision floats:
# 24-bit mantissa, and it prints them with 7 significant digits
F32_REL = 1e-6


def _same(a, b, where="d", rel=1e-12):
    """Equal, floats within `rel` (MicroPython prints floats its own way)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}", rel)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]", rel)
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=rel), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def _types(tv):
    out, stack = set(), list(tv.fields.values())
    while stack:
        f = stack.pop()
        out.add(f.type)
        if f.type in ("st", "un"):
            stack.extend(f.value.values())
    return out


# -- CPython ---------------------------------------------------------------------------------------


def test_every_field_type_decoded_as_sent(emu):
    c, log = _client(emu, ALL_TAGS + [MISSING])
    c.connect()
    _run(c, lambda: all(sum(v.tag == t for v in log["values"]) >= 3 for t in ALL_TAGS))
    c.close()
    assert c.state == kics.STOPPED and log["errors"] == []
    assert c.tag_status == {**{t: kics.OK for t in ALL_TAGS}, MISSING: kics.NOT_FOUND}
    assert sorted(log["status"]) == sorted([(t, "ok") for t in ALL_TAGS] + [(MISSING, "notFound")])
    types = set()
    for tv in log["values"]:
        sent = emu.value_for(tv.tag_id, tv.ts)
        assert (tv.type_name, tv.direction, tv.mp) == (sent["n"], sent["dn"], sent["mp"])
        _same(_expected_py(sent["d"]), tv.to_py())
        types |= _types(tv)
    assert types == set(kics.FIELD_TYPES)
    assert c.values[SEED_TAG] is [v for v in log["values"] if v.tag == SEED_TAG][-1]
    # three changes in a row of the u64 tag include one beyond 2**63, compared exact above
    assert any(v.x > 2**63 for v in log["values"] if v.tag_id == 104)
    for _ in range(50):  # the close handshake completes
        c.execute(5)
    assert _wait(lambda: emu.connections == 0)


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_resubscribes_after_drop_and_after_signalr_close(emu):
    c, log = _client(emu, [SEED_TAG])
    c.connect()
    _run(c, lambda: log["values"])
    emu.drop_connections()  # a network failure: no close frame, no SignalR close
    _run(c, lambda: c.state == kics.WAITING or emu.subscriptions_started == 2)
    _run(c, lambda: c.subscribed and emu.subscriptions_started == 2)
    assert isinstance(log["errors"][0], kics.KicsConnectionError)
    assert log["status"] == [(SEED_TAG, "ok"), (SEED_TAG, None), (SEED_TAG, "ok")]
    n = len(log["values"])
    _run(c, lambda: len(log["values"]) > n)  # values flow again
    emu.close_connections("restarting", allow_reconnect=True)
    _run(c, lambda: emu.subscriptions_started == 3 and c.subscribed)
    assert "restarting" in str(log["errors"][-1])
    # a close that does not allow reconnecting is final
    emu.close_connections("going away for good", allow_reconnect=False)
    _run(c, lambda: c.state == kics.FAILED)
    assert "going away for good" in str(c.error) and emu.subscriptions_started == 3
    assert c.attempts == 3


def test_401_is_an_auth_error_and_not_retried(emu):
    c, log = _client(emu, token="not-the-token")
    c.connect()
    _run(c, lambda: c.state == kics.FAILED)
    assert isinstance(c.error, kics.KicsAuthError) and "401" in str(c.error)
    assert log["errors"] == [c.error] and c.attempts == 1
    for _ in range(20):
        c.execute(5)
    assert c.attempts == 1 and emu.events == [("unauthorized", kics.PATH)]  # no retry
    with pytest.raises(kics.KicsArgumentError):
        kics.TagValueClient("localhost", "", [SEED_TAG])


def test_one_subscription_rule_then_retry(emu):
    holder, hlog = _client(emu, [SEED_TAG])
    holder.connect()
    _run(holder, lambda: holder.subscribed)
    c, log = _client(emu, [SEED_TAG], reconnect_interval=0.1, reconnect_max=0.2)
    c.connect()

    def both():
        holder.execute(1)
        return any(isinstance(e, kics.KicsSubscriptionLimitError) for e in log["errors"])

    _run(c, both)
    limit = [e for e in log["errors"] if isinstance(e, kics.KicsSubscriptionLimitError)][0]
    assert "excessive number of connections" in str(limit).lower()
    assert c.state in (kics.WAITING, kics.CONNECTING, kics.HANDSHAKE, kics.SUBSCRIBING)
    holder.close()
    for _ in range(20):
        holder.execute(5)
    _run(c, lambda: c.subscribed and log["values"])  # retried until the subscription was free
    c.close()


def test_server_timeout_reconnects(data_dir):
    # no pings from the server and no values (the tag does not exist): after server_timeout
    # seconds of silence the client gives the connection up and connects again
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, ping_interval=0) as emu:
        c, log = _client(emu, [MISSING], server_timeout=0.5, keep_alive_interval=0.2)
        c.connect()
        _run(c, lambda: c.subscribed)
        _run(c, lambda: emu.subscriptions_started == 2)
        assert "Server timeout" in str(log["errors"][0])
        c.close()


def test_subscribe_replaces_the_subscription(emu):
    c, log = _client(emu, [MISSING])
    c.connect()
    _run(c, lambda: c.subscribed)
    c.subscribe([("PLC 1", "Counter64")], 20)
    _run(c, lambda: log["values"])
    assert log["values"][0].tag == ("PLC 1", "Counter64")
    assert emu.events[-1] == ("subscribe", [("PLC 1", "Counter64")], 20.0)
    c.close()


# -- MicroPython -------------------------------------------------------------------------------------

MP_SCRIPT = r"""
import sys, json, time, gc
sys.path.insert(0, sys.argv[2])
from microcot import kics, ws
cfg = json.loads(open(sys.argv[1]).read())
st = {"dropped": False, "after": 0, "values": 0, "held": None}
def out(*a):
    print(json.dumps(a))
def on_status(t, r):
    out("status", t, r)
    if r is None:
        st["dropped"] = True
def on_value(tv):
    out("value", tv.tag_id, tv.ts, tv.to_py())
    st["values"] += 1
    if st["dropped"]:
        st["after"] += 1
gc.collect()
before = gc.mem_alloc()
tls = {"ca": cfg["ca"]} if cfg["ca"] else None
c = kics.TagValueClient(cfg["host"], cfg["token"], [tuple(t) for t in cfg["tags"]], None,
                        port=cfg["port"], tls=tls, on_value=on_value,
                        on_status=on_status, reconnect_interval=0.2,
                        on_error=lambda e: out("error", type(e).__name__, str(e)),
                        ws_options={"max_recv_msg_size": 0x8000})
c.connect()
t0 = time.ticks_ms()
while time.ticks_diff(time.ticks_ms(), t0) < cfg["seconds"] * 1000:
    c.execute(10)
    if c.state == kics.SUBSCRIBED and st["held"] is None:
        gc.collect()
        st["held"] = gc.mem_alloc() - before  # what one subscribed connection keeps
    if c.state == kics.FAILED or (cfg["after"] and st["after"] >= cfg["after"]) \
            or (cfg["values"] and st["values"] >= cfg["values"]):
        break
out("end", c.state_name, c.attempts, st["held"])
"""


@pytest.fixture(scope="module")
def mp_lib(tmp_path_factory):
    """The modules the client needs, compiled to .mpy as deploy puts them on a board: compiling
    kics.py from source would not fit the 100 KB heap."""
    lib = tmp_path_factory.mktemp("mplib")
    (lib / "microcot").mkdir()
    src = firmware_dir() / "microcot"
    for path in [src / "__init__.py", src / "hal.py", src / "kics.py", src / "signalr.py", *src.glob("ws*.py")]:
        compile_module(path, f"microcot/{path.name}", None, lib / "microcot")
    return lib


def _mp_run(emu, tmp_path, lib, token=TOKEN, tags=ALL_TAGS, seconds=15, after=0, values=0,
            board="esp32-generic", on_line=None):
    """The client script on the board file's faithful model (a 32-bit build) with the free heap
    the real board has after boot (its budget)."""
    bdef = boards.load(board)
    need_runtime(bdef.runtime)
    mp = micropython_for(bdef.runtime)
    heap = heap_for(bdef, bdef.runtime)
    (tmp_path / "mp_kics.py").write_text(MP_SCRIPT)
    # settings in a file: the unix port stops on command-line arguments of 256+ characters
    (tmp_path / "cfg.json").write_text(json.dumps({
        "host": "localhost", "port": emu.port, "token": token,
        "ca": str(emu.ca_cert) if emu.ca_cert else None,
        "tags": tags, "seconds": seconds, "after": after, "values": values}))
    proc = subprocess.Popen([mp, "-X", f"heapsize={heap}", str(tmp_path / "mp_kics.py"),
                             str(tmp_path / "cfg.json"), str(lib)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(seconds + 20, proc.kill)
    timer.start()
    lines, other = [], []
    try:
        for raw in proc.stdout:
            if not raw.startswith("["):
                other.append(raw)
                continue
            line = json.loads(raw)
            lines.append(line)
            if on_line:
                on_line(line, lines)
        proc.wait()
    finally:
        timer.cancel()
    assert proc.returncode == 0 and not other, "".join(other) + proc.stderr.read()
    return lines


def test_micropython_client_every_type_and_resubscription(emu, tmp_path, mp_lib):
    dropped = []

    def drop_after_first_values(line, lines):
        if not dropped and sum(x[0] == "value" for x in lines) >= 6:
            dropped.append(emu.drop_connections())

    # over TLS on the Pico W's model: mbedTLS takes its buffers from the GC heap, as on the rp2 port
    lines = _mp_run(emu, tmp_path, mp_lib, after=6, board="rp2-pico-w",
                    on_line=drop_after_first_values)
    assert lines[-1][:3] == ["end", "subscribed", 2], lines[-5:]
    assert dropped == [1] and emu.subscriptions_started == 2
    status = [tuple(x[1:]) for x in lines if x[0] == "status"]
    assert [s for s in status if s[1] is None]  # the drop made every tag unconfirmed ...
    assert status[-3:] == [([a, t], "ok") for a, t in ALL_TAGS]  # ... and then confirmed again
    assert [x[1] for x in lines if x[0] == "error"] == ["KicsConnectionError"]
    values = [x for x in lines if x[0] == "value"]
    seen = set()
    for _, tag_id, ts, py in values:
        sent = emu.value_for(tag_id, ts)
        _same(json.loads(json.dumps(_expected_py(sent["d"]))), py, rel=F32_REL)
        seen.add(tag_id)
    assert seen == {102, 103, 104}
    assert any(py["value"] > 2**63 for _, tag_id, _, py in values if tag_id == 104)
    held = lines[-1][3]
    print(f"MicroPython: a subscribed TLS connection holds {held} bytes of heap")
    assert held < 80_000, held


def test_micropython_client_plain_ws_on_the_esp32_budget_and_401(data_dir, tmp_path, mp_lib):
    # the ESP32's model at its budget (88,000 B free after boot): the modules kics, signalr, ws,
    # wsframe and hal loaded from .mpy take most of it (frozen into the firmware they take none)
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, tls=False) as emu:
        lines = _mp_run(emu, tmp_path, mp_lib, token="wrong", seconds=5)
        assert lines[-1][:3] == ["end", "failed", 1]
        assert lines[0][:2] == ["error", "KicsAuthError"] and "401" in lines[0][2]
        lines = _mp_run(emu, tmp_path, mp_lib, values=12, seconds=10)
        assert lines[-1][:2] == ["end", "subscribed"]
        assert {x[1] for x in lines if x[0] == "value"} == {102, 103, 104}
        held = lines[-1][3]
        print(f"MicroPython: a subscribed ws:// connection holds {held} bytes of heap")
        assert held < 40_000, held


# -- sans-I/O properties (CPython, hypothesis) -------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=12)
_props = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _quoted(v):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, list):
            return [_quoted(x) for x in v]
        if isinstance(v, dict):
            return {k: _quoted(x) for k, x in v.items()}
        return v
    return str(v) if len(str(abs(v))) >= 19 else v


@_props
@given(_json)
def test_quote_big_ints_keeps_every_value(doc):
    text = json.dumps(doc, ensure_ascii=False)
    assert json.loads(signalr.quote_big_ints(text)) == _quoted(doc)
    assert signalr.loads(text) == doc


@_props
@given(st.lists(_json, min_size=1, max_size=5), st.data())
def test_records_reassemble_however_split(docs, data):
    stream = b"".join(signalr.record(d) for d in docs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    rec, got, last = signalr.Records(), [], 0
    for c in cuts + [len(stream)]:
        got += rec.feed(stream[last:c])
        last = c
    assert [json.loads(r) for r in got] == docs


@_props
@given(_json)
def test_decoders_raise_only_their_errors(obj):
    with contextlib.suppress(kics.KicsDecodeError):
        kics.decode_field("f", obj)
    with contextlib.suppress(kics.KicsError):
        kics.parse_item(obj)
    with contextlib.suppress(signalr.SignalRError):
        signalr.parse(obj if isinstance(obj, dict) else json.dumps(obj).encode())
    for t in kics.FIELD_TYPES:
        with contextlib.suppress(kics.KicsDecodeError):
            kics.decode_field("f", {"t": t, "v": obj, "n": "E", "s": "S"})
