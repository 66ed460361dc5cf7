"""Schema versioning on real PostgreSQL.

A database the f2260e1 release set up (its DDL, its sequences and the rows its ingest
wrote, frozen in fixtures/f2260e1, see its README) is upgraded in place and ingests on as if
nothing happened; a B-tree index of an older release becomes the hash index; tables a user
created are left exactly as they were; a fresh database ends at head with the f2260e1 shape
plus comments; concurrent calls take turns; at head the check is two queries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

import pgserver
import psycopg
import pydicom
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql
from psycopg.rows import dict_row

from dicom_etl_dagster.core.db import migrate
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import HEAD, ensure_tables, schema_version
from dicom_etl_dagster.core.db.migrations.versions.r0004_private_creator import EARLIER_COMMENTS
from dicom_etl_dagster.core.db.schema import MI, metadata, real_schema, schema_translate_map
from dicom_etl_dagster.core.db.tables import column_names
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import IngestReport, PersonMapping
from dicom_etl_dagster_tests.conftest import fresh_database, scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.private_samples import (
    GE,
    GE_STARTING_VIEW,
    OTHER,
    expected_entry_tag,
    write_private_file,
)
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

FIXTURE = Path(__file__).parent / "fixtures" / "f2260e1"
#: Where the release read its files from (the ledger's paths); the tests relocate them.
FIXTURE_FOLDER = "/tmp/dicom_etl_f2260e1_fixture/dicom"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: The files the release ingested (path in the folder -> pydicom test file), see make_fixture.py.
OLD_FILES = {
    "CT_small.dcm": "CT_small.dcm",
    "MR_small.dcm": "MR_small.dcm",
    "copy/MR_small.dcm": "MR_small.dcm",
    "nested_priv_SQ.dcm": "nested_priv_SQ.dcm",
}
FAILED_FILE = "nested_priv_SQ.dcm"
NEW_FILES = ("rtplan.dcm", "test-SR.dcm")
SCHEMAS = Schemas()
MI_SCHEMA, CDM_SCHEMA, VOCAB_SCHEMA = SCHEMAS.medical_imaging, SCHEMAS.cdm, SCHEMAS.vocab
#: The tables an ingest writes, with their primary keys.
WRITTEN = {
    "procedure_occurrence": "procedure_occurrence_id",
    "image_occurrence": "image_occurrence_id",
    "dicom_data_element": "data_element_id",
    "dicom_file_metadata": "metadata_id",
    "dicom_ingest_log": "ingest_log_id",
}
#: What revision 1 recognises as created by f2260e1 (image_feature has no index of the ETL's).
OWNED_BY_F2260E1 = {
    "image_occurrence",
    "dicom_data_element",
    "dicom_file_metadata",
    "file_upload_metadata",
    "dicom_ingest_log",
}
TABLES = {table.name: table for table in metadata.tables.values()}
MI_TABLES = {name for name, table in TABLES.items() if table.schema == MI}
#: Tables revisions 3 (measurements) and 6 (upload rejections) added: an f2260e1 database
#: gets them created.
ADDED_AFTER_F2260E1 = {"measurement", "dicom_etl_feature_source", "file_upload_rejection"}
CREATED_FOR_F2260E1 = [
    f"{real_schema(t, SCHEMAS)}.{t.name}"
    for t in metadata.tables.values()
    if t.name in ADDED_AFTER_F2260E1
]
OWNED_AFTER_F2260E1 = OWNED_BY_F2260E1 | (ADDED_AFTER_F2260E1 & MI_TABLES)
F2260E1_TABLES = TABLES.keys() - ADDED_AFTER_F2260E1
#: Columns later revisions added to owned tables, with the value the rows there before get.
#: (0004: private entries per creator; 0005: the ledger's odd-value summary.)
ADDED_COLUMNS = {
    "dicom_data_element": {"private_creator": None},
    "dicom_ingest_log": {
        "value_warnings": None,
        "value_warning_tags": None,
        "metadata_id_first": None,
        "metadata_row_count": None,
    },
}
SOP_INDEX = "idx_dicom_file_metadata_sop_instance"


def as_created_at_head(table: str, described: dict) -> dict:
    """The one thing a fresh install creates differently from an upgraded one, by design
    (revision 0007): dicom_file_metadata is partitioned by metadata_id, and its per-row
    indexes on sop_instance_id (hash) and image_occurrence_id (B-tree) are a partial index
    on the one SOPInstanceUID row per file and a BRIN index. Columns, their order, types,
    defaults, comments and constraints are the same; an upgraded table keeps its layout."""
    if table != "dicom_file_metadata":
        return described
    assert described["kind"] == "r", "only a plain table is shaped like this"
    name = f"{MI_SCHEMA}.dicom_file_metadata"
    by_name = dict(described["indexes"])
    assert by_name.pop(SOP_INDEX).endswith("USING hash (sop_instance_id)")
    old_io = by_name.pop("idx_dicom_file_metadata_image_occurrence")
    assert old_io.endswith("USING btree (image_occurrence_id)")
    by_name["idx_dicom_file_metadata_file_sop"] = (
        f"CREATE INDEX idx_dicom_file_metadata_file_sop ON ONLY {name} USING btree"
        " (sop_instance_id) WHERE (((metadata_source_tag)::text = '(0008,0018)'::text)"
        " AND (parent_sequence_id IS NULL))"
    )
    by_name["idx_dicom_file_metadata_image_occurrence_brin"] = (
        f"CREATE INDEX idx_dicom_file_metadata_image_occurrence_brin ON ONLY {name}"
        " USING brin (image_occurrence_id)"
    )
    by_name["xpk_dicom_file_metadata"] = by_name["xpk_dicom_file_metadata"].replace(
        f" ON {name} ", f" ON ONLY {name} "
    )
    return {**described, "kind": "p", "indexes": sorted(by_name.items())}


# --------------------------------------------------------------------------
# The f2260e1 database
# --------------------------------------------------------------------------
def apply_f2260e1_ddl(conn: psycopg.Connection, btree_sop_index: bool = False) -> None:
    """What f2260e1's ddl.ensure_tables ran on an empty database (optionally as before 355a6a7)."""
    for schema in (VOCAB_SCHEMA, CDM_SCHEMA, MI_SCHEMA):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    for name, schema in (
        ("vocabulary.sql", VOCAB_SCHEMA),
        ("cdm.sql", CDM_SCHEMA),
        ("medical_imaging.sql", MI_SCHEMA),
        ("sequences.sql", MI_SCHEMA),
    ):
        text = (FIXTURE / name).read_text()
        if btree_sop_index and name == "medical_imaging.sql":
            assert "USING hash (sop_instance_id)" in text
            text = text.replace("USING hash (sop_instance_id)", "(sop_instance_id)")
        conn.execute(sql.SQL(text).format(schema=sql.Identifier(schema)))


