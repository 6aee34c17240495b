"""tools/fuzz.py: the decoders' fuzz functions found by name and run with a count, on CPython and
on a board model through the HIL plugin; an undocumented exception is counted and fails the run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "fuzz.py"
DECODERS = {"mqttpkt", "smartrest", "binrest", "templates"}


def _fuzz(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(TOOL), "--json", str(out), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    data = json.loads(out.read_text()) if out.exists() else {}
    return p.returncode, data, p.stdout + p.stderr


def _rows(data: dict) -> dict[str, dict]:
    return {r["decoder"]: r for r in data["rows"]}


def test_every_fuzz_function_runs_on_cpython_with_the_count(tmp_path: Path) -> None:
    rc, data, out = _fuzz(tmp_path, "--count", "40")
    assert rc == 0, out
    rows = _rows(data)
    assert set(rows) >= DECODERS, rows  # other modules' fuzz_* functions may be there too
    for r in rows.values():
        assert r["inputs"] == 40 and r["accepted"] + r["rejected"] == 40, r
        assert r["undocumented"] == 0, r
    assert "decoder" in out and "undocumented" in out and "smartrest" in out
    rc, data, out = _fuzz(tmp_path, "--count", "5", "--only", "binrest,templates")
    assert rc == 0 and set(_rows(data)) == {"binrest", "templates"}, out


def test_an_undocumented_exception_is_counted_and_fails_the_run(tmp_path: Path) -> None:
    d = tmp_path / "device"
    d.mkdir()
    shutil.copy(ROOT / "tests" / "device" / "dt.py", d)
    (d / "test_fuzz_toy.py").write_text(
        "def fuzz_toy(rng, n):\n"
        "    for i in range(n):\n"
        "        if rng.below(10) == 3:\n"
        "            raise KeyError('not documented')\n"
        "    return {'inputs': n, 'accepted': n, 'rejected': 0}\n\n\n"
        "def fuzz_fine(rng, n):\n"
        "    return {'inputs': n, 'accepted': 1, 'rejected': n - 1}\n")
    rc, data, out = _fuzz(tmp_path, "--count", "50", "--dir", str(d))
    assert rc == 1, out
    rows = _rows(data)
    assert rows["toy"]["undocumented"] == 1 and "KeyError" in rows["toy"]["error"]
    assert rows["fine"]["undocumented"] == 0 and rows["fine"]["inputs"] == 50
    assert "Traceback" in out and "not documented" in out


def test_every_fuzz_function_runs_on_a_board_model(tmp_path: Path) -> None:
    # the 64-bit developer board: always there (the i386 models need the fidelity builds)
    rc, data, out = _fuzz(tmp_path, "--board", "virtual", "--count", "25", "-q", timeout=300)
    assert rc == 0, out
    rows = _rows(data)
    assert set(rows) >= DECODERS, out
    for r in rows.values():
        if not r["skipped"]:
            assert r["inputs"] == 25 and r["undocumented"] == 0, r
    assert "fuzz on virtual (virtual)" in out
