"""Private dictionary entries per private creator, on real PostgreSQL.

Two creators sharing a tag get two entries, each metadata row points at its own creator's,
GE's is named from pydicom's private dictionary and the unknown creator's is unnamed; the
block number does not matter; a re-run and a second folder add nothing; both read paths key
the rows alike; and a dicom_data_element a user created (no private_creator column) is left
as it is and keyed by tag, as before.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from pydicom._private_dict import private_dictionaries

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.migrate import ensure_tables
from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster.core.ingest.metadata_copy import render_metadata
from dicom_etl_dagster.core.ingest.private_entries import (
    describe_private_entry,
    entry_key,
    private_entry_tag,
)
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import IngestReport, PersonMapping
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.core.db.test_migrations import _create_as_user, catalog
from dicom_etl_dagster_tests.private_samples import (
    GE,
    GE_STARTING_VIEW,
    OTHER,
    expected_entry_tag,
    write_private_file,
)
from dicom_etl_dagster_tests.written_rows import assert_ids_consistent, table_content

SCHEMAS = Schemas()
MI = SCHEMAS.medical_imaging


def _ingest(conn: psycopg.Connection, folder: Path, run_id: str = "run") -> IngestReport:
    mapping = PersonMapping(MI, "mappingtable", "source_person_id", "source_patient_id")
    state = prepare_run(conn, SCHEMAS, run_id, "use_id_zero", mapping, lambda message: None)
    return ingest_folder(conn, state, folder, 50, 1)[0]


def _entries(conn: psycopg.Connection) -> dict[int, dict]:
    cursor = conn.cursor(row_factory=dict_row)
    return {
        r["data_element_id"]: r
        for r in cursor.execute(f"SELECT * FROM {MI}.dicom_data_element").fetchall()
    }


def _private_rows(conn: psycopg.Connection, sop: str, per_creator: bool = True) -> dict[str, dict]:
    """The file's private metadata rows by tag, each with the entry it points at."""
    cursor = conn.cursor(row_factory=dict_row)
    entry_creator = "d.private_creator" if per_creator else "NULL"
    found = cursor.execute(
        f"SELECT m.metadata_source_tag, m.private_creator, m.data_element_id,"
        f" d.data_element_tag AS entry_tag, {entry_creator} AS entry_creator"
        f" FROM {MI}.dicom_file_metadata m"
        f" LEFT JOIN {MI}.dicom_data_element d USING (data_element_id)"
        f" WHERE m.sop_instance_id = %s AND m.is_private",
        [sop],
    ).fetchall()
    return {r["metadata_source_tag"]: r for r in found}


def _assert_own_entries(rows: dict[str, dict]) -> None:
    for tag, r in rows.items():
        assert r["entry_creator"] == r["private_creator"], r
        assert r["entry_tag"] == expected_entry_tag(tag), r


# --------------------------------------------------------------------------
# Keys and names, without a database
# --------------------------------------------------------------------------
def test_the_entry_of_a_private_tag_masks_its_block() -> None:
    assert private_entry_tag("(0019,1060)") == private_entry_tag("(0019,1160)") == "(0019,xx60)"
    assert private_entry_tag("(0019,FF0A)") == "(0019,xx0A)"
    assert private_entry_tag("(0019,0010)") == private_entry_tag("(0019,00FF)") == "(0019,00xx)"
    with pytest.raises(ValueError, match="no private block"):
        private_entry_tag("(0019,0501)")


def test_names_come_only_from_the_creators_own_dictionary() -> None:
    assert "0019xx60" in private_dictionaries[GE] and OTHER not in private_dictionaries
    ge = describe_private_entry("(0019,xx60)", GE)
    assert (ge.vr, ge.vm, ge.name) == GE_STARTING_VIEW
    assert describe_private_entry("(0019,xx60)", OTHER) == (None, None, None)
    # AGFA's dictionary has (0019,xx60) too, under another name: never GE's.
    agfa = describe_private_entry("(0019,xx60)", "AGFA").name
    assert agfa is not None and agfa != GE_STARTING_VIEW[2]
    assert describe_private_entry("(0019,00xx)", OTHER).name == "Private Creator"


def test_keys_differ_by_creator_and_keep_public_tags_as_they_are() -> None:
    assert entry_key("(0008,0016)", False, None) == "(0008,0016)"
    assert entry_key("(0019,1060)", True, None) == "(0019,1060)"  # no creator: its tag
    keys = {entry_key("(0019,1060)", True, c) for c in (GE, OTHER, "X]{0}\t")}
    assert len(keys) == 3 and all(k.startswith("(0019,1060)@") for k in keys)


def test_both_read_paths_key_private_rows_alike(tmp_path) -> None:
    path = tmp_path / "two.dcm"
    write_private_file(path, (0x10, GE, {0x60: ("SL", 3)}), (0x11, OTHER, {0x60: ("LO", "probe")}))
    fast = render_metadata(read_instance(path, fast_path=True))
    slow = render_metadata(read_instance(path, fast_path=False))
    assert fast.template == slow.template
    assert fast.new_tag_candidates == slow.new_tag_candidates
    private = {c[0]: c[6] for c in fast.new_tag_candidates if c[5]}
    assert sorted(private.values()) == [GE, GE, OTHER, OTHER]


