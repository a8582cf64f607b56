"""The STOW-RS client: store result files at a DICOMweb destination, one POST per batch, a result per file.

The request (PS3.18 10.5) is `POST <url>/studies`, `multipart/related; type="application/dicom"`, one
part per outbox file holding the file's bytes as they lie on disk (nothing is decoded or re-encoded).
The body is streamed from the files in 64 KiB blocks, one file open at a time, and announced with a
Content-Length: it is never sent chunked (Orthanc once answered 200 to a chunked STOW-RS and stored
nothing, dicomweb-client issue #42; Content-Length is what every server understands).

dicomweb-client's `store_instances` (0.61) is not used for sending: it takes pydicom data sets and
re-encodes each in memory, sends any body over 1 MB with chunked transfer encoding, retries 429/503/504
itself (holding up the dispatcher beside the outbox's own backoff) and raises on a 400/409 whose body
lists the instances that failed. The response is read here as PS3.18 defines it:

- no answer (connection refused or lost, timeout, TLS failure), HTTP 5xx, 408 or 429: every file
  "destination unreachable: …" (peer_answered False: counts toward the circuit breaker, as a failed
  association does);
- HTTP 1xx/3xx, 401, 403, 404, 405, 407: every file "destination refused: …" (peer_answered False, like
  an association rejection: a wrong URL or credentials will not mend by themselves);
- any other answer (2xx, other 4xx) is the destination's word on each instance: listed in the
  response's ReferencedSOPSequence → stored (status = its Warning Reason, else 0); listed in
  FailedSOPSequence → failed with its Failure Reason; listed nowhere → not stored, even after a 200.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import requests
from pydicom import dcmread
from requests.auth import AuthBase

from ..config import TLS, DicomWebDestination
from .sender import SendResult

log = logging.getLogger("osteoscreen.dispatch")

BLOCK = 64 * 1024
MAX_RESPONSE_BYTES = 8 << 20  # a STOW-RS response lists UIDs and URLs: a few hundred bytes per instance
UNREACHABLE = "destination unreachable"
REFUSED = "destination refused"
_UNREACHABLE_STATUSES = {408, 429}
_REFUSED_STATUSES = {401, 403, 404, 405, 407}
# PS3.18 Table 10.5.3-1 / PS3.3: the STOW-RS response attributes read here
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, WARNING_REASON, FAILURE_REASON = "00081155", "00081196", "00081197"


class MultipartBody:
    """A multipart/related body over files on disk: its length known before sending (Content-Length),
    its bytes read from the files block by block as the HTTP client asks for them (`read`)."""

    def __init__(self, paths: list[Path], boundary: str | None = None):
        self.boundary = boundary or uuid.uuid4().hex
        self.content_type = f'multipart/related; type="application/dicom"; boundary={self.boundary}'
        head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._pieces: list[bytes | tuple[Path, int]] = []
        for path in map(Path, paths):
            self._pieces += [head, (path, path.stat().st_size), b"\r\n"]
        self._pieces.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(len(p) if isinstance(p, bytes) else p[1] for p in self._pieces)
        self._blocks_left = self._blocks()
        self._buffer = bytearray()

    def __len__(self) -> int:
        return self._length

    def __iter__(self):  # what makes requests treat the body as a stream of known length
        while block := self.read(BLOCK):
            yield block

    def _blocks(self):
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            path, size = piece
            sent = 0
            with open(path, "rb") as fh:
                while block := fh.read(min(BLOCK, size - sent)):
                    sent += len(block)
                    yield block
            if sent != size:  # the announced Content-Length would be a lie
                raise OSError(f"result file {path.name} shrank while it was being sent")

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            block = next(self._blocks_left, None)
            if block is None:
                break
            self._buffer += block
        size = len(self._buffer) if size < 0 else size
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


class _Bearer(AuthBase):
    """Authorization: Bearer (as an auth object, so that no ~/.netrc entry replaces it)."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def store_files(destination: DicomWebDestination, paths: list[Path], tls: TLS | None = None) -> list[SendResult]:
    """Store each file at the destination by STOW-RS; a SendResult per path, in order. Never raises
    for a peer's or a file's fault. `tls` (the node's TLS settings): the CA bundle when the
    destination names none, and the client certificate presented to an https destination."""
    results: dict[Path, SendResult] = {}
    uids: dict[Path, str] = {}
    for p in map(Path, paths):
        try:
            uids[p] = str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:  # pydicom raises many types for a damaged file
            results[p] = SendResult(p, False, None, f"unreadable result file: {type(exc).__name__}: {exc}")
    if uids:
        results.update(_post(destination, uids, tls))
    return [results[Path(p)] for p in paths]