def f2260e1_database(url: str, folder: Path, btree_sop_index: bool = False) -> None:
    """The release's tables and the rows its ingest wrote, with the files relocated to ``folder``."""
    with psycopg.connect(url, autocommit=True) as conn:
        apply_f2260e1_ddl(conn, btree_sop_index)
    with psycopg.connect(url, autocommit=True) as conn:  # data.sql empties the search_path
        conn.execute((FIXTURE / "data.sql").read_text().replace(FIXTURE_FOLDER, str(folder)))


def place_files(conn: psycopg.Connection, folder: Path) -> None:
    """The release's files where its ledger has them (same size and mtime), and new ones."""
    for name, source in OLD_FILES.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEST_FILES / source, target)
        mtime = scalar(
            conn,
            f"SELECT file_mtime_ns FROM {MI_SCHEMA}.dicom_ingest_log WHERE file_path = %s",
            [str(target)],
        )
        os.utime(target, ns=(mtime, mtime))
    for name in NEW_FILES:
        (folder / "new").mkdir(exist_ok=True)
        shutil.copyfile(TEST_FILES / name, folder / "new" / name)


def ingest(conn: psycopg.Connection, folder: Path, run_id: str = "run") -> IngestReport:
    mapping = PersonMapping(MI_SCHEMA, "mappingtable", "source_person_id", "source_patient_id")
    state = prepare_run(conn, SCHEMAS, run_id, "use_id_zero", mapping, lambda message: None)
    return ingest_folder(conn, state, folder, 50, 1)[0]


# --------------------------------------------------------------------------
# What the database holds
# --------------------------------------------------------------------------
def rows(conn: psycopg.Connection) -> dict[str, dict[int, dict]]:
    """Every row of the written tables, by primary key."""
    found = {}
    for table, key in WRITTEN.items():
        name = sql.Identifier(real_schema(TABLES[table], SCHEMAS), table)
        cursor = conn.cursor(row_factory=dict_row)
        found[table] = {r[key]: r for r in cursor.execute(sql.SQL("SELECT * FROM {}").format(name))}
    return found


