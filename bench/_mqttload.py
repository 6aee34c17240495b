"""Load-generator worker for bench/emulator.py: devices that publish rows, and a C observer that
sees each row arrive.

The parent talks to this process over stdin/stdout with pickled dicts, one request -> one reply:

    {"cmd": "phase", ...}  start the observer and the devices, send every device's warm-up row
                           and wait for it, reply {"ready": ...}; then wait for {"cmd": "go"},
                           run the timed rows, stop the devices and reply with the results
    {"cmd": "quit"}        end

Devices (`publisher` of the request), both MQTT 3.1.1, TLS verified against the broker's CA,
persistent session (clean session off), QoS 1, the device's own user and its ID as client id,
Nagle off, at most `inflight` QoS 1 messages in flight (paho's default, 20), publishing only:
- "py": paho-mqtt clients, all on one `selectors` loop of this process through paho's manual
  network calls (not one thread per client);
- "c": one `mosquitto_pub -l` process per device (Debian's mosquitto-clients), which publishes
  each line written to its stdin as one message. Its user and password are in a 0600 options file
  that mosquitto_pub reads from $XDG_CONFIG_HOME (one folder per device), not on its command line,
  where every local user could read them.

The observer: one `mosquitto_sub` (C, QoS 1, persistent session) of this process, logged in as the
bench's observer user of that broker, subscribed to the completion topic of each of this process's
devices, printing `<topic> <payload in hex>` per message. Its session and subscriptions are made
first by a `mosquitto_sub -E` run (exits once the SUBACK is in), so no completion sent before the
observer itself is up can be missed: the broker queues it in the session. A row is complete when
the observer's line for it is read here: in mode "emulator" the answer `900,<line>,<type>,<seq>`
on mr/<ID> (the emulator publishes it after the row is stored), in mode "relay" the row itself
on ms/<ID> (checked byte for byte against what was sent).

Every device keeps at most `window` rows incomplete (0: no limit); the next row of a device is
sent when one of its rows completes. Latency = the row handed to the device (paho's publish()
called, or the line written to mosquitto_pub's stdin) -> its completion read from the observer,
on CLOCK_MONOTONIC. `<type>` is unique per phase, so a late completion of an earlier phase is
recognised as stale. A row incomplete for `row_timeout` seconds counts as timed out and its
device goes on; completed later it counts as late.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import selectors
import shutil
import signal
import socket
import subprocess
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
MAX_SAMPLES = 5          # error texts kept for the report
MAX_TOPIC_ARGS = 100_000  # bytes of explicit observer topics; beyond, one wildcard (see _observe)
CLK = os.sysconf("SC_CLK_TCK")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_rss(pid: int) -> int:
    """Resident set size of a process in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split between their users, so the sum over
    many processes of one program (mosquitto_pub) is what they take together (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def raise_fd_limit() -> None:
    # a process per device needs a pipe per device here, and paho a socket per device
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def options_file(folder: Path, tool: str, lines: list[str]) -> dict[str, str]:
    """A 0700 folder with a 0600 options file `tool` (mosquitto_pub/mosquitto_sub read
    $XDG_CONFIG_HOME/<tool>: one option per line); the environment that points there."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / tool
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XDG_CONFIG_HOME": str(folder)}


def tls_options(req: dict[str, Any], user: str, password: str) -> list[str]:
    return [f"-h {req['host']}", f"-p {req['port']}", f"--cafile {req['ca_cert']}",
            f"-u {user}", f"-P {password}", f"-i {user}", "-V mqttv311", "-q 1", "-c",
            "--nodelay", f"-k {KEEPALIVE}"]


# -- devices --------------------------------------------------------------------------------------

class PahoLoop:
    """The selector loop that drives every paho client of this process."""

    def __init__(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
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
        # broker's delayed ACK (40 ms), a delay of the load generator, not of the system
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

    def ready(self, c: mqtt.Client, mask: int) -> None:
        if mask & READ:
            c.loop_read()
            sock = c.socket()
            # TLS may hold decrypted records that epoll cannot see
            while sock is not None and sock.pending():  # type: ignore[union-attr]
                c.loop_read()
                sock = c.socket()
        if mask & WRITE and c.socket() is not None:
            c.loop_write()

    def misc(self) -> None:
        now = time.monotonic()
        if now - self._misc_at >= 1.0:
            self._misc_at = now
            for c in self.clients:
                if c.socket() is not None:
                    c.loop_misc()


class PyDevices:
    """Devices as paho clients on this process's selector loop."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.loop = PahoLoop(phase.sel)
        self.clients: list[mqtt.Client] = []
        self.connack: dict[int, str] = {}

    def start(self) -> None:
        p, req = self.phase, self.phase.req
        ctx = client_ssl_context(req["ca_cert"])
        deadline = time.monotonic() + req["connect_timeout"]
        for i, (dev, password, _mo) in enumerate(p.devices):
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                            client_id=dev, protocol=mqtt.MQTTv311, clean_session=False,
                            userdata=i)
            c.username_pw_set(dev, password)
            c.tls_set_context(ctx)
            c.max_inflight_messages_set(req["inflight"])
            c.on_connect = self._on_connect
            self.loop.add(c)
            self.clients.append(c)
            try:
                c.connect(req["host"], req["port"], keepalive=KEEPALIVE)
            except OSError as e:  # ssl.SSLError is one
                p.sample(f"connect: {e}")
            # serve the clients already connected while the others do their TLS handshakes
            p.turn(0)
            if time.monotonic() > deadline:
                break
        p.run_until(lambda: len(self.connack) >= len(p.devices), deadline)
        if len(self.connack) < len(p.devices):
            p.sample(f"only {len(self.connack)} of {len(p.devices)} devices got a CONNACK")

    def _on_connect(self, c: mqtt.Client, i: int, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack[i] = str(rc)
        if rc.is_failure:
            self.phase.sample(f"CONNACK {rc} for device {i}")

    def send(self, i: int, payload: bytes) -> None:
        self.clients[i].publish(self.phase.topics[i], payload, qos=1)

    def cpu(self) -> float:
        return 0.0   # counted in this process's own CPU

    def rss(self) -> int:
        return 0

    def stop(self) -> None:
        for c in self.clients:
            if c.socket() is not None:
                c.disconnect()
        self.phase.run_until(lambda: not any(c.socket() for c in self.clients),
                             time.monotonic() + 10)
        for c in self.clients:
            sock = c.socket()
            if sock is not None:   # its DISCONNECT did not go out in time: just close it
                sock.close()


class CDevices:
    """Devices as `mosquitto_pub -l` processes, one per device."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.procs: list[subprocess.Popen[bytes]] = []
        self.fds: list[int] = []
        self.errors = Path(phase.req["workdir"]) / "mosquitto_pub.err"

    def start(self) -> None:
        p, req = self.phase, self.phase.req
        binary = shutil.which("mosquitto_pub")
        if binary is None:
            p.sample("mosquitto_pub not found (Debian: mosquitto-clients)")
            return
        err = open(self.errors, "ab")  # noqa: SIM115 - shared by every child, closed below
        try:
            for i, (dev, password, _mo) in enumerate(p.devices):
                env = options_file(Path(req["workdir"]) / f"pub{i}", "mosquitto_pub",
                                   tls_options(req, dev, password) + [f"-M {req['inflight']}"])
                proc = subprocess.Popen([binary, "-l", "-t", p.topics[i]], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=err, env=env)
                assert proc.stdin is not None
                fd = proc.stdin.fileno()
                os.set_blocking(fd, False)
                self.procs.append(proc)
                self.fds.append(fd)
        finally:
            err.close()

    def send(self, i: int, payload: bytes) -> None:
        try:
            os.write(self.fds[i], payload + b"\n")
        except BlockingIOError:   # 64 KiB unread in its pipe: that device is stuck
            self.phase.sample(f"device {i}: mosquitto_pub does not read its input")
        except OSError as e:      # it ended (refused, or lost its connection)
            self.phase.sample(f"device {i}: mosquitto_pub gone ({e}, exit "
                              f"{self.procs[i].poll()})")

    def cpu(self) -> float:
        return sum(proc_cpu(pr.pid) for pr in self.procs)

    def rss(self) -> int:
        return sum(proc_pss(pr.pid) for pr in self.procs)

    def stop(self) -> None:
        # end of input: each publishes what it has, waits for the PUBACKs and disconnects
        for pr in self.procs:
            with contextlib.suppress(OSError):
                assert pr.stdin is not None
                pr.stdin.close()
        deadline = time.monotonic() + 30
        for pr in self.procs:
            try:
                pr.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        bad = [pr.returncode for pr in self.procs if pr.returncode not in (0, -signal.SIGKILL)]
        if bad:
            self.phase.sample(f"{len(bad)} mosquitto_pub ended with an error (exit {bad[0]})")
        with contextlib.suppress(OSError):
            text = self.errors.read_text(errors="replace").strip()
            if text:
                self.phase.sample("mosquitto_pub: " + text.splitlines()[0][:160])


# -- the observer ---------------------------------------------------------------------------------

class Observer:
    """One mosquitto_sub printing `<topic> <hex payload>` for each completion."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def start(self) -> bool:
        p, req = self.phase, self.phase.req
        obs = req["observer"]
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            p.sample("mosquitto_sub not found (Debian: mosquitto-clients)")
            return False
        env = options_file(Path(req["workdir"]) / "observer", "mosquitto_sub",
                           tls_options(req, obs["user"], obs["password"]))
        topics = p.done_topics
        if sum(len(t) + 4 for t in topics) > MAX_TOPIC_ARGS:
            # one SUBSCRIBE must stay under the broker's packet limit: a wildcard then, and the
            # completions of other processes' devices are ignored (only with many processes)
            topics = [req["done_prefix"] + "+"]
        targs = [a for t in topics for a in ("-t", t)]
        # first the session and its subscriptions, acknowledged; completions queue there
        made = subprocess.run([binary, "-E", *targs], env=env, capture_output=True,
                              timeout=req["connect_timeout"])
        if made.returncode != 0:
            p.sample(f"observer: {made.stderr.decode(errors='replace').strip()[:160]}")
            return False
        self.proc = subprocess.Popen([binary, "-F", "%t %x", *targs], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        p.sel.register(self.proc.stdout.fileno(), READ, self)
        return True

    def readable(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 18)
        except BlockingIOError:
            return
        if not chunk:
            self.phase.sel.unregister(self.proc.stdout.fileno())
            self.phase.sample(f"observer ended (exit {self.proc.poll()})")
            return
        now = time.monotonic()
        data = self.buf + chunk
        lines = data.split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            topic, _, hexed = line.partition(b" ")
            self.phase.completion(topic, bytes.fromhex(hexed.decode()), now)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -signal.SIGTERM) and err:
            self.phase.sample("observer: " + err.decode(errors="replace").strip()[:160])


# -- one phase ------------------------------------------------------------------------------------

class Phase:
    """One phase of one worker: its devices, the observer, the rows, the bookkeeping."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.req = req
        self.mode: str = req["mode"]
        self.devices: list[tuple[str, str, str]] = req["devices"]   # (id, password, mo id)
        self.window: int = req["window"]
        self.timeout: float = req["row_timeout"]
        self.type_b: bytes = req["type"].encode()
        self.sel = selectors.DefaultSelector()
        n = len(self.devices)
        self.topics = [f"ms/{d[0]}" for d in self.devices]
        self.done_topics = [req["done_prefix"] + d[0] for d in self.devices]
        self.index = {t.encode(): i for i, t in enumerate(self.done_topics)}
        sep = b" " if req["single_line"] else b"\n"
        # what a row of device i is: this prefix and its sequence number
        self.prefix = [b"15,%s%s%d,%s,%s," % (req["xid"].encode(), sep, req["tid"],
                                               d[2].encode(), self.type_b) for d in self.devices]
        self.waiting: list[dict[int, float]] = [{} for _ in range(n)]  # seq -> time sent
        self.next_seq = [0] * n
        self.last_seq = [0] * n
        self.done_seqs: list[set[int]] = [set() for _ in range(n)]
        self.expired: list[set[int]] = [set() for _ in range(n)]
        self.timing = False
        self.lat = array("d")
        self.count = {"sent": 0, "answered": 0, "dup": 0, "stale": 0, "errors": 0, "late": 0,
                      "timed_out": 0, "mismatch": 0, "foreign": 0}
        self.samples: list[str] = []
        self.t_first = 0.0
        self.t_last = 0.0
        self.closed = 0   # rows of the current rows() call completed or timed out
        self.observer = Observer(self)
        self.pub: PyDevices | CDevices = (PyDevices(self) if req["publisher"] == "py"
                                          else CDevices(self))

    def sample(self, text: str) -> None:
        self.count["errors"] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    # -- loop -------------------------------------------------------------------------------

    def turn(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            if key.data is self.observer:
                self.observer.readable()
            else:
                self.pub.loop.ready(key.data, mask)  # type: ignore[union-attr]
        if isinstance(self.pub, PyDevices):
            self.pub.loop.misc()

    def run_until(self, done: Any, deadline: float, step: float = 0.2) -> bool:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.turn(min(step, left))
        return True

    # -- rows -------------------------------------------------------------------------------

    def _send(self, i: int) -> None:
        seq = self.next_seq[i]
        self.next_seq[i] = seq + 1
        now = time.monotonic()
        self.waiting[i][seq] = now
        if self.timing and not self.t_first:
            self.t_first = now
        self.pub.send(i, self.prefix[i] + b"%d" % seq)
        self.count["sent"] += 1

    def _fill(self, i: int) -> None:
        w = self.window
        while self.next_seq[i] <= self.last_seq[i] and (not w or len(self.waiting[i]) < w):
            self._send(i)

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
                self.sample(f"completion of a row never sent: device {i} seq {seq}")
            return
        self.done_seqs[i].add(seq)
        self.closed += 1
        if self.timing:
            self.lat.append(now - t)
            self.count["answered"] += 1
            self.t_last = now
        self._fill(i)

    def completion(self, topic: bytes, payload: bytes, now: float) -> None:
        i = self.index.get(topic)
        if i is None:
            self.count["foreign"] += 1   # another process's device (wildcard observer)
            return
        if self.mode == "relay":
            self._relayed(i, payload, now)
            return
        for line in payload.split(b"\n"):
            if line.startswith(b"87,"):
                continue
            parts = line.rsplit(b",", 2)
            if not line.startswith(b"900,") or len(parts) != 3:
                self.sample(f"device {i}: {line[:120]!r}")
            elif parts[1] != self.type_b:
                self._other_type(i, line, parts[1])
            elif parts[2].isdigit():
                self._done(i, int(parts[2]), now)
            else:
                self.sample(f"device {i}: {line[:120]!r}")

    def _relayed(self, i: int, payload: bytes, now: float) -> None:
        pre = self.prefix[i]
        tail = payload[len(pre):]
        if payload.startswith(pre) and tail.isdigit():
            self._done(i, int(tail), now)   # the same bytes as sent, or this test fails
            return
        parts = payload.rsplit(b",", 2)
        if len(parts) == 3 and parts[1] != self.type_b:
            self._other_type(i, payload, parts[1])
        else:
            self.count["mismatch"] += 1
            self.sample(f"device {i}: relayed {payload[:120]!r}, sent {pre[:100]!r}...")

    def _other_type(self, i: int, line: bytes, mtype: bytes) -> None:
        if mtype.startswith(b"bench-"):
            self.count["stale"] += 1   # a late completion of an earlier phase
        else:
            self.sample(f"device {i}: {line[:120]!r}")

    def rows(self, first: int, last: int, timing: bool, deadline: float) -> bool:
        """Send rows first..last of every device, at most `window` incomplete per device."""
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
            self.turn(0.05)
        return True

    def _expire(self, now: float) -> None:
        # a row incomplete for `timeout` seconds counts as timed out; its device goes on
        for i, w in enumerate(self.waiting):
            for seq, t in list(w.items()):
                if now - t >= self.timeout:
                    del w[seq]
                    self.expired[i].add(seq)
                    self.count["timed_out"] += 1
                    self.closed += 1
            self._fill(i)


def _phase(req: dict[str, Any], inp: BinaryIO, out: BinaryIO) -> None:
    p = Phase(req)
    t0 = time.monotonic()
    ok = p.observer.start()
    if ok:
        p.pub.start()
        ok = not p.count["errors"]
    connect_s = time.monotonic() - t0
    if ok:
        # the warm-up row: for "c" devices also the proof that each one connected
        ok = p.rows(0, 0, False, time.monotonic() + req["connect_timeout"])
        if p.count["timed_out"] or not ok:
            p.sample(f"warm-up: {sum(map(len, p.waiting)) + p.count['timed_out']} of "
                     f"{len(p.devices)} rows incomplete")
            ok = False
    _send(out, {"ready": ok, "connect_s": connect_s, "warm_s": time.monotonic() - t0,
                "errors": list(p.samples)})
    go = pickle.load(inp)
    result: dict[str, Any] = {}
    if go.get("cmd") == "go" and ok:
        for k in p.count:
            p.count[k] = 0
        cpu0, pub0, obs0 = _cpu(), p.pub.cpu(), p.observer.cpu()
        p.rows(1, req["rows"], True, time.monotonic() + req["phase_timeout"])
        # completions of rows that timed out may still come: give them a short grace
        p.run_until(lambda: not any(p.expired), time.monotonic() + req["grace"])
        result = {"cpu": _cpu() - cpu0 + p.pub.cpu() - pub0, "cpu_observer": p.observer.cpu()
                  - obs0, "rss": proc_pss(os.getpid()) + p.pub.rss(), "t_first": p.t_first,
                  "t_last": p.t_last, "lat": p.lat, **p.count}
    p.pub.stop()
    p.observer.stop()
    p.sel.close()
    result["errors"] = list(p.samples)
    _send(out, result)


def _send(out: BinaryIO, obj: Any) -> None:
    pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def main() -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep the pickle channel clean of stray prints
    raise_fd_limit()
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
