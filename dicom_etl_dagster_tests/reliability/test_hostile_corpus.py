"""Hostile input: every pydicom sample plus generated variants (truncated at many offsets,
random byte flips, zero-length, non-DICOM, huge / deeply nested / undefined-length sequences,
odd character sets, invalid dates, over-long values, missing and padded UIDs, duplicated SOP
Instance UIDs), ingested by one real `ingest_metadata` run into a real PostgreSQL.

Every file is ingested or failed with a one-line reason, the run does not crash, and the counts
reconcile exactly: ledger rows = files, statuses = the materialization's figures, metadata rows
= the pydicom-computed count for every ingested clean file, one ingested path per SOP instance.

Not repeated here (see the existing tests): the property-based test over read_instance
(core/dicom/test_reader.py::test_damaged_files_never_raise_anything_else), truncation at every
element of several files (core/dicom/test_reader.py::test_truncated_everywhere_in_other_files),
the long StudyDescription cut (assets/test_imaging.py::test_long_study_description_is_cut_in_procedure_only).
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_etl_dagster.core.dicom.reader import DicomReadError, read_instance
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.helpers import ledger as read_ledger
from dicom_etl_dagster_tests.helpers import options, run_job
from dicom_etl_dagster_tests.reliability import hostile
from dicom_etl_dagster_tests.reliability.figures import FIGURES, reason_class

MI = "cdmmedicalimaging"


def _materialization(result, asset: str) -> dict:
    found = [
        m
        for m in result.asset_materializations_for_node("ingest_dicom_folder")
        if m.asset_key.to_user_string() == asset
    ]
    assert len(found) == 1
    return {k: v.value for k, v in found[0].metadata.items()}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, postgres_server):
    """One ingest of the whole hostile corpus (module scope: ~450 files, shared by the tests)."""
    import psycopg

    from dicom_etl_dagster_tests.conftest import fresh_database

    root = tmp_path_factory.mktemp("hostile")
    with warnings.catch_warnings():  # pydicom warns about the invalid values written on purpose
        warnings.simplefilter("ignore")
        corpus = hostile.hostile_corpus(root)
    with fresh_database(postgres_server, "t_hostile") as url:
        result = run_job(
            "ingest_metadata",
            url,
            options(dicom_files_abs_path=str(root), ingest_batch_size=25, parse_workers=2),
            raise_on_error=False,
        )
        with psycopg.connect(url, autocommit=True) as conn:
            yield {"root": root, "corpus": corpus, "result": result, "conn": conn}


def ledger(conn) -> dict[str, tuple]:
    rows = conn.execute(
        f"SELECT file_path, status, error_message, sop_instance_uid, image_occurrence_id"
        f" FROM {MI}.dicom_ingest_log"
    ).fetchall()
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths)), "a path has more than one ledger row"
    return {r[0]: r[1:] for r in rows}


def test_the_run_completes_and_every_file_has_one_reasoned_outcome(corpus_run):
    result, corpus, conn = corpus_run["result"], corpus_run["corpus"], corpus_run["conn"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    ledger = read_ledger(conn)
    assert set(ledger) == {str(p) for p in corpus}, "every file gets exactly one ledger row"
    for path, (status, reason, sop, image_id) in ledger.items():
        assert status in {"ingested", "duplicate", "failed"}
        if status == "failed":
            assert reason and reason.strip() and "\n" not in reason, (path, reason)
            assert "Traceback" not in reason, (path, reason)
        else:
            assert sop and image_id, path

    statuses = Counter(s for s, *_ in ledger.values())
    FIGURES["files_tried"] += len(corpus)
    FIGURES["files_ingested"] += statuses["ingested"]
    FIGURES["files_duplicate"] += statuses["duplicate"]
    FIGURES["files_failed"] += statuses["failed"]
    FIGURES["failures_by_reason"].update(
        reason_class(r) for s, r, *_ in ledger.values() if s == "failed"
    )


def test_expected_outcomes_of_the_generated_variants(corpus_run):
    ledger = read_ledger(corpus_run["conn"])
    wrong = {}
    for path, expected in corpus_run["corpus"].items():
        if expected is None:
            continue
        status, reason, *_ = ledger[str(path)]
        want_status, want_reason = expected if isinstance(expected, tuple) else (expected, None)
        if status != want_status or (want_reason and not (reason or "").startswith(want_reason)):
            wrong[path.name] = (status, reason, expected)
    assert not wrong, wrong


def test_counts_reconcile_exactly(corpus_run):
    result, conn = corpus_run["result"], corpus_run["conn"]
    ledger = read_ledger(conn)
    statuses = Counter(s for s, *_ in ledger.values())
    figures = _materialization(result, "dicom_file_metadata")
    assert figures["files_seen"] == len(corpus_run["corpus"]) == len(ledger)
    assert (figures["files_ingested"], figures["files_duplicate"], figures["files_failed"]) == (
        statuses["ingested"],
        statuses["duplicate"],
        statuses["failed"],
    )
    assert figures["files_already_done"] == 0
    assert figures["rows_written"] == scalar(conn, f"SELECT count(*) FROM {MI}.dicom_file_metadata")

    # One ingested path per SOP instance; duplicates point at the ingested one's series.
    by_sop = defaultdict(list)
    for status, _reason, sop, image_id in ledger.values():
        if status != "failed":
            by_sop[sop].append((status, image_id))
    duplicates_found = 0
    for sop, group in by_sop.items():
        ingested = [g for g in group if g[0] == "ingested"]
        duplicates_found += max(0, len(ingested) - 1)
        assert len(ingested) == 1, (sop, group)
        assert {g[1] for g in group} == {ingested[0][1]}, sop
    assert (
        scalar(conn, f"SELECT count(DISTINCT sop_instance_id) FROM {MI}.dicom_file_metadata")
        == statuses["ingested"]
    )
    twice = scalar(
        conn,
        f"SELECT count(*) FROM (SELECT sop_instance_id FROM {MI}.dicom_file_metadata"
        " WHERE metadata_source_tag = '(0008,0018)' AND parent_sequence_id IS NULL"
        " GROUP BY 1 HAVING count(*) > 1) d",
    )
    duplicates_found += twice
    FIGURES["duplicates_found"] += duplicates_found
    assert twice == 0

    # Metadata rows: exactly what plain pydicom counts, for every ingested unmutated file.
    clean = [
        p
        for p, e in corpus_run["corpus"].items()
        if ledger[str(p)][0] == "ingested"
        and "c_flipped" not in p.parts
        and "b_truncated" not in p.parts
        and "e_structures" not in p.parts
    ]
    assert len(clean) > 50
    counts = dict(
        conn.execute(
            f"SELECT sop_instance_id, count(*) FROM {MI}.dicom_file_metadata GROUP BY 1"
        ).fetchall()
    )
    mismatched = {
        p.name: (counts.get(ledger[str(p)][2]), expected_metadata_rows(p))
        for p in clean
        if counts.get(ledger[str(p)][2]) != expected_metadata_rows(p)
    }
    assert not mismatched, mismatched
    # series / studies reconcile with the ledger
    assert scalar(conn, f"SELECT count(*) FROM {MI}.image_occurrence") == scalar(
        conn,
        f"SELECT count(DISTINCT image_occurrence_id) FROM {MI}.dicom_ingest_log WHERE status = 'ingested'",
    )


def test_structures_are_stored_whole(corpus_run):
    conn, root = corpus_run["conn"], corpus_run["root"]
    ledger = read_ledger(conn)
    huge = ledger[str(root / "e_structures" / "huge_sequence_3000_items.dcm")]
    rows = scalar(
        conn, f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s", [huge[2]]
    )
    assert rows == expected_metadata_rows(root / "e_structures" / "huge_sequence_3000_items.dcm")
    assert (
        scalar(
            conn,
            f"SELECT sequence_length FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
            " AND is_sequence",
            [huge[2]],
        )
        == 3000
    )
    nested = ledger[str(root / "e_structures" / "nested_depth_40.dcm")]
    # 40 sequence rows + the leaf + the top-level elements
    depth_rows = scalar(
        conn,
        f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s AND is_sequence",
        [nested[2]],
    )
    assert depth_rows == 40
    # Deeper than Python's recursion allows: the file fails with that reason, the run goes on.
    for depth in (400, 5000):
        status, reason, *_ = ledger[str(root / "e_structures" / f"nested_depth_{depth}.dcm")]
        assert status == "failed" and (
            "RecursionError" in reason or "nested too deeply" in reason
        ), (depth, status, reason)


def test_values_from_hostile_files(corpus_run):
    conn, root = corpus_run["conn"], corpus_run["root"]
    ledger = read_ledger(conn)
    original = ledger[str(root / "a_aaa_original" / "ct_original.dcm")]
    for name in ("uid_trailing_nul", "uid_trailing_spaces"):
        status, _r, sop, image_id = ledger[str(root / "f_values" / f"{name}.dcm")]
        assert (status, sop, image_id) == ("duplicate", original[2], original[3]), name
    long_sop = ledger[str(root / "f_values" / "long_values.dcm")][2]
    source_value = scalar(
        conn,
        f"SELECT p.procedure_source_value FROM cdmdefault.procedure_occurrence p JOIN"
        f" {MI}.image_occurrence i USING (procedure_occurrence_id) JOIN {MI}.dicom_ingest_log l"
        " ON l.image_occurrence_id = i.image_occurrence_id WHERE l.sop_instance_uid = %s",
        [long_sop],
    )
    assert source_value == "S" * 50
    date = scalar(
        conn,
        f"SELECT p.procedure_date FROM cdmdefault.procedure_occurrence p JOIN {MI}.image_occurrence i"
        f" USING (procedure_occurrence_id) JOIN {MI}.dicom_ingest_log l ON l.image_occurrence_id ="
        " i.image_occurrence_id WHERE l.file_path = %s",
        [str(root / "f_values" / "bad_date_study_only.dcm")],
    )
    assert str(date) == "2023-06-15"
    utf8_sop = ledger[str(root / "f_values" / "charset_utf8.dcm")][2]
    stored = scalar(
        conn,
        f"SELECT metadata_source_value FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
        " AND metadata_source_tag = '(0008,1030)'",
        [utf8_sop],
    )
    assert "Ünïcødé ☢ 検査" in stored


# --------------------------------------------------------------------------
# Property test: structural mutations (extends core/dicom/test_reader.py's byte-overwrite test
# with insertions, deletions and extreme values written over length fields)
# --------------------------------------------------------------------------
MUTATION_SOURCES = {
    p.name: p.read_bytes()
    for p in (hostile.CT_SMALL, hostile.RTPLAN, hostile.TEST_FILES_DIR / "test-SR.dcm")
}
EXTREMES = [
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xfe\xff\xff\x7f",
    b"\xff\xff",
    b"\x00\x00",
    b"\xfe\xff\x00\xe0",
    b"\xfe\xff\xdd\xe0",
    b"SQ\x00\x00",
    b"UN\x00\x00",
]


@st.composite
def structurally_mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(MUTATION_SOURCES[draw(st.sampled_from(sorted(MUTATION_SOURCES)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "extreme"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            value = draw(st.sampled_from(EXTREMES))
            data[at : at + len(value)] = value
    return bytes(data)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
@given(data=structurally_mutated())
def test_structural_mutations_give_rows_or_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "mutated.dcm"
    path.write_bytes(data)
    try:
        instance = read_instance(path)
    except DicomReadError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        FIGURES["failures_by_reason"]["(property test) " + reason_class(str(exc))] += 1
    else:
        assert instance.sop_instance_uid and instance.elements
    FIGURES["property_examples"] += 1
