"""Load-generator worker for bench/emulator.py: many paho clients on one selector loop.

One process runs every client given to it on a single `selectors` loop through paho's manual
network calls (`loop_read`/`loop_write`/`loop_misc` and the socket callbacks), not one thread
per client: 1000 `loop_start()` threads on a 2-core machine would measure the scheduler, not the
emulator. The parent talks to it over stdin/stdout with pickled dicts, one request -> one reply:

    {"cmd": "phase", ...}  connect the clients, warm up (one row per device, answered),
                           reply {"ready": ...}; then wait for {"cmd": "go"}, run the timed
                           rows, disconnect and reply with the results
    {"cmd": "quit"}        end

A phase has a mode. "emulator": each device publishes `15,<X-ID>\\n<tid>,<mo>,<type>,<seq>` on
ms/<ID> and the row is done when `<answer id>,<line>,<type>,<seq>` arrives on mr/<ID> (the
emulator answers after the measurement is stored). "relay": the same payloads on ms/<ID> to a
plain Mosquitto, and the row is done when this worker's own subscriber (the connector user,
subscribed to ms/<ID> of this worker's devices) receives it. Both: MQTT 3.1.1, TLS verified
against the broker's CA, clean_session False, QoS 1, at most `window` rows per device waiting
(0: no limit, paho's 20 in flight per client still applies). Latency = answer (or relayed copy)
received - publish() called, on CLOCK_MONOTONIC so the parent can merge workers' start and end
times. `<type>` is unique per step, so a late answer of an earlier step is recognised as stale.
"""

from __future__ import annotations

import contextlib
import pickle
import resource
import selectors
import socket
import sys
import time
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

