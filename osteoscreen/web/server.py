"""The `web` role: the dashboard's WSGI app served by waitress in a background thread.

waitress is a production WSGI server in pure Python (threads, no extra process); behind a TLS
reverse proxy for anything beyond localhost (docs/DEPLOYMENT.md).
"""
from __future__ import annotations

import logging
import threading

from waitress.server import create_server

from ..config import Settings
from ..store.db import Database
from .app import create_app

log = logging.getLogger("osteoscreen.web")


class WebServer:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.app = create_app(settings, db)
        w = settings.web
        # remote_addr stays the direct peer: web.trusted_proxies is checked against the proxy itself
        self.server = create_server(self.app, host=w.bind_address, port=w.port, threads=4, ident="osteoscreen")
        self.thread = threading.Thread(target=self._run, name="web", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def _run(self) -> None:
        try:
            self.server.run()
        except Exception:  # the loop ends with an error when closed from another thread; nothing to do
            log.debug("web server loop ended", exc_info=True)

    def start(self) -> None:
        self.thread.start()
        log.info("dashboard on http://%s:%d/ (metrics /metrics, health /healthz)",
                 self.settings.web.bind_address, self.port)

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)
