"""The Storage SCP: accept what modalities send, keep it durably, answer Success only after that.

pynetdicom streams each C-STORE data set to a temporary file (STORE_RECV_CHUNKED_DATASET), so a 20 MB
radiograph never sits in memory whole. Here that file lives in the spool's tmp/ folder (same disk,
so adopting it is a rename; nothing is written outside the storage folder) and stops growing past
`max_dataset_bytes` or when the disk runs low. The handler checks the limits and hands the file to
`accept.Acceptor` (shared with the STOW-RS receiver): it reads the header, checks the pixel data's
framing, moves the file into the spool (fsync + rename), records the instance in the database, and
only then is 0x0000 returned. A refused or rejected data set leaves no file behind.

Who may associate is decided by pynetdicom itself (`AE.require_calling_aet`,
`AE.require_called_aet`); rejections and aborted associations are written to the audit table.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ..config import Settings
from ..store.db import Database
from ..store.spool import Spool
from . import tls as tls_contexts
from .accept import STATUS_SUCCESS, Acceptor
from .intake import RX_PREFIX, _guard_dimse_decoding, _guard_pdu_length, _ReceiveFile
from .transfer import ACCEPTED_TRANSFER_SYNTAXES

log = logging.getLogger("osteoscreen.listener")

_config.STORE_RECV_CHUNKED_DATASET = True  # bounded memory for large images
_config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's own logs would print dataset contents at debug level
# pydicom's value validation on reading logs (and warns with) the offending raw value, which for a
# garbled header can carry patient names and IDs: the node validates what it needs itself.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

STALE_RX_SECONDS = 600  # an rx file untouched this long belongs to no live association (timeouts are 60 s)

_REJECT_REASONS = {  # (result, source, diagnostic) of A-ASSOCIATE-RJ as pynetdicom 3.0 sends them
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "too many associations (local limit exceeded)",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


# An association PDU (A-ASSOCIATE-RQ with many presentation contexts) may exceed the negotiated
# maximum, which binds only P-DATA; this much is always allowed.


class _SharedPortServer(ThreadedAssociationServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Listener:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.spool = Spool(settings.spool_dir)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu
        self.ae.require_called_aet = settings.require_called_aet
        self.ae.require_calling_aet = list(settings.allowed_calling_aets)
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self._servers = []
        # bind the plain port with SO_REUSEPORT (set when listen_processes > 1: parent and children)
        self.shared_port = settings.listen_processes > 1
        self.port: int | None = None
        self.tls_port: int | None = None
        self.acceptor = Acceptor(settings, db, self.spool)  # the STOW-RS receiver of this process shares it
        self._last_sweep = 0.0
        self._original_tmpfile = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        s, t = self.settings, self.settings.tls
        self._sweep_stale_rx(force=True)
        _guard_dimse_decoding()
        _guard_pdu_length(s.max_pdu)
        # pynetdicom creates its receive file with dimse_messages.NamedTemporaryFile: ours goes to the
        # spool and is bounded. One listener per process owns this hook (the last one started).
        self._original_tmpfile = dimse_messages.NamedTemporaryFile
        dimse_messages.NamedTemporaryFile = self._new_receive_file
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted),
                    (evt.EVT_CONN_CLOSE, self._on_conn_close), (evt.EVT_FSM_TRANSITION, self._on_transition)]
        if not t.enabled or t.keep_plain_port:
            if self.shared_port:
                server = self._start_shared_server((s.bind_address, s.port), handlers)
            else:
                server = self.ae.start_server((s.bind_address, s.port), block=False, evt_handlers=handlers)
            self._servers.append(server)
            self.port = server.server_address[1]
            log.info("listening as %s on port %d%s", s.ae_title, self.port,
                     " (port shared with the other receiving processes)" if self.shared_port else "")
        if t.enabled:
            server = self.ae.start_server((s.bind_address, t.port), block=False, evt_handlers=handlers,
                                          ssl_context=tls_contexts.server_context(t))
            self._servers.append(server)
            self.tls_port = server.server_address[1]
            if self.port is None:
                self.port = self.tls_port
            log.info("listening as %s on TLS port %d (client certificate %s)", s.ae_title, self.tls_port,
                     "required" if t.require_client_certificate else "optional")
        if s.allowed_calling_aets:
            log.info("accepting calling AE titles: %s", ", ".join(s.allowed_calling_aets))

    def _start_shared_server(self, address: tuple[str, int], handlers):
        """The plain DICOM port with SO_REUSEPORT, so that several receiving processes accept on it and
        the kernel spreads the associations over them (`listen_processes`)."""
        server = self.ae.make_server(address, evt_handlers=handlers, server_class=_SharedPortServer)
        threading.Thread(target=server.serve_forever, name="AcceptorServer-shared", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: server.shutdown() removes it from there
        return server

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers = []
        if dimse_messages.NamedTemporaryFile == self._new_receive_file:
            dimse_messages.NamedTemporaryFile = self._original_tmpfile

    def _new_receive_file(self, *args, **kwargs) -> _ReceiveFile:
        return _ReceiveFile(self.spool.tmp, self.settings.max_dataset_bytes, self.settings.min_free_disk_mb)

    def _sweep_stale_rx(self, force: bool = False) -> None:
        """Remove receive files left by associations that died mid-transfer (a crash, or a data set that
        was queued but never handled); live ones are written to at least every network timeout."""
        now = time.time()
        if not force and now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for path in self.spool.tmp.glob(f"{RX_PREFIX}*"):
            try:
                if now - path.stat().st_mtime > STALE_RX_SECONDS:
                    path.unlink()
            except OSError:
                pass

    # -- association events ----------------------------------------------------------------
    @property
    def received(self) -> int:
        """Instances stored by this process (C-STORE and STOW-RS)."""
        return self.acceptor.received

    def _audit(self, event: str, peer: str | None, detail: str, sop_uid: str | None = None,
               study_uid: str | None = None) -> None:
        self.acceptor.audit(event, peer, detail, sop_uid=sop_uid, study_uid=study_uid)  # never raises

    @staticmethod
    def _peer(event) -> tuple[str | None, str]:
        requestor = event.assoc.requestor
        calling = (requestor.ae_title or "").strip() or None
        address = getattr(requestor, "address", None) or "?"
        return calling, str(address)

    def _on_rejected(self, event) -> None:
        rq = event.assoc.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip() or None
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        rj = getattr(event.assoc.acceptor, "primitive", None)
        key = tuple(getattr(rj, name, None) for name in ("result", "result_source", "diagnostic"))
        reason = _REJECT_REASONS.get(key)
        if reason is None:  # derive it as pynetdicom does
            if self.ae.require_calling_aet and calling not in [a.strip() for a in self.ae.require_calling_aet]:
                reason = _REJECT_REASONS[(1, 1, 3)]
            elif self.ae.require_called_aet and called != self.settings.ae_title.strip():
                reason = _REJECT_REASONS[(1, 1, 7)]
            else:
                reason = "association rejected"
        address = getattr(event.assoc.requestor, "address", None) or "?"
        log.warning("association from %s (calling %s, called %s) rejected: %s", address, calling, called, reason)
        self._audit("association_rejected", calling, f"{reason}; called AE {called!r}; from {address}")

    def _on_aborted(self, event) -> None:
        calling, address = self._peer(event)
        log.warning("association from %s (%s) aborted", address, calling)
        self._audit("association_aborted", calling, f"association aborted; from {address}")

    def _on_transition(self, event) -> None:
        # Evt19 is the state machine's "unrecognised or invalid PDU": junk on the port, before or during
        # an association. pynetdicom answers it with A-ABORT; here it is recorded.
        # (Sta13, awaiting the close after our A-ABORT, sees the rest of the junk: recorded once.)
        if getattr(event, "fsm_event", None) == "Evt19" and getattr(event, "current_state", None) != "Sta13":
            calling, address = self._peer(event)
            log.warning("invalid PDU from %s (%s): association aborted", address, calling)
            self._audit("invalid_pdu", calling, f"unrecognised or invalid PDU in state "
                                                f"{getattr(event, 'current_state', '?')}; from {address}")

    def _on_conn_close(self, event) -> None:
        # A data set cut off mid-transfer (abort, dropped connection, junk) leaves pynetdicom's receive
        # file open and never handled: remove it.
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if isinstance(partial, _ReceiveFile):
            try:
                partial.close()
                os.unlink(partial.name)
            except OSError:
                pass
            calling, address = self._peer(event)
            self._audit("rejected", calling, f"connection closed in the middle of a data set; from {address}")
        self._sweep_stale_rx()

    # -- backpressure ----------------------------------------------------------------------
    def _resource_problem(self, event) -> str | None:
        s = self.settings
        rx = getattr(event.request, "_dataset_file", None)
        if isinstance(rx, _ReceiveFile) and rx.refused:
            return rx.refused
        if s.max_dataset_bytes and os.path.getsize(event.dataset_path) > s.max_dataset_bytes + 64 * 1024:
            return "data set larger than max_dataset_bytes"  # (receive file not ours: no exact count)
        return self.acceptor.limits_problem()

    # -- C-STORE ---------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title.strip() if event.assoc.requestor.ae_title else None
        tmp_path = event.dataset_path
        try:
            return self._store(event, calling, tmp_path)
        finally:
            try:  # whatever happened, nothing is left in tmp/ (pynetdicom would also try)
                os.unlink(tmp_path)
            except OSError:
                pass

    def _store(self, event, calling: str | None, tmp_path: Path) -> int:
        problem = self._resource_problem(event)
        if problem:
            return self.acceptor.refuse(calling, problem).status
        return self.acceptor.accept(tmp_path, calling, syntax=UID(str(event.context.transfer_syntax)),
                                    expected_sop_uid=str(event.request.AffectedSOPInstanceUID)).status
