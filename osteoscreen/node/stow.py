"""The STOW-RS receiver (DICOMweb Store Transaction, PS3.18 §10.5) as a WSGI application:
POST {base}/studies and POST {base}/studies/{StudyInstanceUID}, multipart/related of application/dicom.

One request: the sender signs in (`stow_auth`), the route, media type, size and backpressure are
checked (4xx/503 before a byte is kept), the body is read as a stream into part files in spool/tmp
(`stow_body`), and only a well-formed body is accepted, part by part, by the C-STORE listener's own
code (`accept.Acceptor`: header checks, routing, spool with fsync, database rows, audit), so that
each stored instance is durable and recorded before the answer, and settles and is screened as one
received over DIMSE would be. The answer is a DICOM JSON Store Instances Response Module (PS3.18
Annex I); its status follows Table 10.5.3-1. Every request's outcome is one `stow_request` audit
row (UIDs, counts, reasons: never a patient name or ID), beside the per-instance rows.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from http import HTTPStatus

from pydicom import Dataset, dcmread

from ..config import Settings
from .accept import STATUS_CANNOT_UNDERSTAND, STATUS_PROCESSING_FAILURE, Acceptor, Outcome
from .intake import TOO_LARGE, _valid_uid
from .stow_auth import Credentials
from .stow_body import READ_BYTES, BodyError, BodyReader, Part, media_type, valid_boundary

log = logging.getLogger("osteoscreen.dicomweb")

DICOM_JSON = "application/dicom+json"
_TOKEN = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}")  # a media type safe to audit


def _shown(mime: str) -> str:
    return mime if _TOKEN.fullmatch(mime) else "an unrecognised media type"


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    detail: str = ""  # for the audit row and the log
    peer: str | None = None
    study_uid: str | None = None

    @classmethod
    def text(cls, status: int, message: str, **kw) -> "Reply":
        return cls(status, (message + "\n").encode(), detail=message, **kw)


def response_module(outcomes: list[Outcome]) -> bytes:
    """The Store Instances Response Module (PS3.18 Table I.1-1) in DICOM JSON. Retrieve URL is Type 2
    and empty (the node offers no WADO-RS); an instance whose UIDs could not be read is not listed."""
    ds = Dataset()
    ds.RetrieveURL = ""
    failed, stored = [], []
    for o in outcomes:
        if not (_valid_uid(o.sop_class_uid) and _valid_uid(o.sop_instance_uid)):
            continue
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = o.sop_class_uid, o.sop_instance_uid
        if o.stored:
            item.RetrieveURL = ""
            stored.append(item)
        else:
            item.FailureReason = o.status
            failed.append(item)
    if failed:
        ds.FailedSOPSequence = failed
    if stored:
        ds.ReferencedSOPSequence = stored
    return json.dumps(ds.to_json_dict()).encode()


def http_status(outcomes: list[Outcome]) -> int:
    """PS3.18 Table 10.5.3-1: 200 all stored; 202 some stored, some not; none stored: 503 when every
    failure is one that passes (disk, queue, spool, database), else 409."""
    failed = [o for o in outcomes if not o.stored]
    if not failed:
        return 200
    if len(failed) < len(outcomes):
        return 202
    return 503 if all(o.transient for o in failed) else 409


class StowApp:
    def __init__(self, settings: Settings, acceptor: Acceptor, credentials: Credentials):
        self.settings, self.acceptor, self.credentials = settings, acceptor, credentials
        self.studies_path = settings.dicomweb.base_path + "/studies"

    # -- WSGI ----------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        address = str(environ.get("REMOTE_ADDR") or "?")[:46]
        try:
            reply = self.handle(environ, address)
        except Exception as exc:  # never a traceback to the peer (or its data to the log)
            log.error("STOW-RS request from %s failed: %s", address, type(exc).__name__)
            reply = Reply.text(500, f"internal error ({type(exc).__name__})")
        level = logging.INFO if reply.status < 400 else logging.WARNING
        log.log(level, "STOW-RS from %s: HTTP %d, %s", reply.peer or address, reply.status, reply.detail)
        self.acceptor.audit("stow_request", reply.peer, f"HTTP {reply.status}: {reply.detail}; from {address}",
                            study_uid=reply.study_uid if _valid_uid(reply.study_uid) else None)
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))), *reply.headers]
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", headers)
        return [reply.body]

    def audit_transport_error(self, address: str, status: int, reason: str) -> None:
        """A request waitress answered itself (body over max_request_bytes, bad chunked encoding,
        oversized headers): the application never saw it, the audit trail does."""
        detail = {413: "request body larger than dicomweb.max_request_bytes"}.get(status, reason)
        log.warning("STOW-RS from %s: HTTP %d, %s (refused by the HTTP server)", address, status, detail)
        self.acceptor.audit("stow_request", None, f"HTTP {status}: {detail} (refused by the HTTP server); "
                                                  f"from {address}")

    # -- one request ---------------------------------------------------------------------------
    def handle(self, environ, address: str) -> Reply:
        d = self.settings.dicomweb
        verdict = self.credentials.check(environ.get("HTTP_AUTHORIZATION"))
        if verdict.principal is None:
            if verdict.throttled:
                return Reply.text(429, verdict.problem, headers=[("Retry-After", "900")])
            return Reply.text(401, f"authentication required: {verdict.problem}",
                              headers=[("WWW-Authenticate", c) for c in self.credentials.schemes])
        principal = verdict.principal
        peer = f"{principal}@{address}"[:64]
        path = environ.get("PATH_INFO") or ""
        if path.rstrip("/") == self.studies_path:
            study = None
        elif path.startswith(self.studies_path + "/") and "/" not in path[len(self.studies_path) + 1:].rstrip("/"):
            study = path[len(self.studies_path) + 1:].rstrip("/")
        else:
            return Reply.text(404, "no such resource (this node offers STOW-RS only: POST "
                                   f"{self.studies_path}[/{{StudyInstanceUID}}])", peer=peer)
        if environ.get("REQUEST_METHOD") != "POST":
            return Reply.text(405, "only POST (STOW-RS) is offered", headers=[("Allow", "POST")], peer=peer)
        if study is not None and not _valid_uid(study):
            return Reply.text(400, "the Study Instance UID in the URL is not a valid UID", peer=peer)
        content_type = environ.get("CONTENT_TYPE") or ""
        mime, params = media_type(content_type)
        if not content_type:
            return Reply.text(415, "no Content-Type: expected multipart/related; type=\"application/dicom\"",
                              peer=peer, study_uid=study)
        if mime != "multipart/related":
            return Reply.text(415, f"Content-Type is {_shown(mime)}, not multipart/related", peer=peer, study_uid=study)
        part_type = media_type(params.get("type"))[0] if params.get("type") else "application/dicom"
        if part_type != "application/dicom":
            return Reply.text(415, f"multipart/related of {_shown(part_type)}: only application/dicom is accepted",
                              peer=peer, study_uid=study)
        boundary = params.get("boundary") or ""
        if not valid_boundary(boundary):
            return Reply.text(400, "multipart/related without a valid boundary parameter", peer=peer, study_uid=study)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return Reply.text(400, "Content-Length is not a number", peer=peer, study_uid=study)
        if length > d.max_request_bytes:
            return Reply.text(413, "request body larger than dicomweb.max_request_bytes", peer=peer, study_uid=study)
        problem = self.acceptor.limits_problem()
        if problem:
            self.acceptor.audit("refused", peer, problem)
            return Reply.text(503, f"refused: {problem}; retry later", peer=peer, study_uid=study,
                              headers=[("Retry-After", str(d.retry_after_seconds))])
        return self._store(environ["wsgi.input"], length, boundary, peer, principal, study)

    def _store(self, stream, length: int, boundary: str, peer: str, principal: str, study: str | None) -> Reply:
        s = self.settings
        reader = BodyReader(boundary, self.acceptor.spool.tmp, s.max_dataset_bytes, s.min_free_disk_mb)
        try:
            remaining = length
            while remaining > 0:
                chunk = stream.read(min(READ_BYTES, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                reader.feed(chunk)
            parts = reader.finish()
            outcomes = [self._accept_part(part, peer, principal, study) for part in parts]
        except BodyError as exc:
            headers = [("Retry-After", str(s.dicomweb.retry_after_seconds))] if exc.status == 503 else []
            return Reply.text(exc.status, str(exc), peer=peer, study_uid=study, headers=headers)
        finally:
            reader.discard()  # whatever happened, no part file stays in spool/tmp
        status = http_status(outcomes)
        stored = [o for o in outcomes if o.stored]
        reasons = sorted({o.reason for o in outcomes if not o.stored and o.reason})
        detail = (f"{len(parts)} part(s), {length} bytes: {len(stored)} stored "
                  f"({sum(o.duplicate for o in stored)} duplicate), {len(outcomes) - len(stored)} failed"
                  + (f" ({'; '.join(reasons)})"[:600] if reasons else ""))
        headers = [("Retry-After", str(s.dicomweb.retry_after_seconds))] if status == 503 else []
        return Reply(status, response_module(outcomes), DICOM_JSON, headers, detail, peer, study)

    def _accept_part(self, part: Part, peer: str, principal: str, study: str | None) -> Outcome:
        try:
            if part.content_type and part.content_type != "application/dicom":
                return self.acceptor.reject(peer, None, f"a part of type {_shown(part.content_type)}, "
                                                        "not application/dicom", STATUS_CANNOT_UNDERSTAND)
            if part.refused:
                sop_class, sop_uid, study_uid = _head_uids(part)
                return self.acceptor.refuse(peer, part.refused, sop_uid, transient=part.refused != TOO_LARGE,
                                            sop_class_uid=sop_class, study_uid=study_uid)
            return self.acceptor.accept(part.path, peer, expected_study_uid=study, calling_ae=principal)
        except Exception as exc:  # e.g. the database away while recording a rejection
            log.error("STOW-RS part from %s failed: %s", peer, type(exc).__name__)
            return Outcome(STATUS_PROCESSING_FAILURE, f"processing failure ({type(exc).__name__})", transient=True)
        finally:
            try:
                os.unlink(part.path)  # stored parts were moved into the spool; nothing else is kept
            except OSError:
                pass


def _head_uids(part: Part) -> tuple[str | None, str | None, str | None]:
    """(SOP Class, SOP Instance, Study Instance UID) from what a refused part kept of its header."""
    try:
        ds = dcmread(part.path, stop_before_pixels=True, force=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        values = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
        return tuple(str(v) if _valid_uid(v) else None for v in values)  # type: ignore[return-value]
    except Exception:
        return None, None, None
