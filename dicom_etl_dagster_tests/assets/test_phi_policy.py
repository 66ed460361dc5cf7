"""``phi_policy`` end to end: ingest_metadata against real PostgreSQL databases, the same
folder once under ``drop`` and once under ``keep``. The folder holds a CT full of PHI built
here (``phi_samples``), a copy of it at a second path (a duplicate), a TID 1500 report over it
and pydicom's rtplan.dcm (deeply nested). What must be left is counted with plain pydicom."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
from pydicom.datadict import tag_for_keyword

from dicom_etl_dagster.core.dicom.confidentiality_profile import in_basic_profile
from dicom_etl_dagster_tests import analytics_samples
from dicom_etl_dagster_tests.assets.test_imaging import (
    RTPLAN,
    file_metadata,
    ingest,
    step_failure_message,
)
from dicom_etl_dagster_tests.assets.test_imaging import vocab_url as vocab_url
from dicom_etl_dagster_tests.conftest import fresh_database, scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.helpers import ledger, options, run_job
from dicom_etl_dagster_tests.phi_samples import (
    KEPT_FOR_OMOP,
    PHI_KEYWORDS,
    rows_under_drop,
    write_phi_instance,
)

MI, CDM = "cdmmedicalimaging", "cdmdefault"
PATIENT = "PHI-PATIENT-7"
PERSON = 42
OMOP_TABLES = (
    f"{CDM}.procedure_occurrence",
    f"{MI}.image_occurrence",
    f"{CDM}.measurement",
    f"{MI}.image_feature",
)


def _folder(root: Path) -> tuple[Path, dict[str, Path]]:
    """The test folder; returns it and its files that are ingested (not the duplicate)."""
    folder = root / "dicom"
    image = write_phi_instance(folder / "a" / "ct.dcm", PATIENT)
    (folder / "b").mkdir()
    shutil.copy(folder / "a" / "ct.dcm", folder / "b" / "ct_copy.dcm")
    report = analytics_samples.write_measurement_report(folder / "c", image)
    shutil.copy(RTPLAN, folder / "rtplan.dcm")
    return folder, {"ct": folder / "a" / "ct.dcm", "sr": report, "rtplan": folder / "rtplan.dcm"}


def _mapping(db) -> None:
    db.execute(
        f"CREATE TABLE {MI}.mappingtable (source_person_id integer, source_patient_id varchar)"
    )
    db.execute(f"INSERT INTO {MI}.mappingtable VALUES (%s, %s)", [PERSON, PATIENT])


def _eav(db) -> list[tuple]:
    return db.execute(
        "SELECT metadata_id, metadata_source_tag, parent_sequence_id, parent_dataset_id,"
        " is_sequence, is_private, sop_instance_id, metadata_source_value"
        f" FROM {MI}.dicom_file_metadata"
    ).fetchall()


def _omop_counts(db) -> dict[str, int]:
    return {t: scalar(db, f"SELECT count(*) FROM {t}") for t in OMOP_TABLES}


def _persons(db) -> set[tuple]:
    return set(
        db.execute(
            f"SELECT l.sop_instance_uid, i.person_id, p.person_id FROM {MI}.dicom_ingest_log l"
            f" JOIN {MI}.image_occurrence i ON i.image_occurrence_id = l.image_occurrence_id"
            f" JOIN {CDM}.procedure_occurrence p"
            "   ON p.procedure_occurrence_id = i.procedure_occurrence_id"
        ).fetchall()
    )


def _measurements(db) -> list[tuple]:
    return sorted(
        db.execute(
            "SELECT measurement_source_value, measurement_concept_id, value_as_number,"
            f" value_source_value, unit_source_value, person_id FROM {CDM}.measurement"
        ).fetchall(),
        key=repr,
    )


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _sops(db) -> dict[str, str]:
    return {
        Path(path).name: row[2]
        for path, row in ledger(db).items()
        if row[0] == "ingested"  # the duplicate has no EAV rows of its own
    }


def test_drop_leaves_no_profile_attribute_and_changes_no_omop_row(
    vocab_url, db, postgres_server, tmp_path
):
    folder, ingested = _folder(tmp_path)
    _mapping(db)
    dropped_run = ingest(vocab_url, folder, phi_policy="drop", parse_workers=2)  # the pool too
    statuses = sorted(row[0] for row in ledger(db).values())
    assert statuses == ["duplicate", "ingested", "ingested", "ingested"]

    rows = _eav(db)
    by_id = {r[0]: r for r in rows}
    for r in rows:  # none of the profile's attributes, anywhere, but the OMOP keys on top
        tag = int(r[1][1:5] + r[1][6:10], 16)
        top_level = r[2] is None
        assert not r[5] and not tag >> 16 & 1, f"private row {r[1]}"
        assert not in_basic_profile(tag) or (top_level and tag in KEPT_FOR_OMOP), r[1]
        assert (r[2] is None) == (r[3] is None)
        if r[2] is not None:  # every parent is a kept sequence row of the same instance
            assert by_id[r[2]][4] is True and by_id[r[2]][6] == r[6]
    tags = {r[1] for r in rows}
    for keyword in PHI_KEYWORDS:
        assert _tag_text(tag_for_keyword(keyword)) not in tags, keyword
    assert "Doe" not in " ".join(str(r[7]) for r in rows)
    sops = _sops(db)
    for name, path in ingested.items():  # exactly the rows pydicom says are left, per file
        count = sum(1 for r in rows if r[6] == sops[path.name])
        assert count == rows_under_drop(path)[0], name
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate"):
        tag = _tag_text(tag_for_keyword(keyword))
        assert sum(1 for r in rows if r[1] == tag and r[2] is None) == len(ingested), keyword
    expected_dropped = sum(rows_under_drop(p)[1] for p in ingested.values())
    md = file_metadata(dropped_run)
    assert (md["phi_policy"], md["elements_dropped_by_phi_policy"]) == ("drop", expected_dropped)

    # The person is mapped by the PatientID the EAV no longer holds.
    persons = _persons(db)
    person_of = {
        sop: (image_person, procedure_person) for sop, image_person, procedure_person in persons
    }
    assert person_of[sops["ct.dcm"]] == person_of[sops[ingested["sr"].name]] == (PERSON, PERSON)
    assert person_of[sops["rtplan.dcm"]] == (0, 0)  # another patient: use_id_zero

    # The same folder under keep, in a database of its own: the same OMOP rows, all EAV rows.
    with fresh_database(postgres_server) as keep_url:
        assert run_job("load_vocab", keep_url, options()).success
        with psycopg.connect(keep_url, autocommit=True) as keep_db:
            _mapping(keep_db)
            kept_run = ingest(keep_url, folder, phi_policy="keep")
            assert _omop_counts(keep_db) == _omop_counts(db)
            assert _omop_counts(db)[f"{CDM}.measurement"] > 0
            assert _measurements(keep_db) == _measurements(db)
            assert {p[1:] for p in _persons(keep_db)} == {p[1:] for p in persons}
            keep_rows = _eav(keep_db)
            assert len(keep_rows) == sum(expected_metadata_rows(p) for p in ingested.values())
            assert len(keep_rows) - len(rows) == expected_dropped
            assert _tag_text(tag_for_keyword("PatientName")) in {r[1] for r in keep_rows}
            assert any(r[5] for r in keep_rows)
            md = file_metadata(kept_run)
            assert (md["phi_policy"], md["elements_dropped_by_phi_policy"]) == ("keep", 0)


def test_a_bad_phi_policy_fails_with_one_line_and_writes_nothing(vocab_url, db, tmp_path):
    folder, _ = _folder(tmp_path)
    result = ingest(vocab_url, folder, raise_on_error=False, phi_policy="remove")
    assert not result.success
    message = step_failure_message(result).strip()
    assert len(message.splitlines()) == 1  # the reason, no stack trace of ours
    assert message.endswith(": phi_policy must be keep or drop, not 'remove'")
    assert ledger(db) == {}
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_file_metadata") == 0
