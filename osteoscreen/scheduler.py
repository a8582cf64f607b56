"""Periodic jobs (APScheduler): settle quiet studies into jobs, dispatch due deliveries, reap leases.

Timers live in the database (last_received_at, next_attempt_at, lease_expires_at), not in memory,
so a restart loses no pending work: the next tick simply finds it due.
"""
from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler

from .config import Settings
from .dispatch.outbox import Dispatcher
from .store import queue
from .store.db import Database

log = logging.getLogger("osteoscreen.scheduler")


def build_scheduler(settings: Settings, db: Database, *, settle: bool = True, dispatch: bool = True) -> BackgroundScheduler:
    sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
    if settle:
        def settle_tick() -> None:
            with db.session() as session:
                created = queue.settle_studies(session, settings.settle_seconds)
                queue.mark_orphaned_jobs_failed(session, settings.job_max_attempts)
            if created:
                log.info("queued %d job(s)", len(created))
        sched.add_job(settle_tick, "interval", seconds=min(1.0, max(0.2, settings.settle_seconds / 4)), id="settle")
    if dispatch:
        dispatcher = Dispatcher(settings, db)
        sched.add_job(dispatcher.run_once, "interval", seconds=1.0, id="dispatch")
    return sched
