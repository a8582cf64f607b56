"""The node's own images of one scanner as calibration rows (`osteoscreen calibrate --from-node`).

The node keeps every eligible radiograph in its spool; those of one scanner are the unlabelled data
a site calibration adapts on. The scanner is read from each file's header (Instance rows do not
carry it), so `since` keeps the scan short on a node that has received much.
"""
from __future__ import annotations

from datetime import date, datetime, time

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..model.calibration import key_matches, parse_scanner_key
from ..store.models import Instance, Study
from .outcomes import labels_by_study


def scanner_rows(session: Session, key: str, since: date | datetime | None = None) -> tuple[list[dict], dict]:
    """Manifest rows (path, kind, view, study_instance_uid; the DXA T-score columns where the study has a
    matched DXA outcome, admin.outcomes) of the spooled eligible images whose scanner the key names, and
    counts of what was looked at."""
    parsed = parse_scanner_key(key)
    query = (select(Instance.path, Instance.region, Instance.view, Study.study_uid)
             .join(Study, Study.id == Instance.study_id)
             .where(Instance.eligible.is_(True), Instance.purged_at.is_(None)))
    if since is not None:
        since = since if isinstance(since, datetime) else datetime.combine(since, time.min)
        query = query.where(Instance.received_at >= since)
    rows, counts = [], {"eligible": 0, "unreadable": 0, "other_scanner": 0}
    for path, region, view, study_uid in session.execute(query.order_by(Instance.id)):
        counts["eligible"] += 1
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError):
            counts["unreadable"] += 1
            continue
        if not key_matches(parsed, header):
            counts["other_scanner"] += 1
            continue
        rows.append({"path": path, "kind": region or "", "view": view or "", "study_instance_uid": study_uid})
    counts["matched"] = len(rows)
    labels = labels_by_study(session, [r["study_instance_uid"] for r in rows])
    for r in rows:
        r.update(labels.get(r["study_instance_uid"], {}))
    counts["labelled_studies"] = len({r["study_instance_uid"] for r in rows} & set(labels))
    return rows, counts
