"""Revision 7: the ledger records each ingested file's metadata id range; the EAV table is
created partitioned.

``dicom_ingest_log`` (always the ETL's) gains ``metadata_id_first`` and
``metadata_row_count``, NULL in existing rows: a changed file's rows are deleted through the
primary key by that range, and by ``sop_instance_id`` only for files ingested before. It
also gains an index on ``run_id``: the asset checks read one run's files. A
``dicom_file_metadata`` created from now on (a fresh install, revision 1 creating
everything at head) is ``PARTITION BY RANGE (metadata_id)`` with its first partitions. An
existing table, the ETL's or a user's, is left exactly as it is (plain, with its indexes):
converting it is a choice the README describes.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    add_missing_columns,
    create_missing,
    ensure_index,
    metadata_index,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.schema import dicom_ingest_log

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    add_missing_columns(bind, schemas, dicom_ingest_log)
    ensure_index(bind, schemas, metadata_index(dicom_ingest_log.name, "idx_dicom_ingest_log_run"))
    run_attributes().setdefault("created", []).extend(create_missing(bind, schemas, revision))


def downgrade() -> None:
    raise NotImplementedError("the ETL never downgrades a schema")
