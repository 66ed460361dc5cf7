"""The contract commands, run as users run them: `dagster job execute ... -c options.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dicom_etl_dagster_tests.conftest import REPO_ROOT, scalar
from dicom_etl_dagster_tests.helpers import ORIGINAL_OPTIONS

DAGSTER = str(Path(sys.executable).with_name("dagster"))


def dagster_job_execute(
    job: str,
    tmp_path: Path,
    env: dict[str, str],
    document: dict | None = None,
    config_file: Path | None = None,
):
    config = config_file or tmp_path / "options.json"
    if config_file is None:
        config.write_text(json.dumps(document or ORIGINAL_OPTIONS))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ETL_")}
    full_env.update({"DAGSTER_HOME": str(tmp_path / "dagster_home"), **env})
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    return subprocess.run(
        [
            DAGSTER,
            "job",
            "execute",
            "-m",
            "dicom_etl_dagster.definitions",
            "-j",
            job,
            "-c",
            str(config),
        ],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_load_vocab_with_original_options_on_embedded_database(
    tmp_path, vocab_dir, embedded_pgdata
):
    env = {"DICOM_ETL_VOCAB_DIR": str(vocab_dir), "DICOM_ETL_EMBEDDED_PGDATA": str(embedded_pgdata)}
    completed = dagster_job_execute("load_vocab", tmp_path, env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "RUN_SUCCESS" in completed.stdout + completed.stderr

    import pgserver

    url = pgserver.get_server(embedded_pgdata, cleanup_mode="stop").get_uri()
    with psycopg.connect(url) as conn:
        assert (
            scalar(conn, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'")
            == 8811
        )
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.dicom_data_element") == 5190


@pytest.mark.parametrize(
    "case, env, expected",
    [
        (
            "bad database url",
            {"DICOM_ETL_DATABASE_URL": "postgresql://etl:s3cret-pw@127.0.0.1:1/omop"},
            "cannot connect to PostgreSQL at postgresql://etl:***@127.0.0.1:1/omop",
        ),
        (
            "missing vocabulary file",
            {"DICOM_ETL_VOCAB_DIR": "{empty}", "DICOM_ETL_VOCAB_MIRROR_URL": "http://127.0.0.1:9/"},
            "vocabulary files omop_table_staging_v5.csv, cs_values_maps_to.csv, "
            "cs_values_maps_to_value.csv, part6_attributes.csv are missing from",
        ),
    ],
)
def test_bad_setup_fails_fast_with_one_line_reason(
    case, env, expected, tmp_path, vocab_dir, embedded_pgdata
):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        "DICOM_ETL_VOCAB_DIR": str(vocab_dir),
        "DICOM_ETL_EMBEDDED_PGDATA": str(embedded_pgdata),
        **{k: v.replace("{empty}", str(empty)) for k, v in env.items()},
    }
    completed = dagster_job_execute("load_vocab", tmp_path, env)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    reason_lines = [line for line in output.splitlines() if expected in line]
    assert reason_lines, output[-3000:]
    assert "s3cret-pw" not in output


def _sample_folder(tmp_path: Path) -> Path:
    import shutil

    from pydicom.data import get_testdata_files

    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(next(p for p in get_testdata_files(name) if p.endswith(name)), folder / name)
    return folder


def test_ingest_metadata_with_original_options_on_embedded_database(
    tmp_path, vocab_dir, embedded_pgdata
):
    env = {"DICOM_ETL_VOCAB_DIR": str(vocab_dir), "DICOM_ETL_EMBEDDED_PGDATA": str(embedded_pgdata)}
    document = json.loads(json.dumps(ORIGINAL_OPTIONS))
    document["options"]["dicom_files_abs_path"] = str(_sample_folder(tmp_path))
    for job in ("load_vocab", "ingest_metadata"):
        completed = dagster_job_execute(job, tmp_path, env, document)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    import pgserver

    with psycopg.connect(
        pgserver.get_server(embedded_pgdata, cleanup_mode="stop").get_uri()
    ) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM cdmmedicalimaging.dicom_ingest_log GROUP BY 1"
            ).fetchall()
        )
        assert statuses == {"ingested": 3}
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.image_occurrence") == 3
        assert (
            scalar(
                conn,
                "SELECT count(DISTINCT sop_instance_id) FROM cdmmedicalimaging.dicom_file_metadata",
            )
            == 3
        )


# --------------------------------------------------------------------------
# A user's mistake: its reason once, at the end, without our stack frames
# --------------------------------------------------------------------------
#: The lines after the reason: Dagster's RUN_FAILURE line and its CLI's "Error: Run ... failed".
LAST_LINES = 3


def _one_reason_at_the_end(completed: subprocess.CompletedProcess, expected: str) -> list[str]:
    output = completed.stdout + completed.stderr
    lines = output.splitlines()
    assert completed.returncode != 0, output[-3000:]
    assert sum(line.count(expected) for line in lines) == 1, output[-3000:]
    assert any(expected in line for line in lines[-LAST_LINES:]), output[-3000:]
    assert "Traceback" not in output and "Stack Trace" not in output, output[-3000:]
    assert not [line for line in lines if "/dicom_etl_dagster/" in line and "File " in line]
    return lines


@pytest.mark.parametrize(
    "case, overrides, env, expected",
    [
        (
            "bad folder",
            {"dicom_files_abs_path": "/nonexistent/dicom"},
            {},
            "failed: dicom_files_abs_path /nonexistent/dicom is not a folder",
        ),
        (
            "bad database url",
            {},
            {"DICOM_ETL_DATABASE_URL": "postgresql://etl:s3cret-pw@127.0.0.1:1/omop"},
            "cannot connect to PostgreSQL at postgresql://etl:***@127.0.0.1:1/omop",
        ),
        (
            "bad schema name",
            {"cdm_schema_name": "cdm default"},
            {},
            "failed: cdm_schema_name 'cdm default' is not a plain SQL identifier",
        ),
        (
            "unknown key",
            {"dicom_files_abs_pth": "/data/dicom"},
            {},
            "failed: unknown key 'dicom_files_abs_pth' in options: "
            "did you mean 'dicom_files_abs_path'?",
        ),
        (
            "load_vocab document sent to ingest_metadata",
            {"flow_action_type": "load_vocab"},
            {},
            "failed: flow_action_type is 'load_vocab' but this is the ingest_metadata job: run "
            "the load_vocab job with this document",
        ),
        (
            "both spellings of the mapping key",
            {"PersonPatientMapping": {"table_name": "mappingtable"}},
            {},
            "failed: options give both person_to_patient_mapping and PersonPatientMapping",
        ),
    ],
)
def test_a_user_error_states_its_reason_once_as_the_last_lines(
    case, overrides, env, expected, tmp_path, database_url
):
    document = json.loads(json.dumps(ORIGINAL_OPTIONS))
    document["options"]["dicom_files_abs_path"] = str(tmp_path)
    document["options"].update(overrides)
    env = {"DICOM_ETL_DATABASE_URL": database_url, **env}
    completed = dagster_job_execute("ingest_metadata", tmp_path, env, document)
    lines = _one_reason_at_the_end(completed, expected)
    assert "s3cret-pw" not in completed.stdout + completed.stderr
    # From the run's start (before it: Dagster's one-time welcome to a new DAGSTER_HOME).
    run = lines[next(i for i, line in enumerate(lines) if "RUN_START" in line) :]
    assert len(run) <= 12, "\n".join(run)  # was 42-94 lines


#: The original plugin's README example (data2evidence/d2e-flows, dicom-etl/README.md at
#: 5c23eff887377b0eb89e59974590c0f172202f99, "How to run the plugin"), verbatim but for the
#: folder: YAML flow style, ``False``, unquoted inner keys, the ``PersonPatientMapping`` spelling.
ORIGINAL_README_EXAMPLE = """\
{
  "options": {
    "flow_action_type": "ingest_metadata",
    "database_code": "alpdev_pg",
    "medical_imaging_schema_name": "cdmmedicalimaging",
    "cdm_schema_name": "cdmdefault",
    "vocab_schema_name": "cdmvocab",
    "dicom_files_abs_path": "{folder}",
    "to_truncate": False,
    "upload_files": False,
    "missing_person_id_options": "use_id_zero",
    "PersonPatientMapping": {
      schema_name: "cdmmedicalimaging",
      table_name: "mappingtable",
      person_id_column_name: "source_person_id",
      patient_id_column_name: "source_patient_id"
    }
  }
}
"""


def test_the_original_readme_example_runs_as_written(tmp_path, database_url):
    import pydicom

    folder = _sample_folder(tmp_path)
    patient = str(pydicom.dcmread(folder / "CT_small.dcm").PatientID)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA cdmmedicalimaging")
        conn.execute(
            "CREATE TABLE cdmmedicalimaging.mappingtable"
            " (source_person_id integer, source_patient_id varchar)"
        )
        conn.execute("INSERT INTO cdmmedicalimaging.mappingtable VALUES (42, %s)", [patient])
    config = tmp_path / "options.yaml"
    config.write_text(ORIGINAL_README_EXAMPLE.replace("{folder}", str(folder)))
    env = {"DICOM_ETL_DATABASE_URL": database_url}
    completed = dagster_job_execute("ingest_metadata", tmp_path, env, config_file=config)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "RUN_SUCCESS" in output

    with psycopg.connect(database_url) as conn:
        assert dict(
            conn.execute(
                "SELECT status, count(*) FROM cdmmedicalimaging.dicom_ingest_log GROUP BY 1"
            ).fetchall()
        ) == {"ingested": 3}
        # The mapping named under the README's spelling was used: CT_small's patient is 42.
        persons = conn.execute(
            "SELECT person_id, count(*) FROM cdmmedicalimaging.image_occurrence GROUP BY 1"
        ).fetchall()
        assert sorted(persons) == [(0, 2), (42, 1)]
