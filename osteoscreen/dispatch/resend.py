"""`osteoscreen resend`: put deliveries back in the outbox queue.

--dead          every dead delivery
--study UID     the dead and delivered deliveries of one study (e.g. the PACS lost them)
--delivery ID   one dead or delivered delivery

A re-queued delivery is pending, due now, with its attempt count reset. Deliveries still pending or
being sent are left as they are (they are queued already); one whose outbox file retention removed
cannot be sent again and is counted as skipped. Each re-queue is audited (UIDs only, no PHI).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..store import queue
from ..store.models import Delivery, Study, utcnow


class NotFound(LookupError):
    """The study or delivery named does not exist."""


@dataclass
class ResendResult:
    requeued: int = 0
    skipped_purged: int = 0  # outbox file gone: cannot be re-sent
    already_queued: int = 0  # pending or sending: left alone


def resend(session: Session, *, dead: bool = False, study_uid: str | None = None,
           delivery_id: int | None = None) -> ResendResult:
    if sum((bool(dead), study_uid is not None, delivery_id is not None)) != 1:
        raise ValueError("name exactly one of dead, study_uid, delivery_id")
    query = select(Delivery, Study.study_uid).join(Study, Study.id == Delivery.study_id)
    if dead:
        query, how = query.where(Delivery.state == "dead"), "resend --dead"
    elif study_uid is not None:
        if session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
            raise NotFound(f"no study with Study Instance UID {study_uid}")
        query, how = query.where(Study.study_uid == study_uid), "resend --study"
    else:
        if session.get(Delivery, delivery_id) is None:
            raise NotFound(f"no delivery with id {delivery_id}")
        query, how = query.where(Delivery.id == delivery_id), "resend --delivery"
    result = ResendResult()
    now = utcnow()
    for d, uid in session.execute(query.order_by(Delivery.id)).all():
        if d.state not in ("dead", "delivered"):
            result.already_queued += 1
            continue
        if d.purged_at is not None or not Path(d.path).is_file():
            result.skipped_purged += 1
            continue
        was, attempts = d.state, d.attempts
        won = session.execute(update(Delivery).where(Delivery.id == d.id, Delivery.state == was).values(
            state="pending", attempts=0, next_attempt_at=now, lease_expires_at=None, delivered_at=None)).rowcount
        if won:
            result.requeued += 1
            queue.audit(session, "resend", peer=d.destination, study_uid=uid, sop_instance_uid=d.sop_instance_uid,
                        detail=f"delivery {d.id} ({d.kind}) was {was} after {attempts} attempt(s); {how}")
    session.commit()
    return result
