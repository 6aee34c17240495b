"""Files that hold secrets: written atomically and owner-only from the first byte, in folders
only their owner can enter (0700)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace `path` atomically; the temporary file has its final mode before any byte is
    written, so a key or password is never readable by others, not even briefly."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


PRIVATE_DIR = 0o700
# the permission bits of the group and of others: what "owner-only" takes away
_OPEN = 0o077


def private_dir(path: Path, narrow: bool = False) -> Path:
    """`path` as a folder; every folder made on the way is 0700 (pathlib's `mkdir(parents=True)`
    gives the parents the umask's mode, 0755 as a rule). An existing folder is left as it is
    unless `narrow`: then the group's and others' bits are taken from `path` itself (a folder
    this project owns, made before it was owner-only), never from its parents."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it in between
            d.mkdir(mode=PRIVATE_DIR)
            d.chmod(PRIVATE_DIR)  # a umask wider than 077 (say 0277) must not change it
    if narrow and not missing:
        narrow_mode(path)
    return path


def narrow_mode(path: Path) -> None:
    """Take the group's and others' permission bits from `path` (not following a symlink) if it
    is ours; the owner's bits stay."""
    st = os.lstat(path)
    if st.st_mode & _OPEN and not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_OPEN)


def narrow_tree(root: Path) -> None:
    """narrow_mode() for `root` and everything below it (symlinks are neither changed nor
    followed): files written before a folder was owner-only."""
    narrow_mode(root)
    for top, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            with contextlib.suppress(FileNotFoundError):  # removed while we walk
                narrow_mode(Path(top) / name)


def secrets_file(path: Path, keys: Iterable[str], nbytes: int = 24) -> dict[str, Any]:
    """The JSON document at `path`, with a random URL-safe value made (and saved) for every key
    of `keys` it lacks; other keys are kept as they are."""
    path = Path(path)
    data: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads(path.read_text())
    missing = [k for k in keys if not isinstance(data.get(k), str) or not data[k]]
    for key in missing:
        data[key] = secrets.token_urlsafe(nbytes)
    if missing:
        private_dir(path.parent)
        write_private(path, json.dumps(data, indent=1) + "\n")
    return data
