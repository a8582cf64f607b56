"""A study's heatmaps: the Secondary Capture pictures the worker wrote beside each SR.

One entry per heatmap object (its SOP Instance UID), however many destinations it went to: which
radiograph it was drawn on (region, view), the sites of that image, whether it belongs to the
study's latest report, and whether its outbox file can still be shown (retention removes delivered
result files after ``retention.outbox_days``; the rows stay, marked ``purged_at``).

The source image is found without opening the file: a heatmap's UID derives from the source SOP
Instance UID, the model version and the SR it goes with (`reports.uids.derived_uid`, as
`reports.heatmap.build_heatmap` makes it), so it is matched against the study's findings and SRs;
only when that fails (an older naming) is the file's Source Image Sequence read. Paths come from the
deliveries table only: nothing here takes a path from outside.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..findings import SITES
from ..reports.uids import derived_uid
from ..store.models import Delivery, Finding, Instance, Study

AVAILABLE, PURGED, MISSING = "available", "purged", "missing"


@dataclass(frozen=True)
class Heatmap:
    sop_instance_uid: str
    state: str  # available | purged (removed by retention) | missing (file gone, not by retention)
    path: str | None  # the outbox file to read; None unless available
    source_sop_instance_uid: str | None  # the radiograph it was drawn on, when known
    region: str | None  # of the source image: hip | pelvis | lumbar
    view: str | None  # of the source image: ap | lat
    sites: tuple[str, ...]  # the screening sites found in that image (in SITES order)
    model_version: str | None
    current: bool  # part of the study's latest report
    created_at: datetime | None

    @property
    def available(self) -> bool:
        return self.state == AVAILABLE

    @property
    def label(self) -> str:
        """"left hip, right hip (hip AP)" — the sites and the image, PHI-free."""
        sites = ", ".join(s.replace("_", " ") for s in self.sites) or "no site"
        image = " ".join(x for x in (self.region, (self.view or "").upper()) if x)
        return f"{sites} ({image})" if image else sites


def study_heatmaps(session: Session, study: Study | int) -> list[Heatmap]:
    """The study's heatmaps: the latest report's first, then earlier ones, each in the order written."""
    study = study if isinstance(study, Study) else session.get(Study, study)
    if study is None:
        return []
    rows = session.scalars(select(Delivery).where(Delivery.study_id == study.id, Delivery.kind == "heatmap")
                           .order_by(Delivery.id)).all()
    if not rows:
        return []
    by_uid: dict[str, list[Delivery]] = {}
    for d in rows:
        by_uid.setdefault(d.sop_instance_uid, []).append(d)

    findings = session.execute(select(Finding.job_id, Finding.sop_instance_uid, Finding.model_version, Finding.site)
                               .where(Finding.study_id == study.id)).all()
    reports = set(session.scalars(select(Delivery.sop_instance_uid).where(Delivery.study_id == study.id,
                                                                          Delivery.kind == "sr")))
    if study.last_report_uid:
        reports.add(study.last_report_uid)
    origins = _origins({(f.sop_instance_uid, f.model_version) for f in findings}, reports)
    instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance).where(Instance.study_id == study.id))}

    out = []
    for uid, deliveries in by_uid.items():
        state, path = _state(deliveries)
        source, version, report = origins.get(uid, (None, None, None))
        if source is None and path is not None:
            source = _source_from_file(path)
        sites = _sites(findings, source, version)
        inst = instances.get(source) if source else None
        out.append(Heatmap(
            sop_instance_uid=uid, state=state, path=path, source_sop_instance_uid=source,
            region=inst.region if inst else None, view=inst.view if inst else None, sites=sites,
            model_version=version, current=report is not None and report == study.last_report_uid,
            created_at=min((d.created_at for d in deliveries if d.created_at), default=None)))
    out.sort(key=lambda h: not h.current)  # stable: the order written within each group
    return out


def find_heatmap(session: Session, study: Study, sop_instance_uid: str) -> Heatmap | None:
    """One heatmap of the study by its SOP Instance UID (None: the study has no such heatmap)."""
    return next((h for h in study_heatmaps(session, study) if h.sop_instance_uid == sop_instance_uid), None)


def _origins(sources: set[tuple[str, str]], reports: set[str]) -> dict[str, tuple[str, str, str | None]]:
    """heatmap UID -> (source SOP Instance UID, model version, SR UID) for every combination the
    study's findings and reports allow (a handful: images × model versions × reports)."""
    out: dict[str, tuple[str, str, str | None]] = {}
    for source, version in sources:
        out[derived_uid(source, version, "heatmap")] = (source, version, None)
        for report in reports:
            out[derived_uid(source, version, "heatmap", report)] = (source, version, report)
    return out


def _state(deliveries: list[Delivery]) -> tuple[str, str | None]:
    """available (with the file to read), purged when retention removed it, missing otherwise."""
    for d in deliveries:
        if d.purged_at is None and d.path and Path(d.path).is_file():
            return AVAILABLE, d.path
    if any(d.purged_at is not None for d in deliveries):
        return PURGED, None
    return MISSING, None


def _sites(findings, source: str | None, version: str | None) -> tuple[str, ...]:
    """The sites of `source` in the newest job that has findings for it (and that model version)."""
    mine = [f for f in findings if f.sop_instance_uid == source and (version is None or f.model_version == version)]
    if not mine:
        return ()
    job = max(f.job_id for f in mine)
    found = {f.site for f in mine if f.job_id == job}
    return tuple(s for s in SITES if s in found) + tuple(sorted(found - set(SITES)))


def _source_from_file(path: str) -> str | None:
    try:
        import pydicom
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SourceImageSequence"])
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    except Exception:  # noqa: BLE001 - an unreadable header only means the source is unknown
        return None


__all__ = ["AVAILABLE", "MISSING", "PURGED", "Heatmap", "find_heatmap", "study_heatmaps"]
