"""An emulator of the KICS for Networks tag-value WebSocket (seed 001), for tests and demos.

    microcot kics-emulator [--tags FILE] [--token T] [--ws-port P] [--bind ADDR] [--tls/--no-tls]

A WebSocket server (the `websockets` library, asyncio) speaking SignalR's JSON hub protocol at
`/kics4net/api/v4/tag-values` (the seed's address; the seed's Python example uses
`/kics4net/api/tag-values`, accepted as an alias):

- the WebSocket request needs `Authorization: Bearer <token>` (or SignalR's `access_token` query
  parameter): otherwise HTTP 401, as the seed says;
- SignalR negotiation (`POST .../negotiate`) is answered too, so SignalR client libraries work with
  their defaults (the seed's signalrcore example negotiates first);
- the handshake (`{"protocol":"json","version":1}`) is answered `{}`; other protocols or versions
  get an error and the connection closes;
- `GetTagValuesStream` (method names are case-insensitive, as in ASP.NET Core: the seed's raw
  example calls `getTagValuesStream`) takes one argument `{"tagIdentifiers": [...], "streamConfig":
  {"samplingRateHz": r|null}}`, checked field by field (a completion with an error naming every
  problem), then streams one `{"confirmation": ...}` item per requested tag (`ok` with its tagId,
  or `notFound`) and `{"value": {"tagId", "tagValue"}}` items whenever a tag's value changes, at
  most r times per second per tag (null: every change);
- one active subscription per server: another GetTagValuesStream, on any connection, is refused
  with a completion error about an excessive number of connections;
- pings (type 6) after `ping_interval` seconds without sending, a close message (type 7) with
  an error after `client_timeout` seconds without hearing from the client, cancel invocation
  (type 5) ends the subscription, and so does closing the connection.

Tags come from a JSON or TOML file (see `parse_tags`) or the built-in set, which covers every field
type of the seed: u i b d s t e st un, a main value (`x`), markers (`m`), a union with derived bit
views, and 64-bit values beyond a double's precision (18446744073709551615). Values change every
`period` seconds and are a pure function of a change counter, so all subscribers see the same.

`tagValue` is sent as the JSON text of the tag data (the seed writes `"tagValue": "<JSON object with
tag data>"`); `tag_value_format="object"` sends the object itself.

Python API (tests): `with KicsEmulator(port=0, token="t", tls=True, data_dir=tmp) as emu:` runs the
server's event loop in a thread; `emu.url` (wss://), `emu.http_url` (https://, for SignalR client
libraries), `emu.ca_cert` (PEM of the CA that signed the server certificate, made by
emulator/certs.py), `emu.drop_connections()`, `emu.close_connections(error, allow_reconnect)`,
`emu.active_subscription`, `emu.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import math
import os
import secrets
import signal
import ssl
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from microcot import signalr
from microcot_host import cliopts
from microcot_host.files import private_dir

log = logging.getLogger("microcot.kics_emulator")

PATH = "/kics4net/api/v4/tag-values"
PATH_ALIASES = (PATH, "/kics4net/api/tag-values")
METHOD = "GetTagValuesStream"
FIELD_TYPES = ("u", "i", "b", "d", "s", "t", "e", "st", "un")
MARKERS = ("q", "ts", "ds", "o", "t", "ct")
MAX_RATE_HZ = 1000.0
DEFAULT_PERIOD = 0.2
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

LIMIT_ERROR = ("Failed to invoke 'GetTagValuesStream'. HubException: Excessive number of "
               "connections: the server supports no more than one active tag-value subscription.")


class TagFileError(ValueError):
    """A tag definition that cannot be used; the message names the tag and field."""


# -- tag definitions -----------------------------------------------------------------------------


@dataclass
class FieldSpec:
    name: str
    t: str
    x: bool = False
    m: str | None = None
    values: list[Any] | None = None  # cycled through, one per change
    enum_name: str | None = None  # e
    enum: dict[int, str] | None = None  # e: original value -> string
    fields: dict[str, FieldSpec] = field(default_factory=dict)  # st, un
    bits: tuple[int, int] | None = None  # union member: (shift, width) of the raw view "_"


@dataclass
class TagSpec:
    asset: str
    name: str
    id: int
    type_name: str = "TagStructure"
    direction: str = "r"
    mp: int = 1
    period: float = DEFAULT_PERIOD
    fields: dict[str, FieldSpec] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.asset, self.name)


def _field_spec(name: str, raw: Any, where: str, union: bool = False) -> FieldSpec:
    if not isinstance(raw, dict):
        raise TagFileError(f"{where}: a field is a table/object with at least 't'")
    t = raw.get("t")
    if t not in FIELD_TYPES:
        raise TagFileError(f"{where}: 't' must be one of {' '.join(FIELD_TYPES)}, got {t!r}")
    unknown = set(raw) - {"t", "x", "m", "values", "n", "enum", "fields", "bits"}
    if unknown:
        raise TagFileError(f"{where}: unknown keys {sorted(unknown)}")
    m = raw.get("m")
    if m is not None and m not in MARKERS:
        raise TagFileError(f"{where}: marker 'm' must be one of {' '.join(MARKERS)}, got {m!r}")
    spec = FieldSpec(name, t, bool(raw.get("x", False)), m)
    values = raw.get("values")
    if values is not None:
        if not isinstance(values, list) or not values or t in ("st", "un", "e"):
            raise TagFileError(f"{where}: 'values' is a non-empty list, for scalar types only")
        for i, v in enumerate(values):
            _check_scalar(t, v, f"{where}.values[{i}]")
        spec.values = values
    if t == "e":
        enum = raw.get("enum")
        if not isinstance(enum, dict) or not enum:
            raise TagFileError(f"{where}: an enum needs 'enum', a table of value = \"NAME\"")
        try:
            spec.enum = {int(k): str(v) for k, v in enum.items()}
        except ValueError:
            raise TagFileError(f"{where}: enum keys must be integers") from None
        spec.enum_name = str(raw.get("n") or name)
    if t in ("st", "un"):
        sub = raw.get("fields")
        if not isinstance(sub, dict) or not sub:
            raise TagFileError(f"{where}: a {t} field needs 'fields'")
        spec.fields = {k: _field_spec(k, v, f"{where}.{k}", t == "un") for k, v in sub.items()}
        if t == "un" and "_" not in spec.fields:
            raise TagFileError(f"{where}: a union needs its raw view '_'")
    bits = raw.get("bits")
    if bits is not None:
        if not union or t != "u" or name == "_":
            raise TagFileError(f"{where}: 'bits' is for u members of a union other than '_'")
        if (not isinstance(bits, list) or len(bits) != 2
                or not all(isinstance(b, int) and 0 <= b <= 64 for b in bits) or bits[1] == 0):
            raise TagFileError(f"{where}: 'bits' is [shift, width]")
        spec.bits = (bits[0], bits[1])
    return spec


def _check_scalar(t: str, v: Any, where: str) -> None:
    ok = {
        "u": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX,
        "i": lambda v: isinstance(v, int) and not isinstance(v, bool) and I64_MIN <= v <= I64_MAX,
        "t": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "b": lambda v: isinstance(v, bool),
        "d": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "s": lambda v: isinstance(v, str),
    }[t]
    if not ok(v):
        raise TagFileError(f"{where}: {v!r} is not a value of type {t}")


def parse_tags(data: Any) -> list[TagSpec]:
    """Tag definitions from a decoded JSON/TOML document: {"tags": [tag, ...]} or [tag, ...].

    A tag: asset, tag (its name), id (optional, unique), type (`n`), direction (r|w|rw), mp,
    period (seconds between changes), fields: {name: field}. A field: t (u i b d s t e st un),
    x (true on the main value), m (marker: q ts ds o t ct), values (scalars: cycled), n and
    enum ({value: "NAME"}) for enums, fields for st/un, bits ([shift, width]) for a union member
    derived from the raw view "_"."""
    if isinstance(data, dict):
        data = data.get("tags")
    if not isinstance(data, list) or not data:
        raise TagFileError("expected a non-empty list of tags (or a table with 'tags')")
    out: list[TagSpec] = []
    ids: set[int] = set()
    keys: set[tuple[str, str]] = set()
    next_id = 100
    for i, raw in enumerate(data):
        where = f"tags[{i}]"
        if not isinstance(raw, dict):
            raise TagFileError(f"{where}: a tag is a table/object")
        unknown = set(raw) - {"asset", "tag", "id", "type", "direction", "mp", "period", "fields"}
        if unknown:
            raise TagFileError(f"{where}: unknown keys {sorted(unknown)}")
        asset, name = raw.get("asset"), raw.get("tag")
        if not isinstance(asset, str) or not asset or not isinstance(name, str) or not name:
            raise TagFileError(f"{where}: 'asset' and 'tag' must be non-empty strings")
        where = f"tags[{i}] ({asset}/{name})"
        if (asset, name) in keys:
            raise TagFileError(f"{where}: defined twice")
        tid = raw.get("id")
        if tid is None:
            while next_id in ids or any(r.get("id") == next_id for r in data if isinstance(r, dict)):
                next_id += 1
            tid = next_id
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0 or tid in ids:
            raise TagFileError(f"{where}: 'id' must be a unique non-negative integer")
        direction = raw.get("direction", "r")
        if direction not in ("r", "w", "rw"):
            raise TagFileError(f"{where}: 'direction' is r, w or rw")
        period = raw.get("period", DEFAULT_PERIOD)
        if not isinstance(period, (int, float)) or isinstance(period, bool) or not period >= 0.01:
            raise TagFileError(f"{where}: 'period' is a number of seconds >= 0.01")
        mp = raw.get("mp", 1)
        if not isinstance(mp, int) or isinstance(mp, bool):
            raise TagFileError(f"{where}: 'mp' is an integer")
        fields = raw.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise TagFileError(f"{where}: 'fields' must define at least one field")
        specs = {k: _field_spec(k, v, f"{where}.{k}") for k, v in fields.items()}
        mains = [k for k, f in specs.items() if f.x]
        if len(mains) > 1:
            raise TagFileError(f"{where}: more than one main value (x): {mains}")
        ids.add(tid)
        keys.add((asset, name))
        out.append(TagSpec(asset, name, tid, str(raw.get("type") or "TagStructure"), direction,
                           mp, float(period), specs))
    return out


def load_tags(path: str | Path) -> list[TagSpec]:
    """Tags from a .json or .toml file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TagFileError(f"{p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise TagFileError(f"{p}: {exc}") from None
    try:
        return parse_tags(data)
    except TagFileError as exc:
        raise TagFileError(f"{p}: {exc}") from None


def default_tags() -> list[TagSpec]:
    """The built-in set: the seed's example tag and a tag per field type family."""
    return parse_tags([
        {"asset": "Asset 079", "tag": "Asdu_1_object_1001", "id": 102, "type": "TagStructure1",
         "direction": "r", "mp": 1, "period": 0.2, "fields": {
             "value": {"t": "d", "x": True},
             "quality": {"t": "s", "m": "q", "values": ["good", "bad", "uncertain"]},
             "mask": {"t": "u"},
             "enumfield": {"t": "e", "n": "SwitchState", "enum": {"0": "Off", "1": "On"}},
             "strucfield": {"t": "st", "fields": {
                 "v1": {"t": "d"},
                 "q2": {"t": "s", "m": "q", "values": ["good", "bad"]}}},
             "unionfield": {"t": "un", "fields": {
                 "_": {"t": "u", "values": [42, 255, 0, 18446744073709551615]},
                 "low4bits": {"t": "u", "bits": [0, 4]},
                 "high4bits": {"t": "u", "bits": [4, 4]}}},
         }},
        {"asset": "Asset 079", "tag": "Asdu_1_object_1003", "id": 103, "type": "Command",
         "direction": "rw", "mp": 2, "period": 0.3, "fields": {
             "command": {"t": "e", "x": True, "n": "OpType",
                         "enum": {"0": "NUL", "1": "PULSE_ON", "2": "PULSE_OFF"}},
             "counter": {"t": "i"},
             "active": {"t": "b"},
             "time": {"t": "t", "m": "t"},
             "origin": {"t": "s", "m": "o", "values": ["station 1", "Grüße ✓"]},
             "cause": {"t": "u", "m": "ct", "values": [3, 6, 7]},
             "status": {"t": "st", "fields": {
                 "ts": {"t": "s", "m": "ts", "values": ["valid", "substituted"]},
                 "ds": {"t": "u", "m": "ds"},
                 "big": {"t": "i", "values": [-9223372036854775808, 9223372036854775807]}}},
         }},
        {"asset": "PLC 1", "tag": "Counter64", "id": 104, "type": "UInt64", "direction": "r",
         "mp": 1, "period": 0.25, "fields": {"value": {"t": "u", "x": True}}},
    ])


# -- values ----------------------------------------------------------------------------------------


def _scalar(spec: FieldSpec, k: int, t_us: int) -> Any:
    if spec.values is not None:
        return spec.values[k % len(spec.values)]
    t = spec.t
    if t == "u":  # the extremes, values a double cannot hold exactly, and a counter
        return (U64_MAX - k, k, 2**53 + 1 + k, 2**63 + k)[k % 4] & U64_MAX
    if t == "i":
        return (I64_MIN + k, I64_MAX - k, -k, k)[k % 4]
    if t == "b":
        return k % 2 == 0
    if t == "d":
        return round(100.0 * math.sin(k / 10.0), 6) + (0.5 if k % 3 == 0 else 0.0)
    if t == "s":
        return ("good", "bad", "uncertain", "Grüße ✓")[k % 4]
    if t == "t":
        return t_us
    raise AssertionError(t)


def field_value(spec: FieldSpec, k: int, t_us: int, raw: int | None = None) -> dict[str, Any]:
    """The wire object of one field at change k."""
    if spec.t == "e":
        assert spec.enum is not None
        items = sorted(spec.enum.items())
        v, s = items[k % len(items)]
        obj: dict[str, Any] = {"t": "e", "n": spec.enum_name, "v": v, "s": s}
    elif spec.t == "st":
        obj = {"t": "st", "v": {n: field_value(f, k, t_us) for n, f in spec.fields.items()}}
    elif spec.t == "un":
        raw_v = _scalar(spec.fields["_"], k, t_us)
        obj = {"t": "un", "v": {n: field_value(f, k, t_us, raw_v) for n, f in spec.fields.items()}}
    elif spec.bits is not None and raw is not None:
        shift, width = spec.bits
        obj = {"t": "u", "v": (int(raw) >> shift) & ((1 << width) - 1)}
    else:
        obj = {"t": spec.t, "v": _scalar(spec, k, t_us)}
    if spec.x:
        obj["x"] = 1
    if spec.m:
        obj["m"] = spec.m
    return obj


def tag_value(tag: TagSpec, k: int, t_us: int) -> dict[str, Any]:
    """The tag data object (`n ts dn mp d`) at change k, registered at t_us."""
    return {"n": tag.type_name, "ts": t_us, "dn": tag.direction, "mp": tag.mp,
            "d": {n: field_value(f, k, t_us) for n, f in tag.fields.items()}}


# -- argument check ----------------------------------------------------------------------------------


def check_argument(arg: Any) -> tuple[list[tuple[str, str]], float | None]:
    """(tag identifiers, sampling rate) of a GetTagValuesStream argument; ValueError listing every
    problem otherwise."""
    problems: list[str] = []
    tags: list[tuple[str, str]] = []
    rate: float | None = None
    if not isinstance(arg, dict):
        raise ValueError("Invalid subscription argument: expected an object with 'tagIdentifiers' "
                         "and 'streamConfig'")
    ids = arg.get("tagIdentifiers")
    if not isinstance(ids, list) or not ids:
        problems.append("'tagIdentifiers' must be a non-empty array")
    else:
        for i, ti in enumerate(ids):
            if not isinstance(ti, dict):
                problems.append(f"'tagIdentifiers[{i}]' must be an object with 'tagName' and 'assetName'")
                continue
            bad = False
            for key in ("tagName", "assetName"):
                v = ti.get(key)
                if not isinstance(v, str) or not v.strip():
                    problems.append(f"'tagIdentifiers[{i}].{key}' must be a non-empty string")
                    bad = True
            if not bad:
                tags.append((ti["assetName"], ti["tagName"]))
    cfg = arg.get("streamConfig")
    if cfg is not None and not isinstance(cfg, dict):
        problems.append("'streamConfig' must be an object")
    elif cfg is not None:
        r = cfg.get("samplingRateHz")
        if r is not None:
            if (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                    or not 0 < r <= MAX_RATE_HZ):
                problems.append(f"'streamConfig.samplingRateHz' must be null or a number greater "
                                f"than 0 and at most {MAX_RATE_HZ:g}, got {json.dumps(r)}")
            else:
                rate = float(r)
    if problems:
        raise ValueError("Invalid subscription argument: " + "; ".join(problems) + ".")
    return tags, rate


# -- the server ----------------------------------------------------------------------------------------


@dataclass
class _Subscription:
    conn: _Client
    invocation_id: str
    tags: list[tuple[str, str]]
    rate: float | None
    task: asyncio.Task[None] | None = None


class _Client:
    """One WebSocket connection's SignalR state."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.records = signalr.Records(0x100000)
        self.handshaken = False
        self.last_recv = time.monotonic()
        self.last_send = time.monotonic()
        self.send_lock = asyncio.Lock()
        self.streams: dict[str, _Subscription] = {}


class KicsEmulator:
    """The tag-value server; a context manager that runs it in a thread."""

    def __init__(self, port: int = 0, token: str | None = None,
                 tags: list[TagSpec] | str | Path | None = None, tls: bool = True,
                 data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 hostnames: Iterable[str] = ("localhost",), ping_interval: float = 15.0,
                 client_timeout: float = 30.0, handshake_timeout: float = 15.0,
                 tag_value_format: str = "text", chunk_size: int | None = None,
                 ws_ping_interval: float | None = 20.0) -> None:
        if tag_value_format not in ("text", "object"):
            raise ValueError("tag_value_format is 'text' or 'object'")
        self.host = host
        self.port = port
        self.token = token if token is not None else secrets.token_urlsafe(24)
        if not self.token:
            raise ValueError("the token must not be empty")
        if tags is None:
            self.tags = default_tags()
        elif isinstance(tags, (str, Path)):
            self.tags = load_tags(tags)
        else:
            self.tags = list(tags)
        self.by_key = {t.key: t for t in self.tags}
        self.tls = tls
        self.hostnames = tuple(hostnames)
        if data_dir is None:
            from microcot_host.paths import state_dir
            data_dir = state_dir() / "kics-emulator"
        self.data_dir = Path(data_dir)
        self.ping_interval = ping_interval
        self.client_timeout = client_timeout
        self.handshake_timeout = handshake_timeout
        self.tag_value_format = tag_value_format
        self.chunk_size = chunk_size  # > 0: cut outgoing data into WebSocket messages of this many chars
        self.ws_ping_interval = ws_ping_interval
        self.ca_cert: Path | None = None
        self.events: list[tuple[Any, ...]] = []  # ("connect"|"subscribe"|"refused"|"end", ...)
        self.active_subscription: _Subscription | None = None
        self.subscriptions_started = 0
        self._negotiated: set[str] = set()
        self._clients: set[_Client] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # keeps fire-and-forget tasks referenced
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._stop: asyncio.Event | None = None
        self._t0 = time.monotonic()
        self._t0_us = time.time_ns() // 1000

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "wss" if self.tls else "ws"

    @property
    def url_host(self) -> str:
        if self.host in ("127.0.0.1", "0.0.0.0", "::", "", "localhost") and self.hostnames:
            return self.hostnames[0]
        return self.host

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.port}{PATH}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.url_host}:{self.port}{PATH}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        from microcot_host.emulator.certs import ensure_ca_and_server

        files = ensure_ca_and_server(self.data_dir, hostnames=self.hostnames)
        self.ca_cert = files.ca_cert
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(files.server_cert), str(files.server_key))
        return ctx

    def start(self) -> KicsEmulator:
        ctx = self.ssl_context()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ctx, started))
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                started.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="kics-emulator", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _main(self, ctx: ssl.SSLContext | None, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        emu = self

        class Conn(_NegotiatingConnection):
            emulator = emu

        async with serve(self._handler, self.host, self.port, ssl=ctx,
                         process_request=self._process_request, create_connection=Conn,
                         ping_interval=self.ws_ping_interval, max_size=0x100000,
                         server_header="microcot-kics-emulator") as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            log.info("KICS emulator listening on %s", self.url)
            started.set()
            await self._stop.wait()
            for t in list(self._transports):
                t.abort()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
            thread.join(15)
        self._thread = None

    def __enter__(self) -> KicsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run fn (a coroutine function) in the server's loop and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def drop_connections(self) -> int:
        """Abort every connection without a close handshake (a network failure); returns how many."""
        async def drop() -> int:
            n = len(self._clients)
            for c in list(self._clients):
                c.ws.transport.abort()
            return n
        return self._call(drop)

    def close_connections(self, error: str | None = None, allow_reconnect: bool = True) -> int:
        """Send a SignalR close message, then close every connection; returns how many.
        Does not wait for the clients' side of the close handshake."""
        async def close() -> int:
            clients = list(self._clients)
            for c in clients:
                with contextlib.suppress(ConnectionClosed):
                    await self._send(c, signalr.close(error, allow_reconnect))
                    self._tasks.add(asyncio.create_task(c.ws.close()))
            return len(clients)
        return self._call(close)

    @property
    def connections(self) -> int:
        return len(self._clients)

    # -- HTTP: routing, auth, negotiation ------------------------------------------------------
    def _authorized(self, headers: Headers, query: dict[str, list[str]]) -> bool:
        auth = headers.get("Authorization", "")
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(cred.strip(), self.token):
            return True
        qt = query.get("access_token", [""])[0]
        return bool(qt) and secrets.compare_digest(qt, self.token)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(parts.query)
        if parts.path.rstrip("/") not in PATH_ALIASES:
            return conn.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if not self._authorized(request.headers, query):
            self.events.append(("unauthorized", parts.path))
            resp = conn.respond(http.HTTPStatus.UNAUTHORIZED, "")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        cid = query.get("id", [None])[0]
        if cid is not None:
            if cid not in self._negotiated:
                return conn.respond(http.HTTPStatus.NOT_FOUND, "No Connection with that ID\n")
            self._negotiated.discard(cid)
        return None

    def negotiate(self, method: str, target: str, headers: Headers) -> tuple[int, dict[str, str], bytes]:
        """The answer to a plain HTTP request (SignalR negotiation): status, headers, body."""
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query)
        path = parts.path.rstrip("/")
        if not path.endswith("/negotiate") or path[: -len("/negotiate")] not in PATH_ALIASES:
            return 404, {}, b"Not Found\n"
        if method != "POST":
            return 405, {"Allow": "POST"}, b""
        if not self._authorized(headers, query):
            self.events.append(("unauthorized", path))
            return 401, {"WWW-Authenticate": "Bearer"}, b""
        try:
            version = int(query.get("negotiateVersion", ["0"])[0])
        except ValueError:
            version = 0
        cid = secrets.token_urlsafe(16)
        body: dict[str, Any] = {"negotiateVersion": min(max(version, 0), 1), "connectionId": cid,
                                "availableTransports": [{"transport": "WebSockets",
                                                         "transferFormats": ["Text", "Binary"]}]}
        self._negotiated.add(cid)
        if version >= 1:
            tok = secrets.token_urlsafe(16)
            body["connectionToken"] = tok
            self._negotiated.add(tok)
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    # -- SignalR ---------------------------------------------------------------------------------
    async def _send(self, c: _Client, data: bytes) -> None:
        text = data.decode()
        async with c.send_lock:
            if self.chunk_size:
                for i in range(0, len(text), self.chunk_size):
                    await c.ws.send(text[i:i + self.chunk_size])
            else:
                await c.ws.send(text)
            c.last_send = time.monotonic()

    async def _handler(self, ws: ServerConnection) -> None:
        c = _Client(ws)
        self._clients.add(c)
        self.events.append(("connect", ws.remote_address))
        keeper = asyncio.create_task(self._keepalive(c))
        try:
            await self._receive(c)
        except ConnectionClosed:
            pass
        finally:
            keeper.cancel()
            for sub in list(c.streams.values()):
                self._end(sub, "connection closed")
            self._clients.discard(c)
            self.events.append(("disconnect", ws.remote_address))

    async def _keepalive(self, c: _Client) -> None:
        step = max(0.01, min(self.ping_interval, self.client_timeout, self.handshake_timeout) / 4)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(step)
                now = time.monotonic()
                if not c.handshaken:
                    if now - c.last_recv >= self.handshake_timeout:
                        await c.ws.close(1002, "handshake timed out")
                        return
                    continue
                if self.client_timeout and now - c.last_recv >= self.client_timeout:
                    await self._send(c, signalr.close(
                        "Client timeout elapsed without receiving a message from the client.", True))
                    await c.ws.close()
                    return
                if self.ping_interval and now - c.last_send >= self.ping_interval:
                    await self._send(c, signalr.ping())

    async def _receive(self, c: _Client) -> None:
        async for msg in c.ws:
            c.last_recv = time.monotonic()
            try:
                recs = c.records.feed(msg if isinstance(msg, bytes) else msg.encode())
            except signalr.SignalRError as exc:
                await self._fail(c, str(exc))
                return
            for rec in recs:
                if not c.handshaken:
                    if not await self._handshake(c, rec):
                        return
                    continue
                try:
                    m = signalr.parse(rec)
                except signalr.SignalRError as exc:
                    await self._fail(c, f"Connection closed with an error. InvalidDataException: {exc}")
                    return
                if m.type == signalr.CLOSE:
                    await c.ws.close()
                    return
                await self._message(c, m)

    async def _fail(self, c: _Client, error: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send(c, signalr.close(error, False))
            await c.ws.close(1000)

    async def _handshake(self, c: _Client, rec: bytes) -> bool:
        try:
            protocol, version = signalr.parse_handshake_request(rec)
        except signalr.SignalRError as exc:
            await self._send(c, signalr.handshake_response(f"Handshake request is invalid: {exc}"))
            await c.ws.close(1002, "bad handshake")
            return False
        if protocol != "json":
            await self._send(c, signalr.handshake_response(
                f"The protocol '{protocol}' is not supported."))
            await c.ws.close()
            return False
        if version > 1:  # as ASP.NET Core's JsonHubProtocol.IsVersionSupported: version <= 1
            await self._send(c, signalr.handshake_response(
                f"The server does not support version {version} of the '{protocol}' protocol."))
            await c.ws.close()
            return False
        c.handshaken = True
        await self._send(c, signalr.handshake_response())
        return True

    async def _message(self, c: _Client, m: signalr.Message) -> None:
        if m.type in (signalr.INVOCATION, signalr.STREAM_INVOCATION):
            await self._invoke(c, m)
        elif m.type == signalr.CANCEL_INVOCATION:
            sub = c.streams.get(m.invocation_id or "")
            if sub is not None:
                self._end(sub, "cancelled")
        # pings only refresh last_recv; completions, stream items and unknown types are ignored

    async def _invoke(self, c: _Client, m: signalr.Message) -> None:
        iid = m.invocation_id
        target = m.target or ""

        async def error(text: str) -> None:
            if iid is not None:
                await self._send(c, signalr.completion(iid, error=text))

        if target.lower() != METHOD.lower():
            await error(f"Failed to invoke '{target}' due to an error on the server. "
                        "HubException: Method does not exist.")
            return
        if m.type == signalr.INVOCATION:
            await error(f"The client attempted to invoke the streaming '{target}' method with a "
                        "non-streaming invocation.")
            return
        assert iid is not None
        if iid in c.streams:
            await error(f"Invocation ID '{iid}' is already in use.")
            return
        args = m.arguments or []
        if len(args) != 1:
            await error(f"Failed to invoke '{target}' due to an error on the server. "
                        f"InvalidDataException: Invocation provides {len(args)} argument(s) but "
                        "target expects 1.")
            return
        try:
            tags, rate = check_argument(args[0])
        except ValueError as exc:
            self.events.append(("refused", "argument", str(exc)))
            await error(str(exc))
            return
        if self.active_subscription is not None:
            self.events.append(("refused", "limit", tags))
            await error(LIMIT_ERROR)
            return
        sub = _Subscription(c, iid, tags, rate)
        self.active_subscription = sub
        self.subscriptions_started += 1
        c.streams[iid] = sub
        self.events.append(("subscribe", tags, rate))
        sub.task = asyncio.create_task(self._stream(sub))

    def _end(self, sub: _Subscription, why: str) -> None:
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()
        sub.conn.streams.pop(sub.invocation_id, None)
        if self.active_subscription is sub:
            self.active_subscription = None
            self.events.append(("end", why))

    def _counter(self, tag: TagSpec, now: float) -> int:
        return int((now - self._t0) / tag.period)

    def _ts(self, tag: TagSpec, k: int) -> int:
        return self._t0_us + int(k * tag.period * 1_000_000)

    def value_for(self, tag_id: int, ts: int) -> dict[str, Any]:
        """The tag data this emulator sends for tag_id with timestamp ts (to check clients)."""
        tag = next(t for t in self.tags if t.id == tag_id)
        k = round((ts - self._t0_us) / (tag.period * 1_000_000))
        if self._ts(tag, k) != ts:
            raise ValueError(f"tag {tag_id} never had a value at ts {ts}")
        return tag_value(tag, k, ts)

    def _value_item(self, tag: TagSpec, k: int) -> dict[str, Any]:
        t_us = self._ts(tag, k)
        tv: Any = tag_value(tag, k, t_us)
        if self.tag_value_format == "text":
            tv = json.dumps(tv, ensure_ascii=False)
        return {"value": {"tagId": tag.id, "tagValue": tv}}

    async def _stream(self, sub: _Subscription) -> None:
        c, iid = sub.conn, sub.invocation_id
        try:
            confirmations = []
            found: dict[int, TagSpec] = {}
            for asset, name in sub.tags:
                tag = self.by_key.get((asset, name))
                ident = {"tagName": name, "assetName": asset}
                if tag is None:
                    conf = {"result": "notFound", "tagIdentifier": ident, "tagId": None}
                else:
                    conf = {"result": "ok", "tagIdentifier": ident, "tagId": tag.id}
                    found[tag.id] = tag
                confirmations.append(signalr.stream_item(iid, {"confirmation": conf}))
            await self._send(c, b"".join(confirmations))
            if not found:
                await asyncio.Event().wait()  # nothing to send until cancelled or closed
            last: dict[int, int] = {}
            interval = 1.0 / sub.rate if sub.rate else None
            while True:
                now = time.monotonic()
                batch = []
                for tag in found.values():
                    k = self._counter(tag, now)
                    if last.get(tag.id) != k:
                        last[tag.id] = k
                        batch.append(signalr.stream_item(iid, self._value_item(tag, k)))
                if batch:
                    await self._send(c, b"".join(batch))
                if interval is not None:
                    await asyncio.sleep(interval)
                else:
                    nxt = min(self._t0 + (last[t.id] + 1) * t.period for t in found.values())
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()) + 0.0005)
        except ConnectionClosed:
            pass
        finally:
            self._end(sub, "stream ended")


