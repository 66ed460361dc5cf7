"""The ingest core without Dagster: batches are atomic, a failed run leaves whole batches, a
re-run completes the folder exactly as one clean run would, overlapping runs do not collide.

Real PostgreSQL and real files; a batch is made to fail for real by a CHECK constraint the
test adds to one of the tables (a user's constraint, a trigger or a full disk look the same
to the writer), and the constraint is dropped to "fix the cause"."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import psycopg
import pydicom
import pytest
from psycopg import sql
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import PersonMapping
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES_DIR / "CT_small.dcm"
BATCH = 3
NEW_PRIVATE_TAG = 0x00771001  # only in a file of the failing batch
NEW_PRIVATE_TAG_TEXT = "(0077,1001)"

MAIN = Schemas()
CLEAN = Schemas(cdm="clean_cdm", vocab="clean_vocab", medical_imaging="clean_mi")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _write(target: Path, study: str, series: str, description: str, private: bool = False) -> str:
    ds = _read(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDescription = description
    if private:
        block = ds.private_block(0x0077, "TEST WRITER CREATOR", create=True)
        block.add_new(0x01, "LO", "only in the failing batch")
        assert NEW_PRIVATE_TAG in ds
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target)
    return str(ds.SOPInstanceUID)


class Folder:
    """Six files, three per batch: batch 1 holds study T1 (series S1, S2), batch 2 study T2 (S3)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.study = {"T1": generate_uid(), "T2": generate_uid()}
        self.series = {"S1": generate_uid(), "S2": generate_uid(), "S3": generate_uid()}
        plan = [
            ("f0", "T1", "S1"),
            ("f1", "T1", "S1"),
            ("f2", "T1", "S2"),
            ("f3", "T2", "S3"),
            ("f4", "T2", "S3"),
            ("f5", "T2", "S3"),
        ]
        self.sop: dict[str, str] = {}
        self.path: dict[str, str] = {}
        for name, study, series in plan:
            path = root / f"{name}.dcm"
            self.sop[name] = _write(
                path, self.study[study], self.series[series], f"study {study}", private=name == "f5"
            )
            self.path[name] = str(path)
        self.batch1 = ["f0", "f1", "f2"]
        self.batch2 = ["f3", "f4", "f5"]


def _setup(conn: psycopg.Connection, schemas: Schemas) -> None:
    ensure_tables(conn, schemas)


def _run(
    conn: psycopg.Connection,
    schemas: Schemas,
    root: Path,
    workers: int = 1,
    batch_size: int = BATCH,
    run_id: str = "run",
):
    warnings_seen: list[str] = []
    state = prepare_run(
        conn,
        schemas,
        run_id,
        "use_id_zero",
        PersonMapping(
            schemas.medical_imaging, "mappingtable", "source_person_id", "source_patient_id"
        ),
        warnings_seen.append,
    )
    return ingest_folder(conn, state, root, batch_size, workers)[0]


def _count(conn, schemas: Schemas, table: str) -> int:
    schema = schemas.cdm if table == "procedure_occurrence" else schemas.medical_imaging
    return scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table)))


def _counts(conn, schemas: Schemas) -> dict[str, int]:
    return {
        t: _count(conn, schemas, t)
        for t in (
            "procedure_occurrence",
            "image_occurrence",
            "dicom_file_metadata",
            "dicom_ingest_log",
            "dicom_data_element",
        )
    }


# The stage of write_batch at which the second batch fails, and the constraint that makes it fail.
FAILURES = {
    "procedure_occurrence": (
        "cdm",
        "procedure_occurrence",
        "procedure_source_value IS DISTINCT FROM 'study T2'",
    ),
    "image_occurrence": ("mi", "image_occurrence", "image_series_uid IS DISTINCT FROM {S3}"),
    "dicom_file_metadata": ("mi", "dicom_file_metadata", "sop_instance_id IS DISTINCT FROM {f4}"),
    "dicom_ingest_log": ("mi", "dicom_ingest_log", "file_path IS DISTINCT FROM {f4_path}"),
}


