"""Long ingests and uploads say how far they are, at INFO: done / total, files/s, time left.

The interval is shortened from 10 s so that a small folder in three batches shows three lines.
"""

from __future__ import annotations

import logging
import re

import dagster as dg

from dicom_etl_dagster.core import progress
from dicom_etl_dagster.resources.dicom_server import DicomServerResource
from dicom_etl_dagster_tests.assets.test_upload import (  # noqa: F401 (fixtures)
    FAST,
    _no_server_from_the_environment,
    failure_message,
    folder,
    run_ingest,
)

LINE = (
    r"{what}: (\d+) / {total} files \(\d+%\), \d+\.\d files/s, (about \d+ (s|min) left|finishing)"
)


def _progress_lines(instance: dg.DagsterInstance, run_id: str, what: str) -> list[str]:
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if not entry.is_dagster_event
        and entry.level == logging.INFO
        and entry.user_message.startswith(f"{what}: ")
    ]


def test_ingest_and_upload_log_progress_at_info(orthanc, database_url, folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_SECONDS", 0.0)
    server = DicomServerResource(url=orthanc.url, max_concurrent_uploads=2, **FAST)
    instance = dg.DagsterInstance.ephemeral()
    result = run_ingest(
        database_url, server, folder, instance, upload_files=True, ingest_batch_size=15
    )
    assert result.success, failure_message(result)

    # 43 files in the folder (notes.txt too: every regular file is read), in 3 batches.
    ingest = _progress_lines(instance, result.run_id, "ingest")
    done = [int(re.fullmatch(LINE.format(what="ingest", total=43), text)[1]) for text in ingest]
    assert done == [15, 30, 43], ingest
    upload = _progress_lines(instance, result.run_id, "upload")
    assert upload, "no upload progress line"
    pattern = (
        LINE.format(what="upload", total=42)
        + r"; 0 failed, 0 refused by the server, \d+ bytes sent"
    )
    assert all(re.fullmatch(pattern, text) for text in upload), upload


def test_the_default_interval_is_at_most_ten_seconds():
    assert 0 < progress.PROGRESS_INTERVAL_SECONDS <= 10