def as_upgraded(old_rows: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """The rows as the upgrade leaves them: unchanged, plus the added columns."""
    return {
        table: {key: {**row, **ADDED_COLUMNS.get(table, {})} for key, row in by_key.items()}
        for table, by_key in old_rows.items()
    }


def catalog(conn: psycopg.Connection, table: str) -> dict:
    """The table as the catalog describes it: columns, defaults, comments, constraints, indexes."""
    schema = real_schema(TABLES[table], SCHEMAS)
    regclass = sql.Identifier(schema, table).as_string(conn)
    columns = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
        " pg_get_expr(d.adbin, d.adrelid), col_description(a.attrelid, a.attnum)"
        " FROM pg_attribute a LEFT JOIN pg_attrdef d ON (d.adrelid, d.adnum) = (a.attrelid, a.attnum)"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        [regclass],
    ).fetchall()
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s)",
        [regclass],
    ).fetchall()
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
        [schema, table],
    ).fetchall()
    kind = scalar(
        conn, "SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)", [regclass]
    )
    return {
        "kind": kind,
        "columns": columns,
        "constraints": sorted(constraints),
        "indexes": sorted(indexes),
        "comment": scalar(conn, "SELECT obj_description(to_regclass(%s), 'pg_class')", [regclass]),
    }


def catalog_at_head(postgres_server, table: str) -> dict:
    """``catalog`` of the table as a fresh install creates it (in a database of its own)."""
    with (
        fresh_database(postgres_server, "head") as url,
        psycopg.connect(url, autocommit=True) as head,
    ):
        ensure_tables(head, SCHEMAS)
        return catalog(head, table)


TIMESTAMPS = ("etl_created_datetime", "etl_modified_datetime")


def shape_at_head(table: str, described: dict) -> dict:
    """An f2260e1 table as later revisions shaped it, nothing else: 0004 keys private entries
    per creator (a column at the end, the tag index partial, a second index), 0005 gives the
    ledger its odd-value columns, 0007 its metadata id range and its run_id index, 0008
    gives the EAV table's two timestamps their default."""
    if table == "dicom_file_metadata":
        columns = [
            (name, kind, not_null, "LOCALTIMESTAMP" if name in TIMESTAMPS else default, comment)
            for name, kind, not_null, default, comment in described["columns"]
        ]
        return as_created_at_head(table, {**described, "columns": columns})
    if table == "dicom_ingest_log":
        added = [
            ("value_warnings", "integer", False, None, None),
            ("value_warning_tags", "text", False, None, None),
            ("metadata_id_first", "bigint", False, None, None),
            ("metadata_row_count", "integer", False, None, None),
        ]
        run_index = (
            "idx_dicom_ingest_log_run",
            f"CREATE INDEX idx_dicom_ingest_log_run ON {MI_SCHEMA}.dicom_ingest_log"
            " USING btree (run_id)",
        )
        return {
            **described,
            "columns": [*described["columns"], *added],
            "indexes": sorted([*described["indexes"], run_index]),
        }
    if table != "dicom_data_element":
        return as_created_at_head(table, described)
    name = f"{MI_SCHEMA}.dicom_data_element"
    by_name = dict(described["indexes"])
    by_name["idx_dicom_data_element_tag"] += " WHERE (private_creator IS NULL)"
    by_name["idx_dicom_data_element_private"] = (
        f"CREATE UNIQUE INDEX idx_dicom_data_element_private ON {name} USING btree"
        " (private_creator, data_element_tag) WHERE (private_creator IS NOT NULL)"
    )
    column = ("private_creator", "character varying(255)", False, None, None)
    return {
        **described,
        "columns": [*described["columns"], column],
        "indexes": sorted(by_name.items()),
    }


def without_comments(described: dict) -> dict:
    return {
        **described,
        "columns": [column[:-1] + (None,) for column in described["columns"]],
        "comment": None,
    }


def assert_commented(conn: psycopg.Connection, tables: set[str]) -> None:
    for name in tables:
        described = catalog(conn, name)
        assert described["comment"] == TABLES[name].comment, name
        comments = {column[0]: column[-1] for column in described["columns"]}
        assert comments == {c.name: c.comment for c in TABLES[name].columns}, name


def owned(conn: psycopg.Connection) -> set[str]:
    return {
        row[0]
        for row in conn.execute(
            f"SELECT table_name FROM {MI_SCHEMA}.dicom_etl_owned_table WHERE table_schema = %s",
            [MI_SCHEMA],
        )
    }


def index_method(conn: psycopg.Connection, index: str) -> str | None:
    return scalar(
        conn,
        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam"
        " WHERE c.oid = to_regclass(%s)",
        [f"{MI_SCHEMA}.{index}"],
    )


