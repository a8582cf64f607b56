"""Is the node healthy: jobs and deliveries by state, when it last received, reported and delivered,
the live processes and their roles, the destination circuits and free storage (`health`, a `Health`,
ok when nothing needs an operator), and every process heartbeat (`all_heartbeats`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...store.heartbeat import alive
from ...store.models import Delivery, DestinationCircuit, Instance, Job, ProcessHeartbeat, Study, utcnow
from .common import _jsonable


# -- node health -----------------------------------------------------------------------------------

@dataclass
class Health:
    now: datetime
    jobs: dict[str, int]  # queued, running, failed
    deliveries: dict[str, int]  # pending, sending, dead
    last_received_at: datetime | None
    last_reported_at: datetime | None
    last_delivered_at: datetime | None
    processes: list[dict]
    roles_alive: dict[str, int]
    circuits: list[dict]
    storage_free_mb: int | None

    @property
    def ok(self) -> bool:
        """Nothing an operator must act on: no dead deliveries, no open circuit, no failed job."""
        return not (self.deliveries.get("dead") or self.jobs.get("failed")
                    or any(c["state"] != "closed" for c in self.circuits))

    def as_dict(self) -> dict:
        return _jsonable({**dataclasses.asdict(self), "ok": self.ok})


def health(session: Session, storage: Path | None = None) -> Health:
    now = utcnow()
    jobs = {k: 0 for k in ("queued", "running", "failed")}
    jobs.update({s: n for s, n in session.execute(select(Job.state, func.count()).where(
        Job.state.in_(list(jobs))).group_by(Job.state))})
    deliveries = {k: 0 for k in ("pending", "sending", "dead")}
    deliveries.update({s: n for s, n in session.execute(select(Delivery.state, func.count()).where(
        Delivery.state.in_(list(deliveries))).group_by(Delivery.state))})
    procs = alive(session, now)
    roles: Counter = Counter(r for p in procs for r in p.roles.split(","))
    circuits = [dict(destination=c.destination, state=c.state, consecutive_failures=c.consecutive_failures,
                     retry_at=c.retry_at, last_error=c.last_error)
                for c in session.scalars(select(DestinationCircuit).order_by(DestinationCircuit.destination))]
    free = None
    if storage is not None:
        import shutil
        try:
            free = shutil.disk_usage(storage).free // (1 << 20)
        except OSError:
            free = None
    return Health(
        now=now, jobs=jobs, deliveries=deliveries,
        last_received_at=session.scalar(select(func.max(Instance.received_at))),
        last_reported_at=session.scalar(select(func.max(Study.reported_at))),
        last_delivered_at=session.scalar(select(func.max(Delivery.delivered_at))),
        processes=[dict(host=p.host, pid=p.pid, roles=p.roles, version=p.version, started_at=p.started_at,
                        last_seen_at=p.last_seen_at) for p in procs],
        roles_alive={r: roles.get(r, 0) for r in ("listen", "work", "dispatch", "web")},
        circuits=circuits, storage_free_mb=free)


def all_heartbeats(session: Session) -> list[ProcessHeartbeat]:
    return list(session.scalars(select(ProcessHeartbeat).order_by(ProcessHeartbeat.host)))