def _poison(conn, folder: Folder, stage: str) -> sql.Composed:
    schema_kind, table, condition = FAILURES[stage]
    schema = MAIN.cdm if schema_kind == "cdm" else MAIN.medical_imaging
    check = sql.SQL(condition).format(
        S3=sql.Literal(folder.series["S3"]),
        f4=sql.Literal(folder.sop["f4"]),
        f4_path=sql.Literal(folder.path["f4"]),
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT test_poison CHECK ({})").format(
            sql.Identifier(schema, table), check
        )
    )
    return sql.SQL("ALTER TABLE {} DROP CONSTRAINT test_poison").format(
        sql.Identifier(schema, table)
    )


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage,workers",
    [
        ("procedure_occurrence", 1),
        ("image_occurrence", 1),
        ("dicom_file_metadata", 1),
        ("dicom_ingest_log", 1),
        ("dicom_file_metadata", 2),
    ],
)
def test_failing_batch_leaves_whole_batches_and_rerun_completes(db, tmp_path, stage, workers):
    folder = Folder(tmp_path / "dicom")
    _setup(db, MAIN)
    _setup(db, CLEAN)
    fix = _poison(db, folder, stage)

    with pytest.raises(psycopg.errors.CheckViolation):
        _run(db, MAIN, folder.root, workers=workers, run_id="failing")
    assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    mi = MAIN.medical_imaging
    # Batch 1: everything, committed.
    ledger = dict(db.execute(f"SELECT file_path, status FROM {mi}.dicom_ingest_log").fetchall())
    assert ledger == {folder.path[n]: "ingested" for n in folder.batch1}
    for name in folder.batch1:
        assert scalar(
            db,
            f"SELECT count(*) FROM {mi}.dicom_file_metadata WHERE sop_instance_id = %s",
            [folder.sop[name]],
        ) == expected_metadata_rows(Path(folder.path[name]))
    series = {r[0] for r in db.execute(f"SELECT image_series_uid FROM {mi}.image_occurrence")}
    assert series == {folder.series["S1"], folder.series["S2"]}
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 1
    assert scalar(db, f"SELECT count(*) FROM {mi}.dicom_file_metadata") == sum(
        expected_metadata_rows(Path(folder.path[n])) for n in folder.batch1
    )
    # Batch 2: nothing at all, not even the dictionary entry of its new private tag.
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {mi}.dicom_file_metadata WHERE sop_instance_id = ANY(%s)",
            [[folder.sop[n] for n in folder.batch2]],
        )
        == 0
    )
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {mi}.dicom_data_element WHERE data_element_tag = %s",
            [NEW_PRIVATE_TAG_TEXT],
        )
        == 0
    )
    assert_ids_consistent(db, MAIN)

    # Fix the cause, run again: the same rows as one clean run (done here in other schemas).
    db.execute(fix)
    report = _run(db, MAIN, folder.root, workers=workers, run_id="rerun")
    assert (report.files_already_done, report.status_counts["ingested"]) == (
        len(folder.batch1),
        len(folder.batch2),
    )
    clean_report = _run(db, CLEAN, folder.root, workers=1, run_id="clean")
    assert clean_report.status_counts["ingested"] == 6

    assert _counts(db, MAIN) == _counts(db, CLEAN)
    main, clean = table_content(db, MAIN), table_content(db, CLEAN)
    for part in main:
        assert main[part] == clean[part], f"{part} differs from a clean run"
    assert (
        len(main["ledger"]) == 6
        and len(main["image_occurrence"]) == 3
        and len(main["procedure_occurrence"]) == 2
    )
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {mi}.dicom_data_element WHERE data_element_tag = %s",
            [NEW_PRIVATE_TAG_TEXT],
        )
        == 1
    )
    assert_ids_consistent(db, MAIN)
    assert_ids_consistent(db, CLEAN)
    # Ids of the re-run come after every id ever handed out, never reused.
    first_batch_max = scalar(
        db,
        f"SELECT max(metadata_id) FROM {mi}.dicom_file_metadata WHERE sop_instance_id = ANY(%s)",
        [[folder.sop[n] for n in folder.batch1]],
    )
    assert (
        scalar(
            db,
            f"SELECT min(metadata_id) FROM {mi}.dicom_file_metadata WHERE sop_instance_id = ANY(%s)",
            [[folder.sop[n] for n in folder.batch2]],
        )
        > first_batch_max
    )


def test_rerun_after_success_writes_nothing(db, tmp_path):
    folder = Folder(tmp_path / "dicom")
    _setup(db, MAIN)
    first = _run(db, MAIN, folder.root)
    assert first.status_counts["ingested"] == 6
    before = table_content(db, MAIN)
    ids = db.execute(
        "SELECT max(metadata_id), count(*) FROM cdmmedicalimaging.dicom_file_metadata"
    ).fetchone()
    second = _run(db, MAIN, folder.root)
    assert second.files_already_done == 6 and sum(second.status_counts.values()) == 0
    assert table_content(db, MAIN) == before
    assert (
        db.execute(
            "SELECT max(metadata_id), count(*) FROM cdmmedicalimaging.dicom_file_metadata"
        ).fetchone()
        == ids
    )


def test_overlapping_runs_write_what_one_run_writes(database_url, db, tmp_path):
    """Two runs over the same folder at the same time (two connections, small batches)."""
    folder = tmp_path / "test_files"
    shutil.copytree(TEST_FILES_DIR, folder)
    # Every file twice (same SOP instances at other paths): duplicates across runs and batches.
    shutil.copytree(TEST_FILES_DIR, tmp_path / "test_files" / "zz_again")
    _setup(db, MAIN)
    _setup(db, CLEAN)
    clean = _run(db, CLEAN, folder, batch_size=7, run_id="clean")

    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(run_id: str) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait()
                _run(conn, MAIN, folder, batch_size=7, run_id=run_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"run{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert clean.status_counts["duplicate"] > 100

    assert _counts(db, MAIN) == _counts(db, CLEAN)
    main, clean_rows = table_content(db, MAIN), table_content(db, CLEAN)
    for part in main:
        assert main[part] == clean_rows[part], f"{part} differs from a single run"
    assert_ids_consistent(db, MAIN)
    # Both runs really took part.
    assert scalar(db, "SELECT count(DISTINCT run_id) FROM cdmmedicalimaging.dicom_ingest_log") == 2
