"""Rows rendered by the parse worker (render_metadata) and filled by the writer (fill) are
exactly the dicom_file_metadata rows the writer used to build as tuples for copy.write_row.

The oracle, ``expected_rows``, is that old per-row tuple computed straight from a file's
ElementRows, column by column. Every bundled pydicom file that read_instance accepts goes
through render -> fill -> COPY into a real PostgreSQL and is read back; so do hand-made rows
holding everything COPY text and str.format treat specially (tab, backslash, newline,
carriage return, braces such as ``{0}``, a literal ``\\N``, NUL, non-ASCII), and a folder
ingested end to end through the worker pool.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import warnings
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.db.partitions import ensure_partitions
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.dicom.reader import DicomInstance, ElementRow, read_instance
from dicom_etl_dagster.core.ingest.metadata_copy import (
    COLUMNS,
    DataElementIds,
    fill,
    render_metadata,
    timestamp_fields,
)
from dicom_etl_dagster.core.ingest.private_entries import entry_key
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import PersonMapping
from dicom_etl_dagster_tests.conftest import fresh_database
from dicom_etl_dagster_tests.dicom_samples import (
    PYDICOM_DATA,
    PYDICOM_TEST_FILES,
    accepted_sample_files,
    clone_instance,
)
from dicom_etl_dagster_tests.private_samples import expected_entry_tag

SAMPLES = PYDICOM_TEST_FILES
SCHEMAS = Schemas()
TABLE = sql.Identifier(SCHEMAS.medical_imaging, "dicom_file_metadata")

# The old writer's column order, written out here so that the oracle does not share
# metadata_copy.COLUMNS (whose order is the template's).
ORACLE_COLUMNS = (
    "metadata_id",
    "data_element_id",
    "metadata_source_keyword",
    "metadata_source_tag",
    "metadata_source_group_number",
    "metadata_source_value_representation",
    "metadata_source_value_multiplicity",
    "metadata_source_value",
    "is_sequence",
    "sequence_length",
    "parent_sequence_id",
    "parent_dataset_id",
    "is_private",
    "private_creator",
    "sop_instance_id",
    "instance_number",
    "image_occurrence_id",
    "etl_created_datetime",
    "etl_modified_datetime",
)
# Ids beyond the int4 range: the bigint columns must come out whole.
FIRST_METADATA_ID = 5_000_000_123
FIRST_DATASET_ID = 7_000_000_456
IMAGE_OCCURRENCE_ID = 42
NOW = dt.datetime(2024, 2, 29, 23, 59, 58, 123456)


ACCEPTED = accepted_sample_files()


# --------------------------------------------------------------------------
# The oracle: the old writer's tuple for every row
# --------------------------------------------------------------------------
def _postgres_text(value: str | None, limit: int) -> str | None:
    return None if value is None else value.replace("\x00", "")[:limit]


def _key(e: ElementRow) -> str:
    """What a row's data_element_id field looks up: its tag, with its creator if private."""
    return entry_key(e.dictionary_tag, e.is_private, _postgres_text(e.private_creator, 255))


def expected_rows(
    instance: DicomInstance,
    metadata_id: int,
    dataset_id: int,
    data_elements: dict[str, int],
    image_occurrence_id: int,
    now: dt.datetime,
) -> list[tuple]:
    return [
        (
            metadata_id + e.index,
            data_elements.get(_key(e)),
            e.keyword,
            e.tag,
            e.group,
            e.vr,
            e.vm,
            e.value_json,
            e.is_sequence,
            e.sequence_length,
            None if e.parent_sequence_index is None else metadata_id + e.parent_sequence_index,
            None if e.parent_item_index is None else dataset_id + e.parent_item_index,
            e.is_private,
            _postgres_text(e.private_creator, 255),
            instance.sop_instance_uid,
            instance.instance_number,
            image_occurrence_id,
            now,
            now,
        )
        for e in instance.elements
    ]


