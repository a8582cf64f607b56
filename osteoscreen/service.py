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
from .scheduler import build_scheduler
from .store.db import Database
from .worker import Worker

log = logging.getLogger("osteoscreen")

ROLES = ("listen", "work", "dispatch")


class Node:
    """Running roles; start() returns at once, stop() shuts them down in reverse order."""

    def __init__(self, settings: Settings, roles: tuple[str, ...] = ROLES, db: Database | None = None):
        self.settings = settings
        self.roles = roles
        self.db = db or Database(settings.db_url)
        self.listener = Listener(settings, self.db) if "listen" in roles else None
        self.worker = Worker(settings, self.db) if "work" in roles else None
        self.scheduler = build_scheduler(settings, self.db, settle="listen" in roles, dispatch="dispatch" in roles)

    def start(self) -> "Node":
        if self.worker:
            self.worker.start()
        if self.listener:
            self.listener.start()
        self.scheduler.start()
        log.info("roles running: %s; database %s", ", ".join(self.roles), self.db.engine.url.render_as_string(hide_password=True))
        return self

    def stop(self) -> None:
        if self.listener:
            self.listener.stop()
        self.scheduler.shutdown(wait=True)
        if self.worker:
            self.worker.stop()
        self.db.dispose()


def run_until_signal(node: Node) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    stop.wait()
    log.info("stopping")
    node.stop()
