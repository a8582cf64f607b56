"""What every question shares: a *screening* is a study with its latest findings (those of its newest
job), its *result* the worst site, positive by `positive_categories`, acknowledged for its current
report. Here are the result and status names, the filters, the Screening and SiteResult rows, the SQL
for each study's latest findings and worst severity (`_filtered`: the study ids matching the filters),
`_screenings` (Screening rows for a page of studies), one study's lookup (`find_study`) and a
delivery as a dict. The question modules import from here, never the other way round.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from ...findings import CLASSES, SITES
from ...store.models import Acknowledgement, Delivery, Finding, Instance, Study

NOT_ASSESSABLE = "not_assessable"
RESULTS = (*CLASSES, NOT_ASSESSABLE)
STATUSES = ("receiving", "queued", "screened", "skipped", "failed")


class NotFound(LookupError):
    """No study (or delivery) with that identifier."""


@dataclass
class Filters:
    """Which screenings: every field narrows; None leaves it open."""

    since: date | None = None  # first received on or after (UTC)
    until: date | None = None  # first received on or before (UTC)
    result: str | None = None  # normal | osteopenia | osteoporosis | not_assessable (of `site`, if given)
    site: str | None = None  # left_hip | right_hip | lumbar_spine: result and assessable look at this site
    assessable: bool | None = None  # some site (or `site`) assessable / none assessable
    positive: bool | None = None
    acknowledged: bool | None = None
    status: str | None = None  # receiving | queued | screened | skipped | failed
    modality: str | None = None  # an instance of this modality (CR, DX)
    calling_ae: str | None = None
    model_version: str | None = None
    patient: str | None = None  # Patient ID or Accession Number, exactly

    def validate(self) -> "Filters":
        if self.result is not None and self.result not in RESULTS:
            raise ValueError(f"result {self.result!r}: expected one of {', '.join(RESULTS)}")
        if self.site is not None and self.site not in SITES:
            raise ValueError(f"site {self.site!r}: expected one of {', '.join(SITES)}")
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: expected one of {', '.join(STATUSES)}")
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"from {self.since} is after to {self.until}")
        for name, day in (("from", self.since), ("to", self.until)):
            if day is not None and not date(1900, 1, 1) <= day <= date(9000, 1, 1):
                raise ValueError(f"{name} {day} is out of range")
        return self


@dataclass
class SiteResult:
    site: str
    assessable: bool
    category: str | None
    t_score: float | None
    reason: str | None
    probabilities: dict | None = None
    sop_instance_uid: str | None = None
    t_score_low: float | None = None  # prediction interval at interval_level
    t_score_high: float | None = None
    interval_level: float | None = None
    calibration_id: str | None = None  # the site calibration behind the estimate (None: the model's own)


@dataclass
class Screening:
    """One row of the list: a study and its latest result."""

    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    calling_ae: str | None
    status: str
    received_at: datetime
    reported_at: datetime | None
    result: str | None  # None: not screened (yet)
    lowest_t_score: float | None
    positive: bool
    acknowledged: bool
    model_version: str | None
    sites: dict[str, SiteResult] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    skip_reason: str | None = None  # skipped studies: why no image was a screening candidate

    def as_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds") + "Z"
    if isinstance(value, date):
        return value.isoformat()
    return value


# -- the latest findings of each study, and its result, as SQL -------------------------------------

def _latest_job():
    """(study_id, job_id) of each study's newest findings."""
    return (select(Finding.study_id.label("study_id"), func.max(Finding.job_id).label("job_id"))
            .group_by(Finding.study_id).subquery("latest_job"))


def _chunks(ids: list[int], size: int = 1000):
    """IN lists in pieces: PostgreSQL takes at most 65,535 bound parameters per statement."""
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _newest_job_of(study_id_column):
    """The newest job with findings of the study in `study_id_column` (a correlated scalar subquery:
    for a page of studies this reads only their findings, not the whole table)."""
    newer = aliased(Finding)
    return select(func.max(newer.job_id)).where(newer.study_id == study_id_column).scalar_subquery()


