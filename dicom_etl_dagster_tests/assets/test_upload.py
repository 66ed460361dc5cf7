"""file_upload_metadata against a real Orthanc (with its DICOMweb plugin) and a real PostgreSQL.

What is checked comes from the server itself (Orthanc's REST API, DICOMweb QIDO-RS), not
from the product's own record.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import psycopg
import pytest
import requests

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.upload.uploader import StoredInstance, upload_pending
from dicom_etl_dagster.definitions import build_definitions
from dicom_etl_dagster.resources import dicom_server as dicom_server_module
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicom_server import DicomServerResource
from dicom_etl_dagster_tests.conftest import REPO_ROOT, scalar
from dicom_etl_dagster_tests.helpers import options
from dicom_etl_dagster_tests.orthanc import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    pydicom_test_file,
    write_sample_folder,
)
from dicom_etl_dagster_tests.test_cli import DAGSTER, dagster_job_execute

MI = "cdmmedicalimaging"
SERVER_ENVS = (
    settings.DICOM_SERVER_URL.name,
    settings.DICOM_SERVER_KIND.name,
    settings.DICOMWEB_URL.name,
    settings.DICOM_SERVER_USER.name,
    settings.DICOM_SERVER_PASSWORD.name,
)
FAST = dict(retries=1, backoff_seconds=0.05, connect_timeout_seconds=2.0, read_timeout_seconds=30.0)
UPLOAD_KEY = dg.AssetKey("file_upload_metadata")


@pytest.fixture(autouse=True)
def _no_server_from_the_environment(monkeypatch):
    for name in SERVER_ENVS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_sample_folder(tmp_path / "dicom")  # 42 DICOM files in 6 series, and notes.txt


def run_ingest(
    database_url: str, server: DicomServerResource | None, folder: Path, instance=None, **overrides
):
    overrides.setdefault("parse_workers", 1)
    defs = build_definitions(PostgresResource(database_url=database_url), server)
    return defs.resolve_job_def("ingest_metadata").execute_in_process(
        run_config=options(dicom_files_abs_path=str(folder), **overrides),
        instance=instance,
        raise_on_error=False,
    )


def run_upload_alone(database_url: str, server: DicomServerResource, instance=None):
    """As a UI 'Materialize' of file_upload_metadata alone: no config at all."""
    defs = build_definitions(PostgresResource(database_url=database_url), server)
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[UPLOAD_KEY], instance=instance, raise_on_error=False
    )


def upload_metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("file_upload_metadata")
    return {key: value.value for key, value in materialization.metadata.items()}


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the run was expected to fail"
    return failures[0].step_failure_data.error.message


def ingested(db) -> dict[str, tuple[str, int]]:
    """sop_instance_uid -> (file_path, image_occurrence_id) of every ingested file."""
    rows = db.execute(
        f"SELECT sop_instance_uid, file_path, image_occurrence_id FROM {MI}.dicom_ingest_log"
        " WHERE status = 'ingested'"
    ).fetchall()
    return {sop: (path, io) for sop, path, io in rows}


def upload_rows(db) -> list[dict]:
    cursor = db.execute(f"SELECT * FROM {MI}.file_upload_metadata ORDER BY file_upload_id")
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def rejections(db) -> list[dict]:
    cursor = db.execute(f"SELECT * FROM {MI}.file_upload_rejection ORDER BY file_path")
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def series_of(db) -> dict[int, tuple[str, str, str | None]]:
    return {
        io: (study, series, uri)
        for io, study, series, uri in db.execute(
            f"SELECT image_occurrence_id, image_study_uid, image_series_uid, wadors_uri FROM {MI}.image_occurrence"
        )
    }


def assert_server_holds_exactly_the_ingested_files(server, db) -> None:
    on_server = server.sop_instance_uids()
    assert sorted(on_server) == sorted(ingested(db)), (
        "Orthanc must hold each ingested SOP instance exactly once"
    )


def assert_series_found_by_qido(server, db, dicomweb_root: str) -> None:
    files_per_series: dict[int, int] = {}
    for _, io in ingested(db).values():
        files_per_series[io] = files_per_series.get(io, 0) + 1
    for io, (study, series, uri) in series_of(db).items():
        assert uri == f"{dicomweb_root}/studies/{study}/series/{series}"
        found = server.qido(f"{dicomweb_root}/studies/{study}/series", SeriesInstanceUID=series)
        assert [s["0020000E"]["Value"][0] for s in found] == [series]
        assert len(server.qido(f"{uri}/instances")) == files_per_series[io]


# --------------------------------------------------------------------------
# Orthanc REST, from the ingest_metadata job with upload_files: true
# --------------------------------------------------------------------------
def test_ingest_with_upload_files_true_uploads_every_ingested_file_to_orthanc(
    orthanc, database_url, db, folder
):
    server = DicomServerResource(url=orthanc.url, max_concurrent_uploads=4, **FAST)
    result = run_ingest(database_url, server, folder, upload_files=True)
    assert result.success, failure_message(result)

    files = ingested(db)
    assert len(files) == 42
    assert_server_holds_exactly_the_ingested_files(orthanc, db)
    by_id = {instance["ID"]: instance for instance in orthanc.instances()}
    rows = upload_rows(db)
    assert len(rows) == len(files)
    for row in rows:
        path, image_occurrence_id = files[row["sop_instance_id"]]
        assert (
            by_id[row["instance_id"]]["MainDicomTags"]["SOPInstanceUID"] == row["sop_instance_id"]
        )
        info = orthanc.get(f"/instances/{row['instance_id']}/attachments/dicom/info")
        assert row["uploaded_filename"] == f"{info['Uuid']}.dcm"
        assert (row["original_file_path"], row["original_filename"]) == (
            path,
            os.path.basename(path),
        )
        assert row["image_occurrence_id"] == image_occurrence_id
        assert row["flow_run_id"] == result.run_id and result.run_id in row["task_run_id"]
        assert row["server_url"] == orthanc.url and row["server_kind"] == "orthanc"
        assert row["file_size"] == os.path.getsize(path) and row["uploaded_datetime"] is not None
    # Orthanc's DICOMweb plugin was found by itself: every series points at it.
    assert_series_found_by_qido(orthanc, db, orthanc.dicomweb_url)

    metadata = upload_metadata(result)
    assert (
        metadata["files_uploaded"],
        metadata["files_already_on_server"],
        metadata["files_failed"],
    ) == (42, 0, 0)
    assert metadata["bytes_sent"] == sum(os.path.getsize(p) for p, _ in files.values())
    assert metadata["files_per_second"] > 0 and metadata["wadors_root"] == orthanc.dicomweb_url

    again = run_ingest(database_url, server, folder, upload_files=True)
    assert again.success
    metadata = upload_metadata(again)
    assert (
        metadata["files_uploaded"],
        metadata["files_already_recorded"],
        metadata["bytes_sent"],
    ) == (0, 42, 0)
    assert_server_holds_exactly_the_ingested_files(orthanc, db)
    assert upload_rows(db) == rows


# --------------------------------------------------------------------------
# DICOMweb STOW-RS, launched on its own after an ingest that did not upload
# --------------------------------------------------------------------------
def test_dicomweb_upload_launched_on_its_own(orthanc, database_url, db, folder):
    server = DicomServerResource(kind="dicomweb", dicomweb_url=orthanc.dicomweb_url, **FAST)
    skipped = run_ingest(database_url, server, folder, upload_files=False)
    assert skipped.success
    assert skipped.asset_materializations_for_node("file_upload_metadata") == []
    (observation,) = skipped.asset_observations_for_node("file_upload_metadata")
    assert observation.metadata["status"].value == "skipped (upload_files false)"
    assert orthanc.instances() == [] and upload_rows(db) == []

    result = run_upload_alone(database_url, server)
    assert result.success, failure_message(result)
    assert_server_holds_exactly_the_ingested_files(orthanc, db)
    assert_series_found_by_qido(orthanc, db, orthanc.dicomweb_url)
    images = series_of(db)
    files = ingested(db)
    rows = upload_rows(db)
    assert len(rows) == len(files) == 42
    for row in rows:
        _, image_occurrence_id = files[row["sop_instance_id"]]
        assert row["instance_id"] == row["sop_instance_id"] and row["server_kind"] == "dicomweb"
        assert (
            row["uploaded_filename"]
            == f"{images[image_occurrence_id][2]}/instances/{row['sop_instance_id']}"
        )
        assert row["server_url"] == orthanc.dicomweb_url
    assert upload_metadata(result)["files_uploaded"] == 42

    assert run_upload_alone(database_url, server).success
    assert len(upload_rows(db)) == 42 and len(orthanc.instances()) == 42


def test_materialize_everything_without_config_does_not_upload(
    orthanc, database_url, db, folder, monkeypatch
):
    """The README quickstart's `--select '*'`: ingest and upload in one run, no options: no upload."""
    monkeypatch.setenv("DICOM_ETL_FILES_DIR", str(folder))
    defs = build_definitions(
        PostgresResource(database_url=database_url), DicomServerResource(url=orthanc.url)
    )
    keys = [
        dg.AssetKey(k)
        for k in (
            "procedure_occurrence",
            "image_occurrence",
            "measurement",
            "image_feature",
            "dicom_file_metadata",
            "dicom_ingest_log",
            "file_upload_metadata",
        )
    ]
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(asset_selection=keys)
    assert result.success
    assert len(ingested(db)) == 42
    assert orthanc.instances() == [] and upload_rows(db) == []
    (observation,) = result.asset_observations_for_node("file_upload_metadata")
    assert observation.metadata["status"].value.startswith("skipped (upload_files not set")


