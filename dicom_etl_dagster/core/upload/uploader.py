"""Upload ingested files to a DICOM server and record each upload in file_upload_metadata.

No Dagster here. What to upload, and how it is recorded, is ``core.upload.records``. Files
are sent by a bounded pool of threads (HTTP uploads wait on the network, not the CPU); only
the calling thread talks to the database. Successful uploads are recorded in small batches,
each in its own short transaction, so a run that stops half-way keeps every upload it made
and records none it did not. Re-running uploads exactly what is missing; a unique index on
(server_url, sop_instance_id) keeps overlapping runs from recording an instance twice.

A file the server refuses for its content (``ServerRejectedError``) does not stop the run:
it is recorded in file_upload_rejection with the server's reason, in the same transactions,
and is not sent again while its ledger row is unchanged (unless ``retry_rejected``). Only a
server that cannot take uploads at all (``ServerUnavailableError``) stops the run.

The client (``UploadClient``) is any object with the attributes and ``upload`` method
below; ``core.upload.clients`` has the Orthanc and DICOMweb ones.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import psycopg

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.ingest.archives import (
    ArchiveMemberError,
    open_member,
    split_member_path,
)
from dicom_etl_dagster.core.progress import ProgressReporter
from dicom_etl_dagster.core.upload.records import (
    PendingFile,
    Rejection,
    UploadRecord,
    UploadRecords,
)

#: Successful uploads recorded per transaction (and at least every RECORD_EVERY_SECONDS).
RECORD_BATCH_SIZE = 50
RECORD_EVERY_SECONDS = 2.0
MAX_FAILURES_KEPT = 1000


class UploadError(DicomEtlError):
    """Base of the upload errors; messages are one line, name the file, carry no credentials."""


class FileRejectedError(UploadError):
    """This one file cannot be uploaded (gone, unreadable, changed since ingested, refused by
    the server); the other files go on."""


class ServerRejectedError(FileRejectedError):
    """The server refused the file for its content (HTTP 4xx other than 401/403/404/405, a
    STOW-RS failure, an Orthanc status other than Success): recorded in file_upload_rejection
    with the server's reason, not sent again until the file changes, and the run goes on green.
    """

    def __init__(self, message: str, *, http_status: int | None, reason: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.reason = reason


class ServerUnavailableError(UploadError):
    """The server cannot take uploads (unreachable, 5xx after retries, credentials refused):
    the run stops; what was uploaded so far stays recorded."""


@dataclass(frozen=True)
class StoredInstance:
    """What the server says about one stored file."""

    instance_id: str  # Orthanc: its instance id; DICOMweb: the SOP Instance UID
    uploaded_filename: (
        str  # Orthanc: attachment uuid + ".dcm"; DICOMweb: the instance's RetrieveURL
    )
    already_present: bool  # the server held this instance before (Orthanc "AlreadyStored")
    bytes_sent: int


class UploadClient(Protocol):
    kind: str
    server_url: str  # identifies the server in file_upload_metadata; never carries credentials

    def dicomweb_root(self) -> str | None:
        """The DICOMweb root for wadors_uri, or None when the server does not speak DICOMweb."""

    def upload(self, path: str, sop_instance_uid: str) -> StoredInstance:
        """Store one file; raises FileRejectedError or ServerUnavailableError."""


@dataclass
class UploadReport:
    server_url: str
    kind: str
    dicomweb_root: str | None = None
    pending_at_start: int = 0
    already_recorded: int = 0  # ingested files this server already had a row for: not sent
    uploaded: int = 0  # stored by this run (new on the server)
    already_present: int = 0  # sent, and the server said it held the instance already
    recorded: int = 0  # file_upload_metadata rows written by this run
    bytes_sent: int = 0
    seconds: float = 0.0
    series_with_wadors_uri: int = 0
    failures: list[tuple[str, str]] = field(
        default_factory=list
    )  # (path, reason), first MAX_FAILURES_KEPT
    failed: int = 0
    rejected: int = 0  # refused by the server for their content in this run (recorded)
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first ones
    rejected_before: int = 0  # refused by an earlier run and unchanged since: not sent
    aborted: str | None = None  # why the run stopped early (server unavailable)
    not_attempted: int = 0  # files left for the next run after an abort

    @property
    def files_sent(self) -> int:
        return self.uploaded + self.already_present

    def files_per_second(self) -> float:
        return round(self.files_sent / self.seconds, 1) if self.seconds else 0.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _size_and_mtime(path: str) -> tuple[int, int] | str:
    """(size, mtime in ns) of a file or of an archive member (its entry's); else why not."""
    if split_member_path(path) is not None:
        try:
            stream, size, mtime_ns = open_member(path)
        except ArchiveMemberError as exc:
            return str(exc)
        stream.close()
        return size, mtime_ns
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "file no longer exists"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or type(exc).__name__}"
    return stat.st_size, stat.st_mtime_ns


def _check_unchanged(item: PendingFile) -> str | None:
    """Why this file cannot be uploaded as ingested, or None if it is still the ingested file."""
    found = _size_and_mtime(item.path)
    if isinstance(found, str):
        return found
    if item.size is not None and item.mtime_ns is not None and found != (item.size, item.mtime_ns):
        return "file changed since it was ingested; run ingest_metadata again first"
    return None


def _upload_one(client: UploadClient, item: PendingFile) -> tuple[UploadRecord, bool]:
    """Send one file; (its record, whether the server held it already)."""
    reason = _check_unchanged(item)
    if reason:
        raise FileRejectedError(f"{item.path}: {reason}")
    stored = client.upload(item.path, item.sop_instance_uid)
    uploaded_at = _now().replace(tzinfo=None)
    record = UploadRecord(
        item, stored.instance_id, stored.uploaded_filename, stored.bytes_sent, uploaded_at
    )
    return record, stored.already_present


