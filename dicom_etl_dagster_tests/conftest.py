"""Shared fixtures: a real, throwaway PostgreSQL (pgserver) and a fresh database per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

# The real Orthanc fixtures (`orthanc`, `orthanc_with_auth`) for the upload tests.
pytest_plugins = ["dicom_etl_dagster_tests.orthanc"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_VOCAB_DIR = REPO_ROOT.parent / "shared" / "dicom2omop"


def _vocab_dir() -> Path:
    configured = os.environ.get("DICOM_ETL_VOCAB_DIR")
    return Path(configured) if configured else SHARED_VOCAB_DIR


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    folder = _vocab_dir()
    if not (folder / "omop_table_staging_v5.csv").is_file():
        pytest.fail(
            f"DICOM2OMOP files not found in {folder}: set DICOM_ETL_VOCAB_DIR (CI uses ../shared/dicom2omop)"
        )
    return folder


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, vocab_dir, tmp_path):
    """Every test sees the pinned vocabulary files and never the user's own database."""
    monkeypatch.setenv("DICOM_ETL_VOCAB_DIR", str(vocab_dir))
    monkeypatch.delenv("DICOM_ETL_DATABASE_URL", raising=False)
    monkeypatch.delenv("DICOM_ETL_FILES_DIR", raising=False)
    monkeypatch.setenv("DICOM_ETL_EMBEDDED_PGDATA", str(tmp_path / "embedded-pgdata-unused"))


@pytest.fixture(scope="session")
def postgres_server():
    import tempfile

    import pgserver

    # Not under pytest's basetemp: another pytest session starting meanwhile prunes old
    # basetemp folders, which would pull the data folder from under a running server.
    server = pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="dicom_etl_test_pg_")), cleanup_mode="delete"
    )
    yield server
    server.cleanup()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.contextmanager
def fresh_database(server, prefix: str = "t") -> Iterator[str]:
    """A new, empty database on ``server`` (a pgserver instance), dropped afterwards."""
    admin_url = server.get_uri()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_server) -> Iterator[str]:
    """A new, empty database on the session's server; dropped after the test."""
    with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture
def db(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def scalar(conn: psycopg.Connection, query: str, params=None):
    return conn.execute(query, params).fetchone()[0]


@pytest.fixture
def embedded_pgdata(tmp_path):
    """A data folder for the embedded PostgreSQL a CLI run starts; stopped afterwards."""
    pgdata = tmp_path / "pgdata"
    yield pgdata
    if pgdata.exists():  # stop the server the CLI left running for later runs
        import pgserver

        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
