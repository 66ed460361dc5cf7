"""The column schemas the UI shows are the columns the ETL creates, with the comments PostgreSQL has."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from dicom_etl_dagster.assets.table_schemas import TABLE_SCHEMAS, type_name
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.schema import STANDARD_COLUMNS, metadata
from dicom_etl_dagster.definitions import defs

TABLE_ASSETS = {
    "vocabulary",
    "concept_class",
    "concept",
    "concept_relationship",
    "dicom_data_element",
    "procedure_occurrence",
    "image_occurrence",
    "dicom_file_metadata",
    "dicom_ingest_log",
    "file_upload_metadata",
}


def test_every_table_asset_documents_its_columns():
    graph = defs.resolve_asset_graph()
    for table in TABLE_ASSETS:
        node = graph.get(dg.AssetKey(table))
        schema = node.metadata["dagster/column_schema"]
        schema = schema.schema if isinstance(schema, dg.TableSchemaMetadataValue) else schema
        assert schema == TABLE_SCHEMAS[table], table
        assert node.description, f"{table} has no description"


def test_column_schemas_match_the_created_tables(db):
    schemas = Schemas(cdm="cdmdefault", vocab="cdmvocab", medical_imaging="cdmmedicalimaging")
    ensure_tables(db, schemas)
    schema_of = {
        "vocabulary": "cdmvocab",
        "concept_class": "cdmvocab",
        "concept": "cdmvocab",
        "concept_relationship": "cdmvocab",
        "procedure_occurrence": "cdmdefault",
    }
    for table in TABLE_ASSETS:
        rows = db.execute(
            "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            [schema_of.get(table, "cdmmedicalimaging"), table],
        ).fetchall()
        documented = [(c.name, c.constraints.nullable) for c in TABLE_SCHEMAS[table].columns]
        assert documented == [tuple(r) for r in rows], table


def test_schema_details_for_the_ui():
    image = {c.name: c for c in TABLE_SCHEMAS["image_occurrence"].columns}
    assert (
        image["image_series_uid"].constraints.unique
        and image["image_series_uid"].type == "varchar(250)"
    )
    assert image["image_occurrence_id"].constraints.other == ["primary key"]
    assert "DICOMweb" in image["wadors_uri"].description
    ledger = TABLE_SCHEMAS["dicom_ingest_log"]
    assert any("CHECK (status IN" in c for c in ledger.constraints.other)
    assert {c.name: c for c in ledger.columns}["sop_instance_uid"].constraints.other == [
        "unique WHERE status = 'ingested'"
    ]
    uploads = TABLE_SCHEMAS["file_upload_metadata"]
    assert "unique (server_url, sop_instance_id)" in uploads.constraints.other


def test_every_column_is_described_or_a_standard_omop_column():
    for table in metadata.tables.values():
        assert table.comment, f"{table.name} has no comment"
        standard = STANDARD_COLUMNS.get(table.name, frozenset())
        names = {c.name for c in table.columns}
        assert standard <= names, (
            f"{table.name}: listed as standard but missing: {standard - names}"
        )
        for column in table.columns:
            listed = column.name in standard
            assert bool(column.comment) != listed, (
                f"{table.name}.{column.name}: needs a comment or a place in STANDARD_COLUMNS"
                if not listed
                else f"{table.name}.{column.name}: standard and commented; pick one"
            )
    assert set(STANDARD_COLUMNS) <= {t.name for t in metadata.tables.values()}


def test_the_ui_descriptions_are_the_postgresql_comments(db):
    ensure_tables(db, Schemas())
    for table in metadata.tables.values():
        schema = {"{cdm}": "cdmdefault", "{vocab}": "cdmvocab"}.get(
            table.schema, "cdmmedicalimaging"
        )
        comments = dict(
            db.execute(
                "SELECT attname, col_description(attrelid, attnum) FROM pg_attribute"
                " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                [f"{schema}.{table.name}"],
            ).fetchall()
        )
        documented = {c.name: c.description for c in TABLE_SCHEMAS[table.name].columns}
        assert documented == comments, table.name


def test_a_type_the_ui_cannot_name_is_an_error():
    assert type_name(sa.String(20)) == "varchar(20)"
    assert type_name(sa.DateTime(timezone=True)) == "timestamptz"
    assert type_name(sa.Numeric()) == "numeric"  # measurement.value_as_number
    with pytest.raises(ValueError, match="no UI type name"):
        type_name(sa.LargeBinary())
