"""Revision 1: the schema of the release at commit f2260e1, the last one without versioning.

Creates what is missing from the metadata at head (an empty database ends up at head in
one step; the later revisions are then no-ops), the id sequences above existing ids, and
records the ETL's tables: the ones it creates now, and the ones an earlier release created.

An earlier release created a medical-imaging table together with its indexes and never
added an index to a table a user already had, so an existing table carrying one of the index
names below was created by the ETL. ``dicom_ingest_log`` only exists for this ETL. The names
are frozen here (they are what f2260e1 and the releases before it wrote), not read from the
metadata, which may gain indexes later.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

from alembic import op

from dicom_etl_dagster.core.db.migrations.support import (
    create_missing,
    index_methods,
    psycopg_connection,
    record_owned,
    run_attributes,
    run_schemas,
)
from dicom_etl_dagster.core.db.tables import table_exists

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

#: Index names only the ETL's releases up to f2260e1 gave these medical-imaging tables.
EARLIER_RELEASE_INDEXES = {
    "image_occurrence": {"idx_image_occurrence_series_uid", "idx_image_occurrence_study_uid"},
    "dicom_data_element": {"idx_dicom_data_element_tag"},
    "dicom_file_metadata": {
        "idx_dicom_file_metadata_sop_instance",
        "idx_dicom_file_metadata_image_occurrence",
    },
    "file_upload_metadata": {
        "idx_file_upload_metadata_server_sop",
        "idx_file_upload_metadata_sop_instance",
        "idx_file_upload_metadata_image_occurrence",
    },
}
ALWAYS_OWNED = ("dicom_ingest_log",)


def upgrade() -> None:
    bind = op.get_bind()
    schemas = run_schemas()
    conn = psycopg_connection(bind)
    earlier = [
        table
        for table, names in EARLIER_RELEASE_INDEXES.items()
        if names & set(index_methods(bind, schemas.medical_imaging, table))
    ]
    earlier += [t for t in ALWAYS_OWNED if table_exists(conn, schemas.medical_imaging, t)]
    record_owned(bind, schemas, earlier, revision)
    run_attributes().setdefault("created", []).extend(create_missing(bind, schemas, revision))


def downgrade() -> None:
    raise NotImplementedError("the ETL never drops tables")
