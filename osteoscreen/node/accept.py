"""Accepting one received data set, whatever carried it: the C-STORE handler (`listener`) and the
STOW-RS receiver (`stow`) both hand a finished receive file in spool/tmp to `Acceptor.accept`.

Everything that decides what happens to an instance lives here, once: the header read (no pixel
data in memory), the UID checks, the pixel data's framing check, routing (`classify`), the
instance's row (`InstanceMeta`), the move into the spool (rename, fsync of file and folder), the
database rows and the audit event, in that order: Success only after the commit. The backpressure
limits (`limits_problem`: disk watermark, queue depth) are checked by the caller before it accepts.

The answer is an `Outcome` whose `status` is the C-STORE status the listener returns (0x0000,
0xA700, 0xC210); STOW-RS adds the checks only it needs (the SOP class and transfer syntax a DIMSE
presentation context would have settled, and the study named in the URL) with the codes of
PS3.18 Table I.2-2, and uses the status as the instance's Failure Reason.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from sqlalchemy import func, select

from ..config import Settings
from ..equipment import acquisition, scanner_key
from ..pipeline.covariates import read_covariates
from ..store import queue
from ..store.db import Database
from ..store.models import Job
from ..store.spool import Spool
from .intake import _clip, _disk_low, _pixel_problem, _read_pixel_header, _valid_uid
from .routing import Decision, classify
from .transfer import ACCEPTED_TRANSFER_SYNTAXES

log = logging.getLogger("osteoscreen.listener")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
# STOW-RS only (PS3.18 Table I.2-2; over DIMSE the presentation context settles these first)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STATUS_STUDY_MISMATCH = 0xA900  # Table I.2-2 has none for this: docs/CONFORMANCE.md §3.2.4.5 says why this one
STATUS_PROCESSING_FAILURE = 0x0110

QUEUE_DEPTH_TTL = 1.0  # seconds the queue depth is cached
_HEADER_DEFER = 64 * 1024  # header values larger than this are not read into memory
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
_ACCEPTED_SYNTAXES = frozenset(str(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES)


@dataclass
class Outcome:
    """What became of one data set. `transient`: refused for a reason that passes (disk, queue,
    spool or database trouble), so the sender should retry later."""
    status: int
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    duplicate: bool = False
    transient: bool = False

    @property
    def stored(self) -> bool:
        return self.status == STATUS_SUCCESS


class Acceptor:
    """One per receiving process, shared by its C-STORE and STOW-RS handlers (thread-safe)."""

    def __init__(self, settings: Settings, db: Database, spool: Spool):
        self.settings, self.db, self.spool = settings, db, spool
        self.received = 0
        self._lock = threading.Lock()
        self._depth = (float("-inf"), 0)  # (monotonic time checked, queued + running jobs)

    # -- audit and limits --------------------------------------------------------------------
    def audit(self, event: str, peer: str | None, detail: str | None, sop_uid: str | None = None,
              study_uid: str | None = None) -> None:
        """An audit row that must never take the receiver down (errors are logged, not raised)."""
        try:
            with self.db.session() as session:
                queue.audit(session, event, peer=(peer or None) and peer[:64], sop_instance_uid=sop_uid,
                            study_uid=study_uid, detail=detail)
                session.commit()
        except Exception as exc:
            log.error("cannot write audit event %s: %s", event, type(exc).__name__)

    def queue_depth(self) -> int:
        checked, depth = self._depth
        now = time.monotonic()
        if now - checked > QUEUE_DEPTH_TTL:
            with self.db.session() as session:
                depth = session.scalar(select(func.count(Job.id)).where(Job.state.in_(("queued", "running"))))
            self._depth = (now, depth)
        return depth

    def limits_problem(self) -> str | None:
        """The backpressure watermarks: why nothing should be accepted now, or None."""
        s = self.settings
        if _disk_low(self.spool.root, s.min_free_disk_mb):
            return "free disk space below min_free_disk_mb"
        if s.max_queued_jobs and self.queue_depth() >= s.max_queued_jobs:
            return "screening queue at max_queued_jobs"
        return None

    def refuse(self, peer: str | None, reason: str, sop_uid: str | None = None, *, transient: bool = True,
               sop_class_uid: str | None = None, study_uid: str | None = None) -> Outcome:
        """Out of resources (limits, backpressure): the sender should keep the image (0xA700)."""
        log.warning("refused an instance from %s: %s", peer, reason)
        self.audit("refused", peer, reason, sop_uid=sop_uid)
        return Outcome(STATUS_OUT_OF_RESOURCES, reason, sop_class_uid, sop_uid, study_uid, transient=transient)

    def reject(self, peer: str | None, sop_uid: str | None, reason: str, status: int = STATUS_CANNOT_UNDERSTAND,
               *, sop_class_uid: str | None = None, study_uid: str | None = None) -> Outcome:
        """A data set the node will not take as it is. The audit row is written in the caller's
        thread and an error writing it propagates (the C-STORE handler then answers 0xC211)."""
        log.warning("rejected an instance from %s: %s", peer, reason)
        with self.db.session() as session:
            queue.audit(session, "rejected", peer=(peer or None) and peer[:64], sop_instance_uid=sop_uid,
                        detail=reason)
            session.commit()
        return Outcome(status, reason, sop_class_uid, sop_uid, study_uid)

    # -- one data set --------------------------------------------------------------------------
    def accept(self, path: Path, peer: str | None, *, syntax: UID | None = None,
               expected_sop_uid: str | None = None, expected_study_uid: str | None = None,
               calling_ae: str | None = None) -> Outcome:
        """Check, spool and record the Part 10 file at `path` (in spool/tmp; moved away when stored,
        left for the caller to remove otherwise). `syntax`: the negotiated transfer syntax (C-STORE);
        None reads it from the File Meta Information and also checks the SOP class and transfer
        syntax against what the DIMSE listener accepts (STOW-RS). `expected_sop_uid`: the C-STORE
        request's Affected SOP Instance UID; `expected_study_uid`: the study in a STOW-RS URL.
        `peer` names the sender in the audit trail and the log; `calling_ae` (default: `peer`) is
        what a new study row records as its calling AE title (16 characters)."""
        stow = syntax is None
        unsupported = None
        try:
            with open(path, "rb") as fh:
                # a STOW-RS part may lack the 128-byte preamble and "DICM" (dicomweb-client sends them so);
                # it must still begin with its File Meta Information, which names the transfer syntax
                ds = dcmread(fh, stop_before_pixels=True, defer_size=_HEADER_DEFER, force=stow)
                if stow:
                    meta = getattr(ds, "file_meta", None)
                    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or "")
                    if not str(syntax):
                        unsupported = "no Transfer Syntax UID in the File Meta Information"
                    elif str(syntax) not in _ACCEPTED_SYNTAXES:
                        unsupported = f"transfer syntax {str(syntax)[:64]} not accepted"
                pixel = None if unsupported or syntax.is_deflated else _read_pixel_header(
                    fh, syntax.is_little_endian, syntax.is_implicit_VR)
                size = os.fstat(fh.fileno()).st_size
        except Exception as exc:  # pydicom raises many types for a damaged data set
            return self.reject(peer, None, f"undecodable data set: {type(exc).__name__}")
        try:
            sop_uid, study_uid, sop_class = ds.get("SOPInstanceUID"), ds.get("StudyInstanceUID"), ds.get("SOPClassUID")
            if not (_valid_uid(sop_uid) and _valid_uid(study_uid) and _valid_uid(sop_class)):
                return self.reject(peer, None, "missing or invalid SOP/Study UID")
            ref = {"sop_class_uid": str(sop_class), "study_uid": str(study_uid)}
            if expected_sop_uid is not None and str(sop_uid) != expected_sop_uid:
                return self.reject(peer, str(sop_uid), "SOPInstanceUID differs from the C-STORE request", **ref)
            if stow and str(sop_class) not in STORAGE_SOP_CLASSES:
                return self.reject(peer, str(sop_uid), "SOP class not supported", STATUS_SOP_CLASS_NOT_SUPPORTED, **ref)
            if unsupported:
                return self.reject(peer, str(sop_uid), unsupported, STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, **ref)
            if expected_study_uid is not None and str(study_uid) != expected_study_uid:
                return self.reject(peer, str(sop_uid), "StudyInstanceUID differs from the study in the request URL",
                                   STATUS_STUDY_MISMATCH, **ref)
            problem = _pixel_problem(ds, pixel, size, syntax)
            if problem:
                return self.reject(peer, str(sop_uid), problem, **ref)
            # Everything read from the header is read now, while the file is where pydicom saw it.
            decision = classify(ds, self.settings.routing)
            if decision.eligible and (pixel is None or pixel[0] != 0x7FE00010):
                decision = Decision(False, decision.region, decision.view, "no pixel data")
            cov = read_covariates(ds)
            series_uid = ds.get("SeriesInstanceUID")
            meta = queue.InstanceMeta(  # values clipped to their columns: a hostile header is no DB error
                study_uid=str(study_uid), series_uid=str(series_uid) if _valid_uid(series_uid) else None,
                sop_instance_uid=str(sop_uid), sop_class_uid=str(sop_class),
                transfer_syntax_uid=str(syntax), modality=_clip(ds.get("Modality"), 16),
                patient_id=_clip(ds.get("PatientID"), 64), patient_name=_clip(ds.get("PatientName"), 324),
                accession_number=_clip(ds.get("AccessionNumber"), 16), study_date=_clip(ds.get("StudyDate"), 8),
                age_years=cov.age_years, sex=cov.sex, bmi=cov.bmi, region=decision.region, view=decision.view,
                eligible=decision.eligible, skip_reason=decision.reason,
                scanner=_clip(scanner_key(ds), 200), acquisition=acquisition(ds))
        except Exception as exc:  # a garbled value met while reading the header
            return self.reject(peer, None, f"undecodable header value: {type(exc).__name__}")
        return self._store(path, peer, peer if calling_ae is None else calling_ae, meta, decision, **ref)

    def _store(self, path: Path, peer: str | None, calling_ae: str | None, meta: queue.InstanceMeta,
               decision: Decision, **ref) -> Outcome:
        sop_uid = meta.sop_instance_uid
        try:
            final = self.spool.adopt(path)
        except OSError as exc:  # disk full, permissions: the sender keeps the image and retries
            log.error("cannot spool instance %s: %s", sop_uid, exc.strerror)
            return self.refuse(peer, f"cannot write to the spool: {exc.strerror}", sop_uid, **ref)
        try:
            with self.db.session() as session:
                _, is_new = queue.record_instance(session, meta, str(final), _clip(calling_ae, 16))
                queue.audit(session, "received" if is_new else "duplicate", peer=(peer or None) and peer[:64],
                            study_uid=meta.study_uid, sop_instance_uid=sop_uid,
                            detail=None if decision.eligible else f"skipped: {decision.reason}")
                session.commit()
        except Exception as exc:  # database down: do not claim success
            log.error("cannot record instance %s: %s", sop_uid, type(exc).__name__)
            os.unlink(final)
            return Outcome(STATUS_OUT_OF_RESOURCES, "cannot record the instance in the database",
                           ref.get("sop_class_uid"), sop_uid, ref.get("study_uid"), transient=True)
        if not is_new:
            os.unlink(final)  # the first copy is already spooled and recorded
        with self._lock:
            self.received += 1
        log.info("stored %s from %s (%s)", sop_uid, peer,
                 "screening candidate" if decision.eligible else f"skipped: {decision.reason}")
        return Outcome(STATUS_SUCCESS, None, ref.get("sop_class_uid"), sop_uid, ref.get("study_uid"),
                       duplicate=not is_new)
