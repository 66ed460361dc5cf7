"""``phi_policy``: the Table E.1-1 data (``confidentiality_profile``) checked against
pydicom's dictionary, and the row filter (``phi``) on every sample file pydicom ships and on
a file built here with PHI at every level, both read paths. Expected rows are counted with
plain pydicom (``phi_samples``)."""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

import pytest
from pydicom.datadict import DicomDictionary, tag_for_keyword

from dicom_etl_dagster.core.analytics.extract import instance_findings
from dicom_etl_dagster.core.dicom import confidentiality_profile as profile
from dicom_etl_dagster.core.dicom.phi import drop_phi
from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster.core.ingest.file_scan import FileEntry
from dicom_etl_dagster.core.ingest.metadata_copy import render_metadata
from dicom_etl_dagster.core.ingest.parse_pool import Parsed, parse_file
from dicom_etl_dagster.core.ingest.status import PhiPolicy
from dicom_etl_dagster_tests import analytics_samples
from dicom_etl_dagster_tests.dicom_samples import (
    accepted_sample_files,
    expected_metadata_rows,
    read_rows,
)
from dicom_etl_dagster_tests.phi_samples import (
    KEPT_FOR_OMOP,
    PHI_KEYWORDS,
    goes,
    rows_under_drop,
    write_phi_instance,
)

ACCEPTED = accepted_sample_files()
TABLE_LINE = re.compile(r'^\s+0x([0-9A-F]{8}): "([XZDU/*]+)",  # (.+)$', re.M)


def _spelling(name: str) -> str:
    """A name without case and spaces: the table and pydicom's dictionary capitalise a few
    names differently ("Field Of View"), and pydicom writes "GenerationMode" in one."""
    return name.casefold().replace(" ", "")


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------
def test_every_tag_of_the_table_carries_its_name_in_pydicom_s_dictionary():
    """Tag and name of each entry come from the standard's table; pydicom's dictionary is a
    second, independent transcription of the standard: a wrong digit shows as a wrong name."""
    lines = TABLE_LINE.findall(Path(profile.__file__).read_text())
    assert len(lines) == len(profile.BASIC_PROFILE_ACTIONS) == 617
    for tag_hex, action, name in lines:
        tag = int(tag_hex, 16)
        assert profile.BASIC_PROFILE_ACTIONS[tag] == action
        assert tag in DicomDictionary, f"{tag_hex} {name}"
        assert _spelling(name.split(" (see Note")[0]) == _spelling(DicomDictionary[tag][2]), tag_hex


def test_well_known_attributes_have_the_standard_s_actions():
    expected = {
        "PatientName": "Z",
        "PatientID": "Z/D",
        "PatientBirthDate": "Z",
        "PatientAddress": "X",
        "InstitutionName": "X/Z/D",
        "OtherPatientIDsSequence": "X",
        "ReferencedPatientSequence": "X",
        "StudyInstanceUID": "U",
        "StudyDate": "Z",
        "ContentSequence": "D",
        "ReferencedImageSequence": "X/Z/U*",
    }
    actions = {k: profile.BASIC_PROFILE_ACTIONS.get(tag_for_keyword(k)) for k in expected}
    assert actions == expected
    # Not in the table: the OMOP rows' other sources, and what analytics codes come from.
    for keyword in ("Modality", "BodyPartExamined", "ProcedureCodeSequence", "SliceThickness"):
        assert not profile.in_basic_profile(tag_for_keyword(keyword)), keyword
    assert not any(tag >> 16 & 1 for tag in profile.BASIC_PROFILE_TAGS)  # privates: a rule


def test_curve_and_overlay_groups_are_masks():
    for group in range(0x6000, 0x6020, 2):
        assert profile.in_basic_profile(group << 16 | 0x3000)  # Overlay Data
        assert profile.in_basic_profile(group << 16 | 0x4000)  # Overlay Comments
        assert not profile.in_basic_profile(group << 16 | 0x0010)  # Overlay Rows
    for group in range(0x5000, 0x5020, 2):
        assert profile.in_basic_profile(group << 16 | 0x3000)  # Curve Data: every element
        assert profile.in_basic_profile(group << 16 | 0x0005)
    assert not profile.in_basic_profile(0x70000010)
    assert profile.DICOM_EDITION in profile.__doc__ and profile.SOURCE_URL.replace(
        '"', ""
    ).startswith("https://github.com/innolitics/dicom-standard/")


def test_policy_names():
    assert PhiPolicy.parse(" Drop ") is PhiPolicy.DROP
    assert PhiPolicy.parse("KEEP") is PhiPolicy.KEEP
    with pytest.raises(ValueError):
        PhiPolicy.parse("remove")


