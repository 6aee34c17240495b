#!/usr/bin/env python3
"""The big fuzz counts of the decoders of untrusted input, on CPython or on a board.

    .venv/bin/python tools/fuzz.py                                  # CPython, 100,000 each
    .venv/bin/python tools/fuzz.py --board esp32-generic            # the ESP32 model, 5,000 each
    .venv/bin/python tools/fuzz.py --board rp2-pico-w --runtime rp2040 --count 500
    .venv/bin/python tools/fuzz.py --only smartrest,templates --count 1000 --json out.json

Runs every `fuzz_<decoder>(rng, n)` function of tests/device/test_fuzz_*.py (found by name: a
new module or function is picked up without a change here) with a `dt.Rng(seed)` and the
count, and prints one row per decoder: inputs, accepted, rejected, undocumented exceptions and
the time. A fuzz function takes its decoder's documented errors (the module's ERRORS) as a
rejection and lets anything else out: that is an undocumented exception, it ends that
decoder's run, its traceback is printed, and the exit code is 1.

On a board (`--board`, with `--port`, default `virtual`: a fresh virtual board of the board
file's model at its heap budget) the functions run through the HIL pytest plugin
(microcot_host.pytest_plugin): it starts the board, deploys the firmware, copies each module
and the helpers to /tests and soft-resets between modules, exactly as for `pytest --port`; this
script only replaces each module's test items by one item per fuzz function, whose time is
measured on the board (ticks_ms).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TESTS = ROOT / "tests" / "device"
CPYTHON_COUNT = 100_000
BOARD_COUNT = 5_000
MARK = "MICROCOT-FUZZ "


@dataclass
class Row:
    decoder: str  # the function's name without fuzz_
    module: str
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    undocumented: int = 0
    seconds: float = 0.0
    error: str = ""  # the undocumented exception's last line (its traceback is printed)
    skipped: str = ""  # why it did not run (a board that does not qualify)


def modules(device_dir: Path = DEVICE_TESTS) -> list[Path]:
    return sorted(device_dir.glob("test_fuzz_*.py"))


def fuzz_names(path: Path) -> list[str]:
    """The module's top-level fuzz_* functions, in the order they are defined (read by AST, as
    the HIL plugin reads a device module: it may not import on CPython's side)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.name for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("fuzz_")]


def _wanted(name: str, only: set[str] | None) -> bool:
    return not only or name[len("fuzz_"):] in only or name in only


def _take(row: Row, got: object) -> None:
    if not (isinstance(got, dict) and {"inputs", "accepted", "rejected"} <= set(got)):
        raise TypeError(f"fuzz_{row.decoder} returned {got!r}, not a dict of counts")
    row.inputs, row.accepted, row.rejected = got["inputs"], got["accepted"], got["rejected"]


# -- CPython -------------------------------------------------------------------------------------

def run_cpython(count: int, seed: int, only: set[str] | None,
                device_dir: Path = DEVICE_TESTS) -> list[Row]:
    for p in (str(ROOT / "firmware"), str(device_dir)):
        if p not in sys.path:
            sys.path.insert(0, p)
    dt = importlib.import_module("dt")
    rows = []
    for path in modules(device_dir):
        mod = importlib.import_module(path.stem)
        for name in fuzz_names(path):
            if not _wanted(name, only):
                continue
            row = Row(name[len("fuzz_"):], path.stem)
            t0 = time.perf_counter()
            try:
                _take(row, getattr(mod, name)(dt.Rng(seed), count))
            except Exception as e:  # what the decoder does not document: the point of the run
                row.undocumented = 1
                row.error = f"{type(e).__name__}: {e}"[:200]
                print(f"fuzz_{row.decoder}: undocumented exception", file=sys.stderr)
                traceback.print_exc()
            row.seconds = time.perf_counter() - t0
            rows.append(row)
    return rows


# -- on a board, through the HIL plugin -----------------------------------------------------------

