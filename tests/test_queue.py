"""Queue semantics on SQLite and PostgreSQL: settle, claim, lease expiry, completion, failure."""
from datetime import timedelta

from sqlalchemy import select

from osteoscreen.store import queue
from osteoscreen.store.db import Database
from osteoscreen.store.models import Delivery, Finding, Job, Study, utcnow


def meta(study="1.2.3", sop="1.2.3.1", eligible=True):
    return queue.InstanceMeta(study_uid=study, series_uid="1.2.3.9", sop_instance_uid=sop,
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                              modality="DX", patient_id="P1", patient_name="A^B", accession_number=None,
                              study_date="20260101", age_years=70.0, sex="F", bmi=None,
                              region="hip" if eligible else None, view="ap" if eligible else None,
                              eligible=eligible, skip_reason=None if eligible else "chest")


def queued_study(db_url) -> Database:
    """A fresh database holding one study with one eligible image, settled into a queued job."""
    db = Database(db_url)
    with db.session() as s:
        queue.record_instance(s, meta(), "/x/a.dcm", None)
        s.commit()
        queue.settle_studies(s, 0, now=utcnow() + timedelta(seconds=1))
    return db


def test_settle_claim_complete(db_url):
    db = Database(db_url)
    with db.session() as s:
        queue.record_instance(s, meta(), "/x/a.dcm", "MOD")
        _, new = queue.record_instance(s, meta(), "/x/b.dcm", "MOD")
        assert not new  # a re-sent instance is not a new image
        queue.record_instance(s, meta(study="9.9", sop="9.9.1", eligible=False), "/x/c.dcm", "MOD")
        s.commit()
        assert queue.settle_studies(s, 60) == []  # not quiet long enough
        created = queue.settle_studies(s, 60, now=utcnow() + timedelta(seconds=61))
        assert len(created) == 1  # the chest-only study is skipped, not queued
        statuses = dict(s.execute(select(Study.study_uid, Study.status)).all())
        assert statuses == {"1.2.3": "queued", "9.9": "skipped"}
        assert queue.settle_studies(s, 0) == []  # settling twice queues nothing new
    with db.session() as s:
        job = queue.claim_job(s, "w1", 60, 3)
        assert job is not None and job.attempts == 1
        assert queue.claim_job(s, "w2", 60, 3) is None  # leased
    with db.session() as s:
        done = queue.complete_job(s, job.id, "w1", [Finding(study_id=job.study_id, job_id=job.id, sop_instance_uid="1.2.3.1",
                                                            site="left_hip", assessable=True, category="normal",
                                                            model_name="m", model_version="1")],
                                  [Delivery(study_id=job.study_id, sop_instance_uid="5.5", kind="sr", path="/o",
                                            destination="P@h:1")], "5.5", "/o")
        assert done
        assert s.scalar(select(Study.status).where(Study.study_uid == "1.2.3")) == "screened"
        assert s.scalar(select(Job.state)) == "done"
    db.dispose()


def test_expired_lease_returns_job_and_stale_owner_cannot_complete(db_url):
    db = queued_study(db_url)
    with db.session() as s:
        job = queue.claim_job(s, "dead-worker", 60, 3)
        s.query(Job).filter(Job.id == job.id).update({"lease_expires_at": utcnow() - timedelta(seconds=1)})
        s.commit()
    with db.session() as s:
        again = queue.claim_job(s, "w2", 60, 3)
        assert again.id == job.id and again.attempts == 2 and again.lease_owner == "w2"
    with db.session() as s:
        assert not queue.complete_job(s, job.id, "dead-worker", [], [], None, None)
        assert queue.complete_job(s, job.id, "w2", [], [], None, None)
    db.dispose()


def test_failures_are_bounded(db_url):
    db = queued_study(db_url)
    states = []
    for _ in range(3):
        with db.session() as s:
            job = queue.claim_job(s, "w", 60, 3)
            states.append(queue.fail_job(s, job.id, "w", "boom", 3))
    assert states == ["queued", "queued", "failed"]
    with db.session() as s:
        assert queue.claim_job(s, "w", 60, 3) is None
        assert s.scalar(select(Study.status)) == "failed"
        assert s.scalar(select(Job.error)) == "boom"
    db.dispose()


def test_late_image_reopens_reported_study(db_url):
    db = queued_study(db_url)
    with db.session() as s:
        job = queue.claim_job(s, "w", 60, 3)
        queue.complete_job(s, job.id, "w", [], [], "7.7", "/o/sr.dcm")
    with db.session() as s:
        queue.record_instance(s, meta(sop="1.2.3.2"), "/x/b.dcm", None)
        s.commit()
        study = s.scalar(select(Study))
        assert study.status == "receiving" and study.last_report_uid == "7.7"
        assert len(queue.settle_studies(s, 0, now=utcnow() + timedelta(seconds=1))) == 1
    db.dispose()


def test_a_pooled_connection_closed_by_the_server_is_replaced_after_resting(db_url, monkeypatch):
    """What pool_pre_ping gave, without its round trip per transaction: a connection that rested in
    the pool (here terminated by PostgreSQL meanwhile, as a restart or an idle timeout would) is
    pinged at checkout and replaced, so the caller never sees the dead one."""
    if not db_url.startswith("postgresql"):
        return  # SQLite has no server to lose
    from sqlalchemy import text

    from osteoscreen.store import db as store_db
    db = queued_study(db_url)
    with db.session() as s:
        first_pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
        s.commit()
    from sqlalchemy import create_engine
    admin = create_engine(db_url)  # the server ends the pooled connection
    with admin.connect() as other:
        assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid}).scalar()
    admin.dispose()
    monkeypatch.setattr(store_db, "IDLE_PING_SECONDS", 0.0)  # it has rested "long enough"
    with db.session() as s:
        job = queue.claim_job(s, "w1", 60, 3)  # would raise on the terminated connection
        pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
    assert job is not None and pid != first_pid
    db.dispose()
