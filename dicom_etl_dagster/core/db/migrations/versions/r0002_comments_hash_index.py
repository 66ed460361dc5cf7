"""Revision 2: table and column comments, and the hash index on dicom_file_metadata.

Tables an earlier release created have no comments (the DDL files had none), so ``\\d+``
and other SQL clients could not document them: every owned table gets the metadata's table
and column comments where it has none. ``dicom_file_metadata`` of releases before 355a6a7
has a B-tree index on ``sop_instance_id``; the hash index costs the bulk COPY about 10% less
PostgreSQL CPU (scripts/benchmark.py), so the B-tree is replaced by it (the plain layout's
index, ``schema.plain_file_metadata``: tables created at head are partitioned and have none).

Only owned tables are looked at, and each change is checked first: on tables created at head
(comments and hash index in place) this is a no-op.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    add_missing_comments,
    ensure_index,
    owned_tables,
    psycopg_connection,
    run_schemas,
)
from dicom_etl_dagster.core.db.partitions import is_partitioned
from dicom_etl_dagster.core.db.schema import MI, metadata, plain_file_metadata
from dicom_etl_dagster.core.db.tables import Tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HASH_INDEX = "idx_dicom_file_metadata_sop_instance"


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    owned = owned_tables(bind, schemas)
    for table in metadata.tables.values():
        if table.schema == MI and table.name in owned:
            add_missing_comments(bind, schemas, table)
    metadata_table = Tables(schemas)["dicom_file_metadata"]
    if "dicom_file_metadata" in owned and not is_partitioned(
        psycopg_connection(bind), metadata_table
    ):
        # Tables reaching 0002 are plain (the partitioned layout is created at head only).
        (hash_index,) = (i for i in plain_file_metadata.indexes if i.name == HASH_INDEX)
        ensure_index(bind, schemas, hash_index)


def downgrade() -> None:
    raise NotImplementedError("the ETL never downgrades a schema")