def some_data_element_ids(instance: DicomInstance) -> DataElementIds:
    """Ids for every other distinct entry key: the rest must come out as NULL."""
    tags = sorted({_key(e) for e in instance.elements})
    return DataElementIds({tag: 1000 + n for n, tag in enumerate(tags) if n % 2 == 0})


# --------------------------------------------------------------------------
# Writing through render -> fill -> COPY and reading back
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conn(postgres_server):
    """One database for the module (a fresh one per parametrized case would be slow)."""
    with (
        fresh_database(postgres_server, "metadata_copy") as url,
        psycopg.connect(url, autocommit=True) as connection,
    ):
        ensure_tables(connection, SCHEMAS)
        # The rows get ids of their own, not the sequence's: their partition, as the writer
        # would create it for ids it reserves.
        ensure_partitions(
            connection, Tables(SCHEMAS), FIRST_METADATA_ID + 100_000, from_id=FIRST_METADATA_ID
        )
        yield connection


def copy_and_read_back(
    conn: psycopg.Connection, instance: DicomInstance, data_elements: DataElementIds
) -> list[tuple]:
    """What PostgreSQL holds after COPY of the filled template (rolled back afterwards)."""
    rendered = render_metadata(instance)
    text = fill(
        rendered,
        FIRST_METADATA_ID,
        FIRST_DATASET_ID,
        IMAGE_OCCURRENCE_ID,
        data_elements,
        timestamp_fields(NOW.isoformat(sep=" ")),
    )
    with conn.transaction(force_rollback=True):
        with conn.cursor().copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(
                TABLE, sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
            )
        ) as copy:
            copy.write(text)
        return conn.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY metadata_id").format(
                sql.SQL(", ").join(map(sql.Identifier, ORACLE_COLUMNS)), TABLE
            )
        ).fetchall()


def _same(stored, expected) -> bool:
    # == alone would take True for 1; the reader's VR may be pydicom's VR, a str subclass.
    return stored == expected and isinstance(stored, bool) == isinstance(expected, bool)


def assert_same_rows(stored: list[tuple], expected: list[tuple]) -> None:
    assert len(stored) == len(expected)
    for got, want in zip(stored, expected):
        differing = {
            name: (g, w) for name, g, w in zip(ORACLE_COLUMNS, got, want) if not _same(g, w)
        }
        assert not differing, f"row {want[3]} (metadata_id {want[0]}): {differing}"


def test_the_bundled_files_cover_the_interesting_cases() -> None:
    names = {p.name for p in ACCEPTED}
    # Private tags, big-endian, nested sequences, SR content tree, waveform.
    assert {
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "test-SR.dcm",
        "waveform_ecg.dcm",
    } <= names
    assert len(ACCEPTED) > 100


@pytest.mark.parametrize("path", ACCEPTED, ids=lambda p: str(p.relative_to(PYDICOM_DATA)))
def test_rows_of_a_sample_file_are_the_old_tuple_rows(conn, path: Path) -> None:
    instance = read_instance(path)
    data_elements = some_data_element_ids(instance)
    expected = expected_rows(
        instance, FIRST_METADATA_ID, FIRST_DATASET_ID, data_elements, IMAGE_OCCURRENCE_ID, NOW
    )
    assert_same_rows(copy_and_read_back(conn, instance, data_elements), expected)


# --------------------------------------------------------------------------
# Hand-made rows: every character that COPY text or str.format treats specially
# --------------------------------------------------------------------------
HOSTILE_TEXT = "tab\there {0} {} }{ {{x}} {d[(0008,0016)]} {o} \\N back\\slash new\nline cr\rlf\r\n Grüße 東京 😀"


def _row(index: int, tag: str, **fields) -> ElementRow:
    values = dict(
        index=index,
        parent_sequence_index=None,
        parent_item_index=None,
        tag=tag,
        group=tag[1:5],
        dictionary_tag=tag,
        keyword=None,
        name=None,
        vr="LO",
        vm="1",
        value_json=None,
        is_sequence=False,
        sequence_length=None,
        is_private=False,
        private_creator=None,
    )
    values.update(fields)
    return ElementRow(**values)


