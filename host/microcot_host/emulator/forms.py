"""multipart/form-data bodies, parsed by python-multipart (the parser Starlette uses).

A `Form` is the parts of one body in order. A part's content is either bytes (held in memory) or
a file spooled into the binaries' store (binaries.Stored: its path, length and SHA-256, computed
on the way), so a large firmware image is never held in memory and is committed by a rename,
without a second copy.

- `FormReader` is fed a body chunk by chunk (the HTTP layer, http.py/webapp.py, streaming an
  upload from the network). With a `store`, a part named `file` or with a filename goes to a
  spooled file, at most `max_file` bytes; every other part stays in memory, at most `max_field`
  bytes; at most `max_parts` parts.
- `parse_form(data, content_type)` parses a body held in memory (Api, for internal callers and
  the bulk registration's CSV); every part then stays in memory.

Too large a file part raises `FormTooLarge` (413), anything malformed (a field over its limit
too) `FormError` (400); spooled files
of a failed or unused form are removed by `Form.discard()` / `FormReader.abort()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .binaries import BinaryStore, Stored

MAX_PARTS = 16  # a binary upload has two (object, file); a bulk registration one
MAX_FIELD = 64 << 10  # an `object` part: JSON with name, type and a few fragments
FILE_PARTS = ("file",)


class FormError(ValueError):
    """The body is not usable multipart/form-data (the message says why)."""


class FormTooLarge(FormError):
    """A part is larger than its limit (the message names the limit)."""


@dataclass
class FormPart:
    """One part: its headers' name, filename and type, and its content."""

    name: str | None
    filename: str | None
    content_type: str | None
    content: bytes | Stored = b""

    @property
    def length(self) -> int:
        return self.content.length if isinstance(self.content, Stored) else len(self.content)

    def data(self) -> bytes:
        """The content as bytes (read from its file if it was spooled)."""
        if isinstance(self.content, Stored):
            return self.content.temp.read_bytes()
        return self.content


@dataclass
class Form:
    """The parts of a multipart/form-data body, in their order."""

    parts: list[FormPart] = field(default_factory=list)

    def named(self, name: str) -> FormPart | None:
        return next((p for p in self.parts if p.name == name), None)

    def file(self) -> FormPart | None:
        """The part holding the file: the one named `file`, else the first with a filename."""
        return self.named("file") or next((p for p in self.parts if p.filename), None)

    def discard(self) -> None:
        """Remove the spooled files that nobody committed (harmless after a commit: the
        file was renamed away)."""
        for p in self.parts:
            if isinstance(p.content, Stored):
                BinaryStore.discard(p.content)


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart Content-Type; FormError without a usable one."""
    media, params = parse_options_header(content_type or "")
    if not media.startswith(b"multipart/"):
        raise FormError(f"not a multipart body ({media.decode('latin-1') or 'no type'})")
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise FormError("multipart body without a boundary parameter in its Content-Type")
    if len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise FormError("the multipart boundary is longer than 70 characters")
    return boundary


class _Sink:
    """Where the content of the current part goes: memory, or a spooled file with its hash."""

    def __init__(self, limit: int, spool: Path | None) -> None:
        self.limit = limit
        self.length = 0
        self.buf = bytearray()
        self.path = spool
        self.digest = hashlib.sha256() if spool is not None else None
        self.file = open(spool, "wb") if spool is not None else None  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.length += len(data)
        if self.length > self.limit:
            raise FormTooLarge(str(self.limit))
        if self.file is not None and self.digest is not None:
            self.digest.update(data)
            self.file.write(data)
        else:
            self.buf += data

    def close(self) -> bytes | Stored:
        if self.file is None or self.path is None or self.digest is None:
            return bytes(self.buf)
        self.file.close()
        return Stored(self.path, self.length, self.digest.hexdigest())

    def abort(self) -> None:
        if self.file is not None and self.path is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class FormReader:
    """A multipart/form-data body parsed as it arrives: `feed(chunk)` ... `finish()`."""

    def __init__(self, content_type: str | None, store: BinaryStore | None = None,
                 max_file: int = 1 << 20, max_field: int = MAX_FIELD,
                 max_parts: int = MAX_PARTS,
                 is_file: Callable[[str | None, str | None], bool] | None = None) -> None:
        self._store = store
        self.max_file = max_file
        self.max_field = max_field
        self.max_parts = max_parts
        self._is_file = is_file or (lambda name, filename: name in FILE_PARTS
                                    or filename is not None)
        self.form = Form()
        self._sink: _Sink | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._ended = False
        self._error: FormError | None = None
        self._parser = MultipartParser(boundary_of(content_type), {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })

    # -- python-multipart's callbacks (exceptions raised in them end the parse) ---------------

    def _part_begin(self) -> None:
        if len(self.form.parts) >= self.max_parts:
            raise FormError(f"the multipart body has more than {self.max_parts} parts")
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, disp = parse_options_header(self._headers.get(b"content-disposition"))
        name = _text(disp.get(b"name"))
        filename = _text(disp.get(b"filename"))
        ctype = _text(self._headers.get(b"content-type")) or None
        spooled = self._store is not None and self._is_file(name, filename)
        limit = self.max_file if spooled or self._store is None else self.max_field
        spool = self._store.spool_path() if spooled and self._store is not None else None
        self._sink = _Sink(limit, spool)
        self.form.parts.append(FormPart(name, filename, ctype))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            try:
                self._sink.write(data[start:end])
            except FormTooLarge:
                part = self.form.parts[-1]
                message = (f"the part {part.name or '(unnamed)'} has more than "
                           f"{self._sink.limit} bytes")
                # a file over its limit is too large a request (413); a field that long is
                # a malformed one (400), as Api answers for an oversized object part
                if self._sink.path is not None:
                    raise FormTooLarge(message) from None
                raise FormError(message) from None

    def _part_end(self) -> None:
        if self._sink is not None:
            self.form.parts[-1].content = self._sink.close()
            self._sink = None

    def _end(self) -> None:
        self._ended = True

    # -- the caller's side ----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._parser.write(chunk)
        except FormError as e:
            self._error = e
            raise
        except FormParserError as e:
            self._error = FormError(f"malformed multipart body: {e}")
            raise self._error from None

    def finish(self) -> Form:
        """The form, once the whole body was fed; FormError if it was not closed."""
        if self._error is not None:
            raise self._error
        if not self._ended:
            raise FormError("the multipart body is not closed by its boundary")
        return self.form

    def abort(self) -> None:
        """Remove what was spooled (a failed or refused upload)."""
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        self.form.discard()


def parse_form(data: bytes, content_type: str | None, max_parts: int = MAX_PARTS) -> Form:
    """A multipart/form-data body held in memory; every part's content stays in memory."""
    reader = FormReader(content_type, None, max_file=len(data), max_parts=max_parts)
    try:
        reader.feed(data)
        return reader.finish()
    except FormError:
        reader.abort()
        raise


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", "replace")
