"""Prometheus metrics of the node, computed from the database at scrape time.

The node runs as several processes (listen, work, dispatch, web), possibly on several hosts, and the
only thing they share is the database. So nothing here counts events in memory: a custom collector
(`DatabaseCollector`) runs a handful of aggregate queries on every scrape, and any web process serves
the same, global figures. Each collector lives on its own `CollectorRegistry` (never the global one),
and `render(db, positive_categories)` keeps one `Metrics` (collector + registry) per database and
setting (a weak-keyed cache), so calling it on every request costs only the queries.

Metrics (all prefixed ``osteoscreen_``; labels are bounded sets, never a UID, a patient or free text;
``scanner`` is a scanner group's key, Manufacturer|ModelName from the headers or a `calibrations:` key):

======================================================  =========  ===============================
name                                                    type       labels
======================================================  =========  ===============================
instances_received_total                                counter    modality, screened (true|false)
studies                                                 gauge      status
studies_screened_total                                  counter    result (of the latest report)
sites_screened_total                                    counter    site, result (latest reports)
not_assessable_total                                    counter    reason (site findings, latest reports)
positive_studies                                        gauge      —
followup_pending                                        gauge      —
queue_depth                                             gauge      queue (jobs|deliveries), state
jobs_failed                                             gauge      —
deliveries                                              gauge      state
deliveries_dead                                         gauge      —
delivery_failures_total                                 counter    —
received_to_reported_seconds                            histogram  —
reported_to_delivered_seconds                           histogram  —
last_{received,reported,delivered}_timestamp_seconds    gauge      — (absent while there is none)
processes_alive                                         gauge      role
circuit_open                                            gauge      destination (AET@HOST:PORT, config)
database_up                                             gauge      —
build_info                                              gauge      version
drift_status                                            gauge      scanner (group key), status
drift_signal_moved                                      gauge      scanner, signal
drift_checked_timestamp_seconds                         gauge      scanner
scanner_last_received_timestamp_seconds                 gauge      scanner
======================================================  =========  ===============================

The study and delivery counts by status/state are gauges (named without ``_total``): rows move between
states all the time, so per-label values go down as well as up.

Counters are counts of database rows, not of events, so they can decrease, which Prometheus reads
as a counter reset:
- retention deletes the rows of old studies when ``retention.rows_days`` > 0 (instances, studies,
  findings and deliveries all shrink);
- a late image re-reports a study, and only its latest report counts: the study moves from one
  ``result`` (and site result, and not-assessable reason) to another;
- ``osteoscreen resend`` resets a delivery's attempts to 0, which lowers ``delivery_failures_total``.

``delivery_failures_total`` is, over all deliveries, ``attempts - 1`` for a delivered one (its last
attempt succeeded) and ``attempts`` for any other (pending, sending, dead): the dispatcher counts an
attempt only once its outcome is known (``dispatch/outbox.py`` increments after sending; claiming
does not), so a 'sending' delivery's attempts are all finished, failed ones.

Latencies are histograms whose bucket counts and sums are computed in SQL (one aggregate query per
histogram), never by loading rows:
- ``received_to_reported_seconds``: per screened study, ``reported_at - last_received_at``; it includes
  the settle timer (``settle_seconds`` of quiet before a study is queued), the queue wait and the work;
- ``reported_to_delivered_seconds``: per delivered delivery, ``delivered_at - created_at`` (the
  delivery row is created with the report), retries and backoff included.

If the database cannot be queried, a scrape yields ``osteoscreen_database_up 0`` and nothing else
(the web server keeps answering); normally ``osteoscreen_database_up 1``.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from datetime import datetime, timezone
from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import and_, case, extract, func, select
from sqlalchemy.orm import Session

from .. import __version__
from ..admin.queries import NOT_ASSESSABLE, RESULTS, STATUSES, _acknowledged, _latest_job, _severity, _worst_subquery
from ..findings import CLASSES, REASON_TEXT, SITES
from ..monitor.watch import STATUSES as DRIFT_STATUSES
from ..monitor.watch import latest_checks
from ..store.db import Database
from ..store.heartbeat import alive
from ..store.models import Delivery, DestinationCircuit, Finding, Instance, Job, Study

log = logging.getLogger("osteoscreen.web.metrics")

PREFIX = "osteoscreen_"
# seconds to hours: the settle timer alone is tens of seconds; a destination down for a while, hours
BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
JOB_STATES = ("queued", "running", "done", "failed")
DELIVERY_STATES = ("pending", "sending", "delivered", "dead")
ROLES = ("listen", "work", "dispatch", "web")
MAX_MODALITIES = 16  # distinct modality label values; the rarer ones are summed under "other"


def _result_name(severity: int | None) -> str:
    return NOT_ASSESSABLE if severity is None or severity < 0 else CLASSES[severity]


def _reason_label(reason: str | None) -> str:
    """The fixed machine-readable reasons of findings.py; anything else is "other", None "unknown"."""
    if reason is None or reason == "":
        return "unknown"
    return reason if reason in REASON_TEXT else "other"


def _epoch(value: datetime | None) -> float | None:
    """Unix time of a stored naive-UTC datetime."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _seconds_between(dialect: str, later, earlier):
    """SQL for (later - earlier) in seconds."""
    if dialect == "sqlite":
        # julianday differences carry ~1e-5 s of floating-point noise: round to the millisecond, so that
        # a latency of exactly 15 s lands in the le="15" bucket
        return func.round((func.julianday(later) - func.julianday(earlier)) * 86400.0, 3)
    if dialect == "postgresql":
        return extract("epoch", later - earlier)
    raise ValueError(f"metrics: unsupported database dialect {dialect!r} (SQLite and PostgreSQL are)")


