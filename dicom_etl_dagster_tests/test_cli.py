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
    job: str, tmp_path: Path, env: dict[str, str], document: dict | None = None
):
    config = tmp_path / "options.json"
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