def test_upload_files_true_without_a_server_fails_clearly(database_url, db, folder):
    result = run_ingest(database_url, None, folder, upload_files=True)
    assert not result.success
    assert (
        "no DICOM server configured for uploads: set DICOM_ETL_DICOM_SERVER_URL"
        in failure_message(result)
    )
    assert len(ingested(db)) == 42  # the ingest itself went through


# --------------------------------------------------------------------------
# Server stopped mid-run, then restarted
# --------------------------------------------------------------------------
def test_server_stopped_mid_run_then_the_next_run_uploads_exactly_the_rest(
    orthanc, database_url, db, folder, monkeypatch
):
    server = DicomServerResource(url=orthanc.url, max_concurrent_uploads=4, **FAST)
    assert run_ingest(database_url, server, folder).success
    stop_after = 10
    real_upload = dicom_server_module.OrthancClient.upload
    lock, done = threading.Lock(), []

    def upload_then_stop_the_server(self, path, sop_instance_uid):
        stored = real_upload(self, path, sop_instance_uid)
        with lock:
            done.append(sop_instance_uid)
            if len(done) == stop_after:
                orthanc.stop()  # SIGTERM, as an administrator would
        return stored

    monkeypatch.setattr(dicom_server_module.OrthancClient, "upload", upload_then_stop_the_server)
    failed = run_upload_alone(database_url, server)
    monkeypatch.undo()

    assert not failed.success
    message = failure_message(failed)
    assert (
        f"DICOM server {orthanc.url} is unavailable" in message and "connection refused" in message
    )
    assert "run again when the server is back" in message
    recorded = {row["sop_instance_id"] for row in upload_rows(db)}
    assert stop_after <= len(recorded) < 42
    assert recorded <= set(done), (
        "a file was recorded as uploaded although its upload did not succeed"
    )
    assert rejections(db) == [], "an unavailable server is not a refusal of the files"

    orthanc.start()
    on_server = set(orthanc.sop_instance_uids())
    assert recorded <= on_server, "every recorded upload is really on the server"

    resumed = run_upload_alone(database_url, server)
    assert resumed.success, failure_message(resumed)
    metadata = upload_metadata(resumed)
    assert metadata["files_already_recorded"] == len(recorded)
    # Files the server stored just before it stopped (reply lost) come back as already present.
    assert metadata["files_uploaded"] + metadata["files_already_on_server"] == 42 - len(recorded)
    assert metadata["files_already_on_server"] == len(on_server - recorded)
    assert_server_holds_exactly_the_ingested_files(orthanc, db)
    rows = upload_rows(db)
    assert len(rows) == 42 and len({r["sop_instance_id"] for r in rows}) == 42


