"""Prometheus metrics computed from the database: exact values from the seeded database (tests/seed.py),
on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from osteoscreen import __version__
from osteoscreen.store.db import Database, make_engine
from osteoscreen.store.heartbeat import Heartbeat
from osteoscreen.store.models import (Acknowledgement, Delivery, DestinationCircuit, ProcessHeartbeat, Study,
                                      utcnow)
from osteoscreen.web.metrics import BUCKETS, DatabaseCollector, Metrics, metrics_for, render
from tests.seed import DESTINATION, seed, uid

POSITIVE = ["osteoporosis"]


def scrape(db: Database, positive=POSITIVE) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of one render."""
    body, content_type = render(db, positive)
    assert isinstance(body, bytes)
    assert content_type == CONTENT_TYPE_LATEST
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def val(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: dict, name: str) -> dict[frozenset, float]:
    """Every sample of `name`, by its labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def lbl(**labels) -> frozenset:
    return frozenset(labels.items())


def unix(dt: datetime) -> float:
    return dt.replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture
def seeded(db_url, tmp_path):
    seed(db_url, tmp_path / "outbox")
    db = Database(db_url)
    yield db
    db.dispose()


def test_counts_follow_the_seed(seeded):
    m = scrape(seeded)
    assert val(m, "osteoscreen_database_up") == 1
    assert series(m, "osteoscreen_build_info") == {lbl(version=__version__): 1}

    # 15 images: S09 has AP + lateral, S08's chest is skipped, S12 is the only CR
    assert series(m, "osteoscreen_instances_received_total") == {
        lbl(modality="DX", screened="true"): 14, lbl(modality="DX", screened="false"): 1,
        lbl(modality="CR", screened="true"): 1}

    assert series(m, "osteoscreen_studies") == {
        lbl(status="screened"): 11, lbl(status="skipped"): 1, lbl(status="failed"): 1,
        lbl(status="receiving"): 1, lbl(status="queued"): 0}

    # latest reports only: S10 was osteoporosis first, normal last
    assert series(m, "osteoscreen_studies_screened_total") == {
        lbl(result="normal"): 4,  # S01, S02, S06, S10
        lbl(result="osteopenia"): 2,  # S03, S09
        lbl(result="osteoporosis"): 4,  # S04, S05, S12, S13
        lbl(result="not_assessable"): 1}  # S07

    sites = series(m, "osteoscreen_sites_screened_total")
    assert sites[lbl(site="left_hip", result="normal")] == 4  # S01, S02, S06, S10 (latest)
    assert sites[lbl(site="left_hip", result="osteopenia")] == 1
    assert sites[lbl(site="left_hip", result="osteoporosis")] == 4
    assert sites[lbl(site="left_hip", result="not_assessable")] == 1
    assert sites[lbl(site="right_hip", result="normal")] == 9
    assert sites[lbl(site="right_hip", result="not_assessable")] == 1
    assert sites[lbl(site="right_hip", result="osteoporosis")] == 0
    # S09's lumbar spine is one site although AP and lateral each have a finding
    assert sites[lbl(site="lumbar_spine", result="osteopenia")] == 1
    assert sum(sites.values()) == 21  # 10 hip studies × 2 sites + 1 lumbar
    assert len(sites) == 3 * 4

    na = series(m, "osteoscreen_not_assessable_total")
    assert na[lbl(reason="metal_implant")] == 1
    assert na[lbl(reason="site_not_found")] == 1
    assert sum(na.values()) == 2

    assert val(m, "osteoscreen_positive_studies") == 4
    assert val(m, "osteoscreen_followup_pending") == 3  # S05 is acknowledged

    assert series(m, "osteoscreen_queue_depth") == {
        lbl(queue="jobs", state="queued"): 0, lbl(queue="jobs", state="running"): 0,
        lbl(queue="deliveries", state="pending"): 1, lbl(queue="deliveries", state="sending"): 0}
    assert val(m, "osteoscreen_jobs_failed") == 1
    assert val(m, "osteoscreen_deliveries_dead") == 1
    assert series(m, "osteoscreen_deliveries") == {
        lbl(state="delivered"): 11, lbl(state="pending"): 1, lbl(state="dead"): 1, lbl(state="sending"): 0}
    # S09's heatmap: 2 failed attempts; S13's SR: 8; each delivered SR: its one attempt succeeded
    assert val(m, "osteoscreen_delivery_failures_total") == 10

    assert val(m, "osteoscreen_last_received_timestamp_seconds") == unix(datetime(2026, 11, 24, 9))
    assert val(m, "osteoscreen_last_reported_timestamp_seconds") == unix(datetime(2026, 11, 23, 9, 0, 20))
    # S12's SR, reported 2026-11-19 09:00:20, delivered 2 s later (S13's is dead)
    assert val(m, "osteoscreen_last_delivered_timestamp_seconds") == unix(datetime(2026, 11, 19, 9, 0, 22))

    assert series(m, "osteoscreen_processes_alive") == {
        lbl(role="listen"): 0, lbl(role="work"): 0, lbl(role="dispatch"): 0, lbl(role="web"): 0}
    assert series(m, "osteoscreen_circuit_open") == {lbl(destination=DESTINATION): 0}

    # bounded labels: no UID, patient or free text anywhere
    for _name, labels in m:
        for _k, v in labels:
            assert "1.2.826" not in v and "PID" not in v and "Patient" not in v and "refused" not in v


def _histogram(m: dict, name: str) -> tuple[list[tuple[float, float]], float, float]:
    buckets = sorted((float(dict(labels)["le"]), v) for labels, v in series(m, name + "_bucket").items())
    return buckets, val(m, name + "_count"), val(m, name + "_sum")


def test_latency_histograms(seeded):
    m = scrape(seeded)
    buckets, count, total = _histogram(m, "osteoscreen_received_to_reported_seconds")
    assert [b for b, _ in buckets] == [*BUCKETS, float("inf")]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    # every screened study: last image 09:00:05, reported 09:00:20 (S10: late image 09:59:45, re-reported
    # 10:00:00); the failed S11, skipped S08 and receiving S14 have none
    assert count == 11
    assert total == pytest.approx(11 * 15.0, abs=1e-3)
    by_le = dict(buckets)
    assert by_le[10.0] == 0
    assert by_le[15.0] == 11  # exactly 15 s is within le="15"
    assert by_le[20.0] == 11
    assert by_le[float("inf")] == 11

    buckets, count, total = _histogram(m, "osteoscreen_reported_to_delivered_seconds")
    by_le = dict(buckets)
    # delivered: S01-S07, S09, S10 (two reports), S12 → 11 SRs, each 2 s after its report
    assert count == 11
    assert total == pytest.approx(11 * 2.0, abs=1e-3)
    assert by_le[1.0] == 0 and by_le[2.0] == 11 and by_le[float("inf")] == 11


def test_histogram_moves_with_the_data(seeded):
    """A slow delivery lands in its own bucket: the SQL really computes per-row differences."""
    with seeded.session() as s:
        d = s.scalars(select(Delivery).where(Delivery.state == "delivered").order_by(Delivery.id)).first()
        d.delivered_at = d.created_at + timedelta(minutes=45)
        st = s.scalar(select(Study).where(Study.study_uid == uid(1)))
        st.reported_at = st.last_received_at + timedelta(seconds=100)
        s.commit()
    m = scrape(seeded)
    by_le = dict(_histogram(m, "osteoscreen_reported_to_delivered_seconds")[0])
    assert by_le[2.0] == 10 and by_le[1800.0] == 10 and by_le[3600.0] == 11
    assert val(m, "osteoscreen_reported_to_delivered_seconds_sum") == pytest.approx(10 * 2.0 + 2700.0, abs=1e-3)
    by_le = dict(_histogram(m, "osteoscreen_received_to_reported_seconds")[0])
    assert by_le[20.0] == 10 and by_le[60.0] == 10 and by_le[120.0] == 11
    assert val(m, "osteoscreen_received_to_reported_seconds_sum") == pytest.approx(10 * 15.0 + 100.0, abs=1e-3)


def test_followup_and_positive_categories(seeded):
    with seeded.session() as s:
        s4 = s.scalar(select(Study).where(Study.study_uid == uid(4)))
        s.add(Acknowledgement(study_id=s4.id, report_uid=s4.last_report_uid, by="coordinator", at=utcnow()))
        s.commit()
    assert val(scrape(seeded), "osteoscreen_followup_pending") == 2  # S12, S13
    with seeded.session() as s:  # a new report of S04 (still positive) needs a new look
        s.execute(update(Study).where(Study.study_uid == uid(4)).values(last_report_uid=f"{uid(4)}.99.2"))
        s.commit()
    assert val(scrape(seeded), "osteoscreen_followup_pending") == 3
    with seeded.session() as s:  # a revoked acknowledgement no longer counts: S05 is back
        s.execute(update(Acknowledgement).values(revoked_at=utcnow(), revoked_by="admin"))
        s.commit()
    m = scrape(seeded)
    assert val(m, "osteoscreen_followup_pending") == 4
    assert val(m, "osteoscreen_positive_studies") == 4

    # osteopenia positive too: S03 and S09 join; a separate Metrics for that setting
    m = scrape(seeded, ["osteopenia", "osteoporosis"])
    assert val(m, "osteoscreen_positive_studies") == 6
    assert val(m, "osteoscreen_followup_pending") == 6
    assert metrics_for(seeded, ["osteopenia", "osteoporosis"]) is not metrics_for(seeded, POSITIVE)
    with pytest.raises(ValueError):
        DatabaseCollector(seeded, ["positive"])


def test_delivery_failures_formula(seeded):
    with seeded.session() as s:
        delivered = s.scalars(select(Delivery).where(Delivery.state == "delivered").order_by(Delivery.id)).first()
        delivered.attempts = 3  # two failures, then success
        pending = s.scalar(select(Delivery).where(Delivery.state == "pending"))
        pending.state = "sending"  # claimed for its third attempt: the dispatcher counts it once it is done
        s.commit()
    m = scrape(seeded)
    assert val(m, "osteoscreen_delivery_failures_total") == 2 + 2 + 8
    assert val(m, "osteoscreen_queue_depth", queue="deliveries", state="sending") == 1
    assert val(m, "osteoscreen_queue_depth", queue="deliveries", state="pending") == 0


def test_heartbeat_and_circuit(seeded):
    with seeded.session() as s:
        Heartbeat(("work",), "x").beat(s)
    m = scrape(seeded)
    assert val(m, "osteoscreen_processes_alive", role="work") == 1
    assert val(m, "osteoscreen_processes_alive", role="listen") == 0
    with seeded.session() as s:  # a stale heartbeat is a dead process
        s.execute(update(ProcessHeartbeat).values(last_seen_at=utcnow() - timedelta(minutes=5)))
        s.commit()
    assert val(scrape(seeded), "osteoscreen_processes_alive", role="work") == 0

    with seeded.session() as s:
        s.execute(update(DestinationCircuit).where(DestinationCircuit.destination == DESTINATION)
                  .values(state="open"))
        s.commit()
    assert val(scrape(seeded), "osteoscreen_circuit_open", destination=DESTINATION) == 1
    with seeded.session() as s:
        s.execute(update(DestinationCircuit).values(state="closed"))
        s.commit()
    assert val(scrape(seeded), "osteoscreen_circuit_open", destination=DESTINATION) == 0


def test_empty_database(db_url):
    db = Database(db_url)
    try:
        m = scrape(db)
        assert val(m, "osteoscreen_database_up") == 1
        names = {n for n, _ in m}
        for what in ("received", "reported", "delivered"):  # nothing yet: no sample, not 0
            assert f"osteoscreen_last_{what}_timestamp_seconds" not in names
        assert val(m, "osteoscreen_received_to_reported_seconds_count") == 0
        assert val(m, "osteoscreen_received_to_reported_seconds_sum") == 0
        assert val(m, "osteoscreen_positive_studies") == 0
        assert series(m, "osteoscreen_instances_received_total") == {}
        assert series(m, "osteoscreen_circuit_open") == {}
    finally:
        db.dispose()


def test_render_is_cached_on_its_own_registry(seeded):
    metrics = metrics_for(seeded, POSITIVE)
    assert metrics_for(seeded, POSITIVE) is metrics
    assert isinstance(metrics, Metrics)
    assert val(scrape(seeded), "osteoscreen_jobs_failed") == 1
    # not the global registry: a process-wide /metrics would not double these
    assert not any(s.name.startswith("osteoscreen_") for fam in REGISTRY.collect() for s in fam.samples)
    # the cache holds the collector, never the values: the next scrape sees the database as it is
    with seeded.session() as s:
        s.execute(update(Study).where(Study.study_uid == uid(14)).values(status="queued"))
        s.commit()
    m = scrape(seeded)
    assert val(m, "osteoscreen_studies", status="queued") == 1
    assert val(m, "osteoscreen_studies", status="receiving") == 0


def test_database_down_is_a_sample_not_an_error(seeded):
    metrics = metrics_for(seeded, POSITIVE)
    engine, sessions = seeded.engine, seeded.sessions
    # nothing listens on port 1: every connection is refused
    seeded.engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/osteoscreen?connect_timeout=3")
    seeded.sessions = sessionmaker(seeded.engine)
    try:
        with pytest.raises(Exception):  # the failure is real
            with seeded.session() as s:
                s.execute(select(1))
        body, _ = metrics.render()
        samples = [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]
        assert [(s.name, s.value) for s in samples] == [("osteoscreen_database_up", 0)]
    finally:
        seeded.engine.dispose()
        seeded.engine, seeded.sessions = engine, sessions
    m = scrape(seeded)  # and it recovers
    assert val(m, "osteoscreen_database_up") == 1
    assert val(m, "osteoscreen_jobs_failed") == 1
