"""Which screenings, and what of one: the list of studies with their latest results under the
filters (`list_screenings`, a `Page`), one study's detail (`study_detail`: its images, every report's
findings, jobs, deliveries and acknowledgements) and the CSV export's flat rows (`export_rows`,
`EXPORT_COLUMNS`).
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...findings import SITES
from ...store.models import Acknowledgement, Delivery, Finding, Instance, Job, Study
from .common import (NOT_ASSESSABLE, Filters, Screening, _delivery_dict, _filtered, _jsonable, _screenings,
                     _study_worst, find_study)


@dataclass
class Page:
    items: list[Screening]
    total: int
    limit: int
    offset: int

    def as_dict(self) -> dict:
        return {"total": self.total, "limit": self.limit, "offset": self.offset,
                "items": [s.as_dict() for s in self.items]}


def list_screenings(session: Session, filters: Filters | None = None, *, positive_categories: list[str],
                    limit: int = 100, offset: int = 0, oldest_first: bool = False) -> Page:
    """Screenings matching `filters`, newest received first (limit 0: all)."""
    f = (filters or Filters()).validate()
    q = _filtered(f, positive_categories)
    total = session.scalar(select(func.count()).select_from(q.subquery()))
    order = Study.first_received_at.asc() if oldest_first else Study.first_received_at.desc()
    q = q.order_by(order, Study.id.desc() if not oldest_first else Study.id.asc()).offset(offset)
    if limit:
        q = q.limit(limit)
    rows = session.execute(q).all()
    return Page(_screenings(session, [(r[0], r[1]) for r in rows], positive_categories), total, limit, offset)


# -- one study --------------------------------------------------------------------------------------

@dataclass
class StudyDetail:
    screening: Screening
    instances: list[dict]
    findings_history: list[dict]  # every report's findings, newest job first
    jobs: list[dict]
    deliveries: list[dict]
    acknowledgements: list[dict]

    def as_dict(self) -> dict:
        return _jsonable({"screening": self.screening.as_dict(), "instances": self.instances,
                          "findings_history": self.findings_history, "jobs": self.jobs,
                          "deliveries": self.deliveries, "acknowledgements": self.acknowledgements})


def study_detail(session: Session, key: str, *, positive_categories: list[str]) -> StudyDetail:
    study = find_study(session, key)
    worst = _study_worst(session, study.id)
    screening = _screenings(session, [(study.id, worst)], positive_categories)[0]
    instances = [dict(sop_instance_uid=i.sop_instance_uid, series_uid=i.series_uid, modality=i.modality,
                      region=i.region, view=i.view, eligible=i.eligible, skip_reason=i.skip_reason,
                      transfer_syntax_uid=i.transfer_syntax_uid, received_at=i.received_at,
                      purged=i.purged_at is not None)
                 for i in session.scalars(select(Instance).where(Instance.study_id == study.id).order_by(Instance.id))]
    history = [dict(job_id=f.job_id, site=f.site, assessable=f.assessable, category=f.category, t_score=f.t_score,
                    t_score_low=f.t_score_low, t_score_high=f.t_score_high, interval_level=f.interval_level,
                    calibration_id=f.calibration_id, scanner=f.scanner,
                    reason=f.reason, sop_instance_uid=f.sop_instance_uid, model_version=f.model_version,
                    created_at=f.created_at)
               for f in session.scalars(select(Finding).where(Finding.study_id == study.id)
                                        .order_by(Finding.job_id.desc(), Finding.id))]
    jobs = [dict(id=j.id, state=j.state, attempts=j.attempts, error=j.error, created_at=j.created_at,
                 finished_at=j.finished_at)
            for j in session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc()))]
    deliveries = [_delivery_dict(d) for d in session.scalars(
        select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id))]
    acks = [dict(id=a.id, by=a.by, at=a.at, note=a.note, report_uid=a.report_uid, revoked_at=a.revoked_at,
                 revoked_by=a.revoked_by)
            for a in session.scalars(select(Acknowledgement).where(Acknowledgement.study_id == study.id)
                                     .order_by(Acknowledgement.id))]
    return StudyDetail(screening, instances, history, jobs, deliveries, acks)


# -- CSV export ------------------------------------------------------------------------------------

EXPORT_COLUMNS = (
    ["study_uid", "accession_number", "patient_id", "patient_name", "study_date", "calling_ae", "modalities",
     "status", "received_at", "reported_at", "result", "lowest_t_score", "positive", "acknowledged",
     "model_version", "skip_reason"]
    + [f"{site}_{what}" for site in SITES for what in ("category", "t_score", "t_score_low", "t_score_high",
                                                         "calibration", "reason")])


def export_rows(session: Session, filters: Filters | None = None, *, positive_categories: list[str],
                batch: int = 500):
    """One flat dict per screening (EXPORT_COLUMNS), streamed page by page, oldest first."""
    offset = 0
    while True:
        page = list_screenings(session, filters, positive_categories=positive_categories, limit=batch,
                               offset=offset, oldest_first=True)
        for s in page.items:
            row = {k: v for k, v in s.as_dict().items() if k in EXPORT_COLUMNS}
            row["modalities"] = " ".join(s.modalities)
            for site in SITES:
                r = s.sites.get(site)
                row[f"{site}_category"] = (r.category if r and r.assessable else
                                           NOT_ASSESSABLE if r else None)
                row[f"{site}_t_score"] = None if r is None or r.t_score is None else round(r.t_score, 2)
                row[f"{site}_t_score_low"] = None if r is None or r.t_score_low is None else round(r.t_score_low, 1)
                row[f"{site}_t_score_high"] = None if r is None or r.t_score_high is None else round(r.t_score_high, 1)
                row[f"{site}_calibration"] = r.calibration_id if r else None
                row[f"{site}_reason"] = r.reason if r else None
            if row.get("lowest_t_score") is not None:
                row["lowest_t_score"] = round(row["lowest_t_score"], 2)
            yield row
        offset += batch
        if len(page.items) < batch:
            return
