"""Helpers for running the project's jobs against a test database."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

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


def run_job(
    job_name: str, database_url: str, run_config: dict | None = None, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    defs = build_definitions(PostgresResource(database_url=database_url))
    job = defs.resolve_job_def(job_name)
    return job.execute_in_process(run_config=run_config or {}, raise_on_error=raise_on_error)


def load_script(name: str):
    """scripts/ is not a package: load scripts/<name>.py as a module (registered in
    sys.modules, so its dataclasses and pickling work)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ledger(conn, schema: str = "cdmmedicalimaging") -> dict[str, tuple]:
    """dicom_ingest_log as {path: (status, error_message, sop_instance_uid, image_occurrence_id)};
    fails if a path has more than one row."""
    rows = conn.execute(
        f"SELECT file_path, status, error_message, sop_instance_uid, image_occurrence_id"
        f" FROM {schema}.dicom_ingest_log"
    ).fetchall()
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths)), "a path has more than one ledger row"
    return {r[0]: r[1:] for r in rows}
