"""The upload domain's statements, against a real PostgreSQL and no DICOM server.

The end-to-end upload tests (assets/test_upload.py) drive these through a real Orthanc; here
each statement is pinned down on its own: what is pending, that a record is written once per
server and SOP instance, and the series' wadors_uri.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pydicom

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import PersonMapping
from dicom_etl_dagster.core.upload.records import (
    Rejection,
    UploadRecord,
    UploadRecords,
    newest_wadors_uri,
)
from dicom_etl_dagster_tests.conftest import scalar

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
SCHEMAS = Schemas()
TABLES = Tables(SCHEMAS)
SERVER = "http://server.invalid:8042"


def _ingest(db, tmp_path: Path, names: tuple[str, ...]) -> None:
    for name in names:
        shutil.copy(TEST_FILES_DIR / name, tmp_path / name)
    ensure_tables(db, SCHEMAS)
    mapping = PersonMapping("cdmmedicalimaging", "mappingtable", "person", "patient")
    state = prepare_run(db, SCHEMAS, "run", "use_id_zero", mapping, lambda message: None)
    ingest_folder(db, state, tmp_path, batch_size=10, workers=1)


def _record(item) -> UploadRecord:
    now = dt.datetime(2026, 12, 3, 8, 0)
    return UploadRecord(item, item.sop_instance_uid, f"{item.sop_instance_uid}.dcm", 10, now)


def test_pending_files_are_recorded_once_per_server_and_point_their_series(db, tmp_path):
    _ingest(db, tmp_path, ("CT_small.dcm", "MR_small.dcm"))
    records = UploadRecords(db, TABLES, SERVER, "dicomweb")
    assert records.count_pending() == (2, 0, 0)
    pending = list(records.iter_pending(page_size=1))  # one row per page: keyset paging
    assert sorted(p.path for p in pending) == sorted(
        str(tmp_path / n) for n in ("CT_small.dcm", "MR_small.dcm")
    )
    assert [p.ingest_log_id for p in pending] == sorted(p.ingest_log_id for p in pending)

    written, series = records.record(
        [_record(pending[0])], "run", "run:step", SERVER + "/dicom-web"
    )
    assert (written, series) == (1, 1)
    assert records.count_pending() == (1, 1, 0)
    # Recorded again (an overlapping run): no second row for this server and instance.
    assert records.record([_record(pending[0])], "run2", "run2:step", None) == (0, 0)
    other = UploadRecords(db, TABLES, "http://other.invalid", "orthanc")
    assert other.count_pending() == (2, 0, 0)  # another server has nothing yet

    uri = newest_wadors_uri(db, TABLES)
    study, series_uid = db.execute(
        "SELECT image_study_uid, image_series_uid FROM cdmmedicalimaging.image_occurrence"
        " WHERE image_occurrence_id = %s",
        [pending[0].image_occurrence_id],
    ).fetchone()
    assert uri == f"{SERVER}/dicom-web/studies/{study}/series/{series_uid}"
    assert scalar(db, "SELECT count(*) FROM cdmmedicalimaging.file_upload_metadata") == 1


def test_series_uploaded_before_the_dicomweb_root_was_known_get_their_uri(db, tmp_path):
    _ingest(db, tmp_path, ("CT_small.dcm",))
    records = UploadRecords(db, TABLES, SERVER, "orthanc")
    (item,) = records.iter_pending()
    assert records.record([_record(item)], "run", "run:step", None) == (1, 0)
    assert newest_wadors_uri(db, TABLES) is None
    assert records.set_missing_wadors_uris(SERVER + "/dicom-web") == 1
    assert records.set_missing_wadors_uris(SERVER + "/dicom-web") == 0  # nothing left to set
    assert newest_wadors_uri(db, TABLES).startswith(SERVER + "/dicom-web/studies/")


def _rejection(item) -> Rejection:
    at = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.timezone.utc)
    return Rejection(item, 400, "Bad file format", at)


def test_a_rejected_file_is_held_back_until_its_ledger_row_changes_or_retry(db, tmp_path):
    _ingest(db, tmp_path, ("CT_small.dcm", "MR_small.dcm"))
    records = UploadRecords(db, TABLES, SERVER, "orthanc")
    refused, good = list(records.iter_pending())
    assert records.record([], "run", "run:step", None, rejections=[_rejection(refused)]) == (0, 0)
    assert records.count_pending() == (1, 0, 1)
    assert [p.path for p in records.iter_pending()] == [good.path]
    retry = UploadRecords(db, TABLES, SERVER, "orthanc", retry_rejected=True)
    assert retry.count_pending() == (2, 0, 0)
    assert [p.path for p in retry.iter_pending()] == [refused.path, good.path]
    # Another server never refused it.
    assert UploadRecords(db, TABLES, "http://other.invalid", "orthanc").count_pending() == (2, 0, 0)

    # Refused again: still one row, counted twice.
    retry.record([], "run2", "run2:step", None, rejections=[_rejection(refused)])
    ledger = "cdmmedicalimaging.dicom_ingest_log"
    rejected = "cdmmedicalimaging.file_upload_rejection"
    assert scalar(db, f"SELECT count(*) FROM {rejected}") == 1
    assert scalar(db, f"SELECT times_rejected FROM {rejected}") == 2
    assert scalar(db, f"SELECT run_id FROM {rejected}") == "run2"

    # The ingest read the file again (its size or mtime changed): it is pending again.
    db.execute(
        f"UPDATE {ledger} SET file_mtime_ns = file_mtime_ns + 1 WHERE file_path = %s",
        [refused.path],
    )
    assert records.count_pending() == (2, 0, 0)
    (changed,) = [p for p in records.iter_pending() if p.path == refused.path]

    # Stored at last: recorded, and its rejection row is gone.
    assert records.record([_record(changed)], "run3", "run3:step", None) == (1, 0)
    assert scalar(db, f"SELECT count(*) FROM {rejected}") == 0
    assert records.count_pending() == (1, 1, 0)
