"""The KICS tag-value emulator is real SignalR: driven by the `signalrcore` client library (a peer
no one here wrote), by the `websockets` client with our sans-I/O signalr + kics pieces, and by raw
records to check the protocol details (handshake errors, pings, cancel, timeouts, 401/404)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.transport.sockets.errors import SocketHandshakeError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from microcot import kics, signalr
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.kics_emulator import (
    LIMIT_ERROR,
    KicsEmulator,
    TagFileError,
    check_argument,
    default_tags,
    kics_emulator,
    load_tags,
    parse_tags,
)

TOKEN = "s3cret-token"
RS = b"\x1e"
SEED_TAG = ("Asset 079", "Asdu_1_object_1001")
ALL_TAGS = [t.key for t in default_tags()]
pytestmark = pytest.mark.timeout(60)


def _wait(cond, timeout=5.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _arg(tags, rate=None):
    return {"tagIdentifiers": [{"tagName": t, "assetName": a} for a, t in tags],
            "streamConfig": {"samplingRateHz": rate}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kics")


@pytest.fixture
def emu(data_dir):
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, ping_interval=0.3) as e:
        yield e


# -- signalrcore ----------------------------------------------------------------------------------


class Hub:
    """A signalrcore connection the way the seed's example builds it."""

    def __init__(self, emu, options):
        self.items, self.errors, self.completed = [], [], []
        self.opened = threading.Event()
        opts = {"ssl_context": client_ssl_context(emu.ca_cert)}
        opts.update(options)
        self.conn = HubConnectionBuilder().with_url(emu.http_url, options=opts).build()
        self.conn.on_open(self.opened.set)
        self.conn.on_error(self.errors.append)

    def start(self):
        self.conn.start()
        assert self.opened.wait(5)
        return self

    def stream(self, arg):
        # signalrcore sends the invocation before stream(...).subscribe(...) can set the callbacks,
        # so items that arrive at once (our confirmations) would hit its "no callback" default:
        # subscribe the handler just before the invocation goes out
        callbacks = {"next": self.items.append, "complete": self.completed.append,
                     "error": self.errors.append}
        send = self.conn.transport.send

        def send_subscribed(message):
            for handler in self.conn.stream_handlers.get(message.invocation_id, []):
                handler.subscribe(callbacks)
            send(message)

        self.conn.transport.send = send_subscribed
        try:
            self.conn.stream("GetTagValuesStream", [arg])
        finally:
            self.conn.transport.send = send

    def stop(self):
        self.conn.stop()


def test_signalrcore_seed_example_streams_every_field_type(emu):
    # the seed's example: negotiation first, "authorization: bearer <token>" in the headers option
    hub = Hub(emu, {"headers": {"authorization": "bearer " + TOKEN}}).start()
    try:
        hub.stream(_arg(ALL_TAGS + [("Asset 079", "no such tag")]))
        assert _wait(lambda: len({i["value"]["tagId"] for i in hub.items if "value" in i}) == 3)
    finally:
        hub.stop()
    confs = [i["confirmation"] for i in hub.items if "confirmation" in i]
    assert [(c["tagIdentifier"]["assetName"], c["tagIdentifier"]["tagName"], c["result"]) for c in confs] \
        == [(a, t, "ok") for a, t in ALL_TAGS] + [("Asset 079", "no such tag", "notFound")]
    assert [c["tagId"] for c in confs] == [102, 103, 104, None]
    assert hub.errors == []
    # tagValue is the JSON text of the tag data; decoded by kics into every field type
    types, values = set(), []
    for item in hub.items:
        if "value" in item:
            assert isinstance(item["value"]["tagValue"], str)
            tv = kics.parse_item(item)
            values.append(tv)
            stack = list(tv.fields.values())
            while stack:
                f = stack.pop()
                types.add(f.type)
                if f.type in ("st", "un"):
                    stack.extend(f.value.values())
    assert types == set(kics.FIELD_TYPES)
    seed = [v for v in values if v.tag_id == 102]
    assert seed and all(v.type_name == "TagStructure1" and v.main is v["value"] for v in seed)
    assert all(v.markers["q"] is v["quality"] for v in seed)
    un = seed[0]["unionfield"]
    assert un["low4bits"].value == un["_"].value & 0xF and un["high4bits"].value == (un["_"].value >> 4) & 0xF


