"""Retention: remove what the node no longer needs, never what it still does.

- spool files (received images) of studies that are done: screened and reported more than
  ``spool_days`` ago, or skipped (nothing to screen) and quiet for that long. Rows stay, marked
  ``instances.purged_at``. Studies still receiving, queued, or failed keep their files.
- outbox files (result objects) whose every delivery was delivered more than ``outbox_days`` ago,
  except the study's latest SR (``studies.last_report_path``): the next report of a re-opened study
  references it as its predecessor. Rows stay, marked ``deliveries.purged_at``. Files of pending,
  sending or dead deliveries (``osteoscreen resend`` needs those) are kept.
- only when ``rows_days`` > 0: the rows of done studies older than that (their instances, jobs,
  findings, deliveries and the study itself, with any file left), unless a delivery of the study is
  still pending or being sent. Audit events are kept.

Files are removed before their rows are marked, in one transaction per batch, so a crash leaves at
worst a row pointing at a missing file (the next run marks it), never an orphaned file. A file
outside the configured spool/outbox folder is never removed. What was removed is audited as counts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from . import queue
from .models import Acknowledgement, Delivery, DriftCheck, Finding, Instance, Job, Study, utcnow

log = logging.getLogger("osteoscreen.retention")

BATCH = 500


@dataclass
class PurgeReport:
    spool_files: int = 0
    spool_studies: int = 0
    outbox_files: int = 0
    studies: int = 0
    instances: int = 0
    jobs: int = 0
    findings: int = 0
    deliveries: int = 0

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name))


def _done_before(cutoff: datetime):
    """Studies finished before cutoff: reported (and not re-opened) or skipped, and quiet since."""
    return or_(and_(Study.status == "screened", Study.reported_at < cutoff, Study.last_received_at < cutoff),
               and_(Study.status == "skipped", Study.last_received_at < cutoff))


class _Files:
    """Removes files inside one root folder; remembers the day folders it may leave empty."""

    def __init__(self, root: Path | None):
        self.root = Path(root).resolve() if root is not None else None
        self.folders: set[Path] = set()

    def remove(self, path: str | None) -> bool:
        """Remove path (a missing file counts as removed); False when it lies outside the root."""
        if not path:
            return True
        p = Path(path).resolve()
        if self.root is not None and not p.is_relative_to(self.root):
            log.warning("retention: not removing a file outside %s", self.root)
            return False
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        self.folders.add(p.parent)
        return True

    def tidy(self) -> None:
        """Remove day folders (YYYYMMDD, before today) left empty; today's may get files any moment."""
        today = datetime.now(timezone.utc).strftime("%Y%m%d")
        for folder in self.folders:
            if folder.name.isdigit() and len(folder.name) == 8 and folder.name < today:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty, or gone
        self.folders.clear()


def purge_spool(session: Session, days: float, files: _Files, now: datetime, report: PurgeReport) -> None:
    cutoff = now - timedelta(days=days)
    while True:
        rows = session.execute(select(Instance.id, Instance.path, Instance.study_id).join(Study)
                               .where(_done_before(cutoff), Instance.purged_at.is_(None))
                               .order_by(Instance.id).limit(BATCH)).all()
        removed = [(iid, sid) for iid, path, sid in rows if files.remove(path)]
        if removed:
            session.execute(update(Instance).where(Instance.id.in_([i for i, _ in removed]))
                            .values(purged_at=now))
            report.spool_files += len(removed)
            report.spool_studies += len({s for _, s in removed})
        session.commit()
        if len(rows) < BATCH or not removed:
            return


def purge_outbox(session: Session, days: float, files: _Files, now: datetime, report: PurgeReport) -> None:
    cutoff = now - timedelta(days=days)
    other = aliased(Delivery)
    unfinished = exists().where(other.path == Delivery.path,
                                or_(other.state != "delivered", other.delivered_at >= cutoff))
    latest_report = exists().where(Study.last_report_path == Delivery.path)
    while True:
        paths = session.scalars(select(Delivery.path).where(
            Delivery.state == "delivered", Delivery.delivered_at < cutoff, Delivery.purged_at.is_(None),
            ~unfinished, ~latest_report).distinct().limit(BATCH)).all()
        removed = [p for p in paths if files.remove(p)]
        if removed:
            session.execute(update(Delivery).where(Delivery.path.in_(removed)).values(purged_at=now))
            report.outbox_files += len(removed)
        session.commit()
        if len(paths) < BATCH or not removed:
            return


def purge_rows(session: Session, days: float, spool: _Files, outbox: _Files, now: datetime,
               report: PurgeReport) -> None:
    cutoff = now - timedelta(days=days)
    in_flight = exists().where(Delivery.study_id == Study.id, Delivery.state.in_(("pending", "sending")))
    while True:
        ids = session.scalars(select(Study.id).where(_done_before(cutoff), ~in_flight)
                              .order_by(Study.id).limit(BATCH)).all()
        if not ids:
            return
        kept = set()
        for sid, path in session.execute(select(Instance.study_id, Instance.path).where(
                Instance.study_id.in_(ids), Instance.purged_at.is_(None))).all():
            if spool.remove(path):
                report.spool_files += 1
            else:
                kept.add(sid)
        for sid, path in session.execute(select(Delivery.study_id, Delivery.path).where(
                Delivery.study_id.in_(ids), Delivery.purged_at.is_(None)).distinct()).all():
            if outbox.remove(path):
                report.outbox_files += 1
            else:
                kept.add(sid)
        ids = [i for i in ids if i not in kept]  # a file we may not remove keeps its rows
        if ids:
            report.deliveries += session.execute(delete(Delivery).where(Delivery.study_id.in_(ids))).rowcount
            report.findings += session.execute(delete(Finding).where(Finding.study_id.in_(ids))).rowcount
            report.jobs += session.execute(delete(Job).where(Job.study_id.in_(ids))).rowcount
            session.execute(delete(Acknowledgement).where(Acknowledgement.study_id.in_(ids)))
            report.instances += session.execute(delete(Instance).where(Instance.study_id.in_(ids))).rowcount
            report.studies += session.execute(delete(Study).where(Study.id.in_(ids))).rowcount
        session.commit()
        if not ids:
            return


def purge_drift_checks(session: Session, cutoff: datetime) -> int:
    """The drift watch's history older than cutoff; each group's latest check (its status) stays."""
    latest = select(func.max(DriftCheck.id)).group_by(DriftCheck.scanner)
    n = session.execute(delete(DriftCheck).where(DriftCheck.checked_at < cutoff, DriftCheck.id.not_in(latest))).rowcount
    session.commit()
    return n


def purge(session: Session, *, spool_days: float, outbox_days: float, rows_days: float = 0,
          spool_root: Path | None = None, outbox_root: Path | None = None,
          now: datetime | None = None) -> PurgeReport:
    """One retention pass (0 days: that kind is kept forever). Returns what was removed."""
    now = now or utcnow()
    report = PurgeReport()
    spool, outbox = _Files(spool_root), _Files(outbox_root)
    if rows_days > 0:
        purge_rows(session, rows_days, spool, outbox, now, report)
        purge_drift_checks(session, now - timedelta(days=rows_days))
    if spool_days > 0:
        purge_spool(session, spool_days, spool, now, report)
    if outbox_days > 0:
        purge_outbox(session, outbox_days, outbox, now, report)
    spool.tidy()
    outbox.tidy()
    if report:
        queue.audit(session, "retention_purge", detail=report.summary())
        session.commit()
        log.info("retention removed %s", report.summary())
    return report
