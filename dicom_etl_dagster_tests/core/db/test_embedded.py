"""The documented command that stops the embedded PostgreSQL, run as users run it.

As root (CI, containers) pgserver runs PostgreSQL as its hidden system user ``pgserver``,
and ``pg_ctl`` itself refuses to run as root: the command must stop it all the same.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from dicom_etl_dagster.core.db import embedded

COMMAND = [sys.executable, "-m", "dicom_etl_dagster.core.db.embedded", "stop"]


def _run(env_pgdata, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ETL_")}
    env["DICOM_ETL_EMBEDDED_PGDATA"] = str(env_pgdata)
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def running_server(tmp_path):
    """An embedded server left running, as a run leaves it (cleanup_mode=None)."""
    import pgserver

    pgdata = tmp_path / "pgdata"
    url = pgserver.get_server(pgdata, cleanup_mode=None).get_uri()
    yield pgdata, url
    if embedded.is_running(pgdata):  # the test failed: do not leave a server behind
        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()


def test_stop_stops_the_server_a_run_left_running(running_server):
    pgdata, url = running_server
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if os.geteuid() == 0:
        # What the README's old advice gave root: pg_ctl refuses, the server runs as pgserver.
        assert embedded.server_owner(pgdata) == "pgserver"
        refused = subprocess.run(
            [str(embedded.pg_ctl_path()), "-D", str(pgdata), "stop"],
            capture_output=True,
            text=True,
        )
        assert refused.returncode != 0 and "cannot be run as root" in refused.stderr

    completed = _run(pgdata)  # the folder from DICOM_ETL_EMBEDDED_PGDATA, as runs find it

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (
        f"stopped the embedded PostgreSQL in {pgdata} (it ran as {embedded.server_owner(pgdata)})"
    )
    assert not embedded.is_running(pgdata)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    # Stopping again is harmless and says so.
    again = _run(pgdata)
    assert again.returncode == 0
    assert again.stdout.strip() == f"embedded PostgreSQL in {pgdata} is not running"


def test_stop_on_a_folder_without_a_server_creates_nothing(tmp_path):
    folder = tmp_path / "no-such-pgdata"
    completed = _run(tmp_path / "ignored", "--data-dir", str(folder))
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"error: {folder} is not an embedded PostgreSQL data folder"
    )
    assert not folder.exists()


def test_stop_prints_one_line_and_nothing_else(running_server):
    pgdata, _ = running_server
    completed = _run(pgdata)
    assert completed.returncode == 0
    assert len(completed.stdout.splitlines()) == 1
    assert completed.stderr == ""  # no warning of pgserver's import on the way
