"""bench/ws.py in its quick mode: microcot.ws on the virtual board and websocket-client each
complete their round trips against the echo server, and every echo is compared (a server that
corrupts some echoes makes the run invalid). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from microcot_host.vboard.board import BoardStartError, find_micropython

pytest.importorskip("websocket")
pytest.importorskip("websockets")
try:
    find_micropython()
except BoardStartError as e:
    pytest.skip(str(e), allow_module_level=True)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ws.py"


def quick(*extra: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_quick_run_echoes_every_message_intact() -> None:
    rc, out = quick()
    assert rc == 0
    assert out["mismatches"] == 0
    assert set(out["clients"]) == {"mp-unix", "peer"}
    for name, c in out["clients"].items():
        (run,) = c["runs"]["1024"]
        assert run["bad"] == 0, name
        assert run["us"] > 0, name


def test_a_corrupted_echo_is_counted_and_fails_the_run() -> None:
    rc, out = quick("--corrupt", "5")  # 2 untimed + 20 timed echoes: the 5th, 10th, 15th, 20th
    assert rc == 1
    assert out["mismatches"] == 8
    for name, c in out["clients"].items():
        assert c["runs"]["1024"][0]["bad"] == 4, name