class _NegotiatingConnection(ServerConnection):
    """A websockets connection that also answers plain HTTP requests other than GET (SignalR's
    `POST .../negotiate`) before websockets' handshake parser, which only takes GET, sees them."""

    emulator: KicsEmulator
    _sniff: bytearray | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sniff = bytearray()
        self.emulator._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.emulator._transports.discard(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._sniff is None:
            super().data_received(data)
            return
        self._sniff += data
        if len(self._sniff) < 4 and b"GET ".startswith(bytes(self._sniff)):
            return  # too early to tell
        if self._sniff.startswith(b"GET "):
            buf, self._sniff = bytes(self._sniff), None
            super().data_received(buf)
            return
        head_end = self._sniff.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._sniff) > 16384:
                self._reply(431, {}, b"")
            return
        self._plain_http(head_end)

    def _plain_http(self, head_end: int) -> None:
        head = bytes(self._sniff[:head_end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            self._reply(400, {}, b"")
            return
        headers = Headers()
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip()] = v.strip()
        try:
            length = int(headers.get("Content-Length", "0"))
        except ValueError:
            self._reply(400, {}, b"")
            return
        if len(self._sniff) < head_end + 4 + length:
            return  # the body is still coming
        status, extra, body = self.emulator.negotiate(method, target, headers)
        self._reply(status, extra, body)

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self._sniff = None
        reason = http.HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}",
                 "Connection: close", "Server: microcot-kics-emulator"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.transport.close()
        # a TLS client that never answers close_notify must not hold the connection open
        self.loop.call_later(2.0, self.transport.abort)


