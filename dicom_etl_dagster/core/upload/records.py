"""Every statement of the upload domain: what is pending, what was stored, wadors_uri.

What to upload comes from the ingest ledger: every ``dicom_ingest_log`` row with status
``ingested`` whose SOP Instance UID has no ``file_upload_metadata`` row for this server, and
whose path has no ``file_upload_rejection`` row for it with the ledger's size and mtime (a
file the server refused is not sent again until it changes and is ingested again, unless
the run retries rejected files). Successful uploads and rejections are recorded in short
transactions of their own together with the series' ``wadors_uri``, so a run that stops
half-way keeps every upload it made and records none it did not.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from dicom_etl_dagster.core.db.tables import Tables, column_names, take_advisory_lock

#: Ledger rows fetched per query while walking the pending files.
PAGE_SIZE = 1000

UPLOAD_COLUMNS = (
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
OPTIONAL_COLUMNS = ("server_kind", "file_size")

_NOT_UPLOADED = (
    "FROM {ledger} l WHERE l.status = 'ingested' AND l.sop_instance_uid IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM {uploads} u WHERE u.server_url = %(server)s"
    " AND u.sop_instance_id = l.sop_instance_uid)"
)
# Refused by this server as the ledger has the file now (same size and mtime); when the run
# retries rejected files, nothing is held back.
_REJECTED_UNCHANGED = (
    "(NOT %(retry)s AND EXISTS (SELECT 1 FROM {rejections} r WHERE r.server_url = %(server)s"
    " AND r.file_path = l.file_path AND r.file_size IS NOT DISTINCT FROM l.file_size"
    " AND r.file_mtime_ns IS NOT DISTINCT FROM l.file_mtime_ns))"
)
_COUNTS = (
    "SELECT count(*) FILTER (WHERE NOT held), count(*) FILTER (WHERE held)"
    " FROM (SELECT " + _REJECTED_UNCHANGED + " AS held " + _NOT_UPLOADED + ") AS not_uploaded"
)
_PENDING_PAGE = (
    "SELECT l.ingest_log_id, l.file_path AS path, l.file_size AS size,"
    " l.file_mtime_ns AS mtime_ns, l.sop_instance_uid, l.image_occurrence_id "
    + _NOT_UPLOADED
    + " AND NOT "
    + _REJECTED_UNCHANGED
    + " AND l.ingest_log_id > %(after)s ORDER BY l.ingest_log_id LIMIT %(limit)s"
)
_RECORD_REJECTION = (
    "INSERT INTO {rejections} (server_url, file_path, server_kind, sop_instance_uid, file_size,"
    " file_mtime_ns, http_status, reason, times_rejected, first_rejected_at, rejected_at, run_id)"
    " VALUES (%(server)s, %(path)s, %(kind)s, %(sop)s, %(size)s, %(mtime_ns)s, %(status)s,"
    " %(reason)s, 1, %(at)s, %(at)s, %(run_id)s)"
    " ON CONFLICT (server_url, file_path) DO UPDATE SET server_kind = EXCLUDED.server_kind,"
    " sop_instance_uid = EXCLUDED.sop_instance_uid, file_size = EXCLUDED.file_size,"
    " file_mtime_ns = EXCLUDED.file_mtime_ns, http_status = EXCLUDED.http_status,"
    " reason = EXCLUDED.reason, times_rejected = {rejections}.times_rejected + 1,"
    " rejected_at = EXCLUDED.rejected_at, run_id = EXCLUDED.run_id"
)
_WADORS_URI = "%(root)s || '/studies/' || image_study_uid || '/series/' || image_series_uid"


@dataclass(frozen=True)
class PendingFile:
    ingest_log_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sop_instance_uid: str
    image_occurrence_id: int


class PendingCounts(NamedTuple):
    """Ingested files as this server's records see them at the start of a run."""

    pending: int  # to send
    recorded: int  # stored there before (a file_upload_metadata row)
    rejected_before: int  # refused by it before and unchanged since: held back


@dataclass(frozen=True)
class Rejection:
    """One file the server refused for its content, as file_upload_rejection records it."""

    item: PendingFile
    http_status: int | None
    reason: str
    rejected_at: dt.datetime


