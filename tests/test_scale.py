"""Scale-out on PostgreSQL: workers that claim several jobs, batch their sites through the model, and
real processes killed with SIGKILL while they work.

In-process (SQLite and PostgreSQL): `queue.claim_jobs` hands out disjoint batches, `renew_leases`
renews only what the caller still holds, `screen_studies` gives each study what `screen_study` gives
it alone, and a worker's batch fails only the job whose study fails.

Processes (PostgreSQL only, like a multi-host deployment): one `osteoscreen listen`, three
`osteoscreen work`, one `osteoscreen dispatch`, one fresh database, one storage folder, DCMTK storescp
as the PACS. 200 studies arrive with storescu and a worker is killed while it holds leases; then a
listener is killed during a burst and restarted. Every study is reported exactly once and every
result object reaches the PACS once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select, text

from osteoscreen import worker as worker_module
from osteoscreen.config import Destination, Settings
from osteoscreen.model.inference import LoadedModel
from osteoscreen.pipeline import screen as screen_module
from osteoscreen.pipeline.dicom_io import resample
from osteoscreen.pipeline.screen import StudyImage, screen_studies, screen_study
from osteoscreen.store import queue
from osteoscreen.store.db import Database
from osteoscreen.store.models import Finding, Job, Study, utcnow
from osteoscreen.synth import make_study
from osteoscreen.worker import Worker

from .conftest import PG_DSN, _pg_admin, require_tool
from .test_node_e2e import OSTEOSCREEN, free_port, port_open, wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


# -- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel(Settings().model_path, "cpu", threads=1)


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database (skipped locally without a server, a failure under CI)."""
    admin = _pg_admin()
    name = f"osteo_scale_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_DSN.split())
    yield (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
           f"{params.get('port', '5432')}/{name}")
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def meta(study: str, sop: str) -> queue.InstanceMeta:
    return queue.InstanceMeta(study_uid=study, series_uid=study + ".9", sop_instance_uid=sop, sop_class_uid=DX_CLASS,
                              transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX", patient_id=None,
                              patient_name=None, accession_number=None, study_date=None, age_years=None, sex=None,
                              bmi=None, region="hip", view="ap", eligible=True, skip_reason=None)


def queue_studies(db: Database, paths: list[str]) -> list[int]:
    """One queued job per path (a one-image hip study each); returns the job ids in order."""
    with db.session() as s:
        for i, path in enumerate(paths):
            queue.record_instance(s, meta(f"1.2.826.0.1.{i + 1}", f"1.2.826.0.1.{i + 1}.1"), str(path), None)
        s.commit()
        return queue.settle_studies(s, 0, now=utcnow() + timedelta(seconds=1))


def shrunk(ds: pydicom.Dataset, spacing_mm: float = 0.5) -> pydicom.Dataset:
    """The phantom at the pipeline's 0.5 mm working spacing (area averaged, as the pipeline does):
    a seventh of the bytes, so that 200 studies cross the network and the spool cheaply."""
    ds = deepcopy(ds)
    source = float(ds.PixelSpacing[0])
    small = resample(ds.pixel_array.astype(np.float32), source / spacing_mm)
    ds.PixelData = np.round(small).astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = small.shape
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            ds[keyword].value = [f"{float(v) * spacing_mm / source:.6g}" for v in ds[keyword].value]
    return ds


