"""Periodic jobs (APScheduler): settle quiet studies into jobs, dispatch due deliveries, reap leases,
retention (old spool and outbox files, optionally old rows), and the drift watch's checks.

Timers live in the database (last_received_at, next_attempt_at, lease_expires_at, the destination
circuits' retry_at), not in memory, so a restart loses no pending work: the next tick simply finds
it due. Retention runs where the settle timer runs (the listen role: `serve`, `listen`): it needs
the storage folder, and its deletes are idempotent, so two listeners running it do no harm.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from .config import Settings
from .dispatch.outbox import Dispatcher
from .monitor import watch
from .store import queue
from .store.db import Database
from .store.models import DriftCheck, utcnow
from .store.retention import purge

log = logging.getLogger("osteoscreen.scheduler")


def run_retention(settings: Settings, db: Database):
    """One retention pass with the configured ages; returns the PurgeReport."""
    r = settings.retention
    with db.session() as session:
        return purge(session, spool_days=r.spool_days, outbox_days=r.outbox_days, rows_days=r.rows_days,
                     spool_root=settings.spool_dir, outbox_root=settings.outbox_dir)


SETTLE_MARGIN = timedelta(milliseconds=5)  # past the due time, so that `last_received_at <= cutoff` holds


def settle_interval(settle_seconds: float) -> float:
    """Seconds between regular settle ticks: a tenth of the settle time, between 0.1 and 1."""
    return min(1.0, max(0.1, settle_seconds / 10))


def build_scheduler(settings: Settings, db: Database, *, settle: bool = True, dispatch: bool = True,
                    retention: bool | None = None, on_jobs_queued=None) -> BackgroundScheduler:
    """retention: run the retention job (default: where settle runs, i.e. the listen role).
    on_jobs_queued: called when the settle timer queued jobs (serve: wakes the worker at once)."""
    sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
    if settle:
        interval = settle_interval(settings.settle_seconds)

        def settle_tick() -> None:
            # The regular tick (at most settle_seconds / 10 apart) sees every new study before it is
            # due. A study falling due before the next tick is waited for here, so that it settles
            # within milliseconds of its time rather than up to a tick late (docs/BENCHMARKS.md). The
            # wait stays inside this run, shorter than the interval: the job never touches the
            # scheduler, which shutdown() holds locked while it waits for running jobs.
            deadline = time.monotonic() + 0.8 * interval  # done before the next regular tick is due
            while True:
                with db.session() as session:
                    created = queue.settle_studies(session, settings.settle_seconds)
                    queue.mark_orphaned_jobs_failed(session, settings.job_max_attempts)
                    due = queue.next_settle_due(session, settings.settle_seconds)
                if created:
                    log.info("queued %d job(s)", len(created))
                    if on_jobs_queued is not None:
                        on_jobs_queued()
                if due is None:
                    return
                wait = (due.replace(tzinfo=timezone.utc) - datetime.now(timezone.utc)).total_seconds()
                wait += SETTLE_MARGIN.total_seconds()
                if wait <= 0 or time.monotonic() + wait >= deadline:
                    return  # the next regular tick will see it
                time.sleep(wait)
        sched.add_job(settle_tick, "interval", seconds=interval, id="settle")
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
    if settle if retention is None else retention:
        minutes = settings.drift.check_minutes

        def drift_tick() -> None:
            try:
                run_drift_check(settings, db, skip_within=timedelta(minutes=minutes / 2))
            except Exception:  # logged; the next tick tries again
                log.exception("drift check failed")
        sched.add_job(drift_tick, "interval", minutes=minutes, id="drift",
                      next_run_time=datetime.now(timezone.utc) + timedelta(seconds=30))
    return sched


def run_drift_check(settings: Settings, db: Database, skip_within: timedelta | None = None) -> list:
    """Check every scanner group (monitor.watch); with skip_within, not if another listener just did."""
    with db.session() as session:
        if skip_within is not None:
            last = session.scalar(select(func.max(DriftCheck.checked_at)))
            if last is not None and utcnow() - last < skip_within:
                return []
        checks = watch.check_all(session, settings.drift, list(settings.calibrations))
    for c in checks:
        if c.status in ("drift", "silent"):  # group keys and signal names only: no PHI
            log.warning("scanner group %s: %s %s", c.scanner, c.status, ", ".join(c.signals or []))
    return checks


def wake(sched: BackgroundScheduler, job_id: str) -> None:
    """Run a periodic job now instead of at its next tick (a run in progress is not doubled)."""
    try:
        sched.modify_job(job_id, next_run_time=datetime.now(timezone.utc))
    except Exception:  # noqa: BLE001 - no such job, or the scheduler is shutting down: the tick will do
        log.debug("could not wake %s", job_id, exc_info=True)
