"""ingest_metadata against a real PostgreSQL and real DICOM files (pydicom's samples and
variants of them written with pydicom into tmp_path). Nothing is mocked; expected values
are computed independently with plain pydicom."""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.dicom_samples import clone_instance as make_instance
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.dicom_samples import quiet_dcmread as read
from dicom_etl_dagster_tests.helpers import ledger, options, run_job
from dicom_etl_dagster_tests.private_samples import expected_entry_tag

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES_DIR / "CT_small.dcm"
RTPLAN = TEST_FILES_DIR / "rtplan.dcm"
# Written out here rather than imported, so the tests do not trust the product module.
CHEST_DICOM_CONCEPT_ID = 2128009433
STATUSES = {"ingested", "duplicate", "failed"}

MI = "cdmmedicalimaging"
TABLES = (
    f"{MI}.dicom_ingest_log",
    f"{MI}.dicom_file_metadata",
    f"{MI}.image_occurrence",
    f"{MI}.image_feature",
    f"{MI}.dicom_data_element",
    f"{MI}.file_upload_metadata",
    "cdmdefault.procedure_occurrence",
    "cdmdefault.person",
    "cdmvocab.concept",
    "cdmvocab.concept_relationship",
    "cdmvocab.vocabulary",
    "cdmvocab.concept_class",
)


# --------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------
@pytest.fixture
def vocab_url(database_url) -> str:
    """A fresh database with the DICOM vocabulary and data dictionary loaded."""
    assert run_job("load_vocab", database_url, options()).success
    return database_url


def ingest(database_url: str, folder: Path, raise_on_error: bool = True, **overrides):
    overrides.setdefault("parse_workers", 1)
    return run_job(
        "ingest_metadata",
        database_url,
        options(dicom_files_abs_path=str(folder), **overrides),
        raise_on_error=raise_on_error,
    )


def file_metadata(result, asset: str = "dicom_file_metadata") -> dict:
    found = [
        m
        for m in result.asset_materializations_for_node("ingest_dicom_folder")
        if m.asset_key.to_user_string() == asset
    ]
    assert len(found) == 1, f"expected one materialization of {asset}, got {found}"
    return {key: value.value for key, value in found[0].metadata.items()}


def step_failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the run was expected to fail with a step failure"
    return failures[0].step_failure_data.error.message


def table_counts(db) -> dict[str, int | None]:
    counts = {}
    for table in TABLES:
        exists = scalar(db, "SELECT to_regclass(%s)", [table]) is not None
        counts[table] = scalar(db, f"SELECT count(*) FROM {table}") if exists else None
    return counts


def metadata_count(db, sop: str) -> int:
    return scalar(
        db, f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s", [sop]
    )


def _date(value) -> dt.date | None:
    """A DA value as a date: YYYYMMDD, or the old ACR-NEMA YYYY.MM.DD (PS3.5 6.2 note)."""
    text = str(value or "").strip()
    for fmt, length in (("%Y%m%d", 8), ("%Y.%m.%d", 10)):
        if len(text) == length and text.isascii() and text.replace(".", "").isdigit():
            try:
                return dt.datetime.strptime(text, fmt).date()
            except ValueError:
                return None
    return None


def first_date(ds, keywords) -> dt.date | None:
    for keyword in keywords:
        value = ds.get(keyword)
        if keyword == "AcquisitionDateTime":  # a DT: its first 8 characters are the date
            value = str(value or "").strip()[:8]
        date = _date(value)
        if date:
            return date
    return None


IMAGE_DATE_ORDER = (
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyDate",
    "AcquisitionDateTime",
    "InstanceCreationDate",
)


