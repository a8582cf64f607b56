"""Who needs follow-up: the worklist of positive screenings not yet acknowledged (longest waiting
first), acknowledging a study's current positive report and withdrawing acknowledgements (audited).
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ...store import queue
from ...store.models import Acknowledgement, Study, utcnow
from .common import Filters, Screening, _acknowledged, _result_of, _study_worst, find_study
from .screenings import list_screenings


# -- follow-up ---------------------------------------------------------------------------------------

def worklist(session: Session, *, positive_categories: list[str], include_acknowledged: bool = False,
             limit: int = 0) -> list[Screening]:
    """Positive screenings not yet acknowledged, longest waiting first."""
    f = Filters(positive=True, acknowledged=None if include_acknowledged else False)
    return list_screenings(session, f, positive_categories=positive_categories, limit=limit,
                           oldest_first=True).items


def acknowledge(session: Session, key: str, by: str, note: str | None = None, *,
                positive_categories: list[str]) -> Acknowledgement:
    """Record that `by` acted on the study's current, positive result; it leaves the worklist until a
    new report replaces that one. Audited (UIDs only)."""
    study = find_study(session, key)
    if not by or len(by) > 64:
        raise ValueError("acknowledging needs a user name of 1-64 characters")
    result = _result_of(_study_worst(session, study.id))
    if result not in positive_categories:
        raise ValueError(f"study {study.study_uid} is not positive (its latest result is "
                         f"{(result or 'none yet').replace('_', ' ')}): there is nothing to follow up")
    if session.scalar(select(Study.id).where(Study.id == study.id, _acknowledged())) is not None:
        raise ValueError(f"study {study.study_uid} is already acknowledged for its current report")
    ack = Acknowledgement(study_id=study.id, report_uid=study.last_report_uid, by=by, at=utcnow(),
                          note=(note or None))
    session.add(ack)
    queue.audit(session, "acknowledged", study_uid=study.study_uid, detail=f"by {by}")
    session.commit()
    return ack


def revoke_acknowledgement(session: Session, key: str, by: str) -> int:
    """Withdraw the study's standing acknowledgements (it returns to the worklist if positive)."""
    study = find_study(session, key)
    acks = session.scalars(select(Acknowledgement).where(Acknowledgement.study_id == study.id,
                                                         Acknowledgement.revoked_at.is_(None))).all()
    now = utcnow()
    for a in acks:
        a.revoked_at, a.revoked_by = now, by
    if acks:
        queue.audit(session, "acknowledgement_revoked", study_uid=study.study_uid, detail=f"by {by}")
    session.commit()
    return len(acks)
