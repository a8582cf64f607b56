"""The settle timer: a study becomes a job when it has been quiet settle_seconds; the settle tick plans
its next run for the moment the earliest receiving study is due (scheduler.py), so that a study is not
left waiting for the regular tick."""
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from osteoscreen.config import load
from osteoscreen.scheduler import SETTLE_MARGIN, build_scheduler
from osteoscreen.store import queue
from osteoscreen.store.db import Database
from osteoscreen.store.models import Study, utcnow

from .test_queue import meta


def _received(db: Database, study: str, seconds_ago: float) -> datetime:
    """Record one image of `study` whose last image arrived `seconds_ago`; returns that time."""
    when = utcnow() - timedelta(seconds=seconds_ago)
    with db.session() as s:
        queue.record_instance(s, meta(study=study, sop=f"{study}.1"), f"/x/{study}.dcm", None)
        s.commit()
        s.execute(update(Study).where(Study.study_uid == study).values(last_received_at=when))
        s.commit()
    return when


def test_next_settle_due_is_the_earliest_receiving_study_plus_settle(db_url):
    db = Database(db_url)
    try:
        with db.session() as s:
            assert queue.next_settle_due(s, 10) is None
        older = _received(db, "1.1", 4)
        _received(db, "1.2", 1)
        with db.session() as s:
            assert queue.next_settle_due(s, 10) == older + timedelta(seconds=10)
            # once the older one is queued, the other one is next
            queue.settle_studies(s, 3)
            assert queue.next_settle_due(s, 10) > older + timedelta(seconds=10)
    finally:
        db.dispose()


def test_the_settle_tick_plans_its_next_run_for_the_due_study(tmp_path, db_url):
    settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url, "settle_seconds": "60"})
    db = Database(db_url)
    sched = build_scheduler(settings, db, settle=True, dispatch=False, retention=False)
    sched.start(paused=True)  # nothing runs by itself: the tick is called below
    try:
        tick = sched.get_job("settle")
        soon = datetime.now(timezone.utc) + timedelta(seconds=10)
        sched.modify_job("settle", next_run_time=soon)

        _received(db, "2.1", 30)  # due in 30 s: later than the tick already planned, which stays
        tick.func()
        assert sched.get_job("settle").next_run_time == soon

        later = datetime.now(timezone.utc) + timedelta(hours=1)
        sched.modify_job("settle", next_run_time=later)
        last = _received(db, "2.2", 45)  # due in 15 s, before the planned tick: moved to that moment
        tick.func()
        planned = sched.get_job("settle").next_run_time
        assert planned == last.replace(tzinfo=timezone.utc) + timedelta(seconds=60) + SETTLE_MARGIN

        _received(db, "2.3", 90)  # already due: this tick queues it, and plans nothing in the past
        tick.func()
        with db.session() as s:
            assert s.get(Study, 3).status == "queued"
        assert sched.get_job("settle").next_run_time == planned
    finally:
        sched.shutdown(wait=False)
        db.dispose()
