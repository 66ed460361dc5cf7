"""The ingest core without Dagster: batches are atomic, a failed run leaves whole batches, a
re-run completes the folder exactly as one clean run would, overlapping runs do not collide.

Real PostgreSQL and real files; a batch is made to fail for real by a CHECK constraint the
test adds to one of the tables (a user's constraint, a trigger or a full disk look the same
to the writer), and the constraint is dropped to "fix the cause"."""

from __future__ import annotations

import shutil
import threading
import warnings
from collections import Counter
from pathlib import Path

import psycopg
import pydicom
import pytest
from psycopg import sql
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.analytics.concepts import MeasurementConcepts
from dicom_etl_dagster.core.analytics.rows import MEASUREMENT_ID_FIELD_CONCEPT_ID
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.tables import Tables, take_advisory_lock, take_keyed_locks
from dicom_etl_dagster.core.ingest.data_elements import entries_arbitrated
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import COLUMNS as METADATA_COLUMNS
from dicom_etl_dagster.core.ingest.metadata_copy import TIMESTAMP_COLUMNS
from dicom_etl_dagster.core.ingest.parse_pool import Parsed, parse_file
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import PersonMapping, metadata_columns
from dicom_etl_dagster_tests import analytics_samples as samples
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES_DIR / "CT_small.dcm"
BATCH = 3
NEW_PRIVATE_TAG = 0x00771001  # only in a file of the failing batch
NEW_PRIVATE_TAG_TEXT = "(0077,xx01)"  # its entry: per creator, any block
NEW_PRIVATE_CREATOR = "TEST WRITER CREATOR"

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
        block = ds.private_block(0x0077, NEW_PRIVATE_CREATOR, create=True)
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
    cdm_tables = ("procedure_occurrence", "measurement")
    schema = schemas.cdm if table in cdm_tables else schemas.medical_imaging
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
            "measurement",
            "image_feature",
            "dicom_etl_feature_source",
        )
    }


def _expected_analytics(conn, schemas: Schemas) -> tuple[Counter, Counter]:
    """What one run must have written, from the files themselves (parsed again here):
    the acquisition measurements (series, keyword, value) of the first instance of every
    series, and the SR NUM items + SEG segments of every ingested instance, by SOP."""
    mi = schemas.medical_imaging
    first_files = conn.execute(
        f"SELECT DISTINCT ON (i.image_series_uid) i.image_series_uid, l.file_path"
        f" FROM {mi}.dicom_ingest_log l JOIN {mi}.image_occurrence i USING (image_occurrence_id)"
        f" WHERE l.status = 'ingested' ORDER BY i.image_series_uid, l.ingest_log_id"
    ).fetchall()
    ingested = [
        r[0]
        for r in conn.execute(
            f"SELECT file_path FROM {mi}.dicom_ingest_log WHERE status = 'ingested'"
        ).fetchall()
    ]
    parsed: dict[str, Parsed] = {}
    for path in {*ingested, *(p for _, p in first_files)}:
        result = parse_file(FileEntry(path, 0, 0))
        assert isinstance(result, Parsed), path
        parsed[path] = result
    # A coded (CS) value is written only when the vocabulary has a concept for it.
    concepts = MeasurementConcepts(conn, Tables(schemas))
    values = [v for _, path in first_files for v in parsed[path].findings.acquisition]
    concepts.prepare((), [(v.tag, v.text) for v in values if v.number is None], ())
    acquisition = Counter(
        (series, v.keyword, v.text)
        for series, path in first_files
        for v in parsed[path].findings.acquisition
        if v.number is not None or concepts.value(v.tag, v.text).source
    )
    findings: Counter = Counter()
    for path in ingested:
        p = parsed[path]
        for kind, rows in (("numeric", p.findings.numeric), ("segment", p.findings.segments)):
            if rows:
                findings[(p.instance.sop_instance_uid, kind)] = len(rows)
    return acquisition, findings