class _UploadRun:
    """One upload run: a bounded window of uploads in flight, recorded as they succeed."""

    def __init__(
        self,
        records: UploadRecords,
        client: UploadClient,
        concurrency: int,
        run_id: str,
        task_run_id: str,
        log: Callable[[str], None],
    ) -> None:
        self.records, self.client, self.concurrency, self.log = records, client, concurrency, log
        self.run_id, self.task_run_id = run_id, task_run_id
        self.report = UploadReport(
            server_url=client.server_url, kind=client.kind, dicomweb_root=client.dicomweb_root()
        )
        self.done: list[UploadRecord] = []
        self.rejected: list[Rejection] = []
        self.in_flight: dict[Future, PendingFile] = {}
        self.started = self.last_record = time.monotonic()
        # Its total is set once pending_at_start is counted (upload_pending).
        self.progress = ProgressReporter("upload", 0, log)

    def collect(self, futures) -> None:
        report = self.report
        for future in futures:
            item = self.in_flight.pop(future)
            if future.cancelled():
                continue
            try:
                record, already_present = future.result()
            except ServerRejectedError as exc:
                self.rejected.append(Rejection(item, exc.http_status, exc.reason, _now()))
                report.rejected += 1
                if len(report.rejections) < MAX_FAILURES_KEPT:
                    report.rejections.append((item.path, str(exc)))
            except FileRejectedError as exc:
                report.failed += 1
                if len(report.failures) < MAX_FAILURES_KEPT:
                    report.failures.append((item.path, str(exc)))
            except ServerUnavailableError as exc:
                if report.aborted is None:
                    report.aborted = str(exc)
                report.not_attempted += 1
            else:
                self.done.append(record)
                report.bytes_sent += record.bytes_sent
                if already_present:
                    report.already_present += 1
                else:
                    report.uploaded += 1

    def record_done(self) -> None:
        if self.done or self.rejected:
            written, series = self.records.record(
                self.done,
                self.run_id,
                self.task_run_id,
                self.report.dicomweb_root,
                rejections=self.rejected,
            )
            self.report.recorded += written
            self.report.series_with_wadors_uri += series
        self.done, self.rejected, self.last_record = [], [], time.monotonic()

    def report_progress(self) -> None:
        report = self.report
        done = report.files_sent + report.failed + report.rejected
        self.progress.update(
            done,
            note=f"{report.failed} failed, {report.rejected} refused by the server, "
            f"{report.bytes_sent} bytes sent",
        )

    def run(self, executor: ThreadPoolExecutor) -> None:
        pending = self.records.iter_pending()
        exhausted = False
        while True:
            # Keep the pool busy (twice as many queued as threads) without reading ahead further.
            while (
                not exhausted
                and self.report.aborted is None
                and (len(self.in_flight) < 2 * self.concurrency)
            ):
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                self.in_flight[executor.submit(_upload_one, self.client, item)] = item
            if not self.in_flight:
                return
            finished, _ = wait(
                list(self.in_flight), timeout=RECORD_EVERY_SECONDS, return_when=FIRST_COMPLETED
            )
            self.collect(finished)
            self.report_progress()
            due = time.monotonic() - self.last_record >= RECORD_EVERY_SECONDS
            waiting = len(self.done) + len(self.rejected)
            if waiting and (waiting >= RECORD_BATCH_SIZE or due):
                self.record_done()


def upload_pending(
    conn: psycopg.Connection,
    schemas: Schemas,
    client: UploadClient,
    run_id: str,
    task_run_id: str,
    concurrency: int = 4,
    log: Callable[[str], None] = lambda message: None,
    retry_rejected: bool = False,
) -> UploadReport:
    """Upload every ingested file this server has no record of; returns what happened.

    Never raises for a file that cannot be uploaded: one the server refuses for its content
    is recorded in file_upload_rejection (``rejected``) and not sent again while unchanged,
    unless ``retry_rejected``; the others are counted in ``failures``. When the server
    becomes unavailable, stops sending, records what did succeed and returns with
    ``aborted`` set. Only the calling thread uses ``conn``.
    """
    concurrency = max(1, int(concurrency))
    records = UploadRecords(
        conn, Tables(schemas), client.server_url, client.kind, retry_rejected=retry_rejected
    )
    upload = _UploadRun(records, client, concurrency, run_id, task_run_id, log)
    report = upload.report
    counts = records.count_pending()
    report.pending_at_start, report.already_recorded = counts.pending, counts.recorded
    report.rejected_before = counts.rejected_before
    upload.progress.total = report.pending_at_start
    log(
        f"{report.pending_at_start} file(s) to upload to {client.server_url} ({client.kind}), "
        f"{report.already_recorded} already recorded there, {report.rejected_before} refused "
        f"by it before and unchanged (not sent); {concurrency} uploads at a time"
    )
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dicom-upload")
    try:
        upload.run(executor)
    finally:
        # Also on an interrupt or an unexpected error: let the requests already sent finish
        # (cancelling queued ones) and record every upload that did succeed.
        for future in upload.in_flight:
            future.cancel()
        executor.shutdown(wait=True)
        upload.collect(list(upload.in_flight))
        upload.record_done()
        report.seconds = time.monotonic() - upload.started

    if report.aborted is not None:
        remaining = records.count_pending().pending
        report.not_attempted = max(0, remaining - report.failed)
    elif report.dicomweb_root:
        report.series_with_wadors_uri += records.set_missing_wadors_uris(report.dicomweb_root)
    return report
