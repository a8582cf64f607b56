"""The drift watch: per scanner group, its recent window against its reference, kept in the database.

A scanner group is a key as in `calibrations:` (``Manufacturer|ModelName[|station=S][|serial=N]``):
every configured key is a group, and every other scanner the node has screened images of is a
group of its own under ``Manufacturer|ModelName``. An image belongs to the most specific key that
names it, as calibrations apply.

The reference is the group's first `window_studies` screened studies under its current calibration
(a new calibration changes the outputs on purpose, so the reference starts again with it); the
recent window is its latest `window_studies` studies (or those of the last `window_days`), never
overlapping the reference. A check's status is one of:

- ``silent``: the group sent before, and nothing for `silent_hours`;
- ``insufficient data``: fewer than `min_studies` studies in either window;
- ``drift``: at least one signal moved (monitor.signals, Bonferroni at `alpha`), naming them;
- ``ok``.

Every check is a `DriftCheck` row: the latest per group is its status, the earlier ones its history.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..config import Drift
from ..equipment import ScannerKeyError, ScannerKeys, parse_scanner_key
from ..store.models import DriftCheck, Finding, Instance, utcnow
from .signals import SiteRecord, Window, compare, moved

STATUSES = ("ok", "drift", "silent", "insufficient data")


@dataclass
class GroupImages:
    key: str
    instances: list  # (study_id, sop_instance_uid, acquisition, received_at)


def _header(scanner: str | None, acquisition: dict | None) -> dict:
    manufacturer, _, model = (scanner or "").partition("|")
    acq = acquisition or {}
    return {"Manufacturer": manufacturer, "ManufacturerModelName": model,
            "StationName": acq.get("StationName"), "DeviceSerialNumber": acq.get("DeviceSerialNumber")}


def scanner_groups(session: Session, configured: list[str]) -> dict[str, GroupImages]:
    """Every group's screened (eligible) images, oldest first; configured groups without images too."""
    valid = []
    for key in configured:
        try:
            parse_scanner_key(key)
            valid.append(key)
        except ScannerKeyError:
            continue  # config validation reports it; the watch skips it
    keys = ScannerKeys(valid)
    groups = {key: GroupImages(key, []) for key in keys}
    rows = session.execute(select(Instance.study_id, Instance.sop_instance_uid, Instance.scanner, Instance.acquisition,
                                  Instance.received_at)
                           .where(Instance.eligible.is_(True), Instance.scanner.is_not(None))
                           .order_by(Instance.received_at, Instance.id))
    for study_id, sop, scanner, acq, received in rows:
        key = keys.match(_header(scanner, acq)) or scanner
        groups.setdefault(key, GroupImages(key, [])).instances.append((study_id, sop, acq or {}, received))
    return groups


def _latest_findings(session: Session, study_ids: list[int]) -> dict[int, list[Finding]]:
    """Each study's findings of its newest job (its latest report)."""
    out: dict[int, list[Finding]] = defaultdict(list)
    for start in range(0, len(study_ids), 500):
        chunk = study_ids[start:start + 500]
        newest = (select(Finding.study_id, func.max(Finding.job_id).label("job_id"))
                  .where(Finding.study_id.in_(chunk)).group_by(Finding.study_id).subquery())
        for f in session.scalars(select(Finding).join(newest, (Finding.study_id == newest.c.study_id)
                                                      & (Finding.job_id == newest.c.job_id))):
            out[f.study_id].append(f)
    return out


def _window(studies: list[tuple], images: dict, findings: dict) -> Window:
    w = Window()
    for study_id, first, sops in studies:
        w.add(images[study_id], [SiteRecord(f.assessable, f.reason, f.probabilities, f.t_score, f.ood_score)
                                 for f in findings.get(study_id, []) if f.sop_instance_uid in sops])
    if studies:
        w.first, w.last = studies[0][1].isoformat(timespec="seconds"), studies[-1][1].isoformat(timespec="seconds")
    return w


@dataclass
class GroupStudies:
    """A group's screened studies in arrival order, each with its images and its latest report."""

    images: dict  # study id → acquisition of each of the group's images in it
    findings: dict  # study id → the latest report's findings on the group's images
    studies: list  # (study id, first received, the group's SOP UIDs in it, calibration id), oldest first
    last_received: datetime | None

    def epoch(self) -> list[tuple]:
        """The studies since the group's current calibration came in (all of them if it never changed)."""
        current = self.studies[-1][3] if self.studies else None
        start = max((i + 1 for i, s in enumerate(self.studies) if s[3] != current), default=0)
        return [(sid, first, sops) for sid, first, sops, _ in self.studies[start:]]


