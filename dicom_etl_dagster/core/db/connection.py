"""Connections to the target PostgreSQL: a URL, or the embedded server started on demand.

No Dagster here: the resource (``resources.database``) only chooses between the two. Every
message that can reach a log names the server with its password replaced by ``***``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import psycopg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.errors import DicomEtlError

_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to log or show."""
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def default_embedded_data_dir() -> Path:
    if os.geteuid() == 0:
        # As root, pgserver runs PostgreSQL as its own user, which must be able to reach the
        # folder: keep it out of /root (pgserver would otherwise open up its permissions).
        return Path("/var/lib/dicom_etl_dagster/pgdata")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "dicom_etl_dagster" / "pgdata"


def embedded_data_dir() -> Path:
    """The embedded server's data folder: DICOM_ETL_EMBEDDED_PGDATA, else the default."""
    return Path(settings.EMBEDDED_PGDATA.value() or default_embedded_data_dir())


class DatabaseUnavailableError(DicomEtlError):
    """PostgreSQL cannot be reached; the message is one line and carries no password."""


class DatabaseConnectionLost(DicomEtlError):
    """The server went away mid-run (restart, failover, network)."""


def connection_lost(exc: psycopg.OperationalError, where: str) -> DatabaseConnectionLost:
    """The one-line error for a connection lost mid-run; whole batches are committed or not."""
    reason = redact_url((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return DatabaseConnectionLost(
        f"lost the connection to PostgreSQL ({where}): {reason}. "
        "Batches committed before are kept; re-run to finish the rest."
    )


def embedded_database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL kept in ``data_dir`` and return its URL.

    The server is left running after the process exits (cleanup_mode=None) so later runs
    and other step processes reuse it instead of paying a start-up each time.
    """
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(data_dir, cleanup_mode=None)
    except subprocess.CalledProcessError:
        # pgserver gives pg_ctl 10 s; a loaded machine can need longer (seen in CI with
        # other test processes running). Once more: a server that came up late is reused.
        time.sleep(2)
        server = pgserver.get_server(data_dir, cleanup_mode=None)
    return server.get_uri()


#: The ``application_name`` of the ETL's sessions (``pg_stat_activity``).
APPLICATION_NAME = "dicom_etl_dagster"


def connect(url: str) -> psycopg.Connection:
    """An autocommit connection; callers open explicit transactions for their batches.

    Its statements are never prepared. psycopg prepares a query after five executions, and
    PostgreSQL then settles on a generic plan, chosen without the array an ``= ANY(%s)``
    look-up is given and with the table as it was: a run that starts on an empty ledger
    kept a sequential scan of ``dicom_ingest_log`` for every batch after (63 ms per
    250-path look-up at 20,000 rows, growing with the ledger). Planning each execution
    costs a fraction of a millisecond per batch.

    It plans with ``random_page_cost`` 1.1 (PostgreSQL's default, 4, is a spinning disk's).
    The ETL looks a batch's few hundred keys up in indexed tables that are in memory or on
    SSD; at 4 the planner preferred scanning a ledger of 20,000-50,000 rows to 500 index
    look-ups, a few milliseconds per look-up and batch, and PostgreSQL's CPU per metadata
    row rose by 40% between 30,000 and 50,000 files.
    """
    conn = None
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME
        )
        conn.prepare_threshold = None
        # A SET, not the URL's "options": a user's own options there stay as they are.
        conn.execute("SET random_page_cost = 1.1")
        return conn
    except psycopg.Error as exc:
        if conn is not None:  # connected, but the session could not be set up
            conn.close()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {redact_url(reason)}"
        ) from None