def write_copies(bases: list[pydicom.Dataset], count: int, folder: Path,
                 tag: str) -> list[tuple[Path, pydicom.Dataset]]:
    """`count` distinct one-image studies: the base phantoms in turn, each copy with fresh Study, Series
    and SOP Instance UIDs, a fresh patient name and ID (the logs must name none of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        ds = deepcopy(bases[i % len(bases)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = f"{tag}{i:05d}", f"{tag}FAMILY{i:04d}^GIVEN"
        ds.AccessionNumber = f"A{tag}{i:05d}"[:16]
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, ds))
    return out


@pytest.fixture(scope="module")
def hip_bases() -> list[pydicom.Dataset]:
    """Four pelvis phantoms (hip AP), shrunk to the working spacing."""
    return [shrunk(make_study("hip", np.random.default_rng(seed), patient_index=seed)[0].dataset)
            for seed in (1, 3, 5, 7)]


class Proc:
    """One `osteoscreen <role>` process with its own log file."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path, port: int | None = None):
        self.name, self.args, self.env, self.port = name, args, env, port
        self.log = logs / f"{name}.log"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        if self.port is not None:
            assert wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 90) and \
                self.proc.poll() is None, self.log.read_text()[-3000:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Deployment:
    """The roles as separate processes on one database and one storage folder; storescp as the PACS."""

    def __init__(self, tmp_path: Path, db_url: str, settle: float):
        require_tool("storescp")
        self.tmp, self.db_url = tmp_path, db_url
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.pacs_dir = tmp_path / "pacs"
        self.pacs_dir.mkdir()
        self.pacs_port, self.port = free_port(), free_port()
        # +uf: every object received gets its own file, so a duplicate delivery would show as two files
        self.pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(self.pacs_dir), "+uf", "+xa",
                                      str(self.pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: port_open(self.pacs_port), 10)
        self.env = {**os.environ, "OSTEOSCREEN_SETTLE_SECONDS": str(settle), "OSTEOSCREEN_POLL_SECONDS": "0.2",
                    "OSTEOSCREEN_LEASE_SECONDS": "6", "OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1",
                    "OSTEOSCREEN_DEVICE": "cpu", "OSTEOSCREEN_MODEL_THREADS": "1",
                    "OSTEOSCREEN_WORKER_BATCH_STUDIES": "4", "OSTEOSCREEN_DISPATCH_BACKOFF_SECONDS": "0.5"}
        self.procs: list[Proc] = []
        self.engine = create_engine(db_url)

    def role(self, role: str, name: str) -> Proc:
        args = [*OSTEOSCREEN, role, "--database-url", self.db_url, "--storage", str(self.tmp / "var"),
                "--destination", f"PACS@127.0.0.1:{self.pacs_port}", "--port", str(self.port)]
        proc = Proc(name, args, self.env, self.logs, port=self.port if role == "listen" else None)
        self.procs.append(proc)
        return proc

    def sql(self, query: str, **params):
        with self.engine.connect() as c:
            return c.execute(text(query), params).all()

    def received(self) -> list[Path]:
        return [p for p in self.pacs_dir.iterdir() if p.is_file()]

    def log_text(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.read_text(errors='replace')}" for p in sorted(self.logs.iterdir()))

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.pacs.terminate()
        self.pacs.wait(10)
        self.engine.dispose()


@contextmanager
def deployment(tmp_path: Path, db_url: str, settle: float):
    dep = Deployment(tmp_path, db_url, settle)
    try:
        yield dep
    except BaseException:
        for path in sorted(dep.logs.iterdir()):  # the story of each process, for the failure report
            print(f"===== {path.name} (last 6000 characters) =====\n{path.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        dep.close()


def assert_no_patient_identifiers(dep: Deployment, datasets: list[pydicom.Dataset]) -> None:
    logs = dep.log_text()
    assert "stored" in logs and "screened" in logs  # the processes did log their work …
    for ds in datasets:  # … without a patient's name or ID
        assert str(ds.PatientID) not in logs and str(ds.PatientName).split("^")[0] not in logs


def pacs_objects(dep: Deployment) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID",
                                                                        "StudyInstanceUID"])
            for p in dep.received()]