class DatabaseCollector(Collector):
    """Collects every metric from the database, on each scrape (see the module docstring)."""

    def __init__(self, db: Database, positive_categories: list[str]):
        unknown = [c for c in positive_categories if c not in CLASSES]
        if unknown:
            raise ValueError(f"positive categories {unknown}: expected some of {', '.join(CLASSES)}")
        self.db = db
        self.positive_categories = list(positive_categories)
        self._positive_severities = [CLASSES.index(c) for c in self.positive_categories]
        _seconds_between(db.engine.dialect.name, Study.reported_at, Study.last_received_at)  # supported?

    # no describe(): registering the collector must not query the database

    def collect(self) -> Iterable[Metric]:
        try:
            with self.db.session() as session:
                if self.db.engine.dialect.name == "postgresql":
                    # one consistent snapshot for all the queries of this scrape
                    session.connection(execution_options={"isolation_level": "REPEATABLE READ",
                                                          "postgresql_readonly": True})
                families = self._families(session)
        except Exception as exc:  # noqa: BLE001 - a scrape must never take the web server down
            log.warning("metrics: database query failed: %s: %s", type(exc).__name__, exc)
            up = GaugeMetricFamily(PREFIX + "database_up", "1 when the database could be queried for this scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily(PREFIX + "database_up", "1 when the database could be queried for this scrape")
        up.add_metric([], 1)
        yield up
        yield from families

    # -- the queries --------------------------------------------------------------------------------

    def _families(self, s: Session) -> list[Metric]:
        """Everything but database_up; raises if the database cannot be queried."""
        dialect = s.get_bind().dialect.name
        out: list[Metric] = []

        info = GaugeMetricFamily(PREFIX + "build_info", "osteoscreen version of the process serving the metrics",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        out.append(info)

        out.append(self._instances(s))

        studies = GaugeMetricFamily(PREFIX + "studies", "Studies by status", labels=["status"])
        by_status = Counter({st: 0 for st in STATUSES})
        by_status.update(dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all()))
        for status, n in sorted(by_status.items()):
            studies.add_metric([status], n)
        out.append(studies)

        out.extend(self._results(s))
        out.extend(self._queues(s))
        out.append(self._histogram(
            s, PREFIX + "received_to_reported_seconds",
            "Seconds from a screened study's last received image to its report; includes the settle timer "
            "(settle_seconds of quiet before the study is queued), the queue wait and the screening",
            Study, _seconds_between(dialect, Study.reported_at, Study.last_received_at),
            and_(Study.status == "screened", Study.reported_at.is_not(None))))
        out.append(self._histogram(
            s, PREFIX + "reported_to_delivered_seconds",
            "Seconds from a result object's creation (the report) to its delivery, retries included",
            Delivery, _seconds_between(dialect, Delivery.delivered_at, Delivery.created_at),
            and_(Delivery.state == "delivered", Delivery.delivered_at.is_not(None))))
        out.extend(self._timestamps(s))
        out.extend(self._processes(s))
        out.extend(self._drift(s))
        return out

    def _instances(self, s: Session) -> Metric:
        fam = CounterMetricFamily(PREFIX + "instances_received",
                                  "Images received (rows kept), by modality and whether they were screened "
                                  "(eligible) or skipped", labels=["modality", "screened"])
        rows = s.execute(select(Instance.modality, Instance.eligible, func.count())
                         .group_by(Instance.modality, Instance.eligible)).all()
        per_modality: Counter = Counter()
        for modality, _eligible, n in rows:
            per_modality[modality or "unknown"] += n
        kept = {m for m, _ in per_modality.most_common(MAX_MODALITIES)}
        counts: Counter = Counter()
        for modality, eligible, n in rows:
            label = modality or "unknown"
            counts[(label if label in kept else "other", "true" if eligible else "false")] += n
        for (modality, screened), n in sorted(counts.items()):
            fam.add_metric([modality, screened], n)
        return fam

    def _results(self, s: Session) -> list[Metric]:
        # studies by the result of their latest report (worst site)
        worst = _worst_subquery(None)
        by_result = Counter({r: 0 for r in RESULTS})
        for severity, n in s.execute(select(worst.c.worst, func.count()).group_by(worst.c.worst)):
            by_result[_result_name(severity)] += n
        screened = CounterMetricFamily(PREFIX + "studies_screened",
                                       "Studies by the result of their latest report (worst site); a re-report "
                                       "moves a study between results", labels=["result"])
        for result in RESULTS:
            screened.add_metric([result], by_result[result])

        positive = s.scalar(select(func.count()).select_from(worst)
                            .where(worst.c.worst.in_(self._positive_severities))) or 0
        pending = s.scalar(select(func.count()).select_from(Study).join(worst, worst.c.study_id == Study.id)
                           .where(worst.c.worst.in_(self._positive_severities), ~_acknowledged())) or 0
        pos = GaugeMetricFamily(PREFIX + "positive_studies",
                                f"Studies whose latest result is positive ({', '.join(self.positive_categories)})")
        pos.add_metric([], positive)
        follow = GaugeMetricFamily(PREFIX + "followup_pending",
                                   "Positive studies not acknowledged yet (the follow-up worklist)")
        follow.add_metric([], pending)

        # sites: each (study, site) once (a lumbar spine seen AP and lateral is one site), at its worst
        latest = _latest_job()
        per_site = (select(Finding.study_id, Finding.site.label("site"), func.max(_severity()).label("worst"))
                    .join(latest, and_(latest.c.study_id == Finding.study_id, latest.c.job_id == Finding.job_id))
                    .group_by(Finding.study_id, Finding.site).subquery("per_site"))
        site_counts: Counter = Counter()
        for site, severity, n in s.execute(select(per_site.c.site, per_site.c.worst, func.count())
                                           .group_by(per_site.c.site, per_site.c.worst)):
            site_counts[(site if site in SITES else "other", _result_name(severity))] += n
        sites = CounterMetricFamily(PREFIX + "sites_screened", "Sites in the latest reports, by site and result",
                                    labels=["site", "result"])
        for site in SITES:
            for result in RESULTS:
                sites.add_metric([site, result], site_counts.pop((site, result), 0))
        for (site, result), n in sorted(site_counts.items()):
            sites.add_metric([site, result], n)

        # not assessable: every site finding of the latest reports (like `osteoscreen db stats`)
        reasons = Counter({r: 0 for r in REASON_TEXT})
        for reason, n in s.execute(
                select(Finding.reason, func.count())
                .join(latest, and_(latest.c.study_id == Finding.study_id, latest.c.job_id == Finding.job_id))
                .where(Finding.assessable.is_(False)).group_by(Finding.reason)):
            reasons[_reason_label(reason)] += n
        na = CounterMetricFamily(PREFIX + "not_assessable",
                                 "Not-assessable site findings of the latest reports, by reason", labels=["reason"])
        for reason, n in sorted(reasons.items()):
            na.add_metric([reason], n)
        return [screened, sites, na, pos, follow]

    def _queues(self, s: Session) -> list[Metric]:
        jobs = Counter({st: 0 for st in JOB_STATES})
        jobs.update(dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all()))
        deliveries = Counter({st: 0 for st in DELIVERY_STATES})
        deliveries.update(dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()))

        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Work waiting or in progress",
                                  labels=["queue", "state"])
        for state in ("queued", "running"):
            depth.add_metric(["jobs", state], jobs[state])
        for state in ("pending", "sending"):
            depth.add_metric(["deliveries", state], deliveries[state])
        failed = GaugeMetricFamily(PREFIX + "jobs_failed", "Jobs that failed for good (attempts spent)")
        failed.add_metric([], jobs["failed"])
        dead = GaugeMetricFamily(PREFIX + "deliveries_dead", "Deliveries given up after the maximum attempts")
        dead.add_metric([], deliveries["dead"])
        by_state = GaugeMetricFamily(PREFIX + "deliveries",
                                     "Deliveries (one per result object and destination) by state", labels=["state"])
        for state, n in sorted(deliveries.items()):
            by_state.add_metric([state], n)

        finished_ok = Delivery.state == "delivered"
        failures_expr = case((and_(finished_ok, Delivery.attempts > 0), Delivery.attempts - 1),
                             (finished_ok, 0), else_=Delivery.attempts)
        n_failures = s.scalar(select(func.coalesce(func.sum(failures_expr), 0))) or 0
        failures = CounterMetricFamily(PREFIX + "delivery_failures",
                                       "Failed delivery attempts: attempts - 1 of each delivered delivery, attempts "
                                       "of every other one (a resend resets attempts)")
        failures.add_metric([], int(n_failures))
        return [depth, failed, dead, by_state, failures]

    def _histogram(self, s: Session, name: str, doc: str, table, seconds, where) -> Metric:
        """Bucket counts and sum in one aggregate query over `seconds` of the rows of `table` matching `where`."""
        diffs = select(seconds.label("d")).select_from(table).where(where).subquery("diffs")
        d = diffs.c.d
        row = s.execute(select(func.count(d), func.sum(d),
                               *[func.sum(case((d <= b, 1), else_=0)) for b in BUCKETS])
                        .select_from(diffs)).one()
        count, total = int(row[0] or 0), float(row[1] or 0.0)
        buckets = [(floatToGoString(b), int(n or 0)) for b, n in zip(BUCKETS, row[2:])]
        buckets.append(("+Inf", count))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)

    def _timestamps(self, s: Session) -> list[Metric]:
        received, reported, delivered = s.execute(select(
            select(func.max(Instance.received_at)).scalar_subquery(),
            select(func.max(Study.reported_at)).scalar_subquery(),
            select(func.max(Delivery.delivered_at)).scalar_subquery())).one()
        out = []
        for what, value, doc in (("received", received, "Unix time the newest image was received"),
                                 ("reported", reported, "Unix time the newest report was made"),
                                 ("delivered", delivered, "Unix time the newest result object was delivered")):
            fam = GaugeMetricFamily(f"{PREFIX}last_{what}_timestamp_seconds", doc)
            if isinstance(value, str):  # a bare max() of a DateTime column on SQLite
                value = datetime.fromisoformat(value)
            epoch = _epoch(value)
            if epoch is not None:
                fam.add_metric([], epoch)
            out.append(fam)
        return out

    def _processes(self, s: Session) -> list[Metric]:
        roles = Counter({r: 0 for r in ROLES})
        for p in alive(s):
            roles.update(r for r in p.roles.split(",") if r)
        procs = GaugeMetricFamily(PREFIX + "processes_alive",
                                  "osteoscreen processes with a fresh heartbeat, by role", labels=["role"])
        for role, n in sorted(roles.items()):
            procs.add_metric([role], n)
        circuits = GaugeMetricFamily(PREFIX + "circuit_open",
                                     "1 while a destination's circuit breaker is open or half-open",
                                     labels=["destination"])
        for dest, state in s.execute(select(DestinationCircuit.destination, DestinationCircuit.state)
                                     .order_by(DestinationCircuit.destination)):
            circuits.add_metric([dest], 0 if state == "closed" else 1)
        return [procs, circuits]


    def _drift(self, s: Session) -> list[Metric]:
        """The drift watch's latest check per scanner group (a state set: one series per status)."""
        status = GaugeMetricFamily(PREFIX + "drift_status", "1 for a scanner group's current drift-watch status "
                                   "(ok, drift, silent, insufficient data), 0 for the others", labels=["scanner", "status"])
        moved = GaugeMetricFamily(PREFIX + "drift_signal_moved", "1 for each signal the group's latest check found "
                                  "moved, 0 for each it tested unmoved", labels=["scanner", "signal"])
        checked = GaugeMetricFamily(PREFIX + "drift_checked_timestamp_seconds", "Unix time of the group's latest check",
                                    labels=["scanner"])
        last = GaugeMetricFamily(PREFIX + "scanner_last_received_timestamp_seconds",
                                 "Unix time the group's newest screening image was received", labels=["scanner"])
        for check in latest_checks(s):
            for name in DRIFT_STATUSES:
                status.add_metric([check.scanner, name], 1 if check.status == name else 0)
            details = check.details or {}
            for test in details.get("tests", []):
                moved.add_metric([check.scanner, test["signal"]], 1 if test["signal"] in (check.signals or []) else 0)
            checked.add_metric([check.scanner], _epoch(check.checked_at))
            if details.get("last_received"):
                last.add_metric([check.scanner], _epoch(datetime.fromisoformat(details["last_received"])))
        return [status, moved, checked, last]


class Metrics:
    """A collector on its own registry; `render()` is the body and Content-Type of a /metrics answer."""

    def __init__(self, db: Database, positive_categories: list[str]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DatabaseCollector(db, positive_categories)
        self.registry.register(self.collector)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_cache: "weakref.WeakKeyDictionary[Database, dict[tuple[str, ...], Metrics]]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def metrics_for(db: Database, positive_categories: list[str]) -> Metrics:
    """The Metrics of this database and setting, made once (the cache forgets a Database that is gone)."""
    key = tuple(positive_categories)
    with _cache_lock:
        per_db = _cache.setdefault(db, {})
        m = per_db.get(key)
        if m is None:
            m = per_db[key] = Metrics(db, list(positive_categories))
        return m


def render(db: Database, positive_categories: list[str]) -> tuple[bytes, str]:
    """(exposition text, Content-Type) for a /metrics answer; cheap to call on every request."""
    return metrics_for(db, positive_categories).render()
