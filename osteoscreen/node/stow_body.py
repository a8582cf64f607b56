"""A STOW-RS request body (multipart/related, PS3.18 §10.5.1) read as a stream into part files.

python-multipart's `MultipartParser` does the parsing (boundary search, part headers and their
limits); it is a streaming parser for any multipart subtype, fed READ_BYTES at a time, so memory
stays bounded whatever the body's size. Each part is written as it arrives into a receive file in
spool/tmp (`intake._ReceiveFile`, as a C-STORE data set is: it stops growing past
`max_dataset_bytes` or when the disk runs low, and starts its writeback every MiB), so that
accepting it is a rename. A refused part keeps its first KEEP_BYTES, from which its header may
still name the instance in the answer.

Nothing here decides about DICOM: that is `accept.py`'s, once the whole body has been read and
found well-formed (a body that ends before its closing boundary stores nothing).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .intake import _ReceiveFile

READ_BYTES = 1 << 20  # read from the request body at a time
KEEP_BYTES = 256 * 1024  # of a refused part: enough for any header a radiograph has
MAX_PARTS = 10000  # parts in one request (each is a file in spool/tmp while the request lasts)
MAX_PART_HEADERS = 16
# RFC 2046 §5.1.1: bchars, not ending in a space, 1-70 of them; but Orthanc's STOW-RS client sends
# 73 (two UUIDs), so up to 200 are taken
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]")

# The parser logs a warning (offsets, a character of the body) for each malformed body; the
# receiver answers and audits those itself.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


class BodyError(ValueError):
    """The body is not a well-formed multipart body (HTTP 400), or too big a one (413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """("type/subtype" in lower case, {parameter: value}) of a Content-Type (quotes removed)."""
    mime, params = parse_options_header(value or "")
    return mime.decode("latin-1"), {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()}


def valid_boundary(boundary: str) -> bool:
    return bool(_BOUNDARY.fullmatch(boundary))


@dataclass
class Part:
    file: _ReceiveFile
    headers: dict[str, str]

    @property
    def path(self) -> Path:
        return Path(self.file.name)

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type"))[0]

    @property
    def refused(self) -> str | None:
        return self.file.refused

    @property
    def size(self) -> int:
        return self.file.dataset_bytes


class BodyReader:
    """Feed the body with `feed`; `finish` returns its parts or raises BodyError. `discard` removes
    every part file still there (call it whatever happened)."""

    def __init__(self, boundary: str, folder: Path, max_part_bytes: int, min_free_mb: int):
        self.folder, self.max_part_bytes, self.min_free_mb = folder, max_part_bytes, min_free_mb
        self.parts: list[Part] = []
        self.ended = False
        self._headers: dict[str, str] = {}
        self._field, self._value = bytearray(), bytearray()
        self._part: Part | None = None
        self._error: BodyError | None = None
        self.parser = MultipartParser(boundary.encode("latin-1"), {
            "on_part_begin": self._begin, "on_header_field": self._on_field, "on_header_value": self._on_value,
            "on_header_end": self._header_end, "on_headers_finished": self._open, "on_part_data": self._data,
            "on_part_end": self._close, "on_end": self._end}, max_header_count=MAX_PART_HEADERS)

    # -- parser callbacks ----------------------------------------------------------------------
    def _begin(self) -> None:
        self._headers = {}

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _open(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            self._error = BodyError(f"more than {MAX_PARTS} parts in one request", 413)
            raise self._error
        # every byte of the part counts (a whole Part 10 file: preamble and File Meta Information too)
        rx = _ReceiveFile(self.folder, self.max_part_bytes, self.min_free_mb, uncounted_writes=0,
                          keep_bytes=KEEP_BYTES)
        self._part = Part(rx, self._headers)
        self.parts.append(self._part)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part is not None and end > start:
            self._part.file.write(memoryview(data)[start:end])

    def _close(self) -> None:
        if self._part is not None:
            self._part.file.close()
            self._part = None

    def _end(self) -> None:
        self.ended = True

    # -- use ---------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        try:
            self.parser.write(data)
        except MultipartParseError as exc:
            raise BodyError(f"malformed multipart body (at byte {getattr(exc, 'offset', '?')} of a chunk); "
                            "is the boundary the one in Content-Type?") from None
        except BodyError:
            raise
        except OSError as exc:  # creating or writing a part file
            raise BodyError(f"cannot write a part to the spool: {exc.strerror}", 503) from None
        if self._error is not None:
            raise self._error

    def finish(self) -> list[Part]:
        if self._part is not None or not self.ended:
            raise BodyError("the body ends before its closing boundary (truncated, or another boundary)")
        if not self.parts:
            raise BodyError("the body has no parts")
        return self.parts

    def discard(self) -> None:
        for part in self.parts:
            try:
                part.file.close()
            except OSError:
                pass
            try:
                os.unlink(part.file.name)
            except OSError:
                pass