# -- command line ------------------------------------------------------------------------------------


def _token_file(data_dir: Path) -> Path:
    return data_dir / "kics-token"


def _stored_token(data_dir: Path) -> str:
    """The emulator's token from <data_dir>/kics-token, created (mode 600) on first use."""
    path = _token_file(data_dir)
    try:
        tok = path.read_text().strip()
        if tok:
            return tok
    except FileNotFoundError:
        pass
    private_dir(data_dir)  # the token's folder too: owner-only like the token
    tok = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tok + "\n")
    return tok


@click.command("kics-emulator", context_settings=cliopts.HELP)
@click.option("--tags", "tags_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON or TOML file with the tags (default: a built-in set with every field type)")
@click.option("--token", envvar="MICROCOT_KICS_TOKEN",
              help="bearer token clients must send (default: $MICROCOT_KICS_TOKEN, else a random one "
                   "kept in <data-dir>/kics-token)")
@cliopts.option("--ws-port", "port", type=int, default=8091, show_default=True, old=("--port",),
                help="TCP port of the WebSocket server (0: any free one)")
@cliopts.option("--bind", "host", default="127.0.0.1", show_default=True, metavar="ADDR",
                old=("--host",), help="address to listen on")
@click.option("--hostname", "hostnames", multiple=True,
              help="name to put in the server certificate (repeatable; default localhost)")
