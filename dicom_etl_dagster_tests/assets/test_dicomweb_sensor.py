"""The new_dicomweb_series sensor against a real Orthanc (DICOMweb plugin, StableAge 1 s):
ticked with build_sensor_context, its run requests executed as the daemon would launch them
against a real PostgreSQL. Expected series come from what the test stored, not the product."""

from __future__ import annotations

import datetime
import time

import dagster as dg
import pytest
from pydicom.uid import generate_uid

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.dicomweb_sensor import new_dicomweb_series
from dicom_etl_dagster.resources.dicomweb_source import DicomWebSourceResource
from dicom_etl_dagster_tests.assets.test_dicomweb_source import FAST, clones, fill, run_metadata
from dicom_etl_dagster_tests.helpers import ledger, options, run_job
from dicom_etl_dagster_tests.orthanc import free_port, start_orthanc

TODAY = datetime.date.today().strftime("%Y%m%d")


@pytest.fixture
def source(tmp_path, monkeypatch, database_url):
    """An Orthanc that calls a series stable after 1 s, watched by the sensor; a vocabulary."""
    server = start_orthanc(tmp_path / "orthanc", extra_config={"StableAge": 1})
    monkeypatch.setenv(settings.SOURCE_URL.name, server.dicomweb_url)
    assert run_job("load_vocab", database_url, options()).success
    yield server
    server.stop(graceful=False)


def series_files(count: int, study: str, series: str, study_date: str = TODAY) -> list[bytes]:
    return clones(count, study, series, study_date)


def wait_for_stable_series(orthanc, count: int, timeout: float = 60.0) -> None:
    """Until Orthanc's feed holds ``count`` StableSeries events (StableAge is 1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes = orthanc.get("/changes", limit=1000)["Changes"]
        if sum(c["ChangeType"] == "StableSeries" for c in changes) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"Orthanc reported fewer than {count} stable series in {timeout:g} s")


def tick(cursor: str | None = None):
    resources = {"dicomweb_source": DicomWebSourceResource(**FAST)}
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        return new_dicomweb_series(context)


def requested_series(request: dg.RunRequest) -> set[str]:
    return set(request.run_config["options"]["dicomweb_series"])


def launch(database_url: str, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """The requested run, with the test's database and a fast-failing source resource."""
    from dicom_etl_dagster.definitions import build_definitions
    from dicom_etl_dagster.resources.database import PostgresResource

    defs = build_definitions(
        PostgresResource(database_url=database_url),
        dicomweb_source=DicomWebSourceResource(**FAST),
    )
    job = defs.resolve_job_def("ingest_metadata")
    return job.execute_in_process(run_config=request.run_config, raise_on_error=False)


def test_orthanc_changes_feed_requests_runs_for_new_stable_series_only(source, database_url, db):
    study = generate_uid()
    first, second, later = generate_uid(), generate_uid(), generate_uid()
    fill(source, series_files(2, study, first) + series_files(2, study, second))
    wait_for_stable_series(source, 2)

    result = tick()
    [request] = result.run_requests
    assert requested_series(request) == {f"{study}/{first}", f"{study}/{second}"}
    assert request.run_config["options"]["dicomweb_source_url"] == source.dicomweb_url
    ran = launch(database_url, request)
    assert ran.success
    rows = ledger(db)
    assert len(rows) == 4 and {status for status, *_ in rows.values()} == {"ingested"}
    assert all(path.startswith(f"{source.dicomweb_url}/studies/{study}/") for path in rows)

    # Nothing new: no run, and the cursor does not move.
    quiet = tick(result.cursor)
    assert quiet.run_requests == [] and "no new stable series" in quiet.skip_reason.skip_message
    assert quiet.cursor == result.cursor

    # Three instances of a new series: the only series the next run is asked for and fetches.
    fill(source, series_files(3, study, later))
    wait_for_stable_series(source, 3)
    [request] = tick(result.cursor).run_requests
    assert requested_series(request) == {f"{study}/{later}"}
    ran = launch(database_url, request)
    assert ran.success
    assert run_metadata(ran)["dicomweb_requests"]["metadata"] == 1  # one series' metadata
    assert len(ledger(db)) == 7


def test_series_per_run_and_runs_per_tick_are_capped_and_the_rest_comes_next(source, monkeypatch):
    study = generate_uid()
    series = [generate_uid() for _ in range(3)]
    fill(source, [data for uid in series for data in series_files(1, study, uid)])
    wait_for_stable_series(source, 3)
    monkeypatch.setenv(settings.SENSOR_MAX_SERIES_PER_RUN.name, "1")
    monkeypatch.setenv(settings.SENSOR_MAX_RUNS_PER_TICK.name, "2")

    first = tick()
    assert [len(requested_series(r)) for r in first.run_requests] == [1, 1]
    assert len({r.run_key for r in first.run_requests}) == 2
    rest = tick(first.cursor)
    [last] = rest.run_requests
    taken = set().union(*map(requested_series, first.run_requests + rest.run_requests))
    assert taken == {f"{study}/{uid}" for uid in series}  # each series once, none lost
    assert tick(rest.cursor).run_requests == []


def test_qido_feed_requests_a_run_when_the_study_date_window_changes(
    source, monkeypatch, database_url, db
):
    monkeypatch.setenv(settings.SOURCE_FEED.name, "qido")
    study, old_study = generate_uid(), generate_uid()
    fill(source, series_files(2, study, generate_uid()))
    fill(source, series_files(1, old_study, generate_uid(), study_date="20040119"))

    result = tick()
    [request] = result.run_requests
    week_ago = (datetime.date.today() - datetime.timedelta(days=6)).strftime("%Y%m%d")
    assert request.run_config["options"]["dicomweb_study_date_from"] == week_ago
    assert "dicomweb_series" not in request.run_config["options"]
    skipped = tick(result.cursor)
    assert isinstance(skipped, dg.SkipReason) and "nothing new" in skipped.skip_message
    assert "1 studies, 2 instances" in skipped.skip_message  # the 2004 study is outside

    assert launch(database_url, request).success
    assert len(ledger(db)) == 2  # the window's instances, not the old study's

    fill(source, series_files(1, study, generate_uid()))
    [again] = tick(result.cursor).run_requests
    assert again.run_key != request.run_key
    assert launch(database_url, again).success
    assert len(ledger(db)) == 3


def test_auto_picks_the_orthanc_feed_and_a_silent_server_skips_the_tick(source, monkeypatch):
    study, series = generate_uid(), generate_uid()
    fill(source, series_files(1, study, series))
    wait_for_stable_series(source, 1)
    [request] = tick().run_requests  # auto: Orthanc's /system answers, so /changes is read
    assert requested_series(request) == {f"{study}/{series}"}

    monkeypatch.setenv(settings.SOURCE_URL.name, f"http://127.0.0.1:{free_port()}/dicom-web")
    skipped = tick("42")
    assert isinstance(skipped, dg.SkipReason)
    assert "does not answer" in skipped.skip_message and "stays at 42" in skipped.skip_message
