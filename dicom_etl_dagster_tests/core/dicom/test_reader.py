"""Tests for dicom_etl_dagster.core.dicom.reader on real DICOM data.

Every regular file bundled with pydicom is read; the expected rows are
computed independently with plain pydicom (a full ``dcmread(force=True)`` and
its own iteration), and broken variants of real files are generated in
tmp_path.  Nothing is mocked.
"""

from __future__ import annotations

import base64
import collections
import datetime
import json
import logging
import os
import random
import re
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import keyword_for_tag, private_dictionary_description
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicom_etl_dagster.core.dicom.reader import (
    PIXEL_DATA_TAGS,
    DicomInstance,
    DicomReadError,
    ElementRow,
    _decode_reason,
    read_instance,
)
from dicom_etl_dagster_tests.dicom_samples import expected_metadata_rows
from dicom_etl_dagster_tests.pydicom_corrections import corrected_attribute

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
# Written out here rather than imported, so the test does not trust the module.
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
NO_DATE_REASON = (
    "no usable date: SeriesDate, AcquisitionDate, ContentDate, StudyDate, "
    "AcquisitionDateTime and InstanceCreationDate are all missing or invalid"
)
TAG_RE = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")


def _all_bundled_files() -> list[Path]:
    # get_testdata_files() also lists folders; its default pattern only
    # covers bundled files (no download is attempted for it).
    files = {Path(p) for p in pydicom.data.get_testdata_files() if Path(p).is_file()}
    files |= {p for p in TEST_FILES_DIR.rglob("*") if p.is_file()}
    return sorted(files)


ALL_FILES = _all_bundled_files()


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(TEST_FILES_DIR))
    except ValueError:
        return str(path)


def _testfile(name: str) -> str:
    # Looked up in the package folder directly: get_testdata_file() may try to
    # download files that are not bundled.
    path = TEST_FILES_DIR / name
    assert path.is_file(), path
    return str(path)


def _outcome(path: str | os.PathLike) -> tuple[DicomInstance | None, DicomReadError | None]:
    """read_instance's result; any exception other than DicomReadError propagates."""
    try:
        return read_instance(path), None
    except DicomReadError as exc:
        return None, exc


def _tag_int(tag: str) -> int:
    match = TAG_RE.fullmatch(tag)
    assert match, tag
    return int(match.group(1) + match.group(2), 16)


# --------------------------------------------------------------------------
# Independent reference computed with plain pydicom
# --------------------------------------------------------------------------
def _quiet_dcmread(path: str | os.PathLike) -> pydicom.FileDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _independent_count(path: str | os.PathLike) -> int:
    return expected_metadata_rows(path)


def _reference_rows(path: str | os.PathLike) -> list[tuple]:
    """(tag, vr, value_json, sequence_length, parent_sequence_index,
    parent_item_index, non_empty_items) for every element, pre-order."""
    ds = _quiet_dcmread(path)
    rows: list[tuple] = []
    next_item = [0]
    implicit, little = ds.original_encoding

    def walk(dataset: Dataset, parent_seq: int | None, parent_item: int | None) -> None:
        for elem in dataset:  # pydicom's iteration: sorted tags, values read, VRs resolved
            if elem.tag in PIXEL_TAGS:
                continue
            if elem.VR == "SQ":
                index = len(rows)
                rows.append(
                    (
                        int(elem.tag),
                        "SQ",
                        None,
                        len(elem.value),
                        parent_seq,
                        parent_item,
                        sum(1 for item in elem.value if len(item)),
                    )
                )
                for item in elem.value:
                    number = next_item[0]
                    next_item[0] += 1
                    walk(item, index, number)
            else:
                try:
                    model = corrected_attribute(  # pydicom's model, with the documented corrections
                        f"{elem.tag:08X}",
                        elem.to_json_dict(None, 2**62),
                        big_endian=little is False and dataset is not ds.file_meta,
                        implicit=bool(implicit) and dataset is not ds.file_meta,
                    )
                except ValueError:  # the documented correction: an odd value is kept as text
                    items = [elem.value] if isinstance(elem.value, str) else list(elem.value)
                    model = {"vr": elem.VR, "Value": [_strip(item) for item in items]}
                if "Value" in model:
                    value_json = json.dumps(model["Value"], ensure_ascii=False)
                elif "InlineBinary" in model:
                    value_json = json.dumps(model["InlineBinary"], ensure_ascii=False)
                else:
                    value_json = None
                rows.append(
                    (int(elem.tag), model["vr"], value_json, None, parent_seq, parent_item, None)
                )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        walk(ds.file_meta or Dataset(), None, None)
        walk(ds, None, None)
    return rows


def _strip(value: object) -> str:
    return str(value).strip(" \x00")


