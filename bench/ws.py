"""WebSocket echo throughput and heap: microcot.ws on MicroPython against `websocket-client`.

Who: microcot.ws on the virtual board (the 64-bit unix port from PyPI), on the i386 ESP32 model
(`micropython-i386-esp32` of the faithful boards, when MICROCOT_FIDELITY_DIR has it) and on
CPython; the peer is the `websocket-client` library (PyPI, its defaults) on CPython. Every client
is a process of its own (bench/_ws_microcot.py, bench/_ws_peer.py), started afresh for each
message size, and all talk to one echo server, the `websockets` library's asyncio server in yet
another process (bench/_ws_echo.py), over plain ws:// on 127.0.0.1 (with --tls, also wss://
rows against a second server; TLS 1.2+/1.3 as negotiated, the server certificate verified).
microcot.ws runs with its defaults but keep_alive=False (websocket-client sends no pings
either) and max_recv_frame_size raised to the message size above 64 KiB (the server echoes a
message as one frame). MicroPython runs with the port's default heap (2 MB on 64-bit, 1 MB on
i386) unless a size needs more (1 MiB: 5 MiB, see mp_heap()); the i386 model is a model of the
ESP32's CPU and object sizes here, not of its heap.

What: for each size, COUNT round trips of a binary message, one in flight (send, wait for the
echo, compare it byte for byte with what was sent, next), after two untimed ones; the clock runs
inside the client process around the COUNT round trips. The MicroPython client waits where an
application waits, in execute(WAIT_MS), which sleeps in poll() until the echo is there; it never
spins, so the echo server keeps the second core. Runs are interleaved: for each size, REPEAT
rounds, each giving every client one run, the order rotated per round; the tables give the median
run. A run with a mismatched echo is invalid: it is counted, the row says so, and the exit status
is 1 (--corrupt N makes the server spoil every Nth echo, to check the checking). The load average
is recorded before every run, and the CPU time the client and the server spent on it
(/proc/PID/schedstat): on a shared machine the CPU time per echo is steadier than the rate.

msgs/s = echoes per second; MB/s = message bytes per second one way (10**6 bytes; the same bytes
come back); ratio = msgs/s over websocket-client's median at that size (wss:// rows over
websocket-client's wss:// row).

Heap, in separate fresh processes (not timed), sizes ascending:
- microcot on MicroPython: HELD = gc.mem_alloc() after gc.collect() inside on_message (the echo
  in the client's buffer), above the heap before connect() (imports excluded), the benchmark's
  own message not counted; PEAK <= HELD + the bytes allocated during one more round trip with
  the GC off (garbage included), an upper bound of the peak.
- websocket-client: tracemalloc from before connecting (after a first connection, so that what
  it imports lazily is not counted); HELD = traced size with recv()'s echo in hand, PEAK =
  tracemalloc's peak over one round trip, both above the size before connecting and without the
  benchmark's own message. Kernel socket buffers count for neither.
- RSS = each timed process's peak resident set (VmHWM), interpreter included.

    python bench/ws.py [--repeat 5] [--sizes 16,1024,65536,1048576] [--more] [--tls] [--json]
    python bench/ws.py --quick      # one size, few messages, one run each (a smoke test)
    python bench/ws.py --compare ../other/firmware   # A/B against another checkout's microcot
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIRMWARE = ROOT / "firmware"
# this script is named ws.py: keep its directory off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT / "host"))

from microcot_host import fidelity  # noqa: E402
from microcot_host.vboard.board import find_micropython  # noqa: E402

SIZES = (16, 1024, 65536, 1048576)
MORE_SIZES = (256, 16384)
# round trips per run: about 0.3-1 s each, enough clock ticks for the CPU times
COUNTS = {16: 5000, 256: 5000, 1024: 4000, 16384: 2000, 65536: 1000, 1048576: 60}
WAIT_MS = 100  # execute()'s wait: poll() returns as soon as the echo is there
DEFAULT_FRAME = 0x10000  # microcot.ws's default max_recv_frame_size
DEFAULT_MSG = 0x100000  # and max_recv_msg_size


def mp_heap(size: int) -> int | None:
    """-X heapsize for a MicroPython client echoing `size` bytes: None (the port's default, 2 MB
    on the 64-bit port, 1 MB on i386) while the echo fits it; else room for the message, the
    client's buffer of that size and, while that buffer grows (by 16 KiB at a time past 16 KiB,
    wsframe.Reader.GROW_MAX), the one it replaces, with as much again for fragmentation, in
    whole MiB (5 MiB for 1 MiB; 4 MiB failed). MicroPython allocates more slowly in a larger
    heap (gc_alloc searches from the first free block), so it is no larger than a size needs."""
    need = 4 * size + (512 << 10)
    return None if need <= (1 << 20) else -(-need // (1 << 20)) << 20


@dataclass
class Spec:
    key: str
    label: str
    interp: list[str]  # the interpreter (and options); the script and its arguments follow
    kind: str  # "mp" (heap through gc), "cpy" (microcot on CPython), "peer"
    port: int
    ca: Path | None = None
    firmware: Path = FIRMWARE

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def argv(self, size: int) -> list[str]:
        """The client's command line for messages of `size` bytes."""
        if self.kind == "peer":
            return self.interp + [str(HERE / "_ws_peer.py"), str(self.port)] + (
                ["--ca", str(self.ca)] if self.ca else [])
        heap = mp_heap(size) if self.kind == "mp" else None
        return self.interp + (["-X", "heapsize=%d" % heap] if heap else []) + [
            str(HERE / "_ws_microcot.py"), str(self.firmware), str(self.port),
            str(max(size, DEFAULT_FRAME)), str(WAIT_MS)] + ([str(self.ca)] if self.ca else [])