# -- the queue: batches of jobs ------------------------------------------------------------------------
def test_claim_jobs_hands_out_disjoint_batches_oldest_first(db_url):
    db = Database(db_url)
    try:
        ids = queue_studies(db, [f"/x/{i}.dcm" for i in range(10)])
        with db.session() as s:
            a = [j.id for j in queue.claim_jobs(s, "w1", 60, 3, limit=4)]
            b = [j.id for j in queue.claim_jobs(s, "w2", 60, 3, limit=4)]
            c = queue.claim_jobs(s, "w3", 60, 3, limit=4)
            assert queue.claim_jobs(s, "w4", 60, 3, limit=4) == []
        assert a == ids[:4] and b == ids[4:8] and [j.id for j in c] == ids[8:]
        assert all(j.state == "running" and j.lease_owner == "w3" and j.attempts == 1 for j in c)
        with db.session() as s:
            # the heartbeat renews what its owner holds, nothing else
            assert queue.renew_leases(s, a + b, "w1", 60) == set(a)
            assert queue.complete_job(s, a[0], "w1", [], [], None, None)
            assert queue.renew_leases(s, a, "w1", 60) == set(a[1:])  # a finished job is no longer held
            # w1 dies: its leases expire and its unfinished jobs are claimable again, with another attempt
            s.execute(text("UPDATE jobs SET lease_expires_at = :t WHERE lease_owner = 'w1'"),
                      {"t": utcnow() - timedelta(seconds=1)})
            s.commit()
        with db.session() as s:
            # a retried job comes alone (were it what killed w1, it would take no batch down with it)
            batches = [queue.claim_jobs(s, "w4", 60, 3, limit=10) for _ in a[1:]]
            assert [[j.id for j in batch] for batch in batches] == [[i] for i in a[1:]]
            again = [batch[0] for batch in batches]
            assert all(j.attempts == 2 and j.lease_owner == "w4" for j in again)
            assert queue.renew_leases(s, a[1:], "w1", 60) == set()  # the dead owner holds nothing now
            assert queue.held_by_others(s, a, "w1") == set(a[1:])  # w4 took them over; a[0] was w1's own
            assert queue.held_by_others(s, a[1:], "w4") == set()
            assert not queue.complete_job(s, a[1], "w1", [], [], None, None)
            assert queue.fail_job(s, a[2], "w1", "late failure of a dead owner", 3) == "running"  # not its job
            assert s.scalar(select(Job.lease_owner).where(Job.id == a[2])) == "w4"
            assert queue.claim_job(s, "w5", 60, 3) is None  # claim_job still works: nothing left
    finally:
        db.dispose()


def test_concurrent_claims_on_postgresql_never_share_a_job(pg_url):
    """Six threads (each its own connection) drain 60 jobs in batches of four: every job once."""
    db = Database(pg_url)
    try:
        ids = queue_studies(db, [f"/x/{i}.dcm" for i in range(60)])
        claimed: dict[str, list[int]] = {}
        start = threading.Barrier(6)

        def drain(owner: str) -> None:
            mine = claimed.setdefault(owner, [])
            start.wait()
            while True:
                with db.session() as s:
                    jobs = queue.claim_jobs(s, owner, 60, 3, limit=4)
                    if not jobs:
                        return
                    mine += [j.id for j in jobs]
                    for j in jobs:
                        assert queue.complete_job(s, j.id, owner, [], [], None, None)

        threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = [i for mine in claimed.values() for i in mine]
        assert sorted(every) == ids  # each job claimed exactly once
        assert sum(1 for mine in claimed.values() if mine) >= 2  # and the work was actually shared
        with db.session() as s:
            assert Counter(s.scalars(select(Job.state)).all()) == {"done": 60}
    finally:
        db.dispose()


def test_two_listeners_record_the_first_images_of_one_new_study_at_once(pg_url):
    """Listener A has inserted a new study but not committed; listener B receives another image of
    it: B waits for A's commit, then files its image under A's study row (no unique-key failure)."""
    db = Database(pg_url)
    try:
        a = db.session()
        queue.record_instance(a, meta("1.2.826.0.7", "1.2.826.0.7.1"), "/x/a.dcm", None)  # flushed, not committed
        result: dict = {}

        def listener_b() -> None:
            with db.session() as b:
                try:
                    inst, new = queue.record_instance(b, meta("1.2.826.0.7", "1.2.826.0.7.2"), "/x/b.dcm", None)
                    b.commit()
                    result["new"] = new
                except Exception as exc:  # pragma: no cover - the failure this test guards against
                    result["error"] = exc

        thread = threading.Thread(target=listener_b)
        thread.start()
        time.sleep(0.5)  # B is now blocked on A's uncommitted study row
        assert thread.is_alive()
        a.commit()
        a.close()
        thread.join(10)
        assert result == {"new": True}
        with db.session() as s:
            (study,) = s.scalars(select(Study)).all()
            assert len(study.instances) == 2
    finally:
        db.dispose()