# --------------------------------------------------------------------------
# Structural invariants of a result
# --------------------------------------------------------------------------
def _check_instance_invariants(inst: DicomInstance) -> None:
    assert isinstance(inst, DicomInstance)
    for uid in (inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid):
        assert isinstance(uid, str) and uid and uid == uid.strip(" \x00")
    assert isinstance(inst.procedure_date, datetime.date)
    assert isinstance(inst.image_date, datetime.date)
    for text in (inst.patient_id, inst.study_description, inst.modality, inst.body_part_examined):
        assert text is None or (isinstance(text, str) and text and text == text.strip(" \x00"))
    assert inst.instance_number is None or isinstance(inst.instance_number, int)

    rows = inst.elements
    assert [r.index for r in rows] == list(range(len(rows)))
    item_first_seen: list[int] = []
    for r in rows:
        assert isinstance(r, ElementRow)
        tag_int = _tag_int(r.tag)
        assert tag_int not in PIXEL_TAGS
        assert r.group == r.tag[1:5]
        assert r.is_private == bool(int(r.group, 16) & 1)
        # dictionary_tag is the tag itself or its repeater mask
        assert len(r.dictionary_tag) == len(r.tag)
        assert all(d == t or d == "x" for d, t in zip(r.dictionary_tag, r.tag)), r
        if r.is_private:
            assert r.keyword is None
            assert r.dictionary_tag == r.tag
        else:
            assert r.keyword == (keyword_for_tag(tag_int) or None)
            assert r.private_creator is None
        if r.parent_sequence_index is None:
            assert r.parent_item_index is None
        else:
            assert r.parent_sequence_index < r.index
            assert rows[r.parent_sequence_index].is_sequence
            assert r.parent_item_index is not None
            if r.parent_item_index not in item_first_seen:
                item_first_seen.append(r.parent_item_index)
        if r.is_sequence:
            assert r.vr == "SQ" and r.value_json is None
            assert isinstance(r.sequence_length, int) and r.sequence_length >= 0
        else:
            assert r.sequence_length is None
            if r.value_json is not None:
                json.loads(r.value_json)  # valid JSON (NaN aside, which json accepts)
        assert re.fullmatch(r"\d+", r.vm), r
    # Items are numbered file-wide in pre-order: first appearances increase.
    assert item_first_seen == sorted(item_first_seen)
    assert len(set(item_first_seen)) == len(item_first_seen)

    # Direct children of every sequence row.
    children: dict[int, set[int]] = collections.defaultdict(set)
    for r in rows:
        if r.parent_sequence_index is not None:
            children[r.parent_sequence_index].add(r.parent_item_index)
    for r in rows:
        if r.is_sequence:
            assert len(children[r.index]) <= r.sequence_length

    # Private creators: own value, or the creator element of the same dataset.
    creators: dict[tuple, str | None] = {}
    for r in rows:
        if not r.is_private:
            continue
        element = _tag_int(r.tag) & 0xFFFF
        scope = (r.parent_sequence_index, r.parent_item_index, r.group)
        if 0x0010 <= element <= 0x00FF:
            creators[(*scope, element)] = r.private_creator
            if r.value_json is not None:
                value = json.loads(r.value_json)
                if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                    assert r.private_creator == (value[0].strip(" \x00") or None)
        elif element >> 8 >= 0x10:
            assert r.private_creator == creators.get((*scope, element >> 8)), r
        else:
            assert r.private_creator is None


def _check_against_reference(path: str | os.PathLike, inst: DicomInstance) -> None:
    rows = inst.elements
    assert len(rows) == _independent_count(path)
    reference = _reference_rows(path)
    assert len(rows) == len(reference)
    for row, (tag, vr, value_json, seq_len, p_seq, p_item, non_empty) in zip(rows, reference):
        assert _tag_int(row.tag) == tag, (row, tag)
        assert row.vr == vr, row
        assert row.value_json == value_json, row
        assert row.sequence_length == seq_len, row
        assert row.parent_sequence_index == p_seq, row
        assert row.parent_item_index == p_item, row
        if row.is_sequence:
            distinct = {r.parent_item_index for r in rows if r.parent_sequence_index == row.index}
            assert len(distinct) == non_empty
            if non_empty == seq_len:
                assert len(distinct) == row.sequence_length

    ds = _quiet_dcmread(path)
    assert inst.sop_instance_uid == _strip(ds.SOPInstanceUID)
    assert inst.study_instance_uid == _strip(ds.StudyInstanceUID)
    assert inst.series_instance_uid == _strip(ds.SeriesInstanceUID)


# --------------------------------------------------------------------------
# Every bundled file
# --------------------------------------------------------------------------
def test_module_constants() -> None:
    assert frozenset(PIXEL_TAGS) == PIXEL_DATA_TAGS
    assert ElementRow._fields == (
        "index",
        "parent_sequence_index",
        "parent_item_index",
        "tag",
        "group",
        "dictionary_tag",
        "keyword",
        "name",
        "vr",
        "vm",
        "value_json",
        "is_sequence",
        "sequence_length",
        "is_private",
        "private_creator",
    )


