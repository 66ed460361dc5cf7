"""Faults in the middle of a large ingest.

* SIGKILL of the ingest process (and its parse workers) in the middle of a run, once while a
  batch is half written (its transaction has the OMOP and metadata rows but not yet the ledger
  rows) and once while it runs freely; then a re-run. The final tables equal, row for row (ids
  aside), those of one clean run of the same folder into another database.
* PostgreSQL restarted (pg_ctl restart -m fast) in the middle of an `ingest_metadata` run, on a
  separate throwaway server: the run fails, with a clear message, and the re-run completes
  with exact counts.

"In the middle" is made deterministic, not timed: once the ledger shows committed batches the
test takes an EXCLUSIVE lock on dicom_ingest_log (reads pass, writes wait), waits until the
ingest's connection is blocked on it inside its batch transaction, and only then injects the
fault. Every wait polls with generous timeouts, so a slow machine only makes it slower.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import psutil
import psycopg
import pytest

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import PersonMapping
from dicom_etl_dagster_tests.conftest import _with_database, fresh_database, scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.helpers import options, run_job
from dicom_etl_dagster_tests.reliability import hostile
from dicom_etl_dagster_tests.reliability.figures import FIGURES
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

MI = "cdmmedicalimaging"
SCHEMAS = Schemas()
BATCH = 10
FILES = 300
TIMEOUT = 300.0  # seconds; generous: the machine may be busy
VICTIM = "reliability-victim"


def wait_for(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.05, alive=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None:
            alive()
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def ledger_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        if scalar(conn, "SELECT to_regclass(%s)", [f"{MI}.dicom_ingest_log"]) is None:
            return 0
        return scalar(conn, f"SELECT count(*) FROM {MI}.dicom_ingest_log")


def blocked_on_ledger_lock(url: str, application_name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return bool(
            scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s AND wait_event_type = 'Lock'",
                [application_name],
            )
        )


def core_ingest(url: str, root: Path, run_id: str, workers: int = 1) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_tables(conn, SCHEMAS)
        state = prepare_run(
            conn,
            SCHEMAS,
            run_id,
            "use_id_zero",
            PersonMapping(MI, "mappingtable", "source_person_id", "source_patient_id"),
            lambda message: None,
        )
        ingest_folder(conn, state, root, BATCH, workers)


@pytest.fixture
def second_database_url(postgres_server):
    with fresh_database(postgres_server, "t_clean") as url:
        yield url


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("big") / "dicom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return root, hostile.clean_folder(root, FILES)


VICTIM_SCRIPT = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    import psycopg
    from dicom_etl_dagster.core.db.identifiers import Schemas
    from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
    from dicom_etl_dagster.core.ingest.writer import PersonMapping

    if __name__ == "__main__":
        url, root, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
        conn = psycopg.connect(url, autocommit=True, application_name={VICTIM!r})
        schemas = Schemas()
        state = prepare_run(conn, schemas, "killed-run", "use_id_zero",
                            PersonMapping("{MI}", "mappingtable", "source_person_id", "source_patient_id"),
                            lambda message: None)
        ingest_folder(conn, state, Path(root), {BATCH}, workers)
        print("FINISHED", flush=True)
""")


