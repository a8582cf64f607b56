"""How many, per day or ISO week: studies received, screened, skipped, failed and pending, results
and positives per period (every period of the range, empty ones included) with totals, and why sites
were not assessable and images were skipped (`statistics`, a `Stats`).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ...store.models import Finding, Instance, Study, utcnow
from .common import NOT_ASSESSABLE, RESULTS, Filters, _chunks, _filtered, _jsonable, _newest_job_of, _result_of


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
