"""Where the rows differ from pydicom on purpose: one test per correction, on both paths.

pydicom is the oracle everywhere else (test_serializer_equivalence.py, test_reader.py,
with pydicom_corrections.py). Each case here builds its file byte by byte (so that the
writer cannot normalise what is being tested), reads it through the fast path and
through pydicom, and checks the rows against what the standard and DCMTK say; fo-dicom's
GH1376.dcm, GH177_*.dcm and GH179A.dcm are the public files that show them.
"""

from __future__ import annotations

import base64
import datetime
import json
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    generate_uid,
)

from dicom_etl_dagster.core.dicom.reader import DicomReadError, read_instance
from dicom_etl_dagster_tests.dicom_samples import read_rows, takes_fast_path

_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
BOTH_PATHS = pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "pydicom"])


def element(tag: int, vr: str | None, value: bytes, explicit: bool = True, little: bool = True):
    """One data element's bytes (vr None: implicit VR)."""
    e = "<" if little else ">"
    value += (b"\x00" if vr in ("UI", "OB", "OW", "UN") else b" ") if len(value) % 2 else b""
    group, number = tag >> 16, tag & 0xFFFF
    if not explicit or vr is None:
        return struct.pack(e + "HHL", group, number, len(value)) + value
    if vr in _LONG:
        return struct.pack(e + "HH2sHL", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack(e + "HH2sH", group, number, vr.encode(), len(value)) + value


def file_meta(syntax: str, sop: bytes, **extra: bytes) -> bytes:
    """A file meta group with its group length (explicit VR little endian, always)."""
    body = b"".join(
        element(tag, vr, value)
        for tag, vr, value in [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", b"1.2.840.10008.5.1.4.1.1.7"),
            (0x00020003, "UI", sop),
            (0x00020010, "UI", syntax.encode()),
            (0x00020012, "UI", b"1.2.3.4"),
            *((0x00020016, "AE", value) for value in extra.values()),
        ]
    )
    return element(0x00020000, "UL", struct.pack("<L", len(body))) + body


def part10(
    path: Path,
    elements: list[tuple[int, str | None, bytes]],
    syntax: str = ExplicitVRLittleEndian,
    *,
    raw: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    after_meta: bytes = b"",
) -> Path:
    """A Part 10 file: the required attributes, ``elements`` encoded as ``syntax`` says and
    ``raw`` element bytes as given, all in tag order."""
    explicit, little = syntax != ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    sop = generate_uid().encode()
    required = [
        (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.7"),
        (0x00080018, "UI", sop),
        (0x00080020, "DA", b"20240102"),
        (0x0020000D, "UI", generate_uid().encode()),
        (0x0020000E, "UI", generate_uid().encode()),
    ]
    encoded = [(t, element(t, vr, v, explicit, little)) for t, vr, v in required + elements]
    dataset = b"".join(data for _, data in sorted(encoded + list(raw)))
    path.write_bytes(b"\x00" * 128 + b"DICM" + file_meta(syntax, sop) + after_meta + dataset)
    return path


def rows_by_tag(path: Path, fast_path: bool) -> dict[str, list]:
    rows: dict[str, list] = {}
    for row in read_rows(path, fast_path=fast_path):
        rows.setdefault(row.tag, []).append(row)
    return rows


def same_rows_on_both_paths(path: Path) -> list:
    fast, slow = read_rows(path, fast_path=True), read_rows(path, fast_path=False)
    assert fast == slow
    return slow


def b64(data: bytes) -> str:
    return json.dumps(base64.b64encode(data).decode("ascii"))


# --------------------------------------------------------------------------
# 1. Binary values of big-endian files are stored little endian
# --------------------------------------------------------------------------
WORDS = {  # keyword: (VR, struct code, numbers)
    "RedPaletteColorLookupTableData": ("OW", "H", (1, 0x1234, 0xFFFE)),
    "PointCoordinatesData": ("OF", "f", (1.5, -2.25)),
    "LongPrimitivePointIndexList": ("OL", "L", (7, 0x01020304)),
    "DoublePointCoordinatesData": ("OD", "d", (3.125,)),
    "ExtendedOffsetTable": ("OV", "Q", (0x0102030405060708,)),
    "EncapsulatedDocument": ("OB", "B", (1, 2, 3, 4)),  # bytes: never swapped
}


def test_binary_values_of_a_big_endian_file_are_its_little_endian_copys(tmp_path):
    def write(syntax: str, endian: str) -> Path:
        elements = [
            (int(pydicom.tag.Tag(keyword)), vr, struct.pack(f"{endian}{len(n)}{code}", *n))
            for keyword, (vr, code, n) in WORDS.items()
        ]
        return part10(tmp_path / f"{endian == '>'}.dcm", elements, syntax)

    big, little = write(ExplicitVRBigEndian, ">"), write(ExplicitVRLittleEndian, "<")
    assert not takes_fast_path(big) and takes_fast_path(little)
    big_rows, little_rows = rows_by_tag(big, False), rows_by_tag(little, True)
    assert same_rows_on_both_paths(little)
    for keyword, (vr, code, numbers) in WORDS.items():
        tag = pydicom.tag.Tag(keyword)
        text = f"({tag.group:04X},{tag.element:04X})"
        expected = b64(struct.pack(f"<{len(numbers)}{code}", *numbers))
        assert [(r.vr, r.value_json) for r in big_rows[text]] == [(vr, expected)], keyword
        assert little_rows[text][0].value_json == expected, keyword
    # pydicom keeps the file's byte order: the correction is needed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pydicom.dcmread(big).to_json_dict(2**62)
    assert model["00281201"]["InlineBinary"] != json.loads(big_rows["(0028,1201)"][0].value_json)


# --------------------------------------------------------------------------
# 2. A dictionary ambiguity is not a VR
# --------------------------------------------------------------------------
@BOTH_PATHS
def test_ambiguous_vrs_pydicom_leaves_become_real_vrs(tmp_path, fast_path):
    path = part10(
        tmp_path / "curve.dcm",
        [
            (0x50003000, None, b"\x01\x00\x02\x00"),  # Curve Data, "OB or OW": OW (PS3.5 A.1)
            (0x00281200, None, b"\x05\x00\x06\x00"),  # Gray LUT Data, "US or SS or OW": OW
            (0x00281100, None, b"\x01\x00\x02\x00\x10\x00"),  # Gray LUT Descriptor: UN
            (0x00280120, None, b"\xff\xff"),  # Pixel Padding Value: pydicom's rule (US here)
        ],
        ImplicitVRLittleEndian,
    )
    rows = rows_by_tag(path, fast_path)
    assert (rows["(5000,3000)"][0].vr, rows["(5000,3000)"][0].value_json) == (
        "OW",
        b64(b"\x01\x00\x02\x00"),
    )
    assert rows["(0028,1200)"][0].vr == "OW"
    assert (rows["(0028,1100)"][0].vr, rows["(0028,1100)"][0].value_json) == (
        "UN",
        b64(b"\x01\x00\x02\x00\x10\x00"),
    )
    assert (rows["(0028,0120)"][0].vr, rows["(0028,0120)"][0].value_json) == ("US", "[65535]")
    assert not any(" or " in r.vr for r in read_rows(path, fast_path=fast_path))
    same_rows_on_both_paths(path)


def test_curve_data_alone_takes_the_fast_path(tmp_path):
    path = part10(tmp_path / "curve.dcm", [(0x50003000, None, b"\x01\x00")], ImplicitVRLittleEndian)
    assert takes_fast_path(path)
    assert rows_by_tag(path, True)["(5000,3000)"][0].vr == "OW"
    same_rows_on_both_paths(path)


# --------------------------------------------------------------------------
# 3. A stray copy of group 0002 inside the data set
# --------------------------------------------------------------------------
def test_a_stray_file_meta_copy_does_not_replace_the_real_one(tmp_path):
    old_sop = generate_uid().encode()
    stray = file_meta(ExplicitVRLittleEndian, old_sop, source=b"OLDPACS")  # as GH1376.dcm
    path = part10(tmp_path / "stray.dcm", [], JPEGLossless, after_meta=stray)
    assert takes_fast_path(path)
    rows = same_rows_on_both_paths(path)
    meta = {r.tag: r.value_json for r in rows if r.group == "0002"}
    real = pydicom.filereader.read_file_meta_info  # the real group, read by itself
    with open(path, "rb") as fp:
        fp.seek(132)
        group = pydicom.filereader.read_dataset(
            fp, False, True, bytelength=12 + struct.unpack("<L", path.read_bytes()[140:144])[0]
        )
    assert sorted(meta) == [f"({t.group:04X},{t.element:04X})" for t in sorted(group.keys())]
    assert meta["(0002,0010)"] == json.dumps([JPEGLossless])
    assert old_sop.decode() not in json.dumps(meta) and "(0002,0016)" not in meta
    assert len([r for r in rows if r.group == "0002"]) == 6  # the copy's 7 are dropped
    assert real(path).TransferSyntaxUID == ExplicitVRLittleEndian  # pydicom: the copy's


@BOTH_PATHS
def test_a_stray_copy_naming_another_encoding_fails_with_a_reason(tmp_path, fast_path):
    stray = file_meta(ImplicitVRLittleEndian, generate_uid().encode())
    path = part10(tmp_path / "stray.dcm", [], ExplicitVRLittleEndian, after_meta=stray)
    with pytest.raises(DicomReadError, match="a copy of group 0002 inside the data set"):
        read_instance(path, fast_path=fast_path)


# --------------------------------------------------------------------------
# 4. Private group lengths of implicit VR files are UL
# --------------------------------------------------------------------------
@pytest.mark.parametrize("with_block", [False, True], ids=["alone", "with a private block"])
def test_private_group_lengths_of_implicit_vr_files_are_ul(tmp_path, with_block):
    block = [(0x00190010, None, b"ACME 1.0"), (0x00191001, None, b"xy")] if with_block else []
    path = part10(
        tmp_path / "gl.dcm",
        [(0x00190000, None, struct.pack("<L", 26)), (0x00210000, None, b""), *block],
        ImplicitVRLittleEndian,
    )
    assert takes_fast_path(path) is not with_block  # private blocks: pydicom's dictionary
    rows = same_rows_on_both_paths(path)
    by_tag = {r.tag: r for r in rows}
    assert (by_tag["(0019,0000)"].vr, by_tag["(0019,0000)"].value_json) == ("UL", "[26]")
    assert (by_tag["(0021,0000)"].vr, by_tag["(0021,0000)"].value_json) == ("UL", None)
    assert by_tag["(0019,0000)"].is_private and by_tag["(0019,0000)"].private_creator is None


# --------------------------------------------------------------------------
# 5. CS values lose their padding
# --------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_each_cs_value_loses_its_spaces(tmp_path, syntax):
    path = part10(
        tmp_path / "cs.dcm",
        [
            (0x00080008, "CS", b"DERIVED \\ PRIMARY\\\\AXIAL "),
            (0x00080060, "CS", b" CT"),
            (0x00180015, "CS", b"  "),
        ],
        syntax,
    )
    assert takes_fast_path(path)
    rows = {r.tag: r for r in same_rows_on_both_paths(path)}
    assert (rows["(0008,0008)"].vm, rows["(0008,0008)"].value_json) == (
        "4",
        '["DERIVED", "PRIMARY", "", "AXIAL"]',
    )
    assert rows["(0008,0060)"].value_json == '["CT"]'
    assert (rows["(0018,0015)"].vm, rows["(0018,0015)"].value_json) == ("0", None)
    assert read_instance(path, fast_path=False).modality == "CT"


# --------------------------------------------------------------------------
# 6. Files DCMTK reads: UN sequences (CP-246) and blank VRs
# --------------------------------------------------------------------------
def un_sequence(tag: int, little: bool) -> bytes:
    """A UN element of undefined length whose one item is implicit VR little endian."""
    item = element(0x00081150, None, b"1.2.840.10008.5.1.4.1.1.2") + element(
        0x00081155, None, b"1.2.3.4.5"
    )
    e = "<" if little else ">"
    return (
        struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, b"UN", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, len(item))
        + item
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )


def test_a_un_sequence_is_read_as_implicit_vr_in_any_file(tmp_path):
    tag = 0x00082112  # Source Image Sequence, as fo-dicom's GH177 files have it
    after = [(0x00080060, "CS", b"CT"), (0x00200013, "IS", b"7")]
    files = {
        syntax: part10(
            tmp_path / f"{syntax}.dcm", after, syntax, raw=[(tag, un_sequence(tag, little))]
        )
        for syntax, little in ((ExplicitVRLittleEndian, True), (ExplicitVRBigEndian, False))
    }
    assert takes_fast_path(files[ExplicitVRLittleEndian])
    little_rows = same_rows_on_both_paths(files[ExplicitVRLittleEndian])
    big_rows = read_rows(files[ExplicitVRBigEndian], fast_path=False)  # pydicom: "truncated"

    def content(rows):  # what both files share (their UIDs differ)
        shared = {"(0008,2112)", "(0008,1150)", "(0008,1155)", "(0008,0060)", "(0020,0013)"}
        return [r[1:] for r in rows if r.tag in shared]

    assert content(big_rows) == content(little_rows)
    sequence = next(r for r in little_rows if r.tag == "(0008,2112)")
    assert (sequence.vr, sequence.is_sequence, sequence.sequence_length) == ("SQ", True, 1)
    items = [r for r in little_rows if r.parent_sequence_index == sequence.index]
    assert [(r.tag, r.value_json) for r in items] == [
        ("(0008,1150)", '["1.2.840.10008.5.1.4.1.1.2"]'),
        ("(0008,1155)", '["1.2.3.4.5"]'),
    ]
    assert read_instance(files[ExplicitVRBigEndian]).instance_number == 7


@pytest.mark.parametrize("blank", [b"  ", b"\x00\x00"], ids=["spaces", "NULs"])
@BOTH_PATHS
def test_a_blank_vr_takes_the_dictionarys(tmp_path, blank, fast_path):
    padding = struct.pack("<HH", 0x0028, 0x0120) + blank + struct.pack("<H", 2) + b"\x00\x80"
    path = part10(
        tmp_path / "blank.dcm",
        [(0x00280103, "US", b"\x01\x00"), (0x00281050, "DS", b"40")],  # signed pixels
        raw=[(0x00280120, padding)],  # Pixel Padding Value, as in fo-dicom's GH179A.dcm
    )
    rows = {r.tag: r for r in read_rows(path, fast_path=fast_path)}
    assert (rows["(0028,0120)"].vr, rows["(0028,0120)"].value_json) == ("SS", "[-32768]")
    assert rows["(0028,1050)"].value_json == "[40.0]"
    same_rows_on_both_paths(path)


@BOTH_PATHS
def test_a_blank_vr_is_read_as_implicit_where_the_dictionary_does_not_parse(tmp_path, fast_path):
    text = b"x" * 0x10000  # an implicit length of 65536 leaves NULs where the VR would be
    comments = struct.pack("<HHL", 0x0032, 0x4000, len(text)) + text
    path = part10(tmp_path / "implicit.dcm", [(0x00280010, "US", b"\x02\x00")])
    path.write_bytes(path.read_bytes() + comments)  # Study Comments (LT), last
    rows = {r.tag: r for r in read_rows(path, fast_path=fast_path)}
    assert rows["(0032,4000)"].vr == "LT"
    assert rows["(0032,4000)"].value_json == json.dumps([text.decode()])
    same_rows_on_both_paths(path)


@BOTH_PATHS
def test_a_blank_vr_that_parses_neither_way_is_still_truncated(tmp_path, fast_path):
    broken = struct.pack("<HH", 0x0028, 0x0120) + b"  " + struct.pack("<H", 40) + b"\x00\x80"
    path = part10(tmp_path / "broken.dcm", [], raw=[(0x00280120, broken)])
    with pytest.raises(DicomReadError, match="truncated"):
        read_instance(path, fast_path=fast_path)


# --------------------------------------------------------------------------
# 7. InstanceCreationDate is the last date fallback
# --------------------------------------------------------------------------
@BOTH_PATHS
def test_a_file_whose_only_valid_date_is_instance_creation_date_is_ingested(tmp_path, fast_path):
    path = part10(
        tmp_path / "dates.dcm",
        [
            (0x00080012, "DA", b"20120304"),
            (0x00080013, "TM", b"101500"),
            (0x00080021, "DA", b"2012"),
        ],
    )
    data = path.read_bytes().replace(b"DA\x08\x0020240102", b"DA\x08\x0000000000")
    path.write_bytes(data)  # StudyDate invalid, SeriesDate invalid, no others
    instance = read_instance(path, fast_path=fast_path)
    assert instance.procedure_datetime == datetime.datetime(2012, 3, 4, 10, 15)
    assert instance.image_date == datetime.date(2012, 3, 4)