def test_signalrcore_token_factory_without_negotiation(emu):
    hub = Hub(emu, {"access_token_factory": lambda: TOKEN, "skip_negotiation": True}).start()
    try:
        hub.stream(_arg([SEED_TAG], 50))
        assert _wait(lambda: any("value" in i for i in hub.items))
    finally:
        hub.stop()
    assert hub.items[0]["confirmation"]["result"] == "ok"
    assert _wait(lambda: emu.active_subscription is None)  # closing ended the subscription


def test_signalrcore_401_without_or_with_a_wrong_token(emu):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:  # negotiation is refused
        Hub(emu, {}).conn.start()
    assert e.value.code == 401
    with pytest.raises(SocketHandshakeError, match="401"):  # the WebSocket request is refused
        Hub(emu, {"skip_negotiation": True, "headers": {"Authorization": "Bearer wrong"}}).conn.start()
    assert [ev[0] for ev in emu.events] == ["unauthorized", "unauthorized"]


def test_signalrcore_second_subscription_refused(emu):
    first = Hub(emu, {"access_token_factory": lambda: TOKEN}).start()
    second = Hub(emu, {"access_token_factory": lambda: TOKEN}).start()
    try:
        first.stream(_arg([SEED_TAG]))
        assert _wait(lambda: emu.active_subscription is not None)
        second.stream(_arg([SEED_TAG]))
        assert _wait(lambda: second.errors)
        assert second.errors[0].error == LIMIT_ERROR and "excessive number of connections" in LIMIT_ERROR.lower()
        assert isinstance(kics.classify_error(second.errors[0].error), kics.KicsSubscriptionLimitError)
        assert not any("value" in i for i in second.items)
        first.stop()
        assert _wait(lambda: emu.active_subscription is None)
        second.stream(_arg([SEED_TAG]))  # the one subscription is free again
        assert _wait(lambda: any("value" in i for i in second.items))
    finally:
        first.stop()
        second.stop()


def test_signalrcore_argument_errors_are_described(emu):
    hub = Hub(emu, {"access_token_factory": lambda: TOKEN}).start()
    try:
        hub.stream({"tagIdentifiers": [{"tagName": "", "assetName": "A"}, "x"],
                    "streamConfig": {"samplingRateHz": -1}})
        assert _wait(lambda: hub.errors)
    finally:
        hub.stop()
    text = hub.errors[0].error
    assert "tagIdentifiers[0].tagName" in text and "tagIdentifiers[1]" in text
    assert "samplingRateHz" in text and "-1" in text
    assert emu.active_subscription is None


# -- our sans-I/O pieces over the websockets client ---------------------------------------------------


def _ws(emu, token=TOKEN, path=None, **kw):
    url = emu.url if path is None else emu.url.split("/kics4net")[0] + path
    headers = {"Authorization": "Bearer " + token} if token else {}
    return connect(url, ssl=client_ssl_context(emu.ca_cert), additional_headers=headers,
                   open_timeout=5, **kw)


def _drive(ws, ses, until, timeout=5.0):
    """Pump a kics.Session over a websockets connection until until() or the timeout."""
    t0 = time.monotonic()
    frames = []
    while not until():
        now = int((time.monotonic() - t0) * 1000)
        out = ses.data_to_send(now)
        if out:
            ws.send(out.decode())
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out; state %s, error %r" % (ses.state, ses.error))
        try:
            msg = ws.recv(timeout=0.05)
        except TimeoutError:
            ses.tick(now)
            continue
        frames.append(msg)
        ses.receive(msg, int((time.monotonic() - t0) * 1000))
    return frames


def test_our_session_over_websockets(emu):
    got, status, errors = [], [], []
    ses = kics.Session(ALL_TAGS + [("nobody", "nothing")], None, on_value=got.append,
                       on_status=lambda t, r: status.append((t, r)), on_error=errors.append)
    with _ws(emu) as ws:
        ses.connection_made(0)
        frames = _drive(ws, ses, lambda: {v.tag for v in got} == set(ALL_TAGS))
    assert ses.state == kics.SUBSCRIBED and errors == []
    assert ses.tag_status == {**{t: "ok" for t in ALL_TAGS}, ("nobody", "nothing"): "notFound"}
    # the four confirmations came in one WebSocket message: several records per frame
    assert any(f.count("\x1e") >= 4 and "confirmation" in f for f in frames)
    by_tag = {v.tag: v for v in got}
    seed = by_tag[SEED_TAG]
    assert seed.tag_id == 102 and seed.x == seed["value"].value and isinstance(seed.x, float)
    cmd = by_tag[("Asset 079", "Asdu_1_object_1003")]
    assert cmd.main is cmd["command"] and cmd.x.name == "OpType" and cmd.direction == "rw"
    assert cmd.markers["t"] is cmd["time"] and cmd.markers["ds"].path == "status.ds"
    assert cmd["status"]["big"].value in (-(2**63), 2**63 - 1)
    assert {f.marker for f in cmd.marked} == {"t", "o", "ct", "ts", "ds"}
    # the emulator's u values (2**64 - 1 - k, k, 2**53 + 1 + k, 2**63 + k) arrive exact
    for v in got:
        if v.tag_id == 104:
            x = v.x
            assert isinstance(x, int) and any(0 <= d < 10**6 for d in (2**64 - 1 - x, x, x - 2**53 - 1, x - 2**63)), x
    assert isinstance(seed["mask"].value, int) and 0 <= seed["mask"].value < 2**64


