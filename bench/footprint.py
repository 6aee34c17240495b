"""Footprint of the device package, one table per board model.

For each runtime (unix64, i386-esp32, i386-rp2, rp2040; see microcot_host.fidelity):
* per module of firmware/microcot: its .mpy size and the heap its import costs (retained after a
  collection, and the bytes allocated during the import where the port counts them), each import
  in a fresh interpreter from the .mpy compiled for that runtime's architecture, as a board does;
* the smallest heap with which the whole device suite passes through the HIL plugin
  (`pytest --board virtual --board-name B --board-heap H tests/device`, bisected to 1 KiB, the
  result confirmed 3 times), as the interpreter's heapsize and as the free heap after boot it
  means (what a real board's gc.mem_free() would have to show). On the emulated RP2040 the RAM is
  the chip's: the suite runs once and its free heap after boot is reported instead.

    python bench/footprint.py [--runtimes unix64,i386-esp32,i386-rp2,rp2040] [--json]

Heap figures for real boards come from the 32-bit models only (DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from microcot_host import deploy, fidelity, transport  # noqa: E402
from microcot_host.vboard.heapcal import free_for_heapsize  # noqa: E402
from microcot_host.vboard.models import make_board, micropython_for  # noqa: E402

# the board file whose model each runtime is, for the HIL runs
BOARD_OF = {"unix64": "virtual", "i386-esp32": "esp32-generic", "i386-rp2": "rp2-pico-w",
            "rp2040": "rp2-pico-w"}

IMPORT_PROBE = """
import gc, sys, micropython
sys.path[:0] = [%(lib)r]
gc.collect()
before = gc.mem_alloc()
import microcot.%(mod)s
gc.collect()
print(gc.mem_alloc() - before, micropython.mem_peak() if hasattr(micropython, 'mem_peak') else -1)
"""


def modules() -> list[Path]:
    return [p for p in sorted((ROOT / "firmware" / "microcot").glob("*.py"))
            if p.stem != "__init__"]


def build(lib: Path, arch: str | None) -> dict[str, int]:
    (lib / "microcot").mkdir(parents=True)
    sizes = {}
    for src in sorted((ROOT / "firmware" / "microcot").glob("*.py")):
        data = deploy.compile_module(src, f"microcot/{src.name}", arch, lib / "microcot")
        sizes[src.stem] = len(data)
    return sizes


def unix_imports(mp: str) -> list[dict]:
    mpy = int(subprocess.run([mp, "-c", "import sys; print(sys.implementation._mpy)"],
                             capture_output=True, text=True, timeout=30).stdout)
    arch = transport.MPY_ARCHES[mpy >> 10]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp)
        sizes = build(lib, arch)
        for src in modules():
            r = subprocess.run([mp, "-X", "heapsize=1m", "-c",
                                IMPORT_PROBE % {"lib": str(lib), "mod": src.stem}],
                               capture_output=True, text=True, timeout=60)
            row: dict = {"module": src.stem, "mpy_bytes": sizes[src.stem]}
            if r.returncode:
                row["error"] = r.stderr.strip()[-200:]
            else:
                row["import_heap"], row["peak"] = (int(x) for x in r.stdout.split())
            rows.append(row)
    return rows


def rp2040_imports_and_suite() -> tuple[list[dict], dict]:
    """Imports on the real firmware (after a deploy, each after a soft reset), then the suite."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        board = make_board("rp2-pico-w", runtime="rp2040", name="bench-footprint",
                           flash_dir=Path(tmp)).start()
        try:
            t = transport.open_board(board.port)
            try:
                info = transport.board_info(t)
                deploy.deploy_transport(t, None)
                with tempfile.TemporaryDirectory() as built:
                    sizes = build(Path(built), info.arch)
                for src in modules():
                    transport.soft_reset(t)
                    out = transport.run(t, IMPORT_PROBE % {"lib": "/lib", "mod": src.stem},
                                        timeout=60).decode().split()
                    rows.append({"module": src.stem, "mpy_bytes": sizes.get(src.stem, -1),
                                 "import_heap": int(out[0]), "peak": int(out[1])})
                transport.soft_reset(t)
                free = int(transport.run(t, "import gc\ngc.collect()\nprint(gc.mem_free())"))
            finally:
                transport.close(t)
        finally:
            board.stop()
    ok, last = suite("rp2-pico-w", None, runtime="rp2040")
    return rows, {"free_after_boot": free, "suite": last, "passed": ok,
                  "micropython": info.version}


def suite(board: str, heap: int | None, runtime: str | None = None) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--board", "virtual",
           "--board-name", board, str(ROOT / "tests" / "device")]
    if heap is not None:
        cmd += ["--board-heap", str(heap)]
    if runtime is not None:
        cmd += ["--board-runtime", runtime]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    lines = r.stdout.strip().splitlines()
    return r.returncode == 0, lines[-1] if lines else r.stderr[-300:]


def smallest_suite_heap(board: str, runtime: str, lo: int = 24 * 1024,
                        hi: int = 1024 * 1024) -> tuple[int | None, list[tuple[int, bool]]]:
    trials: list[tuple[int, bool]] = []
    ok, _ = suite(board, hi, runtime)
    if not ok:
        return None, trials
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 512 * 512
        ok, _ = suite(board, mid, runtime)
        trials.append((mid, ok))
        print(f"    {runtime}: heapsize {mid}: {'passes' if ok else 'fails'}", flush=True)
        hi, lo = (mid, lo) if ok else (hi, mid)
    while not all(suite(board, hi, runtime)[0] for _ in range(3)):
        trials.append((hi, False))
        hi += 1024
    return hi, trials


def print_imports(rows: list[dict]) -> None:
    print(f"{'module':<12} {'.mpy bytes':>10} {'import heap':>12} {'allocated':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['module']:<12} {r['mpy_bytes']:>10}  import failed: {r['error']}")
        else:
            print(f"{r['module']:<12} {r['mpy_bytes']:>10} {r['import_heap']:>12} "
                  f"{r['peak']:>10}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtimes", default="unix64,i386-esp32,i386-rp2,rp2040")
    ap.add_argument("--no-suite", action="store_true", help="imports only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict = {}
    for rt in args.runtimes.split(","):
        why = fidelity.missing(rt)
        if why:
            print(f"{rt}: skipped: {why}")
            continue
        print(f"== {rt} ({BOARD_OF[rt]}) ...", flush=True)
        if rt == "rp2040":
            rows, extra = rp2040_imports_and_suite()
            report[rt] = {"imports": rows, **extra}
            continue
        mp = micropython_for(rt)
        entry: dict = {"imports": unix_imports(mp)}
        if not args.no_suite:
            need, trials = smallest_suite_heap(BOARD_OF[rt], rt)
            entry.update(suite_heapsize=need, trials=trials,
                         suite_free=free_for_heapsize(mp, need) if need else None)
        report[rt] = entry
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for rt, e in report.items():
        print(f"\n{rt} (board file {BOARD_OF[rt]})")
        print_imports(e["imports"])
        total = sum(r["mpy_bytes"] for r in e["imports"] if r["mpy_bytes"] > 0)
        print(f"{'total':<12} {total:>10}")
        if "suite_heapsize" in e and e["suite_heapsize"]:
            print(f"device suite passes from heapsize {e['suite_heapsize']:,} B "
                  f"= {e['suite_free']:,} B free after boot (bisected to 1 KiB, confirmed 3x)")
        if "free_after_boot" in e:
            print(f"device suite at the chip's RAM ({e['free_after_boot']:,} B free after boot, "
                  f"MicroPython {e['micropython']}): {e['suite']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