def _written_analytics(conn, schemas: Schemas) -> tuple[Counter, Counter]:
    """The acquisition measurements (series, keyword, value) and the SR / SEG rows by SOP
    and kind (numeric: an SR NUM item's measurement, segment: a SEG segment's feature)."""
    mi, cdm = schemas.medical_imaging, schemas.cdm
    acquisition = Counter(
        conn.execute(
            f"SELECT i.image_series_uid, m.measurement_source_value, m.value_source_value"
            f" FROM {cdm}.measurement m JOIN {mi}.image_feature f"
            f" ON f.image_feature_event_field_concept_id = {MEASUREMENT_ID_FIELD_CONCEPT_ID}"
            f" AND f.image_feature_event_id = m.measurement_id"
            f" JOIN {mi}.image_occurrence i USING (image_occurrence_id)"
            f" WHERE NOT EXISTS (SELECT 1 FROM {mi}.dicom_etl_feature_source s"
            f" WHERE s.image_feature_id = f.image_feature_id)"
        ).fetchall()
    )
    rows = conn.execute(
        f"SELECT sop_instance_uid, CASE WHEN measurement_id IS NULL THEN 'segment'"
        f" ELSE 'numeric' END, count(*) FROM {mi}.dicom_etl_feature_source GROUP BY 1, 2"
    ).fetchall()
    findings = Counter({(sop, kind): n for sop, kind, n in rows})
    return acquisition, findings


def _add_analytics_files(folder: Path) -> dict[str, str]:
    """A TID 1500 report, a dose SR and a SEG over CT_small; their SOP Instance UIDs."""
    ct = _read(CT_SMALL)
    paths = {
        "report": samples.write_measurement_report(folder, ct),
        "dose": samples.write_ct_dose_report(folder, ct),
        "seg": samples.write_segmentation(folder, [ct]),
    }
    return {name: str(_read(path).SOPInstanceUID) for name, path in paths.items()}


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


@pytest.mark.parametrize("table_has_the_default", [True, False])
def test_a_batchs_metadata_rows_carry_the_start_of_its_transaction(
    db, tmp_path, table_has_the_default
):
    """The ETL's table fills etl_created_datetime and etl_modified_datetime itself, so its
    COPY leaves them out; a table without that default (a user's) is sent the same value."""
    folder = Folder(tmp_path / "dicom")
    _setup(db, MAIN)
    table = "cdmmedicalimaging.dicom_file_metadata"
    if not table_has_the_default:
        for column in TIMESTAMP_COLUMNS:
            db.execute(f"ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT")
    copied = metadata_columns(db, Tables(MAIN))
    assert copied == (METADATA_COLUMNS[:-2] if table_has_the_default else METADATA_COLUMNS)
    before = scalar(db, "SELECT LOCALTIMESTAMP")
    assert _run(db, MAIN, folder.root).status_counts["ingested"] == 6
    after = scalar(db, "SELECT LOCALTIMESTAMP")
    stamps = dict(
        db.execute(
            f"SELECT sop_instance_id, array_agg(DISTINCT (etl_created_datetime,"
            f" etl_modified_datetime)::text) FROM {table} GROUP BY sop_instance_id"
        ).fetchall()
    )
    assert all(len(pair) == 1 for pair in stamps.values()), "a file's rows differ"
    batch_stamps = [
        {stamps[folder.sop[f]][0] for f in batch} for batch in (folder.batch1, folder.batch2)
    ]
    assert all(len(s) == 1 for s in batch_stamps) and batch_stamps[0] != batch_stamps[1]
    created = db.execute(
        f"SELECT DISTINCT etl_created_datetime FROM {table} WHERE etl_created_datetime = etl_modified_datetime"
    ).fetchall()
    assert len(created) == 2 and all(before < c < after for (c,) in created)


