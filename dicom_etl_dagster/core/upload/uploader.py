"""Upload ingested files to a DICOM server and record each upload in file_upload_metadata.

No Dagster here. What to upload comes from the ingest ledger: every ``dicom_ingest_log``
row with status ``ingested`` whose SOP Instance UID has no ``file_upload_metadata`` row for
this server. Files are sent by a bounded pool of threads (HTTP uploads wait on the network,
not the CPU); only the calling thread talks to the database. Successful uploads are
recorded in small batches, each in its own short transaction together with the series'
``wadors_uri``, so a run that stops half-way keeps every upload it made and records none
it did not. Re-running uploads exactly what is missing; a unique index on
(server_url, sop_instance_id) keeps overlapping runs from recording an instance twice.

The client (``UploadClient``) is any object with the attributes and ``upload`` method
below; ``core.upload.clients`` has the Orthanc and DICOMweb ones.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas

#: Ledger rows fetched per query while walking the pending files.
PAGE_SIZE = 1000
#: Successful uploads recorded per transaction (and at least every RECORD_EVERY_SECONDS).
RECORD_BATCH_SIZE = 50
RECORD_EVERY_SECONDS = 2.0
#: How often a long upload reports its progress.
PROGRESS_EVERY_SECONDS = 30.0
MAX_FAILURES_KEPT = 1000


class UploadError(Exception):
    """Base of the upload errors; messages are one line, name the file, carry no credentials."""


class FileRejectedError(UploadError):
    """The server refused this one file (HTTP 4xx, STOW-RS failure); other files may go on."""


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


@dataclass(frozen=True)
class PendingFile:
    ingest_log_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sop_instance_uid: str
    image_occurrence_id: int


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
    aborted: str | None = None  # why the run stopped early (server unavailable)
    not_attempted: int = 0  # files left for the next run after an abort

    @property
    def files_sent(self) -> int:
        return self.uploaded + self.already_present

    def files_per_second(self) -> float:
        return round(self.files_sent / self.seconds, 1) if self.seconds else 0.0


def _tables(schemas: Schemas) -> dict[str, sql.Identifier]:
    mi = schemas.medical_imaging
    return {
        "ledger": sql.Identifier(mi, "dicom_ingest_log"),
        "uploads": sql.Identifier(mi, "file_upload_metadata"),
        "images": sql.Identifier(mi, "image_occurrence"),
        "seq": sql.Identifier(mi, "dicom_etl_file_upload_id_seq"),
    }


_NOT_UPLOADED = (
    "FROM {ledger} l WHERE l.status = 'ingested' AND l.sop_instance_uid IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM {uploads} u WHERE u.server_url = %(server)s"
    " AND u.sop_instance_id = l.sop_instance_uid)"
)


def count_pending(conn: psycopg.Connection, schemas: Schemas, server_url: str) -> tuple[int, int]:
    """(ingested files not yet on this server, ingested files already recorded for it)."""
    t = _tables(schemas)
    pending = conn.execute(
        sql.SQL("SELECT count(*) " + _NOT_UPLOADED).format(**t), {"server": server_url}
    ).fetchone()[0]
    ingested = conn.execute(
        sql.SQL("SELECT count(*) FROM {ledger} WHERE status = 'ingested'").format(**t)
    ).fetchone()[0]
    return pending, ingested - pending


def iter_pending(
    conn: psycopg.Connection, schemas: Schemas, server_url: str, page_size: int = PAGE_SIZE
) -> Iterator[PendingFile]:
    """Ledger rows to upload, in ledger order, a page at a time (keyset on ingest_log_id).

    Each page is read when the previous one has been handed out, so rows recorded in the
    meantime (by this run or an overlapping one) are left out of later pages.
    """
    t = _tables(schemas)
    query = sql.SQL(
        "SELECT l.ingest_log_id, l.file_path, l.file_size, l.file_mtime_ns, l.sop_instance_uid,"
        " l.image_occurrence_id " + _NOT_UPLOADED + " AND l.ingest_log_id > %(after)s"
        " ORDER BY l.ingest_log_id LIMIT %(limit)s"
    ).format(**t)
    after = -1
    while True:
        rows = conn.execute(
            query, {"server": server_url, "after": after, "limit": page_size}
        ).fetchall()
        if not rows:
            return
        for row in rows:
            yield PendingFile(*row)
        after = rows[-1][0]


def _check_unchanged(item: PendingFile) -> str | None:
    """Why this file cannot be uploaded as ingested, or None if it is still the ingested file."""
    try:
        stat = os.stat(item.path)
    except FileNotFoundError:
        return "file no longer exists"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or type(exc).__name__}"
    if (
        item.size is not None
        and item.mtime_ns is not None
        and (stat.st_size, stat.st_mtime_ns) != (item.size, item.mtime_ns)
    ):
        return "file changed since it was ingested; run ingest_metadata again first"
    return None


@dataclass(frozen=True)
class _Done:
    item: PendingFile
    stored: StoredInstance
    uploaded_at: dt.datetime


def _upload_one(client: UploadClient, item: PendingFile) -> _Done:
    reason = _check_unchanged(item)
    if reason:
        raise FileRejectedError(f"{item.path}: {reason}")
    stored = client.upload(item.path, item.sop_instance_uid)
    return _Done(item, stored, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))


_UPLOAD_COLUMNS = (
    "task_run_id",
    "flow_run_id",
    "original_filename",
    "original_file_path",
    "instance_id",
    "uploaded_filename",
    "uploaded_datetime",
    "image_occurrence_id",
    "sop_instance_id",
    "server_url",
    "server_kind",
    "file_size",
)
#: Columns this ETL adds to the original plugin's table; a table created by the original has none.
_OPTIONAL_COLUMNS = ("server_kind", "file_size")


def upload_columns(conn: psycopg.Connection, schemas: Schemas) -> tuple[str, ...]:
    """The columns to write: all of ours, less the optional ones an existing table lacks."""
    present = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = 'file_upload_metadata'",
            [schemas.medical_imaging],
        )
    }
    return tuple(c for c in _UPLOAD_COLUMNS if c in present or c not in _OPTIONAL_COLUMNS)


def _record(
    conn: psycopg.Connection,
    schemas: Schemas,
    report: UploadReport,
    done: list[_Done],
    run_id: str,
    task_run_id: str,
    columns: tuple[str, ...],
) -> None:
    """One short transaction: the upload rows and the wadors_uri of their series.

    Under a transaction-level advisory lock, an instance already recorded for this server
    (by an overlapping run) is not recorded again; this works on a table created by the
    original plugin too, which has no unique index to lean on.
    """
    if not done:
        return
    t = _tables(schemas)
    insert = sql.SQL(
        "INSERT INTO {uploads} (file_upload_id, {columns}) SELECT nextval({seq}::regclass), {values}"
        " WHERE NOT EXISTS (SELECT 1 FROM {uploads} WHERE server_url = %s AND sop_instance_id = %s)"
    ).format(
        uploads=t["uploads"],
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        seq=sql.Literal(t["seq"].as_string(conn)),
        values=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('dicom_etl_dagster.file_upload_metadata'))"
        )
        with conn.cursor() as cur:
            for d in done:
                row = {
                    "task_run_id": task_run_id,
                    "flow_run_id": run_id,
                    "original_filename": os.path.basename(d.item.path),
                    "original_file_path": d.item.path,
                    "instance_id": d.stored.instance_id,
                    "uploaded_filename": d.stored.uploaded_filename,
                    "uploaded_datetime": d.uploaded_at,
                    "image_occurrence_id": d.item.image_occurrence_id,
                    "sop_instance_id": d.item.sop_instance_uid,
                    "server_url": report.server_url,
                    "server_kind": report.kind,
                    "file_size": d.stored.bytes_sent,
                }
                cur.execute(
                    insert, [*(row[c] for c in columns), report.server_url, d.item.sop_instance_uid]
                )
                report.recorded += max(cur.rowcount, 0)
        if report.dicomweb_root:
            report.series_with_wadors_uri += set_wadors_uri(
                conn,
                schemas,
                report.dicomweb_root,
                sorted({d.item.image_occurrence_id for d in done}),
            )


def set_wadors_uri(
    conn: psycopg.Connection, schemas: Schemas, root: str, image_occurrence_ids: list[int]
) -> int:
    """Point each series at ``{root}/studies/{study}/series/{series}``; returns rows changed."""
    t = _tables(schemas)
    uri = sql.SQL("%(root)s || '/studies/' || image_study_uid || '/series/' || image_series_uid")
    return conn.execute(
        sql.SQL(
            "UPDATE {images} SET wadors_uri = {uri} WHERE image_occurrence_id = ANY(%(ids)s)"
            " AND wadors_uri IS DISTINCT FROM {uri}"
        ).format(images=t["images"], uri=uri),
        {"root": root.rstrip("/"), "ids": image_occurrence_ids},
    ).rowcount


def set_missing_wadors_uris(
    conn: psycopg.Connection, schemas: Schemas, server_url: str, root: str
) -> int:
    """Series uploaded to this server earlier (before its DICOMweb root was known) without a wadors_uri."""
    t = _tables(schemas)
    ids = [
        row[0]
        for row in conn.execute(
            sql.SQL(
                "SELECT i.image_occurrence_id FROM {images} i WHERE i.wadors_uri IS NULL AND EXISTS"
                " (SELECT 1 FROM {uploads} u WHERE u.server_url = %s AND u.image_occurrence_id = i.image_occurrence_id)"
            ).format(**t),
            [server_url],
        ).fetchall()
    ]
    return set_wadors_uri(conn, schemas, root, ids) if ids else 0


def upload_pending(
    conn: psycopg.Connection,
    schemas: Schemas,
    client: UploadClient,
    run_id: str,
    task_run_id: str,
    concurrency: int = 4,
    log: Callable[[str], None] = lambda message: None,
) -> UploadReport:
    """Upload every ingested file this server has no record of; returns what happened.

    Never raises for a file the server rejects (it is counted in ``failures``); when the
    server becomes unavailable, stops sending, records what did succeed and returns with
    ``aborted`` set. Only the calling thread uses ``conn``.
    """
    concurrency = max(1, int(concurrency))
    report = UploadReport(
        server_url=client.server_url, kind=client.kind, dicomweb_root=client.dicomweb_root()
    )
    report.pending_at_start, report.already_recorded = count_pending(
        conn, schemas, client.server_url
    )
    log(
        f"{report.pending_at_start} file(s) to upload to {client.server_url} ({client.kind}), "
        f"{report.already_recorded} already recorded there; {concurrency} uploads at a time"
    )

    columns = upload_columns(conn, schemas)
    done: list[_Done] = []
    last_record = time.monotonic()
    started = last_progress = time.monotonic()
    in_flight: dict[Future, PendingFile] = {}
    pending = iter_pending(conn, schemas, client.server_url)
    exhausted = False

    def collect(futures) -> None:
        for future in futures:
            item = in_flight.pop(future)
            if future.cancelled():
                continue
            try:
                result = future.result()
            except FileRejectedError as exc:
                report.failed += 1
                if len(report.failures) < MAX_FAILURES_KEPT:
                    report.failures.append((item.path, str(exc)))
            except ServerUnavailableError as exc:
                if report.aborted is None:
                    report.aborted = str(exc)
                report.not_attempted += 1
            else:
                done.append(result)
                report.bytes_sent += result.stored.bytes_sent
                if result.stored.already_present:
                    report.already_present += 1
                else:
                    report.uploaded += 1

    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dicom-upload")
    try:
        while True:
            # Keep the pool busy (twice as many queued as threads) without reading ahead further.
            while not exhausted and report.aborted is None and len(in_flight) < 2 * concurrency:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                in_flight[executor.submit(_upload_one, client, item)] = item
            if not in_flight:
                break
            finished, _ = wait(
                list(in_flight), timeout=RECORD_EVERY_SECONDS, return_when=FIRST_COMPLETED
            )
            collect(finished)
            if time.monotonic() - last_progress >= PROGRESS_EVERY_SECONDS:
                last_progress = time.monotonic()
                log(
                    f"{report.files_sent} of {report.pending_at_start} file(s) sent, {report.failed} failed, "
                    f"{report.bytes_sent} bytes, {report.files_sent / (last_progress - started):.1f} files/s"
                )
            if done and (
                len(done) >= RECORD_BATCH_SIZE
                or time.monotonic() - last_record >= RECORD_EVERY_SECONDS
            ):
                _record(conn, schemas, report, done, run_id, task_run_id, columns)
                done, last_record = [], time.monotonic()
    finally:
        # Also on an interrupt or an unexpected error: let the requests already sent finish
        # (cancelling queued ones) and record every upload that did succeed.
        for future in in_flight:
            future.cancel()
        executor.shutdown(wait=True)
        collect(list(in_flight))
        _record(conn, schemas, report, done, run_id, task_run_id, columns)
        report.seconds = time.monotonic() - started

    if report.aborted is not None:
        remaining, _ = count_pending(conn, schemas, client.server_url)
        report.not_attempted = max(0, remaining - report.failed)
    elif report.dicomweb_root:
        report.series_with_wadors_uri += set_missing_wadors_uris(
            conn, schemas, client.server_url, report.dicomweb_root
        )
    return report
