"""Taking in one C-STORE data set without trusting it: the receive file that stops growing past the
size limit or the disk watermark, guards around pynetdicom's decoding of hostile PDUs, the pixel
data's framing check, and the small validators the listener applies to header values."""
from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import dimse

from ..store.spool import start_writeback

log = logging.getLogger("osteoscreen.listener")


RX_PREFIX = "rx-"  # pynetdicom's receive files in spool/tmp
DISK_CHECK_BYTES = 16 << 20  # while receiving, free space is checked every 16 MiB written
WRITEBACK_BYTES = 1 << 20  # while receiving, the disk is asked to start writing every 1 MiB (spool.py)
PDU_FLOOR_BYTES = 1 << 20
TOO_LARGE = "data set larger than max_dataset_bytes"  # a receive file's refusal (not transient)


def _valid_uid(value) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and UID(text).is_valid


def _clip(value, n: int) -> str | None:
    return str(value if value is not None else "")[:n] or None


def _disk_low(folder: Path, min_free_mb: int) -> bool:
    return min_free_mb > 0 and shutil.disk_usage(folder).free < min_free_mb * (1 << 20)


class _ReceiveFile:
    """What pynetdicom writes one C-STORE data set into (in place of its NamedTemporaryFile): a file in
    spool/tmp that stops growing, is emptied and remembers why, once the data set passes the size limit
    or the disk's free space falls below the watermark. pynetdicom writes the preamble, "DICM" and the
    File Meta Information first (three writes, `uncounted_writes`) and then the data set fragments;
    only those count. Every WRITEBACK_BYTES the kernel is asked to start writing what arrived, so that
    the fsync after the last fragment has little left to wait for. A STOW-RS part (a whole Part 10
    file, every byte counted) keeps the first `keep_bytes` of a refused file, so that its header can
    still name the instance in the answer."""

    def __init__(self, folder: Path, max_bytes: int, min_free_mb: int, *, uncounted_writes: int = 3,
                 keep_bytes: int = 0):
        fd, name = tempfile.mkstemp(prefix=RX_PREFIX, suffix=".dcm", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.name = name
        self.folder, self.max_bytes, self.min_free_mb = folder, max_bytes, min_free_mb
        self.uncounted_writes, self.keep_bytes = uncounted_writes, keep_bytes
        self.writes = 0
        self.dataset_bytes = 0
        self.refused: str | None = None
        self._offset = 0  # bytes written to the file
        self._written_back = 0  # file offset up to which writeback was started

    def write(self, data) -> int:
        n = len(data)
        self.writes += 1
        if self.refused:
            return n
        if self.writes > self.uncounted_writes:
            before = self.dataset_bytes
            self.dataset_bytes += n
            if self.max_bytes and self.dataset_bytes > self.max_bytes:
                return self._refuse(TOO_LARGE, data)
            if before // DISK_CHECK_BYTES != self.dataset_bytes // DISK_CHECK_BYTES and \
                    _disk_low(self.folder, self.min_free_mb):
                return self._refuse("free disk space below min_free_disk_mb", data)
        written = self.file.write(data)
        self._offset += written
        if self._offset - self._written_back >= WRITEBACK_BYTES:
            self.file.flush()
            start_writeback(self.file.fileno(), self._written_back, self._offset - self._written_back)
            self._written_back = self._offset
        return written

    def _refuse(self, reason: str, data) -> int:
        self.refused = reason
        if self._offset < self.keep_bytes:  # the head is kept (keep_bytes), however the data came in
            self._offset += self.file.write(data[:self.keep_bytes - self._offset])
        self.file.flush()
        self.file.truncate(min(self.keep_bytes, self._offset))  # give the space back now; 0xA700 follows
        return len(data)

    def close(self) -> None:
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed


def _guard_dimse_decoding() -> None:
    """pynetdicom 3.0 lets an exception from decoding a P-DATA's DIMSE content (e.g. a command set
    without Command Field) escape into the association's reader thread, which dies without an A-ABORT
    or any event. Treat such a P-DATA as the invalid PDU it is (Evt19: A-ABORT, EVT_ABORTED) and drop
    the half-received message with its receive file. Installed once per process."""
    if getattr(dimse.DIMSEServiceProvider.receive_primitive, "_osteoscreen_guard", False):
        return
    original = dimse.DIMSEServiceProvider.receive_primitive

    def receive_primitive(self, primitive):
        try:
            return original(self, primitive)
        except Exception:
            partial = getattr(self.message, "_data_set_file", None)
            if partial is not None:
                try:
                    partial.close()
                    os.unlink(partial.name)
                except OSError:
                    pass
            self.message = None
            self.assoc.dul.event_queue.put("Evt19")

    receive_primitive._osteoscreen_guard = True
    dimse.DIMSEServiceProvider.receive_primitive = receive_primitive


def _guard_pdu_length(max_pdu: int) -> None:
    """pynetdicom reads a PDU whole into memory, whatever length its header announces (up to 4 GiB),
    and does not hold peers to the maximum PDU length we announced. Refuse to read a PDU longer than
    max(max_pdu + header, PDU_FLOOR_BYTES): the read fails as a closed connection (Evt17), the
    association ends and the listener records it. 0 leaves pynetdicom as it is. Process-wide (the
    dispatcher's associations are held to the same bound), installed with the listener."""
    from pynetdicom.transport import AssociationSocket

    original = getattr(AssociationSocket.recv, "_osteoscreen_original", AssociationSocket.recv)
    if not max_pdu:
        AssociationSocket.recv = original
        return
    limit = max(max_pdu + 6, PDU_FLOOR_BYTES)

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            log.warning("peer announced a PDU of %d bytes (limit %d): connection closed", nr_bytes, limit)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
        return original(self, nr_bytes)

    recv._osteoscreen_original = original
    AssociationSocket.recv = recv


def _read_pixel_header(fh, little_endian: bool, implicit_vr: bool) -> tuple[int, int, int] | None:
    """At the file position where pydicom stopped (stop_before_pixels): (tag, value length, value offset)
    of the element there, or None at the end of the data set."""
    start = fh.tell()
    head = fh.read(8)
    if len(head) < 8:
        return None
    e = "<" if little_endian else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if implicit_vr:
        length = struct.unpack(e + "L", head[4:8])[0]
        offset = start + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        more = fh.read(4)
        if len(more) < 4:
            return None
        length = struct.unpack(e + "L", more)[0]
        offset = start + 12
    else:
        length = struct.unpack(e + "H", head[6:8])[0]
        offset = start + 8
    return (group << 16) | elem, length, offset


def _pixel_problem(ds, pixel: tuple[int, int, int] | None, size: int, syntax: UID) -> str | None:
    """Why the Pixel Data element cannot be what the header and transfer syntax say, or None."""
    if pixel is None or pixel[0] != 0x7FE00010:
        return None  # no (integer) pixel data: routing decides whether that matters
    _, length, offset = pixel
    undefined = length == 0xFFFFFFFF
    if syntax.is_compressed and not undefined:
        return f"pixel data not encapsulated although the transfer syntax is {syntax.name}"
    if not syntax.is_compressed and undefined:
        return "encapsulated pixel data under an uncompressed transfer syntax"
    if not undefined and offset + length > size:
        return "pixel data length runs past the end of the data set"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError, KeyError):
        return "pixel data without a valid Rows, Columns or Bits Allocated"
    if rows < 1 or cols < 1 or frames < 1 or samples < 1 or bits < 1:
        return "image size is zero"
    if not undefined:
        expected = (rows * cols * samples * frames * bits + 7) // 8
        if length < expected:
            return (f"pixel data shorter ({length} bytes) than Rows x Columns x Samples x Frames x "
                    f"Bits Allocated need ({expected})")
    return None
