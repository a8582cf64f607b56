"""Periodic jobs (APScheduler): settle quiet studies into jobs, dispatch due deliveries, reap leases,
and retention (old spool and outbox files, optionally old rows).

Timers live in the database (last_received_at, next_attempt_at, lease_expires_at, the destination
circuits' retry_at), not in memory, so a restart loses no pending work: the next tick simply finds
it due. Retention runs where the settle timer runs (the listen role: `serve`, `listen`): it needs
the storage folder, and its deletes are idempotent, so two listeners running it do no harm.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from .config import Settings
from .dispatch.outbox import Dispatcher
from .store import queue
from .store.db import Database
from .store.retention import purge

log = logging.getLogger("osteoscreen.scheduler")


def run_retention(settings: Settings, db: Database):
    """One retention pass with the configured ages; returns the PurgeReport."""
    r = settings.retention
    with db.session() as session:
        return purge(session, spool_days=r.spool_days, outbox_days=r.outbox_days, rows_days=r.rows_days,
                     spool_root=settings.spool_dir, outbox_root=settings.outbox_dir)


def build_scheduler(settings: Settings, db: Database, *, settle: bool = True, dispatch: bool = True,
                    retention: bool | None = None, on_jobs_queued=None) -> BackgroundScheduler:
    """retention: run the retention job (default: where settle runs, i.e. the listen role).
    on_jobs_queued: called when the settle timer queued jobs (serve: wakes the worker at once)."""
    sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
    if settle:
        def settle_tick() -> None:
            with db.session() as session:
                created = queue.settle_studies(session, settings.settle_seconds)
                queue.mark_orphaned_jobs_failed(session, settings.job_max_attempts)
                due = queue.next_settle_due(session, settings.settle_seconds)
            if created:
                log.info("queued %d job(s)", len(created))
                if on_jobs_queued is not None:
                    on_jobs_queued()
            if due is not None:
                _run_at(sched, "settle", due.replace(tzinfo=timezone.utc) + SETTLE_MARGIN)
        # The regular tick (at most settle_seconds / 10 apart) sees every new study before it is due,
        # and then the next tick is set to the moment the earliest one is due: a study settles within
        # milliseconds of its time, not up to a tick late (docs/BENCHMARKS.md).
        sched.add_job(settle_tick, "interval", seconds=min(1.0, max(0.1, settings.settle_seconds / 10)), id="settle")
    if dispatch:
        dispatcher = Dispatcher(settings, db)
        sched.add_job(dispatcher.run_once, "interval", seconds=settings.dispatch_poll_seconds, id="dispatch")
    r = settings.retention
    if (settle if retention is None else retention) and (r.spool_days or r.outbox_days or r.rows_days):
        def retention_tick() -> None:
            try:
                run_retention(settings, db)
            except Exception:  # logged; the next tick tries again
                log.exception("retention failed")
        sched.add_job(retention_tick, "interval", minutes=r.interval_minutes, id="retention",
                      next_run_time=datetime.now(timezone.utc) + timedelta(seconds=60))
    return sched


SETTLE_MARGIN = timedelta(milliseconds=5)  # past the due time, so that `last_received_at <= cutoff` holds


def _run_at(sched: BackgroundScheduler, job_id: str, when: datetime) -> None:
    """Bring a periodic job's next run forward to `when` (UTC), if that is in the future and earlier
    than the run already planned; the interval goes on from there."""
    try:
        job = sched.get_job(job_id)
        if job is not None and when > datetime.now(timezone.utc) and (job.next_run_time is None
                                                                       or when < job.next_run_time):
            sched.modify_job(job_id, next_run_time=when)
    except Exception:  # noqa: BLE001 - the scheduler is shutting down: the regular tick will do
        log.debug("could not move %s", job_id, exc_info=True)


def wake(sched: BackgroundScheduler, job_id: str) -> None:
    """Run a periodic job now instead of at its next tick (a run in progress is not doubled)."""
    try:
        sched.modify_job(job_id, next_run_time=datetime.now(timezone.utc))
    except Exception:  # noqa: BLE001 - no such job, or the scheduler is shutting down: the tick will do
        log.debug("could not wake %s", job_id, exc_info=True)
