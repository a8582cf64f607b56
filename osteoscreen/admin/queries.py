"""What administrators and screening coordinators ask of the database, answered once for the CLI
(`osteoscreen db …`), the dashboard and the CSV export.

A *screening* is a study as the node last reported it: its latest findings are those of its newest
job (a late image re-reports a study; earlier findings stay as history). The study's *result* is its
worst site (osteoporosis > osteopenia > normal), or "not assessable" when no site could be assessed.
A study is *positive* when its result is one of `positive_categories` (the output setting of the
same name), and it stays on the follow-up worklist until it is acknowledged.

Dates are UTC calendar dates of when the node first received the study. Everything here returns
plain dataclasses (and `as_dict` for JSON); nothing is printed or logged, so no PHI leaves.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from ..findings import CLASSES, SITES
from ..store import queue
from ..store.heartbeat import alive
from ..store.models import (Acknowledgement, Delivery, DestinationCircuit, Finding, Instance, Job,
                            ProcessHeartbeat, Study, utcnow)

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


@dataclass
class Page:
    items: list[Screening]
    total: int
    limit: int
    offset: int

    def as_dict(self) -> dict:
        return {"total": self.total, "limit": self.limit, "offset": self.offset,
                "items": [s.as_dict() for s in self.items]}


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


def _study_worst(session: Session, study_id: int) -> int | None:
    worst = _worst_subquery(None)
    return session.scalar(select(worst.c.worst).where(worst.c.study_id == study_id))


def _delivery_dict(d: Delivery, study_uid: str | None = None) -> dict:
    out = dict(id=d.id, kind=d.kind, sop_instance_uid=d.sop_instance_uid, destination=d.destination,
               state=d.state, attempts=d.attempts, last_error=d.last_error, created_at=d.created_at,
               next_attempt_at=d.next_attempt_at, delivered_at=d.delivered_at,
               resendable=d.state in ("dead", "delivered") and d.purged_at is None and Path(d.path).is_file())
    if study_uid is not None:
        out["study_uid"] = study_uid
    return out


# -- follow-up ---------------------------------------------------------------------------------------

def worklist(session: Session, *, positive_categories: list[str], include_acknowledged: bool = False,
             limit: int = 0) -> list[Screening]:
    """Positive screenings not yet acknowledged, longest waiting first."""
    f = Filters(positive=True, acknowledged=None if include_acknowledged else False)
    return list_screenings(session, f, positive_categories=positive_categories, limit=limit,
                           oldest_first=True).items


def acknowledge(session: Session, key: str, by: str, note: str | None = None, *,
                positive_categories: list[str]) -> Acknowledgement:
    """Record that `by` acted on the study's current, positive result; it leaves the worklist until a
    new report replaces that one. Audited (UIDs only)."""
    study = find_study(session, key)
    if not by or len(by) > 64:
        raise ValueError("acknowledging needs a user name of 1-64 characters")
    result = _result_of(_study_worst(session, study.id))
    if result not in positive_categories:
        raise ValueError(f"study {study.study_uid} is not positive (its latest result is "
                         f"{(result or 'none yet').replace('_', ' ')}): there is nothing to follow up")
    if session.scalar(select(Study.id).where(Study.id == study.id, _acknowledged())) is not None:
        raise ValueError(f"study {study.study_uid} is already acknowledged for its current report")
    ack = Acknowledgement(study_id=study.id, report_uid=study.last_report_uid, by=by, at=utcnow(),
                          note=(note or None))
    session.add(ack)
    queue.audit(session, "acknowledged", study_uid=study.study_uid, detail=f"by {by}")
    session.commit()
    return ack


def revoke_acknowledgement(session: Session, key: str, by: str) -> int:
    """Withdraw the study's standing acknowledgements (it returns to the worklist if positive)."""
    study = find_study(session, key)
    acks = session.scalars(select(Acknowledgement).where(Acknowledgement.study_id == study.id,
                                                         Acknowledgement.revoked_at.is_(None))).all()
    now = utcnow()
    for a in acks:
        a.revoked_at, a.revoked_by = now, by
    if acks:
        queue.audit(session, "acknowledgement_revoked", study_uid=study.study_uid, detail=f"by {by}")
    session.commit()
    return len(acks)


