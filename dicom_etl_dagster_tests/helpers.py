"""Helpers for running the project's jobs against a test database."""

from __future__ import annotations

import copy

import dagster as dg

from dicom_etl_dagster.definitions import build_definitions
from dicom_etl_dagster.resources.database import PostgresResource

#: The original plugin's options document, as users pass it (section 2 of the architecture guide).
ORIGINAL_OPTIONS = {
    "options": {
        "flow_action_type": "ingest_metadata",
        "database_code": "alpdev_pg",
        "medical_imaging_schema_name": "cdmmedicalimaging",
        "cdm_schema_name": "cdmdefault",
        "vocab_schema_name": "cdmvocab",
        "dicom_files_abs_path": "/data/dicom",
        "to_truncate": False,
        "upload_files": False,
        "missing_person_id_options": "use_id_zero",
        "person_to_patient_mapping": {
            "schema_name": "cdmmedicalimaging",
            "table_name": "mappingtable",
            "person_id_column_name": "source_person_id",
            "patient_id_column_name": "source_patient_id",
        },
    }
}


def options(**overrides) -> dict:
    document = copy.deepcopy(ORIGINAL_OPTIONS)
    document["options"].update(overrides)
    return document


def run_job(job_name: str, database_url: str, run_config: dict | None = None,
            raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    defs = build_definitions(PostgresResource(database_url=database_url))
    job = defs.resolve_job_def(job_name)
    return job.execute_in_process(run_config=run_config or {}, raise_on_error=raise_on_error)