# --------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------
def test_two_creators_sharing_a_tag_get_an_entry_each(db, tmp_path) -> None:
    ensure_tables(db, SCHEMAS)
    folder = tmp_path / "dicom"
    ge = write_private_file(folder / "ge.dcm", (0x10, GE, {0x60: ("SL", 3)}))
    other = write_private_file(folder / "other.dcm", (0x10, OTHER, {0x60: ("LO", "probe")}))
    assert dict(_ingest(db, folder).status_counts) == {"ingested": 2}

    private = [
        (e["data_element_tag"], e["private_creator"], e["data_element_name"])
        + (e["value_representation"], e["value_multiplicity"], e["data_element_keyword"])
        for e in _entries(db).values()
        if e["is_private"]
    ]
    assert sorted(private) == [
        ("(0019,00xx)", GE, "Private Creator", "LO", "1", None),
        ("(0019,00xx)", OTHER, "Private Creator", "LO", "1", None),
        ("(0019,xx60)", GE, "Starting view", "SL", "1", None),
        ("(0019,xx60)", OTHER, None, "LO", None, None),  # unknown: the file's VR, no name
    ]
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {MI}.dicom_data_element WHERE data_element_tag LIKE '(0019,%%'",
        )
        == 4
    )
    ge_rows, other_rows = (_private_rows(db, str(ds.SOPInstanceUID)) for ds in (ge, other))
    assert set(ge_rows) == set(other_rows) == {"(0019,0010)", "(0019,1060)"}
    _assert_own_entries(ge_rows)
    _assert_own_entries(other_rows)
    assert ge_rows["(0019,1060)"]["data_element_id"] != other_rows["(0019,1060)"]["data_element_id"]
    assert_ids_consistent(db, SCHEMAS)


def test_block_numbers_do_not_matter_and_nothing_is_added_twice(db, tmp_path) -> None:
    ensure_tables(db, SCHEMAS)
    first = tmp_path / "first"
    ge = write_private_file(first / "ge.dcm", (0x10, GE, {0x60: ("SL", 3), 0x02: ("SL", 1)}))
    write_private_file(first / "other.dcm", (0x10, OTHER, {0x60: ("LO", "probe")}))
    _ingest(db, first)
    entries = _entries(db)
    by_key = {(e["data_element_tag"], e["private_creator"]): i for i, e in entries.items()}

    # Another folder, other blocks, both creators in one file, in the other order: a new run
    # (nothing cached) finds the entries there are and adds none.
    second = tmp_path / "second"
    swapped = write_private_file(
        second / "swapped.dcm",
        (0x10, OTHER, {0x60: ("LO", "probe")}),
        (0x11, GE, {0x60: ("SL", 4), 0x02: ("SL", 2)}),
    )
    far = write_private_file(second / "far.dcm", (0xFF, GE, {0x60: ("SL", 5)}), group=0x0019)
    assert dict(_ingest(db, second, run_id="second").status_counts) == {"ingested": 2}
    assert _entries(db) == entries
    rows = _private_rows(db, str(swapped.SOPInstanceUID))
    assert set(rows) == {"(0019,0010)", "(0019,0011)", "(0019,1060)", "(0019,1160)", "(0019,1102)"}
    _assert_own_entries(rows)
    assert rows["(0019,1160)"]["data_element_id"] == by_key[("(0019,xx60)", GE)]
    assert rows["(0019,1060)"]["data_element_id"] == by_key[("(0019,xx60)", OTHER)]
    assert rows["(0019,0011)"]["data_element_id"] == by_key[("(0019,00xx)", GE)]
    far_rows = _private_rows(db, str(far.SOPInstanceUID))
    assert far_rows["(0019,FF60)"]["data_element_id"] == by_key[("(0019,xx60)", GE)]
    first_ge = _private_rows(db, str(ge.SOPInstanceUID))
    assert first_ge["(0019,1002)"]["data_element_id"] == rows["(0019,1102)"]["data_element_id"]

    # Both folders again: nothing at all.
    content = table_content(db, SCHEMAS)
    again = _ingest(db, tmp_path, run_id="again")
    assert again.files_already_done == 4 and sum(again.status_counts.values()) == 0
    assert table_content(db, SCHEMAS) == content and _entries(db) == entries
    assert_ids_consistent(db, SCHEMAS)


def test_a_users_dicom_data_element_is_not_altered_and_keys_by_tag(db, tmp_path) -> None:
    """Without the private_creator column (a table the original plugin or a user created)
    the ingest works as before: one entry per private tag, whatever its creator."""
    db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(MI)))
    _create_as_user(db, "medical_imaging.sql", "dicom_data_element", MI)
    users = catalog(db, "dicom_data_element")
    ensure_tables(db, SCHEMAS)
    assert catalog(db, "dicom_data_element") == users

    folder = tmp_path / "dicom"
    ge = write_private_file(folder / "ge.dcm", (0x10, GE, {0x60: ("SL", 3)}))
    other = write_private_file(folder / "other.dcm", (0x11, OTHER, {0x60: ("LO", "probe")}))
    assert dict(_ingest(db, folder).status_counts) == {"ingested": 2}
    assert dict(_ingest(db, folder, run_id="again").status_counts) == {}
    private = sorted(e["data_element_tag"] for e in _entries(db).values() if e["is_private"])
    assert private == ["(0019,0010)", "(0019,0011)", "(0019,1060)", "(0019,1160)"]
    assert catalog(db, "dicom_data_element") == users
    for ds in (ge, other):
        rows = _private_rows(db, str(ds.SOPInstanceUID), per_creator=False).values()
        assert all(r["entry_tag"] == r["metadata_source_tag"] for r in rows)
