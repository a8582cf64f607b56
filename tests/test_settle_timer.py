"""The settle timer: a study becomes a job when it has been quiet settle_seconds; the settle tick plans
its next run for the moment the earliest receiving study is due (scheduler.py), so that a study is not
left waiting for the regular tick."""
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from osteoscreen.config import load
from osteoscreen.scheduler import build_scheduler, settle_interval
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


def test_a_study_due_before_the_next_tick_is_settled_on_time(tmp_path, db_url):
    """The tick waits for a study falling due before the next regular tick and queues it then; one due
    later is left to a later tick."""
    settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url, "settle_seconds": "10"})
    db = Database(db_url)
    sched = build_scheduler(settings, db, settle=True, dispatch=False, retention=False)
    try:
        tick = sched.get_job("settle").func  # called here, not by the (unstarted) scheduler
        assert settle_interval(10) == 1.0
        _received(db, "2.1", 5)  # due in 5 s, after the next regular tick: not waited for
        last = _received(db, "2.2", 9.6)  # due in 0.4 s, before the next tick: waited for
        tick()
        with db.session() as s:
            late, soon = s.get(Study, 1), s.get(Study, 2)
            assert (late.status, soon.status) == ("receiving", "queued")
        assert utcnow() >= last + timedelta(seconds=10)  # it was queued at its time, not before
    finally:
        db.dispose()


def test_stopping_during_a_waiting_tick_returns(tmp_path, db_url):
    """shutdown(wait=True) waits for a running tick; the tick must not need the scheduler meanwhile
    (it holds its job store lock while it waits): a study due in 0.5 s keeps the tick waiting."""
    settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url, "settle_seconds": "10"})
    db = Database(db_url)
    _received(db, "3.1", 9.5)
    sched = build_scheduler(settings, db, settle=True, dispatch=False, retention=False)
    sched.start()
    sched.modify_job("settle", next_run_time=datetime.now(timezone.utc))  # tick now
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not sched._executors["default"]._instances:
            time.sleep(0.01)
        stopper = threading.Thread(target=sched.shutdown, kwargs={"wait": True}, daemon=True)
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "shutdown hung on the settle tick"
    finally:
        db.dispose()