def scan_order(root: Path) -> list[Path]:
    """Every regular file under root, in the order a depth-first, sorted walk meets them."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [Path(folder) / name for name in sorted(files)]
    return found


def image_row(db, series_uid: str):
    return db.execute(
        f"SELECT image_occurrence_id, person_id, procedure_occurrence_id, anatomic_site_concept_id,"
        f" modality_concept_id, image_occurrence_date, local_path, image_study_uid"
        f" FROM {MI}.image_occurrence WHERE image_series_uid = %s",
        [series_uid],
    ).fetchall()


def procedure_row(db, procedure_occurrence_id: int):
    return db.execute(
        "SELECT person_id, procedure_date, procedure_source_value, procedure_type_concept_id, procedure_concept_id"
        " FROM cdmdefault.procedure_occurrence WHERE procedure_occurrence_id = %s",
        [procedure_occurrence_id],
    ).fetchone()


# --------------------------------------------------------------------------
# 1. Every pydicom sample file
# --------------------------------------------------------------------------
def test_all_pydicom_sample_files(vocab_url, db, tmp_path):
    folder = tmp_path / "test_files"
    shutil.copytree(TEST_FILES_DIR, folder)
    files = scan_order(folder)
    assert len(files) == sum(1 for p in TEST_FILES_DIR.rglob("*") if p.is_file()) > 100

    result = ingest(vocab_url, folder, parse_workers=2, ingest_batch_size=25)
    assert result.success

    log = ledger(db)
    assert set(log) == {str(p) for p in files}, "every file path has exactly one ledger row"
    statuses = collections.Counter(row[0] for row in log.values())
    assert set(statuses) <= STATUSES
    for path, (status, reason, *_rest) in log.items():
        if status == "failed":
            assert reason and reason.strip(), f"failed without reason: {path}"
        else:
            assert reason is None, f"{status} row with an error message: {path}: {reason}"

    # Independent view of every file, with plain pydicom.
    datasets = {}
    for path in files:
        try:
            datasets[path] = read(path)
        except Exception:
            assert log[str(path)][0] == "failed", path
    for path, ds in datasets.items():
        has_uids = all(
            str(ds.get(k, "") or "").strip()
            for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        )
        if not has_uids or first_date(ds, IMAGE_DATE_ORDER) is None:
            assert log[str(path)][0] == "failed", (
                f"{path} lacks UIDs or dates but is {log[str(path)][0]}"
            )

    ingested = [p for p in files if log[str(p)][0] == "ingested"]
    duplicates = [p for p in files if log[str(p)][0] == "duplicate"]
    assert ingested and duplicates
    metadata_total = scalar(db, f"SELECT count(*) FROM {MI}.dicom_file_metadata")

    sop_of = {p: str(datasets[p].SOPInstanceUID).strip() for p in ingested + duplicates}
    for path in ingested + duplicates:
        assert log[str(path)][2] == sop_of[path], f"ledger SOP differs from pydicom's for {path}"

    # Metadata rows: exactly the independent count, per ingested SOP instance.
    mismatches = {}
    expected_total = 0
    for path in ingested:
        expected = expected_metadata_rows(path)
        expected_total += expected
        got = metadata_count(db, sop_of[path])
        if got != expected:
            mismatches[path.name] = (got, expected)
    assert not mismatches, f"dicom_file_metadata rows (got, expected) per file: {mismatches}"
    assert metadata_total == expected_total, "rows that belong to no ingested SOP instance"
    pixel_rows = scalar(
        db,
        f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE metadata_source_tag IN"
        " ('(7FE0,0010)', '(7FE0,0008)', '(7FE0,0009)')",
    )
    assert pixel_rows == 0

    # Duplicates: the same SOP as an ingested file met earlier in the walk.
    ingested_sops = collections.Counter(sop_of[p] for p in ingested)
    assert max(ingested_sops.values()) == 1, "a SOP instance ingested twice"
    for path in duplicates:
        holders = [p for p in ingested if sop_of[p] == sop_of[path]]
        assert len(holders) == 1, f"duplicate {path} has no ingested twin"
        assert files.index(holders[0]) < files.index(path), f"{path} ingested after its duplicate"
        assert log[str(path)][3] == log[str(holders[0])][3], (
            "duplicate points at another image_occurrence"
        )

    # Series and studies: one row each, with the right keys.
    series_files = collections.defaultdict(list)
    for path in ingested:
        series_files[str(datasets[path].SeriesInstanceUID).strip()].append(path)
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence") == len(series_files)
    studies = {(str(datasets[p].StudyInstanceUID).strip(), 0) for p in ingested}
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == len(studies)
    assert (
        set(
            db.execute(
                "SELECT DISTINCT i.image_study_uid, p.person_id FROM cdmdefault.procedure_occurrence p"
                f" JOIN {MI}.image_occurrence i USING (procedure_occurrence_id)"
            ).fetchall()
        )
        == studies
    )
    for uid, paths in series_files.items():
        rows = image_row(db, uid)
        assert len(rows) == 1, uid
        io_id, person_id, _po, _site, _mod, image_date, local_path, _study = rows[0]
        assert person_id == 0
        assert image_date in {first_date(datasets[p], IMAGE_DATE_ORDER) for p in paths}
        assert local_path in {str(p.parent) for p in paths}
        for path in paths:
            assert log[str(path)][3] == io_id
            assert (
                scalar(
                    db,
                    f"SELECT DISTINCT image_occurrence_id FROM {MI}.dicom_file_metadata"
                    " WHERE sop_instance_id = %s",
                    [sop_of[path]],
                )
                == io_id
            )

    md = file_metadata(result)
    assert (md["files_seen"], md["files_ingested"], md["files_duplicate"], md["files_failed"]) == (
        len(files),
        statuses["ingested"],
        statuses["duplicate"],
        statuses["failed"],
    )
    assert md["rows_written"] == expected_total

    reasons = collections.Counter(
        reason.split(":")[0] for status, reason, *_ in log.values() if status == "failed"
    )
    print(
        f"\n{len(files)} files: {dict(statuses)}; {expected_total} metadata rows,"
        f" {len(series_files)} series, {len(studies)} studies"
    )
    for reason, n in reasons.most_common():
        print(f"  failed x{n}: {reason}")
    for path, (status, reason, *_rest) in sorted(log.items()):
        if status == "failed":
            print(f"    {Path(path).relative_to(folder)}: {reason}")


# --------------------------------------------------------------------------
# 2. Nested sequences and private tags
# --------------------------------------------------------------------------
def _sequences_have_no_empty_items(dataset) -> bool:
    for elem in dataset:
        if elem.VR == "SQ":
            for item in elem.value:
                if len(item) == 0 or not _sequences_have_no_empty_items(item):
                    return False
    return True


def test_nested_sequences_point_at_their_parents(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(RTPLAN, folder / "rtplan.dcm")
    ds = read(RTPLAN)
    assert _sequences_have_no_empty_items(ds)
    sop = str(ds.SOPInstanceUID)
    ingest(vocab_url, folder)
    assert ledger(db)[str(folder / "rtplan.dcm")][0] == "ingested"

    rows = db.execute(
        f"SELECT metadata_id, metadata_source_tag, is_sequence, sequence_length, parent_sequence_id,"
        f" parent_dataset_id, sop_instance_id FROM {MI}.dicom_file_metadata"
    ).fetchall()
    by_id = {r[0]: r for r in rows}
    assert len(by_id) == len(rows) == expected_metadata_rows(RTPLAN)
    nested = [r for r in rows if r[4] is not None]
    assert nested, "rtplan.dcm has nested sequences"
    for r in rows:
        assert r[6] == sop
        assert (r[4] is None) == (r[5] is None), (
            f"row {r} has only one of parent_sequence_id/parent_dataset_id"
        )
        if r[4] is not None:
            parent = by_id.get(r[4])
            assert parent is not None and parent[2] is True and parent[6] == sop, r
    sequence_of_dataset = collections.defaultdict(set)
    for r in nested:
        sequence_of_dataset[r[5]].add(r[4])
    assert all(len(s) == 1 for s in sequence_of_dataset.values()), (
        "rows of one item under two sequences"
    )
    datasets_of_sequence = collections.defaultdict(set)
    for dataset_id, (sequence_id,) in sequence_of_dataset.items():
        datasets_of_sequence[sequence_id].add(dataset_id)
    sequences = [r for r in rows if r[2]]
    for r in sequences:
        assert r[3] == len(datasets_of_sequence.get(r[0], ())), f"sequence {r[1]} length vs items"

    # Independent shape: top-level sequences and their lengths, the deepest nesting.
    top = {f"({e.tag.group:04X},{e.tag.element:04X})": len(e.value) for e in ds if e.VR == "SQ"}
    assert {r[1]: r[3] for r in sequences if r[4] is None} == top

    def depth(dataset) -> int:
        return max(
            (1 + max((depth(i) for i in e.value), default=0) for e in dataset if e.VR == "SQ"),
            default=0,
        )

    def db_depth(row) -> int:
        level = 0
        while row[4] is not None:
            row = by_id[row[4]]
            level += 1
        return level

    assert max(db_depth(r) for r in sequences) + 1 == depth(ds)
    # Distinct items never share a dataset id.
    assert len({r[5] for r in nested}) == sum(r[3] for r in sequences)


def test_private_tags_are_recorded_once(vocab_url, db, tmp_path):
    first = tmp_path / "first"
    ds = make_instance(CT_SMALL, first / "ct.dcm")
    private = {f"({e.tag.group:04X},{e.tag.element:04X})" for e in ds if e.tag.is_private}
    assert private
    entries_query = f"SELECT data_element_tag, private_creator FROM {MI}.dicom_data_element"
    known_before = set(db.execute(entries_query).fetchall())
    assert not {tag for tag, _ in known_before} & private
    ingest(vocab_url, first)

    rows = db.execute(
        f"SELECT metadata_source_tag, is_private, private_creator, data_element_id FROM {MI}.dicom_file_metadata"
        " WHERE sop_instance_id = %s",
        [str(ds.SOPInstanceUID)],
    ).fetchall()
    private_rows = [r for r in rows if r[1]]
    assert {r[0] for r in private_rows} == private
    assert all(not r[1] for r in rows if r[0] not in private)
    # Creator of (0009,10xx) is the value of (0009,0010), and so on.
    for r in private_rows:
        group, element = int(r[0][1:5], 16), int(r[0][6:10], 16)
        if element >= 0x1000:
            creator_tag = (group << 16) | (element >> 8)
            assert r[2] == str(ds[creator_tag].value).strip(), r
        assert isinstance(r[2], str) and r[2], f"private row without creator: {r}"
    assert all(r[3] is not None for r in rows), "a row without data_element_id"

    # Exactly the entries the dictionary lacked were added: the file meta group that
    # DICOM2OMOP's part 6 table does not list, and the private elements per creator.
    on_disk = read(first / "ct.dcm")
    in_file = {f"({e.tag.group:04X},{e.tag.element:04X})" for e in [*on_disk.file_meta, *on_disk]}
    per_creator = {(expected_entry_tag(r[0]), r[2]) for r in private_rows}
    added = set(db.execute(entries_query).fetchall()) - known_before
    assert added == {(t, None) for t in in_file - private} - known_before | per_creator
    entries = {
        (tag, creator): data_element_id
        for tag, creator, data_element_id in db.execute(
            f"SELECT data_element_tag, private_creator, data_element_id FROM {MI}.dicom_data_element"
            " WHERE is_private"
        ).fetchall()
    }
    assert set(entries) == per_creator
    pointed = {r[0]: r[3] for r in private_rows}
    assert pointed == {r[0]: entries[(expected_entry_tag(r[0]), r[2])] for r in private_rows}

    # A second folder with the same private tags (another instance): nothing new in the dictionary.
    second = tmp_path / "second"
    ds2 = make_instance(CT_SMALL, second / "ct.dcm")
    count_before = scalar(db, f"SELECT count(*) FROM {MI}.dicom_data_element")
    ingest(vocab_url, second)
    assert ledger(db)[str(second / "ct.dcm")][0] == "ingested"
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_data_element") == count_before
    assert (
        scalar(
            db,
            "SELECT count(*) - count(DISTINCT (data_element_tag, private_creator))"
            f" FROM {MI}.dicom_data_element",
        )
        == 0
    )
    assert (
        dict(
            db.execute(
                f"SELECT metadata_source_tag, data_element_id FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
                " AND is_private",
                [str(ds2.SOPInstanceUID)],
            ).fetchall()
        )
        == pointed
    )


# --------------------------------------------------------------------------
# 3. Re-running adds nothing
# --------------------------------------------------------------------------
def test_rerun_adds_nothing(vocab_url, db, tmp_path):
    folder = tmp_path / "test_files"
    shutil.copytree(TEST_FILES_DIR, folder)
    first = ingest(vocab_url, folder, ingest_batch_size=40)
    first_md = file_metadata(first)
    assert first_md["files_ingested"] > 0
    # Every batch took the ingest lock once; alone, none was rewritten under it.
    held = first_md["ingest_lock_held_seconds_per_batch"]
    assert held["batches"] == math.ceil(first_md["files_seen"] / 40) > 1
    assert 0 < held["mean"] <= held["max"]
    assert first_md["batches_rewritten_under_lock"] == 0
    counts = table_counts(db)
    ids = db.execute(
        f"SELECT max(metadata_id), max(image_occurrence_id) FROM {MI}.dicom_file_metadata"
    ).fetchone()
    ledger_before = {p: r[:2] for p, r in ledger(db).items()}

    second = ingest(vocab_url, folder, ingest_batch_size=40)
    assert second.success
    assert table_counts(db) == counts
    assert (
        db.execute(
            f"SELECT max(metadata_id), max(image_occurrence_id) FROM {MI}.dicom_file_metadata"
        ).fetchone()
        == ids
    )
    assert {p: r[:2] for p, r in ledger(db).items()} == ledger_before
    md = file_metadata(second)
    assert md["files_ingested"] == 0
    assert md["files_duplicate"] == 0
    assert md["files_already_done"] == first_md["files_ingested"] + first_md["files_duplicate"] > 0
    # Failed files are tried again (and fail again).
    assert md["files_failed"] == first_md["files_failed"]
    assert md["files_seen"] == first_md["files_seen"]
    assert md["rows_written"] == 0
    # Only the failed files, tried again, make batches.
    assert md["ingest_lock_held_seconds_per_batch"]["batches"] == math.ceil(md["files_failed"] / 40)
    for asset in ("procedure_occurrence", "image_occurrence", "dicom_ingest_log"):
        assert file_metadata(second, asset)["rows_written"] == (
            md["files_failed"] if asset == "dicom_ingest_log" else 0
        )


# --------------------------------------------------------------------------
# 4. One SOP instance at two paths
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 25], ids=["separate-batches", "same-batch"])
def test_same_sop_instance_at_two_paths(vocab_url, db, tmp_path, batch_size):
    folder = tmp_path / "dicom"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    shutil.copy(CT_SMALL, folder / "a" / "ct.dcm")
    shutil.copy(CT_SMALL, folder / "b" / "copy.dcm")
    sop = str(read(CT_SMALL).SOPInstanceUID)
    result = ingest(vocab_url, folder, ingest_batch_size=batch_size)

    log = ledger(db)
    first, second = log[str(folder / "a" / "ct.dcm")], log[str(folder / "b" / "copy.dcm")]
    assert first[0] == "ingested" and second[0] == "duplicate"
    assert first[2] == second[2] == sop
    assert first[3] == second[3] is not None
    assert metadata_count(db, sop) == expected_metadata_rows(CT_SMALL)
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == expected_metadata_rows(
        CT_SMALL
    )
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence") == 1
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 1
    md = file_metadata(result)
    assert (md["files_ingested"], md["files_duplicate"]) == (1, 1)


# --------------------------------------------------------------------------
# 5. Person mapping
# --------------------------------------------------------------------------
def _create_mapping(db, rows):
    db.execute(
        f"CREATE TABLE {MI}.mappingtable (source_person_id integer, source_patient_id varchar)"
    )
    for person, patient in rows:
        db.execute(f"INSERT INTO {MI}.mappingtable VALUES (%s, %s)", [person, patient])


def _persons_of(db, sop: str):
    return db.execute(
        f"SELECT i.person_id, p.person_id FROM {MI}.dicom_ingest_log l"
        f" JOIN {MI}.image_occurrence i ON i.image_occurrence_id = l.image_occurrence_id"
        " JOIN cdmdefault.procedure_occurrence p ON p.procedure_occurrence_id = i.procedure_occurrence_id"
        " WHERE l.sop_instance_uid = %s AND l.status = 'ingested'",
        [sop],
    ).fetchall()


def test_person_mapping_is_case_insensitive(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    ds = make_instance(CT_SMALL, folder / "ct.dcm")
    patient = str(ds.PatientID)
    assert patient.lower() != patient
    _create_mapping(db, [(42, patient.lower()), (7, "someone-else")])
    ingest(vocab_url, folder, missing_person_id_options="skip")
    assert _persons_of(db, str(ds.SOPInstanceUID)) == [(42, 42)]


@pytest.mark.parametrize("batch_size", [1, 25], ids=["separate-batches", "same-batch"])
def test_missing_person_under_skip_fails_then_recovers(vocab_url, db, tmp_path, batch_size):
    folder = tmp_path / "dicom"
    ds = make_instance(CT_SMALL, folder / "ct.dcm")
    shutil.copy(
        folder / "ct.dcm", folder / "ct_copy.dcm"
    )  # the same instance again: fails the same way
    path, copy, sop, patient = (
        str(folder / "ct.dcm"),
        str(folder / "ct_copy.dcm"),
        str(ds.SOPInstanceUID),
        str(ds.PatientID),
    )
    _create_mapping(db, [(7, "someone-else")])

    result = ingest(
        vocab_url,
        folder,
        raise_on_error=False,
        missing_person_id_options="SKIP",
        ingest_batch_size=batch_size,
    )
    assert not result.success
    log = ledger(db)
    assert set(log) == {path, copy}
    for p in (path, copy):
        status, reason, ledger_sop, io_id = log[p]
        assert status == "failed" and io_id is None and ledger_sop == sop
        assert "missing_person_id_options" in reason
        assert patient.lower() not in reason.lower()
    message = step_failure_message(result)
    assert "missing_person_id_options" in message and patient.lower() not in message.lower()
    for event in result.all_events:
        assert patient.lower() not in (event.message or "").lower(), (
            f"PatientID in a log line: {event.message}"
        )
    assert metadata_count(db, sop) == 0
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence") == 0
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 0
    assert file_metadata(result)["files_failed"] == 2

    db.execute(f"INSERT INTO {MI}.mappingtable VALUES (42, %s)", [patient.lower()])
    again = ingest(
        vocab_url, folder, missing_person_id_options="SKIP", ingest_batch_size=batch_size
    )
    assert again.success
    log = ledger(db)
    status, reason, ledger_sop, io_id = log[path]
    assert (status, reason, ledger_sop) == ("ingested", None, sop) and io_id is not None
    assert log[copy] == ("duplicate", None, sop, io_id)
    assert _persons_of(db, sop) == [(42, 42)]
    assert metadata_count(db, sop) == expected_metadata_rows(folder / "ct.dcm")


@pytest.mark.parametrize("with_table", [True, False], ids=["table-without-row", "no-table"])
def test_missing_person_under_use_id_zero(vocab_url, db, tmp_path, with_table):
    folder = tmp_path / "dicom"
    ds = make_instance(CT_SMALL, folder / "ct.dcm")
    if with_table:
        _create_mapping(db, [(7, "someone-else")])
    result = ingest(vocab_url, folder, missing_person_id_options="Use_Id_Zero")
    assert result.success
    assert ledger(db)[str(folder / "ct.dcm")][0] == "ingested"
    assert _persons_of(db, str(ds.SOPInstanceUID)) == [(0, 0)]


def _without_patient_id(folder: Path, name: str) -> pydicom.Dataset:
    ds = make_instance(CT_SMALL, folder / name)
    del ds.PatientID
    ds.save_as(folder / name)
    return ds


def test_reasons_of_files_without_person_read_as_written(database_url, db, tmp_path):
    """The ledger, the reasons table and the run's failure say it once, in plain words."""
    from dicom_etl_dagster.core.ingest.plan import patient_reference

    folder = tmp_path / "dicom"
    _without_patient_id(folder, "no_id.dcm")
    unmapped = make_instance(CT_SMALL, folder / "unmapped.dcm")
    db.execute(f"CREATE SCHEMA {MI}")
    _create_mapping(db, [(7, "someone-else")])

    result = ingest(database_url, folder, raise_on_error=False, missing_person_id_options="skip")
    assert not result.success
    no_id = "no person: the file has no PatientID (missing_person_id_options: skip)"
    not_mapped = (
        f"no person: patient {patient_reference(str(unmapped.PatientID))} is not in "
        f"{MI}.mappingtable (missing_person_id_options: skip)"
    )
    log = ledger(db)
    assert log[str(folder / "no_id.dcm")][:2] == ("failed", no_id)
    assert log[str(folder / "unmapped.dcm")][:2] == ("failed", not_mapped)
    by_reason = file_metadata(result, "dicom_ingest_log")["failures_by_reason"]
    assert "| no person | 2 |" in by_reason
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert failure.description == (
        "2 file(s) were not ingested for want of a person: "
        f"{no_id}; {not_mapped}. Fix the mapping table (or the files) and re-run: "
        "those files will be ingested then."
    )


