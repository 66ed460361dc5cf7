"""The new-file sensor, ticked with build_sensor_context over real folders."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import dagster as dg
import pydicom.data
import pytest

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.ingest.new_files import plan_batches
from dicom_etl_dagster.sensors import new_dicom_files
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.helpers import run_job

SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "JPEG2000.dcm",
    "liver_1frame.dcm",
    "SC_rgb_rle.dcm",
    "rtdose.dcm",
]
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _sample(name: str) -> Path:
    return TEST_FILES / name


@pytest.fixture
def watched(tmp_path, monkeypatch):
    folder = tmp_path / "incoming"
    folder.mkdir()
    monkeypatch.setenv("DICOM_ETL_FILES_DIR", str(folder))
    monkeypatch.setenv(settings.SENSOR_SETTLE_SECONDS.name, "0")
    monkeypatch.setenv(settings.SENSOR_MAX_FILES_PER_RUN.name, "3")
    monkeypatch.setenv(settings.SENSOR_MAX_RUNS_PER_TICK.name, "20")
    return folder


def _tick(cursor: str | None = None) -> dg.SensorResult:
    with dg.build_sensor_context(cursor=cursor) as context:
        return new_dicom_files(context)


def _files_of(request: dg.RunRequest, folder: Path) -> set[str]:
    """Which files a run request stands for, re-selected the way the run itself does."""
    from dicom_etl_dagster.core.ingest.file_scan import iter_files

    options = request.run_config["options"]
    after, until = options["changed_after_ns"], options["changed_until_ns"]
    assert options["dicom_files_abs_path"] == str(folder.resolve())
    return {e.path for e in iter_files(folder) if after < e.ctime_ns <= until}


def test_ticks_first_no_change_and_new_files(watched):
    for name in SAMPLES:
        shutil.copy(_sample(name), watched / name)
        time.sleep(0.002)  # distinct change times, so batches split exactly at 3 files
    first = _tick()
    assert [int(r.tags["dicom_etl/files"]) for r in first.run_requests] == [3, 3, 1]
    batches = [_files_of(r, watched) for r in first.run_requests]
    assert set().union(*batches) == {str((watched / n).resolve()) for n in SAMPLES}
    assert sum(map(len, batches)) == len(SAMPLES)  # no file in two batches
    assert len({r.run_key for r in first.run_requests}) == 3

    unchanged = _tick(first.cursor)
    assert not unchanged.run_requests
    assert "no new settled files" in unchanged.skip_reason.skip_message

    (watched / "later").mkdir()
    shutil.copy(_sample("CT_small.dcm"), watched / "later" / "again.dcm")
    shutil.copy(_sample("MR_small.dcm"), watched / "later" / "again2")
    new = _tick(unchanged.cursor)
    assert len(new.run_requests) == 1
    assert _files_of(new.run_requests[0], watched) == {
        str((watched / "later" / "again.dcm").resolve()),
        str((watched / "later" / "again2").resolve()),
    }


def test_file_still_being_written_waits_until_it_settles(watched, monkeypatch):
    shutil.copy(_sample("CT_small.dcm"), watched / "done.dcm")
    monkeypatch.setenv(settings.SENSOR_SETTLE_SECONDS.name, "2")
    time.sleep(2.1)
    with (watched / "growing.dcm").open("wb") as handle:  # half-written: changed just now
        handle.write(Path(_sample("MR_small.dcm")).read_bytes()[:1000])
    first = _tick()
    assert [_files_of(r, watched) for r in first.run_requests] == [
        {str((watched / "done.dcm").resolve())}
    ]
    time.sleep(2.1)
    second = _tick(first.cursor)
    assert [_files_of(r, watched) for r in second.run_requests] == [
        {str((watched / "growing.dcm").resolve())}
    ]


def test_runs_per_tick_are_capped_and_the_rest_comes_next_tick(watched, monkeypatch):
    monkeypatch.setenv(settings.SENSOR_MAX_RUNS_PER_TICK.name, "1")
    for name in SAMPLES:
        shutil.copy(_sample(name), watched / name)
        time.sleep(0.002)
    seen, cursor = [], None
    for _ in range(5):
        result = _tick(cursor)
        assert len(result.run_requests) <= 1
        seen += [_files_of(r, watched) for r in result.run_requests]
        cursor = result.cursor
    assert [len(b) for b in seen] == [3, 3, 1]


def test_without_a_folder_the_sensor_says_what_to_set(monkeypatch):
    monkeypatch.delenv("DICOM_ETL_FILES_DIR", raising=False)
    with dg.build_sensor_context() as context:
        result = new_dicom_files(context)
    assert isinstance(result, dg.SkipReason) and "set DICOM_ETL_FILES_DIR" in result.skip_message


def test_sensor_run_request_ingests_exactly_its_batch(watched, database_url, db):
    for name in SAMPLES[:4]:
        shutil.copy(_sample(name), watched / name)
        time.sleep(0.002)
    first = _tick()
    request = first.run_requests[0]  # the first 3 files
    assert run_job("ingest_metadata", database_url, request.run_config).success
    logged = {
        row[0] for row in db.execute("SELECT file_path FROM cdmmedicalimaging.dicom_ingest_log")
    }
    assert logged == _files_of(request, watched)
    assert scalar(db, "SELECT count(*) FROM cdmmedicalimaging.dicom_ingest_log") == 3


def test_cursor_stays_small_and_a_tick_over_100k_files_is_reported(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "big"
    for shard in range(100):
        sub = folder / f"{shard:03d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"{i:04d}.dcm").write_bytes(b"x")
    monkeypatch.setenv("DICOM_ETL_FILES_DIR", str(folder))
    monkeypatch.setenv(settings.SENSOR_SETTLE_SECONDS.name, "0")
    monkeypatch.setenv(settings.SENSOR_MAX_FILES_PER_RUN.name, "5000")
    monkeypatch.setenv(settings.SENSOR_MAX_RUNS_PER_TICK.name, "10")
    started = time.perf_counter()
    result = _tick()
    first_tick = time.perf_counter() - started
    assert sum(int(r.tags["dicom_etl/files"]) for r in result.run_requests) == 50_000
    assert len(result.cursor) < 100
    started = time.perf_counter()
    second = _tick(result.cursor)
    second_tick = time.perf_counter() - started
    assert sum(int(r.tags["dicom_etl/files"]) for r in second.run_requests) == 50_000
    third = _tick(second.cursor)
    assert not third.run_requests and len(third.cursor) < 100
    with capsys.disabled():
        print(
            f"\nsensor tick over 100,000 files: {first_tick:.2f}s (first), {second_tick:.2f}s (second); "
            f"cursor {len(third.cursor)} bytes"
        )


def test_plan_keeps_equal_change_times_in_one_batch(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x")
    # Whatever the change times are, no window boundary splits files with the same time.
    plan = plan_batches(tmp_path, 0, time.time_ns(), 0, max_files_per_batch=2, max_batches=10)
    assert sum(b.files for b in plan.batches) == 5
    assert all(b.after_ns < b.until_ns for b in plan.batches)
    assert plan.watermark_ns == plan.batches[-1].until_ns
    assert json.dumps({"k": plan.watermark_ns})