class FuzzPlugin:
    """Replaces the device modules' test items by one item per fuzz function."""

    def __init__(self, count: int, seed: int, only: set[str] | None) -> None:
        self.count = count
        self.seed = seed
        self.only = only
        self.rows: list[Row] = []

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        from microcot_host.pytest_plugin import DeviceItem

        plugin = self

        class FuzzItem(DeviceItem):
            def runtest(self) -> None:
                plugin.run_item(self)

        new = []
        seen = set()
        for item in items:
            module = item.parent
            if module in seen or not isinstance(item, DeviceItem):
                continue
            seen.add(module)
            for name in fuzz_names(Path(module.path)):
                if _wanted(name, self.only):
                    # the module's BOARD_FAMILIES / BOARD_REQUIRES: its setup skips them all
                    new.append(FuzzItem.from_parent(module, name=name, lineno=1, timeout=None))
        items[:] = new

    def run_item(self, item) -> None:
        from microcot_host import transport
        from microcot_host.pytest_plugin import BOARD_TESTS, DeviceTestFailure

        session = item.config.pluginmanager.get_plugin("microcot-board-session")
        t = session.board()
        module = Path(item.path).stem
        row = Row(item.name[len("fuzz_"):], module)
        self.rows.append(row)
        code = (f"import sys\nif {BOARD_TESTS!r} not in sys.path:\n sys.path.append({BOARD_TESTS!r})\n"
                f"import time, dt\nimport {module} as _t\n_g = time.ticks_ms()\n"
                f"_r = _t.{item.name}(dt.Rng({self.seed}), {self.count})\n"
                f"print({MARK!r} + repr((_r['inputs'], _r['accepted'], _r['rejected'], "
                f"time.ticks_diff(time.ticks_ms(), _g))))\n")
        t0 = time.perf_counter()
        try:
            out = transport.run(t, code, timeout=item.config.getoption("--board-timeout"))
        except transport.ExecError as exc:
            tb = exc.error_output
            row.undocumented = 1
            row.seconds = time.perf_counter() - t0
            lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
            row.error = (lines[-1] if lines else "error")[:200]
            print(f"fuzz_{row.decoder} on the board: undocumented exception\n{tb}",
                  file=sys.stderr)
            raise DeviceTestFailure(row.error, "", tb) from None
        text = out.decode(errors="replace")
        line = [ln for ln in text.splitlines() if ln.startswith(MARK)]
        if not line:
            raise DeviceTestFailure(f"no result from the board: {text[-200:]!r}")
        n, a, r, ms = ast.literal_eval(line[-1][len(MARK):])
        _take(row, {"inputs": n, "accepted": a, "rejected": r})
        row.seconds = ms / 1000

    def pytest_runtest_logreport(self, report) -> None:
        name = report.nodeid.rsplit("::", 1)[-1]
        if report.skipped and report.when in ("setup", "call"):
            why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            why = why[len("Skipped: "):] if why.startswith("Skipped: ") else why
            row = Row(name[len("fuzz_"):], Path(report.fspath).stem, skipped=why)
            self.rows.append(row)
        elif report.failed and report.when in ("setup", "call"):
            # not the decoder's exception (that one is recorded already): the board or the run
            # failed (a timeout, a board that stopped answering); the row says so
            rows = [r for r in self.rows if "fuzz_" + r.decoder == name]
            if not rows:
                rows = [Row(name[len("fuzz_"):], Path(report.fspath).stem)]
                self.rows.extend(rows)
            if not rows[-1].error:
                lines = [ln for ln in str(report.longrepr).splitlines() if ln.strip()]
                rows[-1].error = "run failed: " + (lines[-1] if lines else "?")[:200]