# --------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------
def _assert_consistent(rows) -> None:
    """What the writer relies on: rows numbered 0..n-1, parents are earlier sequence rows,
    items numbered 0, 1, ... in order of appearance, each item under one sequence."""
    sequence_of_item: dict[int, int] = {}
    for position, row in enumerate(rows):
        assert row.index == position
        assert (row.parent_sequence_index is None) == (row.parent_item_index is None)
        if row.parent_sequence_index is None:
            continue
        assert row.parent_sequence_index < position
        assert rows[row.parent_sequence_index].is_sequence
        item = row.parent_item_index
        if item not in sequence_of_item:
            assert item == len(sequence_of_item), "items numbered in order, without holes"
            sequence_of_item[item] = row.parent_sequence_index
        assert sequence_of_item[item] == row.parent_sequence_index


def _survives(rows, row) -> bool:
    """Neither the row nor any sequence it is nested in goes."""
    while row is not None:
        if row.is_private or goes(_tag(row.tag), row.parent_sequence_index is None):
            return False
        parent = row.parent_sequence_index
        row = None if parent is None else rows[parent]
    return True


def _assert_nothing_of_the_profile(rows) -> None:
    for row in rows:
        assert not row.is_private, row
        assert not goes(_tag(row.tag), row.parent_sequence_index is None), row


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pydicom"])
def test_drop_on_every_sample_file(fast_path):
    assert len(ACCEPTED) > 50
    for path in ACCEPTED:
        rows = read_rows(path, fast_path)
        kept, dropped = drop_phi(rows)
        assert (len(kept), dropped) == rows_under_drop(path), path.name
        _assert_nothing_of_the_profile(kept)
        _assert_consistent(kept)

        # The rows left are the file's rows, in the file's order, with only their numbers new.
        def content(r):
            return (r.tag, r.vr, r.value_json, r.sequence_length, r.private_creator)

        assert [content(r) for r in kept] == [content(r) for r in rows if _survives(rows, r)]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pydicom"])
def test_phi_at_every_level_is_dropped_and_the_omop_keys_stay(tmp_path, fast_path):
    path = tmp_path / "phi.dcm"
    ds = write_phi_instance(path)
    rows = read_rows(path, fast_path)
    kept, dropped = drop_phi(rows)
    assert len(rows) == expected_metadata_rows(path)
    assert (len(kept), dropped) == rows_under_drop(path)
    _assert_consistent(kept)
    instance = read_instance(path, fast_path=fast_path)
    rendered = render_metadata(dataclasses.replace(instance, elements=kept))
    assert rendered.row_count == len(kept)
    assert rendered.item_count == len({r.parent_item_index for r in kept} - {None})
    tags = collections.Counter(r.tag for r in kept)
    for keyword in PHI_KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" not in tags, keyword
    assert not any(r.is_private for r in kept)
    # The OMOP keys and dates are kept at the top level, with their values.
    top = {r.tag: r.value_json for r in kept if r.parent_sequence_index is None}
    for tag in KEPT_FOR_OMOP:
        keyword = DicomDictionary[tag][4]
        if keyword in ds:
            assert f'"{ds[keyword].value}"' in top[f"({tag >> 16:04X},{tag & 0xFFFF:04X})"]
    # The kept functional-groups sequence keeps its one item, without the item's StudyDate
    # and institution, and the frame item without its FrameAcquisitionDateTime.
    groups = next(r for r in kept if r.keyword == "PerFrameFunctionalGroupsSequence")
    assert groups.sequence_length == 1
    inside = [r.keyword for r in kept if r.parent_sequence_index is not None]
    assert inside == ["FrameContentSequence", "StackID", "InStackPositionNumber"]


def test_analytics_see_every_row_and_the_eav_gets_the_rest(tmp_path):
    """A TID 1500 report: its measurements come from the Content Sequence, which the profile
    removes (action D); parse_file makes the findings before the drop."""
    image = write_phi_instance(tmp_path / "ct.dcm")
    report = analytics_samples.write_measurement_report(tmp_path, image)
    entry = FileEntry(str(report), 0, 0)
    keep = parse_file(entry, phi_policy=PhiPolicy.KEEP)
    drop = parse_file(entry, phi_policy=PhiPolicy.DROP)
    assert isinstance(keep, Parsed) and isinstance(drop, Parsed)
    full = read_instance(report)
    assert drop.findings == keep.findings == instance_findings(full)
    assert drop.findings.numeric, "the report's NUM items are findings"
    assert keep.phi_dropped == 0 and keep.metadata.row_count == len(full.elements)
    assert (drop.metadata.row_count, drop.phi_dropped) == rows_under_drop(report)
    assert "(0040,A730)" not in drop.metadata.template  # no Content Sequence row
    assert drop.instance.patient_id == keep.instance.patient_id == image.PatientID