def test_bundled_files_were_found() -> None:
    names = {p.name for p in ALL_FILES}
    assert {"CT_small.dcm", "rtplan.dcm", "README.txt"} <= names
    # files without extension (dicomdirtests) are included too
    assert any(p.suffix == "" for p in ALL_FILES)


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_every_bundled_file(path: Path) -> None:
    inst, error = _outcome(path)
    if error is not None:
        reason = str(error)
        assert reason.strip(), _rel(path)
        assert "\n" not in reason
        return
    _check_instance_invariants(inst)
    _check_against_reference(path, inst)


def test_bundled_files_summary() -> None:
    ok: list[str] = []
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for path in ALL_FILES:
        inst, error = _outcome(path)
        if error is None:
            ok.append(_rel(path))
        else:
            failures[str(error)].append(_rel(path))
    failed = sum(len(v) for v in failures.values())
    print(f"\n[dicom_reader] pydicom test files: {len(ok)} read, {failed} failed")
    for reason, paths in sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {len(paths):3d} x {reason}")
        for p in paths:
            print(f"        {p}")
    assert len(ok) + failed == len(ALL_FILES)
    for must_read in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm"):
        assert must_read in ok
    for must_fail in ("README.txt", "zipMR.gz", "test1.json", "rtplan_truncated.dcm"):
        assert must_fail not in ok
    truncated = [p for reason, ps in failures.items() if "truncated" in reason for p in ps]
    assert "rtplan_truncated.dcm" in truncated and "MR_truncated.dcm" in truncated


# --------------------------------------------------------------------------
# Known files
# --------------------------------------------------------------------------
def test_ct_small() -> None:
    path = _testfile("CT_small.dcm")
    inst = read_instance(path)
    ds = _quiet_dcmread(path)
    assert inst.modality == "CT"
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert inst.study_instance_uid == ds.StudyInstanceUID
    assert inst.series_instance_uid == ds.SeriesInstanceUID
    assert inst.patient_id == ds.PatientID.strip()
    assert inst.instance_number == int(ds.InstanceNumber)
    assert inst.study_description == (ds.get("StudyDescription", "").strip() or None)

    def first_valid(*keywords: str) -> datetime.date:
        for kw in keywords:
            value = str(ds.get(kw, "") or "").strip()
            try:
                return datetime.datetime.strptime(value, "%Y%m%d").date()
            except ValueError:
                continue
        raise AssertionError("CT_small has dates")

    assert inst.procedure_date == first_valid(
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"
    )
    assert inst.image_date == first_valid(
        "SeriesDate", "AcquisitionDate", "ContentDate", "StudyDate"
    )

    rows = inst.elements
    n_meta = len(ds.file_meta)
    assert n_meta > 0
    assert all(r.group == "0002" for r in rows[:n_meta])
    assert all(r.group != "0002" for r in rows[n_meta:])
    assert not any(r.tag == "(7FE0,0010)" for r in rows)
    modality = next(r for r in rows if r.tag == "(0008,0060)")
    assert modality.keyword == "Modality" and modality.name == "Modality"
    assert modality.vr == "CS" and modality.vm == "1"
    assert modality.value_json == '["CT"]'
    assert modality.parent_sequence_index is None and modality.parent_item_index is None
    _check_instance_invariants(inst)
    _check_against_reference(path, inst)


def test_private_tags_and_creators_ge_sample() -> None:
    path = _testfile("CT_small.dcm")  # a GE CT with several private blocks
    inst = read_instance(path)
    ds = _quiet_dcmread(path)
    private_rows = [r for r in inst.elements if r.is_private]
    assert private_rows
    creators_seen = set()
    for r in private_rows:
        tag = _tag_int(r.tag)
        group, element = tag >> 16, tag & 0xFFFF
        if 0x10 <= element <= 0xFF:
            assert r.private_creator == ds[tag].value.strip()
            assert r.name == "Private Creator"
            creators_seen.add(r.private_creator)
        elif element >> 8 >= 0x10:
            expected = ds[(group << 16) | (element >> 8)].value.strip()
            assert r.private_creator == expected
            try:
                expected_name = private_dictionary_description(tag, expected)
            except KeyError:
                expected_name = None
            assert r.name == expected_name
    assert "GEMS_IDEN_01" in creators_seen
    assert any(r.name for r in private_rows if r.name != "Private Creator")


