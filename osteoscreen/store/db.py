"""Engine, sessions and the schema. SQLite gets WAL and a busy timeout so that roles in one process
(and a second process reading the database) do not trip over each other; PostgreSQL needs nothing
special.

The schema is Alembic's (``migrations/``, packaged with osteoscreen): ``upgrade(url)`` brings any
database to the newest revision: an empty one is created by the migrations, one made by an older
osteoscreen with ``create_all`` (no ``alembic_version`` table) is stamped with the initial revision
and upgraded from there. Concurrent starts (several roles, several hosts) take a lock first: an
advisory lock on PostgreSQL, a lock file beside the SQLite database.
"""
from __future__ import annotations

import contextlib
import logging
import time
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("osteoscreen.store")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"  # the schema create_all made before migrations existed
_PG_LOCK_KEY = 0x05_7E_05_C2  # pg_advisory_lock key: "osteoscreen schema"


class SchemaError(RuntimeError):
    """The database cannot be brought to this version's schema (e.g. it is newer)."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: an error message never carries bound values (patient IDs, accession numbers)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, like the spool file
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(url, hide_parameters=True)
    _ping_when_idle(engine)
    return engine


IDLE_PING_SECONDS = 2.0  # a pooled connection resting longer than this is pinged before it is used


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, paid only where it can matter. `pool_pre_ping` pings on every
    checkout: a round trip per transaction, a third of the queue's hot path (bench/throughput.py). A
    connection handed straight back and forth by a busy worker was in use a moment ago; one that rested
    in the pool (a PostgreSQL restart, an idle timeout or a failover may have closed it meanwhile) is
    pinged, and replaced when the ping fails (DisconnectionError makes the pool connect afresh, as
    SQLAlchemy's "Disconnect Handling - Pessimistic" documents for checkout events). A connection that
    dies while in use raises once; SQLAlchemy then invalidates the pool, and the callers' retries
    (the sender's, the worker's) meet fresh connections."""
    @event.listens_for(engine, "checkin")
    def _rested_from(_dbapi_conn, record):
        if record is not None:
            record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_rested(dbapi_conn, record, _proxy):
        since = record.info.get("checked_in")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return  # new (just connected), or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)  # what pool_pre_ping runs (psycopg: in autocommit)
        except Exception as error:  # any failure: this connection is not to be trusted
            raise DisconnectionError(f"pooled connection failed its ping: {type(error).__name__}") from error


def alembic_config(url: str | None = None, connection: Connection | None = None):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext
    return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _schema_lock(engine: Engine, conn: Connection):
    """Serialise schema changes between processes starting at the same time."""
    if engine.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        import fcntl
        with open(f"{engine.url.database}.migrate-lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    else:
        yield


def upgrade_engine(engine: Engine) -> tuple[str | None, str]:
    """Bring the database behind engine to the head revision; returns (revision before, head)."""
    from alembic import command
    head = head_revision()
    with engine.connect() as conn:
        before = current_revision(conn)
        conn.rollback()
        if before == head:
            return before, head  # the common case, without a lock
        with _schema_lock(engine, conn):
            before = current_revision(conn)
            tables = set(inspect(conn).get_table_names())
            conn.rollback()
            cfg = alembic_config(connection=conn)
            if before is None and "studies" in tables:
                # made by create_all before migrations existed: that schema is the initial revision
                log.info("database has no schema revision: stamping %s", INITIAL_REVISION)
                command.stamp(cfg, INITIAL_REVISION)
                conn.commit()
                before = INITIAL_REVISION
            if before is not None and before != head:
                from alembic.script import ScriptDirectory
                try:
                    ScriptDirectory.from_config(cfg).get_revision(before)
                except Exception as exc:
                    raise SchemaError(f"database schema revision {before!r} is unknown to this osteoscreen "
                                      f"(newest known: {head}); is it from a newer version?") from exc
            if before != head:
                log.info("upgrading database schema %s -> %s", before or "(empty)", head)
                command.upgrade(cfg, "head")
                conn.commit()
    return before, head


def upgrade(url: str) -> tuple[str | None, str]:
    """`osteoscreen db upgrade`: migrate the database at url to head."""
    engine = make_engine(url)
    try:
        return upgrade_engine(engine)
    finally:
        engine.dispose()


class Database:
    """One engine and its session factory. On start the schema is brought to the head revision
    (migrate=False: only checked, SchemaError when it is behind — for sites that migrate by hand)."""

    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        try:
            self._check_schema(migrate)
        except BaseException:
            self.engine.dispose()
            raise
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _check_schema(self, migrate: bool) -> None:
        if migrate:
            upgrade_engine(self.engine)
        else:
            with self.engine.connect() as conn:
                found = current_revision(conn)
            if found != head_revision():
                raise SchemaError(f"database schema is at {found or 'no revision'}, this osteoscreen needs "
                                  f"{head_revision()}: run `osteoscreen db upgrade`")

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()