def test_our_session_records_split_across_messages_and_object_format(data_dir):
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, chunk_size=7,
                      tag_value_format="object") as emu:
        got = []
        ses = kics.Session([SEED_TAG], 20, on_value=got.append)
        with _ws(emu) as ws:
            ses.connection_made(0)
            frames = _drive(ws, ses, lambda: len(got) >= 2)
    assert max(len(f) for f in frames) <= 7  # every record arrived in pieces
    assert got[0].tag == SEED_TAG and got[0]["mask"].type == "u"


def test_values_change_and_follow_the_sampling_rate(data_dir):
    tags = parse_tags([{"asset": "A", "tag": "fast", "period": 0.02, "fields": {"v": {"t": "i", "x": True}}}])
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, tags=tags) as emu:
        for rate, lo, hi in ((None, 15, 40), (5.0, 2, 5)):
            got = []
            ses = kics.Session([("A", "fast")], rate, on_value=got.append)
            with _ws(emu) as ws:
                ses.connection_made(0)
                _drive(ws, ses, lambda s=ses: s.state == kics.SUBSCRIBED)
                t0 = time.monotonic()
                _drive(ws, ses, lambda t=t0: time.monotonic() - t > 0.6, timeout=3)
            assert _wait(lambda: emu.active_subscription is None)
            n = len(got)
            assert lo <= n <= hi, (rate, n)
            assert len({v.ts for v in got}) == n  # every value sent is a new one


def test_resubscribe_after_drop_with_our_session(emu):
    got = []
    ses = kics.Session([SEED_TAG], None, on_value=got.append)
    with _ws(emu) as ws:
        ses.connection_made(0)
        _drive(ws, ses, lambda: got)
        assert emu.drop_connections() == 1
        with pytest.raises(Exception):  # noqa: B017 - whatever the library raises for a dead socket
            while True:
                ws.recv(timeout=2)
    ses.connection_lost("dropped")
    assert ses.state == kics.WAITING and ses.tag_status[SEED_TAG] is None
    n = len(got)
    assert _wait(lambda: emu.active_subscription is None)
    with _ws(emu) as ws:
        ses.connection_made(0)
        _drive(ws, ses, lambda: len(got) > n)
    assert emu.subscriptions_started == 2 and ses.tag_status[SEED_TAG] == "ok"


# -- raw protocol details ----------------------------------------------------------------------------


def _records(ws, n=1, timeout=3.0):
    rec = signalr.Records()
    out = []
    end = time.monotonic() + timeout
    while len(out) < n:
        msg = ws.recv(timeout=max(0.01, end - time.monotonic()))
        out += [json.loads(r) for r in rec.feed(msg)]
    return out


def _open(ws):
    ws.send(signalr.handshake_request().decode())
    assert _records(ws) == [{}]


def test_handshake_errors(emu):
    with _ws(emu) as ws:
        ws.send('{"protocol":"messagepack","version":1}\x1e')
        assert _records(ws) == [{"error": "The protocol 'messagepack' is not supported."}]
    with _ws(emu) as ws:
        ws.send('{"protocol":"json","version":2}\x1e')
        assert "version 2" in _records(ws)[0]["error"]
    with _ws(emu) as ws:  # a handshake in two pieces is fine
        ws.send('{"protocol":"js')
        ws.send('on","version":1}\x1e')
        assert _records(ws) == [{}]