# --------------------------------------------------------------------------
# The upgrade of an f2260e1 database
# --------------------------------------------------------------------------
def assert_old_rows_intact(before: dict, after: dict, failed_path: str) -> None:
    """Every row the release wrote is still there, unchanged; only the failed file's ledger row
    was replaced, as on every re-run (a failure is retried: same path, status and reason)."""
    for table, old in before.items():
        if table == "dicom_ingest_log":
            (failed,) = [r for r in old.values() if r["file_path"] == failed_path]
            old = {k: r for k, r in old.items() if r is not failed}
            (retried,) = [r for r in after[table].values() if r["file_path"] == failed_path]
            assert (retried["status"], retried["error_message"]) == (
                "failed",
                failed["error_message"],
            )
            assert retried["run_id"] == "run" and failed["ingest_log_id"] not in after[table]
        assert {k: after[table].get(k) for k in old} == old, f"{table}: old rows changed"


def assert_new_files_ingested(
    conn: psycopg.Connection, folder: Path, before: dict, after: dict
) -> None:
    ledger = {r["file_path"]: r for r in after["dicom_ingest_log"].values()}
    for name in NEW_FILES:
        path = folder / "new" / name
        entry = ledger[str(path)]
        assert entry["status"] == "ingested", entry
        written = [
            r
            for r in after["dicom_file_metadata"].values()
            if r["sop_instance_id"] == entry["sop_instance_uid"]
        ]
        assert len(written) == expected_metadata_rows(path), name
        # Ids continue the release's sequences.
        assert min(r["metadata_id"] for r in written) > max(before["dicom_file_metadata"])
    # The release's instances were not written again: their rows are exactly the old ones.
    old_sops = {r["sop_instance_id"] for r in before["dicom_file_metadata"].values()}
    assert [
        k
        for k, r in after["dicom_file_metadata"].items()
        if r["sop_instance_id"] in old_sops and k not in before["dicom_file_metadata"]
    ] == []
    series = [r["image_series_uid"] for r in after["image_occurrence"].values()]
    assert len(series) == len(set(series)) == len(before["image_occurrence"]) + len(NEW_FILES)
    assert_ids_consistent(conn, SCHEMAS)


def test_an_f2260e1_database_is_upgraded_in_place_and_ingests_on(database_url, tmp_path):
    folder = tmp_path / "dicom"
    f2260e1_database(database_url, folder)
    with psycopg.connect(database_url, autocommit=True) as conn:
        place_files(conn, folder)
        before = rows(conn)
        not_owned = {name: catalog(conn, name) for name in F2260E1_TABLES - OWNED_BY_F2260E1}
        assert all(c["comment"] is None for c in not_owned.values())
        assert schema_version(conn, SCHEMAS) is None

        # The release created every table but those of later revisions.
        assert ensure_tables(conn, SCHEMAS) == CREATED_FOR_F2260E1
        assert schema_version(conn, SCHEMAS) == HEAD
        assert rows(conn) == as_upgraded(before), "the migration changed rows"
        assert owned(conn) == OWNED_AFTER_F2260E1
        assert_commented(conn, OWNED_BY_F2260E1)

        first = ingest(conn, folder)
        assert dict(first.status_counts) == {"ingested": len(NEW_FILES), "failed": 1}
        assert first.files_already_done == len(OLD_FILES) - 1, "old files were read again"
        after = rows(conn)
        assert_old_rows_intact(as_upgraded(before), after, str(folder / FAILED_FILE))
        assert_new_files_ingested(conn, folder, before, after)

        content = table_content(conn, SCHEMAS)
        again = ingest(conn, folder, run_id="again")
        assert dict(again.status_counts) == {"failed": 1}
        assert again.files_already_done == len(OLD_FILES) + len(NEW_FILES) - 1
        assert table_content(conn, SCHEMAS) == content, "a re-run added or changed rows"
        # Tables of the CDM and vocabulary schemas, and the unrecognisable image_feature:
        # exactly as the release left them (no comment, no index, nothing).
        assert {name: catalog(conn, name) for name in not_owned} == not_owned