def _survivors(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return found


@pytest.mark.parametrize("moment", ["half_written_batch", "free_running"])
def test_sigkill_mid_ingest_then_rerun_equals_one_clean_run(
    moment, database_url, second_database_url, big_folder, tmp_path
):
    root, files = big_folder
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_tables(conn, SCHEMAS)
    script = tmp_path / "victim.py"
    script.write_text(VICTIM_SCRIPT)
    log = (tmp_path / "victim.log").open("w+")
    victim = subprocess.Popen(
        [sys.executable, str(script), database_url, str(root), "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pgid = victim.pid
    lock_conn = None
    try:

        def still_running():
            if victim.poll() is not None:
                log.seek(0)
                pytest.fail(
                    f"the ingest ended before it could be killed (rc {victim.returncode}): "
                    f"{log.read()[-2000:]}"
                )

        wait_for(
            lambda: ledger_rows(database_url) >= 2 * BATCH,
            "two committed batches",
            alive=still_running,
        )
        if moment == "half_written_batch":
            lock_conn = psycopg.connect(database_url)
            lock_conn.execute(f"LOCK TABLE {MI}.dicom_ingest_log IN EXCLUSIVE MODE")
            wait_for(
                lambda: blocked_on_ledger_lock(database_url, VICTIM),
                "the ingest to block on the ledger inside its batch transaction",
                alive=still_running,
            )
            # The batch's OMOP and metadata rows are written (uncommitted) by now: its
            # transaction holds the write lock of dicom_file_metadata.
            with psycopg.connect(database_url, autocommit=True) as conn:
                assert (
                    scalar(
                        conn,
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                        " WHERE a.application_name = %s AND l.granted AND l.mode = 'RowExclusiveLock'"
                        " AND l.relation = %s::regclass",
                        [VICTIM, f"{MI}.dicom_file_metadata"],
                    )
                    == 1
                )
        os.killpg(pgid, signal.SIGKILL)
        victim.wait(timeout=TIMEOUT)
        wait_for(lambda: not _survivors(pgid), "the parse workers to die with the ingest")
    finally:
        if victim.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            victim.wait()
        if lock_conn is not None:
            lock_conn.rollback()
            lock_conn.close()
        log.close()
    FIGURES["faults_injected"][f"SIGKILL ({moment})"] += 1

    # The killed backend's transaction is gone (rolled back), nothing of it is visible.
    def victim_gone():
        with psycopg.connect(database_url, autocommit=True) as conn:
            return (
                scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    [VICTIM],
                )
                == 0
            )

    wait_for(victim_gone, "the killed run's database session to end")
    with psycopg.connect(database_url, autocommit=True) as conn:
        done = scalar(conn, f"SELECT count(*) FROM {MI}.dicom_ingest_log")
        assert 0 < done < FILES, done
        assert done % BATCH == 0, f"{done} ledger rows: not whole batches"
        assert (
            scalar(conn, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.dicom_file_metadata")
            == done
        )
        assert scalar(
            conn, f"SELECT count(DISTINCT image_occurrence_id) FROM {MI}.dicom_file_metadata"
        ) == scalar(conn, f"SELECT count(*) FROM {MI}.image_occurrence")

    core_ingest(database_url, root, "rerun", workers=2)
    core_ingest(second_database_url, root, "clean", workers=2)

    with (
        psycopg.connect(database_url, autocommit=True) as after,
        psycopg.connect(second_database_url, autocommit=True) as clean,
    ):
        assert_ids_consistent(after, SCHEMAS)
        assert_ids_consistent(clean, SCHEMAS)
        got, want = table_content(after, SCHEMAS), table_content(clean, SCHEMAS)
        for table in want:
            assert got[table] == want[table], f"{table} differs from one clean run"
        sops = [
            r[0]
            for r in after.execute(
                f"SELECT sop_instance_uid FROM {MI}.dicom_ingest_log WHERE status = 'ingested'"
            ).fetchall()
        ]
        assert len(sops) == len(set(sops)) == FILES
        assert scalar(after, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == sum(
            expected_metadata_rows(p) for p in files
        )
        assert scalar(after, f"SELECT count(*) FROM {MI}.image_occurrence") == FILES // BATCH
        assert scalar(after, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == FILES // (
            BATCH * 3
        )
        for conn in (after, clean):
            twice = scalar(
                conn,
                f"SELECT count(*) FROM (SELECT sop_instance_id FROM {MI}.dicom_file_metadata"
                " WHERE metadata_source_tag = '(0008,0018)' AND parent_sequence_id IS NULL"
                " GROUP BY 1 HAVING count(*) > 1) d",
            )
            FIGURES["duplicates_found"] += twice
            assert twice == 0


# --------------------------------------------------------------------------
# PostgreSQL restarted mid-run
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_server():
    """A PostgreSQL of this test's own: restarting the session's shared server is not an option."""
    import pgserver
    from pgserver import _commands

    server = pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="dicom_etl_restart_pg_")), cleanup_mode="delete"
    )
    try:
        yield server
    finally:
        # pgserver only stops the postmaster it started; after the restart that is another
        # process, so stop the server here, then let pgserver delete the data folder.
        try:
            _commands.pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=server.pgdata,
                user=server.system_user,
                timeout=TIMEOUT,
            )
        except subprocess.CalledProcessError:
            pass  # not running
        server.cleanup()