def _severity():
    """-1 not assessable, 0 normal, 1 osteopenia, 2 osteoporosis (findings.severity, in SQL)."""
    return case(*[(and_(Finding.assessable.is_(True), Finding.category == c), i) for i, c in enumerate(CLASSES)],
                else_=-1)


def _result_of(severity: int | None) -> str | None:
    if severity is None:
        return None
    return NOT_ASSESSABLE if severity < 0 else CLASSES[severity]


def _worst_subquery(site: str | None):
    """(study_id, worst severity) over the latest findings (of `site` only, if given)."""
    latest = _latest_job()
    q = (select(Finding.study_id.label("study_id"), func.max(_severity()).label("worst"))
         .join(latest, and_(latest.c.study_id == Finding.study_id, latest.c.job_id == Finding.job_id)))
    if site is not None:
        q = q.where(Finding.site == site)
    return q.group_by(Finding.study_id).subquery("worst_site" if site else "worst")


def _acknowledged():
    """Acknowledged: a standing acknowledgement of the study's current report. A new report (a late
    image re-reported the study) needs a new look, so it returns to the worklist if still positive."""
    return exists().where(Acknowledgement.study_id == Study.id, Acknowledgement.revoked_at.is_(None),
                          Acknowledgement.report_uid.is_not_distinct_from(Study.last_report_uid))


def _positive_clause(worst, positive_categories: list[str]):
    return worst.c.worst.in_([CLASSES.index(c) for c in positive_categories])


def _filtered(f: Filters, positive_categories: list[str]):
    """SELECT Study.id, worst severity (of all sites) WHERE the filters hold."""
    worst_all = _worst_subquery(None)
    worst_site = _worst_subquery(f.site) if f.site else worst_all
    q = (select(Study.id, worst_all.c.worst).outerjoin(worst_all, worst_all.c.study_id == Study.id))
    if worst_site is not worst_all:
        q = q.outerjoin(worst_site, worst_site.c.study_id == Study.id)
    if f.since:
        q = q.where(Study.first_received_at >= datetime.combine(f.since, datetime.min.time()))
    if f.until:
        q = q.where(Study.first_received_at < datetime.combine(f.until + timedelta(days=1), datetime.min.time()))
    if f.result is not None:
        q = q.where(worst_site.c.worst == (-1 if f.result == NOT_ASSESSABLE else CLASSES.index(f.result)))
    if f.assessable is not None:
        q = q.where(worst_site.c.worst >= 0 if f.assessable else worst_site.c.worst == -1)
    elif f.site:
        q = q.where(worst_site.c.worst.is_not(None))  # the site was looked at
    if f.positive is not None:
        clause = _positive_clause(worst_all, positive_categories)
        q = q.where(clause if f.positive else or_(~clause, worst_all.c.worst.is_(None)))
    if f.acknowledged is not None:
        q = q.where(_acknowledged() if f.acknowledged else ~_acknowledged())
    if f.status:
        q = q.where(Study.status == f.status)
    if f.calling_ae:
        q = q.where(Study.calling_ae == f.calling_ae)
    if f.patient:
        q = q.where(or_(Study.patient_id == f.patient, Study.accession_number == f.patient))
    if f.modality:
        q = q.where(exists().where(Instance.study_id == Study.id, Instance.modality == f.modality.upper()))
    if f.model_version:
        newer = aliased(Finding)
        newest_job = select(func.max(newer.job_id)).where(newer.study_id == Study.id).scalar_subquery()
        q = q.where(exists().where(Finding.study_id == Study.id, Finding.model_version == f.model_version,
                                   Finding.job_id == newest_job))
    return q


