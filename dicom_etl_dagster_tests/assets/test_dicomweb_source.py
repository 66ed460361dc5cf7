"""ingest_metadata from a DICOMweb source: a real Orthanc (DICOMweb plugin) the test fills
through Orthanc's REST API, a real PostgreSQL. Expected values come from the server's own
WADO-RS metadata and from plain pydicom reads of the same files, not from the product."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.ingest import dicomweb_pull
from dicom_etl_dagster.definitions import build_definitions
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicomweb_source import DicomWebSourceResource
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.helpers import ledger, options, run_job
from dicom_etl_dagster_tests.orthanc import pydicom_test_file

MI = "cdmmedicalimaging"
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
PIXEL_DATA = {"7FE00010", "7FE00008", "7FE00009"}
FAST = dict(retries=1, backoff_seconds=0.05, connect_timeout_seconds=2.0, read_timeout_seconds=30.0)


@pytest.fixture
def vocab_url(database_url) -> str:
    assert run_job("load_vocab", database_url, options()).success
    return database_url


def clones(
    count: int, study: str | None = None, series: str | None = None, study_date: str | None = None
) -> list[bytes]:
    """``count`` copies of CT_small as new instances of one series (new UIDs unless given;
    CT_small's StudyDate unless given)."""
    template = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    template.StudyInstanceUID = study or generate_uid()
    template.SeriesInstanceUID = series or generate_uid()
    template.StudyDate = study_date or template.StudyDate
    files = []
    for i in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = i + 1
        path = Path(f"/tmp/dicomweb-clone-{template.SOPInstanceUID}.dcm")
        template.save_as(path)
        files.append(path.read_bytes())
        path.unlink()
    return files


def fill(orthanc, files: list[bytes]) -> None:
    for data in files:
        assert orthanc.post_instance(data)["Status"] == "Success"


def pull(database_url: str, url: str, resource: DicomWebSourceResource | None = None, **overrides):
    defs = build_definitions(
        PostgresResource(database_url=database_url),
        dicomweb_source=resource or DicomWebSourceResource(**FAST),
    )
    return defs.resolve_job_def("ingest_metadata").execute_in_process(
        run_config=options(dicomweb_source_url=url, parse_workers=1, **overrides),
        raise_on_error=False,
    )


def run_metadata(result, asset: str = "dicom_file_metadata") -> dict:
    found = [
        m
        for m in result.asset_materializations_for_node("ingest_dicom_folder")
        if m.asset_key.to_user_string() == asset
    ]
    assert len(found) == 1
    return {key: value.value for key, value in found[0].metadata.items()}


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the run was expected to fail"
    return failures[0].step_failure_data.error.message


def server_instances(orthanc) -> dict[str, dict]:
    """Every instance's WADO-RS metadata, by its instance URL (as the server gives it)."""
    found = {}
    root = orthanc.dicomweb_url
    for study in orthanc.qido(f"{root}/studies"):
        s = study["0020000D"]["Value"][0]
        for series in orthanc.qido(f"{root}/studies/{s}/series"):
            se = series["0020000E"]["Value"][0]
            for item in orthanc.qido(f"{root}/studies/{s}/series/{se}/metadata"):
                sop = item["00080018"]["Value"][0]
                found[f"{root}/studies/{s}/series/{se}/instances/{sop}"] = item
    return found


def element_count(dataset: dict) -> int:
    """Elements of a DICOM JSON dataset, nested items' elements counted, pixel data not."""
    count = 0
    for tag, element in dataset.items():
        if tag in PIXEL_DATA:
            continue
        count += 1
        if element.get("vr") == "SQ":
            count += sum(element_count(item) for item in element.get("Value") or [])
    return count


def metadata_rows(db, sop: str) -> int:
    return scalar(
        db, f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s", [sop]
    )


# --------------------------------------------------------------------------
# Pull, ledger, rows
# --------------------------------------------------------------------------
def test_every_instance_of_the_server_is_ingested_once_with_the_servers_element_count(
    orthanc, vocab_url, db
):
    fill(orthanc, [pydicom_test_file(n).read_bytes() for n in SAMPLES] + clones(5))
    on_server = server_instances(orthanc)
    assert len(on_server) == 8

    # Pages of 2: the 4 studies take several QIDO-RS pages.
    result = pull(vocab_url, orthanc.dicomweb_url, DicomWebSourceResource(page_size=2, **FAST))
    assert result.success, failure_message(result)

    rows = ledger(db)
    assert set(rows) == set(on_server), "one ledger row per instance, its WADO-RS URL as path"
    assert {status for status, *_ in rows.values()} == {"ingested"}
    for url, item in on_server.items():
        sop = item["00080018"]["Value"][0]
        assert rows[url][2] == sop
        assert metadata_rows(db, sop) == element_count(item), sop
    assert scalar(db, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.dicom_file_metadata") == 8

    series = db.execute(
        f"SELECT image_study_uid, image_series_uid, wadors_uri, local_path FROM {MI}.image_occurrence"
    ).fetchall()
    assert len(series) == 4
    for study, se, wadors_uri, local_path in series:
        expected = f"{orthanc.dicomweb_url}/studies/{study}/series/{se}"
        assert wadors_uri == expected and local_path == expected
        assert requests.get(f"{wadors_uri}/metadata", timeout=30).status_code == 200
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 4

    metadata = run_metadata(result)
    assert metadata["files_ingested"] == 8
    assert metadata["dicomweb_requests"]["metadata"] == 4  # one WADO-RS request per series

    again = pull(vocab_url, orthanc.dicomweb_url)
    assert again.success
    assert ledger(db) == rows, "a re-run adds nothing"
    metadata = run_metadata(again)
    assert metadata["files_already_done"] == 8 and metadata["files_ingested"] == 0
    assert "metadata" not in metadata["dicomweb_requests"], "nothing done is fetched again"


def test_three_instances_added_later_are_the_only_ones_fetched(orthanc, vocab_url, db):
    study, series = generate_uid(), generate_uid()
    fill(orthanc, [pydicom_test_file(n).read_bytes() for n in SAMPLES] + clones(4, study, series))
    assert pull(vocab_url, orthanc.dicomweb_url).success
    before = ledger(db)
    assert len(before) == 7

    # Two in a new series of a new study, one more in the existing CT series.
    fill(orthanc, clones(2) + clones(1, study, series))
    result = pull(vocab_url, orthanc.dicomweb_url)
    assert result.success, failure_message(result)

    after = ledger(db)
    added = set(after) - set(before)
    assert len(added) == 3 and all(after[url][0] == "ingested" for url in added)
    assert {url: after[url] for url in before} == before
    metadata = run_metadata(result)
    assert metadata["files_ingested"] == 3 and metadata["files_already_done"] == 7
    # WADO-RS only for the two series with something new; the three untouched ones not at all.
    assert metadata["dicomweb_requests"]["metadata"] == 2
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence") == 5


def test_a_study_date_window_reads_only_its_studies(orthanc, vocab_url, db):
    fill(orthanc, [pydicom_test_file(n).read_bytes() for n in SAMPLES])
    dates = {n: pydicom.dcmread(pydicom_test_file(n)).StudyDate for n in SAMPLES}
    ct_date = dates["CT_small.dcm"]
    result = pull(
        vocab_url,
        orthanc.dicomweb_url,
        dicomweb_study_date_from=ct_date,
        dicomweb_study_date_until=ct_date,
    )
    assert result.success, failure_message(result)
    expected = sum(1 for d in dates.values() if d == ct_date)
    assert len(ledger(db)) == expected

    refused = pull(vocab_url, orthanc.dicomweb_url, dicomweb_study_date_from="2004-01-19")
    assert not refused.success
    assert "dicomweb_study_date_from must be a date as YYYYMMDD" in failure_message(refused)


def test_server_stopped_mid_run_fails_in_one_line_and_a_rerun_completes_exactly(
    orthanc, vocab_url, db, monkeypatch
):
    # Five series of three instances; batches of two instances, one request at a time.
    for _ in range(5):
        fill(orthanc, clones(3))
    on_server = server_instances(orthanc)
    real = dicomweb_pull.DicomWebSource.series_metadata
    calls = []

    def fetch_then_stop(self, study, series):
        answer = real(self, study, series)
        calls.append(series)
        if len(calls) == 2:
            orthanc.stop()  # SIGTERM, as an administrator would
        return answer

    monkeypatch.setattr(dicomweb_pull.DicomWebSource, "series_metadata", fetch_then_stop)
    resource = DicomWebSourceResource(max_concurrent_requests=1, **FAST)
    failed = pull(vocab_url, orthanc.dicomweb_url, resource, ingest_batch_size=2)
    monkeypatch.undo()

    assert not failed.success
    message = failure_message(failed)
    assert "\n" not in message.strip()
    assert f"DICOMweb source {orthanc.dicomweb_url} is unavailable" in message
    # How the loss shows depends on when it hits a request: refused, reset, or a connection
    # dropped mid-answer (requests' ConnectionError, e.g. RemoteDisconnected).
    assert any(
        why in message for why in ("connection refused", "connection reset", "ConnectionError")
    ), message
    assert "run again to go on where this run stopped" in message
    written = ledger(db)
    assert 0 < len(written) < 15 and len(written) % 2 == 0, "whole batches only"
    assert set(written) <= set(on_server)

    orthanc.start()
    resumed = pull(vocab_url, orthanc.dicomweb_url, resource, ingest_batch_size=2)
    assert resumed.success, failure_message(resumed)
    final = ledger(db)
    assert set(final) == set(on_server)
    assert {url: final[url] for url in written} == written
    assert scalar(db, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.dicom_file_metadata") == 15
    assert run_metadata(resumed)["files_ingested"] == 15 - len(written)


def test_source_credentials_come_from_the_environment_and_never_show(
    orthanc_with_auth, vocab_url, db, monkeypatch
):
    from dicom_etl_dagster_tests.orthanc import ORTHANC_PASSWORD, ORTHANC_USER

    fill(orthanc_with_auth, [pydicom_test_file("CT_small.dcm").read_bytes()])
    refused = pull(vocab_url, orthanc_with_auth.dicomweb_url)
    assert not refused.success
    assert "refused the credentials (HTTP 401)" in failure_message(refused)
    assert "DICOM_ETL_SOURCE_USER" in failure_message(refused)

    monkeypatch.setenv("DICOM_ETL_SOURCE_USER", ORTHANC_USER)
    monkeypatch.setenv("DICOM_ETL_SOURCE_PASSWORD", ORTHANC_PASSWORD)
    import dagster as dg

    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(PostgresResource(database_url=vocab_url))
    result = defs.resolve_job_def("ingest_metadata").execute_in_process(
        run_config=options(dicomweb_source_url=orthanc_with_auth.dicomweb_url, parse_workers=1),
        instance=instance,
        raise_on_error=False,
    )
    assert result.success, failure_message(result)
    assert len(ledger(db)) == 1
    texts = "\n".join(dg.serialize_value(e) for e in instance.all_logs(result.run_id))
    texts += repr(instance.get_run_by_id(result.run_id).run_config)
    assert ORTHANC_PASSWORD not in texts
    assert json.dumps(ORTHANC_PASSWORD) not in texts