# -- the pipeline: several studies, one model call ---------------------------------------------------
@pytest.fixture(scope="module")
def mixed_studies() -> list[list[StudyImage]]:
    """Studies of every kind a batch may mix: two pelves, a lumbar AP + lateral (fused), a hip
    lateral (unsupported view) and a blank image (not a screening image)."""
    pos = make_study("hip", np.random.default_rng(1), patient_index=1)[0].dataset
    neg = make_study("hip", np.random.default_rng(3), patient_index=3)[0].dataset
    lumbar = [StudyImage(im.dataset, "lumbar", im.view)
              for im in make_study("lumbar", np.random.default_rng(10), patient_index=10)]
    blank = shrunk(make_study("hip", np.random.default_rng(5), patient_index=5)[0].dataset)
    blank.PixelData = np.full((blank.Rows, blank.Columns), 100, np.uint16).tobytes()
    return [[StudyImage(pos, "hip", "ap")], lumbar, [StudyImage(neg, "hip", "ap")],
            [StudyImage(neg, "hip", "lat")], [StudyImage(blank, "hip", "ap")]]


def _close(a, b) -> bool:
    return a == b if a is None or b is None else abs(a - b) <= 1e-5


def assert_same_findings(alone, together) -> None:
    """Equal in everything that decides a report: per image, the sites and their assessability,
    reason, category, box, localisation confidence, region names and fused views, exactly; the
    network's numbers (probabilities, T-scores, the heatmap) to 1e-5. (CPU convolutions pick their
    summation order by batch size, so crops scored in a batch of 6 and in one of 2 differ by ~1e-7
    in float32: a batch cannot promise bit-identical floats, only the same findings.)"""
    assert len(alone) == len(together)
    for ra, rb in zip(alone, together):
        assert (ra.sop_instance_uid, ra.assessable, ra.reason) == (rb.sop_instance_uid, rb.assessable, rb.reason)
        assert len(ra.sites) == len(rb.sites)
        for fa, fb in zip(ra.sites, rb.sites):
            assert (fa.site, fa.source_sop_instance_uid, fa.assessable, fa.reason, fa.category, fa.box,
                    fa.confidence, fa.fused_with, sorted(fa.regions or {})) == \
                   (fb.site, fb.source_sop_instance_uid, fb.assessable, fb.reason, fb.category, fb.box,
                    fb.confidence, fb.fused_with, sorted(fb.regions or {}))
            assert _close(fa.t_score, fb.t_score)
            assert (fa.probabilities is None) == (fb.probabilities is None)
            for c in fa.probabilities or {}:
                assert abs(fa.probabilities[c] - fb.probabilities[c]) <= 1e-4 + 1e-9  # rounded to 4 places
            for r in fa.regions or {}:
                assert _close(fa.regions[r], fb.regions[r])
        assert (ra.heatmap is None) == (rb.heatmap is None) and (ra.display is None) == (rb.display is None)
        if ra.heatmap is not None:
            assert ra.heatmap.shape == rb.heatmap.shape and np.abs(ra.heatmap - rb.heatmap).max() <= 1e-5
            assert np.array_equal(ra.display, rb.display) and ra.display_scale == rb.display_scale


@pytest.mark.parametrize("heatmaps", [True, False])
def test_screen_studies_gives_each_study_what_screen_study_gives_it(model, mixed_studies, monkeypatch, heatmaps):
    alone = [screen_study(images, model, heatmaps=heatmaps) for images in mixed_studies]
    calls = []
    real = model.predict
    monkeypatch.setattr(model, "predict", lambda crops, *a, **kw: calls.append(len(crops)) or real(crops, *a, **kw))
    together = screen_studies(mixed_studies, model, heatmaps=heatmaps)
    assert calls == [2 + 2 + 2]  # one model call: both hips of two pelves, the lumbar spine on two views
    for a, b in zip(alone, together):
        assert_same_findings(a, b)
    lumbar = [f for r in together[1] for f in r.sites]
    assert all(f.assessable and f.fused_with for f in lumbar), lumbar  # fusion stayed within its study
    assert [r.reason for r in together[3]] == ["unsupported_view"] and not together[4][0].assessable