def test_overlapping_runs_write_what_one_run_writes(database_url, db, tmp_path):
    """Two runs over the same folder at the same time (two connections, small batches), with
    measurements: acquisition parameters once per series, SR / SEG rows once per instance."""
    folder = tmp_path / "test_files"
    shutil.copytree(TEST_FILES_DIR, folder)
    sops = _add_analytics_files(folder / "analytics")
    # Every file twice (same SOP instances at other paths): duplicates across runs and batches.
    shutil.copytree(TEST_FILES_DIR, tmp_path / "test_files" / "zz_again")
    assert _add_analytics_files(folder / "zz_again" / "analytics") == sops
    # A series whose instances are spread over the whole folder (file names sort among the
    # others'): a run adds instances to a series the other run created, and writes no
    # acquisition measurement for it again.
    study, series = generate_uid(), generate_uid()
    for where in (folder, folder / "zz_again"):
        for letter in "BHMRWcfkpsx":
            _write(where / f"{letter}_one_series.dcm", study, series, "one series")
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
    assert_ids_consistent(db, CLEAN)
    # Both runs really took part.
    assert scalar(db, "SELECT count(DISTINCT run_id) FROM cdmmedicalimaging.dicom_ingest_log") == 2

    # Exactly what the files hold, once: not only the same as the clean run.
    acquisition, findings = _expected_analytics(db, CLEAN)
    assert _written_analytics(db, MAIN) == _written_analytics(db, CLEAN) == (acquisition, findings)
    numeric_items = sum(len(g.measurements) for g in samples.MEASUREMENT_GROUPS)
    dose_items = 2 + 2 * len(samples.DOSE_EVENTS)  # accumulated count and DLP total, per event 2
    ours = {
        (sops["report"], "numeric"): numeric_items,
        (sops["dose"], "numeric"): dose_items,
        (sops["seg"], "segment"): len(samples.SEGMENTS),
    }
    assert {key: findings[key] for key in ours} == ours
    assert {sop for sop, _ in findings} >= set(sops.values())
    numeric = sum(n for (_, kind), n in findings.items() if kind == "numeric")
    segments = sum(n for (_, kind), n in findings.items() if kind == "segment")
    for schemas in (MAIN, CLEAN):
        counts = _counts(db, schemas)
        assert counts["measurement"] == sum(acquisition.values()) + numeric
        assert counts["image_feature"] == counts["measurement"] + segments
        assert counts["dicom_etl_feature_source"] == numeric + segments
    assert sum(acquisition.values()) > 100 and len({s for s, _, _ in acquisition}) > 20
    # The report's and the segmentation's rows are about CT_small's series.
    ct_series = str(_read(CT_SMALL).SeriesInstanceUID)
    mi = MAIN.medical_imaging
    about = db.execute(
        f"SELECT s.sop_instance_uid, i.image_series_uid, count(*) FROM {mi}.dicom_etl_feature_source s"
        f" JOIN {mi}.image_feature f USING (image_feature_id)"
        f" JOIN {mi}.image_occurrence i USING (image_occurrence_id)"
        " WHERE s.sop_instance_uid = ANY(%s) GROUP BY 1, 2",
        [[sops["report"], sops["seg"]]],
    ).fetchall()
    assert sorted(about) == sorted(
        [
            (sops["report"], ct_series, numeric_items),
            (sops["seg"], ct_series, len(samples.SEGMENTS)),
        ]
    )


