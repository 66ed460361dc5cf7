"""Ingest a folder: scan, skip what the ledger says is done, parse in workers, write batches."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.file_scan import FileEntry, iter_files
from dicom_etl_dagster.core.ingest.metadata_copy import DataElementIds
from dicom_etl_dagster.core.ingest.parse_pool import parse_batches
from dicom_etl_dagster.core.ingest.writer import IngestReport, PersonMapping, RunState, write_batch


class IngestSetupError(Exception):
    """The run cannot start (mapping table unusable, folder missing); the message says why."""


def _exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return (
        conn.execute(
            "SELECT to_regclass(%s)", [sql.Identifier(schema, table).as_string(conn)]
        ).fetchone()[0]
        is not None
    )


def resolve_mapping(
    conn: psycopg.Connection, mapping: PersonMapping, policy: str, warn: Callable[[str], None]
) -> PersonMapping | None:
    """The mapping table if usable; None (everyone -> person 0) only under use_id_zero."""
    where = f"{mapping.schema}.{mapping.table}"
    if not _exists(conn, mapping.schema, mapping.table):
        if policy == "skip":
            raise IngestSetupError(
                f"person_to_patient_mapping table {where} does not exist "
                "(missing_person_id_options: skip needs it)"
            )
        warn(f"person_to_patient_mapping table {where} does not exist: every file gets person_id 0")
        return None
    columns = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            [mapping.schema, mapping.table],
        )
    }
    missing = [c for c in (mapping.person_column, mapping.patient_column) if c not in columns]
    if missing:
        raise IngestSetupError(
            f"person_to_patient_mapping table {where} has no column {', '.join(missing)}"
        )
    return mapping


def prepare_run(
    conn: psycopg.Connection,
    schemas: Schemas,
    run_id: str,
    policy: str,
    mapping: PersonMapping,
    warn: Callable[[str], None],
) -> RunState:
    data_elements = DataElementIds(
        conn.execute(
            sql.SQL("SELECT data_element_tag, data_element_id FROM {}").format(
                sql.Identifier(schemas.medical_imaging, "dicom_data_element")
            )
        ).fetchall()
    )
    if not data_elements:
        warn(
            "dicom_data_element is empty: run load_vocab first so that tags get their dictionary entries"
        )
    return RunState(
        schemas=schemas,
        run_id=run_id,
        missing_person_policy=policy,
        mapping=resolve_mapping(conn, mapping, policy, warn),
        concepts=ConceptResolver(conn, schemas),
        data_elements=data_elements,
    )


def _unchanged_paths(
    conn: psycopg.Connection, schemas: Schemas, batch: list[FileEntry]
) -> set[str]:
    """Paths the ledger holds as ingested/duplicate with the same size and mtime: nothing to do."""
    rows = conn.execute(
        sql.SQL(
            "SELECT file_path, file_size, file_mtime_ns FROM {} WHERE status <> 'failed'"
            " AND file_path = ANY(%s)"
        ).format(sql.Identifier(schemas.medical_imaging, "dicom_ingest_log")),
        [[e.path for e in batch]],
    ).fetchall()
    done = {path: (size, mtime) for path, size, mtime in rows}
    return {e.path for e in batch if done.get(e.path) == (e.size, e.mtime_ns)}


def ingest_folder(
    conn: psycopg.Connection,
    state: RunState,
    root: Path,
    batch_size: int,
    workers: int,
    progress: Callable[[IngestReport], None] | None = None,
    changed_window: tuple[int | None, int | None] = (None, None),
) -> tuple[IngestReport, Counter]:
    """Ingest every regular file under ``root``; returns the report and seconds per stage.

    ``changed_window`` (after, until], in ns of inode change time, restricts the run to the
    files a sensor batch stands for; None ends are open.
    """
    if not root.is_dir():
        raise IngestSetupError(f"dicom_files_abs_path {root} is not a folder")
    report = IngestReport()
    seconds: Counter = Counter()

    after, until = changed_window

    def in_window(e: FileEntry) -> bool:
        return (after is None or e.ctime_ns > after) and (until is None or e.ctime_ns <= until)

    def pending_batches() -> Iterator[list[FileEntry]]:
        files = filter(in_window, iter_files(root))
        while True:
            started = time.perf_counter()
            batch = list(itertools.islice(files, batch_size))
            if not batch:
                return
            report.files_seen += len(batch)
            done = _unchanged_paths(conn, state.schemas, batch)
            report.files_already_done += len(done)
            seconds["scan and ledger lookup"] += time.perf_counter() - started
            todo = [e for e in batch if e.path not in done]
            if todo:
                yield todo

    outcomes_per_batch = parse_batches(pending_batches(), workers)
    while True:
        started = time.perf_counter()
        outcomes = next(outcomes_per_batch, None)
        seconds["parse (waiting on workers)"] += time.perf_counter() - started
        if outcomes is None:
            break
        started = time.perf_counter()
        report.merge(write_batch(conn, state, outcomes))
        seconds["database write"] += time.perf_counter() - started
        if progress:
            progress(report)
    # Scanning happens inside the wait for parsed batches; count it once.
    seconds["parse (waiting on workers)"] = max(
        0.0, seconds["parse (waiting on workers)"] - seconds["scan and ledger lookup"]
    )
    return report, seconds