def test_private_creator_is_taken_from_the_same_dataset(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    ds.add_new(0x00110010, "LO", "ACME OUTER")
    inner = Dataset()
    inner.add_new(0x00110010, "LO", "ACME INNER ")
    inner.add_new(0x00111002, "LO", "nested private value")
    ds.add_new(0x00111001, "SQ", Sequence([inner]))
    out = tmp_path / "nested_private.dcm"
    ds.save_as(out)

    inst = read_instance(out)
    rows = {(r.tag, r.parent_item_index): r for r in inst.elements}
    seq_row = rows[("(0011,1001)", None)]
    assert seq_row.is_sequence and seq_row.sequence_length == 1
    assert seq_row.private_creator == "ACME OUTER"
    nested = [r for r in inst.elements if r.parent_sequence_index == seq_row.index]
    by_tag = {r.tag: r for r in nested}
    assert by_tag["(0011,0010)"].private_creator == "ACME INNER"
    assert by_tag["(0011,1002)"].private_creator == "ACME INNER"
    assert json.loads(by_tag["(0011,1002)"].value_json) == ["nested private value"]
    _check_instance_invariants(inst)
    _check_against_reference(out, inst)


def test_nested_sequences_rtplan() -> None:
    path = _testfile("rtplan.dcm")
    inst = read_instance(path)
    ds = _quiet_dcmread(path)
    rows = inst.elements
    beam = next(r for r in rows if r.keyword == "BeamSequence")
    assert beam.is_sequence and beam.sequence_length == len(ds.BeamSequence) > 0
    cps = [
        r
        for r in rows
        if r.keyword == "ControlPointSequence" and r.parent_sequence_index == beam.index
    ]
    assert len(cps) == len(ds.BeamSequence)
    for beam_number, row in enumerate(cps):
        expected = len(ds.BeamSequence[beam_number].ControlPointSequence)
        assert row.sequence_length == expected

    def depth(r: ElementRow) -> int:
        d = 0
        while r.parent_sequence_index is not None:
            r = rows[r.parent_sequence_index]
            d += 1
        return d

    assert max(depth(r) for r in rows) >= 2
    _check_instance_invariants(inst)
    _check_against_reference(path, inst)


def test_structured_report_sequences() -> None:
    path = _testfile("test-SR.dcm")
    inst = read_instance(path)
    assert inst.modality == "SR"
    assert any(r.keyword == "ContentSequence" for r in inst.elements)
    _check_instance_invariants(inst)
    _check_against_reference(path, inst)


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_bundled_files_without_preamble(name: str) -> None:
    path = _testfile(name)
    with open(path, "rb") as fh:
        assert fh.read(132)[128:132] != b"DICM"
    inst = read_instance(path)
    _check_instance_invariants(inst)
    _check_against_reference(path, inst)
    assert not any(r.group == "0002" for r in inst.elements)


def test_crafted_files_without_preamble(tmp_path: Path) -> None:
    source = _testfile("CT_small.dcm")
    data = Path(source).read_bytes()
    original = read_instance(source)
    meta = _quiet_dcmread(source).file_meta
    meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)

    no_preamble = tmp_path / "no_preamble"
    no_preamble.write_bytes(data[132:])  # starts with the (0002,0000) element
    inst = read_instance(no_preamble)
    assert [r[3:] for r in inst.elements] == [r[3:] for r in original.elements]

    dataset_only = tmp_path / "dataset_only"
    dataset_only.write_bytes(data[meta_end:])  # no preamble, no file meta at all
    inst = read_instance(dataset_only)
    n_meta = len(meta)
    assert [r[3:] for r in inst.elements] == [r[3:] for r in original.elements[n_meta:]]
    assert inst.sop_instance_uid == original.sop_instance_uid


