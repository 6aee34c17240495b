"""A virtual board's heap given as the real board's free memory after boot.

Board files budget what `gc.mem_free()` reports at a real board's REPL right after boot (a
figure users can check on their own board). A virtual board's `-X heapsize` is bigger than that:
the GC's allocation tables take a share of it (2 + 1 bits per block: about 2.3 % on 32-bit, 1.2 %
on 64-bit) and the board's REPL, which is Python here and C on a board, holds some KiB. Both
depend on the binary and on repl.py, so they are measured: two boards at two heap sizes give the
line `free = a * heapsize - b`, cached per binary and REPL.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path

from ..paths import state_dir

_PROBES = (96 * 1024, 256 * 1024)
_PROBE = "import gc\ngc.collect()\nprint(gc.mem_free())"
_lock = threading.Lock()
_memo: dict[str, tuple[float, float]] = {}


def _key(micropython: str) -> str:
    from .board import repl_script

    h = hashlib.sha256()
    with open(micropython, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    h.update(repl_script().read_bytes())
    return h.hexdigest()[:20]


def _measure(micropython: str, heap: int) -> int:
    from mpremote.transport_serial import SerialTransport

    from .board import VirtualBoard

    with tempfile.TemporaryDirectory(prefix="microcot-heapcal-") as tmp, \
            VirtualBoard(f"heapcal-{os.getpid()}", heap=heap, flash_dir=tmp,
                         micropython=micropython) as vb:
        t = SerialTransport(vb.port, 115200)
        try:
            t.enter_raw_repl(soft_reset=False)
            out = t.exec(_PROBE)
            t.exit_raw_repl()
        finally:
            t.close()
    return int(out.strip())


def calibration(micropython: str) -> tuple[float, float]:
    """(a, b) with free-after-boot = a * heapsize - b for this binary and REPL."""
    path = str(Path(micropython).resolve())
    with _lock:
        if path in _memo:
            return _memo[path]
        key = _key(path)
        cache = state_dir() / "cache" / f"heapcal-{key}.json"
        try:
            a, b = json.loads(cache.read_text())["line"]
        except (OSError, ValueError, KeyError, TypeError):
            (h1, h2) = _PROBES
            f1, f2 = _measure(path, h1), _measure(path, h2)
            a = (f2 - f1) / (h2 - h1)
            b = a * h1 - f1
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"binary": path, "line": [a, b],
                                       "probes": [[h1, f1], [h2, f2]]}))
            os.replace(tmp, cache)
        _memo[path] = (a, b)
        return a, b


def heapsize_for_free(micropython: str, free: int) -> int:
    """The `-X heapsize` at which this binary's REPL has `free` bytes left after boot."""
    a, b = calibration(micropython)
    # round up to a 1 KiB step: the unix port takes any size, the rounding only keeps figures tidy
    return int(math.ceil((free + b) / a / 1024.0)) * 1024


def free_for_heapsize(micropython: str, heap: int) -> int:
    """What `gc.mem_free()` reports after boot at `-X heapsize=heap` (for reports)."""
    a, b = calibration(micropython)
    return int(a * heap - b)