def test_screen_studies_isolates_a_study_that_throws(model, mixed_studies, monkeypatch):
    bad = str(mixed_studies[2][0].dataset.SOPInstanceUID)
    real = screen_module._locate_and_gate

    def poisoned(ds, *a, **kw):
        if str(ds.SOPInstanceUID) == bad:
            raise RuntimeError("poison")
        return real(ds, *a, **kw)

    monkeypatch.setattr(screen_module, "_locate_and_gate", poisoned)
    out = screen_studies(mixed_studies[:3], model, heatmaps=False, return_exceptions=True)
    assert isinstance(out[2], RuntimeError) and not isinstance(out[0], Exception) and not isinstance(out[1], Exception)
    assert_same_findings(screen_study(mixed_studies[0], model, heatmaps=False), out[0])
    with pytest.raises(RuntimeError):
        screen_studies(mixed_studies[:3], model, heatmaps=False)


# -- the worker: a batch of jobs, each completing or failing alone -------------------------------------
def test_worker_batch_completes_each_job_and_sets_a_poison_job_aside(tmp_path, db_url, model, hip_bases, monkeypatch):
    files = write_copies(hip_bases, 5, tmp_path / "in", tag="WB")
    paths = [str(p) for p, _ in files]
    paths[3] = str(tmp_path / "in" / "gone.dcm")  # the spool file is missing: this study cannot be read
    settings = Settings(storage=tmp_path / "var", database_url=db_url, worker_batch_studies=4,
                        destinations=[Destination("PACS", "127.0.0.1", 11112)])
    db = Database(db_url)
    calls = []
    real = model.predict
    monkeypatch.setattr(model, "predict", lambda crops, *a, **kw: calls.append(len(crops)) or real(crops, *a, **kw))
    batches = []
    real_screen = worker_module.screen_studies
    monkeypatch.setattr(worker_module, "screen_studies",
                        lambda studies, *a, **kw: batches.append(len(studies)) or real_screen(studies, *a, **kw))
    try:
        ids = queue_studies(db, paths)
        worker = Worker(settings, db, model=model)
        assert worker.run_once()  # jobs 1-4: three screened in one batch, the unreadable one fails
        assert batches == [3] and calls == [6]  # one model call for both hips of three studies
        with db.session() as s:
            jobs = {j.id: j for j in s.scalars(select(Job))}
            assert [jobs[i].state for i in ids] == ["done", "done", "done", "queued", "queued"]
            assert jobs[ids[3]].attempts == 1 and "FileNotFoundError" in jobs[ids[3]].error
            assert Counter(s.scalars(select(Finding.job_id)).all()) == {i: 2 for i in ids[:3]}
            sr_uids = s.scalars(select(Study.last_report_uid).where(Study.id.in_([jobs[i].study_id for i in ids[:3]])))
            assert all(sr_uids)
        while worker.run_once():  # the poison job retried (alone) until set aside; the last job
            pass
        assert batches == [3]  # a retried job is never batched with others
        with db.session() as s:
            jobs = {j.id: j for j in s.scalars(select(Job))}
            assert [jobs[i].state for i in ids] == ["done", "done", "done", "failed", "done"]
            assert jobs[ids[3]].attempts == settings.job_max_attempts and "gone.dcm" in jobs[ids[3]].error
            assert s.scalar(select(Study.status).where(Study.id == jobs[ids[3]].study_id)) == "failed"
    finally:
        db.dispose()


