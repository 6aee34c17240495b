"""`microcot app bundle`: the tar it writes is one the device's reader (microcot.apptar, run
here on CPython) unpacks file for file, and the names the device refuses are refused here too,
by the same rules."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from click.testing import CliRunner

from microcot import apptar
from microcot_host.cli import main


def test_bundle_is_read_back_by_the_device_reader(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_bytes(b"print('v2')\n" * 100)
    (tmp_path / "applib.py").write_bytes(b"X = 2\n")
    out = tmp_path / "app.tar"
    r = CliRunner().invoke(main, ["app", "bundle", str(tmp_path / "main.py"),
                                  str(tmp_path / "applib.py"), "-o", str(out),
                                  "--version", "2.0", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    data = out.read_bytes()
    assert res["sha256"] == hashlib.sha256(data).hexdigest()
    assert res["files"] == ["main.py", "applib.py", "appversion.txt"]
    with tarfile.open(out) as t:
        assert t.getnames() == res["files"]
    stage = tmp_path / "stage"
    stage.mkdir()
    u = apptar.Untar(str(stage))
    for i in range(0, len(data), 1000):
        u.write(data[i:i + 1000])
    assert u.finish() == res["files"]
    assert (stage / "main.py").read_bytes() == (tmp_path / "main.py").read_bytes()
    assert (stage / "appversion.txt").read_text() == "2.0"


def test_names_the_device_refuses_are_refused(tmp_path: Path) -> None:
    for name in ("boot.py", "microcot.json", "run.sh", ".hidden.py"):
        p = tmp_path / name
        p.write_bytes(b"x")
        r = CliRunner().invoke(main, ["app", "bundle", str(p), "-o", str(tmp_path / "a.tar")])
        assert r.exit_code != 0 and apptar.check_name(name) in r.output, (name, r.output)
    assert not (tmp_path / "a.tar").exists()
