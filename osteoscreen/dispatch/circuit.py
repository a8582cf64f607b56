"""A circuit breaker per destination, kept in the database (``destination_circuits``).

Every dispatcher process reads and changes the same row with conditional UPDATEs, so several
dispatchers share one view of a destination and a restart keeps it; no timer lives in memory.

closed ──K consecutive association failures──▶ open (retry_at = now + open interval)
open ──retry_at passed; one dispatcher wins the conditional UPDATE──▶ half_open (retry_at = probe lease)
half_open ──the probe's association works──▶ closed (the destination's backlog is due at once)
half_open ──the probe fails──▶ open again, for twice as long (capped)

While a circuit is open (or its probe is in flight) no delivery to it is claimed, so no association
is attempted and no delivery spends attempts. A probe whose dispatcher died is taken over once its
lease (retry_at) has passed. For a DICOMweb destination an "association failure" is a STOW-RS request
that got no answer, a 5xx, 408 or 429, or a refusal of the request as a whole (401, 403, 404, …).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..store import queue
from ..store.models import Delivery, DestinationCircuit, utcnow

log = logging.getLogger("osteoscreen.dispatch")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def blocked_destinations(now: datetime):
    """A subquery of the destinations nothing may be sent to now (open, or a probe in flight)."""
    return select(DestinationCircuit.destination).where(DestinationCircuit.state != CLOSED,
                                                        DestinationCircuit.retry_at > now)


def _ensure_row(session: Session, destination: str, now: datetime) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        if session.get(DestinationCircuit, destination) is None:
            session.add(DestinationCircuit(destination=destination, state=CLOSED, consecutive_failures=0,
                                           updated_at=now))
            session.flush()
        return
    session.execute(insert(DestinationCircuit).values(destination=destination, state=CLOSED,
                                                      consecutive_failures=0, updated_at=now)
                    .on_conflict_do_nothing(index_elements=["destination"]))


def admit(session: Session, destination: str, probe_lease_seconds: float, now: datetime | None = None) -> str:
    """May we send to destination now? 'closed' (send everything), 'probe' (this process won the
    half-open attempt: send one object) or 'blocked' (send nothing)."""
    now = now or utcnow()
    _ensure_row(session, destination, now)
    state = session.scalar(select(DestinationCircuit.state).where(DestinationCircuit.destination == destination))
    if state == CLOSED:
        return CLOSED
    won = session.execute(update(DestinationCircuit).where(
        DestinationCircuit.destination == destination, DestinationCircuit.state.in_((OPEN, HALF_OPEN)),
        DestinationCircuit.retry_at <= now).values(
        state=HALF_OPEN, retry_at=now + timedelta(seconds=probe_lease_seconds), updated_at=now)).rowcount
    if won:
        log.info("circuit of %s half-open: one probe attempt", destination)
        return "probe"
    return "blocked"


def record_success(session: Session, destination: str) -> bool:
    """The peer answered: close the circuit. Returns True when it was not closed before; its
    pending deliveries (backed off while it was down) are then due at once."""
    now = utcnow()
    row = session.get(DestinationCircuit, destination, populate_existing=True)
    was = row.state if row is not None else CLOSED
    session.execute(update(DestinationCircuit).where(DestinationCircuit.destination == destination).values(
        state=CLOSED, consecutive_failures=0, opened_at=None, retry_at=None, last_error=None, updated_at=now))
    if was == CLOSED:
        return False
    session.execute(update(Delivery).where(Delivery.destination == destination, Delivery.state == "pending",
                                           Delivery.next_attempt_at > now).values(next_attempt_at=now))
    queue.audit(session, "circuit_closed", peer=destination, detail=f"was {was}")
    log.info("circuit of %s closed: the destination answers again", destination)
    return True


def record_failure(session: Session, destination: str, error: str | None, *, threshold: int,
                   open_seconds: float, max_open_seconds: float, probing: bool) -> str:
    """An association to destination failed; returns the circuit's state afterwards."""
    now = utcnow()
    session.execute(update(DestinationCircuit).where(DestinationCircuit.destination == destination).values(
        consecutive_failures=DestinationCircuit.consecutive_failures + 1, last_error=(error or "")[:2000],
        updated_at=now))
    row = session.get(DestinationCircuit, destination, populate_existing=True)
    failures = row.consecutive_failures
    if not probing and failures < threshold:
        return row.state
    # each failed probe doubles the open interval, up to the cap
    open_for = min(max(open_seconds, max_open_seconds), open_seconds * 2 ** min(max(0, failures - threshold), 30))
    was = row.state
    session.execute(update(DestinationCircuit).where(DestinationCircuit.destination == destination).values(
        state=OPEN, opened_at=row.opened_at or now, retry_at=now + timedelta(seconds=open_for), updated_at=now))
    if was != OPEN:
        queue.audit(session, "circuit_open", peer=destination,
                    detail=f"{failures} consecutive failures to reach it; next probe in {open_for:.0f} s")
        log.warning("circuit of %s open after %d consecutive failures to reach it; next probe in %.0f s",
                    destination, failures, open_for)
    session.expire(row)
    return OPEN