def _restart(server) -> None:
    from pgserver import _commands

    _commands.pg_ctl(
        ["-w", "-m", "fast", "restart"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=TIMEOUT,
    )


def _step_failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the run was expected to fail with a step failure"
    return failures[0].step_failure_data.error.message


@pytest.fixture(scope="module")
def restart_run(own_server, big_folder):
    """An ingest_metadata run during which PostgreSQL is restarted, and the re-run after it."""
    root, files = big_folder
    admin = own_server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "restart"')
    url = _with_database(admin, "restart")
    injected: dict = {}

    def saboteur():
        try:
            wait_for(lambda: ledger_rows(url) >= BATCH, "a committed batch", alive=lambda: None)
            lock = psycopg.connect(url)
            lock.execute(f"LOCK TABLE {MI}.dicom_ingest_log IN EXCLUSIVE MODE")
            wait_for(
                lambda: blocked_on_ledger_lock(url, "dicom_etl_dagster"),
                "the run to block on the ledger",
            )
            injected["ledger_rows_before"] = ledger_rows(url)
            _restart(own_server)
            injected["restarted"] = True
            try:
                lock.close()
            except psycopg.Error:
                pass
        except BaseException as exc:  # reported by the main thread
            injected["error"] = repr(exc)

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    config = options(dicom_files_abs_path=str(root), ingest_batch_size=BATCH, parse_workers=1)
    first = run_job("ingest_metadata", url, config, raise_on_error=False)
    thread.join(timeout=TIMEOUT)
    assert injected.get("restarted"), injected
    FIGURES["faults_injected"]["PostgreSQL restart"] += 1
    second = run_job("ingest_metadata", url, config, raise_on_error=False)
    return {"first": first, "second": second, "url": url, "files": files, "injected": injected}


def test_postgres_restart_mid_run_fails_then_rerun_completes(restart_run):
    first, second, url, files = (
        restart_run["first"],
        restart_run["second"],
        restart_run["url"],
        restart_run["files"],
    )
    assert not first.success, "the run went on as if nothing happened"
    assert second.success, _step_failure_message(second)
    with psycopg.connect(url, autocommit=True) as conn:
        statuses = dict(
            conn.execute(
                f"SELECT status, count(*) FROM {MI}.dicom_ingest_log GROUP BY 1"
            ).fetchall()
        )
        assert statuses == {"ingested": FILES}
        assert (
            scalar(conn, f"SELECT count(DISTINCT sop_instance_uid) FROM {MI}.dicom_ingest_log")
            == FILES
        )
        assert scalar(conn, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == sum(
            expected_metadata_rows(p) for p in files
        )
        assert scalar(conn, f"SELECT count(*) FROM {MI}.image_occurrence") == FILES // BATCH
        assert scalar(conn, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == FILES // (
            BATCH * 3
        )
        assert_ids_consistent(conn, SCHEMAS)


def test_postgres_restart_failure_message_is_clear(restart_run):
    failure = [e for e in restart_run["first"].all_events if e.event_type_value == "STEP_FAILURE"][
        0
    ]
    error = failure.step_failure_data.error
    message = error.message.strip()
    assert "\n" not in message, f"not one line: {message!r}"
    assert "postgresql" in message.lower(), f"the message does not say what failed: {message!r}"
    assert error.cause is None or not error.cause.cls_name.startswith(
        ("AdminShutdown", "OperationalError")
    ), f"raw driver error: {error.cause.message!r}"
    assert "re-run to finish" in message