@dataclass(frozen=True)
class UploadRecord:
    """One stored instance, as file_upload_metadata records it."""

    item: PendingFile
    instance_id: str
    uploaded_filename: str
    bytes_sent: int
    uploaded_at: dt.datetime


class UploadRecords:
    """The ledger and file_upload_metadata as the uploader sees them, for one server."""

    def __init__(
        self,
        conn: psycopg.Connection,
        tables: Tables,
        server_url: str,
        kind: str,
        retry_rejected: bool = False,
    ):
        self._conn = conn
        self._tables = tables
        self._server_url = server_url
        self._kind = kind
        self._retry_rejected = retry_rejected
        self._names = {
            "ledger": tables["dicom_ingest_log"],
            "uploads": tables["file_upload_metadata"],
            "images": tables["image_occurrence"],
            "rejections": tables["file_upload_rejection"],
        }
        self.columns = self._writable_columns()

    def _writable_columns(self) -> tuple[str, ...]:
        """All of ours, less the optional ones an existing (original plugin's) table lacks."""
        present = column_names(
            self._conn, self._tables.schemas.medical_imaging, "file_upload_metadata"
        )
        return tuple(c for c in UPLOAD_COLUMNS if c in present or c not in OPTIONAL_COLUMNS)

    def count_pending(self) -> PendingCounts:
        """Ingested files to send, recorded for this server, and held back as rejected."""
        params = {"server": self._server_url, "retry": self._retry_rejected}
        row = self._conn.execute(sql.SQL(_COUNTS).format(**self._names), params).fetchone()
        pending, held = (0, 0) if row is None else (int(row[0]), int(row[1]))
        ingested = self._scalar(
            # Not the rows of archives: their members are the files (``core/ingest/archives``).
            sql.SQL(
                "SELECT count(*) FROM {ledger} WHERE status = 'ingested'"
                " AND sop_instance_uid IS NOT NULL"
            ),
            {},
        )
        return PendingCounts(pending, ingested - pending - held, held)

    def _scalar(self, query: sql.SQL, params: dict) -> int:
        row = self._conn.execute(query.format(**self._names), params).fetchone()
        return 0 if row is None else int(row[0])

    def iter_pending(self, page_size: int = PAGE_SIZE) -> Iterator[PendingFile]:
        """Ledger rows to upload, in ledger order, a page at a time (keyset on ingest_log_id).

        Each page is read when the previous one has been handed out, so rows recorded in the
        meantime (by this run or an overlapping one) are left out of later pages.
        """
        query = sql.SQL(_PENDING_PAGE).format(**self._names)
        cursor = self._conn.cursor(row_factory=class_row(PendingFile))
        after = -1
        while True:
            params = {
                "server": self._server_url,
                "retry": self._retry_rejected,
                "after": after,
                "limit": page_size,
            }
            rows = cursor.execute(query, params).fetchall()
            if not rows:
                return
            yield from rows
            after = rows[-1].ingest_log_id

    def record(
        self,
        records: Sequence[UploadRecord],
        run_id: str,
        task_run_id: str,
        dicomweb_root: str | None,
        rejections: Sequence[Rejection] = (),
    ) -> tuple[int, int]:
        """Record the uploads, their series' wadors_uri and the rejections in one short
        transaction.

        Returns (rows written, series whose wadors_uri changed). Under a transaction-level
        advisory lock, an instance already recorded for this server (by an overlapping run)
        is not recorded again; this works on a table created by the original plugin too,
        which has no unique index to lean on. A stored file loses its rejection row; a file
        refused again keeps its one row, with the newest reason and one more rejection.
        """
        insert = sql.SQL(
            "INSERT INTO {uploads} (file_upload_id, {columns})"
            " SELECT nextval({seq}::regclass), {values} WHERE NOT EXISTS"
            " (SELECT 1 FROM {uploads} WHERE server_url = %s AND sop_instance_id = %s)"
        ).format(
            uploads=self._names["uploads"],
            columns=sql.SQL(", ").join(map(sql.Identifier, self.columns)),
            seq=sql.Literal(self._tables.sequence_text("dicom_etl_file_upload_id_seq", self._conn)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(self.columns)),
        )
        written = series = 0
        with self._conn.transaction(), self._conn.cursor() as cur:
            take_advisory_lock(self._conn, self._tables.upload_lock_key)
            for record in records:
                row = self._row(record, run_id, task_run_id)
                sop = record.item.sop_instance_uid
                cur.execute(insert, [*(row[c] for c in self.columns), self._server_url, sop])
                written += max(cur.rowcount, 0)
            self._record_rejections(cur, records, rejections, run_id)
            if dicomweb_root:
                ids = sorted({r.item.image_occurrence_id for r in records})
                series = self.set_wadors_uri(dicomweb_root, ids)
        return written, series

    def _record_rejections(
        self,
        cur: psycopg.Cursor,
        stored: Sequence[UploadRecord],
        rejections: Sequence[Rejection],
        run_id: str,
    ) -> None:
        if stored:
            cur.execute(
                sql.SQL(
                    "DELETE FROM {rejections} WHERE server_url = %s AND file_path = ANY(%s)"
                ).format(**self._names),
                [self._server_url, [record.item.path for record in stored]],
            )
        statement = sql.SQL(_RECORD_REJECTION).format(**self._names)
        for rejection in rejections:
            item = rejection.item
            params = {
                "server": self._server_url,
                "path": item.path,
                "kind": self._kind,
                "sop": item.sop_instance_uid,
                "size": item.size,
                "mtime_ns": item.mtime_ns,
                "status": rejection.http_status,
                "reason": rejection.reason or "no reason given",
                "at": rejection.rejected_at,
                "run_id": run_id,
            }
            cur.execute(statement, params)

    def _row(self, record: UploadRecord, run_id: str, task_run_id: str) -> dict[str, object]:
        return {
            "task_run_id": task_run_id,
            "flow_run_id": run_id,
            "original_filename": os.path.basename(record.item.path),
            "original_file_path": record.item.path,
            "instance_id": record.instance_id,
            "uploaded_filename": record.uploaded_filename,
            "uploaded_datetime": record.uploaded_at,
            "image_occurrence_id": record.item.image_occurrence_id,
            "sop_instance_id": record.item.sop_instance_uid,
            "server_url": self._server_url,
            "server_kind": self._kind,
            "file_size": record.bytes_sent,
        }

    def set_wadors_uri(self, root: str, image_occurrence_ids: Sequence[int]) -> int:
        """Point each series at ``{root}/studies/{study}/series/{series}``; returns rows changed."""
        uri = sql.SQL(_WADORS_URI)
        statement = sql.SQL(
            "UPDATE {images} SET wadors_uri = {uri} WHERE image_occurrence_id = ANY(%(ids)s)"
            " AND wadors_uri IS DISTINCT FROM {uri}"
        ).format(images=self._names["images"], uri=uri)
        params = {"root": root.rstrip("/"), "ids": list(image_occurrence_ids)}
        return self._conn.execute(statement, params).rowcount

    def set_missing_wadors_uris(self, root: str) -> int:
        """Series uploaded to this server before its DICOMweb root was known, without a wadors_uri."""
        rows = self._conn.execute(
            sql.SQL(
                "SELECT i.image_occurrence_id FROM {images} i WHERE i.wadors_uri IS NULL"
                " AND EXISTS (SELECT 1 FROM {uploads} u WHERE u.server_url = %s"
                " AND u.image_occurrence_id = i.image_occurrence_id)"
            ).format(**self._names),
            [self._server_url],
        ).fetchall()
        ids = [row[0] for row in rows]
        return self.set_wadors_uri(root, ids) if ids else 0


def newest_wadors_uri(conn: psycopg.Connection, tables: Tables) -> str | None:
    """The newest series' wadors_uri (a backward walk of the primary key, not a scan)."""
    row = conn.execute(
        sql.SQL(
            "SELECT wadors_uri FROM {} WHERE wadors_uri IS NOT NULL"
            " ORDER BY image_occurrence_id DESC LIMIT 1"
        ).format(tables["image_occurrence"])
    ).fetchone()
    return None if row is None else str(row[0])
