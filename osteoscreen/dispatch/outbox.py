"""Send result objects to their destinations: claimed from the database, retried with exponential
backoff and jitter, set aside as 'dead' after the configured number of attempts; a destination that
keeps refusing associations is left alone for a while by its circuit breaker (``circuit.py``).

A destination is AET@HOST:PORT[?tls] (C-STORE, node/sender.py) or a DICOMweb base URL (STOW-RS,
node/dicomweb_sender.py); deliveries name it by that text, and the configured destination of that
name supplies what the text leaves out (a DICOMweb destination's credentials)."""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from ..config import ConfigError, DicomWebDestination, Settings, parse_destination
from ..node.dicomweb_sender import store_files
from ..node.sender import SendResult, send_files
from ..store import queue
from ..store.db import Database
from ..store.models import Delivery, utcnow
from . import circuit

log = logging.getLogger("osteoscreen.dispatch")

CLAIM_LEASE_SECONDS = 120.0
# errors of node.sender that mean no association could be made (the destination is down or refuses us)
ASSOCIATION_ERRORS = ("association failed", "association rejected", "association aborted")


def backoff_seconds(attempts: int, base: float, cap: float, rng: random.Random = random.Random()) -> float:
    """Full-jitter exponential backoff: uniform in [base·2^(n−1)/2, base·2^(n−1)], capped."""
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return rng.uniform(ceiling / 2, ceiling)


def association_outcome(results: list[SendResult], raised: bool = False) -> bool | None:
    """True when the destination answered (an association was made, whatever the C-STORE statuses;
    a STOW-RS response that speaks of the instances), False when no association could be made (no
    STOW-RS answer, or one refusing the request), None when nothing was tried (every file unreadable)."""
    if raised:
        return False
    if any(r.peer_answered for r in results):
        return True
    if any(r.peer_answered is False for r in results):
        return False
    if any(r.ok or r.status is not None or (r.error or "").startswith("not sent") for r in results):
        return True
    if any((r.error or "").startswith(ASSOCIATION_ERRORS + ("association lost", "no response")) for r in results):
        return False
    return None


def claim_due(session: Session, limit: int = 16, lease_seconds: float = CLAIM_LEASE_SECONDS) -> list[Delivery]:
    """Claim due deliveries to destinations whose circuit lets us through, so that a backlog for a
    destination that is down never crowds out the others."""
    return queue.claim_deliveries(session, lease_seconds, limit,
                                  exclude_destinations=circuit.blocked_destinations(utcnow()))


def release(session: Session, items: list[Delivery]) -> None:
    """Give claimed deliveries back untouched (no attempt spent): their circuit did not let us send."""
    if items:
        session.execute(update(Delivery).where(Delivery.id.in_([d.id for d in items]), Delivery.state == "sending")
                        .values(state="pending", lease_expires_at=None))
        for d in items:
            session.expire(d)


class Dispatcher:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.destinations = {str(d): d for d in settings.destinations}
        for d in settings.destinations:  # only this role needs a DICOMweb destination's secret: it must be there
            if isinstance(d, DicomWebDestination) and d.auth != "none" and not d.secret():
                raise ConfigError(f"destination {d}: environment variable {d.password_env or d.token_env} is not "
                                  "set (the dispatch role reads the credentials from it)")

    def send(self, dest_text: str, paths: list[Path]) -> list[SendResult]:
        """Send the files to the destination a delivery names, by C-STORE or STOW-RS. A destination
        no longer configured is reached by its text alone (a DICOMweb one then without credentials)."""
        s = self.settings
        destination = self.destinations.get(dest_text)
        if destination is None:
            try:
                destination = parse_destination(dest_text)
            except ConfigError as exc:
                return [SendResult(p, False, None, f"not sent: {exc}", peer_answered=False) for p in paths]
        if isinstance(destination, DicomWebDestination):
            return store_files(destination, paths, tls=s.tls)
        return send_files(destination, paths, s.ae_title, tls=s.tls)

    def run_once(self) -> int:
        """Send what is due; returns how many objects were delivered."""
        with self.db.session() as session:
            claimed = claim_due(session)
            by_destination: dict[str, list[Delivery]] = defaultdict(list)
            for d in claimed:
                by_destination[d.destination].append(d)
            delivered = 0
            for dest_text, items in by_destination.items():
                delivered += self._send_to(session, dest_text, items)
            return delivered

    def _send_to(self, session: Session, dest_text: str, items: list[Delivery]) -> int:
        s = self.settings
        breaker = s.dispatch_circuit_failures > 0
        probing = False
        if breaker:
            admission = circuit.admit(session, dest_text, CLAIM_LEASE_SECONDS)
            if admission == "blocked":
                release(session, items)
                session.commit()
                return 0
            if admission == "probe":  # half-open: one object tells whether the destination is back
                probing = True
                release(session, items[1:])
                items = items[:1]
            session.commit()
        paths = [Path(d.path) for d in items]
        raised = False
        try:
            results = self.send(dest_text, paths)
        except Exception as exc:  # never leave claimed deliveries stuck in 'sending'
            log.exception("sending to %s failed", dest_text)
            raised = True
            results = [SendResult(p, False, None, f"{type(exc).__name__}: {exc}") for p in paths]
        if breaker:
            reached = association_outcome(results, raised)
            if reached:
                circuit.record_success(session, dest_text)
            elif reached is False:
                circuit.record_failure(session, dest_text, next((r.error for r in results if r.error), None),
                                       threshold=s.dispatch_circuit_failures,
                                       open_seconds=s.dispatch_circuit_open_seconds,
                                       max_open_seconds=s.dispatch_backoff_max_seconds, probing=probing)
        delivered = 0
        for d, r in zip(items, results):
            d.attempts += 1
            d.lease_expires_at = None
            if r.ok:  # success, or a C-STORE warning: the peer stored the object
                d.state, d.delivered_at, d.last_error = "delivered", utcnow(), None
                delivered += 1
                queue.audit(session, "delivered", peer=dest_text, sop_instance_uid=d.sop_instance_uid,
                            detail=None if r.status in (0, None) else f"status 0x{r.status:04X}")
            elif d.attempts >= s.dispatch_max_attempts:
                d.state, d.last_error = "dead", r.error
                log.error("delivery %d to %s dead after %d attempts: %s", d.id, dest_text, d.attempts, r.error)
            else:
                d.state, d.last_error = "pending", r.error
                d.next_attempt_at = utcnow() + timedelta(seconds=backoff_seconds(
                    d.attempts, s.dispatch_backoff_seconds, s.dispatch_backoff_max_seconds))
                log.warning("delivery %d to %s failed (attempt %d): %s", d.id, dest_text, d.attempts, r.error)
        session.commit()
        return delivered