def test_a_btree_sop_index_of_an_older_release_becomes_the_hash_index(
    postgres_server, database_url, tmp_path
):
    f2260e1_database(database_url, tmp_path / "dicom", btree_sop_index=True)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert index_method(conn, SOP_INDEX) == "btree"
        before = rows(conn)
        ensure_tables(conn, SCHEMAS)
        assert index_method(conn, SOP_INDEX) == "hash"
        assert rows(conn) == as_upgraded(before)
        upgraded = catalog(conn, "dicom_file_metadata")
        assert (
            ensure_tables(conn, SCHEMAS) == [] and catalog(conn, "dicom_file_metadata") == upgraded
        )
        # Exactly what a table created at head has (but for its partitioned layout, see
        # as_created_at_head): indexes, comments and all.
        assert as_created_at_head("dicom_file_metadata", upgraded) == catalog_at_head(
            postgres_server, "dicom_file_metadata"
        )
        count = scalar(
            conn,
            f"SELECT count(*) FROM {MI_SCHEMA}.dicom_file_metadata WHERE sop_instance_id = %s",
            [next(iter(before["dicom_file_metadata"].values()))["sop_instance_id"]],
        )
        assert count > 0


def migrate_to(url: str, revision: str) -> None:
    """The migrations up to ``revision`` only: what a release at that revision left."""
    from alembic import command

    with psycopg.connect(url) as conn:
        engine = migrate.engine_like(conn)
    try:
        with engine.begin() as connection:
            connection.execution_options(schema_translate_map=schema_translate_map(SCHEMAS))
            command.upgrade(migrate.alembic_config(connection, SCHEMAS), revision)
    finally:
        engine.dispose()


def _as_0003_commented(conn: psycopg.Connection) -> None:
    """The comments releases up to 0003 gave dicom_data_element (0002 wrote head's texts)."""
    for column, text in EARLIER_COMMENTS.items():
        target = ("dicom_data_element",) if column is None else ("dicom_data_element", column)
        conn.execute(
            sql.SQL("COMMENT ON {} {} IS {}").format(
                sql.SQL("TABLE" if column is None else "COLUMN"),
                sql.Identifier(MI_SCHEMA, *target),
                sql.Literal(text),
            )
        )


def test_a_0003_database_gets_private_entries_per_creator_and_keeps_its_rows(
    postgres_server, database_url, tmp_path
):
    """Revision 0004 on a database at 0003 (f2260e1's rows, upgraded to 0003): the column is
    added, NULL in every row, rows and ids stay, and the table is then exactly what a fresh
    install has. The old private entries (keyed by tag) are left as they were; files ingested
    afterwards get entries per creator and their rows point at them."""
    f2260e1_database(database_url, tmp_path / "dicom")
    migrate_to(database_url, "0003")
    with psycopg.connect(database_url, autocommit=True) as conn:
        _as_0003_commented(conn)
        assert schema_version(conn, SCHEMAS) == "0003"
        assert "private_creator" not in column_names(conn, MI_SCHEMA, "dicom_data_element")
        before = rows(conn)
        old_private = {k: r for k, r in before["dicom_data_element"].items() if r["is_private"]}
        assert "(0019,1002)" in {r["data_element_tag"] for r in old_private.values()}

        assert ensure_tables(conn, SCHEMAS) == []
        assert schema_version(conn, SCHEMAS) == HEAD
        assert rows(conn) == as_upgraded(before), "the migration changed rows"
        upgraded = catalog(conn, "dicom_data_element")
        assert upgraded == catalog_at_head(postgres_server, "dicom_data_element")
        assert (
            ensure_tables(conn, SCHEMAS) == [] and catalog(conn, "dicom_data_element") == upgraded
        )

        new = tmp_path / "new"
        write_private_file(new / "ge.dcm", (0x10, GE, {0x60: ("SL", 3)}))
        write_private_file(new / "other.dcm", (0x11, OTHER, {0x60: ("LO", "probe")}))
        assert dict(ingest(conn, new).status_counts) == {"ingested": 2}
        after = rows(conn)
        for table in ("dicom_data_element", "dicom_file_metadata"):
            old = as_upgraded(before)[table]
            assert {k: after[table][k] for k in old} == old, f"{table}: old rows changed"
        old_entries = before["dicom_data_element"]
        added = [r for k, r in after["dicom_data_element"].items() if k not in old_entries]
        assert sorted(
            (r["data_element_tag"], r["private_creator"], r["data_element_name"]) for r in added
        ) == [
            ("(0019,00xx)", GE, "Private Creator"),
            ("(0019,00xx)", OTHER, "Private Creator"),
            ("(0019,xx60)", GE, GE_STARTING_VIEW[2]),
            ("(0019,xx60)", OTHER, None),
        ]
        entries = {r["data_element_id"]: r for r in after["dicom_data_element"].values()}
        new_private = [
            r
            for k, r in after["dicom_file_metadata"].items()
            if k not in before["dicom_file_metadata"] and r["is_private"]
        ]
        assert len(new_private) == 4
        for r in new_private:
            entry = entries[r["data_element_id"]]
            assert entry["private_creator"] == r["private_creator"], r
            assert entry["data_element_tag"] == expected_entry_tag(r["metadata_source_tag"]), r
        assert_ids_consistent(conn, SCHEMAS)


