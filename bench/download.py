"""The device's HTTPS download (firmware/microcot/httpget.py, what c8y_Firmware and
c8y_SoftwareUpdate use) against curl, from the same platform emulator.

One emulator; one binary of --size bytes in its /inventory/binaries. The device: the ESP32's
32-bit model at its board file's budget (else the developer board), a script over the raw REPL
that downloads the binary with a device's own credentials, TLS verified with the emulator's CA,
into a sink that only counts (the emulated flash is host file I/O, not a board's), the SHA-256
checked by httpget; timed on the board from the request to the last byte; the heap's low-water
mark sampled every 8 chunks (gc.collect, gc.mem_free), below what it had before the download's
code was loaded. The peer: curl in a process of its own, same URL, same CA, same credentials,
writing to a file whose SHA-256 is checked; timed around the process. Runs alternate device,
curl, device, ... (--reps of each); medians are compared.

    python bench/download.py [--size 1572864] [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "firmware")]

from microcot_host import boards, deploy, fidelity, transport  # noqa: E402
from microcot_host.demo import new_iccid  # noqa: E402
from microcot_host.emulator import Emulator  # noqa: E402
from microcot_host.vboard.models import make_board  # noqa: E402

SCRIPT = """
import gc, time
gc.collect()
free0 = gc.mem_free()
from microcot import httpget
from microcot.tlsctx import tls_context
ctx = tls_context(cafile='/ca.pem')
gc.collect()
low = free1 = gc.mem_free()
class Sink:
    n = 0
    def write(self, b):
        self.n += len(b)
        return len(b)
    def seek(self, p):
        self.n = p
for k in range(%(reps)d):
    s = Sink()
    d = httpget.Download(%(url)r, s, sha256=%(sha)r, user=%(user)r, password=%(pw)r,
                         ssl_context=ctx, timeout=30, max_size=1 << 26)
    t0 = time.ticks_ms()
    i = 0
    while not d.step():
        i += 1
        if k == 0 and i %% 8 == 0:
            gc.collect()
            low = min(low, gc.mem_free())
    ms = time.ticks_diff(time.ticks_ms(), t0)
    print('RUN', s.n, ms, free0, free1, low)
    while True:  # the host runs curl in between: interleaved
        try:
            open('/go-%%d' %% k).close()
            break
        except OSError:
            time.sleep_ms(20)
print('DONE')
"""


def curl(url: str, ca: str, user: str, password: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--cacert", ca, "-u", f"{user}:{password}",
                    "-o", str(out), url], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=0x180000,
                    help="bytes of the binary (default: an OTA partition, 1.5 MiB)")
    ap.add_argument("--reps", type=int, default=5, help="runs of each, interleaved")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is not installed: it is the peer of this benchmark")
    data = os.urandom(args.size)
    sha = hashlib.sha256(data).hexdigest()
    board = "esp32-generic" if fidelity.missing("i386-esp32") is None else "virtual"
    work = Path(tempfile.mkdtemp(prefix="microcot-bench-dl-"))
    try:
        with Emulator(work / "emu") as emu:
            conn = emu.connection
            device = new_iccid()
            password = emu.add_device(device)
            binary = emu.upload_binary("bench.bin", data)
            url = f"{conn['https_url']}/inventory/binaries/{binary['id']}"
            flash = work / "flash"
            vb = make_board(board, name="bench-download", flash_dir=flash).start()
            dev: list[tuple[int, int, int, int, int]] = []
            peer: list[float] = []
            try:
                t = transport.open_board(vb.port)
                try:
                    deploy.deploy_transport(t, boards.load(board), app=False)
                    (flash / "ca.pem").write_text(Path(conn["ca_cert"]).read_text())
                    transport.soft_reset(t)  # the download runs in a freshly booted heap

                    buf = [""]

                    def on_output(b: bytes) -> None:
                        buf[0] += b.decode(errors="replace")
                        while "\n" in buf[0]:
                            line, buf[0] = buf[0].split("\n", 1)
                            m = re.match(r"RUN (\d+) (\d+) (\d+) (\d+) (\d+)", line.strip())
                            if not m:
                                continue
                            dev.append(tuple(int(x) for x in m.groups()))  # type: ignore
                            if int(m.group(1)) != args.size:
                                raise RuntimeError(f"the device got {m.group(1)} bytes")
                            out = work / f"curl-{len(peer)}.bin"
                            peer.append(curl(url, conn["ca_cert"], device, password, out))
                            if hashlib.sha256(out.read_bytes()).hexdigest() != sha:
                                raise RuntimeError("curl's copy differs")
                            (flash / f"go-{len(dev) - 1}").write_text("")

                    transport.run(t, SCRIPT % {"reps": args.reps, "url": url, "sha": sha,
                                               "user": device, "pw": password},
                                  timeout=600, on_output=on_output)
                finally:
                    transport.close(t)
            finally:
                vb.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dev_s = statistics.median(r[1] for r in dev) / 1000
    peer_s = statistics.median(peer)
    _, _, free0, free1, low = dev[0]
    report = {
        "board": board, "runtime": boards.load(board).runtime, "bytes": args.size,
        "device_seconds": dev_s, "curl_seconds": peer_s,
        "device_kib_s": args.size / 1024 / dev_s, "curl_kib_s": args.size / 1024 / peer_s,
        "time_ratio_device_over_curl": dev_s / peer_s,
        "heap_free_before": free0, "heap_code_and_tls": free0 - free1,
        "heap_during": free1 - low,
        "runs_device_ms": [r[1] for r in dev], "runs_curl_s": [round(x, 3) for x in peer],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"HTTPS download of {args.size:,} B from the emulator's binaries, median of "
          f"{args.reps} interleaved runs (SHA-256 checked on both sides)")
    print(f"  device ({board} on {report['runtime']}): {dev_s:.2f} s "
          f"({report['device_kib_s']:.0f} KiB/s)")
    print(f"  curl (own process):               {peer_s:.2f} s "
          f"({report['curl_kib_s']:.0f} KiB/s)")
    print(f"  device/curl time: {report['time_ratio_device_over_curl']:.1f}x")
    print(f"  heap: {free0:,} B free before; httpget, tlsctx and the TLS context take "
          f"{free0 - free1:,} B; the download itself at most {free1 - low:,} B more")
    print(f"  runs: device {report['runs_device_ms']} ms, curl {report['runs_curl_s']} s")


if __name__ == "__main__":
    main()
