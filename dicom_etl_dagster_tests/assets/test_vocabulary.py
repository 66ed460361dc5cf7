"""load_vocab against a real PostgreSQL: exact rows, idempotency, truncation, clean values."""

from __future__ import annotations

import csv
import datetime as dt

import pytest

from dicom_etl_dagster.core.vocabulary.files import SOURCE_VERSION
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.helpers import options, run_job

ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\ufeff")


def _csv_rows(vocab_dir, name):
    with (vocab_dir / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _counts(db) -> dict[str, int]:
    return {
        "vocabulary": scalar(
            db, "SELECT count(*) FROM cdmvocab.vocabulary WHERE vocabulary_id = 'DICOM'"
        ),
        "concept_class": scalar(
            db, "SELECT count(*) FROM cdmvocab.concept_class WHERE concept_class_id LIKE 'DICOM%'"
        ),
        "concept": scalar(
            db, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'"
        ),
        "metadata_concepts": scalar(
            db,
            "SELECT count(*) FROM cdmvocab.concept WHERE concept_id IN (2128000000, 2128000001, 2128000002)",
        ),
        "concept_relationship": scalar(db, "SELECT count(*) FROM cdmvocab.concept_relationship"),
        "dicom_data_element": scalar(
            db, "SELECT count(*) FROM cdmmedicalimaging.dicom_data_element"
        ),
    }


EXPECTED = {
    "vocabulary": 1,
    "concept_class": 2,
    "concept": 8811,
    "metadata_concepts": 3,
    "concept_relationship": 1052,
    "dicom_data_element": 5190,
}


def test_load_vocab_writes_exact_rows_with_correct_values(database_url, db, vocab_dir):
    result = run_job("load_vocab", database_url, options())
    assert result.success

    assert _counts(db) == EXPECTED
    # The contract numbers are the files' own row counts.
    assert len(_csv_rows(vocab_dir, "omop_table_staging_v5.csv")) == EXPECTED["concept"]
    assert len(_csv_rows(vocab_dir, "part6_attributes.csv")) == EXPECTED["dicom_data_element"]
    assert (
        len(_csv_rows(vocab_dir, "cs_values_maps_to.csv"))
        + len(_csv_rows(vocab_dir, "cs_values_maps_to_value.csv"))
        == EXPECTED["concept_relationship"]
    )

    dates = db.execute(
        "SELECT DISTINCT valid_start_date, valid_end_date, standard_concept, invalid_reason FROM cdmvocab.concept"
    ).fetchall()
    assert dates == [(dt.date(1993, 1, 1), dt.date(2099, 12, 31), None, None)]
    rel_dates = db.execute(
        "SELECT DISTINCT valid_start_date, valid_end_date, invalid_reason FROM cdmvocab.concept_relationship"
    ).fetchall()
    assert rel_dates == [(dt.date(1993, 1, 1), dt.date(2099, 12, 31), None)]

    for zw in ZERO_WIDTH:
        assert (
            scalar(
                db,
                "SELECT count(*) FROM cdmmedicalimaging.dicom_data_element"
                " WHERE strpos(data_element_keyword, %s) > 0 OR strpos(data_element_name, %s) > 0",
                [zw, zw],
            )
            == 0
        )
        assert (
            scalar(
                db, "SELECT count(*) FROM cdmvocab.concept WHERE strpos(concept_name, %s) > 0", [zw]
            )
            == 0
        )

    # Spot checks against the dictionary and the concept file.
    assert db.execute(
        "SELECT data_element_keyword, value_representation, is_retired FROM cdmmedicalimaging.dicom_data_element"
        " WHERE data_element_tag = '(0008,0060)'"
    ).fetchone() == ("Modality", "CS", False)
    assert (
        scalar(
            db,
            "SELECT is_retired FROM cdmmedicalimaging.dicom_data_element"
            " WHERE data_element_tag = '(0008,0001)'",
        )
        is True
    )
    assert db.execute(
        "SELECT concept_name, concept_code FROM cdmvocab.concept WHERE concept_id = 2128009190"
    ).fetchone() == ("Computed tomography", "CT")
    version = scalar(
        db, "SELECT vocabulary_version FROM cdmvocab.vocabulary WHERE vocabulary_id = 'DICOM'"
    )
    assert SOURCE_VERSION in version

    # Materialization metadata tells what happened.
    materializations = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("concept")
    }
    concept_md = materializations["concept"]
    assert concept_md["rows_written"].value == 8814
    assert concept_md["rows_already_present"].value == 0
    assert concept_md["source_version"].value == SOURCE_VERSION


