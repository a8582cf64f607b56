"""Schema migrations (Alembic) on SQLite and PostgreSQL: head equals the models, a database made
before migrations existed is stamped and upgraded, `osteoscreen db upgrade` and its errors."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

import osteoscreen
from osteoscreen.cli import main
from osteoscreen.store import db as store_db
from osteoscreen.store.db import Database, SchemaError, alembic_config, head_revision, make_engine
from osteoscreen.store.models import Base


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def revision(engine) -> str | None:
    with engine.connect() as conn:
        return store_db.current_revision(conn)


def test_db_upgrade_on_empty_database_gives_exactly_the_models(db_url, capsys):
    assert main(["db", "upgrade", "--database-url", db_url]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out
    engine = make_engine(db_url)
    try:
        assert revision(engine) == head_revision()
        assert schema_diff(engine) == []  # tables, columns, types, nullability, indexes, unique constraints
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()
    assert main(["db", "upgrade", "--database-url", db_url]) == 0  # again: nothing to do, still fine


def test_database_made_before_migrations_is_stamped_and_upgraded(db_url):
    # the initial revision is what create_all made before Alembic: build that, without alembic_version
    engine = make_engine(db_url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(connection=conn), store_db.INITIAL_REVISION)
        conn.commit()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO studies (study_uid, status, first_received_at, last_received_at) "
                          "VALUES ('1.2.3', 'screened', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
    assert "purged_at" not in {c["name"] for c in inspect(engine).get_columns("instances")}
    engine.dispose()

    db = Database(db_url)  # what every role does on start
    try:
        assert revision(db.engine) == head_revision()
        assert schema_diff(db.engine) == []
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT study_uid FROM studies")).scalars().all() == ["1.2.3"]  # data kept
    finally:
        db.dispose()


def test_downgrade_to_base_and_up_again(db_url):
    """Every revision's downgrade works (SQLite: batch mode drops columns by copying the table)."""
    db = Database(db_url)
    with db.engine.connect() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
        conn.commit()
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    db.dispose()
    db = Database(db_url)
    try:
        assert schema_diff(db.engine) == []
    finally:
        db.dispose()


def test_concurrent_starts_migrate_once(db_url):
    """Roles starting at the same moment on a fresh database: the schema lock serialises them."""
    errors, dbs = [], []

    def start():
        try:
            dbs.append(Database(db_url))
        except Exception as exc:  # pragma: no cover - the failure we test for
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(dbs) == 3
        assert revision(dbs[0].engine) == head_revision()
        assert schema_diff(dbs[0].engine) == []
    finally:
        for d in dbs:
            d.dispose()


def test_migrate_false_refuses_an_old_schema_and_newer_revisions_are_refused(db_url):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(connection=conn), store_db.INITIAL_REVISION)
        conn.commit()
    with pytest.raises(SchemaError, match="osteoscreen db upgrade"):
        Database(db_url, migrate=False)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer"):
        Database(db_url)


@pytest.mark.parametrize("url", ["notaurl", "nosuchdialect://x/y"])
def test_db_upgrade_with_a_bad_url_exits_2(url, capsys):
    assert main(["db", "upgrade", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "database URL is not usable" in err and "Traceback" not in err


def test_db_needs_a_subcommand():
    with pytest.raises(SystemExit) as exc:
        main(["db"])
    assert exc.value.code == 2


def test_migrations_ship_inside_the_package():
    """A non-editable install finds the migrations: they live in the osteoscreen package, the versions
    folder is a package (its modules are installed) and pyproject ships the template."""
    package = Path(osteoscreen.__file__).parent
    assert store_db.MIGRATIONS.is_relative_to(package)
    for name in ("__init__.py", "env.py", "script.py.mako", "versions/__init__.py"):
        assert (store_db.MIGRATIONS / name).is_file(), name
    pyproject = (package.parent / "pyproject.toml")
    if pyproject.is_file():
        assert "script.py.mako" in pyproject.read_text() and "alembic" in pyproject.read_text()