# -- processes on PostgreSQL, killed -----------------------------------------------------------------
@pytest.mark.slow  # processes: about 1.5 min and 50 s on two cores
def test_three_workers_200_studies_a_worker_killed_each_study_reported_once(tmp_path, pg_url, hip_bases):
    require_tool("storescu")
    sent = write_copies(hip_bases, 200, tmp_path / "in", tag="SC")
    study_uids = {str(ds.StudyInstanceUID) for _, ds in sent}
    with deployment(tmp_path, pg_url, settle=1.0) as dep:
        t0 = time.monotonic()
        workers = [dep.role("work", f"work{i}") for i in range(3)]
        dep.role("dispatch", "dispatch")
        dep.role("listen", "listen")
        sender = subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "OSTEOSCREEN", "127.0.0.1", str(dep.port),
                                   *[str(p) for p, _ in sent]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)

        # Mid-run, freeze a worker that holds leases (SIGSTOP, so that what it holds cannot change),
        # note its jobs, SIGKILL it.
        def done_jobs() -> int:
            return dep.sql("SELECT count(*) FROM jobs WHERE state = 'done'")[0][0]

        assert wait_for(lambda: done_jobs() >= 40, 240, 0.5), "fewer than 40 studies screened"
        victim, held = None, []
        for _ in range(50):
            owners = dict(dep.sql("SELECT lease_owner, count(*) FROM jobs WHERE state = 'running' "
                                  "GROUP BY lease_owner"))
            victim = next((w for w in workers if any(f":{w.pid}:" in (o or "") for o in owners)), None)
            if victim is not None:
                os.kill(victim.pid, signal.SIGSTOP)
                held = [r[0] for r in dep.sql("SELECT id FROM jobs WHERE state = 'running' AND lease_owner LIKE :o",
                                              o=f"%:{victim.pid}:%")]
                if held:
                    break
                os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.1)
        assert victim is not None and held, "no worker held a lease mid-run"
        victim.kill()
        killed_at = time.monotonic() - t0
        done_at_kill = done_jobs()

        assert sender.wait(240) == 0, sender.stdout.read()[-3000:]
        sent_at = time.monotonic() - t0

        def finished() -> bool:
            states = dict(dep.sql("SELECT state, count(*) FROM jobs GROUP BY state"))
            deliveries = dep.sql("SELECT count(*), count(*) FILTER (WHERE state = 'delivered') FROM deliveries")[0]
            return states == {"done": 200} and deliveries[0] == deliveries[1] and len(dep.received()) >= deliveries[0]

        assert wait_for(finished, 240, 1.0), (dep.sql("SELECT state, count(*) FROM jobs GROUP BY state"),
                                              dep.sql("SELECT state, count(*) FROM deliveries GROUP BY state"))
        wall = time.monotonic() - t0
        time.sleep(2)  # nothing more arrives afterwards

        # One study, one job, done once; none left running or failed; the killed worker's jobs were
        # finished by the others after its leases expired.
        jobs = dep.sql("SELECT j.id, s.study_uid, j.state, j.attempts, j.lease_owner FROM jobs j "
                       "JOIN studies s ON s.id = j.study_id")
        assert len(jobs) == 200 and {r[1] for r in jobs} == study_uids and {r[2] for r in jobs} == {"done"}
        retried = {r[0]: r for r in jobs if r[0] in held}
        assert len(retried) == len(held)
        assert all(r[3] >= 2 and f":{victim.pid}:" not in r[4] for r in retried.values()), retried
        assert dep.sql("SELECT count(*) FROM studies WHERE status <> 'screened'")[0][0] == 0
        # Every result object reached the PACS exactly once: one file per object (+uf would show a
        # duplicate as a second file), the objects the database queued, one SR per study, the SR
        # the study's report names.
        objects = pacs_objects(dep)
        uids = Counter(str(ds.SOPInstanceUID) for ds in objects)
        assert max(uids.values()) == 1, [u for u, n in uids.items() if n > 1]
        queued = {r[0] for r in dep.sql("SELECT sop_instance_uid FROM deliveries WHERE state = 'delivered'")}
        assert set(uids) == queued
        srs = {str(ds.StudyInstanceUID): str(ds.SOPInstanceUID) for ds in objects if ds.SOPClassUID == SR_CLASS}
        assert len([ds for ds in objects if ds.SOPClassUID == SR_CLASS]) == 200 and set(srs) == study_uids
        assert srs == dict(dep.sql("SELECT study_uid, last_report_uid FROM studies"))
        assert {str(ds.StudyInstanceUID) for ds in objects} == study_uids
        assert dep.sql("SELECT count(DISTINCT job_id) FROM findings")[0][0] == 200  # findings of one run each
        assert_no_patient_identifiers(dep, [ds for _, ds in sent])
        owners = Counter(r[4].split(":")[1] for r in jobs)
        first, screened, delivered = dep.sql("SELECT (SELECT min(received_at) FROM instances), "
                                             "(SELECT max(finished_at) FROM jobs), "
                                             "(SELECT max(delivered_at) FROM deliveries)")[0]
        print(f"\n200 studies, 3 workers (one SIGKILLed at {killed_at:.0f} s holding {len(held)} jobs, "
              f"{done_at_kill} done by then), storescu done at {sent_at:.0f} s, all {len(objects)} objects "
              f"delivered at {wall:.0f} s after the processes were started; from the first image received: "
              f"last study screened {(screened - first).total_seconds():.0f} s, last object delivered "
              f"{(delivered - first).total_seconds():.0f} s; jobs per worker pid {dict(owners)}")