def _create_as_user(conn: psycopg.Connection, sql_file: str, table: str, schema: str) -> None:
    """The table's CREATE TABLE statement of the fixture DDL, without the ETL's indexes."""
    block = (FIXTURE / sql_file).read_text().split(f"-- table: {table}\n")[1]
    statement = block[: block.index("\n);") + 3]
    conn.execute(sql.SQL(statement).format(schema=sql.Identifier(schema)))


def test_tables_a_user_created_are_left_exactly_as_they_were(db):
    for schema in (CDM_SCHEMA, MI_SCHEMA):
        db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    # The original plugin's metadata table with the user's own B-tree index, and OMOP's
    # procedure_occurrence with OMOP's own index name.
    _create_as_user(db, "medical_imaging.sql", "dicom_file_metadata", MI_SCHEMA)
    db.execute(
        f"CREATE INDEX users_sop_lookup ON {MI_SCHEMA}.dicom_file_metadata (sop_instance_id)"
    )
    _create_as_user(db, "cdm.sql", "procedure_occurrence", CDM_SCHEMA)
    db.execute(
        f"CREATE INDEX idx_procedure_person_id ON {CDM_SCHEMA}.procedure_occurrence (person_id)"
    )
    users = {name: catalog(db, name) for name in ("dicom_file_metadata", "procedure_occurrence")}

    created = ensure_tables(db, SCHEMAS)
    assert f"{MI_SCHEMA}.dicom_file_metadata" not in created and len(created) == len(TABLES) - 2
    assert {name: catalog(db, name) for name in users} == users
    assert owned(db) == MI_TABLES - {"dicom_file_metadata"}
    assert schema_version(db, SCHEMAS) == HEAD
    assert index_method(db, "users_sop_lookup") == "btree"
    assert ensure_tables(db, SCHEMAS) == [] and {name: catalog(db, name) for name in users} == users


# --------------------------------------------------------------------------
# Fresh databases, head, concurrency
# --------------------------------------------------------------------------
def test_a_fresh_database_ends_at_head_with_comments_and_the_f2260e1_shape(postgres_server, db):
    created = ensure_tables(db, SCHEMAS)
    assert created == [f"{real_schema(t, SCHEMAS)}.{t.name}" for t in metadata.tables.values()]
    assert schema_version(db, SCHEMAS) == HEAD
    assert owned(db) == MI_TABLES
    assert_commented(db, set(TABLES))
    sequences = (
        f"SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = '{MI_SCHEMA}'"
    )
    with (
        fresh_database(postgres_server, "f2260e1") as url,
        psycopg.connect(url, autocommit=True) as old,
    ):
        apply_f2260e1_ddl(old)
        for name in F2260E1_TABLES:
            assert without_comments(catalog(db, name)) == shape_at_head(name, catalog(old, name))
        added = {"dicom_etl_measurement_id_seq", "dicom_etl_image_feature_id_seq"}
        added.add("dicom_etl_image_finding_id_seq")
        assert sorted(r for r in db.execute(sequences).fetchall() if r[0] not in added) == sorted(
            old.execute(sequences).fetchall()
        )


def test_sequences_start_above_the_ids_a_user_already_has(db):
    db.execute(f"CREATE SCHEMA {CDM_SCHEMA}")
    _create_as_user(db, "cdm.sql", "procedure_occurrence", CDM_SCHEMA)
    db.execute(
        f"INSERT INTO {CDM_SCHEMA}.procedure_occurrence (procedure_occurrence_id, person_id,"
        " procedure_concept_id, procedure_date, procedure_type_concept_id)"
        " VALUES (41, 1, 0, '2020-01-01', 32817)"
    )
    ensure_tables(db, SCHEMAS)
    assert scalar(db, f"SELECT nextval('{MI_SCHEMA}.dicom_etl_procedure_occurrence_id_seq')") == 42
    assert scalar(db, f"SELECT nextval('{MI_SCHEMA}.dicom_etl_image_occurrence_id_seq')") == 1


