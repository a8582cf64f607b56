"""What administrators and screening coordinators ask of the database, answered once for the CLI
(`osteoscreen db …`), the dashboard and the CSV export.

A *screening* is a study as the node last reported it: its latest findings are those of its newest
job (a late image re-reports a study; earlier findings stay as history). The study's *result* is its
worst site (osteoporosis > osteopenia > normal), or "not assessable" when no site could be assessed.
A study is *positive* when its result is one of `positive_categories` (the output setting of the
same name), and it stays on the follow-up worklist until it is acknowledged.


Dates are UTC calendar dates of when the node first received the study. Everything here returns
plain dataclasses (and `as_dict` for JSON); nothing is printed or logged, so no PHI leaves.

One module per question, all over `common` (the latest-findings SQL, the filters, the Screening rows,
one study's lookup); importers use this package, which re-exports every name the single module had:
`screenings` (the list, one study's detail, CSV export rows), `stats` (counts per day or ISO week),
`follow_up` (the worklist and acknowledgements), `deliveries` (failed deliveries), `node_health`
(the node's health). Imports run one way: common <- screenings <- follow_up; common <- the rest.
"""
from __future__ import annotations

from ...store.models import utcnow
from .common import (NOT_ASSESSABLE, RESULTS, STATUSES, Filters, NotFound, Screening, SiteResult, _acknowledged,
                     _chunks, _delivery_dict, _filtered, _jsonable, _latest_job, _newest_job_of, _positive_clause,
                     _result_of, _screenings, _severity, _study_worst, _worst_subquery, find_study)
from .deliveries import failed_deliveries
from .follow_up import acknowledge, revoke_acknowledgement, worklist
from .node_health import Health, all_heartbeats, health
from .screenings import EXPORT_COLUMNS, Page, StudyDetail, export_rows, list_screenings, study_detail
from .stats import MAX_STATS_DAYS, PeriodStats, Stats, _reason_kind, period_of, statistics

__all__ = [
    "NOT_ASSESSABLE", "RESULTS", "STATUSES", "EXPORT_COLUMNS", "MAX_STATS_DAYS",
    "NotFound", "Filters", "SiteResult", "Screening", "Page", "StudyDetail", "PeriodStats", "Stats", "Health",
    "list_screenings", "find_study", "study_detail", "export_rows", "worklist", "acknowledge",
    "revoke_acknowledgement", "period_of", "statistics", "failed_deliveries", "health", "all_heartbeats", "utcnow",
    # private, but imported elsewhere (web.metrics, admin.performance)
    "_acknowledged", "_latest_job", "_severity", "_worst_subquery", "_screenings", "_chunks", "_newest_job_of",
    # private, kept for whoever reached into the single module
    "_jsonable", "_result_of", "_positive_clause", "_filtered", "_study_worst", "_delivery_dict", "_reason_kind",
]