@dataclass
class Run:
    us: int
    bad: int
    load: float
    cpu_us: int  # the client process's CPU time (user + system) during the run
    srv_us: int  # the echo server's


TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def cpu_us(pid: int) -> int:
    """A process's CPU time so far: the scheduler's own count (Linux /proc/PID/schedstat, in
    ns), else user + system time from /proc/PID/stat (clock-tick resolution)."""
    try:
        return int(Path("/proc/%d/schedstat" % pid).read_text().split()[0]) // 1000
    except (OSError, ValueError, IndexError):
        f = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        return int((int(f[11]) + int(f[12])) * TICK_US)


@dataclass
class Result:
    spec: Spec
    version: str = ""
    runs: dict[int, list[Run]] = field(default_factory=dict)
    heap: dict[int, tuple[int, int]] = field(default_factory=dict)
    rss_kb: dict[int, int] = field(default_factory=dict)  # per size: fresh processes


class Client:
    """A client process answering one line per command."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=str(HERE))
        self.ready = self._line("READY")

    def _line(self, want: str) -> list[str]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("client %s ended (exit %s) waiting for %s"
                                   % (self.proc.args, self.proc.wait(10), want))
            parts = line.split()
            if parts and parts[0] == want:
                return parts[1:]
            if parts and parts[0] == "FAIL":
                raise RuntimeError("client %s: %s" % (self.proc.args, line.strip()))

    def ask(self, cmd: str, want: str) -> list[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return [int(x) for x in self._line(want)]

    def peak_rss_kb(self) -> int:
        try:
            for line in Path("/proc/%d/status" % self.proc.pid).read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class EchoServer:
    """bench/_ws_echo.py in a child process; a TLS one when given certificate files."""

    def __init__(self, cert: Path | None = None, key: Path | None = None,
                 corrupt: int = 0) -> None:
        argv = [sys.executable, str(HERE / "_ws_echo.py"), "--corrupt", str(corrupt)]
        if cert and key:
            argv += ["--cert", str(cert), "--key", str(key)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def specs(port: int, tls_port: int | None, ca: Path | None, esp32: Path | None,
          with_cpython: bool, other: Path | None) -> list[Spec]:
    mp = find_micropython()
    out: list[Spec] = []

    def add(key: str, label: str, interp: list[str], kind: str, fw: Path = FIRMWARE) -> None:
        out.append(Spec(key, label, interp, kind, port, None, fw))
        if tls_port and ca:
            out.append(Spec(key + "-tls", label + ", wss://", interp, kind, tls_port, ca, fw))

    add("mp-unix", "microcot.ws, MicroPython %s unix (virtual board)", [mp], "mp")
    if other:
        add("mp-unix-other", "microcot.ws of %s, MicroPython %%s unix" % other, [mp], "mp",
            other)
    if esp32:
        add("mp-esp32", "microcot.ws, MicroPython %s i386 ESP32 model", [str(esp32)], "mp")
    if with_cpython:
        add("cpy", "microcot.ws, CPython %s", [sys.executable], "cpy")
    add("peer", "websocket-client %s, CPython", [sys.executable], "peer")
    return out


def timed(specs_: list[Spec], servers: dict[bool, int], sizes: list[int],
          counts: dict[int, int], repeat: int, log: bool) -> dict[str, Result]:
    """The interleaved runs; `servers` maps tls to the echo server's pid."""
    results = {s.key: Result(s) for s in specs_}
    for size in sizes:
        clients: dict[str, Client] = {}
        try:
            for s in specs_:  # fresh processes per size: each MicroPython with its heap
                clients[s.key] = c = Client(s.argv(size))
                results[s.key].version = c.ready[0]
            n = counts[size]
            for r in range(repeat):
                order = specs_[r % len(specs_):] + specs_[:r % len(specs_)]
                for s in order:
                    load = os.getloadavg()[0]
                    c, srv = clients[s.key].proc.pid, servers[s.tls]
                    c0, s0 = cpu_us(c), cpu_us(srv)
                    _, _, us, bad = clients[s.key].ask("run %d %d" % (size, n), "RUN")
                    run = Run(us, bad, load, cpu_us(c) - c0, cpu_us(srv) - s0)
                    results[s.key].runs.setdefault(size, []).append(run)
                    if log:
                        print("  %-12s %8d B %6d msgs %7.3f s %d bad, CPU/echo %5.0f us, "
                              "server %5.0f us, load %.2f"
                              % (s.key, size, n, us / 1e6, bad, run.cpu_us / n, run.srv_us / n,
                                 load), file=sys.stderr)
            for s in specs_:
                results[s.key].rss_kb[size] = clients[s.key].peak_rss_kb()
        finally:
            for c in clients.values():
                c.close()
    return results