def group_studies(session: Session, group: GroupImages) -> GroupStudies:
    by_study: dict[int, list] = {}
    for study_id, sop, acq, received in group.instances:
        by_study.setdefault(study_id, []).append((sop, acq, received))
    latest = _latest_findings(session, list(by_study))
    studies, findings = [], {}
    for study_id, items in by_study.items():
        mine = {sop for sop, _, _ in items}
        fs = [f for f in latest.get(study_id, []) if f.sop_instance_uid in mine]
        if fs:
            findings[study_id] = fs
            studies.append((study_id, items[0][2], mine, next((f.calibration_id for f in fs if f.calibration_id), None)))
    studies.sort(key=lambda s: s[1])
    images = {sid: [acq for _, acq, _ in items] for sid, items in by_study.items()}
    return GroupStudies(images, findings, studies, group.instances[-1][3] if group.instances else None)


def _windows(gs: GroupStudies, cfg: Drift, now: datetime) -> tuple[list, list]:
    epoch = gs.epoch()
    reference = epoch[:cfg.window_studies]
    if cfg.window_days > 0:
        since = now - timedelta(days=cfg.window_days)
        recent = [s for s in epoch[len(reference):] if s[1] >= since]
    else:
        recent = epoch[max(len(reference), len(epoch) - cfg.window_studies):]
    return reference, recent


def check_group(session: Session, group: GroupImages, cfg: Drift, now: datetime) -> DriftCheck:
    """One group's check (not yet added to the session)."""
    gs = group_studies(session, group)
    last = gs.last_received
    details: dict = {"window_studies": cfg.window_studies, "alpha": cfg.alpha,
                     "last_received": last.isoformat(timespec="seconds") if last else None,
                     "calibration": gs.studies[-1][3] if gs.studies else None, "epoch_studies": len(gs.epoch())}
    reference, recent = _windows(gs, cfg, now)
    ref_w, rec_w = _window(reference, gs.images, gs.findings), _window(recent, gs.images, gs.findings)
    details["reference"] = {"studies": len(ref_w), "first": ref_w.first, "last": ref_w.last}
    details["recent"] = {"studies": len(rec_w), "first": rec_w.first, "last": rec_w.last}
    signals: list[str] = []
    if cfg.silent_hours > 0 and last is not None and now - last > timedelta(hours=cfg.silent_hours):
        status = "silent"
    elif len(ref_w) < cfg.min_studies or len(rec_w) < cfg.min_studies:
        status = "insufficient data"
    else:
        tests = compare(ref_w, rec_w)
        details["tests"] = [t.to_json() for t in tests]
        signals = moved(tests, cfg.alpha)
        status = "drift" if signals else "ok"
    return DriftCheck(scanner=group.key, checked_at=now, status=status, signals=signals, details=details)


def group_series(session: Session, group: GroupImages, cfg: Drift, limit: int = 300) -> dict:
    """Per study of the group's newest `limit` (current calibration): arrival time, mean OOD score,
    mean T-score, whether every site was assessable, and which window it is in (the dashboard's charts)."""
    gs = group_studies(session, group)
    reference, recent = _windows(gs, cfg, utcnow())
    ref_ids, rec_ids = {s[0] for s in reference}, {s[0] for s in recent}
    points = []
    for sid, first, _sops in gs.epoch()[-limit:]:
        fs = gs.findings[sid]
        ood = [f.ood_score for f in fs if f.ood_score is not None]
        t = [f.t_score for f in fs if f.assessable and f.t_score is not None]
        points.append({"at": first, "ood_score": sum(ood) / len(ood) if ood else None,
                       "t_score": sum(t) / len(t) if t else None, "assessable": all(f.assessable for f in fs),
                       "window": "reference" if sid in ref_ids else "recent" if sid in rec_ids else None})
    return {"points": points, "calibration": gs.studies[-1][3] if gs.studies else None}


def check_all(session: Session, cfg: Drift, configured: list[str], now: datetime | None = None) -> list[DriftCheck]:
    """Check every group and keep the checks (committed)."""
    now = now or utcnow()
    checks = [check_group(session, g, cfg, now) for g in scanner_groups(session, configured).values()]
    session.add_all(checks)
    session.commit()
    return checks


def latest_checks(session: Session) -> list[DriftCheck]:
    """Each group's newest check, groups in key order."""
    newest = (select(DriftCheck.scanner, func.max(DriftCheck.id).label("id"))
              .group_by(DriftCheck.scanner).subquery())
    return list(session.scalars(select(DriftCheck).join(newest, DriftCheck.id == newest.c.id)
                                .order_by(DriftCheck.scanner)))


def history(session: Session, scanner: str, limit: int = 200) -> list[DriftCheck]:
    """A group's checks, oldest first (the newest `limit`)."""
    rows = session.scalars(select(DriftCheck).where(DriftCheck.scanner == scanner)
                           .order_by(DriftCheck.id.desc()).limit(limit))
    return list(reversed(list(rows)))


def as_json(check: DriftCheck) -> dict:
    return {"scanner": check.scanner, "status": check.status, "signals": list(check.signals or []),
            "checked_at": check.checked_at.isoformat(timespec="seconds"), "details": check.details or {}}