def _screenings(session: Session, rows: list[tuple[int, int | None]], positive_categories: list[str]) -> list[Screening]:
    """Build Screening rows for (study id, worst severity) pairs, with a few queries for the whole page."""
    ids = [r[0] for r in rows]
    if not ids:
        return []
    studies = {s.id: s for chunk in _chunks(ids) for s in session.scalars(select(Study).where(Study.id.in_(chunk)))}
    sites: dict[int, dict[str, SiteResult]] = defaultdict(dict)
    versions: dict[int, str] = {}
    for fd in (fd for chunk in _chunks(ids) for fd in session.scalars(
            select(Finding).where(Finding.study_id.in_(chunk), Finding.job_id == _newest_job_of(Finding.study_id))
            .order_by(Finding.id))):
        versions[fd.study_id] = fd.model_version
        # lumbar AP + lateral: one fused estimate on both findings; keep the assessable one first
        prior = sites[fd.study_id].get(fd.site)
        if prior is None or (not prior.assessable and fd.assessable):
            sites[fd.study_id][fd.site] = SiteResult(fd.site, fd.assessable, fd.category, fd.t_score, fd.reason,
                                                     fd.probabilities, fd.sop_instance_uid, fd.t_score_low,
                                                     fd.t_score_high, fd.interval_level, fd.calibration_id)
    modalities: dict[int, set] = defaultdict(set)
    skip_reasons: dict[int, str] = {}
    for sid, modality, eligible, reason in (row for chunk in _chunks(ids) for row in session.execute(
            select(Instance.study_id, Instance.modality, Instance.eligible, Instance.skip_reason)
            .where(Instance.study_id.in_(chunk)))):
        if modality:
            modalities[sid].add(modality)
        if not eligible and reason:
            skip_reasons.setdefault(sid, reason)
    acked = set()
    for chunk in _chunks(ids):
        acked.update(session.scalars(select(Study.id).where(Study.id.in_(chunk), _acknowledged())))
    out = []
    for sid, worst in rows:
        s = studies[sid]
        result = _result_of(worst)
        t_scores = [r.t_score for r in sites[sid].values() if r.assessable and r.t_score is not None]
        out.append(Screening(
            study_uid=s.study_uid, patient_id=s.patient_id, patient_name=s.patient_name,
            accession_number=s.accession_number, study_date=s.study_date, calling_ae=s.calling_ae,
            status=s.status, received_at=s.first_received_at, reported_at=s.reported_at, result=result,
            lowest_t_score=min(t_scores) if t_scores else None,
            positive=result in positive_categories, acknowledged=sid in acked, model_version=versions.get(sid),
            sites={k: sites[sid][k] for k in SITES if k in sites[sid]}, modalities=sorted(modalities[sid]),
            skip_reason=skip_reasons.get(sid) if s.status == "skipped" else None))
    return out


# -- one study -------------------------------------------------------------------------------------

def find_study(session: Session, key: str) -> Study:
    """A study by Study Instance UID, or by Accession Number when that is unique."""
    study = session.scalar(select(Study).where(Study.study_uid == key))
    if study is None:
        matches = session.scalars(select(Study).where(Study.accession_number == key).limit(2)).all()
        if len(matches) == 1:
            study = matches[0]
        elif matches:
            raise NotFound(f"accession number {key} names more than one study: use the Study Instance UID")
    if study is None:
        raise NotFound(f"no study with Study Instance UID or Accession Number {key}")
    return study


def _study_worst(session: Session, study_id: int) -> int | None:
    worst = _worst_subquery(None)
    return session.scalar(select(worst.c.worst).where(worst.c.study_id == study_id))


# -- a delivery, as the study page and the failed-delivery list show it ----------------------------

def _delivery_dict(d: Delivery, study_uid: str | None = None) -> dict:
    out = dict(id=d.id, kind=d.kind, sop_instance_uid=d.sop_instance_uid, destination=d.destination,
               state=d.state, attempts=d.attempts, last_error=d.last_error, created_at=d.created_at,
               next_attempt_at=d.next_attempt_at, delivered_at=d.delivered_at,
               resendable=d.state in ("dead", "delivered") and d.purged_at is None and Path(d.path).is_file())
    if study_uid is not None:
        out["study_uid"] = study_uid
    return out