def test_a_batch_waits_only_for_batches_deciding_about_its_series(database_url, db, tmp_path):
    """Another run's batch holds the keyed lock of series S (as while it writes S's first
    files): a batch of other series is written meanwhile without waiting; a batch that would
    create S waits for it (here: until lock_timeout), and is written once the lock is gone."""
    _setup(db, MAIN)
    # Entries for CT_small's tags exist first: a batch that adds entries takes the schema lock.
    study = generate_uid()
    _write(tmp_path / "first" / "f.dcm", study, generate_uid(), "first")
    _run(db, MAIN, tmp_path / "first")
    other, blocked = generate_uid(), generate_uid()
    for i in range(3):
        _write(tmp_path / "other" / f"o{i}.dcm", study, other, "other series")
        _write(tmp_path / "blocked" / f"b{i}.dcm", generate_uid(), blocked, "blocked series")
    key = Tables(MAIN).ingest_lock_key
    with psycopg.connect(database_url) as holder, psycopg.connect(database_url) as writer:
        take_keyed_locks(holder, key, [f"series:{blocked}"])
        writer.autocommit = True
        writer.execute("SET lock_timeout = '2s'")
        report = _run(writer, MAIN, tmp_path / "other")
        assert report.status_counts == Counter({"ingested": 3})
        assert report.batches_rewritten_under_lock == 0
        with pytest.raises(psycopg.errors.LockNotAvailable):
            _run(writer, MAIN, tmp_path / "blocked")
        assert _count(db, MAIN, "dicom_ingest_log") == 4  # the waiting batch wrote nothing
        holder.rollback()
        assert _run(writer, MAIN, tmp_path / "blocked").status_counts == Counter({"ingested": 3})
    assert _count(db, MAIN, "image_occurrence") == 3
    assert _count(db, MAIN, "dicom_ingest_log") == 7


def _entry_ids(conn, schemas: Schemas, tag: str) -> list[int]:
    query = sql.SQL(
        "SELECT data_element_id FROM {} WHERE data_element_tag = %s AND private_creator = %s"
    ).format(sql.Identifier(schemas.medical_imaging, "dicom_data_element"))
    return [row[0] for row in conn.execute(query, [tag, NEW_PRIVATE_CREATOR])]


def _metadata_entry_ids(conn, schemas: Schemas, sop: str) -> set[int]:
    """The entries the instance's rows of the new private element point at."""
    query = sql.SQL(
        "SELECT DISTINCT data_element_id FROM {} WHERE sop_instance_id = %s"
        " AND metadata_source_tag = %s AND private_creator = %s"
    ).format(sql.Identifier(schemas.medical_imaging, "dicom_file_metadata"))
    return {row[0] for row in conn.execute(query, [sop, "(0077,1001)", NEW_PRIVATE_CREATOR])}


def _file_needing_a_new_entry(db, folder: Path) -> str:
    """MAIN set up with CT_small's entries, and in ``folder / "new"`` one file whose private
    element has no entry yet; returns its SOP Instance UID."""
    _setup(db, MAIN)
    _write(folder / "first" / "f.dcm", generate_uid(), generate_uid(), "first")
    _run(db, MAIN, folder / "first")
    return _write(folder / "new" / "n.dcm", generate_uid(), generate_uid(), "new", private=True)


def _add_new_entry(conn) -> int:
    """The new private element's entry, as another batch adds it (uncommitted until the
    caller commits); returns its id."""
    return scalar(
        conn,
        sql.SQL(
            "INSERT INTO {} (data_element_id, data_element_tag, private_creator, is_private,"
            " is_retired, etl_created_datetime, etl_modified_datetime)"
            " VALUES (nextval(%s::regclass), %s, %s, true, false, now(), now())"
            " RETURNING data_element_id"
        ).format(sql.Identifier(MAIN.medical_imaging, "dicom_data_element")),
        [
            f"{MAIN.medical_imaging}.dicom_etl_data_element_id_seq",
            NEW_PRIVATE_TAG_TEXT,
            NEW_PRIVATE_CREATOR,
        ],
    )


def _run_blocked(writer, root: Path) -> tuple[threading.Thread, list]:
    """A run of ``root`` in a thread, checked to be waiting after 1.5 s; the list receives
    its report once it ends."""
    reports: list = []
    thread = threading.Thread(target=lambda: reports.append(_run(writer, MAIN, root)))
    thread.start()
    thread.join(1.5)
    assert thread.is_alive()
    return thread, reports


