"""The worker role: claim jobs, screen their studies, write the result objects and their deliveries.

A worker claims up to `worker_batch_studies` jobs at once and runs all their sites through the model
in one batch (`pipeline.screen.screen_studies`); a lease heartbeat covers every job it holds. Each job
then completes on its own: its results, deliveries and completion are committed in one transaction,
and a study that fails fails only its job (retried alone, set aside after `job_max_attempts`). Result
objects have deterministic UIDs, so a job re-run after a crash rewrites the same objects instead of
new ones.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from typing import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from .config import Settings
from .equipment import scanner_key
from .model.inference import LoadedModel, ScannerModels
from .pipeline.dicom_io import set_jpeg2000_threads
from .pipeline.localize import warm_up as warm_up_localiser
from .pipeline.screen import StudyImage, screen_studies, screen_study
from .reports.heatmap import build_heatmap
from .reports.kos import build_kos, positive_findings
from .reports.sr import build_sr
from .scanners import models_from_settings
from .store import queue
from .store.db import Database
from .store.models import Delivery, Finding, Instance, Job, Study
from .store.spool import Spool

log = logging.getLogger("osteoscreen.worker")


class _Held:
    """The job ids a worker still holds (the heartbeat renews them), shared between two threads."""

    def __init__(self, ids):
        self._ids, self._lock = set(ids), threading.Lock()

    def snapshot(self) -> list[int]:
        with self._lock:
            return sorted(self._ids)

    def discard(self, job_id: int) -> None:
        with self._lock:
            self._ids.discard(job_id)

    def drop(self, ids: set[int]) -> set[int]:
        """Forget these ids (their leases were lost); returns those that were still held."""
        with self._lock:
            still = ids & self._ids
            self._ids -= still
            return still


class Worker:
    def __init__(self, settings: Settings, db: Database, model: LoadedModel | ScannerModels | None = None):
        self.settings = settings
        set_jpeg2000_threads(settings.decode_threads)
        self.db = db
        self.outbox = Spool(settings.outbox_dir)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._model = model
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by notify(): work was queued, look now rather than at the next poll
        self._thread: threading.Thread | None = None
        # called after a job completed with result objects to send (serve: wakes the dispatcher)
        self.on_results: Callable[[], None] | None = None

    @property
    def model(self) -> LoadedModel | ScannerModels:
        if self._model is None:  # loaded once per process, kept warm
            self._model = models_from_settings(self.settings)
            log.info("model %s %s on %s", self._model.info.name, self._model.info.version, self._model.device)
        return self._model

    # -- loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self.model  # fail at start-up, not on the first study
        self._thread = threading.Thread(target=self.run_forever, name="worker", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New jobs are queued (the settle timer in this process just queued them)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def run_forever(self) -> None:
        warm_up_localiser()  # in the worker thread: the listener is already accepting meanwhile
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the loop must survive anything a job throws
                log.exception("worker loop error")
                worked = False
            if not worked:
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim up to worker_batch_studies jobs and screen them (one model call for all their sites);
        each job then completes or fails on its own. Returns whether any job was claimed."""
        s = self.settings
        with self.db.session() as session:
            jobs = queue.claim_jobs(session, self.owner, s.lease_seconds, s.job_max_attempts,
                                    limit=s.worker_batch_studies)
        if not jobs:
            return False
        with self._heartbeat([job.id for job in jobs]) as held:
            loaded: list[tuple[Job, Study, list[StudyImage]]] = []
            for job in jobs:
                try:
                    loaded.append((job, *self._load(job)))
                except Exception as exc:
                    self._fail(job, exc)
                    held.discard(job.id)
            # Grad-CAM and the display image only when a heatmap may be sent (under `positives` that is
            # known only after screening).
            out = s.output
            heatmaps = out.heatmaps and out.policy != "sr_only"
            if len(loaded) == 1:  # one study: the plain per-study path
                try:
                    screened = [screen_study(loaded[0][2], self.model, heatmaps=heatmaps)]
                except Exception as exc:
                    screened = [exc]
            else:
                screened = screen_studies([images for _, _, images in loaded], self.model, heatmaps=heatmaps,
                                          return_exceptions=True) if loaded else []
            for (job, study, images), results in zip(loaded, screened):
                try:
                    if isinstance(results, Exception):
                        raise results
                    self._complete(job, study, images, results, heatmaps)
                except Exception as exc:
                    self._fail(job, exc)
                finally:
                    held.discard(job.id)
        return True

    def _fail(self, job: Job, exc: Exception) -> None:
        """Return one job to the queue with its error (set aside as failed after job_max_attempts)."""
        log.error("job %d failed", job.id, exc_info=exc)
        try:
            with self.db.session() as session:
                state = queue.fail_job(session, job.id, self.owner, f"{type(exc).__name__}: {exc}",
                                       self.settings.job_max_attempts)
            log.warning("job %d is %s after attempt %d", job.id, state, job.attempts)
        except Exception:  # the lease expires and another worker retries it
            log.exception("could not record the failure of job %d", job.id)

    @contextmanager
    def _heartbeat(self, job_ids: list[int]):
        """Renew the leases of the jobs we hold while we work on them, so a slow batch is not taken
        over by another worker. Yields the held set; discard a job from it once it is finished."""
        held = _Held(job_ids)
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.lease_seconds / 3):
                ids = held.snapshot()
                if not ids:
                    return
                try:
                    with self.db.session() as session:
                        renewed = queue.renew_leases(session, ids, self.owner, self.settings.lease_seconds)
                        # not renewed: finished (by us, a moment ago) or taken over after our lease expired
                        gone = held.drop(set(ids) - renewed)
                        taken = queue.held_by_others(session, gone, self.owner)
                except Exception:  # a database hiccup: try again at the next beat
                    log.exception("lease renewal failed")
                    continue
                if taken:
                    log.warning("lease lost on job(s) %s: another worker took them over (this one was "
                                "silent longer than lease_seconds)", ", ".join(map(str, sorted(taken))))

        thread = threading.Thread(target=beat, name=f"lease-{job_ids[0]}", daemon=True)
        thread.start()
        try:
            yield held
        finally:
            done.set()
            thread.join(timeout=5)

    # -- one study -------------------------------------------------------------------------
    def _load(self, job: Job) -> tuple[Study, list[StudyImage]]:
        with self.db.session() as session:
            study = session.get(Study, job.study_id)
            # images retention already removed are not screened again (the new report covers the rest)
            instances = session.scalars(select(Instance).where(Instance.study_id == study.id,
                                                               Instance.eligible.is_(True),
                                                               Instance.purged_at.is_(None))
                                        .order_by(Instance.id)).all()
        return study, [StudyImage(dcmread(inst.path), inst.region, inst.view) for inst in instances]

    def process(self, job: Job) -> None:
        """Screen one claimed job's study and complete it (run_once does this for a batch)."""
        study, images = self._load(job)
        heatmaps = self.settings.output.heatmaps and self.settings.output.policy != "sr_only"
        self._complete(job, study, images, screen_study(images, self.model, heatmaps=heatmaps), heatmaps)

    def _complete(self, job: Job, study: Study, images: list[StudyImage], results: list, heatmaps: bool) -> None:
        """Write the result objects the output policy asks for (none for a negative study under
        `positives`), their deliveries and the findings (always), and mark the job done: one transaction."""
        out = self.settings.output
        info = self.model.info
        site_findings = [f for r in results for f in r.sites]
        positive = bool(positive_findings(site_findings, out.positive_categories))
        objects = []
        # under `positives` a study already reported gets its superseding SR even when it turned
        # negative, so the PACS never keeps a stale positive as the latest report
        if out.policy != "positives" or positive or study.last_report_uid:
            objects = self._result_objects(study, images, results, site_findings, heatmaps)
        paths = self.outbox.write_datasets([ds for _, ds in objects])  # fsynced before the rows commit
        written = [(kind, str(ds.SOPInstanceUID), path) for (kind, ds), path in zip(objects, paths)]
        scanners = {str(im.dataset.SOPInstanceUID): scanner_key(im.dataset) for im in images}
        findings = [Finding(study_id=study.id, job_id=job.id, sop_instance_uid=f.source_sop_instance_uid,
                            site=f.site, assessable=f.assessable, category=f.category,
                            probabilities=f.probabilities, t_score=f.t_score, reason=f.reason,
                            t_score_low=f.t_score_interval[0] if f.t_score_interval else None,
                            t_score_high=f.t_score_interval[1] if f.t_score_interval else None,
                            interval_level=f.interval_level,
                            calibration_id=(f.calibration or {}).get("id"), ood_score=f.ood_score,
                            scanner=scanners.get(f.source_sop_instance_uid, "")[:200] or None,
                            model_name=info.name, model_version=info.version) for f in site_findings]
        deliveries = [Delivery(study_id=study.id, sop_instance_uid=uid, kind=kind, path=str(path),
                               destination=str(dest)) for kind, uid, path in written
                      for dest in self.settings.destinations]
        if written:
            report_uid, report_path = written[0][1], str(written[0][2])  # the SR
        else:  # nothing sent: the last SR sent stays the predecessor of the next one
            report_uid, report_path = study.last_report_uid, study.last_report_path
        with self.db.session() as session:
            done = queue.complete_job(session, job.id, self.owner, findings, deliveries, report_uid, report_path)
            detail = f"{len(site_findings)} site findings" + ("" if written else f"; no result objects "
                                                              f"(policy {out.policy}, no positive site)")
            queue.audit(session, "reported" if done else "lease_lost", study_uid=study.study_uid,
                        sop_instance_uid=written[0][1] if written else None, detail=detail)
            session.commit()
        if done and deliveries and self.on_results is not None:
            self.on_results()
        log.info("study %s screened: %s%s", study.study_uid,
                 ", ".join(f"{f.site}={f.category or 'not assessable'}" for f in site_findings) or "no sites",
                 "" if written else " (nothing sent: no positive site)")

    def _result_objects(self, study: Study, images: list[StudyImage], results: list, site_findings: list,
                        heatmaps: bool) -> list[tuple[str, object]]:
        """(kind, dataset) of each result object: the SR first, the heatmaps, the KOS when positive."""
        out = self.settings.output
        info = self.model.info
        predecessor = None
        if study.last_report_path and Path(study.last_report_path).is_file():
            predecessor = dcmread(study.last_report_path, stop_before_pixels=True)
        sources = [im.dataset for im in images]
        # the n-th report of a study is instance n of the SR (and KOS) series
        number = int(predecessor.get("InstanceNumber") or 1) + 1 if predecessor is not None else 1
        sr = build_sr(sources, site_findings, info, series_number=out.series_number_sr,
                      series_description=out.series_description_sr, predecessor=predecessor,
                      instance_number=number)
        objects = [("sr", sr)]
        if heatmaps:
            for image, result in zip(images, results):
                # an image with no estimate gets no heatmap: the SR says why, a picture adds nothing
                if result.display is not None and any(f.assessable for f in result.sites):
                    objects.append(("heatmap", build_heatmap(
                        image.dataset, result.display, result.heatmap, result.sites, info,
                        display_scale=result.display_scale, series_number=out.series_number_heatmap,
                        series_description=out.series_description_heatmap, report_uid=str(sr.SOPInstanceUID))))
        if out.kos and out.policy != "sr_only":
            kos = build_kos(sources, site_findings, info, positive_categories=out.positive_categories,
                            series_number=out.series_number_kos, series_description=out.series_description_kos,
                            instance_number=number,
                            predecessor_sr_uid=str(predecessor.SOPInstanceUID) if predecessor is not None else None,
                            sr=sr)
            if kos is not None:
                objects.append(("kos", kos))
        return objects