@pytest.mark.parametrize("start", ["fresh", "f2260e1"])
def test_two_threads_ensuring_tables_at_once_take_turns(database_url, tmp_path, start):
    if start == "f2260e1":
        f2260e1_database(database_url, tmp_path / "dicom")
    barrier = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait()
                results.append(ensure_tables(conn, SCHEMAS))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    everything = [f"{real_schema(t, SCHEMAS)}.{t.name}" for t in metadata.tables.values()]
    assert sorted(results, key=len) == [[], everything if start == "fresh" else CREATED_FOR_F2260E1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert ensure_tables(conn, SCHEMAS) == []
        assert conn.execute(
            f"SELECT version_num FROM {MI_SCHEMA}.dicom_etl_schema_version"
        ).fetchall() == [(HEAD,)]
        assert owned(conn) == (MI_TABLES if start == "fresh" else OWNED_AFTER_F2260E1)


class CountingConnection:
    """A psycopg connection that counts the statements sent through it."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn
        self.statements = 0

    def execute(self, *args, **kwargs):
        self.statements += 1
        return self._conn.execute(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_at_head_the_check_is_two_queries_and_a_dropped_table_comes_back(
    database_url, db, monkeypatch
):
    ensure_tables(db, SCHEMAS)
    counting = CountingConnection(db)
    with monkeypatch.context() as patched:
        patched.setattr(migrate, "engine_like", lambda conn: pytest.fail("SQLAlchemy started"))
        assert ensure_tables(counting, SCHEMAS) == []  # type: ignore[arg-type]
    assert counting.statements == 2
    with psycopg.connect(database_url) as outside_autocommit:
        assert ensure_tables(outside_autocommit, SCHEMAS) == []
        # No transaction left open on the caller's connection.
        assert outside_autocommit.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    db.execute(f"DROP TABLE {MI_SCHEMA}.image_feature")
    assert ensure_tables(db, SCHEMAS) == [f"{MI_SCHEMA}.image_feature"]
    assert (
        scalar(
            db,
            f"SELECT owned_since_revision FROM {MI_SCHEMA}.dicom_etl_owned_table WHERE table_name = %s",
            ["image_feature"],
        )
        == "0001"
    )  # owned since the table was first created


def test_other_schema_names_get_their_own_tables_and_version(db):
    other = Schemas(cdm="site_cdm", vocab="site_vocab", medical_imaging="site_mi")
    ensure_tables(db, SCHEMAS)
    assert schema_version(db, other) is None
    assert len(ensure_tables(db, other)) == len(TABLES)
    assert schema_version(db, other) == HEAD
    assert scalar(db, "SELECT count(*) FROM site_mi.dicom_etl_owned_table") == len(MI_TABLES)


def test_a_database_at_0005_gets_the_upload_rejection_table_and_keeps_its_uploads(
    postgres_server, db
):
    """Revision 6 adds file_upload_rejection, owned since 0006; file_upload_metadata is untouched."""
    ensure_tables(db, SCHEMAS)
    # Back to what revision 5 left: no rejection table, not recorded as owned, version 0005.
    db.execute(f"DROP TABLE {MI_SCHEMA}.file_upload_rejection")
    db.execute(
        f"DELETE FROM {MI_SCHEMA}.dicom_etl_owned_table WHERE table_name = 'file_upload_rejection'"
    )
    db.execute(f"UPDATE {MI_SCHEMA}.dicom_etl_schema_version SET version_num = '0005'")
    uploads = catalog(db, "file_upload_metadata")

    assert ensure_tables(db, SCHEMAS) == [f"{MI_SCHEMA}.file_upload_rejection"]
    assert schema_version(db, SCHEMAS) == HEAD
    assert catalog(db, "file_upload_metadata") == uploads
    assert (
        scalar(
            db,
            f"SELECT owned_since_revision FROM {MI_SCHEMA}.dicom_etl_owned_table"
            " WHERE table_name = 'file_upload_rejection'",
        )
        == "0006"
    )
    assert catalog(db, "file_upload_rejection") == catalog_at_head(
        postgres_server, "file_upload_rejection"
    )


def _timestamp_defaults(conn: psycopg.Connection) -> dict[str, set]:
    """Table -> the defaults of its two timestamps: the EAV table and each partition."""
    found: dict[str, set] = {}
    for table, default in conn.execute(
        "SELECT table_name, column_default FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name LIKE 'dicom_file_metadata%%'"
        " AND column_name = ANY(%s)",
        [MI_SCHEMA, list(TIMESTAMPS)],
    ):
        found.setdefault(table, set()).add(default)
    return found


def test_a_0007_install_gets_the_timestamp_defaults_on_every_partition(
    postgres_server, database_url
):
    """Revision 0008 on the previous release's install: its partitioned table (created at
    0007, without defaults) and the partitions it has get LOCALTIMESTAMP, and the table is
    then what a fresh install creates."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema in (SCHEMAS.cdm, SCHEMAS.vocab, SCHEMAS.medical_imaging):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    migrate_to(database_url, "0007")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for column in TIMESTAMPS:  # as 0007 created the table (revision 1 creates at head)
            conn.execute(
                f"ALTER TABLE {MI_SCHEMA}.dicom_file_metadata ALTER COLUMN {column} DROP DEFAULT"
            )
        before = _timestamp_defaults(conn)
        assert len(before) > 1 and all(d == {None} for d in before.values())  # and partitions
        assert ensure_tables(conn, SCHEMAS) == []
        assert schema_version(conn, SCHEMAS) == HEAD
        assert _timestamp_defaults(conn) == {table: {"LOCALTIMESTAMP"} for table in before}
        upgraded = catalog(conn, "dicom_file_metadata")
    assert upgraded == catalog_at_head(postgres_server, "dicom_file_metadata")


