"""Files that hold secrets: written atomically and owner-only from the first byte."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, json.dumps(data, indent=1) + "\n")
    return data
