"""Files that hold secrets are owner-only (0600) in owner-only folders (0700): the state folder
($MICROCOT_HOME, else $XDG_STATE_HOME/microcot or ~/.local/state/microcot), a virtual board's
flash folder and everything its MicroPython writes there (the board's /microcot.json with the
WLAN and platform passwords, the agent's stored device credentials), the provisioning ledger, its
vault and key. Folders made before these rules (0755, files 0644) are narrowed when next used."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from microcot_host import files, paths
from microcot_host.provision_ledger import Books
from microcot_host.vboard import VirtualBoard

pytestmark = pytest.mark.timeout(60)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MICROCOT_HOME that does not exist yet."""
    h = tmp_path / "state" / "microcot"
    monkeypatch.setenv("MICROCOT_HOME", str(h))
    return h


def test_the_state_folder_is_made_owner_only(home: Path) -> None:
    assert paths.state_dir() == home
    assert mode(home) == 0o700 and mode(home.parent) == 0o700  # made here, so both are ours


def test_an_older_open_state_folder_is_narrowed(home: Path) -> None:
    home.mkdir(parents=True, mode=0o755)
    home.chmod(0o755)
    paths.state_dir()
    assert mode(home) == 0o700


def test_the_xdg_default_is_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROCOT_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert paths.state_dir() == tmp_path / "xdg" / "microcot"
    assert mode(tmp_path / "xdg" / "microcot") == 0o700 and mode(tmp_path / "xdg") == 0o700


def test_private_dir_leaves_an_existing_folder_of_the_users_alone(tmp_path: Path) -> None:
    mine = tmp_path / "documents"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    files.private_dir(mine / "a" / "b")
    assert mode(mine) == 0o755  # the user's choice: not narrowed
    assert mode(mine / "a") == mode(mine / "a" / "b") == 0o700


def test_secrets_file_makes_its_folders_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "secrets.json"
    files.secrets_file(path, ["password"])
    assert (mode(path), mode(path.parent), mode(path.parent.parent)) == (0o600, 0o700, 0o700)


def mpremote_exec(port: str, code: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, "exec", code],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


WRITES = ("import os\n"
          "open('/microcot.json','w').write('{\"password\": \"not-a-real-one\"}')\n"
          "os.mkdir('/store')\n"
          "open('/store/credentials','w').write('x')\n")


def test_a_virtual_boards_flash_is_owner_only(home: Path) -> None:
    """The default flash folder under the state folder, a file MicroPython writes at the top and
    in a folder of its own, and the emulated OTA partitions beside the flash."""
    vb = VirtualBoard("modes-test", ota=True).start()
    try:
        mpremote_exec(vb.port, WRITES)
    finally:
        vb.stop()
    flash = home / "boards" / "modes-test" / "flash"
    assert vb.flash_dir == flash
    for d in (home, home / "boards", flash.parent, flash, flash / "store", vb.ota_dir):
        assert mode(d) == 0o700, d
    for f in (flash / "microcot.json", flash / "store" / "credentials",
              *sorted(vb.ota_dir.iterdir())):
        assert mode(f) == 0o600, f


def test_an_older_open_flash_folder_is_narrowed(tmp_path: Path, home: Path) -> None:
    """A flash folder from before (0755 with 0644 files), named with --flash: its files are no
    longer readable by others once the board starts."""
    flash = tmp_path / "old-flash"
    (flash / "store").mkdir(parents=True)
    (flash / "microcot.json").write_text("{}")
    (flash / "store" / "credentials").write_text("x")
    for p, m in ((flash, 0o755), (flash / "store", 0o755), (flash / "microcot.json", 0o644),
                 (flash / "store" / "credentials", 0o644)):
        p.chmod(m)
    vb = VirtualBoard("modes-old", flash_dir=flash).start()
    vb.stop()
    assert (mode(flash), mode(flash / "store")) == (0o700, 0o700)
    assert mode(flash / "microcot.json") == mode(flash / "store" / "credentials") == 0o600


def test_the_provisioning_books_are_owner_only(home: Path) -> None:
    home.mkdir(parents=True, mode=0o755)
    home.chmod(0o755)  # an older state folder
    with Books() as books:
        found = [books.paths.ledger, books.paths.secrets, books.paths.key]
    assert all(p.parent == home for p in found)
    assert mode(home) == 0o700
    for p in found:
        assert mode(p) == 0o600, p


def test_the_emulators_folders_are_owner_only_all_the_way(tmp_path: Path) -> None:
    """A --data-dir outside the state folder: every folder the emulator's parts make on the way
    to their files (the database, the TLS keys, the binaries) is 0700, not only the last."""
    from microcot_host.emulator.binaries import BinaryStore
    from microcot_host.emulator.certs import ensure_ca_and_server
    from microcot_host.emulator.model import Model

    data = tmp_path / "new" / "cot"
    Model(str(data / "db" / "platform.sqlite")).close()
    ensure_ca_and_server(data / "broker")
    BinaryStore(data / "bin" / "store").write(b"x", 0, 1)
    for d in (tmp_path / "new", data, data / "db", data / "broker", data / "broker" / "tls",
              data / "bin", data / "bin" / "store"):
        assert d.is_dir() and d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
