"""Durable files: received instances (spool) and result objects waiting to be sent (outbox).

File names are random hex, never derived from UIDs a peer sent us; the database maps UIDs to paths.
A file is written under tmp/, fsynced, then renamed into place, so a crash leaves either nothing
or a complete file.
"""
from __future__ import annotations

import os
import shutil
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


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def new_tmp_path(self, suffix: str = ".part") -> Path:
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def _place(self, staged: Path) -> Path:
        """fsync a finished file under tmp/, rename it into today's folder, fsync the folder."""
        fsync_file(staged)
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        folder = self.root / day
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{uuid.uuid4().hex}.dcm"
        os.replace(staged, final)
        fsync_dir(folder)
        return final

    def adopt(self, src: Path) -> Path:
        """Move a finished file (e.g. pynetdicom's temporary file) into the spool durably."""
        staged = self.new_tmp_path()
        shutil.move(str(src), staged)  # a rename when on the same file system, else a streamed copy
        return self._place(staged)

    def write_dataset(self, ds) -> Path:
        """Write a pydicom Dataset in the DICOM file format, durably."""
        staged = self.new_tmp_path()
        ds.save_as(staged, enforce_file_format=True)
        return self._place(staged)
