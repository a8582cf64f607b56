"""The STOW-RS receiver's HTTP server: waitress in a background thread of the listen role.

waitress (already the dashboard's server) parses HTTP, de-chunks `Transfer-Encoding: chunked`
bodies and calls the application only once a request's body has arrived whole. It holds that body
in memory up to `inbuf_overflow` (1 MiB here) and beyond it in an anonymous temporary file in the
system's temporary folder (TMPDIR), never in memory whole; the application then reads it in
chunks (`stow.StowApp`). `max_request_body_size` is `dicomweb.max_request_bytes`: a request that
announces a larger body is answered 413 before any of it is read, a chunked one as soon as it
passes the limit; such answers, which the application never sees, are audited by the error task
below. waitress reads a body before the application checks the credentials, so CONNECTION_LIMIT
bounds what unauthenticated clients can make it hold. waitress has no TLS: put a TLS reverse proxy
in front (docs/DEPLOYMENT.md).
"""
from __future__ import annotations

import logging
import threading

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from ..config import Settings
from .accept import Acceptor
from .stow import StowApp
from .stow_auth import Credentials

log = logging.getLogger("osteoscreen.dicomweb")

INBUF_OVERFLOW = 1 << 20  # request bytes waitress keeps in memory before it spills to a temporary file
# connections served at once (more wait in the listen backlog): each may hold up to max_request_bytes in
# its temporary file before its credentials are checked, so this bounds that disk use
CONNECTION_LIMIT = 16
RECV_BYTES = 256 * 1024  # one socket read (waitress's default, 8 KiB, costs a loop turn per 8 KiB)


class _AuditedErrorTask(ErrorTask):
    def execute(self):
        super().execute()
        error = self.request.error
        audit = getattr(self.channel.server, "stow_audit", None)
        if audit is not None:
            address = str(self.channel.addr[0] if isinstance(self.channel.addr, tuple) else self.channel.addr)
            audit(address, int(getattr(error, "code", 400)), str(getattr(error, "reason", "bad request")))


class _AuditedChannel(HTTPChannel):
    error_task_class = _AuditedErrorTask


class StowServer:
    def __init__(self, settings: Settings, acceptor: Acceptor):
        d = settings.dicomweb
        self.settings = settings
        self.app = StowApp(settings, acceptor, Credentials(settings))
        self.server = create_server(self.app, host=d.bind_address, port=d.port, threads=d.threads,
                                    ident="osteoscreen", max_request_body_size=d.max_request_bytes + 1,
                                    inbuf_overflow=INBUF_OVERFLOW, recv_bytes=RECV_BYTES,
                                    connection_limit=CONNECTION_LIMIT)
        self.server.channel_class = _AuditedChannel
        self.server.stow_audit = self.app.audit_transport_error
        self.thread = threading.Thread(target=self._run, name="stow-rs", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    @property
    def url(self) -> str:
        """The STOW-RS base URL (what a sender is configured with)."""
        return f"http://{self.settings.dicomweb.bind_address}:{self.port}{self.settings.dicomweb.base_path}"

    def _run(self) -> None:
        try:
            self.server.run()
        except Exception:  # the loop ends with an error when closed from another thread; nothing to do
            log.debug("STOW-RS server loop ended", exc_info=True)

    def start(self) -> "StowServer":
        self.thread.start()
        log.info("STOW-RS receiver on %s/studies", self.url)
        return self

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)
