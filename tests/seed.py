"""A screening database with known contents, for the administration tests (CLI, dashboard, metrics).

Rows are written through the ORM with fixed timestamps, as the node's roles would have left them:

week  study            received (UTC)        result (latest report)          notes
W45   S01..S04         2026-11-02 … 11-05    normal ×2, osteopenia, osteoporosis
W46   S05..S08         2026-11-09 … 11-12    osteoporosis (acknowledged), normal, not assessable
                                              (metal_implant + site_not_found), skipped chest
W47   S09..S12         2026-11-16 … 11-19    osteopenia (lumbar only, fused AP+LAT), osteoporosis
                                              (a late image re-reported it: first osteoporosis, then normal),
                                              failed job, osteoporosis from CR via calling AE "CR_ROOM2"
W48   S13, S14         2026-11-23, 11-24     osteoporosis (model 0.2.0, its SR delivery dead),
                                              receiving (no report yet)

Positives (osteoporosis) in the latest reports: S04, S05 (acknowledged), S12, S13 (S10's latest report is
normal). The follow-up worklist is therefore S04, S12, S13, oldest first.
Deliveries: every screened study's SR delivered, except S13 (dead: PACS refused) and S09's heatmap
(pending, 2 failed attempts).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from osteoscreen.store.db import Database
from osteoscreen.store.models import Acknowledgement, Delivery, DestinationCircuit, Finding, Instance, Job, Study

DESTINATION = "PACS@127.0.0.1:1"
PATIENT_NAMES = {i: f"Test^Patient{i:02d}" for i in range(1, 15)}


def uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.10.1460.9.{i}"


@dataclass
class Seeded:
    url: str
    outbox: Path
    worklist: list[str]  # study UIDs expected on the follow-up worklist, oldest first
    dead_delivery_id: int
    dead_delivery_path: Path


def _t(day: int, hour: int = 9) -> datetime:
    return datetime(2026, 11, day, hour, 0, 0)


def seed(url: str, outbox: Path) -> Seeded:
    """Fill the (empty) database at url; result files go under outbox (a real file for the dead SR,
    so that it can be re-sent)."""
    db = Database(url)
    outbox.mkdir(parents=True, exist_ok=True)
    with db.session() as s:
        def study(i: int, day: int, *, status: str = "screened", modality: str = "DX", calling_ae: str = "MODALITY1",
                  region: str | None = "hip", eligible: bool = True, skip_reason: str | None = None,
                  views: tuple[str, ...] = ("ap",)) -> Study:
            st = Study(study_uid=uid(i), patient_id=f"PID{i:04d}", patient_name=PATIENT_NAMES[i],
                       accession_number=f"ACC{i:04d}", study_date=f"202611{day:02d}", calling_ae=calling_ae,
                       status=status, first_received_at=_t(day), last_received_at=_t(day, 9) + timedelta(seconds=5),
                       reported_at=_t(day, 9) + timedelta(seconds=20) if status == "screened" else None,
                       last_report_uid=f"{uid(i)}.99" if status == "screened" else None)
            s.add(st)
            s.flush()
            for k, view in enumerate(views):
                s.add(Instance(study_id=st.id, sop_instance_uid=f"{uid(i)}.1.{k}", series_uid=f"{uid(i)}.1",
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality=modality,
                               transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/spool/{i}-{k}.dcm",
                               region=region, view=view, eligible=eligible, skip_reason=skip_reason,
                               received_at=_t(day)))
            return st

        def report(st: Study, sites: list[tuple], *, version: str = "0.3.0", delivered: bool = True,
                   finished: datetime | None = None) -> Job:
            job = Job(study_id=st.id, state="done", attempts=1, created_at=st.last_received_at,
                      finished_at=finished or st.reported_at)
            s.add(job)
            s.flush()
            for site, category, t, reason in sites:
                s.add(Finding(study_id=st.id, job_id=job.id, sop_instance_uid=f"{st.study_uid}.1.0", site=site,
                              assessable=category is not None, category=category, t_score=t, reason=reason,
                              probabilities=None if category is None else {category: 0.8},
                              # a 90 % interval of ±0.6; the right hip's estimate from a site calibration
                              t_score_low=None if t is None else t - 0.6, t_score_high=None if t is None else t + 0.6,
                              interval_level=None if t is None else 0.9,
                              calibration_id="cal-seeded000001" if site == "right_hip" and category else None,
                              model_name="osteoscreen-osteonet", model_version=version,
                              created_at=job.finished_at))
            if delivered:
                s.add(Delivery(study_id=st.id, sop_instance_uid=f"{st.study_uid}.99.{job.id}", kind="sr",
                               path=str(outbox / f"{st.id}-{job.id}.dcm"), destination=DESTINATION,
                               state="delivered", attempts=1, created_at=job.finished_at,
                               next_attempt_at=job.finished_at,
                               delivered_at=job.finished_at + timedelta(seconds=2)))
            return job

        hips = lambda cat, t: [("left_hip", cat, t, None), ("right_hip", "normal", -0.2, None)]  # noqa: E731
        # W45
        report(study(1, 2), hips("normal", -0.4))
        report(study(2, 3), hips("normal", 0.3))
        report(study(3, 4), hips("osteopenia", -1.7))
        s4 = study(4, 5)
        report(s4, hips("osteoporosis", -2.9))
        # W46
        s5 = study(5, 9)
        report(s5, hips("osteoporosis", -3.1))
        s.add(Acknowledgement(study_id=s5.id, report_uid=s5.last_report_uid, by="coordinator", at=_t(10),
                              note="referred to DXA"))
        report(study(6, 10), hips("normal", -0.8))
        report(study(7, 11), [("left_hip", None, None, "metal_implant"), ("right_hip", None, None, "site_not_found")])
        study(8, 12, status="skipped", region=None, eligible=False,
              skip_reason="body part not hip, pelvis or lumbar spine (BodyPartExamined: CHEST)")
        # W47
        s9 = study(9, 16, region="lumbar", views=("ap", "lat"))
        job9 = report(s9, [("lumbar_spine", "osteopenia", -1.9, None), ("lumbar_spine", "osteopenia", -1.9, None)])
        s.add(Delivery(study_id=s9.id, sop_instance_uid=f"{s9.study_uid}.98", kind="heatmap",
                       path=str(outbox / f"{s9.id}-hm.dcm"), destination=DESTINATION, state="pending", attempts=2,
                       last_error="association rejected", created_at=job9.finished_at,
                       next_attempt_at=_t(30)))
        s10 = study(10, 17)
        report(s10, hips("osteoporosis", -2.7), finished=_t(17, 9) + timedelta(seconds=20))
        # a late image (09:59:45) re-opened the study; its second report supersedes the first
        late = _t(17, 10) - timedelta(seconds=15)
        s.add(Instance(study_id=s10.id, sop_instance_uid=f"{uid(10)}.1.9", series_uid=f"{uid(10)}.1",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", path="/spool/10-9.dcm", region="hip", view="ap",
                       eligible=True, received_at=late))
        s10.last_received_at, s10.reported_at = late, _t(17, 10)
        s10.last_report_uid = f"{uid(10)}.99.2"
        report(s10, hips("normal", -0.9), finished=_t(17, 10))
        s11 = study(11, 18, status="failed")
        s.add(Job(study_id=s11.id, state="failed", attempts=3, error="RuntimeError: pixel data truncated",
                  created_at=_t(18), finished_at=None))
        report(study(12, 19, modality="CR", calling_ae="CR_ROOM2"), hips("osteoporosis", -2.6))
        # W48
        s13 = study(13, 23)
        job13 = report(s13, hips("osteoporosis", -3.4), version="0.2.0", delivered=False)
        dead_path = outbox / f"{s13.id}-sr.dcm"
        dead = Delivery(study_id=s13.id, sop_instance_uid=f"{s13.study_uid}.99", kind="sr", path=str(dead_path),
                        destination=DESTINATION, state="dead", attempts=8, last_error="C-STORE status 0xA700",
                        created_at=job13.finished_at, next_attempt_at=job13.finished_at)
        s.add(dead)
        study(14, 24, status="receiving")
        s.add(DestinationCircuit(destination=DESTINATION, state="closed", consecutive_failures=0,
                                 updated_at=_t(24)))
        s.commit()
        dead_id = dead.id
    db.dispose()
    _write_sr(dead_path, uid(13))
    return Seeded(url=url, outbox=outbox, worklist=[uid(4), uid(12), uid(13)], dead_delivery_id=dead_id,
                  dead_delivery_path=dead_path)


def _write_sr(path: Path, study_uid: str) -> None:
    """A small valid DICOM object standing in for the dead SR, so that a resend can really send it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study_uid}.99"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "PID0013"
    ds.save_as(path, enforce_file_format=True)
