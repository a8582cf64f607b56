"""Alembic environment: one script directory for SQLite and PostgreSQL.

The caller (osteoscreen.store.db) hands over an open connection in ``config.attributes["connection"]``;
without one (the plain ``alembic`` command) an engine is made from ``sqlalchemy.url``. SQLite runs in
batch mode, so a future ALTER that SQLite cannot do natively becomes copy-and-move of the table.
"""
from __future__ import annotations

from alembic import context

from osteoscreen.store.db import make_engine
from osteoscreen.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                      render_as_batch=sqlite)
    if sqlite and not connection.in_transaction():
        # batch mode re-creates tables; foreign keys would veto dropping the old copy (the pragma
        # is ignored inside a transaction, hence before it)
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    with context.begin_transaction():
        context.run_migrations()
    if sqlite and not connection.in_transaction():
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
            conn.commit()
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