def _post(destination: DicomWebDestination, uids: dict[Path, str], tls: TLS | None) -> dict[Path, SendResult]:
    def every(error: str, answered: bool | None = False) -> dict[Path, SendResult]:
        return {p: SendResult(p, False, None, error, peer_answered=answered) for p in uids}

    auth = None
    if destination.auth != "none":
        secret = destination.secret()
        if not secret:
            variable = destination.password_env or destination.token_env
            return every(f"{REFUSED}: no credentials (environment variable {variable} is not set)")
        auth = (destination.username, secret) if destination.auth == "basic" else _Bearer(secret)
    try:
        body = MultipartBody(list(uids))
    except OSError as exc:
        return every(f"unreadable result file: {type(exc).__name__}: {exc}", answered=None)
    verify, cert = True, None
    if destination.url.startswith("https://"):
        verify = destination.ca_certificates or (tls.ca_certificates if tls else None) or True
        cert = (tls.certificate, tls.private_key) if tls is not None and tls.certificate else None
    try:
        with requests.Session() as session:
            response = session.post(f"{destination.url}/studies", data=body, auth=auth, verify=verify, cert=cert,
                                    headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"},
                                    timeout=destination.timeout, allow_redirects=False, stream=True)
            with response:
                payload = _read_limited(response)
    except (requests.RequestException, OSError) as exc:  # refused, reset, timed out, TLS failure
        return every(f"{UNREACHABLE}: {type(exc).__name__}: {exc}"[:1000])
    status = f"HTTP {response.status_code} {response.reason or ''}".strip()
    code = response.status_code
    if code >= 500 or code in _UNREACHABLE_STATUSES:
        return every(f"{UNREACHABLE}: {status}")
    if code < 200 or 300 <= code < 400 or code in _REFUSED_STATUSES:
        moved = f" (redirected to {response.headers.get('Location')}: configure that URL)" if 300 <= code < 400 else ""
        return every(f"{REFUSED}: {status}{moved}")
    try:
        stored, failed = _outcome(response, payload)
    except ValueError as exc:
        stored, failed, why = {}, {}, f"; its body is not a STOW-RS response ({exc})"
    else:
        why = ""
    out = {}
    for path, uid in uids.items():
        if uid in failed:
            reason = failed[uid]
            text = f"STOW-RS failure reason 0x{reason:04X}" if reason is not None else "STOW-RS failure"
            out[path] = SendResult(path, False, reason, f"{text} ({status})", peer_answered=True)
        elif uid in stored:
            out[path] = SendResult(path, True, stored[uid] or 0, None, peer_answered=True)
        else:
            out[path] = SendResult(path, False, None, f"not stored: the STOW-RS response ({status}) does not "
                                                      f"list it as stored{why}", peer_answered=True)
    log.debug("STOW-RS to %s: %s, %d of %d stored", destination, status,
              sum(r.ok for r in out.values()), len(out))
    return out


def _read_limited(response: requests.Response) -> bytes:
    data = bytearray()
    for chunk in response.iter_content(BLOCK):
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            return b""  # not a STOW-RS response: nothing in it counts as stored
    return bytes(data)


def _outcome(response: requests.Response, payload: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """({SOP Instance UID: Warning Reason} stored, {SOP Instance UID: Failure Reason} failed) from the
    response's DICOM JSON (Orthanc leaves out the Content-Type of a 400 or 409 answer: JSON is tried)."""
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not payload:
        return {}, {}
    if media and media not in ("application/dicom+json", "application/json"):
        raise ValueError(f"{media}, not application/dicom+json")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError("not a DICOM JSON data set")

    def items(tag: str) -> list[dict]:
        element = data.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return [i for i in values if isinstance(i, dict)] if isinstance(values, list) else []

    def first(item: dict, tag: str):
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    def code(value) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF else None

    stored = {str(first(i, REFERENCED_SOP_INSTANCE_UID)): code(first(i, WARNING_REASON))
              for i in items(REFERENCED_SOP_SEQUENCE) if first(i, REFERENCED_SOP_INSTANCE_UID)}
    failed = {str(first(i, REFERENCED_SOP_INSTANCE_UID)): code(first(i, FAILURE_REASON))
              for i in items(FAILED_SOP_SEQUENCE) if first(i, REFERENCED_SOP_INSTANCE_UID)}
    return stored, failed