# --------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------
def _run_text(instance, result) -> str:
    """Everything the run left behind: every event log entry (messages, metadata, errors), its config."""
    texts = [dg.serialize_value(entry) for entry in instance.all_logs(result.run_id)]
    texts.append(repr(instance.get_run_by_id(result.run_id).run_config))
    return "\n".join(texts)


def test_credentials_never_appear_in_logs_or_metadata(
    orthanc_with_auth, database_url, db, folder, monkeypatch, capfd
):
    monkeypatch.setenv(settings.DICOM_SERVER_URL.name, orthanc_with_auth.url)
    monkeypatch.setenv(settings.DICOM_SERVER_USER.name, ORTHANC_USER)
    monkeypatch.setenv(settings.DICOM_SERVER_PASSWORD.name, ORTHANC_PASSWORD)
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_ingest(
            database_url, None, folder, instance=instance, upload_files=True
        )  # from the environment
        assert result.success, failure_message(result)
        assert_server_holds_exactly_the_ingested_files(orthanc_with_auth, db)
        assert upload_metadata(result)["files_uploaded"] == 42
        text = _run_text(instance, result)
        assert (
            "files_uploaded" in text and orthanc_with_auth.url in text
        )  # the log really was searched
        assert ORTHANC_PASSWORD not in text

        # A wrong password: a clear failure, and neither password anywhere.
        wrong = "wrong-pw-Q4v9-secret"
        monkeypatch.setenv(settings.DICOM_SERVER_PASSWORD.name, wrong)
        db.execute(f"DELETE FROM {MI}.file_upload_metadata")
        refused = run_ingest(database_url, None, folder, instance=instance, upload_files=True)
        assert not refused.success
        assert "refused the credentials (HTTP 401)" in failure_message(refused)
        assert rejections(db) == []
        text = _run_text(instance, refused)
        assert wrong not in text and ORTHANC_PASSWORD not in text
    captured = capfd.readouterr()
    assert ORTHANC_PASSWORD not in captured.out + captured.err
    assert wrong not in captured.out + captured.err