def hostile_instance(instance_number: int | None) -> DicomInstance:
    creator = (
        "ACME\x00 {0}\t\\ Créateur\n" + "x" * 300
    )  # NUL gone and cut to 255, as the writer did
    rows = [
        _row(
            0, "(0008,0005)", keyword="SpecificCharacterSet", vr="CS", value_json='["ISO_IR 192"]'
        ),
        _row(1, "(0008,0016)", keyword="SOPClassUID", vr="UI", value_json="{0}"),
        _row(2, "(0020,4000)", keyword="ImageComments", vr="LT", value_json=HOSTILE_TEXT),
        _row(
            3,
            "(0010,0010)",
            keyword="PatientName",
            vr="PN",
            vm="1",
            value_json=json.dumps([{"Alphabetic": "Müller^Jürgen {1}\t\x00"}], ensure_ascii=False),
        ),
        _row(4, "(0018,1000)", keyword="Device{Serial}Number", value_json="\\N"),
        _row(
            5,
            "(0008,1115)",
            keyword="ReferencedSeriesSequence",
            vr="SQ",
            vm="1",
            is_sequence=True,
            sequence_length=3,
        ),
        _row(
            6,
            "(0020,000E)",
            keyword="SeriesInstanceUID",
            vr="UI",
            parent_sequence_index=5,
            parent_item_index=0,
            value_json='["1.2.3"]',
        ),
        _row(
            7,
            "(0008,1140)",
            keyword="ReferencedImageSequence",
            vr="SQ",
            is_sequence=True,
            sequence_length=1,
            parent_sequence_index=5,
            parent_item_index=2,
        ),
        _row(
            8,
            "(0008,1155)",
            keyword="ReferencedSOPInstanceUID",
            vr="UI",
            parent_sequence_index=7,
            parent_item_index=3,
            value_json='["1.2.3.4"]',
        ),
        _row(
            9,
            "(0009,0010)",
            group="0009",
            name="Private Creator",
            is_private=True,
            private_creator=creator,
            value_json=json.dumps([creator], ensure_ascii=False),
        ),
        _row(
            10,
            "(0009,1001)",
            is_private=True,
            vr="UN",
            vm="1",
            private_creator=creator,
            value_json="",
            name="Name\twith\\tab {and} braces",
        ),
        _row(11, "(60xx,3000)", keyword="OverlayData", vr="OW", value_json='["AAEC"]'),
        _row(12, "(0011,0010)", is_private=True, private_creator="", value_json="[]", vm="0"),
    ]
    return DicomInstance(
        sop_instance_uid="1.2.{3}\t4\\5",
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        patient_id=None,
        procedure_date=dt.date(2024, 1, 1),
        image_date=dt.date(2024, 1, 1),
        study_description=None,
        modality=None,
        body_part_examined=None,
        instance_number=instance_number,
        elements=rows,
    )


@pytest.mark.parametrize("instance_number", [None, -7, 2**31 - 1])
def test_rows_with_special_characters_are_the_old_tuple_rows(conn, instance_number) -> None:
    instance = hostile_instance(instance_number)
    private = _key(instance.elements[10])
    assert private.startswith("(0009,1001)@")
    data_elements = DataElementIds(
        {"(0008,0016)": 16, "(0020,4000)": 4000, "(60xx,3000)": 6000, private: 91}
    )
    stored = copy_and_read_back(conn, instance, data_elements)
    assert_same_rows(
        stored,
        expected_rows(
            instance, FIRST_METADATA_ID, FIRST_DATASET_ID, data_elements, IMAGE_OCCURRENCE_ID, NOW
        ),
    )
    by_tag = {row[3]: row for row in stored}
    assert by_tag["(0020,4000)"][7] == HOSTILE_TEXT
    assert by_tag["(0008,0016)"][7] == "{0}"
    assert by_tag["(0018,1000)"][7] == "\\N"  # the two characters, not NULL
    assert by_tag["(0009,0010)"][13] == ("ACME {0}\t\\ Créateur\n" + "x" * 300)[:255]
    assert by_tag["(0010,0010)"][1] is None and by_tag["(0009,1001)"][1] == 91