def test_a_batch_adding_entries_waits_for_no_other_batch(database_url, db, tmp_path):
    """Another run's batch holds its keyed locks (the schema's lock in shared mode): a batch
    that needs a new dicom_data_element entry adds it under the table's unique indexes and is
    written meanwhile, without the schema's exclusive lock (here: within lock_timeout)."""
    sop = _file_needing_a_new_entry(db, tmp_path)
    with psycopg.connect(database_url) as holder, psycopg.connect(database_url) as writer:
        take_keyed_locks(holder, Tables(MAIN).ingest_lock_key, [f"series:{generate_uid()}"])
        writer.autocommit = True
        writer.execute("SET lock_timeout = '2s'")
        report = _run(writer, MAIN, tmp_path / "new")
        holder.rollback()
    assert report.status_counts == Counter({"ingested": 1})
    assert report.batches_rewritten_under_lock == 0
    entries = _entry_ids(db, MAIN, NEW_PRIVATE_TAG_TEXT)
    assert len(entries) == 1
    assert _metadata_entry_ids(db, MAIN, sop) == set(entries)


def test_two_batches_adding_one_entry_add_it_once(database_url, db, tmp_path):
    """A batch needs an entry another batch has added but not committed: it waits for that
    batch only, then uses its entry (one entry, the rows point at it); if that batch had
    rolled back, it would add the entry itself."""
    sop = _file_needing_a_new_entry(db, tmp_path)
    with psycopg.connect(database_url) as other, psycopg.connect(database_url) as writer:
        other_id = _add_new_entry(other)
        writer.autocommit = True
        thread, reports = _run_blocked(writer, tmp_path / "new")  # on the other's entry
        other.commit()
        thread.join(30)
    assert reports[0].status_counts == Counter({"ingested": 1})
    assert _entry_ids(db, MAIN, NEW_PRIVATE_TAG_TEXT) == [other_id]
    assert _metadata_entry_ids(db, MAIN, sop) == {other_id}


def test_a_table_without_unique_entry_keys_adds_entries_under_the_schema_lock(db):
    """Only an owned table's two unique indexes on the entry key let batches add entries
    without the exclusive lock; without one (a user's table), ``entries_arbitrated`` is false."""
    _setup(db, MAIN)
    tables = Tables(MAIN)
    assert entries_arbitrated(db, tables, per_creator=True)
    assert not entries_arbitrated(db, tables, per_creator=False)
    db.execute(
        sql.SQL("DROP INDEX {}").format(
            sql.Identifier(MAIN.medical_imaging, "idx_dicom_data_element_private")
        )
    )
    assert not entries_arbitrated(db, tables, per_creator=True)


def test_a_batch_adding_entries_never_holds_one_a_batch_under_the_schema_lock_waits_for(
    database_url, db, tmp_path
):
    """A batch under the schema's exclusive lock adds an entry that an optimistic batch needs
    too: the optimistic batch waits for that lock before it adds any entry, so the exclusive
    batch never waits for it (which would be a deadlock: each waiting for the other)."""
    sop = _file_needing_a_new_entry(db, tmp_path)
    with psycopg.connect(database_url) as exclusive, psycopg.connect(database_url) as writer:
        take_advisory_lock(exclusive, Tables(MAIN).ingest_lock_key)
        writer.autocommit = True
        thread, reports = _run_blocked(writer, tmp_path / "new")  # on the exclusive lock
        exclusive.execute("SET lock_timeout = '3s'")  # what a deadlock would cost, and more
        exclusive_id = _add_new_entry(exclusive)
        exclusive.commit()
        thread.join(30)
    assert reports and reports[0].status_counts == Counter({"ingested": 1})
    assert _entry_ids(db, MAIN, NEW_PRIVATE_TAG_TEXT) == [exclusive_id]
    assert _metadata_entry_ids(db, MAIN, sop) == {exclusive_id}
