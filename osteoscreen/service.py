"""Compose roles into one process: `serve` runs them all; `listen`, `work`, `dispatch` one each.

Roles share nothing in memory: they meet in the database and the spool, so the same code runs as
one process on SQLite or as many processes on several hosts with PostgreSQL.
"""
from __future__ import annotations

import logging
import signal
import threading

from .config import Settings
from .node.listener import Listener
from .scheduler import build_scheduler, wake
from . import __version__
from .store.db import Database
from .store.heartbeat import INTERVAL_SECONDS, Heartbeat

log = logging.getLogger("osteoscreen")

ROLES = ("listen", "work", "dispatch")  # `serve` runs these, plus `web` when web.enabled


class Node:
    """Running roles; start() returns at once, stop() shuts them down in reverse order."""

    def __init__(self, settings: Settings, roles: tuple[str, ...] = ROLES, db: Database | None = None,
                 receive_only: bool = False):
        """receive_only: a child receiving process of listen_processes (no timers, no children)."""
        self.settings = settings
        self.roles = roles
        self.receive_only = receive_only
        self.receivers = None
        self.db = db or Database(settings.db_url)
        self.listener = Listener(settings, self.db) if "listen" in roles else None
        self.stow = None  # the STOW-RS receiver beside the DICOM port (dicomweb.enabled; not in receive-only children)
        if self.listener and settings.dicomweb.enabled and not receive_only:
            from .node.stow_server import StowServer  # only processes that receive over HTTP import waitress
            self.stow = StowServer(settings, self.listener.acceptor)
        self.worker = None
        if "work" in roles:
            from .worker import Worker  # torch and the model: only in processes that screen (~300 MB)
            self.worker = Worker(settings, self.db)
        # Roles in one process hand work on at once (a study settles → the worker looks; results are
        # written → the dispatcher sends) instead of waiting for their next poll; across processes the
        # polls (poll_seconds, dispatch_poll_seconds) do it.
        self.scheduler = build_scheduler(settings, self.db, settle="listen" in roles and not receive_only,
                                         dispatch="dispatch" in roles, retention=False if receive_only else None,
                                         on_jobs_queued=self.worker.notify if self.worker else None)
        if self.worker and "dispatch" in roles:
            self.worker.on_results = lambda: wake(self.scheduler, "dispatch")
        self.web = None
        if "web" in roles:
            from .web.server import WebServer  # only processes that serve the dashboard import Flask
            try:
                self.web = WebServer(settings, self.db)
            except OSError as exc:
                if roles == ("web",):
                    raise
                # `serve`: the DICOM roles matter more than the dashboard; say so and go on without it
                log.error("dashboard not started: cannot listen on %s:%d (%s)", settings.web.bind_address,
                          settings.web.port, exc)
        # what really runs: a dashboard that could not start is not reported alive
        self.roles = tuple(r for r in roles if r != "web" or self.web is not None)
        self.heartbeat = Heartbeat(self.roles, __version__)
        self.scheduler.add_job(self._beat, "interval", seconds=INTERVAL_SECONDS, id="heartbeat")

    def _beat(self) -> None:
        try:
            with self.db.session() as session:
                self.heartbeat.beat(session)
        except Exception:  # the database may be briefly away; the roles have their own retries
            log.warning("heartbeat not written", exc_info=True)

    def start(self) -> "Node":
        if self.worker:
            self.worker.start()
        if self.listener:
            self.listener.start()
            if self.settings.listen_processes > 1 and not self.receive_only and self.listener.port:
                from .node.receivers import ReceiverProcesses
                self.receivers = ReceiverProcesses(self.settings, self.listener.port)
                self.receivers.start()
        if self.stow:
            self.stow.start()
        if self.web:
            self.web.start()
        self._beat()
        self.scheduler.start()
        log.info("roles running: %s; database %s", ", ".join(self.roles), self.db.engine.url.render_as_string(hide_password=True))
        return self

    def stop(self) -> None:
        if self.web:
            self.web.stop()
        if self.stow:
            self.stow.stop()
        if self.receivers:
            self.receivers.stop()
        if self.listener:
            self.listener.stop()
        self.scheduler.shutdown(wait=True)
        if self.worker:
            self.worker.stop()
        try:
            with self.db.session() as session:
                self.heartbeat.remove(session)
        except Exception:
            log.warning("heartbeat row not removed", exc_info=True)
        self.db.dispose()


def run_until_signal(node: Node) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    # Wait with a timeout: the kernel may deliver SIGTERM to any thread (listener, web, worker), and
    # Python runs the handler only when the main thread next runs; a wait without a timeout could
    # then sleep through it.
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    node.stop()
