"""The writer's look-ups use the indexes they were built for, also as prepared statements.

psycopg prepares a statement after five executions, and PostgreSQL may then run it with a
generic plan, which knows no parameter values. A partial index (the ledger's unique index on
``sop_instance_uid WHERE status = 'ingested'``) only serves a query whose predicate the
planner can see in the text: with ``status = $1`` every batch scanned the whole ledger, so
each batch of a long run was slower than the one before (found by scripts/benchmark.py: the
PostgreSQL backend's CPU per row rose from 3.4 to 5.7 µs over 20,000 files).
"""

from __future__ import annotations

from psycopg import sql

from dicom_etl_dagster.core.db.connection import connect
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.ingest import lookups

TABLES = Tables(Schemas())
PARTIAL_INDEX = "idx_dicom_ingest_log_ingested_sop"


def _ingested_query(db, monkeypatch) -> str:
    """The text of the ingested-SOP look-up, as the writer sends it."""
    sent: list[sql.Composed] = []
    monkeypatch.setattr(lookups, "_rows", lambda conn, row_type, query, params: sent.append(query))
    lookups._ingested(db, TABLES, ["1.2.3"])
    (query,) = sent
    return query.as_string(db)


def _generic_plan(db, text: str, types: str, arguments: str) -> str:
    """EXPLAIN of ``text`` run as a prepared statement with a generic plan."""
    db.execute("SET plan_cache_mode = force_generic_plan")
    db.execute("SET enable_seqscan = off")  # a tiny table would be scanned whatever the indexes
    db.execute(f"PREPARE lookup({types}) AS {text.replace('%s', '$1')}")
    try:
        return "\n".join(row[0] for row in db.execute(f"EXPLAIN EXECUTE lookup({arguments})"))
    finally:
        db.execute("DEALLOCATE lookup")


def test_the_ingested_sop_lookup_uses_the_partial_index_in_a_generic_plan(db, monkeypatch):
    ensure_tables(db, TABLES.schemas)
    text = _ingested_query(db, monkeypatch)
    assert PARTIAL_INDEX in _generic_plan(db, text, "text[]", "'{1.2.3}'")


def test_a_status_parameter_would_lose_the_partial_index(db, monkeypatch):
    # The control: the same query with the status as a parameter cannot use the index.
    ensure_tables(db, TABLES.schemas)
    text = _ingested_query(db, monkeypatch).replace("'ingested'", "$2")
    assert PARTIAL_INDEX not in _generic_plan(db, text, "text[], text", "'{1.2.3}', 'ingested'")


def test_the_jobs_connection_plans_every_look_up_for_its_own_paths(database_url):
    """A run that starts on an empty ledger looks it up before every batch while the batches
    fill it. With psycopg's prepared statements PostgreSQL settled on a generic plan made
    for the empty ledger: a sequential scan comparing every row with every path of the
    array, for every batch after (63 ms per 250-path look-up at 20,000 rows in the
    benchmark, growing with the ledger). The job's connection prepares nothing, so each
    look-up is planned with its paths and the ledger as it is."""
    ledger = TABLES["dicom_ingest_log"]
    paths = [f"/data/{n:06d}.dcm" for n in range(250)]
    with connect(database_url) as conn:
        ensure_tables(conn, TABLES.schemas)
        for _ in range(12):  # past psycopg's threshold and PostgreSQL's five custom plans
            assert lookups.ledger_rows(conn, TABLES, paths) == []
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (ingest_log_id, file_path, file_size, status, error_message,"
                " processed_at) SELECT n, format('/data/%s.dcm', lpad(n::text, 6, '0')), 1,"
                " 'failed', 'unreadable', now() FROM generate_series(0, 19999) AS n"
            ).format(ledger)
        )
        found = lookups.ledger_rows(conn, TABLES, paths)
        prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
    assert sorted(row.file_path for row in found) == paths
    assert prepared == []


def test_the_jobs_connection_finds_a_batch_in_a_mid_sized_ledger_by_its_index(
    database_url, monkeypatch
):
    """With PostgreSQL's default random_page_cost (a spinning disk's) the planner scanned a
    ledger of 20,000-50,000 rows rather than look a batch's 500 paths up in its index: a few
    ms per look-up and batch, and 40% more PostgreSQL CPU per metadata row between 30,000
    and 50,000 files of the benchmark. The job's connection plans as for memory or SSD."""
    ledger = TABLES["dicom_ingest_log"]
    folder = "/archive/dicom/BENCH0000001/study_001/series_002_ct/"  # paths as long as real ones
    sent: list[sql.Composed] = []
    monkeypatch.setattr(lookups, "_rows", lambda conn, row_type, query, params: sent.append(query))
    paths = [f"{folder}new{n:06d}.dcm" for n in range(500)]  # not in the ledger yet
    with connect(database_url) as conn:
        ensure_tables(conn, TABLES.schemas)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (ingest_log_id, file_path, file_size, status, sop_instance_uid,"
                " processed_at) SELECT n, {} || lpad(n::text, 6, '0') || '.dcm', 1, 'ingested',"
                " '1.2.826.0.1.3680043.8.498.' || lpad(n::text, 36, '0'), now()"
                " FROM generate_series(0, 19999) AS n"
            ).format(ledger, sql.Literal(folder))
        )
        conn.execute(sql.SQL("ANALYZE {}").format(ledger))
        lookups.ledger_rows(conn, TABLES, paths)
        (query,) = sent
        text = query.as_string(conn).replace("%s", sql.Literal(paths).as_string(conn))
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {text}"))
    assert "idx_dicom_ingest_log_path" in plan, plan