def test_candidates_are_the_distinct_tags_first_seen_wins_cut_to_width() -> None:
    long_name = "N\x00" + "n" * 300
    rows = [
        _row(0, "(0009,0010)", is_private=True, name="Private Creator", vr="LO"),
        _row(1, "(0009,1001)", is_private=True, name=long_name, keyword="k\x00w", vr="UN"),
        _row(2, "(0009,1001)", is_private=True, name="another name", vr="LO"),
        _row(3, "(0008,0016)", keyword="SOPClassUID", name="SOP Class UID", vr="UI"),
        _row(4, "(0009,1001)", is_private=True, private_creator="A", vr="LO"),
        _row(5, "(0009,1001)", is_private=True, private_creator="B\x00", name="b", vr="SH"),
        _row(6, "(0009,1001)", is_private=True, private_creator="A", name="a", vr="SH"),
    ]
    instance = dataclasses.replace(hostile_instance(None), elements=rows)
    assert render_metadata(instance).new_tag_candidates == (
        ("(0009,0010)", "(0009,0010)", "Private Creator", None, "LO", True, None),
        ("(0009,1001)", "(0009,1001)", ("N" + "n" * 300)[:255], "kw", "UN", True, None),
        ("(0008,0016)", "(0008,0016)", "SOP Class UID", "SOPClassUID", "UI", False, None),
        # Private elements with a creator: one candidate per creator (cut as stored).
        (entry_key("(0009,1001)", True, "A"), "(0009,1001)", None, None, "LO", True, "A"),
        (entry_key("(0009,1001)", True, "B"), "(0009,1001)", "b", None, "SH", True, "B"),
    )


def test_counts_are_the_ids_a_file_needs() -> None:
    rendered = render_metadata(hostile_instance(1))
    assert (rendered.row_count, rendered.item_count) == (13, 4)  # items 0..3 (item 1 holds nothing)
    no_sequences = dataclasses.replace(
        hostile_instance(1), elements=hostile_instance(1).elements[:5]
    )
    assert render_metadata(no_sequences).item_count == 0


@pytest.mark.parametrize("dictionary_tag", ["", "12345678", "(0008]0016)"])
def test_a_tag_that_str_format_cannot_look_up_stops_the_worker(dictionary_tag) -> None:
    instance = dataclasses.replace(
        hostile_instance(1), elements=[_row(0, "(0008,0016)", dictionary_tag=dictionary_tag)]
    )
    with pytest.raises(ValueError, match="cannot be a str.format field name"):
        render_metadata(instance)


def test_rows_numbered_out_of_order_stop_the_worker() -> None:
    rows = hostile_instance(1).elements
    for broken in ([rows[1], rows[0]], [rows[0], rows[1]._replace(parent_sequence_index=2)]):
        with pytest.raises(ValueError):
            render_metadata(dataclasses.replace(hostile_instance(1), elements=broken))


# --------------------------------------------------------------------------
# End to end: worker pool, several files per batch, several batches
# --------------------------------------------------------------------------
HOSTILE_COMMENT = "tab\there {0} back\\slash new\nline cr\rlf }{ Grüße 東京 nul\x00end"
HOSTILE_CREATOR = "ACME {0}\tCREATOR }{"


def _hostile_file(target: Path) -> None:
    ds = clone_instance(
        SAMPLES / "CT_small.dcm",
        target,
        SpecificCharacterSet="ISO_IR 192",
        ImageComments=HOSTILE_COMMENT,
    )
    with warnings.catch_warnings():  # a tab is not valid in LO: on purpose
        warnings.simplefilter("ignore")
        ds.private_block(0x0071, HOSTILE_CREATOR, create=True).add_new(
            0x01, "LO", "private {1}\tvalue"
        )
        ds.save_as(target, enforce_file_format=False)