def test_repeating_group_dictionary_tags(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    overlay = bytes(range(256)) * 2
    ds.add_new(0x60000010, "US", 128)
    ds.add_new(0x60003000, "OW", overlay)
    ds.add_new(0x50020005, "US", 2)
    ds.add_new(0x00203105, "CS", "SOURCE1")
    out = tmp_path / "overlay.dcm"
    ds.save_as(out)

    inst = read_instance(out)
    rows = {r.tag: r for r in inst.elements}
    expected = {
        "(6000,0010)": ("(60xx,0010)", "OverlayRows"),
        "(6000,3000)": ("(60xx,3000)", "OverlayData"),
        "(5002,0005)": ("(50xx,0005)", "CurveDimensions"),
        "(0020,3105)": ("(0020,31xx)", "SourceImageIDs"),
    }
    for tag, (dictionary_tag, keyword) in expected.items():
        assert rows[tag].dictionary_tag == dictionary_tag
        assert rows[tag].keyword == keyword
        assert rows[tag].name
    assert rows["(6000,3000)"].vr == "OW"
    assert rows["(6000,3000)"].value_json == json.dumps(base64.b64encode(overlay).decode())
    assert json.loads(rows["(6000,0010)"].value_json) == [128]
    assert rows["(0008,0060)"].dictionary_tag == "(0008,0060)"
    _check_instance_invariants(inst)
    _check_against_reference(out, inst)


def test_pixel_data_excluded_inside_sequences(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    icon = Dataset()
    icon.Rows = 2
    icon.Columns = 2
    icon.BitsAllocated = 8
    icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.PixelData = b"\x01\x02\x03\x04"
    ds.IconImageSequence = Sequence([icon])
    out = tmp_path / "icon.dcm"
    ds.save_as(out)

    inst = read_instance(out)
    seq = next(r for r in inst.elements if r.keyword == "IconImageSequence")
    nested = [r for r in inst.elements if r.parent_sequence_index == seq.index]
    assert {r.keyword for r in nested} >= {"Rows", "Columns", "PhotometricInterpretation"}
    assert not any(r.tag == "(7FE0,0010)" for r in inst.elements)
    _check_against_reference(out, inst)


def test_large_deferred_values_are_read_once_and_checked(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    blob = random.Random(7).randbytes(200_000)
    ds.add_new(0x00290010, "LO", "BLOB MAKER")
    ds.add_new(0x00291001, "OB", blob)
    ds.ReferencedImageSequence = Sequence(
        [
            Dataset.from_json(
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": [f"1.2.3.4.{i}"]},
                }
            )
            for i in range(1500)
        ]
    )
    out = tmp_path / "big_values.dcm"
    ds.save_as(out)

    inst = read_instance(out)
    rows = {r.tag: r for r in inst.elements if r.parent_sequence_index is None}
    assert rows["(0029,1001)"].value_json == json.dumps(base64.b64encode(blob).decode())
    assert rows["(0029,1001)"].private_creator == "BLOB MAKER"
    assert rows["(0008,1140)"].sequence_length == 1500
    _check_against_reference(out, inst)

    # cut inside the big private value
    data = out.read_bytes()
    cut = data.index(blob[:64]) + 1000
    truncated = tmp_path / "big_values_cut.dcm"
    truncated.write_bytes(data[:cut])
    with pytest.raises(DicomReadError, match="truncated"):
        read_instance(truncated)


def test_deflated_transfer_syntax(tmp_path: Path) -> None:
    source = _testfile("image_dfl.dcm")  # bundled one has no usable date
    ds = pydicom.dcmread(source)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.StudyDate = "20200101"
    out = tmp_path / "deflated.dcm"
    ds.save_as(out)
    with open(out, "rb") as fh:
        assert fh.read(132)[128:132] == b"DICM"
    assert _quiet_dcmread(out).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID

    inst = read_instance(out)
    assert inst.procedure_date == datetime.date(2020, 1, 1)
    _check_instance_invariants(inst)
    _check_against_reference(out, inst)

    data = out.read_bytes()
    cut = tmp_path / "deflated_cut.dcm"
    cut.write_bytes(data[: len(data) - 200])
    with pytest.raises(DicomReadError, match="truncated"):
        read_instance(cut)


# --------------------------------------------------------------------------
# Not DICOM / unreadable
# --------------------------------------------------------------------------
def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(DicomReadError) as info:
        read_instance(path)
    assert str(info.value) == "empty file (0 bytes)"


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("Patient: John Doe\nThis is not a DICOM file at all.\n" * 20)
    with pytest.raises(DicomReadError, match="^not a DICOM file"):
        read_instance(path)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / f"random{seed}.bin"
    path.write_bytes(random.Random(seed).randbytes(5000))
    with pytest.raises(DicomReadError, match="^not a DICOM file"):
        read_instance(path)


def test_zero_filled_file(tmp_path: Path) -> None:
    path = tmp_path / "zeros.dcm"
    path.write_bytes(bytes(4096))
    with pytest.raises(DicomReadError, match="^not a DICOM file"):
        read_instance(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DicomReadError, match="^cannot open file"):
        read_instance(tmp_path / "does-not-exist.dcm")
    with pytest.raises(DicomReadError, match="^cannot open file"):
        read_instance(tmp_path)


# --------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------
def _raw(ds: Dataset, keyword_or_tag) -> RawDataElement:
    elem = ds.get_item(keyword_or_tag, keep_deferred=True)
    assert isinstance(elem, RawDataElement)
    return elem


def _ct_small_cut_points() -> dict[str, int]:
    path = _testfile("CT_small.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, defer_size=0)
    size = os.path.getsize(path)
    meta_version = _raw(ds.file_meta, 0x00020001)
    patient_name = _raw(ds, 0x00100010)
    study_uid = _raw(ds, 0x0020000D)
    rows = _raw(ds, 0x00280010)
    pixels = _raw(ds, 0x7FE00010)
    assert pixels.length > 1000
    return {
        "meta_header": meta_version.value_tell - 5,
        "meta_value": meta_version.value_tell + 1,
        "dataset_header": patient_name.value_tell - 3,
        "dataset_value": patient_name.value_tell + 2,
        "uid_value": study_uid.value_tell + study_uid.length - 1,
        "short_value": rows.value_tell + 1,
        "pixel_header": pixels.value_tell - 2,
        "pixel_start": pixels.value_tell + 1,
        "pixel_middle": pixels.value_tell + pixels.length // 2,
        "pixel_last_byte": size - 1,
    }


CT_CUTS = _ct_small_cut_points()


@pytest.mark.parametrize("where", sorted(CT_CUTS))
def test_truncated_ct_small(tmp_path: Path, where: str) -> None:
    data = Path(_testfile("CT_small.dcm")).read_bytes()
    path = tmp_path / f"cut_{where}.dcm"
    path.write_bytes(data[: CT_CUTS[where]])
    with pytest.raises(DicomReadError, match="truncated"):
        read_instance(path)


def test_cut_before_prefix_is_not_dicom(tmp_path: Path) -> None:
    data = Path(_testfile("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut_preamble.dcm"
    path.write_bytes(data[:100])
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_instance(path)


def test_cut_exactly_at_element_boundary_is_undetectable(tmp_path: Path) -> None:
    # Documents the known limitation: a file cut exactly before the pixel
    # data element is a valid DICOM file without pixel data.
    path = _testfile("CT_small.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = _raw(pydicom.dcmread(path, defer_size=0), 0x7FE00010)
    out = tmp_path / "no_pixels.dcm"
    out.write_bytes(Path(path).read_bytes()[: pixels.value_tell - 12])
    inst = read_instance(out)
    # everything before the pixel data (CT_small has trailing padding after it)
    before_pixels = [r[3:] for r in read_instance(path).elements if _tag_int(r.tag) < 0x7FE00010]
    assert [r[3:] for r in inst.elements] == before_pixels


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",  # encapsulated pixel data, undefined length
        "SC_rgb_rle.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",  # nested sequences, no pixel data
        "test-SR.dcm",
    ],
)
def test_truncated_everywhere_in_other_files(tmp_path: Path, name: str) -> None:
    """Cut at many offsets; a cut inside an element must never be ingested."""
    path = _testfile(name)
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, defer_size=0, force=True)
    # Element starts at top level (where a cut leaves a valid shorter file).
    boundaries = {len(data)}
    for dataset, implicit in ((ds.file_meta, False), (ds, ds.original_encoding[0])):
        for tag in dataset.keys():
            elem = dataset.get_item(tag, keep_deferred=True)
            tell = elem.value_tell if isinstance(elem, RawDataElement) else elem.file_tell
            boundaries.add(
                tell - pydicom.filereader.data_element_offset_to_value(implicit, elem.VR)
            )
    step = max(1, len(data) // 400)
    out = tmp_path / "cut.dcm"
    for cut in range(140, len(data), step):
        out.write_bytes(data[:cut])
        inst, error = _outcome(out)
        if cut in boundaries:
            continue
        assert inst is None, f"{name} cut at {cut} was ingested"
        assert "truncated" in str(error), (cut, str(error))


# --------------------------------------------------------------------------
# Dates, UIDs, strings
# --------------------------------------------------------------------------
DATE_TAGS = {
    "StudyDate": 0x00080020,
    "SeriesDate": 0x00080021,
    "AcquisitionDate": 0x00080022,
    "ContentDate": 0x00080023,
    "InstanceCreationDate": 0x00080012,
}


def _raw_element(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _write_variant(
    tmp_path: Path, name: str, raw_values: dict[int, tuple[str, bytes] | None]
) -> Path:
    """CT_small (explicit VR LE) with raw element values replaced or deleted.

    Raw values are written as given, so invalid values survive the writer.
    """
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    for tag, spec in raw_values.items():
        if tag in ds:
            del ds[tag]
        if spec is not None:
            vr, value = spec
            ds[tag] = _raw_element(tag, vr, value)
    out = tmp_path / name
    ds.save_as(out)
    return out


def _dates(**values: str | None) -> dict[int, tuple[str, bytes] | None]:
    spec: dict[int, tuple[str, bytes] | None] = {}
    for keyword, tag in DATE_TAGS.items():
        value = values.get(keyword)
        if value is None:
            spec[tag] = None
        else:
            raw = value.encode("ascii")
            spec[tag] = ("DA", raw + b" " * (len(raw) % 2))
    return spec


@pytest.mark.parametrize(
    ("dates", "procedure", "image"),
    [
        (
            dict(
                StudyDate="20231399",
                SeriesDate="",
                AcquisitionDate="20200102",
                ContentDate="20200103",
            ),
            datetime.date(2020, 1, 2),
            datetime.date(2020, 1, 2),
        ),
        (
            dict(StudyDate="20190101", AcquisitionDate="", ContentDate="20200103"),
            datetime.date(2019, 1, 1),
            datetime.date(2020, 1, 3),
        ),
        (
            dict(StudyDate="2019.02.03", SeriesDate="20200229"),
            datetime.date(2019, 2, 3),
            datetime.date(2020, 2, 29),
        ),
        (
            dict(StudyDate="20210229", SeriesDate="20200105\\20200106"),
            datetime.date(2020, 1, 5),
            datetime.date(2020, 1, 5),
        ),
        (
            dict(ContentDate="20111111"),
            datetime.date(2011, 11, 11),
            datetime.date(2011, 11, 11),
        ),
        (  # real files exist whose only date is InstanceCreationDate
            dict(StudyDate="", InstanceCreationDate="20120304"),
            datetime.date(2012, 3, 4),
            datetime.date(2012, 3, 4),
        ),
    ],
)
def test_date_fallbacks(
    tmp_path: Path, dates: dict, procedure: datetime.date, image: datetime.date
) -> None:
    out = _write_variant(tmp_path, "dates.dcm", _dates(**dates))
    inst = read_instance(out)
    assert inst.procedure_date == procedure
    assert inst.image_date == image
    # the invalid values are still stored as metadata
    for keyword, value in dates.items():
        row = next(r for r in inst.elements if r.keyword == keyword)
        if value.strip():
            assert value.split("\\")[0] in (row.value_json or "")


@pytest.mark.parametrize("fast_path", [True, False])
def test_datetimes_pair_each_date_with_its_own_time(tmp_path: Path, fast_path: bool) -> None:
    spec = _dates(StudyDate="", SeriesDate="20200105", InstanceCreationDate="20200101")
    spec[0x00080030] = ("TM", b"235959")  # StudyTime: its date is invalid, so it is not used
    spec[0x00080031] = ("TM", b"101112.5")  # SeriesTime, with a fraction
    spec[0x00080013] = ("TM", b"0102")  # InstanceCreationTime (HHMM)
    inst = read_instance(_write_variant(tmp_path, "times.dcm", spec), fast_path=fast_path)
    assert inst.procedure_datetime == datetime.datetime(2020, 1, 5, 10, 11, 12, 500000)
    assert inst.image_datetime == datetime.datetime(2020, 1, 5, 10, 11, 12, 500000)
    spec[0x00080021] = None  # no SeriesDate: InstanceCreationDate with its own time
    spec[0x00080031] = None
    inst = read_instance(_write_variant(tmp_path, "times2.dcm", spec), fast_path=fast_path)
    assert inst.procedure_datetime == datetime.datetime(2020, 1, 1, 1, 2)
    spec[0x00080012] = None
    spec[0x0008002A] = ("DT", b"20190203040506+0100 ")  # AcquisitionDateTime: offset dropped
    inst = read_instance(_write_variant(tmp_path, "times3.dcm", spec), fast_path=fast_path)
    assert inst.image_datetime == datetime.datetime(2019, 2, 3, 4, 5, 6)
    spec[0x00080021] = ("DA", b"20190203")
    spec[0x00080031] = ("TM", b"99")  # an invalid time: the date's midnight
    inst = read_instance(_write_variant(tmp_path, "times4.dcm", spec), fast_path=fast_path)
    assert inst.image_datetime == datetime.datetime(2019, 2, 3)


@pytest.mark.parametrize(
    "dates",
    [
        dict(StudyDate="20231399", SeriesDate="", AcquisitionDate="2023", ContentDate="abcdefgh"),
        dict(),
        dict(StudyDate="00000000", SeriesDate="20230230"),
    ],
)
def test_no_usable_date(tmp_path: Path, dates: dict) -> None:
    out = _write_variant(tmp_path, "nodate.dcm", _dates(**dates))
    with pytest.raises(DicomReadError) as info:
        read_instance(out)
    assert str(info.value) == NO_DATE_REASON


def test_missing_sop_instance_uid(tmp_path: Path) -> None:
    out = _write_variant(tmp_path, "nosop.dcm", {0x00080018: None})
    with pytest.raises(DicomReadError) as info:
        read_instance(out)
    assert str(info.value) == "missing required attribute(s): SOPInstanceUID"


def test_missing_and_blank_study_and_series_uids(tmp_path: Path) -> None:
    out = _write_variant(
        tmp_path,
        "nostudy.dcm",
        {0x0020000D: None, 0x0020000E: ("UI", b" \x00")},  # blank == missing
    )
    with pytest.raises(DicomReadError) as info:
        read_instance(out)
    assert str(info.value) == "missing required attribute(s): StudyInstanceUID, SeriesInstanceUID"


def test_uid_and_string_padding_is_stripped(tmp_path: Path) -> None:
    long_description = "x" * 3000
    out = _write_variant(
        tmp_path,
        "padded.dcm",
        {
            0x00080018: ("UI", b"1.2.3.4 \x00"),
            0x0020000D: ("UI", b"1.2.3.5\x00\x00"),
            0x0020000E: ("UI", b" 1.2.3.6  "),
            0x00100020: ("LO", b" PID-42 \x00\x00"),
            0x00081030: ("LO", long_description.encode()),
            0x00080060: ("CS", b"MR"),
            0x00180015: ("CS", b"CHEST "),
            0x00200013: ("IS", b"  7 "),
        },
    )
    inst = read_instance(out)
    assert inst.sop_instance_uid == "1.2.3.4"
    assert inst.study_instance_uid == "1.2.3.5"
    assert inst.series_instance_uid == "1.2.3.6"
    assert inst.patient_id == "PID-42"
    assert inst.study_description == long_description
    assert inst.modality == "MR"
    assert inst.body_part_examined == "CHEST"
    assert inst.instance_number == 7


def test_value_with_quotes_backslashes_and_nul(tmp_path: Path) -> None:
    text = 'He said "hi" \\ C:\\path\\file NUL\x00here caf\u00e9'
    out = _write_variant(
        tmp_path,
        "quotes.dcm",
        {
            0x00080005: ("CS", b"ISO_IR 100"),
            0x00204000: ("LT", text.encode("latin-1") + b" "),
        },
    )
    inst = read_instance(out)
    row = next(r for r in inst.elements if r.tag == "(0020,4000)")
    assert json.loads(row.value_json) == [text]
    assert "\x00" not in row.value_json  # PostgreSQL text cannot hold NUL
    assert "\\u0000" in row.value_json
    assert "caf\u00e9" in row.value_json  # ensure_ascii=False keeps text readable


def _row(inst: DicomInstance, tag: str) -> ElementRow:
    (row,) = [r for r in inst.elements if r.tag == tag and r.parent_sequence_index is None]
    return row


def test_odd_patient_value_is_kept_and_only_its_tag_reported(tmp_path: Path) -> None:
    """Odd values are data (issue 16): a DS that is not a number no longer fails the file; it
    is kept verbatim, and what leaves the reader about it is its tag, never the value."""
    out = _write_variant(
        tmp_path,
        "badweight.dcm",
        {
            0x00100010: ("PN", b"SECRET^PATIENT"),
            0x00101030: ("DS", b"SECRETNAME"),
        },
    )
    for fast_path in (True, False):
        inst = read_instance(out, fast_path=fast_path)
        assert _row(inst, "(0010,1030)").value_json == '["SECRETNAME"]'
        assert inst.odd_value_tags == ("(0010,1030)",)


def test_decode_reason_withholds_values_of_patient_elements() -> None:
    """Elements that still fail (a sequence whose items do not parse) name the tag; for
    patient groups, person names and private elements the message is withheld."""
    leak = ValueError("could not convert string to float: 'SECRET'")
    raw = _raw_element(0x00101030, "DS", b"SECRET")
    reason = _decode_reason(0x00101030, raw, leak)
    assert reason.startswith("cannot decode element (0010,1030) PatientWeight: ValueError")
    assert "SECRET" not in reason
    assert "SECRET" in _decode_reason(0x00180050, raw, leak)  # technical: pydicom's message


def test_odd_technical_value_is_kept_verbatim(tmp_path: Path) -> None:
    out = _write_variant(tmp_path, "badthickness.dcm", {0x00180050: ("DS", b"thick ")})
    for fast_path in (True, False):
        inst = read_instance(out, fast_path=fast_path)
        row = _row(inst, "(0018,0050)")
        assert (row.vr, row.vm, row.value_json) == ("DS", "1", '["thick"]')
        assert inst.odd_value_tags == ("(0018,0050)",)


def test_binary_value_of_impossible_length_is_kept_as_bytes(tmp_path: Path) -> None:
    # A US element whose (odd) length swallows text: pydicom cannot convert it (its
    # BytesLengthException quotes the raw bytes); the bytes are kept, as InlineBinary.
    out = _write_variant(tmp_path, "badrows.dcm", {0x00280010: ("US", b"SECRET^NAME")})
    inst = read_instance(out)
    row = _row(inst, "(0028,0010)")
    assert row.vr == "US"
    assert base64.b64decode(json.loads(row.value_json)) == b"SECRET^NAME"
    assert inst.odd_value_tags == ("(0028,0010)",)


def test_accepts_str_and_pathlike() -> None:
    path = _testfile("MR_small.dcm")
    assert read_instance(path) == read_instance(Path(path))


# --------------------------------------------------------------------------
# Quietness: no warnings or pydicom log records escape, global state restored
# --------------------------------------------------------------------------
def test_pydicom_warnings_and_logs_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [_testfile("badVR.dcm"), _testfile("MR_truncated.dcm"), _testfile("no_meta.dcm")]
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.DEBUG, logger="pydicom"):
            for path in noisy:
                _outcome(path)
            assert not [r for r in caplog.records if r.name.startswith("pydicom")]
            # outside read_instance pydicom logging is untouched
            logging.getLogger("pydicom").warning("still audible")
            assert any(r.getMessage() == "still audible" for r in caplog.records)
    assert caught == []
    assert warnings.filters == filters_before


# --------------------------------------------------------------------------
# Property test: damaged real files
# --------------------------------------------------------------------------
FUZZ_SOURCES = {
    name: Path(_testfile(name)).read_bytes()
    for name in ("rtplan.dcm", "MR_small.dcm", "JPEG2000.dcm", "ExplVR_BigEndNoMeta.dcm")
}


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(FUZZ_SOURCES)))
    data = bytearray(FUZZ_SOURCES[name])
    flips = draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=12)
    )
    for position, value in flips:
        data[position] = value
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(damaged_files())
def test_damaged_files_never_raise_anything_else(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "damaged.dcm"
    path.write_bytes(data)
    inst, error = _outcome(path)  # any other exception fails the test
    if error is not None:
        reason = str(error)
        assert reason and "\n" not in reason
    else:
        _check_instance_invariants(inst)


def test_uid_longer_than_dicom_allows_fails_the_file(tmp_path):
    """A corrupt over-long UID fails its file instead of overflowing varchar(250) for the batch."""
    import warnings

    ds = _quiet_dcmread(_testfile("CT_small.dcm"))
    ds.SeriesInstanceUID = "1.2." + "3" * 300
    target = tmp_path / "long_uid.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target)
    with pytest.raises(DicomReadError, match="longer than 64 characters: SeriesInstanceUID"):
        read_instance(target)
