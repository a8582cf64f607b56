"""Which deliveries failed: dead deliveries, and pending ones that have failed at least once, newest
first, each with its study (`failed_deliveries`).
"""
from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from ...store.models import Delivery, Study
from .common import _delivery_dict


# -- deliveries ------------------------------------------------------------------------------------

def failed_deliveries(session: Session, limit: int = 200) -> list[dict]:
    """Dead deliveries, and pending ones that have failed at least once, newest first."""
    rows = session.execute(
        select(Delivery, Study.study_uid).join(Study, Study.id == Delivery.study_id)
        .where(or_(Delivery.state == "dead", and_(Delivery.state == "pending", Delivery.attempts > 0)))
        .order_by(Delivery.id.desc()).limit(limit)).all()
    return [_delivery_dict(d, uid) for d, uid in rows]