def test_ingested_rows_are_the_old_tuple_rows(db, tmp_path) -> None:
    folder = tmp_path / "dicom"
    _hostile_file(folder / "a_hostile.dcm")
    for name in ("CT_small.dcm", "rtplan.dcm", "test-SR.dcm", "MR_small_bigendian.dcm"):
        clone_instance(SAMPLES / name, folder / f"b_{name}")
    ensure_tables(db, SCHEMAS)
    state = prepare_run(
        db,
        SCHEMAS,
        "run",
        "use_id_zero",
        PersonMapping(
            SCHEMAS.medical_imaging, "mappingtable", "source_person_id", "source_patient_id"
        ),
        lambda message: None,
    )
    report, _ = ingest_folder(db, state, folder, batch_size=2, workers=2)
    assert report.status_counts["ingested"] == 5

    # Not the vocabulary's: every tag was added by the run, so every row has its entry; a
    # private element with a creator that of its creator and (gggg,xxee).
    entries = {
        (tag, creator): data_element_id
        for tag, creator, data_element_id in db.execute(
            "SELECT data_element_tag, private_creator, data_element_id"
            f" FROM {SCHEMAS.medical_imaging}.dicom_data_element"
        ).fetchall()
    }

    def entry_id(e: ElementRow) -> int:
        creator = _postgres_text(e.private_creator, 255)
        if e.is_private and creator:
            return entries[(expected_entry_tag(e.tag), creator)]
        return entries[(e.dictionary_tag, None)]

    dataset_ids: list[range] = []
    for path in sorted(folder.iterdir()):
        instance = read_instance(path)
        data_elements = {_key(e): entry_id(e) for e in instance.elements}
        stored = db.execute(
            sql.SQL("SELECT {}, {} FROM {} WHERE sop_instance_id = %s ORDER BY metadata_id").format(
                sql.SQL(", ").join(map(sql.Identifier, ORACLE_COLUMNS)),
                sql.SQL("(SELECT image_occurrence_id FROM {} WHERE image_series_uid = %s)").format(
                    sql.Identifier(SCHEMAS.medical_imaging, "image_occurrence")
                ),
                TABLE,
            ),
            [instance.series_instance_uid, instance.sop_instance_uid],
        ).fetchall()
        series_id = stored[0][-1]
        stored = [row[:-1] for row in stored]
        first_metadata_id = stored[0][0]
        first_dataset_id = _first_dataset_id(instance, stored)
        if first_dataset_id is not None:
            dataset_ids.append(
                range(first_dataset_id, first_dataset_id + render_metadata(instance).item_count)
            )
        now = stored[0][17]
        assert_same_rows(
            stored,
            expected_rows(
                instance, first_metadata_id, first_dataset_id, data_elements, series_id, now
            ),
        )
        assert all(row[1] is not None for row in stored)
        if path.name == "a_hostile.dcm":
            by_tag = {row[3]: row for row in stored}
            assert by_tag["(0020,4000)"][7] == json.dumps([HOSTILE_COMMENT], ensure_ascii=False)
            assert by_tag["(0071,1001)"][13] == HOSTILE_CREATOR
    dataset_ids.sort(key=lambda ids: ids.start)
    assert all(a.stop <= b.start for a, b in zip(dataset_ids, dataset_ids[1:])), (
        "files share dataset ids"
    )
    assert len(dataset_ids) >= 3  # rtplan, SR, ...: files with items


def _first_dataset_id(instance: DicomInstance, stored: list[tuple]) -> int | None:
    """The file's dataset id base, read off its first row inside an item (None: no items)."""
    for element, row in zip(instance.elements, stored):
        if element.parent_item_index is not None:
            return row[11] - element.parent_item_index
    return None