def test_head_is_the_newest_revision():
    scripts = ScriptDirectory.from_config(migrate.alembic_config(None, SCHEMAS))
    assert scripts.get_heads() == [HEAD]
    assert [r.revision for r in scripts.walk_revisions()] == [
        "0008",
        "0007",
        "0006",
        "0005",
        "0004",
        "0003",
        "0002",
        "0001",
    ]


# --------------------------------------------------------------------------
# SQLAlchemy reaches the caller's database, also when it takes a password
# --------------------------------------------------------------------------
PASSWORD = "p@ss w0rd/:?"


@pytest.fixture(scope="module")
def password_server():
    """A PostgreSQL of its own that asks the role ``etl`` for a password (scram-sha-256)."""
    server = pgserver.get_server(
        Path(tempfile.mkdtemp(prefix="dicom_etl_test_pw_")), cleanup_mode="delete"
    )
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE etl LOGIN SUPERUSER PASSWORD {}").format(PASSWORD))
        hba = Path(scalar(conn, "SHOW hba_file"))
        hba.write_text("local all etl scram-sha-256\n" + hba.read_text())
        conn.execute("SELECT pg_reload_conf()")
    yield server
    server.cleanup()


def test_the_migration_connects_with_the_callers_password(password_server):
    socket = password_server.get_uri().split("host=")[1]
    url = f"postgresql://etl:{quote(PASSWORD, safe='')}@/postgres?host={socket}"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(url.replace(quote(PASSWORD, safe=""), "wrong"))
    with psycopg.connect(url, autocommit=True) as conn:
        assert len(ensure_tables(conn, SCHEMAS)) == len(TABLES)
        assert schema_version(conn, SCHEMAS) == HEAD
        assert scalar(conn, "SELECT tableowner FROM pg_tables WHERE tablename = 'concept'") == "etl"


def test_revision_0005_gives_an_older_ledger_the_odd_value_columns(
    postgres_server, database_url, tmp_path
):
    """The f2260e1 ledger gets value_warnings / value_warning_tags exactly as a ledger created
    at head has them; the release's rows keep NULL (not counted), new files are counted."""
    folder = tmp_path / "dicom"
    f2260e1_database(database_url, folder)
    with psycopg.connect(database_url, autocommit=True) as conn:
        place_files(conn, folder)
        old_ids = set(rows(conn)["dicom_ingest_log"])
        ensure_tables(conn, SCHEMAS)
        upgraded = catalog(conn, "dicom_ingest_log")
        assert upgraded == catalog_at_head(postgres_server, "dicom_ingest_log")
        odd = pydicom.dcmread(TEST_FILES / "badVR.dcm")  # NumberOfFrames "1A"
        odd.save_as(folder / "new" / "badVR.dcm")
        ingest(conn, folder)
        ledger = {
            row[0]: row[1:]
            for row in conn.execute(
                f"SELECT ingest_log_id, file_path, status, value_warnings, value_warning_tags"
                f" FROM {MI_SCHEMA}.dicom_ingest_log"
            )
        }
        kept = [ledger[i] for i in old_ids if i in ledger]
        assert kept and all(row[2:] == (None, None) for row in kept)
        by_path = {row[0]: row[1:] for row in ledger.values()}
        assert by_path[str(folder / "new" / "badVR.dcm")] == ("ingested", 1, "(0028,0008)")
        assert by_path[str(folder / "new" / "rtplan.dcm")] == ("ingested", 0, None)