def run_board(board: str, port: str, runtime: str | None, count: int, seed: int,
              only: set[str] | None, timeout: float, quiet: bool) -> list[Row]:
    sys.path.insert(0, str(ROOT / "host"))  # this checkout's plugin, so its firmware is deployed
    import pytest

    plugin = FuzzPlugin(count, seed, only)
    # pytest-timeout's limit (the project's ini sets one) is not for these: --board-timeout is
    args = ["-p", "no:cacheprovider", "-o", "timeout=0", "-o", "addopts=", "--rootdir", str(ROOT),
            "--port", port, "--board", board, "--board-timeout", str(timeout),
            "-q" if not quiet else "-qq", *[str(p) for p in modules()]]
    if runtime:
        args += ["--runtime", runtime]
    pytest.main(args, plugins=[plugin])
    return plugin.rows


# -- the table -----------------------------------------------------------------------------------

def table(rows: list[Row], where: str) -> str:
    head = ("decoder", "inputs", "accepted", "rejected", "undocumented", "time")
    body = []
    for r in rows:
        if r.skipped:
            body.append((r.decoder, "-", "-", "-", "-", "skipped"))
            continue
        body.append((r.decoder, f"{r.inputs:,}", f"{r.accepted:,}", f"{r.rejected:,}",
                     str(r.undocumented), f"{r.seconds:.1f} s"))
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    out = [f"fuzz on {where}", "  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i])
                                          for i, h in enumerate(head))]
    for b in body:
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                             for i, c in enumerate(b)))
    for r in rows:
        if r.error:
            out.append(f"fuzz_{r.decoder}: {r.error}")
    why = sorted({r.skipped for r in rows if r.skipped})
    out += [f"skipped: {w}" for w in why]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=None,
                    help=f"inputs per decoder (default {CPYTHON_COUNT:,} on CPython, "
                         f"{BOARD_COUNT:,} on a board)")
    ap.add_argument("--board", default=None, metavar="NAME",
                    help="run on a board of this board file (esp32-generic, rp2-pico-w, "
                         "virtual, ...) instead of CPython")
    ap.add_argument("--port", default="virtual", metavar="PORT|virtual",
                    help="where the board is (default: a fresh virtual board)")
    ap.add_argument("--runtime", default=None,
                    help="the virtual board's model (e.g. rp2040; default: the board file's)")
    ap.add_argument("--seed", type=int, default=14, help="dt.Rng seed (default %(default)s)")
    ap.add_argument("--only", default=None, metavar="NAMES",
                    help="comma-separated decoders (e.g. smartrest,templates)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds one decoder may take on the board (default %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--dir", type=Path, default=DEVICE_TESTS,
                    help="CPython only: the folder of the test_fuzz_*.py modules and dt.py "
                         "(default tests/device; on a board it is always tests/device)")
    ap.add_argument("-q", "--quiet", action="store_true", help="less of pytest's output")
    a = ap.parse_args(argv)
    only = {s.strip() for s in a.only.split(",") if s.strip()} if a.only else None
    if a.board is not None and a.dir.resolve() != DEVICE_TESTS:
        ap.error("--dir is for CPython runs: the HIL plugin runs tests/device")
    if a.board is None:
        count = CPYTHON_COUNT if a.count is None else a.count
        rows = run_cpython(count, a.seed, only, a.dir.resolve())
        where = f"CPython {sys.version.split()[0]}"
    else:
        count = BOARD_COUNT if a.count is None else a.count
        rows = run_board(a.board, a.port, a.runtime, count, a.seed, only, a.timeout, a.quiet)
        where = f"{a.board} ({a.port}{', ' + a.runtime if a.runtime else ''})"
    print(table(rows, f"{where}, seed {a.seed}"))
    if a.json:
        a.json.write_text(json.dumps({"where": where, "seed": a.seed, "count": count,
                                      "rows": [asdict(r) for r in rows]}, indent=1))
    ran = [r for r in rows if not r.skipped]
    if not ran:
        print("no fuzz function ran", file=sys.stderr)
        return 2
    bad = any(r.undocumented or r.inputs != count for r in ran)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