def test_pings_cancel_and_seed_raw_example(emu):
    with _ws(emu, path="/kics4net/api/tag-values") as ws:  # the seed's raw example: old path,
        _open(ws)
        # ... lower-case target and invocation id '0'
        ws.send(json.dumps({"arguments": [_arg([("asset_02", "tag_01"), SEED_TAG], 5)],
                            "invocationId": "0", "target": "getTagValuesStream", "type": 4}) + "\x1e")
        recs = _records(ws, 3)
        assert recs[0]["item"]["confirmation"]["result"] == "notFound"
        assert recs[1]["item"]["confirmation"]["tagId"] == 102
        assert "value" in recs[2]["item"]
        ws.send(signalr.cancel_invocation("0").decode())
        assert _wait(lambda: emu.active_subscription is None)
        end = time.monotonic() + 2
        while time.monotonic() < end:  # values stop, the server keeps pinging
            r = _records(ws)[0]
            if r == {"type": 6}:
                break
        assert r == {"type": 6}


def test_invocation_errors(emu):
    with _ws(emu) as ws:
        _open(ws)
        ws.send(signalr.stream_invocation("1", "Nope", []).decode())
        ws.send(signalr.invocation("GetTagValuesStream", [_arg([SEED_TAG])], "2").decode())
        ws.send(signalr.stream_invocation("3", "GetTagValuesStream", [1, 2]).decode())
        ws.send(signalr.stream_invocation("4", "GetTagValuesStream", [{"streamConfig": 5}]).decode())
        errs = {}
        while len(errs) < 4:
            for r in _records(ws):
                if r.get("type") == 3:
                    errs[r["invocationId"]] = r["error"]
    assert "Method does not exist" in errs["1"]
    assert "non-streaming invocation" in errs["2"]
    assert "provides 2 argument(s)" in errs["3"]
    assert "'tagIdentifiers' must be a non-empty array" in errs["4"] and "'streamConfig'" in errs["4"]


def test_second_subscription_on_the_same_connection(emu):
    with _ws(emu) as ws:
        _open(ws)
        ws.send((signalr.stream_invocation("a", "GetTagValuesStream", [_arg([SEED_TAG])])
                 + signalr.stream_invocation("b", "GetTagValuesStream", [_arg([SEED_TAG])])).decode())
        while True:
            r = _records(ws)[0]
            if r.get("type") == 3:
                break
    assert r == {"type": 3, "invocationId": "b", "error": LIMIT_ERROR}


def test_bad_record_and_client_timeout_close_with_error(data_dir):
    with KicsEmulator(port=0, token=TOKEN, data_dir=data_dir, client_timeout=0.4,
                      ping_interval=0.1) as emu:
        with _ws(emu) as ws:
            _open(ws)
            ws.send('{"type":2}\x1e')
            r = _records(ws)[-1]
            assert r["type"] == 7 and "item" in r["error"]
        with _ws(emu) as ws:
            _open(ws)
            while True:
                r = _records(ws)[0]
                if r["type"] == 7:
                    break
            assert "Client timeout" in r["error"] and r["allowReconnect"] is True
        with _ws(emu) as ws:
            _open(ws)
            emu.close_connections("maintenance", allow_reconnect=False)
            while True:
                r = _records(ws)[0]
                if r["type"] == 7:
                    break
            assert r == {"type": 7, "error": "maintenance"}


def test_http_refusals(emu):
    for kw, status in (({"token": None}, 401), ({"token": "wrong"}, 401),
                       ({"path": "/kics4net/api/v4/other"}, 404),
                       ({"path": "/kics4net/api/v4/tag-values?id=unknown"}, 404)):
        with pytest.raises(InvalidStatus) as e:
            _ws(emu, **kw)
        assert e.value.response.status_code == status, kw
    assert e.value.response.body == b"No Connection with that ID\n"
    # the token may also come as SignalR's access_token query parameter
    with _ws(emu, token=None, path="/kics4net/api/v4/tag-values?access_token=" + TOKEN) as ws:
        _open(ws)


# -- tag files, argument check, CLI -------------------------------------------------------------------


def test_default_tags_cover_every_field_type_and_marker():
    types, markers, mains = set(), set(), 0
    stack = [f for t in default_tags() for f in t.fields.values()]
    while stack:
        f = stack.pop()
        types.add(f.t)
        markers |= {f.m} if f.m else set()
        mains += f.x
        stack.extend(f.fields.values())
    assert types == set(kics.FIELD_TYPES) and markers == set(kics.MARKERS) and mains == 3