def heaps(specs_: list[Spec], sizes: list[int], results: dict[str, Result]) -> None:
    for s in specs_:
        if s.kind == "cpy":
            continue  # CPython's heap says nothing about a board
        argv = s.argv(max(sizes)) + (["--trace"] if s.kind == "peer" else [])
        c = Client(argv)
        try:
            for size in sorted(sizes):
                _, a, b, bad = c.ask("heap %d" % size, "HEAP")
                if bad:
                    raise RuntimeError("%s: a mismatched echo in the heap run" % s.key)
                # microcot answers HELD and the garbage of a round trip, the peer HELD and PEAK
                results[s.key].heap[size] = (a, a + b if s.kind == "mp" else b)
        finally:
            c.close()


def median_rate(runs: list[Run], count: int) -> float:
    return statistics.median(count / (r.us / 1e6) for r in runs)


def size_name(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return "%d MiB" % (n >> 20)
    if n >= 1024 and n % 1024 == 0:
        return "%d KiB" % (n >> 10)
    return "%d B" % n


def report(results: dict[str, Result], sizes: list[int], counts: dict[int, int], repeat: int,
           loads: dict[str, tuple[float, ...]]) -> tuple[str, int]:
    """One Markdown table, a row per size and client, and the number of mismatched echoes."""
    peer_of = {False: "peer", True: "peer-tls"}
    bad_total = sum(r.bad for res in results.values() for rs in res.runs.values() for r in rs)
    compared = sum(len(rs) * (counts[sz] + 2) for res in results.values()
                   for sz, rs in res.runs.items())
    run_loads = [r.load for res in results.values() for rs in res.runs.values() for r in rs]
    lines = [
        "Echo round trips, one message in flight, against one `websockets` server on 127.0.0.1 "
        "(ws:// unless marked wss://); median of %d interleaved runs; mismatched echoes: %d of "
        "%d compared. Load average (1 min, 2 cores) before %.2f, during the runs %.2f-%.2f, "
        "after %.2f." % (repeat, bad_total, compared, loads["before"][0],
                         min(run_loads, default=0), max(run_loads, default=0),
                         loads["after"][0]),
        "",
        "| size | client | msgs/s | MB/s | ratio | runs, msgs/s | CPU us/echo, client / "
        "server | heap held / peak, B | RSS, kB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in sizes:
        n = counts[size]
        for res in results.values():
            runs = res.runs.get(size, [])
            if not runs:
                continue
            label = res.spec.label % res.version
            if any(r.bad for r in runs):
                lines.append("| %s | %s | INVALID: %d mismatched echoes | | | | | | |"
                             % (size_name(size), label, sum(r.bad for r in runs)))
                continue
            rate = median_rate(runs, n)
            peer = results.get(peer_of[res.spec.tls])
            ratio = "%.2fx" % (rate / median_rate(peer.runs[size], n)) \
                if peer and peer.runs.get(size) else "-"
            rates = [n / (r.us / 1e6) for r in runs]
            cpu = "%.0f / %.0f" % (statistics.median(r.cpu_us / n for r in runs),
                                   statistics.median(r.srv_us / n for r in runs))
            h = res.heap.get(size)
            heap = f"{h[0]:,} / {h[1]:,}" if h else "-"
            rss = f"{res.rss_kb[size]:,}" if size in res.rss_kb else "-"
            lines.append(f"| {size_name(size)} | {label} | {rate:,.0f} | {rate * size / 1e6:.2f} "
                         f"| {ratio} | {min(rates):,.0f}-{max(rates):,.0f} | {cpu} | {heap} "
                         f"| {rss} |")
    lines.append("")
    lines.append("MicroPython heap (-X heapsize): %s. Heap held / peak: see the docstring of "
                 "bench/ws.py." % ", ".join(
                     "%s %s" % (size_name(s), "%d MiB" % (mp_heap(s) >> 20) if mp_heap(s)
                                else "default") for s in sizes))
    return "\n".join(lines), bad_total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs per client and size")
    ap.add_argument("--sizes", help="comma-separated message sizes (default: %s)"
                    % ",".join(map(str, SIZES)))
    ap.add_argument("--more", action="store_true", help="also %s" % ", ".join(
        size_name(s) for s in MORE_SIZES))
    ap.add_argument("--count", type=int, help="round trips per run for every size")
    ap.add_argument("--tls", action="store_true", help="also wss:// rows")
    ap.add_argument("--no-esp32", action="store_true", help="skip the i386 ESP32 model")
    ap.add_argument("--no-cpython", action="store_true", help="skip microcot.ws on CPython")
    ap.add_argument("--no-heap", action="store_true", help="skip the heap figures")
    ap.add_argument("--quick", action="store_true",
                    help="1 KiB, 20 round trips, one run each, virtual board and peer only")
    ap.add_argument("--compare", type=Path, metavar="FIRMWARE_DIR",
                    help="also microcot.ws from another checkout's firmware/ (virtual board)")
    ap.add_argument("--corrupt", type=int, default=0, metavar="N",
                    help="the server flips a byte of every Nth echo (checks the checking)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON to FILE")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every run on stderr")
    args = ap.parse_args()

    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else list(SIZES)
    if args.more:
        sizes = sorted(set(sizes) | set(MORE_SIZES))
    counts = {s: args.count or COUNTS.get(s, max(16, min(2000, (1 << 26) // max(s, 1) // 4)))
              for s in sizes}
    repeat = args.repeat
    if args.quick:
        sizes, counts, repeat = [1024], {1024: args.count or 20}, 1
        args.no_esp32 = args.no_cpython = args.no_heap = True
    esp32 = None
    if not args.no_esp32:
        try:
            esp32 = fidelity.i386_binary("i386-esp32")
        except fidelity.FidelityMissing as e:
            print("(no i386 ESP32 model: %s)" % e, file=sys.stderr)

    loads = {"before": os.getloadavg()}
    servers = [EchoServer(corrupt=args.corrupt)]
    tmp = tempfile.TemporaryDirectory(prefix="microcot-bench-ws-")
    try:
        ca = None
        tls_port = None
        if args.tls:
            from microcot_host.emulator.certs import ensure_ca_and_server

            files = ensure_ca_and_server(Path(tmp.name))
            servers.append(EchoServer(files.server_cert, files.server_key, args.corrupt))
            tls_port, ca = servers[1].port, files.ca_cert
        sp = specs(servers[0].port, tls_port, ca, esp32, not args.no_cpython,
                   args.compare.resolve() if args.compare else None)
        t0 = time.monotonic()
        pids = {False: servers[0].proc.pid, True: servers[-1].proc.pid}
        results = timed(sp, pids, sizes, counts, repeat, args.verbose)
        if not args.no_heap:
            heaps(sp, sizes, results)
        loads["after"] = os.getloadavg()
        wall = time.monotonic() - t0
    finally:
        for srv in servers:
            srv.close()
        tmp.cleanup()

    text, bad = report(results, sizes, counts, repeat, loads)
    data = {
        "sizes": sizes, "counts": counts, "repeat": repeat, "wait_ms": WAIT_MS,
        "mp_heap": {str(sz): mp_heap(sz) for sz in sizes}, "loadavg": loads, "seconds": wall,
        "mismatches": bad,
        "clients": {k: {"label": r.spec.label % r.version, "version": r.version,
                        "tls": r.spec.tls, "rss_kb": r.rss_kb,
                        "runs": {str(sz): [vars(x) for x in rs] for sz, rs in r.runs.items()},
                        "msgs_per_s": {str(sz): median_rate(rs, counts[sz])
                                       for sz, rs in r.runs.items()},
                        "heap": {str(sz): h for sz, h in r.heap.items()}}
                    for k, r in results.items()}}
    if args.save:
        args.save.write_text(json.dumps(data, indent=2))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)
        print("\n(%.0f s; execute(%d))" % (wall, WAIT_MS))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