# -- statistics ------------------------------------------------------------------------------------

@dataclass
class PeriodStats:
    period: str  # 2026-11-29 (day) or 2026-W48 (ISO week)
    start: date
    received: int = 0
    screened: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0  # receiving or queued
    positive: int = 0
    by_result: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RESULTS})

    @property
    def positive_rate(self) -> float | None:
        """Positives among studies with an assessable site."""
        assessed = sum(v for k, v in self.by_result.items() if k != NOT_ASSESSABLE)
        return self.positive / assessed if assessed else None


@dataclass
class Stats:
    by: str
    since: date
    until: date
    periods: list[PeriodStats]
    not_assessable_reasons: dict[str, int]  # per site finding, latest reports
    skip_reasons: dict[str, int]  # per image not routed to screening
    totals: PeriodStats

    def as_dict(self) -> dict:
        def one(p: PeriodStats) -> dict:
            return _jsonable({**dataclasses.asdict(p), "positive_rate": p.positive_rate})
        return _jsonable({"by": self.by, "since": self.since, "until": self.until,
                          "periods": [one(p) for p in self.periods], "totals": one(self.totals),
                          "not_assessable_reasons": self.not_assessable_reasons,
                          "skip_reasons": self.skip_reasons})


MAX_STATS_DAYS = {"day": 400, "week": 7 * 260}  # a year and a month of days, five years of weeks


def period_of(day: date, by: str) -> tuple[str, date]:
    if by == "day":
        return day.isoformat(), day
    if by == "week":
        year, week, weekday = day.isocalendar()
        return f"{year}-W{week:02d}", day - timedelta(days=weekday - 1)
    raise ValueError(f"statistics by {by!r}: expected day or week")


def statistics(session: Session, *, positive_categories: list[str], by: str = "week", since: date | None = None,
               until: date | None = None) -> Stats:
    """Counts per day or ISO week (every period in the range, empty ones included)."""
    until = until or utcnow().date()
    since = since or (until - timedelta(days=13 if by == "day" else 7 * 11))  # 14 days; 12 ISO weeks
    period_of(since, by)  # validates `by`
    if by == "week":  # whole ISO weeks: no partial first week
        since -= timedelta(days=since.weekday())
    f = Filters(since=since, until=until).validate()
    longest = MAX_STATS_DAYS[by]
    if (until - since).days >= longest:
        raise ValueError(f"statistics by {by} cover at most {longest} days; narrow --from/--to")
    periods: dict[str, PeriodStats] = {}
    day = since
    while day <= until:
        name, start = period_of(day, by)
        periods.setdefault(name, PeriodStats(name, start))
        day += timedelta(days=1)
    totals = PeriodStats("total", since)
    ids_worst = {}
    q = _filtered(f, positive_categories).add_columns(Study.first_received_at, Study.status)
    for sid, worst, received, status in session.execute(q):
        ids_worst[sid] = worst
        for p in (periods[period_of(received.date(), by)[0]], totals):
            p.received += 1
            if status == "screened":
                p.screened += 1
            elif status in ("skipped", "failed"):
                setattr(p, status, getattr(p, status) + 1)
            else:
                p.pending += 1
            result = _result_of(worst)
            if result is not None and status != "skipped":
                p.by_result[result] += 1
                p.positive += result in positive_categories
    reasons: Counter = Counter()
    skips: Counter = Counter()
    ids = list(ids_worst)
    for chunk in _chunks(ids, 500):
        # per study site (lumbar AP + lateral are two findings of one site): a site counts as not
        # assessable only when no view of it was, with the first view's reason
        per_site: dict[tuple[int, str], str | None] = {}
        assessed: set[tuple[int, str]] = set()
        for sid, site, ok, reason in session.execute(
                select(Finding.study_id, Finding.site, Finding.assessable, Finding.reason)
                .where(Finding.study_id.in_(chunk), Finding.job_id == _newest_job_of(Finding.study_id))
                .order_by(Finding.id)):
            if ok:
                assessed.add((sid, site))
            else:
                per_site.setdefault((sid, site), reason)
        for key, reason in per_site.items():
            if key not in assessed:
                reasons[reason or "unknown"] += 1
        for (reason,) in session.execute(select(Instance.skip_reason).where(
                Instance.study_id.in_(chunk), Instance.eligible.is_(False))):
            skips[_reason_kind(reason)] += 1
    return Stats(by, since, until, list(periods.values()), dict(reasons.most_common()), dict(skips.most_common()),
                 totals)


