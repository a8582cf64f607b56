"""A real `osteoscreen serve` against well over a hundred malformed or hostile inputs, generated here:
truncated data sets, wrong element lengths, missing / garbled / impossible pixel data, transfer
syntaxes that lie, path-like and oversized UIDs, non-image SOP classes, empty data sets, random
bytes, and junk at the PDU level (where storescu would refuse to send it). Data sets are sent with
pynetdicom's chunked sender, which streams a file's bytes after its File Meta Information as they
are, so the node receives exactly the bytes built here.

The node must answer every input (a status, an association reject or an abort; nothing hangs), stay
up, record each input with a reason, write nothing outside its storage folder, name no file after a
UID, and still screen a good pelvis sent afterwards."""
from __future__ import annotations

import io
import re
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGBaseline8Bit, RLELossless, DeflatedExplicitVRLittleEndian, generate_uid)
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import text

from .test_node_e2e import NodeProcess, Peer, results_for, storescu, wait_for, write_study

pytestmark = pytest.mark.slow

CR = "1.2.840.10008.5.1.4.1.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
PATIENT_NAME, PATIENT_ID = "HOSTILE^TESTPATIENT", "HOSTILE-ID-4711"


# -- building inputs ------------------------------------------------------------------------------
def base(rng: np.random.Generator, sop_class: str = CR, pixels: bool = True, n: int = 32) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "PELVIS", "AP"
    if pixels:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = n
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, n * n, dtype="<u2").tobytes()
    return ds


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    return fp.getvalue()


class Case:
    def __init__(self, name: str, body: bytes, sop_uid: str, sop_class: str = CR,
                 syntax: str = ExplicitVRLittleEndian):
        self.name, self.body, self.sop_uid, self.sop_class, self.syntax = name, body, sop_uid, sop_class, syntax


def from_ds(name: str, ds: Dataset, syntax=ExplicitVRLittleEndian, implicit=False, little=True,
            sop_uid: str | None = None, sop_class: str | None = None) -> Case:
    return Case(name, encode(ds, implicit, little), sop_uid or str(ds.SOPInstanceUID),
                sop_class or str(ds.SOPClassUID), syntax)


def find_element(body: bytes, group: int, elem: int) -> int:
    return body.index(struct.pack("<HH", group, elem))


def set_length(body: bytes, group: int, elem: int, length: int) -> bytes:
    """Overwrite the length field of an Explicit VR Little Endian element."""
    at = find_element(body, group, elem)
    vr = body[at + 4:at + 6]
    b = bytearray(body)
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"OF"):
        b[at + 8:at + 12] = struct.pack("<L", length & 0xFFFFFFFF)
    else:
        b[at + 6:at + 8] = struct.pack("<H", length & 0xFFFF)
    return bytes(b)