# --------------------------------------------------------------------------
# A file the server rejects
# --------------------------------------------------------------------------
#: pydicom's JPEG Baseline RGB secondary capture: pydicom (and so the ingest) reads it, Orthanc
#: 1.10 refuses it ("Bad file format"), over REST (HTTP 400) and STOW-RS (HTTP 400).
REFUSED = "SC_rgb_jpeg.dcm"
REJECTION_CHECK = "no_file_rejected_by_the_server"


@pytest.fixture
def folder_with_refused(folder) -> Path:
    """The 42 good files and notes.txt, plus one file Orthanc refuses for its content."""
    (folder / "refused").mkdir()
    shutil.copy(pydicom_test_file(REFUSED), folder / "refused" / REFUSED)
    return folder


@pytest.fixture
def posts(monkeypatch) -> list[str]:
    """Paths of the POST requests the uploader sends (to the real server: a spy, not a stub)."""
    seen: list[str] = []
    real_request = requests.Session.request

    def spy(self, method, url, *args, **kwargs):
        if method == "POST":
            seen.append(urlsplit(url).path)
        return real_request(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    return seen


def run_upload_with(database_url: str, server: DicomServerResource, **config):
    """The upload asset alone, with options (as the UI's launchpad would pass them)."""
    defs = build_definitions(PostgresResource(database_url=database_url), server)
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[UPLOAD_KEY],
        run_config={"ops": {"file_upload_metadata": {"config": config}}},
        raise_on_error=False,
    )


def rejection_check(result) -> tuple[bool, int, str]:
    """(passed, files_rejected, description) of the run's one rejection-check evaluation."""
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == REJECTION_CHECK
    ]
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    count = evaluation.metadata["files_rejected"].value
    return evaluation.passed, count, evaluation.description or ""