@click.option("--tls/--no-tls", default=True, show_default=True, help="wss:// with a local CA, or ws://")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="where the CA, server certificate and token live (default: state dir)")
@click.option("--ping-interval", type=float, default=15.0, show_default=True,
              help="seconds without sending before a SignalR ping")
@click.option("--tag-value-format", type=click.Choice(["text", "object"]), default="text",
              show_default=True, help="tagValue as the JSON text of the tag data, or as an object")
@click.option("-v", "--verbose", is_flag=True, help="log connections and subscriptions")
def kics_emulator(tags_file: str | None, token: str | None, port: int, host: str,
                  hostnames: tuple[str, ...], tls: bool, data_dir: str | None, ping_interval: float,
                  tag_value_format: str, verbose: bool) -> None:
    """Emulate the KICS for Networks tag-value subscription (SignalR over WebSocket, seed 001)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    from microcot_host.paths import state_dir

    ddir = Path(data_dir) if data_dir else state_dir() / "kics-emulator"
    try:
        tags = load_tags(tags_file) if tags_file else None
    except TagFileError as exc:
        raise click.ClickException(str(exc)) from None
    token_note = "given"
    if not token:
        token = _stored_token(ddir)
        token_note = f"in {_token_file(ddir)}"
    emu = KicsEmulator(port=port, token=token, tags=tags, tls=tls, data_dir=ddir, host=host,
                       hostnames=hostnames or ("localhost",), ping_interval=ping_interval,
                       tag_value_format=tag_value_format)
    try:
        emu.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"KICS tag-value emulator: {emu.url}")
    click.echo(f"  SignalR URL: {emu.http_url}")
    if emu.ca_cert:
        click.echo(f"  CA certificate: {emu.ca_cert}")
    click.echo(f"  token: {token_note} (sent as 'Authorization: Bearer <token>')")
    for t in emu.tags:
        click.echo(f"  tag {t.id}: {t.asset} / {t.name} ({t.type_name}, every {t.period:g} s)")
    click.echo("Ctrl-C stops.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as cleanly as on Ctrl-C
    try:
        while emu._thread is not None and emu._thread.is_alive():
            emu._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
