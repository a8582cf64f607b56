"""Send result objects to their destinations: claimed from the database, retried with exponential
backoff and jitter, set aside as 'dead' after the configured number of attempts."""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

from ..config import Destination, Settings
from ..node.sender import SendResult, send_files
from ..store import queue
from ..store.db import Database
from ..store.models import Delivery, utcnow

log = logging.getLogger("osteoscreen.dispatch")


def backoff_seconds(attempts: int, base: float, cap: float, rng: random.Random = random.Random()) -> float:
    """Full-jitter exponential backoff: uniform in [base·2^(n−1)/2, base·2^(n−1)], capped."""
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return rng.uniform(ceiling / 2, ceiling)


class Dispatcher:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db

    def run_once(self) -> int:
        """Send what is due; returns how many objects were delivered."""
        s = self.settings
        with self.db.session() as session:
            claimed = queue.claim_deliveries(session, owner_lease_seconds=120)
            by_destination: dict[str, list[Delivery]] = defaultdict(list)
            for d in claimed:
                by_destination[d.destination].append(d)
            delivered = 0
            for dest_text, items in by_destination.items():
                paths = [Path(d.path) for d in items]
                try:
                    results = send_files(Destination.parse(dest_text), paths, s.ae_title)
                except Exception as exc:  # never leave claimed deliveries stuck in 'sending'
                    log.exception("sending to %s failed", dest_text)
                    results = [SendResult(p, False, None, f"{type(exc).__name__}: {exc}") for p in paths]
                for d, r in zip(items, results):
                    d.attempts += 1
                    if r.ok:
                        d.state, d.delivered_at, d.last_error = "delivered", utcnow(), None
                        delivered += 1
                        queue.audit(session, "delivered", peer=dest_text, sop_instance_uid=d.sop_instance_uid)
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
