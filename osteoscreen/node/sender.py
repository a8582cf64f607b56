"""The Storage SCU: send files to a peer, one association per batch, a status per file.

A destination marked `tls` (AET@HOST:PORT?tls) is reached over DICOM TLS: its certificate is checked
against the `tls` settings' CA bundle (the system store when none) and host name, and the node's own
certificate is presented when one is configured (node/tls.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ..config import TLS, Destination
from . import tls as tls_contexts

# C-STORE warning statuses mean the peer stored the object (PS3.4 B.2.3).
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}


@dataclass
class SendResult:
    path: Path
    ok: bool
    status: int | None  # the DICOM status: C-STORE's, or a STOW-RS Warning/Failure Reason
    error: str | None
    # whether the destination answered: set by the STOW-RS client (node/dicomweb_sender.py); for
    # C-STORE the dispatcher reads it from status and error (dispatch/outbox.association_outcome)
    peer_answered: bool | None = None


def _tls_args(destination: Destination, tls: TLS | None):
    """pynetdicom's tls_args for a TLS destination (None for a plain one)."""
    if not destination.tls:
        return None
    return tls_contexts.client_context(tls), destination.host


def echo(destination: Destination, ae_title: str = "OSTEOSCREEN", timeout: float = 10,
         tls: TLS | None = None) -> bool:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=_tls_args(destination, tls))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def send_files(destination: Destination, paths: list[Path], ae_title: str = "OSTEOSCREEN",
               timeout: float = 30, tls: TLS | None = None) -> list[SendResult]:
    """Send each file; a failed association fails every file with the reason. Never raises for a
    peer's or a file's fault: an unreadable file, or a SOP class the peer did not accept, fails
    that file alone with the reason. `tls` (the node's TLS settings) is used for a TLS destination."""
    results: dict[Path, SendResult] = {}
    headers = []
    for p in map(Path, paths):
        try:
            headers.append((p, dcmread(p, stop_before_pixels=True)))
        except Exception as exc:  # pydicom raises many types for a damaged file
            results[p] = SendResult(p, False, None, f"unreadable result file: {type(exc).__name__}: {exc}")
    if not headers:
        return [results[Path(p)] for p in paths]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in headers}
    for sop_class in sorted({c for c, _ in contexts}):
        syntaxes = sorted({t for c, t in contexts if c == sop_class} | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        ae.add_requested_context(sop_class, syntaxes)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=_tls_args(destination, tls))
    except (OSError, RuntimeError, ValueError) as exc:  # incl. ssl.SSLError (an OSError): bad CA/key files
        assoc, failure = None, f"association failed: {exc}"
    else:
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
            assoc, failure = None, f"{reason} ({destination})"
    if assoc is None:
        results.update({p: SendResult(p, False, None, failure) for p, _ in headers})
        return [results[Path(p)] for p in paths]
    try:
        for path, _ in headers:
            if not assoc.is_established:
                results[path] = SendResult(path, False, None, "association lost")
                continue
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError, OSError, AttributeError) as exc:
                # e.g. the peer accepted no presentation context for this SOP class
                results[path] = SendResult(path, False, None, f"not sent: {exc}")
                continue
            code = getattr(status, "Status", None) if status else None
            ok = code == 0 or code in WARNING_STATUSES
            results[path] = SendResult(path, ok, code, None if ok else
                                       (f"C-STORE status 0x{code:04X}" if code is not None else "no response"))
    finally:
        if assoc.is_established:
            assoc.release()
    return [results[Path(p)] for p in paths]