from microcot_host.emulator.certs import client_ssl_context  # noqa: E402

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
KEEPALIVE = 60
SUB_CHUNK = 100   # topics per SUBSCRIBE of the relay subscriber
MAX_SAMPLES = 5   # error texts kept for the report


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Loop:
    """The selector loop that drives every paho client of this process."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._misc_at = 0.0

    def add(self, c: mqtt.Client) -> None:
        # with a register-write callback paho queues outgoing packets instead of writing from
        # publish(): one write per socket per loop turn, however many packets it holds
        c.on_socket_open = self._open
        c.on_socket_close = self._close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._wrote
        self.clients.append(c)

    def _open(self, c: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on: a PUBACK followed by the next PUBLISH would wait for the
        # broker's delayed ACK (40 ms), a delay of the load generator, not of the emulator
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, READ, c)

    def _close(self, c: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, c: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, READ | WRITE, c)

    def _wrote(self, c: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, READ, c)

    def turn(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            c: mqtt.Client = key.data
            if mask & READ:
                c.loop_read()
                sock = c.socket()
                # TLS may hold decrypted records that epoll cannot see
                while sock is not None and sock.pending():  # type: ignore[union-attr]
                    c.loop_read()
                    sock = c.socket()
            if mask & WRITE and c.socket() is not None:
                c.loop_write()
        now = time.monotonic()
        if now - self._misc_at >= 1.0:
            self._misc_at = now
            for c in self.clients:
                if c.socket() is not None:
                    c.loop_misc()

    def run_until(self, done: Any, deadline: float, step: float = 0.2) -> bool:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.turn(min(step, left))
        return True


class Phase:
    """One phase of one worker: its clients, the rows, the bookkeeping."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.mode: str = req["mode"]
        self.devices: list[tuple[str, str, str]] = req["devices"]   # (id, password, mo id)
        self.window: int = req["window"]
        self.timeout: float = req["row_timeout"]
        self.head = f"15,{req['xid']}\n{req['tid']},".encode()
        self.type_b: bytes = req["type"].encode()
        self.loop = Loop()
        self.ctx = client_ssl_context(req["ca_cert"])
        self.index = {d[0]: i for i, d in enumerate(self.devices)}
        n = len(self.devices)
        self.clients: list[mqtt.Client] = []
        self.topics = [f"ms/{d[0]}" for d in self.devices]
        self.bodies = [self.head + f"{d[2]},".encode() + self.type_b + b"," for d in self.devices]
        self.waiting: list[dict[int, float]] = [{} for _ in range(n)]  # seq -> publish time
        self.next_seq = [0] * n
        self.last_seq = [0] * n
        self.done_seqs: list[set[int]] = [set() for _ in range(n)]
        self.expired: list[set[int]] = [set() for _ in range(n)]
        self.timing = False
        self.lat = array("d")
        self.count = {"sent": 0, "answered": 0, "dup": 0, "stale": 0, "errors": 0, "late": 0,
                      "timed_out": 0}
        self.samples: list[str] = []
        self.connack: dict[int, str] = {}
        self.subacked = 0
        self.subs_wanted = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.closed = 0   # rows of the current rows() call answered or timed out

    # -- clients --------------------------------------------------------------------------

    def _client(self, client_id: str, user: str, password: str, userdata: int) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False,
                        userdata=userdata)
        c.username_pw_set(user, password)
        c.tls_set_context(self.ctx)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        self.loop.add(c)
        return c

    def _on_connect(self, c: mqtt.Client, userdata: int, flags: Any, rc: Any,
                    props: Any = None) -> None:
        self.connack[userdata] = str(rc)
        if rc.is_failure:
            self._sample(f"CONNACK {rc} for client {userdata}")
            return
        if userdata < 0:   # the relay subscriber: ms/<ID> of this worker's devices
            for i in range(0, len(self.topics), SUB_CHUNK):
                c.subscribe([(t, 1) for t in self.topics[i:i + SUB_CHUNK]])
        elif self.mode == "emulator":
            c.subscribe("mr/" + self.devices[userdata][0], 1)

    def _on_subscribe(self, c: mqtt.Client, userdata: int, mid: int, rcs: Any,
                      props: Any = None) -> None:
        for rc in rcs:
            if rc.is_failure:
                self._sample(f"SUBACK {rc} for client {userdata}")
        self.subacked += 1

    def _sample(self, text: str) -> None:
        self.count["errors"] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    def connect(self) -> float:
        t0 = time.monotonic()
        r = self.req
        sub = None
        if self.mode == "relay":
            # the subscriber first, so no device's first row can precede its subscription
            user, password = r["subscriber"]
            sub = self._client(r["subscriber_id"], user, password, -1)
            sub.on_message = self._on_relayed
            self.subs_wanted = -(-len(self.topics) // SUB_CHUNK)
        else:
            self.subs_wanted = len(self.devices)
        for i, (dev, password, _mo) in enumerate(self.devices):
            c = self._client(dev, dev, password, i)
            if self.mode == "emulator":
                c.on_message = self._on_answer
            self.clients.append(c)
        ordered = ([sub] if sub is not None else []) + self.clients
        deadline = time.monotonic() + r["connect_timeout"]
        for c in ordered:
            try:
                c.connect(r["host"], r["port"], keepalive=KEEPALIVE)
            except OSError as e:  # ssl.SSLError is one
                self._sample(f"connect: {e}")
            # serve the clients already connected while the others do their TLS handshakes
            self.loop.turn(0)
            if time.monotonic() > deadline:
                break
        want = len(ordered)
        self.loop.run_until(lambda: len(self.connack) >= want and self.subacked >= self.subs_wanted,
                            deadline)
        return time.monotonic() - t0

    # -- rows -----------------------------------------------------------------------------

    def _publish(self, i: int) -> None:
        seq = self.next_seq[i]
        self.next_seq[i] = seq + 1
        now = time.monotonic()
        self.waiting[i][seq] = now
        if self.timing and not self.t_first:
            self.t_first = now
        self.clients[i].publish(self.topics[i], self.bodies[i] + str(seq).encode(), qos=1)
        self.count["sent"] += 1

    def _fill(self, i: int) -> None:
        w = self.window
        while self.next_seq[i] <= self.last_seq[i] and (not w or len(self.waiting[i]) < w):
            self._publish(i)

    def _done(self, i: int, seq: int, now: float) -> None:
        t = self.waiting[i].pop(seq, None)
        if t is None:
            if seq in self.expired[i]:   # already counted as closed when it timed out
                self.expired[i].discard(seq)
                self.done_seqs[i].add(seq)
                self.count["late"] += 1
            elif seq in self.done_seqs[i]:
                self.count["dup"] += 1
            else:
                self._sample(f"answer for a row never sent: device {i} seq {seq}")
            return
        self.done_seqs[i].add(seq)
        self.closed += 1
        if self.timing:
            self.lat.append(now - t)
            self.count["answered"] += 1
            self.t_last = now
        self._fill(i)

    def _row(self, i: int, line: bytes, now: float) -> None:
        parts = line.rsplit(b",", 2)
        if len(parts) != 3 or parts[1] != self.type_b:
            if len(parts) == 3 and parts[1].startswith(b"bench-"):
                self.count["stale"] += 1   # a late answer of an earlier step
            else:
                self._sample(f"device {i}: {line[:120]!r}")
            return
        try:
            seq = int(parts[2])
        except ValueError:
            self._sample(f"device {i}: {line[:120]!r}")
            return
        self._done(i, seq, now)

    def _on_answer(self, c: mqtt.Client, i: int, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        for line in msg.payload.split(b"\n"):
            if line.startswith(b"87,"):
                continue
            self._row(i, line, now)

    def _on_relayed(self, c: mqtt.Client, userdata: int, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        i = self.index.get(msg.topic[3:])
        if i is None:
            self._sample(f"relayed message on an unexpected topic {msg.topic[:80]}")
            return
        self._row(i, msg.payload.rsplit(b"\n", 1)[-1], now)

    def rows(self, first: int, last: int, timing: bool, deadline: float) -> bool:
        """Send rows first..last of every device, at most `window` waiting per device."""
        self.timing = timing
        self.closed = 0
        for i in range(len(self.devices)):
            self.next_seq[i] = first
            self.last_seq[i] = last
        for i in range(len(self.devices)):
            self._fill(i)
        wanted = len(self.devices) * (last - first + 1)
        check_at = time.monotonic() + 1.0
        while self.closed < wanted:
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= check_at:
                self._expire(now)
                check_at = now + 1.0
            self.loop.turn(0.05)
        return True

    def _expire(self, now: float) -> None:
        # a row unanswered for `timeout` seconds counts as timed out; its device goes on
        for i, w in enumerate(self.waiting):
            for seq, t in list(w.items()):
                if now - t >= self.timeout:
                    del w[seq]
                    self.expired[i].add(seq)
                    self.count["timed_out"] += 1
                    self.closed += 1
            self._fill(i)

    def disconnect(self) -> None:
        for c in self.loop.clients:
            if c.socket() is not None:
                c.disconnect()
        self.loop.run_until(lambda: not self.loop.sel.get_map(), time.monotonic() + 10)
        for c in self.loop.clients:
            sock = c.socket()
            if sock is not None:   # its DISCONNECT did not go out in time: just close it
                sock.close()
        self.loop.sel.close()


def _phase(req: dict[str, Any], inp: BinaryIO, out: BinaryIO) -> None:
    p = Phase(req)
    connect_s = p.connect()
    ok = len(p.connack) == len(p.loop.clients) and not p.count["errors"]
    warm_s = 0.0
    if ok:
        t0 = time.monotonic()
        ok = p.rows(0, 0, False, time.monotonic() + req["row_timeout"] * 2)
        warm_s = time.monotonic() - t0
        if p.count["timed_out"] or not ok:
            p._sample(f"warm-up: {p.count['timed_out']} of {len(p.devices)} rows unanswered "
                      f"after {req['row_timeout']:.0f} s")
            ok = False
    elif len(p.connack) < len(p.loop.clients):
        p._sample(f"only {len(p.connack)} of {len(p.loop.clients)} clients got a CONNACK")
    _send(out, {"ready": ok, "connect_s": connect_s, "warm_s": warm_s, "errors": list(p.samples)})
    go = pickle.load(inp)
    result: dict[str, Any] = {}
    if go.get("cmd") == "go" and ok:
        for k in p.count:
            p.count[k] = 0
        cpu0 = _cpu()
        p.rows(1, req["rows"], True, time.monotonic() + req["phase_timeout"])
        # answers of rows that timed out may still come: give them a short grace
        p.loop.run_until(lambda: not any(p.expired), time.monotonic() + req["grace"])
        result = {"cpu": _cpu() - cpu0, "t_first": p.t_first, "t_last": p.t_last,
                  "lat": p.lat, **p.count}
    p.disconnect()
    result["errors"] = list(p.samples)
    _send(out, result)


def _send(out: BinaryIO, obj: Any) -> None:
    pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def main() -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep the pickle channel clean of stray prints
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:
            return
        if req.get("cmd") == "quit":
            return
        if req.get("cmd") == "phase":
            _phase(req, inp, out)


if __name__ == "__main__":
    main()