@pytest.mark.parametrize("truncate_sequence", [(False, False), (True, True), (False, True)])
def test_reloading_never_duplicates(database_url, db, truncate_sequence):
    assert run_job("load_vocab", database_url, options()).success
    ids_before = db.execute(
        "SELECT data_element_tag, data_element_id FROM cdmmedicalimaging.dicom_data_element"
    ).fetchall()
    for truncate in truncate_sequence:
        result = run_job("load_vocab", database_url, options(to_truncate=truncate))
        assert result.success
        assert _counts(db) == EXPECTED
        written = (
            result.asset_materializations_for_node("concept_relationship")[0]
            .metadata["rows_written"]
            .value
        )
        assert written == (1052 if truncate else 0)
    # Ingested metadata points at data_element_id: ids must survive any reload.
    assert sorted(
        db.execute(
            "SELECT data_element_tag, data_element_id FROM cdmmedicalimaging.dicom_data_element"
        ).fetchall()
    ) == sorted(ids_before)
    assert (
        scalar(
            db, "SELECT count(DISTINCT data_element_tag) FROM cdmmedicalimaging.dicom_data_element"
        )
        == 5190
    )


def test_truncating_reload_keeps_other_vocabularies(database_url, db):
    assert run_job("load_vocab", database_url, options()).success
    # A user's Athena rows living in the same tables.
    db.execute(
        "INSERT INTO cdmvocab.vocabulary VALUES ('SNOMED', 'SNOMED CT', NULL, '2024', 44819097)"
    )
    db.execute(
        "INSERT INTO cdmvocab.concept_class VALUES ('Body Structure', 'Body Structure', 44819228)"
    )
    db.execute(
        "INSERT INTO cdmvocab.concept VALUES (4302357, 'Entire chest', 'Spec Anatomic Site', 'SNOMED',"
        " 'Body Structure', 'S', '181216001', '1970-01-01', '2099-12-31', NULL)"
    )
    db.execute(
        "INSERT INTO cdmvocab.concept_relationship VALUES (4302357, 4302357, 'Maps to', '1970-01-01',"
        " '2099-12-31', NULL)"
    )
    # A stale DICOM row that a truncating reload must remove.
    db.execute(
        "INSERT INTO cdmvocab.concept VALUES (2128999999, 'stale', 'Measurement', 'DICOM', 'DICOM Value Sets',"
        " NULL, 'STALE', '1993-01-01', '2099-12-31', NULL)"
    )

    result = run_job("load_vocab", database_url, options(to_truncate=True))
    assert result.success

    assert (
        scalar(db, "SELECT count(*) FROM cdmvocab.vocabulary WHERE vocabulary_id = 'SNOMED'") == 1
    )
    assert (
        scalar(
            db,
            "SELECT count(*) FROM cdmvocab.concept_class WHERE concept_class_id = 'Body Structure'",
        )
        == 1
    )
    assert scalar(db, "SELECT count(*) FROM cdmvocab.concept WHERE concept_id = 4302357") == 1
    assert (
        scalar(
            db, "SELECT count(*) FROM cdmvocab.concept_relationship WHERE concept_id_1 = 4302357"
        )
        == 1
    )
    assert scalar(db, "SELECT count(*) FROM cdmvocab.concept WHERE concept_id = 2128999999") == 0
    counts = _counts(db)
    assert counts["concept_relationship"] == 1052 + 1
    assert {k: v for k, v in counts.items() if k != "concept_relationship"} == {
        k: v for k, v in EXPECTED.items() if k != "concept_relationship"
    }
    removed = (
        result.asset_materializations_for_node("concept")[0]
        .metadata["rows_removed_by_truncate"]
        .value
    )
    assert removed == 8814 + 1


def test_existing_user_tables_are_not_altered(database_url, db):
    """An existing concept table (with a column of its own) is used as it is."""
    db.execute("CREATE SCHEMA cdmvocab")
    db.execute(
        "CREATE TABLE cdmvocab.concept (concept_id integer NOT NULL, concept_name varchar(255) NOT NULL,"
        " domain_id varchar(20) NOT NULL, vocabulary_id varchar(20) NOT NULL, concept_class_id varchar(20) NOT NULL,"
        " standard_concept varchar(1), concept_code varchar(50) NOT NULL, valid_start_date date NOT NULL,"
        " valid_end_date date NOT NULL, invalid_reason varchar(1), site_note text)"
    )
    assert run_job("load_vocab", database_url, options()).success
    assert scalar(db, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'") == 8811
    assert (
        scalar(
            db,
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'cdmvocab' AND tablename = 'concept'",
        )
        == 0
    )
    assert (
        scalar(
            db,
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'cdmvocab'"
            " AND table_name = 'concept' AND column_name = 'site_note'",
        )
        == 1
    )


def test_identifier_injection_in_schema_name_is_refused(database_url, db):
    result = run_job(
        "load_vocab",
        database_url,
        options(vocab_schema_name="x; DROP TABLE person"),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "is not a plain SQL identifier" in failure.step_failure_data.error.message
    # Nothing ran: not even the schemas were created.
    assert (
        scalar(db, "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'cdm%'")
        == 0
    )
