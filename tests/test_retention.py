"""Retention on SQLite and PostgreSQL: exactly the old, finished data goes; nothing still needed."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from osteoscreen.config import ConfigError, load
from osteoscreen.scheduler import build_scheduler, run_retention
from osteoscreen.store.db import Database
from osteoscreen.store.models import AuditEvent, Delivery, Finding, Instance, Job, Study, utcnow
from osteoscreen.store.retention import purge

NAME, PID = "ROE^RICHARD", "PID-0815"
DEST1, DEST2 = "PACS@10.0.0.1:104", "ARCHIVE@10.0.0.2:104"


class World:
    """Studies in every state, with real files in the spool and outbox (old day folders)."""

    def __init__(self, tmp_path: Path, db_url: str):
        self.settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url})
        self.db = Database(db_url)
        self.now = utcnow()
        self.n = 0
        self.outside = tmp_path / "elsewhere"
        self.outside.mkdir()

    def file(self, root: Path, day: str = "20200101") -> str:
        self.n += 1
        folder = root / day
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.n:032x}.dcm"
        path.write_bytes(b"DICM")
        return str(path)

    def study(self, uid: str, status: str, age_days: float, *, reported: bool = True, images: int = 2,
              results: dict[str, list[tuple[str, str, float | None]]] | None = None,
              image_root: Path | None = None) -> dict:
        """results: kind -> [(destination, state, delivered age in days)]; one file per kind."""
        at = self.now - timedelta(days=age_days)
        out = {"spool": [], "outbox": {}}
        with self.db.session() as s:
            st = Study(study_uid=uid, patient_name=NAME, patient_id=PID, status=status,
                       first_received_at=at, last_received_at=at, reported_at=at if reported else None)
            s.add(st)
            s.flush()
            for i in range(images):
                path = self.file(image_root or self.settings.spool_dir)
                out["spool"].append(path)
                s.add(Instance(study_id=st.id, sop_instance_uid=f"{uid}.{i}", sop_class_uid="1.2", path=path,
                               eligible=True, received_at=at))
            if reported:
                job = Job(study_id=st.id, state="done", attempts=1, created_at=at, finished_at=at)
                s.add(job)
                s.flush()
                s.add(Finding(study_id=st.id, job_id=job.id, sop_instance_uid=f"{uid}.0", site="left_hip",
                              assessable=True, category="normal", model_name="m", model_version="1", created_at=at))
            for kind, sends in (results or {}).items():
                path = self.file(self.settings.outbox_dir)
                out["outbox"][kind] = path
                for dest, state, delivered_age in sends:
                    s.add(Delivery(study_id=st.id, sop_instance_uid=f"{uid}.{kind}", kind=kind, path=path,
                                   destination=dest, state=state, created_at=at,
                                   delivered_at=None if delivered_age is None else
                                   self.now - timedelta(days=delivered_age)))
                if kind == "sr":
                    st.last_report_uid, st.last_report_path = f"{uid}.sr", path
            s.commit()
        return out

    def purge(self, **days):
        with self.db.session() as s:
            return purge(s, spool_root=self.settings.spool_dir, outbox_root=self.settings.outbox_dir,
                         now=self.now, **{"spool_days": 30, "outbox_days": 30, "rows_days": 0, **days})

    def count(self, model) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def world(tmp_path, db_url):
    w = World(tmp_path, db_url)
    yield w
    w.db.dispose()


def exists(paths) -> list[bool]:
    return [Path(p).exists() for p in paths]


def test_retention_removes_exactly_the_old_finished_files_and_rows(world):
    # A: reported 40 days ago; SR (its latest report) and heatmap delivered to both destinations long ago
    a = world.study("1.1", "screened", 40, results={"sr": [(DEST1, "delivered", 40), (DEST2, "delivered", 40)],
                                                   "heatmap": [(DEST1, "delivered", 40), (DEST2, "delivered", 39)]})
    # B: reported 5 days ago: nothing goes
    b = world.study("1.2", "screened", 5, results={"sr": [(DEST1, "delivered", 5)], "heatmap": [(DEST1, "delivered", 5)]})
    # C: old but still receiving (never reported), Q: queued, F: failed: their images stay
    c = world.study("1.3", "receiving", 40, reported=False)
    q = world.study("1.4", "queued", 40, reported=False)
    f = world.study("1.5", "failed", 40, reported=False)
    # D: reported long ago, but a heatmap is dead at one destination and the KOS still pending
    d = world.study("1.6", "screened", 40, results={"sr": [(DEST1, "delivered", 40)],
                                                   "heatmap": [(DEST1, "delivered", 40), (DEST2, "dead", None)],
                                                   "kos": [(DEST1, "pending", None)]})
    # E: skipped long ago (nothing to screen): done, its images go
    e = world.study("1.7", "skipped", 40, reported=False)
    # R: reported long ago but re-opened by a late image (receiving again): keeps its images and its
    # latest SR; its old heatmap, delivered, is not needed any more
    r = world.study("1.8", "receiving", 40, results={"sr": [(DEST1, "delivered", 40)],
                                                    "heatmap": [(DEST1, "delivered", 40)]})
    # O: old and done, but its image lies outside the spool folder: never removed
    o = world.study("1.9", "screened", 40, images=1, image_root=world.outside)
    rows_before = {m: world.count(m) for m in (Study, Instance, Job, Finding, Delivery)}

    report = world.purge()
    assert exists(a["spool"]) == [False, False] and exists(d["spool"]) == [False, False]
    assert exists(e["spool"]) == [False, False]
    for kept in (b, c, q, f, r, o):
        assert all(exists(kept["spool"]))
    # delivered everywhere more than 30 days ago
    assert exists([a["outbox"]["heatmap"], r["outbox"]["heatmap"]]) == [False, False]
    # each study's latest SR stays: the next report references it as its predecessor
    assert exists([a["outbox"]["sr"], r["outbox"]["sr"]]) == [True, True]
    assert all(exists(b["outbox"].values()))
    assert all(exists(d["outbox"].values()))  # SR: latest report; heatmap: dead somewhere; KOS: pending
    assert (report.spool_files, report.spool_studies, report.outbox_files) == (6, 3, 2)
    assert (report.studies, report.instances, report.deliveries) == (0, 0, 0)
    assert {m: world.count(m) for m in rows_before} == rows_before  # rows_days = 0: no rows go
    with world.db.session() as s:
        purged = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.purged_at.is_not(None))))
        assert purged == {"1.1.0", "1.1.1", "1.6.0", "1.6.1", "1.7.0", "1.7.1"}
        assert set(s.scalars(select(Delivery.sop_instance_uid).where(Delivery.purged_at.is_not(None)))) == {"1.1.heatmap", "1.8.heatmap"}
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.event == "retention_purge")).all()
        assert "spool_files=6" in event.detail and "outbox_files=2" in event.detail
        assert NAME not in event.detail and PID not in event.detail and event.study_uid is None
    assert (world.settings.spool_dir / "20200101").is_dir()  # a day folder with files left stays

    assert not world.purge()  # a second pass finds nothing, and audits nothing
    with world.db.session() as s:
        assert s.scalar(select(func.count()).where(AuditEvent.event == "retention_purge")) == 1

    # rows: only studies done more than 35 days ago with nothing in flight (A, E; not D: KOS pending)
    report = world.purge(rows_days=35)
    assert (report.studies, report.instances, report.jobs, report.findings, report.deliveries) == (2, 4, 1, 1, 4)
    with world.db.session() as s:
        assert set(s.scalars(select(Study.study_uid))) == {"1.2", "1.3", "1.4", "1.5", "1.6", "1.8", "1.9"}
        assert s.scalar(select(func.count()).select_from(Delivery).where(Delivery.study_id.not_in(
            select(Study.id)))) == 0
    assert not Path(a["outbox"]["sr"]).exists()  # the study is forgotten: its last SR goes with it
    assert all(exists(d["outbox"].values())) and all(exists(o["spool"]))


def test_zero_days_keeps_everything(world):
    old = world.study("2.1", "screened", 4000, results={"heatmap": [(DEST1, "delivered", 4000)]})
    assert not world.purge(spool_days=0, outbox_days=0, rows_days=0)
    assert all(exists(old["spool"])) and all(exists(old["outbox"].values()))


def test_emptied_old_day_folders_are_removed(world):
    only = world.study("3.1", "skipped", 40, reported=False)
    folder = Path(only["spool"][0]).parent
    assert world.purge().spool_files == 2
    assert not folder.exists() and world.settings.spool_dir.is_dir()


def test_scheduled_in_the_listen_role_with_configured_ages(tmp_path, db_url):
    settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url})
    db = Database(db_url)
    try:
        assert "retention" in [j.id for j in build_scheduler(settings, db, settle=True, dispatch=False).get_jobs()]
        assert "retention" not in [j.id for j in build_scheduler(settings, db, settle=False).get_jobs()]
        settings.retention.spool_days = settings.retention.outbox_days = 0
        assert "retention" not in [j.id for j in build_scheduler(settings, db).get_jobs()]
        assert not run_retention(settings, db)  # runs with the settings' folders, on an empty node
    finally:
        db.dispose()


def test_retention_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("retention:\n  spool_days: 7\n  rows_days: 365\n")
    r = load(cfg).retention
    assert (r.spool_days, r.outbox_days, r.rows_days) == (7, 30, 365)
    with pytest.raises(ConfigError, match="retention.outbox_days"):
        load(None, environ={"OSTEOSCREEN_RETENTION__OUTBOX_DAYS": "-1"})
    with pytest.raises(ConfigError, match="dispatch_circuit_failures"):
        load(None, {"dispatch_circuit_failures": -1})