def generate_cases(rng: np.random.Generator) -> list[Case]:
    cases: list[Case] = []
    # truncated data sets, cut anywhere from the first bytes to the middle of the pixels
    for frac in np.linspace(0.0, 0.98, 16):
        ds = base(rng)
        body = encode(ds)
        cases.append(Case(f"truncated at {frac:.2f}", body[:int(len(body) * frac)], str(ds.SOPInstanceUID)))
    # wrong element lengths
    for tag in ((0x0008, 0x0016), (0x0008, 0x0018), (0x0008, 0x0060), (0x0010, 0x0010), (0x0018, 0x0015),
                (0x0020, 0x000D), (0x0028, 0x0010), (0x0028, 0x0011), (0x7FE0, 0x0010)):
        for length in (0, 1, 3, 0xFFFF, 0xFFFFFFF0):
            ds = base(rng)
            body = encode(ds)
            if tag != (0x7FE0, 0x0010) and length > 0xFFFF:
                continue
            cases.append(Case(f"length {length:#x} on {tag[0]:04X},{tag[1]:04X}", set_length(body, *tag, length),
                              str(ds.SOPInstanceUID)))
    # pixel data: missing, empty, short, garbled, impossible sizes
    ds = base(rng)
    del ds.PixelData
    cases.append(from_ds("no pixel data", ds))
    for name, change in (("empty pixel data", lambda d: setattr(d, "PixelData", b"")),
                         ("short pixel data", lambda d: setattr(d, "PixelData", d.PixelData[:100])),
                         ("Rows/Columns 65535", lambda d: (setattr(d, "Rows", 65535), setattr(d, "Columns", 65535))),
                         ("a million frames", lambda d: setattr(d, "NumberOfFrames", 1000000)),
                         ("Bits Allocated 0", lambda d: setattr(d, "BitsAllocated", 0)),
                         ("no Rows", lambda d: delattr(d, "Rows")),
                         ("Rows not a number", lambda d: d.__setitem__(0x00280010, d[0x00280010].__class__(
                             0x00280010, "US", b"\xff"))),
                         ("garbled pixel data", lambda d: setattr(d, "PixelData", rng.bytes(len(d.PixelData)))),
                         ("odd pixel data", lambda d: setattr(d, "PixelData", d.PixelData + b"\x00\x00"))):
        ds = base(rng)
        try:
            change(ds)
            cases.append(from_ds(name, ds))
        except Exception:  # pydicom refused to encode it: send the raw variant instead
            body = encode(base(rng))
            cases.append(Case(name + " (raw)", body[: len(body) // 3], generate_uid()))
    # pixel data declared 0xFFFFFFF0 long, followed by little data
    ds = base(rng)
    cases.append(Case("PixelData length 0xFFFFFFF0", set_length(encode(ds), 0x7FE0, 0x0010, 0xFFFFFFF0)[:-1000],
                      str(ds.SOPInstanceUID)))
    # transfer syntaxes that lie about the bytes
    for syntax in (JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, ExplicitVRBigEndian, ImplicitVRLittleEndian,
                   DeflatedExplicitVRLittleEndian):
        ds = base(rng)
        cases.append(from_ds(f"declared {syntax.name}, raw explicit LE", ds, syntax=syntax))
    ds = base(rng)
    cases.append(from_ds("implicit VR bytes declared explicit", ds, implicit=True))
    # UIDs that look like paths, are too long, or carry NUL
    for bad in ("../../etc/passwd", "1.2/../../x", "1.2\x003", "/tmp/owned", "..", "1.2.3;rm -rf /"):
        ds = base(rng)
        ds.SOPInstanceUID = bad
        cases.append(from_ds(f"SOP Instance UID {bad!r}", ds, sop_uid=bad))
    for keyword, bad in (("StudyInstanceUID", "../../etc/passwd"), ("StudyInstanceUID", "1." + "9" * 200),
                         ("SOPClassUID", "../x"), ("SOPInstanceUID", "1." + "2" * 300), ("SOPInstanceUID", "")):
        ds = base(rng)
        good = str(ds.SOPInstanceUID)
        setattr(ds, keyword, bad)
        cases.append(from_ds(f"{keyword} {bad[:20]!r}…", ds, sop_uid=good, sop_class=CR))
    ds = base(rng)
    cases.append(from_ds("SOP Instance UID differs from the command", ds, sop_uid=generate_uid()))
    ds = base(rng)
    ds.SeriesInstanceUID, ds.Modality = "../../../tmp/series", "OT"  # stored (skipped), never a path
    cases.append(from_ds("Series UID path, OT", ds))
    # valid DICOM, but nothing to screen
    for sop_class, name in ((BASIC_TEXT_SR, "text SR"), (KOS, "KOS"), (PDF, "encapsulated PDF"),
                            (RT_PLAN, "RT plan"), (MR, "MR without pixels")):
        ds = base(rng, sop_class=sop_class, pixels=False)
        ds.Modality = {"KOS": "KO", "encapsulated PDF": "DOC", "RT plan": "RTPLAN"}.get(name, "SR")
        if sop_class == PDF:
            ds.EncapsulatedDocument = b"%PDF-1.4 junk" + rng.bytes(101)
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        cases.append(from_ds(name, ds))
    ds = base(rng)
    ds.BodyPartExamined, ds.Modality = "CHEST", "DX"
    cases.append(from_ds("chest DX", ds))
    ds = base(rng, sop_class="1.2.3.4.5.6.7.8.9")
    cases.append(from_ds("private SOP class", ds))  # no context for it: pynetdicom does not send
    # empty and nearly empty data sets
    cases.append(Case("empty data set", b"", generate_uid()))
    only = Dataset()
    only.SOPClassUID = CR
    cases.append(from_ds("only a SOP Class UID", only, sop_uid=generate_uid(), sop_class=CR))
    # random bytes
    for i, n in enumerate((1, 2, 7, 8, 64, 255, 1024, 4096, 12000, 65536)):
        cases.append(Case(f"random {n} bytes", rng.bytes(n), generate_uid(),
                          syntax=ImplicitVRLittleEndian if i % 2 else ExplicitVRLittleEndian))
    for i in range(6):  # random bytes after a valid start
        ds = base(rng)
        body = encode(ds)
        cut = int(rng.integers(8, len(body) // 4))
        cases.append(Case(f"valid start, random rest {i}", body[:cut] + rng.bytes(int(rng.integers(1, 3000))),
                          str(ds.SOPInstanceUID)))
    return cases


# -- sending --------------------------------------------------------------------------------------
def write_raw(folder: Path, case: Case, i: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = case.sop_class
    meta.MediaStorageSOPInstanceUID = case.sop_uid
    meta.TransferSyntaxUID = case.syntax
    meta.ImplementationClassUID = generate_uid()
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = folder / f"case{i:03d}.dcm"
    path.write_bytes(buf.getvalue() + case.body)
    return path


def send_raw(port: int, path: Path, case: Case) -> str | int:
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(case.sop_class, [case.syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOSCREEN")
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "association aborted"
    try:
        status = assoc.send_c_store(path)
    except (ValueError, RuntimeError, AttributeError):
        return "context rejected"  # the node accepted the association but not this SOP class
    finally:
        if assoc.is_established:
            assoc.release()
    if assoc.is_aborted:
        return "association aborted"
    return getattr(status, "Status", None) if status else "no response"


def raw_connection(port: int, payload: bytes, timeout: float = 10) -> bool:
    """Send bytes on a fresh TCP connection; True when the node answers (A-ABORT) or closes in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        s.settimeout(timeout)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            return False
    return True


def associate(port: int):
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOSCREEN")
    assert assoc.is_established
    return assoc


def partial_store(port: int, rng, how: str) -> bool:
    """Start a C-STORE, send part of its data set, then abort or drop the connection."""
    assoc = associate(port)
    ds = base(rng, n=512)
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CR, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(encode(ds))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx_id = assoc.accepted_contexts[0].context_id
    for n, primitive in enumerate(msg.encode_msg(cx_id, 16382)):
        if n == 8:
            break
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.send(pdu.encode())
    time.sleep(0.3)
    if how == "abort":
        assoc.abort()
    else:
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        assoc.dul.socket.socket.close()
    return wait_for(lambda: not assoc.is_established, 10, interval=0.1)


def junk_pdata(port: int, payload: bytes) -> bool:
    assoc = associate(port)
    assoc.dul.socket.send(payload)
    return wait_for(lambda: not assoc.is_established, 10, interval=0.1)


def listing(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# -- the test -------------------------------------------------------------------------------------
def test_hostile_inputs_leave_the_node_up_and_screening(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    started = time.monotonic()
    good_files, good = write_study("hip", tmp_path / "good", seed=41)
    send_dir = tmp_path / "send"
    send_dir.mkdir()
    peer = Peer(tmp_path / "pacs")
    node = NodeProcess(tmp_path / "var", peer.port, settle=1.0)
    engine = node.db()

    def count(sql: str) -> int:
        with engine.connect() as c:
            return c.execute(text(sql)).scalar()

    def audits() -> int:
        return count("SELECT count(*) FROM audit_events")

    before = listing(tmp_path)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes exactly as built
    outcomes: list[tuple[str, object]] = []
    try:
        cases = generate_cases(rng)
        for i, case in enumerate(cases):
            rejected, stored, audited = (count("SELECT count(*) FROM audit_events WHERE event='rejected'"),
                                         count("SELECT count(*) FROM instances"), audits())
            outcome = send_raw(node.port, write_raw(send_dir, case, i), case)
            outcomes.append((case.name, outcome))
            assert node.proc.poll() is None, f"node died on {case.name}"
            if outcome == 0xC210:
                assert wait_for(lambda: count("SELECT count(*) FROM audit_events WHERE event='rejected'") > rejected,
                                5, 0.05), case.name
            elif outcome == 0:
                assert count("SELECT count(*) FROM instances") == stored + 1, case.name
                with engine.connect() as c:
                    eligible, reason = c.execute(text("SELECT eligible, skip_reason FROM instances ORDER BY id DESC")
                                                 ).first()
                assert eligible or reason, case.name  # skipped ones say why
            elif outcome in ("association aborted",):
                assert wait_for(lambda: audits() > audited, 5, 0.05), case.name
            else:
                assert outcome == "context rejected" and case.name == "private SOP class", (case.name, outcome)

        # junk below DIMSE: storescu would never send any of this
        raw = [b"\x10" + rng.bytes(99), b"\xff" * 6, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
               b"\x01\x00" + struct.pack(">L", 40) + rng.bytes(40),  # A-ASSOCIATE-RQ of garbage
               b"\x01\x00" + struct.pack(">L", 4) + b"\x00\x01\x00\x00",
               b"\x04\x00" + struct.pack(">L", 10) + rng.bytes(10)]  # P-DATA before any association
        for payload in raw:
            audited = audits()
            assert raw_connection(node.port, payload), payload[:10]
            assert wait_for(lambda: audits() > audited, 5, 0.05), payload[:10]
            outcomes.append(("raw bytes", "closed"))
        raw_conn_only = [b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0) + rng.bytes(100)]  # huge PDU, then close
        for payload in raw_conn_only:
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
                s.sendall(payload)
            outcomes.append(("huge PDU length", "closed"))
        for payload in (b"\x04\x00" + struct.pack(">L", 12) + rng.bytes(12),
                        b"\x04\x00" + struct.pack(">L", 6) + struct.pack(">L", 2) + b"\x01\x03",  # PDV: bad context
                        b"\x09\x00" + struct.pack(">L", 4) + b"abcd"):
            audited = audits()
            assert junk_pdata(node.port, payload), payload[:10]
            assert wait_for(lambda: audits() > audited, 5, 0.05), payload[:10]
            outcomes.append(("junk PDU in association", "aborted"))
        for how in ("abort", "drop"):
            rejected = count("SELECT count(*) FROM audit_events WHERE event IN ('rejected', 'association_aborted')")
            assert partial_store(node.port, rng, how)
            assert wait_for(lambda: count("SELECT count(*) FROM audit_events WHERE event IN "
                                          "('rejected', 'association_aborted')") > rejected, 5, 0.05), how
            outcomes.append((f"partial data set, {how}", "closed"))
        assert len(outcomes) >= 100, len(outcomes)
        tally = Counter(str(o) for _, o in outcomes)
        print(tally, *(f"{name}: {o}" for name, o in outcomes), sep="\n")
        assert tally[str(0xC210)] >= 60 and tally["0"] >= 8, tally  # most are rejected; the valid ones stored
        assert node.proc.poll() is None

        # nothing written outside the storage folder (the log and the PACS are the test's own)
        new = {p for p in listing(tmp_path) - before
               if not any(p.is_relative_to(tmp_path / d) for d in ("var", "pacs", "send"))
               and p != node.log}
        assert new == set(), new
        spool = tmp_path / "var" / "spool"
        assert wait_for(lambda: not any((spool / "tmp").iterdir()), 10), list((spool / "tmp").iterdir())
        for p in spool.rglob("*"):
            rel = p.relative_to(spool)
            assert re.fullmatch(r"(tmp|\d{8})(/[0-9a-f]{32}\.dcm)?", rel.as_posix()), rel
        assert not any(".." in str(p) or "passwd" in str(p) for p in listing(tmp_path / "var"))

        # and a good pelvis is still screened
        sent = storescu(node.port, good_files)
        assert sent.returncode == 0, sent.stderr
        uid = str(good[0].dataset.StudyInstanceUID)
        assert wait_for(lambda: len(results_for(peer, uid)["sr"]) >= 1, 120), node.log.read_text()[-3000:]
        assert node.proc.poll() is None
        log = node.log.read_text()
        assert PATIENT_NAME not in log and PATIENT_ID not in log and "HOSTILE^" not in log
        assert time.monotonic() - started < 180
    finally:
        node.stop()
        peer.stop()
        engine.dispose()
