"""Durable files: received instances (spool) and result objects waiting to be sent (outbox).

File names are random hex, never derived from UIDs a peer sent us; the database maps UIDs to paths.
A file is written under tmp/, renamed into its day folder, and then the file and the folder are
fsynced, all before its database row is committed: a row never points at an incomplete file. A crash
before the commit leaves at worst a file no row refers to (complete or not), and the sender, which
got no Success, sends the image again.

Renaming before the fsync costs nothing in safety and saves a disk flush per file: on ext4 and XFS
the file's fsync commits the rename with it, so the folder's fsync finds nothing left to write.
Files received over the network also start their writeback while they arrive (`start_writeback`),
so that the fsync at the end waits for the last megabyte rather than for the whole image.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _sync_file_range():
    """libc's sync_file_range (Linux only; Python's os module has no binding), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing `nbytes` from `offset` of a file to disk now, without waiting.
    Not a durability guarantee (fsync still is): it lets the disk work while the rest of the file is
    still arriving. Returns False where the call does not exist (then the fsync does all the work)."""
    if _SYNC_FILE_RANGE is None:
        return False
    return _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def new_tmp_path(self, suffix: str = ".part") -> Path:
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def _place(self, staged: list[Path]) -> list[Path]:
        """Rename finished files under tmp/ into today's folder, then fsync each and the folder once.
        Nothing of a call that fails is left behind."""
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        folder = self.root / day
        finals = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path in staged:
                final = folder / f"{uuid.uuid4().hex}.dcm"
                os.replace(path, final)
                finals.append(final)
            for final in finals:
                fsync_file(final)
            fsync_dir(folder)
        except BaseException:
            for path in [*finals, *staged]:  # no file the caller will not record stays behind
                try:
                    path.unlink()
                except OSError:
                    pass
            raise
        return finals

    def adopt(self, src: Path) -> Path:
        """Move a finished file (e.g. pynetdicom's receive file) into the spool durably."""
        staged = self.new_tmp_path()
        shutil.move(str(src), staged)  # a rename when on the same file system, else a streamed copy
        return self._place([staged])[0]

    def write_dataset(self, ds) -> Path:
        """Write a pydicom Dataset in the DICOM file format, durably."""
        return self.write_datasets([ds])[0]

    def write_datasets(self, datasets: list) -> list[Path]:
        """Write several Datasets (a study's result objects) durably, in one go; their paths in order."""
        if not datasets:
            return []
        staged = []
        try:
            for ds in datasets:
                staged.append(self.new_tmp_path())
                ds.save_as(staged[-1], enforce_file_format=True)
        except BaseException:
            for path in staged:  # nothing half-written is left in tmp/
                path.unlink(missing_ok=True)
            raise
        return self._place(staged)
