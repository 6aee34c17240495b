"""Footprint of the device package on the MicroPython unix port.

For each module of firmware/microcot: its .mpy size, and the heap it costs to import (retained
after gc, and the peak during import), each in a fresh interpreter, importing the .mpy as a board
does. Then, per device test module, the smallest `-X heapsize=` with which all its tests pass
(bisection), and a confirming run of `pytest --board virtual` at the largest of those.

    python bench/footprint.py [--no-confirm] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from microcot_host import deploy  # noqa: E402

MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or "micropython"

IMPORT_PROBE = """
import gc, sys, micropython
sys.path[:0] = [%(lib)r]
gc.collect()
before = gc.mem_alloc()
import microcot.%(mod)s
gc.collect()
print(gc.mem_alloc() - before, micropython.mem_peak() if hasattr(micropython, 'mem_peak') else -1)
"""

# the same steps the HIL plugin takes on a board: import the module, call each test function
TEST_RUNNER = """
import sys
sys.path[:0] = [%(lib)r, %(tests)r]
import %(mod)s as m
for name in sorted(dir(m)):
    if name.startswith('test_'):
        getattr(m, name)()
print('PASS')
"""


def mp(code: str, heap: str | int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [MICROPYTHON]
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    return subprocess.run(cmd + ["-c", code], capture_output=True, text=True, timeout=timeout)


def arch() -> str | None:
    mpy = int(mp("import sys; print(sys.implementation._mpy)").stdout)
    from microcot_host.transport import MPY_ARCHES

    return MPY_ARCHES[mpy >> 10]


def build(tmp: Path) -> tuple[Path, Path, dict[str, int]]:
    lib, tests = tmp / "lib", tmp / "tests"
    (lib / "microcot").mkdir(parents=True)
    tests.mkdir()
    a = arch()
    sizes = {}
    for src in sorted((ROOT / "firmware" / "microcot").glob("*.py")):
        data = deploy.compile_module(src, f"microcot/{src.name}", a, lib / "microcot")
        sizes[src.stem] = len(data)
    for src in sorted((ROOT / "tests" / "device").glob("*.py")):
        if src.name != "conftest.py":
            deploy.compile_module(src, src.name, a, tests)
    return lib, tests, sizes


def import_costs(lib: Path, sizes: dict[str, int]) -> list[dict]:
    rows = []
    for mod, size in sizes.items():
        if mod == "__init__":
            continue
        r = mp(IMPORT_PROBE % {"lib": str(lib), "mod": mod})
        if r.returncode != 0:
            rows.append({"module": mod, "mpy_bytes": size, "error": r.stderr.strip()[-200:]})
            continue
        retained, peak = (int(x) for x in r.stdout.split())
        rows.append({"module": mod, "mpy_bytes": size, "import_heap": retained, "peak": peak})
    return rows


def passes(lib: Path, tests: Path, mod: str, heap: int) -> bool:
    try:
        r = mp(TEST_RUNNER % {"lib": str(lib), "tests": str(tests), "mod": mod}, heap=heap)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and r.stdout.strip().endswith("PASS")


def smallest_heap(lib: Path, tests: Path, mod: str, lo: int = 8 * 1024,
                  hi: int = 2 * 1024 * 1024) -> int | None:
    if not passes(lib, tests, mod, hi):
        return None
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 512 * 512
        if passes(lib, tests, mod, mid):
            hi = mid
        else:
            lo = mid
    return hi


def confirm(heap: int) -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--board", "virtual",
         "--board-heap", str(heap), str(ROOT / "tests" / "device")],
        cwd=ROOT, capture_output=True, text=True)
    print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-400:])
    return r.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-confirm", action="store_true", help="skip the pytest --board run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib, tests, sizes = build(Path(tmp))
        rows = import_costs(lib, sizes)
        heaps = {}
        for src in sorted((ROOT / "tests" / "device").glob("test_*.py")):
            heaps[src.stem] = smallest_heap(lib, tests, src.stem)
    print(f"MicroPython unix port: {mp('import sys; print(sys.version)').stdout.strip()}")
    print(f"\n{'module':<12} {'.mpy bytes':>10} {'import heap':>12} {'import peak':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['module']:<12} {r['mpy_bytes']:>10}  import failed: {r['error']}")
        else:
            print(f"{r['module']:<12} {r['mpy_bytes']:>10} {r['import_heap']:>12} {r['peak']:>12}")
    total = sum(r["mpy_bytes"] for r in rows) + sizes.get("__init__", 0)
    print(f"{'total':<12} {total:>10}")
    print(f"\n{'device tests':<18} {'smallest heap':>14}")
    for mod, h in heaps.items():
        print(f"{mod:<18} {('%d (%.1f KiB)' % (h, h / 1024)) if h else 'fails at 2 MiB':>14}")
    need = max((h for h in heaps.values() if h), default=None)
    print(f"\nall device tests pass standalone with -X heapsize={need}")
    confirmed = None
    if need and not args.no_confirm:
        # the virtual board's REPL is Python, not C: it takes heap a real board's REPL does not
        for extra in (0, 8 * 1024, 16 * 1024, 32 * 1024, 64 * 1024):
            print(f"pytest --board virtual --board-heap {need + extra}: ", end="", flush=True)
            if confirm(need + extra):
                confirmed = need + extra
                break
    if args.json:
        print(json.dumps({"modules": rows, "smallest_heap": heaps, "max": need,
                          "virtual_board_heap": confirmed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