def test_a_file_without_patient_id_gets_person_zero_under_use_id_zero(database_url, db, tmp_path):
    folder = tmp_path / "dicom"
    ds = _without_patient_id(folder, "no_id.dcm")
    db.execute(f"CREATE SCHEMA {MI}")
    _create_mapping(db, [(7, "someone-else")])
    assert ingest(database_url, folder, missing_person_id_options="use_id_zero").success
    assert ledger(db)[str(folder / "no_id.dcm")][:2] == ("ingested", None)
    assert _persons_of(db, str(ds.SOPInstanceUID)) == [(0, 0)]


def test_invalid_missing_person_option_is_refused(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    make_instance(CT_SMALL, folder / "ct.dcm")
    result = ingest(vocab_url, folder, raise_on_error=False, missing_person_id_options="drop")
    assert not result.success
    assert "missing_person_id_options" in step_failure_message(result)
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_ingest_log") == 0


# --------------------------------------------------------------------------
# 6. Modality and anatomic-site concepts
# --------------------------------------------------------------------------
def _concept(db, concept_id, name, domain, standard="S", vocabulary="SNOMED", code=None):
    db.execute(
        "INSERT INTO cdmvocab.concept VALUES (%s, %s, %s, %s, 'Test class', %s, %s, '1970-01-01',"
        " '2099-12-31', NULL)",
        [concept_id, name, domain, vocabulary, standard, code or str(concept_id)],
    )


def test_modality_and_anatomic_site_concepts(vocab_url, db, tmp_path):
    _concept(db, 900001, "Computed tomography", "Procedure")
    _concept(db, 900002, "Entire chest", "Spec Anatomic Site")
    # Decoys that the rules exclude: not standard, other domain, other vocabulary.
    _concept(db, 900011, "Computed tomography", "Procedure", standard=None)
    _concept(db, 900012, "Computed tomography", "Observation")
    _concept(db, 900013, "Computed tomography", "Procedure", vocabulary="LOINC")
    _concept(db, 900014, "Entire chest", "Spec Anatomic Site", standard="C")
    _concept(db, 900015, "Entire chest", "Observation")
    _concept(db, 900016, "Entire abdomen", "Spec Anatomic Site", standard=None)

    first = tmp_path / "first"
    cases = {
        "ct_chest": dict(Modality="CT", BodyPartExamined="CHEST"),
        "ct_chest_lower": dict(Modality="ct", BodyPartExamined="chest"),
        "ct_no_body_part": dict(Modality="CT", BodyPartExamined=None),
        "ct_abdomen": dict(Modality="CT", BodyPartExamined="ABDOMEN"),
        "ot": dict(Modality="OT", BodyPartExamined="CHEST"),
        "zz": dict(Modality="ZZ", BodyPartExamined="NOSUCHPART"),
        "no_modality": dict(Modality=None, BodyPartExamined=None),
    }
    written = {
        name: make_instance(CT_SMALL, first / f"{name}.dcm", **attrs)
        for name, attrs in cases.items()
    }
    result = ingest(vocab_url, first)
    assert result.success

    def concepts(name):
        rows = image_row(db, str(written[name].SeriesInstanceUID))
        assert len(rows) == 1, name
        return rows[0][4], rows[0][3]  # modality, anatomic site

    assert concepts("ct_chest") == (900001, 900002)
    assert concepts("ct_chest_lower") == (900001, 900002)
    assert concepts("ct_no_body_part") == (900001, 0)
    assert concepts("ct_abdomen") == (900001, 0)
    assert concepts("ot") == (0, 900002)
    assert concepts("zz") == (0, 0)
    assert concepts("no_modality") == (0, 0)

    # The Maps to target of the DICOM CHEST concept, once it is a standard concept, wins.
    targets = [
        r[0]
        for r in db.execute(
            "SELECT concept_id_2 FROM cdmvocab.concept_relationship WHERE concept_id_1 = %s AND relationship_id = 'Maps to'",
            [CHEST_DICOM_CONCEPT_ID],
        ).fetchall()
    ]
    assert len(targets) == 1
    target = targets[0]
    assert scalar(db, "SELECT count(*) FROM cdmvocab.concept WHERE concept_id = %s", [target]) == 0
    _concept(db, target, "Thoracic structure", "Spec Anatomic Site")

    second = tmp_path / "second"
    ds = make_instance(CT_SMALL, second / "ct_chest.dcm", Modality="CT", BodyPartExamined="CHEST")
    assert ingest(vocab_url, second).success
    (row,) = image_row(db, str(ds.SeriesInstanceUID))
    assert (row[4], row[3]) == (900001, target)
    # The series ingested before keeps the concept it got.
    assert concepts("ct_chest") == (900001, 900002)

    table = file_metadata(result, "image_occurrence")["new_series_by_modality"]
    assert "900001" in table and "900002" in table


# --------------------------------------------------------------------------
# 7. Long StudyDescription
# --------------------------------------------------------------------------
def test_long_study_description_is_cut_in_procedure_only(vocab_url, db, tmp_path):
    description = "Thorax and abdomen with contrast, follow-up, low dose protocol"
    assert 50 < len(description) <= 64  # LO: at most 64 characters
    folder = tmp_path / "dicom"
    ds = make_instance(CT_SMALL, folder / "ct.dcm", StudyDescription=description)
    assert ingest(vocab_url, folder).success
    (row,) = image_row(db, str(ds.SeriesInstanceUID))
    person_id, _date, source_value, type_concept, procedure_concept = procedure_row(db, row[2])
    assert source_value == description[:50]
    assert (type_concept, procedure_concept, person_id) == (32817, 0, 0)
    stored = scalar(
        db,
        f"SELECT metadata_source_value FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
        " AND metadata_source_tag = '(0008,1030)' AND parent_sequence_id IS NULL",
        [str(ds.SOPInstanceUID)],
    )
    assert stored == f'["{description}"]'


# --------------------------------------------------------------------------
# 8. Dates
# --------------------------------------------------------------------------
def test_dates_skip_invalid_values(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    acquisition = make_instance(
        CT_SMALL,
        folder / "a_acquisition.dcm",
        SeriesDate="20231399",
        AcquisitionDate="20220304",
        ContentDate="20200101",
        StudyDate="20210102",
    )
    study_only = make_instance(
        CT_SMALL,
        folder / "b_study_only.dcm",
        SeriesDate="",
        AcquisitionDate=None,
        ContentDate="2021XX01",
        StudyDate="20190506",
    )
    no_study = make_instance(
        CT_SMALL,
        folder / "c_no_study_date.dcm",
        SeriesDate="20180809",
        AcquisitionDate=None,
        ContentDate=None,
        StudyDate="20181340",
    )
    no_date = make_instance(
        CT_SMALL,
        folder / "d_no_date.dcm",
        SeriesDate="20231399",
        AcquisitionDate=None,
        ContentDate="",
        StudyDate="00000000",
        InstanceCreationDate="2023",  # invalid too: CT_small has 20040119
    )
    result = ingest(vocab_url, folder)
    assert result.success

    def dates(ds):
        (row,) = image_row(db, str(ds.SeriesInstanceUID))
        return row[5], procedure_row(db, row[2])[1]

    assert dates(acquisition) == (dt.date(2022, 3, 4), dt.date(2021, 1, 2))
    assert dates(study_only) == (dt.date(2019, 5, 6), dt.date(2019, 5, 6))
    assert dates(no_study) == (dt.date(2018, 8, 9), dt.date(2018, 8, 9))
    status, reason, *_ = ledger(db)[str(folder / "d_no_date.dcm")]
    assert status == "failed" and "no usable date" in reason
    assert image_row(db, str(no_date.SeriesInstanceUID)) == []
    assert metadata_count(db, str(no_date.SOPInstanceUID)) == 0


# --------------------------------------------------------------------------
# 9. Truncated files
# --------------------------------------------------------------------------
def test_truncated_files_fail_and_the_rest_is_ingested(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    data = CT_SMALL.read_bytes()
    pixel_offset = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag, little endian
    assert pixel_offset > 1000
    cuts = {
        "cut_in_pixel_data.dcm": pixel_offset + 12 + (len(data) - pixel_offset) // 2,
        "cut_in_file_meta.dcm": 150,
        "cut_in_header.dcm": 700,
        "cut_in_element_header.dcm": pixel_offset + 6,
    }
    for name, cut in cuts.items():
        (folder / name).write_bytes(data[:cut])
    intact = make_instance(CT_SMALL, folder / "intact.dcm")
    shutil.copy(CT_SMALL, folder / "z_original.dcm")

    result = ingest(vocab_url, folder)
    assert result.success
    log = ledger(db)
    for name in cuts:
        status, reason, *_ = log[str(folder / name)]
        assert status == "failed", name
        assert "truncated" in reason, f"{name}: {reason}"
    assert log[str(folder / "intact.dcm")][0] == "ingested"
    assert log[str(folder / "z_original.dcm")][0] == "ingested"
    assert metadata_count(db, str(intact.SOPInstanceUID)) == expected_metadata_rows(
        folder / "intact.dcm"
    )
    assert metadata_count(db, str(read(CT_SMALL).SOPInstanceUID)) == expected_metadata_rows(
        CT_SMALL
    )
    assert file_metadata(result)["files_failed"] == len(cuts)


# --------------------------------------------------------------------------
# 10/11. Refused configurations change nothing
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field", ["table_name", "schema_name", "person_id_column_name", "patient_id_column_name"]
)
def test_identifier_injection_in_mapping_is_refused(database_url, db, tmp_path, field):
    folder = tmp_path / "dicom"
    make_instance(CT_SMALL, folder / "ct.dcm")
    mapping = dict(options()["options"]["person_to_patient_mapping"])
    mapping[field] = "x; DROP TABLE person"
    result = ingest(database_url, folder, raise_on_error=False, person_to_patient_mapping=mapping)
    assert not result.success
    message = step_failure_message(result)
    assert "is not a plain SQL identifier" in message and field in message
    assert (
        scalar(db, "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'cdm%'")
        == 0
    )
    assert (
        scalar(
            db,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN"
            " ('pg_catalog', 'information_schema')",
        )
        == 0
    )


def test_identifier_injection_after_load_vocab_changes_nothing(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    make_instance(CT_SMALL, folder / "ct.dcm")
    before = table_counts(db)
    mapping = dict(
        options()["options"]["person_to_patient_mapping"], table_name="x; DROP TABLE person"
    )
    result = ingest(vocab_url, folder, raise_on_error=False, person_to_patient_mapping=mapping)
    assert not result.success
    assert "is not a plain SQL identifier" in step_failure_message(result)
    assert table_counts(db) == before
    assert before["cdmdefault.person"] == 0 and before[f"{MI}.dicom_ingest_log"] == 0


DICOM_SERVER_ENV = (
    "DICOM_ETL_DICOM_SERVER_URL",
    "DICOM_ETL_DICOM_SERVER_KIND",
    "DICOM_ETL_DICOMWEB_URL",
    "DICOM_ETL_DICOM_SERVER_USER",
    "DICOM_ETL_DICOM_SERVER_PASSWORD",
)


def test_upload_files_without_a_dicom_server_fails_clearly(vocab_url, db, tmp_path, monkeypatch):
    """upload_files: true with no DICOM server: the run fails with a message naming upload_files and
    nothing is recorded as uploaded. Either nothing was ingested (refused up front, the first release) or
    the ingest completed whole and only the upload step failed (once uploading exists)."""
    for variable in DICOM_SERVER_ENV:
        monkeypatch.delenv(variable, raising=False)
    folder = tmp_path / "dicom"
    ds = make_instance(CT_SMALL, folder / "ct.dcm")
    before = table_counts(db)
    result = ingest(vocab_url, folder, raise_on_error=False, upload_files=True)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    assert "upload_files" in failures[0].step_failure_data.error.message
    after = table_counts(db)
    assert after[f"{MI}.file_upload_metadata"] == before[f"{MI}.file_upload_metadata"] == 0
    assert (
        scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence WHERE wadors_uri IS NOT NULL") == 0
    )
    if after[f"{MI}.dicom_ingest_log"] == 0:
        assert after == before
    else:
        assert failures[0].step_key != "ingest_dicom_folder"
        assert ledger(db) == {
            str(folder / "ct.dcm"): ("ingested", None, str(ds.SOPInstanceUID), ANY_ID)
        }
        assert metadata_count(db, str(ds.SOPInstanceUID)) == expected_metadata_rows(
            folder / "ct.dcm"
        )


class _AnyId:
    def __eq__(self, other) -> bool:
        return isinstance(other, int)


ANY_ID = _AnyId()


# --------------------------------------------------------------------------
# 12. A file replaced by another instance at the same path
# --------------------------------------------------------------------------
def _replace_file(source: Path, target: Path, **attrs) -> pydicom.Dataset:
    old_mtime = target.stat().st_mtime_ns
    ds = make_instance(source, target, **attrs)
    os.utime(target, ns=(old_mtime + 5_000_000_000, old_mtime + 5_000_000_000))
    assert target.stat().st_mtime_ns != old_mtime
    return ds


def test_changed_file_replaces_its_old_instance(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    old = make_instance(CT_SMALL, folder / "ct.dcm")
    other = make_instance(CT_SMALL, folder / "other.dcm")
    ingest(vocab_url, folder)
    old_sop = str(old.SOPInstanceUID)
    assert metadata_count(db, old_sop) == expected_metadata_rows(folder / "ct.dcm") > 0

    new = _replace_file(CT_SMALL, folder / "ct.dcm")
    result = ingest(vocab_url, folder)
    assert result.success
    new_sop = str(new.SOPInstanceUID)
    assert metadata_count(db, old_sop) == 0
    assert metadata_count(db, new_sop) == expected_metadata_rows(folder / "ct.dcm")
    assert metadata_count(db, str(other.SOPInstanceUID)) == expected_metadata_rows(
        folder / "other.dcm"
    )
    log = ledger(db)
    assert len(log) == 2
    status, _reason, sop, io_id = log[str(folder / "ct.dcm")]
    assert (status, sop) == ("ingested", new_sop)
    assert image_row(db, str(new.SeriesInstanceUID))[0][0] == io_id
    md = file_metadata(result)
    assert (md["files_ingested"], md["files_already_done"]) == (1, 1)
    assert md["rows_replaced_for_changed_files"] == expected_metadata_rows(CT_SMALL)


def test_changed_file_with_a_duplicate_elsewhere(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    old = make_instance(CT_SMALL, folder / "a.dcm")
    shutil.copy(folder / "a.dcm", folder / "b_copy.dcm")
    ingest(vocab_url, folder)
    assert [r[0] for _, r in sorted(ledger(db).items())] == ["ingested", "duplicate"]

    _replace_file(CT_SMALL, folder / "a.dcm")
    ingest(vocab_url, folder)
    log = ledger(db)
    # Every path seen keeps its ledger row; the copy of the old instance is marked for the next run.
    assert set(log) == {str(folder / "a.dcm"), str(folder / "b_copy.dcm")}
    status, reason, *_ = log[str(folder / "b_copy.dcm")]
    assert status == "failed" and "the next run ingests this one" in reason
    ingest(vocab_url, folder)
    assert ledger(db)[str(folder / "b_copy.dcm")][0] == "ingested"
    assert metadata_count(db, str(old.SOPInstanceUID)) == expected_metadata_rows(
        folder / "b_copy.dcm"
    )


def test_changed_file_duplicate_is_ingested_by_a_later_run(vocab_url, db, tmp_path):
    """Whatever happens in the run that sees the change, the run after it is complete."""
    folder = tmp_path / "dicom"
    old = make_instance(CT_SMALL, folder / "a.dcm")
    shutil.copy(folder / "a.dcm", folder / "b_copy.dcm")
    ingest(vocab_url, folder)
    new = _replace_file(CT_SMALL, folder / "a.dcm")
    ingest(vocab_url, folder)
    ingest(vocab_url, folder)
    log = ledger(db)
    assert {p: r[:1] + r[2:3] for p, r in log.items()} == {
        str(folder / "a.dcm"): ("ingested", str(new.SOPInstanceUID)),
        str(folder / "b_copy.dcm"): ("ingested", str(old.SOPInstanceUID)),
    }
    assert metadata_count(db, str(old.SOPInstanceUID)) == expected_metadata_rows(
        folder / "b_copy.dcm"
    )
    assert metadata_count(db, str(new.SOPInstanceUID)) == expected_metadata_rows(folder / "a.dcm")


# --------------------------------------------------------------------------
# 13. Asset checks
# --------------------------------------------------------------------------
def test_asset_checks_pass_for_a_clean_folder(vocab_url, db, tmp_path):
    _concept(db, 900001, "Computed tomography", "Procedure")
    folder = tmp_path / "dicom"
    study = generate_uid()
    for i in range(3):
        make_instance(CT_SMALL, folder / f"ct{i}.dcm", StudyInstanceUID=study)
    make_instance(CT_SMALL, folder / "ct3.dcm")
    result = ingest(vocab_url, folder)
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "every_series_has_its_procedure",
        "no_sop_instance_twice",
        "share_of_series_without_modality_concept",
        "share_of_measurements_with_concept_0",
        "every_image_feature_has_its_measurement",
    }
    assert all(e.passed for e in evaluations.values()), {
        n: e.passed for n, e in evaluations.items()
    }
    share = evaluations["share_of_series_without_modality_concept"].metadata
    assert (share["series"].value, share["series_with_modality_concept_0"].value) == (4, 0)
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 2


def test_modality_share_check_warns_without_snomed(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    make_instance(CT_SMALL, folder / "ct.dcm")
    result = ingest(vocab_url, folder)
    assert result.success  # a WARN check does not fail the run
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    share = evaluations["share_of_series_without_modality_concept"]
    assert not share.passed and share.severity.value == "WARN"
    assert evaluations["every_series_has_its_procedure"].passed
    assert evaluations["no_sop_instance_twice"].passed


# --------------------------------------------------------------------------
# Extras: studies spanning runs, files a bad value must not take down
# --------------------------------------------------------------------------
def test_study_split_over_batches_and_runs_has_one_procedure(vocab_url, db, tmp_path):
    study = generate_uid()
    first = tmp_path / "first"
    a = make_instance(CT_SMALL, first / "a.dcm", StudyInstanceUID=study)
    b = make_instance(CT_SMALL, first / "b.dcm", StudyInstanceUID=study)
    ingest(vocab_url, first, ingest_batch_size=1)
    second = tmp_path / "second"
    c = make_instance(CT_SMALL, second / "c.dcm", StudyInstanceUID=study)
    ingest(vocab_url, second)
    procedures = {image_row(db, str(ds.SeriesInstanceUID))[0][2] for ds in (a, b, c)}
    assert len(procedures) == 1
    assert scalar(db, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 1
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_occurrence") == 3


LONG_UID = "1.2." + ".".join(["123456789"] * 30)  # 274 characters, far above UI's 64


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "SOPInstanceUID", "StudyInstanceUID"])
def test_overlong_uid_fails_the_file_not_the_run(vocab_url, db, tmp_path, keyword):
    """UIDs longer than the columns hold (image_series_uid varchar(250), sop_instance_id varchar(255)) must
    fail their file, with a reason; the other files of the same batch are ingested."""
    folder = tmp_path / "dicom"
    make_instance(CT_SMALL, folder / "a_bad.dcm", **{keyword: LONG_UID})
    good = make_instance(CT_SMALL, folder / "b_good.dcm")
    result = ingest(vocab_url, folder, raise_on_error=False)
    assert result.success
    log = ledger(db)
    assert log[str(folder / "b_good.dcm")][0] == "ingested"
    status, reason, *_ = log[str(folder / "a_bad.dcm")]
    assert status == "failed" and keyword in reason and "64" in reason
    assert LONG_UID not in reason
    assert metadata_count(db, str(good.SOPInstanceUID)) == expected_metadata_rows(
        folder / "b_good.dcm"
    )
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == expected_metadata_rows(
        folder / "b_good.dcm"
    )


def test_instance_number_outside_integer_does_not_fail_the_run(vocab_url, db, tmp_path):
    """Either the file is ingested (instance_number NULL, the value kept in metadata_source_value) or it
    fails alone with a reason; the other file of the batch is ingested and the run succeeds."""
    folder = tmp_path / "dicom"
    bad = make_instance(CT_SMALL, folder / "a_bad.dcm", InstanceNumber="9999999999")
    good = make_instance(CT_SMALL, folder / "b_good.dcm")
    result = ingest(vocab_url, folder, raise_on_error=False)
    log = ledger(db)
    assert log.get(str(folder / "b_good.dcm"), (None,))[0] == "ingested"
    status, reason, *_ = log.get(str(folder / "a_bad.dcm"), (None, None))
    assert status == "ingested" or (status == "failed" and reason)
    if status == "ingested":
        assert (
            scalar(
                db,
                f"SELECT DISTINCT instance_number FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s",
                [str(bad.SOPInstanceUID)],
            )
            is None
        )
    assert result.success
    assert metadata_count(db, str(good.SOPInstanceUID)) == expected_metadata_rows(
        folder / "b_good.dcm"
    )