def test_a_file_orthanc_refuses_is_recorded_once_and_the_run_stays_green(
    orthanc, database_url, db, folder_with_refused, posts
):
    refused = str(folder_with_refused / "refused" / REFUSED)
    server = DicomServerResource(url=orthanc.url, **FAST)
    first = run_ingest(database_url, server, folder_with_refused, upload_files=True)
    assert first.success, failure_message(first)
    files = ingested(db)
    assert len(files) == 43 and refused in {path for path, _ in files.values()}
    assert posts.count("/instances") == 43
    # The good files are stored and recorded; the refused one is recorded as refused, once.
    assert len(orthanc.instances()) == 42 and len(upload_rows(db)) == 42
    assert refused not in {row["original_file_path"] for row in upload_rows(db)}
    (row,) = rejections(db)
    sop = next(s for s, (path, _) in files.items() if path == refused)
    assert (row["file_path"], row["server_url"], row["server_kind"]) == (
        refused,
        orthanc.url,
        "orthanc",
    )
    assert (row["sop_instance_uid"], row["http_status"], row["times_rejected"]) == (sop, 400, 1)
    assert row["reason"].startswith("Bad file format: Cannot parse an invalid DICOM file")
    stat = os.stat(refused)
    assert (row["file_size"], row["file_mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert row["run_id"] == first.run_id
    passed, count, description = rejection_check(first)
    assert (passed, count) == (False, 1) and description.startswith("1 file(s) rejected")
    metadata = upload_metadata(first)
    assert (metadata["files_uploaded"], metadata["files_rejected"], metadata["files_failed"]) == (
        42,
        1,
        0,
    )

    # The next run is green and sends nothing: the refused file is held back, not retried.
    posts.clear()
    again = run_upload_alone(database_url, server)
    assert again.success, failure_message(again)
    assert posts == []
    assert rejection_check(again)[:2] == (True, 0)
    metadata = upload_metadata(again)
    assert (metadata["files_already_recorded"], metadata["files_rejected_before_not_sent"]) == (
        42,
        1,
    )
    assert rejections(db) == [row]


def test_a_refused_file_is_sent_again_once_changed_or_when_retry_is_asked(
    orthanc, database_url, db, folder_with_refused, posts
):
    refused = folder_with_refused / "refused" / REFUSED
    server = DicomServerResource(url=orthanc.url, **FAST)
    assert run_ingest(database_url, server, folder_with_refused, upload_files=True).success
    (first,) = rejections(db)

    # Changed (a new mtime) and ingested again: sent once more, refused once more, one row.
    later = first["file_mtime_ns"] + 5_000_000_000
    os.utime(refused, ns=(later, later))
    posts.clear()
    changed = run_ingest(database_url, server, folder_with_refused, upload_files=True)
    assert changed.success, failure_message(changed)
    assert posts == ["/instances"]
    (row,) = rejections(db)
    assert (row["file_mtime_ns"], row["times_rejected"]) == (later, 2)
    assert row["first_rejected_at"] == first["first_rejected_at"] < row["rejected_at"]
    assert rejection_check(changed)[:2] == (False, 1)

    # Unchanged, but retry_rejected_uploads: true sends it again (and only it).
    posts.clear()
    retried = run_upload_with(database_url, server, retry_rejected_uploads=True)
    assert retried.success, failure_message(retried)
    assert posts == ["/instances"]
    assert rejections(db)[0]["times_rejected"] == 3
    assert rejection_check(retried)[:2] == (False, 1)
    posts.clear()
    assert run_upload_with(database_url, server, retry_rejected_uploads=False).success
    assert posts == []

    # Replaced by a file the server takes: stored, recorded, and its rejection row is gone.
    shutil.copy(pydicom_test_file("CT_small.dcm"), refused)
    fixed = run_ingest(database_url, server, folder_with_refused, upload_files=True)
    assert fixed.success, failure_message(fixed)
    assert rejections(db) == [] and rejection_check(fixed)[:2] == (True, 0)
    assert str(refused) in {row["original_file_path"] for row in upload_rows(db)}
    assert_server_holds_exactly_the_ingested_files(orthanc, db)


def test_dicomweb_stow_refusal_is_recorded_and_not_sent_again(
    orthanc, database_url, db, folder_with_refused, posts
):
    server = DicomServerResource(kind="dicomweb", dicomweb_url=orthanc.dicomweb_url, **FAST)
    first = run_ingest(database_url, server, folder_with_refused, upload_files=True)
    assert first.success, failure_message(first)
    assert posts.count("/dicom-web/studies") == 43
    assert len(orthanc.instances()) == 42 and len(upload_rows(db)) == 42
    (row,) = rejections(db)
    assert (row["file_path"], row["server_url"], row["server_kind"], row["http_status"]) == (
        str(folder_with_refused / "refused" / REFUSED),
        orthanc.dicomweb_url,
        "dicomweb",
        400,
    )
    # Orthanc's STOW-RS answer has an empty FailedSOPSequence: no Failure Reason to quote.
    assert row["reason"] == "STOW-RS failed SOP instance (no reason given)"
    assert rejection_check(first)[:2] == (False, 1)

    posts.clear()
    again = run_upload_alone(database_url, server)
    assert again.success and posts == [] and rejection_check(again)[:2] == (True, 0)
    retried = run_upload_with(database_url, server, retry_rejected_uploads=True)
    assert retried.success and posts == ["/dicom-web/studies"]
    assert rejections(db)[0]["times_rejected"] == 2


def test_file_changed_since_ingest_is_not_uploaded(orthanc, database_url, db, folder):
    server = DicomServerResource(url=orthanc.url, **FAST)
    assert run_ingest(database_url, server, folder).success
    changed = folder / "MR_small.dcm"
    changed.write_bytes(changed.read_bytes() + b"\0\0")
    result = run_upload_alone(database_url, server)
    assert not result.success
    assert f"{changed}: file changed since it was ingested" in failure_message(result)
    assert len(upload_rows(db)) == 41


# --------------------------------------------------------------------------
# The core: bounded concurrency, overlapping runs
# --------------------------------------------------------------------------
class SlowClient:
    """Records how many uploads were in flight at once."""

    kind = "orthanc"
    server_url = "http://fake-server"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.sent: list[str] = []

    def dicomweb_root(self):
        return None

    def upload(self, path: str, sop_instance_uid: str) -> StoredInstance:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
            self.sent.append(sop_instance_uid)
        return StoredInstance(
            f"id-{sop_instance_uid}", f"{sop_instance_uid}.dcm", False, os.path.getsize(path)
        )


def test_uploads_run_several_at_once_and_never_more_than_the_bound(database_url, db, folder):
    assert run_ingest(database_url, None, folder).success
    client = SlowClient()
    started = time.monotonic()
    report = upload_pending(db, Schemas(), client, run_id="r1", task_run_id="t1", concurrency=5)
    elapsed = time.monotonic() - started
    assert client.peak == 5
    assert sorted(client.sent) == sorted(ingested(db))
    assert report.uploaded == report.recorded == 42 and elapsed < 42 * 0.05
    assert (
        upload_pending(
            db, Schemas(), client, run_id="r2", task_run_id="t2", concurrency=5
        ).files_sent
        == 0
    )


def test_overlapping_runs_record_each_instance_once(orthanc, database_url, db, folder):
    server = DicomServerResource(url=orthanc.url, max_concurrent_uploads=3, **FAST)
    assert run_ingest(database_url, server, folder).success
    reports, errors = [], []

    def one_run(name: str) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn, server.client() as client:
                reports.append(
                    upload_pending(
                        conn, Schemas(), client, run_id=name, task_run_id=name, concurrency=3
                    )
                )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_run, args=(f"run{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(r.recorded for r in reports) == 42
    assert (
        scalar(db, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.file_upload_metadata") == 42
    )
    assert len(upload_rows(db)) == 42
    assert_server_holds_exactly_the_ingested_files(orthanc, db)


# --------------------------------------------------------------------------
# As users run it: the CLI, configured by the environment
# --------------------------------------------------------------------------
def test_cli_upload_with_original_options_and_asset_alone(
    orthanc_with_auth, database_url, db, folder, tmp_path
):
    env = {
        "DICOM_ETL_DATABASE_URL": database_url,
        "DICOM_ETL_VOCAB_DIR": os.environ["DICOM_ETL_VOCAB_DIR"],
        settings.DICOM_SERVER_URL.name: orthanc_with_auth.url,
        settings.DICOM_SERVER_USER.name: ORTHANC_USER,
        settings.DICOM_SERVER_PASSWORD.name: ORTHANC_PASSWORD,
    }
    document = options(dicom_files_abs_path=str(folder), upload_files=True, parse_workers=1)
    # Half of the files first, through the contract command with the original options document
    # (the ingest reads every file under the folder, so the other half waits outside it).
    later = tmp_path / "later"
    moved = sorted(folder.rglob("*.dcm"))[21:]
    for path in moved:
        (later / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        path.rename(later / path.relative_to(folder))
    completed = dagster_job_execute("ingest_metadata", tmp_path, env, document)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert len(orthanc_with_auth.instances()) == 21 == len(upload_rows(db))
    assert ORTHANC_PASSWORD not in output

    # The rest: ingest without upload, then the upload asset on its own, with no config.
    for path in moved:
        (later / path.relative_to(folder)).rename(path)
    completed = dagster_job_execute(
        "ingest_metadata", tmp_path, env, options(dicom_files_abs_path=str(folder), parse_workers=1)
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    assert len(orthanc_with_auth.instances()) == 21
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ETL_")}
    full_env.update({"DAGSTER_HOME": str(tmp_path / "dagster_home"), **env})
    completed = subprocess.run(
        [
            DAGSTER,
            "asset",
            "materialize",
            "-m",
            "dicom_etl_dagster.definitions",
            "--select",
            "file_upload_metadata",
        ],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert ORTHANC_PASSWORD not in output
    assert_server_holds_exactly_the_ingested_files(orthanc_with_auth, db)
    assert len(upload_rows(db)) == 42
