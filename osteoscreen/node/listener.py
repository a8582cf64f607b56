"""The Storage SCP: accept what modalities send, keep it durably, answer Success only after that.

pynetdicom streams each C-STORE data set to a temporary file (STORE_RECV_CHUNKED_DATASET), so a 20 MB
radiograph never sits in memory whole. The handler moves that file into the spool (fsync + rename),
records the instance in the database, and only then returns 0x0000.
"""
from __future__ import annotations

import logging
import os
import threading

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from ..config import Settings
from ..pipeline.covariates import read_covariates
from ..store import queue
from ..store.db import Database
from ..store.spool import Spool
from .routing import classify
from .transfer import ACCEPTED_TRANSFER_SYNTAXES

log = logging.getLogger("osteoscreen.listener")

_config.STORE_RECV_CHUNKED_DATASET = True  # bounded memory for large images
_config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's own logs would print dataset contents at debug level

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210


def _valid_uid(value) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and UID(text).is_valid


class Listener:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.spool = Spool(settings.spool_dir)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu
        self.ae.require_called_aet = False
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self._server = None
        self.received = 0
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
        self._server = self.ae.start_server((self.settings.bind_address, self.settings.port), block=False,
                                            evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("listening as %s on port %d", self.settings.ae_title, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- C-STORE ---------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title.strip() if event.assoc.requestor.ae_title else None
        tmp_path = event.dataset_path
        try:
            ds = dcmread(tmp_path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            return self._reject(calling, None, f"undecodable data set: {type(exc).__name__}")
        sop_uid, study_uid = ds.get("SOPInstanceUID"), ds.get("StudyInstanceUID")
        if not (_valid_uid(sop_uid) and _valid_uid(study_uid) and _valid_uid(ds.get("SOPClassUID"))):
            return self._reject(calling, None, "missing or invalid SOP/Study UID")
        if str(sop_uid) != str(event.request.AffectedSOPInstanceUID):
            return self._reject(calling, str(sop_uid), "SOPInstanceUID differs from the C-STORE request")
        try:
            final = self.spool.adopt(tmp_path)
        except OSError as exc:  # disk full, permissions: the sender keeps the image and retries
            log.error("cannot spool instance %s: %s", sop_uid, exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        decision = classify(ds, self.settings.routing)
        cov = read_covariates(ds)
        meta = queue.InstanceMeta(
            study_uid=str(study_uid), series_uid=str(ds.get("SeriesInstanceUID", "")) or None,
            sop_instance_uid=str(sop_uid), sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(event.context.transfer_syntax), modality=str(ds.get("Modality", "")) or None,
            patient_id=str(ds.get("PatientID", "")) or None, patient_name=str(ds.get("PatientName", "")) or None,
            accession_number=str(ds.get("AccessionNumber", "")) or None, study_date=str(ds.get("StudyDate", "")) or None,
            age_years=cov.age_years, sex=cov.sex, bmi=cov.bmi, region=decision.region, view=decision.view,
            eligible=decision.eligible, skip_reason=decision.reason)
        try:
            with self.db.session() as session:
                _, is_new = queue.record_instance(session, meta, str(final), calling)
                queue.audit(session, "received" if is_new else "duplicate", peer=calling, study_uid=meta.study_uid,
                            sop_instance_uid=meta.sop_instance_uid,
                            detail=None if decision.eligible else f"skipped: {decision.reason}")
                session.commit()
        except Exception as exc:  # database down: do not claim success
            log.error("cannot record instance %s: %s", sop_uid, type(exc).__name__)
            os.unlink(final)
            return STATUS_OUT_OF_RESOURCES
        if not is_new:
            os.unlink(final)  # the first copy is already spooled and recorded
        with self._lock:
            self.received += 1
        log.info("stored %s from %s (%s)", sop_uid, calling,
                 "screening candidate" if decision.eligible else f"skipped: {decision.reason}")
        return STATUS_SUCCESS

    def _reject(self, calling: str | None, sop_uid: str | None, reason: str) -> int:
        log.warning("rejected an instance from %s: %s", calling, reason)
        with self.db.session() as session:
            queue.audit(session, "rejected", peer=calling, sop_instance_uid=sop_uid, detail=reason)
            session.commit()
        return STATUS_CANNOT_UNDERSTAND
