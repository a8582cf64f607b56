"""Shared fixtures: real peers (DCMTK), databases (SQLite, PostgreSQL), synthetic studies."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

PG_DSN = os.environ.get("OSTEOSCREEN_TEST_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def _pg_admin():
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise  # CI promises PostgreSQL: a missing server is a failure, not a skip
        pytest.skip(f"PostgreSQL not reachable: {exc}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    admin = _pg_admin()
    name = f"osteo_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_DSN.split())
    yield f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI installs dcmtk and dicom3tools)")
        pytest.skip(f"{name} not installed")
    return path


def dciodvfy_errors(path) -> list[str]:
    """Lines dciodvfy reports as errors for a DICOM file (an empty list means valid)."""
    require_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
