"""The `dg` CLI (dagster-dg-cli, Dagster 1.13's successor of `dagster job execute` / `dagster dev`),
run from the repository root as the README says: `[tool.dg]` in pyproject.toml makes the checkout
a dg project whose code location is `dicom_etl_dagster.definitions`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from dicom_etl_dagster_tests.conftest import REPO_ROOT, scalar
from dicom_etl_dagster_tests.helpers import ORIGINAL_OPTIONS, load_script

DG = str(Path(sys.executable).with_name("dg"))
screenshots = load_script("screenshots")


def _dg(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOM_ETL_", "DAGSTER_"))}
    # A wide terminal: dg renders its output with rich, which wraps lines at 80 columns.
    full_env.update({"DAGSTER_HOME": str(home), "COLUMNS": "200", **env})
    return subprocess.run(
        [DG, *args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=600
    )


def test_dg_list_defs_sees_the_contract_jobs_and_the_sensor(tmp_path, vocab_dir):
    completed = _dg(["list", "defs", "--json"], tmp_path, {"DICOM_ETL_VOCAB_DIR": str(vocab_dir)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    defs = json.loads(completed.stdout)
    assert sorted(job["name"] for job in defs["jobs"]) == ["ingest_metadata", "load_vocab"]
    sensors = sorted(sensor["name"] for sensor in defs["sensors"])
    assert sensors == ["new_dicom_files", "new_dicomweb_series"]
    assert {asset["group_name"] for asset in defs["assets"]} == {"vocabulary", "imaging", "upload"}


def test_dg_launch_runs_both_jobs_with_the_original_options_document(
    tmp_path, vocab_dir, embedded_pgdata
):
    folder = screenshots.copy_samples(tmp_path / "dicom", ["CT_small.dcm", "MR_small.dcm"])
    document = copy.deepcopy(ORIGINAL_OPTIONS)
    document["options"]["dicom_files_abs_path"] = str(folder)  # the only change
    options = tmp_path / "options.json"
    options.write_text(json.dumps(document))
    env = {"DICOM_ETL_VOCAB_DIR": str(vocab_dir), "DICOM_ETL_EMBEDDED_PGDATA": str(embedded_pgdata)}

    for job in ("load_vocab", "ingest_metadata"):
        completed = _dg(["launch", "--job", job, "--config", str(options)], tmp_path, env)
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0, output[-3000:]
        assert "RUN_SUCCESS" in output
        # dg calls Dagster's job execution directly: no "superseded, use dg launch" warning.
        assert "superseded" not in output.lower()

    import pgserver

    url = pgserver.get_server(embedded_pgdata, cleanup_mode="stop").get_uri()
    with psycopg.connect(url) as conn:
        assert (
            scalar(conn, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'")
            == 8811
        )
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM cdmmedicalimaging.dicom_ingest_log GROUP BY 1"
            ).fetchall()
        )
        assert statuses == {"ingested": 2}
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.image_occurrence") == 2
        assert scalar(conn, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 2
        assert (
            scalar(
                conn,
                "SELECT count(DISTINCT sop_instance_id) FROM cdmmedicalimaging.dicom_file_metadata",
            )
            == 2
        )
    # The runs went to the DAGSTER_HOME instance, where the UI will find them.
    assert any((tmp_path / "dagster_home").rglob("runs.db"))