def _reason_kind(reason: str | None) -> str:
    """Skip reasons carry details after a colon ('modality: MR'); count them by kind."""
    return re.sub(r"\s*[(:].*$", "", reason or "").strip() or "unknown"


# -- deliveries and node health -----------------------------------------------------------------------

def failed_deliveries(session: Session, limit: int = 200) -> list[dict]:
    """Dead deliveries, and pending ones that have failed at least once, newest first."""
    rows = session.execute(
        select(Delivery, Study.study_uid).join(Study, Study.id == Delivery.study_id)
        .where(or_(Delivery.state == "dead", and_(Delivery.state == "pending", Delivery.attempts > 0)))
        .order_by(Delivery.id.desc()).limit(limit)).all()
    return [_delivery_dict(d, uid) for d, uid in rows]


@dataclass
class Health:
    now: datetime
    jobs: dict[str, int]  # queued, running, failed
    deliveries: dict[str, int]  # pending, sending, dead
    last_received_at: datetime | None
    last_reported_at: datetime | None
    last_delivered_at: datetime | None
    processes: list[dict]
    roles_alive: dict[str, int]
    circuits: list[dict]
    storage_free_mb: int | None

    @property
    def ok(self) -> bool:
        """Nothing an operator must act on: no dead deliveries, no open circuit, no failed job."""
        return not (self.deliveries.get("dead") or self.jobs.get("failed")
                    or any(c["state"] != "closed" for c in self.circuits))

    def as_dict(self) -> dict:
        return _jsonable({**dataclasses.asdict(self), "ok": self.ok})


def health(session: Session, storage: Path | None = None) -> Health:
    now = utcnow()
    jobs = {k: 0 for k in ("queued", "running", "failed")}
    jobs.update({s: n for s, n in session.execute(select(Job.state, func.count()).where(
        Job.state.in_(list(jobs))).group_by(Job.state))})
    deliveries = {k: 0 for k in ("pending", "sending", "dead")}
    deliveries.update({s: n for s, n in session.execute(select(Delivery.state, func.count()).where(
        Delivery.state.in_(list(deliveries))).group_by(Delivery.state))})
    procs = alive(session, now)
    roles: Counter = Counter(r for p in procs for r in p.roles.split(","))
    circuits = [dict(destination=c.destination, state=c.state, consecutive_failures=c.consecutive_failures,
                     retry_at=c.retry_at, last_error=c.last_error)
                for c in session.scalars(select(DestinationCircuit).order_by(DestinationCircuit.destination))]
    free = None
    if storage is not None:
        import shutil
        try:
            free = shutil.disk_usage(storage).free // (1 << 20)
        except OSError:
            free = None
    return Health(
        now=now, jobs=jobs, deliveries=deliveries,
        last_received_at=session.scalar(select(func.max(Instance.received_at))),
        last_reported_at=session.scalar(select(func.max(Study.reported_at))),
        last_delivered_at=session.scalar(select(func.max(Delivery.delivered_at))),
        processes=[dict(host=p.host, pid=p.pid, roles=p.roles, version=p.version, started_at=p.started_at,
                        last_seen_at=p.last_seen_at) for p in procs],
        roles_alive={r: roles.get(r, 0) for r in ("listen", "work", "dispatch", "web")},
        circuits=circuits, storage_free_mb=free)


def all_heartbeats(session: Session) -> list[ProcessHeartbeat]:
    return list(session.scalars(select(ProcessHeartbeat).order_by(ProcessHeartbeat.host)))


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
