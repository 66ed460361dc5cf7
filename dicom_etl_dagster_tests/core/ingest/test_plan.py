"""The batch planner without a database: every decision about a file, as an exact plan.

Each test builds the parse results and the database rows a batch would meet and states the
whole plan the writer is to apply (``plan.plan_batch`` is a pure function)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from psycopg.adapt import PyFormat, Transformer

from dicom_etl_dagster.core.analytics.findings import AcquisitionValue, InstanceFindings
from dicom_etl_dagster.core.dicom.reader import DicomInstance
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import RenderedMetadata
from dicom_etl_dagster.core.ingest.parse_pool import Failed, Parsed
from dicom_etl_dagster.core.ingest.plan import (
    CHANGED_COPY_REASON,
    BatchPlan,
    DatabaseRows,
    ExistingId,
    ExistingSeries,
    ExistingStudy,
    IngestedSop,
    InstanceWrite,
    LedgerEntry,
    LedgerRow,
    NewId,
    NewSeries,
    NewStudy,
    PersonMatch,
    PersonPolicy,
    is_done,
    patient_reference,
    plan_batch,
    resolve,
)
from dicom_etl_dagster.core.ingest.status import LedgerStatus, MissingPersonPolicy

INGESTED, FAILED, DUPLICATE = LedgerStatus.INGESTED, LedgerStatus.FAILED, LedgerStatus.DUPLICATE
MAPPING_TABLE = "cdmmedicalimaging.mappingtable"
USE_ID_ZERO = PersonPolicy(MissingPersonPolicy.USE_ID_ZERO, MAPPING_TABLE)
SKIP = PersonPolicy(MissingPersonPolicy.SKIP, MAPPING_TABLE)
STUDY_DATE = dt.date(2024, 3, 1)
SERIES_DATE = dt.date(2024, 3, 2)
STUDY_DATETIME = dt.datetime(2024, 3, 1, 8, 30)
SERIES_DATETIME = dt.datetime(2024, 3, 2, 9, 15)
KVP = AcquisitionValue("00180060", "KVP", "DS", "120", 120.0)
METADATA = RenderedMetadata("", 0, 0, (), "")


def entry(name: str, size: int = 100, mtime_ns: int = 1) -> FileEntry:
    return FileEntry(f"/data/{name}", size, mtime_ns)


def parsed(
    name: str,
    sop: str | None = None,
    study: str = "T1",
    series: str = "S1",
    patient: str | None = "P1",
    size: int = 100,
    mtime_ns: int = 1,
) -> Parsed:
    instance = DicomInstance(
        sop_instance_uid=sop or f"sop-{name}",
        study_instance_uid=study,
        series_instance_uid=series,
        patient_id=patient,
        procedure_date=STUDY_DATE,
        image_date=SERIES_DATE,
        study_description=f"study {study}",
        modality="CT",
        body_part_examined="CHEST",
        instance_number=1,
        elements=[],
        procedure_datetime=STUDY_DATETIME,
        image_datetime=SERIES_DATETIME,
    )
    findings = InstanceFindings(acquisition=(KVP,))
    return Parsed(entry(name, size, mtime_ns), instance, METADATA, findings)


def new_study(study: str = "T1", person: int = 0) -> NewStudy:
    return NewStudy(study, person, STUDY_DATE, f"study {study}", STUDY_DATETIME)


def new_series(series: str = "S1", study: str = "T1", person: int = 0, procedure: int = 0):
    return NewSeries(
        series_uid=series,
        study_uid=study,
        person_id=person,
        procedure=NewId(procedure),
        local_path="/data",
        image_date=SERIES_DATE,
        modality="CT",
        body_part="CHEST",
        image_datetime=SERIES_DATETIME,
        study_date=STUDY_DATE,
        acquisition=(KVP,),
    )


def ingested(p: Parsed, ref) -> LedgerEntry:
    return LedgerEntry(p.entry, INGESTED, None, p.instance.sop_instance_uid, ref, ())


def ledger_row(name: str, status: str, sop: str | None, size: int = 100) -> LedgerRow:
    return LedgerRow(f"/data/{name}", size, 1, status, sop)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# New studies and series
# --------------------------------------------------------------------------
def test_two_series_of_one_study_in_one_batch_make_one_study():
    a, b, c = parsed("a", series="S1"), parsed("b", series="S1"), parsed("c", series="S2")
    assert plan_batch([a, b, c], DatabaseRows(), USE_ID_ZERO) == BatchPlan(
        new_studies=(new_study(),),
        new_series=(new_series("S1"), new_series("S2")),
        instances=(
            InstanceWrite(a, NewId(0), 0, NewId(0)),
            InstanceWrite(b, NewId(0), 0, NewId(0)),
            InstanceWrite(c, NewId(1), 0, NewId(0)),
        ),
        ledger=(ingested(a, NewId(0)), ingested(b, NewId(0)), ingested(c, NewId(1))),
    )


def test_a_series_split_over_two_batches_reuses_the_series_and_creates_no_study():
    second_batch = parsed("b", series="S1")
    rows = DatabaseRows(
        series=[ExistingSeries("S1", 7)],
        studies=[ExistingStudy("T1", 0, 3)],
    )
    assert plan_batch([second_batch], rows, USE_ID_ZERO) == BatchPlan(
        instances=(InstanceWrite(second_batch, ExistingId(7), 0, ExistingId(3)),),
        ledger=(ingested(second_batch, ExistingId(7)),),
    )


def test_a_new_series_of_an_existing_study_joins_its_procedure():
    a = parsed("a", series="S2")
    rows = DatabaseRows(studies=[ExistingStudy("T1", 0, 3), ExistingStudy("T1", 5, 4)])
    plan = plan_batch([a], rows, USE_ID_ZERO)
    assert plan.new_studies == ()
    assert plan.new_series == (dataclasses.replace(new_series("S2"), procedure=ExistingId(3)),)
    assert plan.instances == (InstanceWrite(a, NewId(0), 0, ExistingId(3)),)


def test_the_same_study_for_two_persons_is_two_studies():
    a = parsed("a", series="S1", patient="P1")
    b = parsed("b", series="S2", patient="P2")
    rows = DatabaseRows(persons=[PersonMatch("P1", "11", 1), PersonMatch("P2", "22", 1)])
    assert plan_batch([a, b], rows, SKIP) == BatchPlan(
        new_studies=(new_study(person=11), new_study(person=22)),
        new_series=(
            new_series("S1", person=11, procedure=0),
            new_series("S2", person=22, procedure=1),
        ),
        instances=(
            InstanceWrite(a, NewId(0), 11, NewId(0)),
            InstanceWrite(b, NewId(1), 22, NewId(1)),
        ),
        ledger=(ingested(a, NewId(0)), ingested(b, NewId(1))),
    )


def test_a_long_study_description_is_cut_to_the_column():
    a = parsed("a")
    long = a._replace(instance=dataclasses.replace(a.instance, study_description="x\x00" * 60))
    (study,) = plan_batch([long], DatabaseRows(), USE_ID_ZERO).new_studies
    assert study.source_value == "x" * 50  # NULs removed, then cut to the 50 characters


# --------------------------------------------------------------------------
# Failures and duplicates
# --------------------------------------------------------------------------
def test_a_failed_parse_is_a_failed_ledger_row_without_sop():
    bad = Failed(entry("bad"), "not a DICOM file: no preamble")
    assert plan_batch([bad], DatabaseRows(), USE_ID_ZERO) == BatchPlan(
        ledger=(LedgerEntry(bad.entry, FAILED, "not a DICOM file: no preamble"),)
    )


def test_a_copy_in_the_same_batch_is_a_duplicate_of_the_first_copy():
    first, copy = parsed("a", sop="X"), parsed("b", sop="X")
    assert plan_batch([first, copy], DatabaseRows(), USE_ID_ZERO) == BatchPlan(
        new_studies=(new_study(),),
        new_series=(new_series(),),
        instances=(InstanceWrite(first, NewId(0), 0, NewId(0)),),
        ledger=(
            ingested(first, NewId(0)),
            LedgerEntry(copy.entry, DUPLICATE, None, "X", NewId(0), ()),
        ),
    )


def test_a_copy_of_a_file_without_person_fails_the_same_way():
    first, copy = parsed("a", sop="X", patient="NOBODY"), parsed("b", sop="X", patient="NOBODY")
    reason = (
        f"no person: patient {patient_reference('NOBODY')} is not in {MAPPING_TABLE}"
        " (missing_person_id_options: skip)"
    )
    assert plan_batch([first, copy], DatabaseRows(), SKIP) == BatchPlan(
        ledger=(
            LedgerEntry(first.entry, FAILED, reason, "X", None, ()),
            LedgerEntry(copy.entry, FAILED, reason, "X", None, ()),
        ),
        person_misses=1,
    )


def test_a_copy_of_an_ingested_sop_is_a_duplicate_pointing_at_its_series():
    copy = parsed("b", sop="X")
    rows = DatabaseRows(ingested=[IngestedSop("X", "/data/elsewhere", 9)])
    assert plan_batch([copy], rows, USE_ID_ZERO) == BatchPlan(
        ledger=(LedgerEntry(copy.entry, DUPLICATE, None, "X", ExistingId(9), ()),)
    )


# --------------------------------------------------------------------------
# The ledger: done, changed, retried
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,size,done",
    [
        ("ingested", 100, True),
        ("duplicate", 100, True),
        ("failed", 100, False),  # failures are always tried again
        ("ingested", 101, False),  # changed
        (None, 100, False),  # never seen
    ],
)
def test_is_done(status, size, done):
    row = None if status is None else ledger_row("a", status, "X", size)
    assert is_done(row, entry("a")) is done
    assert is_done(row, entry("a", mtime_ns=2)) is False  # another mtime: changed


def test_an_unchanged_ingested_file_is_already_done():
    a, b = parsed("a"), parsed("b", series="S9")
    rows = DatabaseRows(ledger=[ledger_row("a", "ingested", "sop-a")])
    plan = plan_batch([a, b], rows, USE_ID_ZERO)
    assert plan.already_done == 1
    assert [e.entry for e in plan.ledger] == [b.entry]


def test_a_changed_file_replaces_its_old_instance_and_fails_its_duplicates():
    changed = parsed("a", sop="X", size=200)
    rows = DatabaseRows(
        ledger=[ledger_row("a", "ingested", "X", size=100)],
        ingested=[IngestedSop("X", "/data/a", 7)],  # its own old row: no duplicate of itself
        series=[ExistingSeries("S1", 7)],
    )
    assert plan_batch([changed], rows, USE_ID_ZERO) == BatchPlan(
        replaced_paths=("/data/a",),
        changed_sops=("X",),
        instances=(InstanceWrite(changed, ExistingId(7), 0, None),),
        ledger=(ingested(changed, ExistingId(7)),),
    )
    assert "the next run ingests this one" in CHANGED_COPY_REASON


def test_a_changed_duplicate_is_recorded_again_without_touching_the_ingested_copy():
    changed = parsed("b", sop="X", size=200)
    rows = DatabaseRows(
        ledger=[ledger_row("b", "duplicate", "X", size=100)],
        ingested=[IngestedSop("X", "/data/a", 7)],
    )
    assert plan_batch([changed], rows, USE_ID_ZERO) == BatchPlan(
        replaced_paths=("/data/b",),
        ledger=(LedgerEntry(changed.entry, DUPLICATE, None, "X", ExistingId(7), ()),),
    )


def test_a_previously_failed_file_is_retried():
    retried = parsed("a", sop="X")
    rows = DatabaseRows(ledger=[ledger_row("a", "failed", "X")])
    plan = plan_batch([retried], rows, USE_ID_ZERO)
    assert (plan.already_done, plan.replaced_paths, plan.changed_sops) == (0, ("/data/a",), ())
    assert plan.ledger == (ingested(retried, NewId(0)),)


def test_the_ledger_entry_of_a_read_file_carries_its_odd_value_tags():
    """Read files carry the tags of their odd values (none: an empty tuple, counted 0); a file
    that could not be read has none to carry (NULL in the ledger)."""
    odd = parsed("a")
    odd = odd._replace(instance=dataclasses.replace(odd.instance, odd_value_tags=("(0028,0008)",)))
    bad = Failed(entry("b"), "truncated")
    plan = plan_batch([odd, bad, parsed("c")], DatabaseRows(), USE_ID_ZERO)
    assert [e.odd_value_tags for e in plan.ledger] == [("(0028,0008)",), None, ()]


def test_ledger_rows_follow_the_batch_order():
    results = [
        parsed("a", sop="X"),
        Failed(entry("b"), "truncated"),
        parsed("c", sop="X"),
        parsed("d"),
    ]
    plan = plan_batch(results, DatabaseRows(), USE_ID_ZERO)
    assert [(e.entry.path, e.status) for e in plan.ledger] == [
        ("/data/a", INGESTED),
        ("/data/b", FAILED),
        ("/data/c", DUPLICATE),
        ("/data/d", INGESTED),
    ]


# --------------------------------------------------------------------------
# Persons
# --------------------------------------------------------------------------
def _person_outcome(policy: PersonPolicy, patient: str | None, persons=()) -> tuple:
    """(person_id of the new series, None) or (None, the ledger reason)."""
    plan = plan_batch([parsed("a", patient=patient)], DatabaseRows(persons=persons), policy)
    (row,) = plan.ledger
    if row.status == FAILED:
        assert plan.person_misses == 1 and not plan.instances
        return None, row.reason
    return plan.new_series[0].person_id, None


def test_a_mapped_patient_gets_its_person_under_either_policy():
    persons = [PersonMatch("P1", "42", 1)]
    assert _person_outcome(SKIP, "P1", persons) == (42, None)
    assert _person_outcome(USE_ID_ZERO, "P1", persons) == (42, None)


def test_the_patient_id_is_compared_case_insensitively():
    assert _person_outcome(SKIP, "p1", [PersonMatch("P1", "42", 1)]) == (42, None)


def test_use_id_zero_gives_person_zero_without_a_match_a_patient_id_or_a_table():
    assert _person_outcome(USE_ID_ZERO, "P1") == (0, None)
    assert _person_outcome(USE_ID_ZERO, None) == (0, None)
    no_table = PersonPolicy(MissingPersonPolicy.USE_ID_ZERO, None)
    assert _person_outcome(no_table, "P1") == (0, None)


def test_skip_fails_a_file_without_a_person_and_says_why():
    ref = patient_reference("P1")
    assert _person_outcome(SKIP, "P1") == (
        None,
        f"no person: patient {ref} is not in {MAPPING_TABLE} (missing_person_id_options: skip)",
    )
    assert _person_outcome(SKIP, None) == (
        None,
        "no person: the file has no PatientID (missing_person_id_options: skip)",
    )
    assert _person_outcome(SKIP, "") == _person_outcome(SKIP, None)
    no_table = PersonPolicy(MissingPersonPolicy.SKIP, None)
    assert _person_outcome(no_table, "P1") == (
        None,
        "no person: the mapping table does not exist (missing_person_id_options: skip)",
    )


@pytest.mark.parametrize("policy", [SKIP, USE_ID_ZERO])
def test_an_ambiguous_or_unusable_mapping_fails_the_file_under_either_policy(policy):
    ref = patient_reference("P1")
    assert _person_outcome(policy, "P1", [PersonMatch("P1", "1", 3)]) == (
        None,
        f"no person: patient {ref} maps to 3 different persons in the mapping table",
    )
    assert _person_outcome(policy, "P1", [PersonMatch("P1", "abc", 1)]) == (
        None,
        f"no person: patient {ref} maps to a person id that is not an integer",
    )


def test_reasons_never_hold_the_patient_id():
    _, reason = _person_outcome(SKIP, "JOHN^DOE")
    assert "JOHN" not in reason.upper()


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------
def test_resolve_fills_in_reserved_ids():
    assert resolve(ExistingId(5), 100) == 5
    assert resolve(NewId(2), 100) == 102


def test_statuses_and_policies_are_their_text_for_psycopg_and_strings():
    transformer = Transformer()
    for member in [*LedgerStatus, *MissingPersonPolicy]:
        for format_ in (PyFormat.TEXT, PyFormat.AUTO):
            assert bytes(transformer.get_dumper(member, format_).dump(member)) == (
                member.value.encode()
            )
        assert str(member) == f"{member}" == member.value and member == member.value
    assert MissingPersonPolicy.parse(" Use_ID_Zero ") is MissingPersonPolicy.USE_ID_ZERO
    assert LedgerRow("/p", 1, 1, "failed", None).status is LedgerStatus.FAILED  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Acquisition profiles (the workers send one per series and chunk)
# --------------------------------------------------------------------------
def test_a_new_series_takes_its_first_files_profile():
    first = parsed("a")
    second = parsed("b")._replace(findings=InstanceFindings())  # same series, no profile sent
    (series,) = plan_batch([first, second], DatabaseRows(), USE_ID_ZERO).new_series
    assert series.acquisition == (KVP,)


def test_a_profile_read_from_a_file_without_person_serves_the_series_next_file():
    other = AcquisitionValue("00180050", "SliceThickness", "DS", "5", 5.0)
    nobody = parsed("a", patient="NOBODY")._replace(findings=InstanceFindings(acquisition=(other,)))
    mapped = parsed("b", patient="P1")._replace(findings=InstanceFindings())
    rows = DatabaseRows(persons=[PersonMatch("P1", "11", 1)])
    plan = plan_batch([nobody, mapped], rows, SKIP)
    (series,) = plan.new_series
    assert (series.person_id, series.acquisition) == (11, (other,))