def test_tag_files_json_and_toml(tmp_path):
    (tmp_path / "t.toml").write_text('''
[[tags]]
asset = "Line 1"
tag = "Motor"
type = "Drive"
direction = "w"
period = 0.5
[tags.fields.speed]
t = "d"
x = true
values = [1.5, 2.5]
[tags.fields.mode]
t = "e"
n = "Mode"
enum = { 0 = "OFF", 1 = "ON" }
[tags.fields.word]
t = "un"
[tags.fields.word.fields._]
t = "u"
[tags.fields.word.fields.bit3]
t = "u"
bits = [3, 1]
''')
    (tmp_path / "t.json").write_text(json.dumps([{"asset": "A", "tag": "T", "id": 7,
                                                   "fields": {"s": {"t": "s", "m": "q"}}}]))
    toml = load_tags(tmp_path / "t.toml")
    assert toml[0].key == ("Line 1", "Motor") and toml[0].id == 100 and toml[0].period == 0.5
    assert toml[0].fields["mode"].enum == {0: "OFF", 1: "ON"}
    assert load_tags(tmp_path / "t.json")[0].id == 7
    for bad, words in (
        ([], "non-empty"),
        ([{"asset": "A", "tag": "T", "fields": {"f": {"t": "q"}}}], ("tags[0] (A/T).f", "'t'")),
        ([{"asset": "A", "tag": "T", "fields": {"f": {"t": "u", "values": [-1]}}}], ("values[0]", "-1")),
        ([{"asset": "A", "tag": "T", "fields": {"f": {"t": "un", "fields": {"a": {"t": "u"}}}}}], "'_'"),
        ([{"asset": "A", "tag": "T", "fields": {"f": {"t": "e"}}}], "enum"),
        ([{"asset": "A", "tag": "T", "fields": {"f": {"t": "s", "m": "zz"}}}], "marker"),
        ([{"asset": "A", "tag": "T", "fields": {"a": {"t": "s", "x": 1}, "b": {"t": "s", "x": 1}}}], "main"),
        ([{"asset": "A", "tag": "T", "fields": {"a": {"t": "s"}}}] * 2, "twice"),
        ([{"asset": "A", "tag": "T", "direction": "x", "fields": {"a": {"t": "s"}}}], "direction"),
        ([{"asset": "A", "fields": {"a": {"t": "s"}}}], "'tag'"),
    ):
        with pytest.raises(TagFileError) as e:
            parse_tags(bad)
        for w in (words,) if isinstance(words, str) else words:
            assert w in str(e.value), (bad, str(e.value))
    (tmp_path / "bad.toml").write_text("[[tags]\n")
    with pytest.raises(TagFileError, match="bad.toml"):
        load_tags(tmp_path / "bad.toml")


def test_check_argument():
    assert check_argument(_arg([SEED_TAG], 1)) == ([SEED_TAG], 1.0)
    assert check_argument({"tagIdentifiers": [{"tagName": "t", "assetName": "a"}]}) == ([("a", "t")], None)
    for arg, word in (("x", "expected an object"), ({"tagIdentifiers": []}, "non-empty array"),
                      (_arg([SEED_TAG], 0), "samplingRateHz"), (_arg([SEED_TAG], 5000), "at most"),
                      (_arg([SEED_TAG], True), "samplingRateHz")):
        with pytest.raises(ValueError, match=word):
            check_argument(arg)


def test_cli_help_and_bad_tag_file(tmp_path):
    r = CliRunner().invoke(kics_emulator, ["--help"])
    assert r.exit_code == 0 and "--tags" in r.output and "--token" in r.output
    (tmp_path / "x.json").write_text("[1]")
    r = CliRunner().invoke(kics_emulator, ["--tags", str(tmp_path / "x.json"), "--data-dir", str(tmp_path)])
    assert r.exit_code != 0 and "tags[0]" in r.output


def test_cli_serves_until_interrupted(tmp_path):
    env = dict(os.environ, MICROCOT_KICS_TOKEN="")
    proc = subprocess.Popen([sys.executable, "-m", "microcot_host", "kics-emulator", "--ws-port", "0",
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().split(": ", 1)[1].strip()
        lines = [proc.stdout.readline() for _ in range(3)]
        assert url.startswith("wss://localhost:") and url.endswith("/kics4net/api/v4/tag-values")
        token_file = tmp_path / "kics-token"
        assert str(token_file) in "".join(lines)
        token = token_file.read_text().strip()
        assert token not in "".join(lines)  # the secret itself is never printed
        assert (token_file.stat().st_mode & 0o777) == 0o600
        with connect(url, ssl=client_ssl_context(Path(tmp_path) / "tls" / "ca.pem"),
                     additional_headers={"Authorization": "Bearer " + token}) as ws:
            _open(ws)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read()
