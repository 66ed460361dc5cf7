"""Revision 2: table and column comments, and the hash index on dicom_file_metadata.

Tables an earlier release created have no comments (the DDL files had none), so ``\\d+``
and other SQL clients could not document them: every owned table gets the metadata's table
and column comments where it has none. ``dicom_file_metadata`` of releases before 355a6a7
has a B-tree index on ``sop_instance_id``; the hash index costs the bulk COPY about 10% less
PostgreSQL CPU (scripts/benchmark.py), so the B-tree is replaced by it.

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
    metadata_index,
    owned_tables,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import MI, metadata

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
    if "dicom_file_metadata" in owned:
        ensure_index(bind, schemas, metadata_index("dicom_file_metadata", HASH_INDEX))


def downgrade() -> None:
    raise NotImplementedError("the ETL never downgrades a schema")
