"""The bytes of `/inventory/binaries`: files under the data directory.

The metadata of a binary is a managed object (api.py); its content is the file `<directory>/<id>`,
written to a temporary file in the same directory first (with its SHA-256 computed on the way) and
renamed into place, so a reader never sees half a file and a download that has the old file open
keeps reading the old content after a replacement.

Uploads are streamed: the HTTP layer (webapp.py) spools a raw request body to a file here
(`spool_path()`, read by Api through an mmap), and the multipart parser (forms.py) spools a
form's file part here with its SHA-256, committed by a rename; a large firmware image is never
held in memory. `max_size` bounds a file's length (413).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..files import private_dir

DEFAULT_MAX_SIZE = 64 << 20  # 64 MiB: firmware images of the boards are a few MiB
CHUNK = 1 << 16

Buffer = bytes | mmap.mmap


@dataclass(frozen=True)
class Stored:
    """A file written to a temporary path, ready to be committed under an id."""

    temp: Path
    length: int
    sha256: str


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[Buffer]:
    """The file's content as a read-only buffer (an mmap; b"" for an empty file)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield m


class BinaryStore:
    """Files of binaries under `directory` (None: a temporary directory, for tests)."""

    def __init__(self, directory: Path | str | None = None,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="microcot-binaries-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.max_size = max_size

    def _dir(self) -> Path:
        private_dir(self.directory)
        return self.directory

    def path(self, mo_id: str) -> Path:
        return self.directory / str(int(mo_id))

    def spool_path(self) -> Path:
        """A new empty file for a request body (the caller removes it)."""
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=self._dir())
        os.close(fd)
        return Path(name)

    def write(self, buf: Buffer, start: int = 0, end: int | None = None) -> Stored:
        """Copy buf[start:end] to a temporary file, computing its SHA-256."""
        end = len(buf) if end is None else end
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=".new-", dir=self._dir())
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(start, end, CHUNK):
                    chunk = buf[i:min(i + CHUNK, end)]
                    digest.update(chunk)
                    f.write(chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return Stored(Path(name), max(end - start, 0), digest.hexdigest())

    def commit(self, stored: Stored, mo_id: str) -> None:
        """Make a written file the content of binary `mo_id` (replacing what it had)."""
        os.replace(stored.temp, self.path(mo_id))

    @staticmethod
    def discard(stored: Stored) -> None:
        with contextlib.suppress(OSError):
            stored.temp.unlink()

    def remove(self, mo_id: str) -> bool:
        try:
            self.path(mo_id).unlink()
        except FileNotFoundError:
            return False
        return True