@pytest.mark.slow  # processes: about 1.5 min and 50 s on two cores
def test_listener_killed_during_burst_every_acknowledged_image_is_screened(tmp_path, pg_url, hip_bases):
    from pynetdicom import AE
    sent = write_copies(hip_bases, 40, tmp_path / "in", tag="LB")
    by_sop = {str(ds.SOPInstanceUID): (path, ds) for path, ds in sent}
    # settle 3 s: the studies acknowledged in the last seconds before the kill have not settled into
    # jobs yet, and only the database remembers them
    with deployment(tmp_path, pg_url, settle=3.0) as dep:
        dep.role("work", "work")
        dep.role("dispatch", "dispatch")
        listener = dep.role("listen", "listen")
        acknowledged: list[str] = []
        killed = threading.Event()

        def killer() -> None:  # SIGKILL while the 21st image is on its way
            wait_for(lambda: len(acknowledged) >= 20, 120, 0.01)
            listener.kill()
            killed.set()

        threading.Thread(target=killer, daemon=True).start()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DX_CLASS, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", dep.port, ae_title="OSTEOSCREEN")
        assert assoc.is_established
        for sop, (path, _) in by_sop.items():
            try:
                status = assoc.send_c_store(path)
            except Exception:  # the association died under the call
                break
            if not assoc.is_established or not status or status.Status != 0x0000:
                break
            acknowledged.append(sop)
        assoc.release() if assoc.is_established else assoc.abort()
        assert killed.wait(30) and 20 <= len(acknowledged) < len(sent)

        # Durable before Success: every acknowledged image is in the database; some of their studies
        # were still waiting for the settle timer when the listener died.
        stored = {r[0]: r[1] for r in dep.sql("SELECT i.sop_instance_uid, s.status FROM instances i "
                                              "JOIN studies s ON s.id = i.study_id")}
        assert set(acknowledged) <= set(stored)
        pending = [sop for sop in acknowledged if stored[sop] == "receiving"]
        assert pending, "every study had settled before the kill: nothing left for the restart to prove"
        time.sleep(4)  # no listener, no settle timer: they stay pending
        assert dep.sql("SELECT count(*) FROM studies WHERE status = 'receiving'")[0][0] >= len(pending)

        listener.start()  # same port, database and storage: the settle timer is in the database
        ack_studies = {str(by_sop[sop][1].StudyInstanceUID) for sop in acknowledged}

        def screened(uids) -> bool:
            rows = dict(dep.sql("SELECT s.study_uid, count(*) FROM jobs j JOIN studies s ON s.id = j.study_id "
                                "WHERE j.state = 'done' GROUP BY s.study_uid"))
            return all(rows.get(u) == 1 for u in uids)

        assert wait_for(lambda: screened(ack_studies), 120, 0.5)

        # The modality re-sends what it got no answer for (as it would); a copy the node had already
        # stored before it died is a duplicate, not a new image: every study is screened once.
        rest = [by_sop[sop][0] for sop in by_sop if sop not in acknowledged]
        out = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "OSTEOSCREEN", "127.0.0.1", str(dep.port),
                              *map(str, rest)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        all_studies = {str(ds.StudyInstanceUID) for _, ds in sent}
        assert wait_for(lambda: screened(all_studies), 120, 0.5)
        assert wait_for(lambda: len([d for d in pacs_objects(dep) if d.SOPClassUID == SR_CLASS]) >= 40, 60, 0.5)
        time.sleep(2)
        assert dep.sql("SELECT count(*) FROM jobs")[0][0] == 40  # one job per study, none re-opened
        srs = Counter(str(d.StudyInstanceUID) for d in pacs_objects(dep) if d.SOPClassUID == SR_CLASS)
        assert set(srs) == all_studies and max(srs.values()) == 1
        assert dep.sql("SELECT count(*) FROM instances")[0][0] == 40
        assert_no_patient_identifiers(dep, [ds for _, ds in sent])
