"""The spool's durable files and the receive file's early writeback (store/spool.py, node/intake.py)."""
from __future__ import annotations

import os
import sys

import pytest

from osteoscreen.node import intake
from osteoscreen.store.spool import Spool, start_writeback


def test_adopt_moves_a_file_into_a_day_folder_whole(tmp_path):
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3 << 20)
    src = spool.tmp / "rx-1.dcm"
    src.write_bytes(data)
    final = spool.adopt(src)
    assert final.parent.parent == spool.root and final.parent.name.isdigit() and len(final.parent.name) == 8
    assert final.read_bytes() == data
    assert not src.exists() and list(spool.tmp.iterdir()) == []


def test_write_dataset_is_readable_where_it_lands(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    import pydicom

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.88.33", generate_uid(), "P1"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    spool = Spool(tmp_path / "outbox")
    final = spool.write_dataset(ds)
    assert pydicom.dcmread(final).SOPInstanceUID == ds.SOPInstanceUID
    assert list(spool.tmp.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_is_accepted_by_the_kernel_and_leaves_the_data_alone(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(2 << 20)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        assert start_writeback(fh.fileno(), 0, len(data)) is True
        os.fsync(fh.fileno())
    assert path.read_bytes() == data
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    assert start_writeback(fd, 0, 1) is False  # a closed descriptor: the call's failure is reported


def test_the_receive_file_starts_writeback_every_mib_over_the_whole_file(tmp_path, monkeypatch):
    """pynetdicom writes preamble, "DICM" and the meta information, then the data set in PDV fragments;
    writeback is started for contiguous ranges, each at least WRITEBACK_BYTES, that cover what was
    written up to the last full step, and the file's bytes are exactly what was written."""
    calls = []
    real = intake.start_writeback

    def recording(fd, offset, nbytes):
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(intake, "start_writeback", recording)
    rx = intake._ReceiveFile(tmp_path, max_bytes=0, min_free_mb=0)
    chunks = [b"\0" * 128, b"DICM", b"m" * 200] + [os.urandom(131066) for _ in range(40)]  # ~5.2 MB
    for chunk in chunks:
        assert rx.write(chunk) == len(chunk)
    rx.close()
    total, step, largest = sum(len(c) for c in chunks), intake.WRITEBACK_BYTES, max(len(c) for c in chunks)
    assert len(calls) >= total // (step + largest) >= 3
    assert calls[0][0] == 0 and all(step <= n < step + largest for _, n in calls)
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))  # contiguous, no gap, no overlap
    assert total - (calls[-1][0] + calls[-1][1]) < step
    with open(rx.name, "rb") as fh:
        assert fh.read() == b"".join(chunks)


def test_a_refused_receive_file_starts_no_writeback(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(intake, "start_writeback", lambda *a: calls.append(a) or True)
    rx = intake._ReceiveFile(tmp_path, max_bytes=512 << 10, min_free_mb=0)
    for chunk in [b"\0" * 128, b"DICM", b"m" * 200] + [b"x" * 131066] * 20:
        rx.write(chunk)
    rx.close()
    assert rx.refused == "data set larger than max_dataset_bytes"
    assert os.path.getsize(rx.name) == 0 and calls == []


def test_write_datasets_places_every_object_or_leaves_nothing_in_tmp(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    import pydicom

    def dataset(**kw):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    spool = Spool(tmp_path / "outbox")
    objects = [dataset(), dataset(), dataset()]
    paths = spool.write_datasets(objects)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in paths] == [ds.SOPInstanceUID for ds in objects]
    assert len({p.parent for p in paths}) == 1 and list(spool.tmp.iterdir()) == []

    broken = dataset()
    broken.file_meta = None  # cannot be written in the file format
    with pytest.raises(Exception):
        spool.write_datasets([dataset(), broken])
    assert list(spool.tmp.iterdir()) == []
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)


def test_a_failed_fsync_leaves_no_file_behind(tmp_path, monkeypatch):
    """The disk fails while a study's objects are made durable: the call fails and no file stays in
    the day folder or tmp/ (the caller records none of them)."""
    from osteoscreen.store import spool as spool_module

    spool = Spool(tmp_path / "outbox")
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_file", failing)
    src = [spool.tmp / f"rx-{i}.dcm" for i in range(3)]
    for path in src:
        path.write_bytes(b"x" * 1000)
    with pytest.raises(OSError):
        spool._place(src)
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []
    assert spool.write_datasets([]) == []
