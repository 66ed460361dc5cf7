"""dicom_file_metadata as the ETL creates it (revision 0007): partitioned by metadata_id,
partitions attached ahead of the writers, a changed file's rows replaced by the id range its
ledger row records, and the product's look-ups through indexes and partition pruning."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import psycopg
import pydicom
from psycopg import sql

from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.partitions import (
    PARTITION_SPAN,
    PartitionCover,
    ensure_partitions,
    is_partitioned,
)
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.ingest.checks import _TWICE_IN_METADATA
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.core.db.test_migrations import apply_f2260e1_ddl
from dicom_etl_dagster_tests.core.ingest.test_writer import MAIN, Folder, _run

TABLES = Tables(MAIN)
MD = TABLES["dicom_file_metadata"]
LOG = TABLES["dicom_ingest_log"]


def partitions(conn: psycopg.Connection) -> dict[str, int]:
    """Partition name -> its rows."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(%s) ORDER BY 1",
            [MD.as_string(conn)],
        ).fetchall()
    ]
    return {
        name: scalar(
            conn,
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(MAIN.medical_imaging, name)),
        )
        for name in names
    }


def rows_by_sop(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    """Every metadata row (but the id and timestamps) per SOP instance, in id order."""
    by_sop: dict[str, list[tuple]] = {}
    for row in conn.execute(
        sql.SQL(
            "SELECT sop_instance_id, metadata_source_tag, metadata_source_value, metadata_id"
            " FROM {} ORDER BY metadata_id"
        ).format(MD)
    ).fetchall():
        by_sop.setdefault(row[0], []).append(row[1:])
    return by_sop


def ledger_ranges(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    return {
        sop: (first, count)
        for sop, first, count in conn.execute(
            sql.SQL(
                "SELECT sop_instance_uid, metadata_id_first, metadata_row_count FROM {}"
                " WHERE status = 'ingested'"
            ).format(LOG)
        ).fetchall()
    }


def test_partitions_appear_as_ids_grow_and_a_changed_file_is_replaced_exactly(db, tmp_path):
    ensure_tables(db, MAIN)
    assert is_partitioned(db, MD)
    # A fresh install: the sequence's first ids and one span beyond are covered.
    assert partitions(db) == {"dicom_file_metadata_p0": 0, "dicom_file_metadata_p1": 0}
    boundary = 3 * PARTITION_SPAN
    db.execute(
        "SELECT setval(%s::regclass, %s)",
        [TABLES.sequence_text("dicom_etl_metadata_id_seq", db), boundary - 150],
    )
    folder = Folder(tmp_path / "dicom")
    report = _run(db, MAIN, folder.root)
    assert report.status_counts["ingested"] == 6
    written = partitions(db)
    assert written["dicom_file_metadata_p2"] > 0 and written["dicom_file_metadata_p3"] > 0
    assert sum(written.values()) == report.rows["dicom_file_metadata"]

    # Each ledger row records exactly its file's rows, consecutive ids.
    ranges = ledger_ranges(db)
    before = rows_by_sop(db)
    assert set(ranges) == set(before) == set(folder.sop.values())
    for sop, (first, count) in ranges.items():
        assert [r[-1] for r in before[sop]] == list(range(first, first + count))
    straddling = [s for s, (f, c) in ranges.items() if f < boundary <= f + c - 1]
    assert len(straddling) == 1, "a file's rows cross the partition boundary"
    name = next(n for n, s in folder.sop.items() if s == straddling[0])

    # Change that file (same SOP instance, other content): its rows, in both partitions, go.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(folder.path[name], force=True)
        ds.StudyDescription = "changed"
        ds.PatientComments = "a new element"
        ds.save_as(folder.path[name])
    again = _run(db, MAIN, folder.root, run_id="again")
    assert again.status_counts["ingested"] == 1
    assert again.rows["dicom_file_metadata_replaced"] == len(before[straddling[0]])
    after = rows_by_sop(db)
    assert {s: r for s, r in after.items() if s != straddling[0]} == {
        s: r for s, r in before.items() if s != straddling[0]
    }, "rows of other files changed"
    new_first, new_count = ledger_ranges(db)[straddling[0]]
    assert len(after[straddling[0]]) == new_count == len(before[straddling[0]]) + 1
    assert new_first > max(f + c for f, c in ranges.values()) - 1
    assert ("(0010,4000)", '["a new element"]') in [r[:2] for r in after[straddling[0]]]
    assert sum(partitions(db).values()) == sum(len(r) for r in after.values())


def test_a_batch_beyond_the_covered_range_creates_its_partitions_in_its_transaction(db):
    ensure_tables(db, MAIN)
    cover = PartitionCover()
    ensure_partitions(db, TABLES, cover=cover)
    assert cover.partitioned and cover.covered_below == 1 + PARTITION_SPAN + 1
    far = 7 * PARTITION_SPAN + 5
    with db.transaction():
        ensure_partitions(db, TABLES, far + 10, cover, far)
        db.execute(
            sql.SQL(
                "INSERT INTO {} (metadata_id, metadata_source_tag, image_occurrence_id,"
                " etl_created_datetime, etl_modified_datetime) VALUES (%s, '(0008,0018)', 1,"
                " now(), now())"
            ).format(MD),
            [far],
        )
    assert partitions(db)["dicom_file_metadata_p7"] == 1
    # Known covered now: no query, no DDL (a closed connection would fail either).
    assert cover.covered_below == far + 11
    closed = psycopg.connect(db.info.dsn, password=db.info.password)
    closed.close()
    ensure_partitions(closed, TABLES, far + 10, cover, far)


def test_a_plain_table_is_left_as_it_is(db):
    """A user's (or an upgraded install's) plain table: looked at once, never partitioned."""
    db.execute("CREATE SCHEMA IF NOT EXISTS cdmmedicalimaging")
    db.execute(
        "CREATE TABLE cdmmedicalimaging.dicom_file_metadata (metadata_id bigint PRIMARY KEY,"
        " metadata_source_tag varchar(20), image_occurrence_id integer)"
    )
    ensure_tables(db, MAIN)
    cover = PartitionCover()
    ensure_partitions(db, TABLES, cover=cover)
    assert cover.partitioned is False and not is_partitioned(db, MD)
    assert partitions(db) == {}


# --------------------------------------------------------------------------
# The product's look-ups on a partitioned table of some size
# --------------------------------------------------------------------------
ROWS_PER_FILE = 193
FILES = 2_000  # 386,000 rows over two partitions
FILES_PER_SERIES = 20


def _fill(conn: psycopg.Connection) -> None:
    """Rows as the writer lays them out: ~193 consecutive ids per file, the SOPInstanceUID
    row once per file at top level, files in series order; the sequence set past them."""
    start = PARTITION_SPAN - FILES * ROWS_PER_FILE // 2
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (metadata_id, metadata_source_tag, sop_instance_id,"
            " image_occurrence_id, etl_created_datetime, etl_modified_datetime)"
            " SELECT %(start)s + i, CASE WHEN i %% %(per)s = 0 THEN '(0008,0018)'"
            " ELSE '(0028,0010)' END, 'sop' || (i / %(per)s), 1 + i / (%(per)s * %(series)s),"
            " now(), now() FROM generate_series(0, %(rows)s - 1) i"
        ).format(MD),
        {
            "start": start,
            "per": ROWS_PER_FILE,
            "series": FILES_PER_SERIES,
            "rows": FILES * ROWS_PER_FILE,
        },
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (ingest_log_id, file_path, status, sop_instance_uid, run_id,"
            " processed_at, metadata_id_first, metadata_row_count)"
            " SELECT f, 'f' || f, 'ingested', 'sop' || f, CASE WHEN f < 3 THEN 'this' ELSE 'old'"
            " END, now(), %(start)s + f * %(per)s, %(per)s FROM generate_series(0, %(files)s - 1) f"
        ).format(LOG),
        {"start": start, "per": ROWS_PER_FILE, "files": FILES},
    )
    conn.execute(sql.SQL("ANALYZE {}").format(MD))
    conn.execute(sql.SQL("ANALYZE {}").format(LOG))


def _plan(conn: psycopg.Connection, statement: sql.Composable, params=None) -> str:
    rows = conn.execute(sql.SQL("EXPLAIN ") + statement, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_the_lookups_use_indexes_and_partition_pruning(db):
    ensure_tables(db, MAIN)
    db.execute(
        "SELECT setval(%s::regclass, %s)",
        [TABLES.sequence_text("dicom_etl_metadata_id_seq", db), PARTITION_SPAN - FILES * 100],
    )
    ensure_partitions(db, TABLES)
    _fill(db)
    assert {n for n, c in partitions(db).items() if c} == {
        "dicom_file_metadata_p0",
        "dicom_file_metadata_p1",
    }
    first = scalar(db, sql.SQL("SELECT min(metadata_id) FROM {}").format(MD))

    # A changed file's DELETE (writer._delete_metadata): by its ledger range, one partition.
    delete = sql.SQL("DELETE FROM {} WHERE metadata_id BETWEEN {} AND {}").format(
        MD, sql.Literal(first + 5 * ROWS_PER_FILE), sql.Literal(first + 6 * ROWS_PER_FILE - 1)
    )
    plan = _plan(db, delete)
    assert "dicom_file_metadata_p0" in plan and "dicom_file_metadata_p1" not in plan, plan
    assert "Seq Scan" not in plan, plan

    # The twice-in-metadata check: the partial index, per partition.
    check = sql.SQL(_TWICE_IN_METADATA).format(md=MD, log=LOG)
    plan = _plan(db, check, {"run": "this"})
    assert "Seq Scan on dicom_file_metadata" not in plan, plan
    # (A partition's index is named after its column; the only one on sop_instance_id is
    # the partial idx_dicom_file_metadata_file_sop's.)
    assert "Index Only Scan using dicom_file_metadata_p0_sop_instance_id_idx" in plan, plan
    # ... and the run's files come from the ledger's run_id index, not a scan of the ledger.
    assert "Seq Scan on dicom_ingest_log" not in plan, plan
    assert "idx_dicom_ingest_log_run" in plan, plan
    assert scalar(db, check, {"run": "this"}) == 0

    # Rows of a series: BRIN, not a scan of every row.
    by_series = sql.SQL("SELECT count(*) FROM {} WHERE image_occurrence_id = %s").format(MD)
    plan = _plan(db, by_series, [7])
    assert "Seq Scan on dicom_file_metadata" not in plan, plan
    assert "Bitmap Index Scan on dicom_file_metadata_p0_image_occurrence_id_idx" in plan, plan
    assert scalar(db, by_series, [7]) == ROWS_PER_FILE * FILES_PER_SERIES


# --------------------------------------------------------------------------
# The README's recipe converting an upgraded (plain) table
# --------------------------------------------------------------------------
README = Path(__file__).resolve().parents[3] / "README.md"


def conversion_recipe(n: int) -> str:
    """The README's SQL converting a plain dicom_file_metadata, with its N filled in."""
    text = README.read_text()
    section = text[text.index("### The EAV table at scale") :]
    recipe = section[section.index("```sql\n") + len("```sql\n") : section.index("\n```\n")]
    code = [line.split("--")[0] for line in recipe.splitlines()]  # comments may say "N"
    return re.sub(r"\bN\b", str(n), "\n".join(code))


def test_the_readme_recipe_converts_an_upgraded_table_and_ingest_goes_on(db, tmp_path):
    apply_f2260e1_ddl(db)  # an install of the first release, upgraded to head: a plain table
    ensure_tables(db, MAIN)
    assert not is_partitioned(db, MD)
    folder = Folder(tmp_path / "dicom")
    assert _run(db, MAIN, folder.root).status_counts["ingested"] == 6
    before = rows_by_sop(db)
    n = scalar(db, sql.SQL("SELECT max(metadata_id) + 1 FROM {}").format(MD)) // PARTITION_SPAN + 1
    db.execute(conversion_recipe(n * PARTITION_SPAN))

    assert is_partitioned(db, MD)
    assert rows_by_sop(db) == before  # every row kept, in the old table, now a partition
    assert partitions(db) == {"dicom_file_metadata_legacy": sum(map(len, before.values()))}
    # The ETL goes on: a changed file is replaced exactly, its new rows in a new partition.
    name = next(iter(folder.sop))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(folder.path[name], force=True)
        ds.PatientComments = "a new element"
        ds.save_as(folder.path[name])
    db.execute(
        "SELECT setval(%s::regclass, %s)",
        [TABLES.sequence_text("dicom_etl_metadata_id_seq", db), n * PARTITION_SPAN],
    )
    again = _run(db, MAIN, folder.root, run_id="again")
    assert again.status_counts["ingested"] == 1
    sop = folder.sop[name]
    assert again.rows["dicom_file_metadata_replaced"] == len(before[sop])
    after = rows_by_sop(db)
    assert len(after[sop]) == len(before[sop]) + 1
    assert {s: r for s, r in after.items() if s != sop} == {
        s: r for s, r in before.items() if s != sop
    }
    assert partitions(db)[f"dicom_file_metadata_p{n}"] == len(after[sop])


def test_a_span_partly_covered_gets_its_gap_as_a_partition_named_by_its_start(db):
    """A converted old table may end inside a span: the rest of the span is attached beside
    it, under a name of its own."""
    ensure_tables(db, MAIN)
    half = PARTITION_SPAN // 2
    db.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(MD, _partition("p0")))
    db.execute(sql.SQL("DROP TABLE {}").format(_partition("p0")))
    db.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(_partition("old"), MD))
    db.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO ({})").format(
            MD, _partition("old"), sql.Literal(half)
        )
    )
    db.execute(
        "SELECT setval(%s::regclass, %s)",
        [TABLES.sequence_text("dicom_etl_metadata_id_seq", db), half + 10],
    )
    ensure_partitions(db, TABLES)
    assert set(partitions(db)) == {
        "dicom_file_metadata_old",
        f"dicom_file_metadata_p0_{half}",
        "dicom_file_metadata_p1",
    }


def _partition(suffix: str) -> sql.Identifier:
    return sql.Identifier(MAIN.medical_imaging, f"dicom_file_metadata_{suffix}")
