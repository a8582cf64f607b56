"""Process heartbeats: every running osteoscreen process refreshes one row every few seconds, so the
dashboard can say which roles are alive where, and a container health check can ask about its own
host (`osteoscreen health`). A cleanly stopped process removes its row; a dead one's row goes stale
and is deleted after a day."""
from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from .models import ProcessHeartbeat, utcnow

INTERVAL_SECONDS = 10.0
STALE_AFTER_SECONDS = 3 * INTERVAL_SECONDS  # a process not seen for this long counts as down
FORGET_AFTER = timedelta(days=1)


class Heartbeat:
    """This process's row."""

    def __init__(self, roles: tuple[str, ...], version: str):
        self.host = socket.gethostname()[:128]
        self.pid = os.getpid()
        self.started_at = utcnow()
        self.id = f"{self.host}:{self.pid}:{self.started_at:%Y%m%d%H%M%S%f}"[:160]
        self.roles = ",".join(roles)
        self.version = version

    def beat(self, session: Session) -> None:
        now = utcnow()
        if not session.execute(update(ProcessHeartbeat).where(ProcessHeartbeat.id == self.id)
                               .values(last_seen_at=now)).rowcount:
            session.add(ProcessHeartbeat(id=self.id, host=self.host, pid=self.pid, roles=self.roles,
                                         version=self.version, started_at=self.started_at, last_seen_at=now))
        session.execute(delete(ProcessHeartbeat).where(ProcessHeartbeat.last_seen_at < now - FORGET_AFTER))
        session.commit()

    def remove(self, session: Session) -> None:
        session.execute(delete(ProcessHeartbeat).where(ProcessHeartbeat.id == self.id))
        session.commit()


def alive(session: Session, now: datetime | None = None, role: str | None = None,
          host: str | None = None, max_age: float = STALE_AFTER_SECONDS) -> list[ProcessHeartbeat]:
    """Processes seen within max_age seconds, optionally running `role` on `host`."""
    now = now or utcnow()
    rows = session.scalars(select(ProcessHeartbeat).where(
        ProcessHeartbeat.last_seen_at >= now - timedelta(seconds=max_age))
        .order_by(ProcessHeartbeat.host, ProcessHeartbeat.started_at)).all()
    return [r for r in rows if (role is None or role in r.roles.split(",")) and (host is None or r.host == host)]
