"""What every page module of the dashboard shares: the request's database session.

`create_app` puts the Database under ``app.extensions["osteoscreen.db"]``; page modules (one per
subject, each with a ``register(app, settings)``) call ``db_session()`` and never open their own."""
from __future__ import annotations

from datetime import date

from flask import current_app, g, request
from werkzeug.exceptions import BadRequest
from sqlalchemy.orm import Session

from ..store import queue


def db_session() -> Session:
    """This request's session, opened on first use and closed when the request ends."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["osteoscreen.db"].session()
    return g.db_session


def close_session(_exc=None) -> None:
    s = g.pop("db_session", None)
    if s is not None:
        s.close()


def audit(event: str, detail: str | None, study_uid: str | None = None) -> None:
    """An audit event by the signed-in user (or the peer address), committed at once (PHI-free)."""
    user = g.get("user")
    with current_app.extensions["osteoscreen.db"].session() as s:
        queue.audit(s, event, peer=f"web:{user.name}" if user else f"web:{request.remote_addr}",
                    study_uid=study_uid, detail=detail)
        s.commit()


def query_date(value: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query parameter, None when empty; anything else is a 400 naming the parameter."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None
