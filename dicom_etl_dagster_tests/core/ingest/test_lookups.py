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
