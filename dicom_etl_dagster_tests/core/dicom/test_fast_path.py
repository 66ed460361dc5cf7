"""The fast path reads exactly what the pydicom path reads, and takes the common files.

The oracle is ``read_instance(path, fast_path=False)``: the pydicom-based reader that
test_reader.py and test_serializer_equivalence.py check against pydicom's DICOM JSON
model. For every file below, reading it with the fast path must give the same instance
and the same rows, or the same failure reason. Separately, the fast path must actually
take the files it is meant for (so a fast path that always declines fails here).
"""

from __future__ import annotations

import struct
import tempfile
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_etl_dagster.core.dicom.reader import DicomReadError, read_instance
from dicom_etl_dagster_tests.dicom_samples import (
    PYDICOM_DATA,
    PYDICOM_TEST_FILES,
    SAMPLE_FILES,
    read_rows,
    takes_fast_path,
)
from dicom_etl_dagster_tests.helpers import load_script
from dicom_etl_dagster_tests.reliability.hostile import hostile_corpus


def outcome(path: Path, fast_path: bool, read=read_instance):
    try:
        return read(path, fast_path=fast_path)
    except DicomReadError as exc:
        return f"DicomReadError: {exc}"


def assert_same_outcome(path: Path) -> None:
    fast, slow = outcome(path, True), outcome(path, False)
    if isinstance(fast, str) or isinstance(slow, str):
        assert fast == slow, path
        return
    assert fast.elements == slow.elements, path  # every column of every row, in order
    assert fast == slow, path


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: str(p.relative_to(PYDICOM_DATA)))
def test_every_pydicom_sample_reads_the_same_on_both_paths(path):
    assert_same_outcome(path)


def test_rows_are_the_same_also_where_the_instance_is_then_refused():
    """Files without UIDs or dates (most charset_files) fail after the walk: their rows must
    still be identical, or a file fixed later would be stored differently."""
    compared = 0
    for path in SAMPLE_FILES:
        fast, slow = outcome(path, True, read_rows), outcome(path, False, read_rows)
        assert fast == slow, path
        compared += not isinstance(fast, str)
    assert compared >= 150


def test_the_fast_path_takes_the_common_encodings():
    taken = {p.name for p in SAMPLE_FILES if takes_fast_path(p)}
    # explicit VR LE with GE private tags and ISO_IR 100, implicit VR LE with nested
    # sequences, encapsulated JPEG, SR content tree, SEG with 32 sequences, UTF-8, Cyrillic, Greek.
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "rtplan.dcm",
        "rtdose.dcm",
        "JPEG-lossy.dcm",
        "test-SR.dcm",
        "liver_1frame.dcm",
        "chrX1.dcm",
        "chrRuss.dcm",
        "chrGreek.dcm",
    ):
        assert name in taken, name
    assert len(taken) >= 140, (
        f"only {len(taken)} of {len(SAMPLE_FILES)} sample files took the fast path"
    )


def test_every_benchmark_corpus_template_takes_the_fast_path_with_identical_rows(tmp_path):
    make_corpus = load_script("make_corpus")
    make_corpus.generate(tmp_path, make_corpus.CorpusSpec(files=48, files_per_series=2))
    files = sorted((tmp_path / make_corpus.DICOM_SUBDIR).rglob("*.dcm"))
    assert len(files) == 48
    for path in files:
        assert takes_fast_path(path), path
        assert_same_outcome(path)


def test_hostile_files_read_the_same_on_both_paths(tmp_path):
    """Truncations, byte flips, broken structures and odd values: same rows or same reason."""
    files = sorted(hostile_corpus(tmp_path))
    assert len(files) > 300
    for path in files:
        assert_same_outcome(path)


# --------------------------------------------------------------------------
# Values at the edges of each converter, written both explicit and implicit
# --------------------------------------------------------------------------
EDGE_VALUES = [
    ("PatientName", "PN", b"Doe^John=Ideo^Graphic=Pho^Netic"),
    ("ReferringPhysicianName", "PN", b"A^B\\C^D "),
    ("OtherPatientNames", "PN", b"=OnlyIdeographic"),
    ("PerformingPhysicianName", "PN", b"A^B=C^D="),  # empty trailing groups are dropped
    ("NameOfPhysiciansReadingStudy", "PN", b"=="),  # ... down to an empty name
    ("PatientID", "LO", b" lead and trail  "),
    ("StudyDescription", "LO", b'quote " back\\slash\ttab'),
    ("SeriesDescription", "LO", b"brace {0} and }{"),
    ("ImageComments", "LT", b"line one\r\nline two \\ not split\x00"),
    ("ImageType", "CS", b"ORIGINAL\\PRIMARY\\\\AXIAL "),
    ("Modality", "CS", b""),
    ("StationAETitle", "AE", b"  AE1 \\ AE2"),
    ("SliceThickness", "DS", b" 1.50 "),
    ("PixelSpacing", "DS", b"0.5\\-1e-3"),
    ("WindowCenter", "DS", b"+40.\\.5"),
    ("InstanceNumber", "IS", b"+0012 "),
    ("ReferencedFrameNumber", "IS", b"1\\-2\\3"),
    ("Rows", "US", b"\x00\x02"),
    ("Columns", "US", b""),
    ("RescaleType", "LO", b"HU\x00"),
    ("FrameIncrementPointer", "AT", b"\x18\x00\x63\x10\x20\x00\x13\x00"),
    ("RecommendedDisplayFrameRateInFloat", "FL", b"\x00\x00\xc0\x7f"),  # NaN
    ("PhysicalDeltaX", "FD", b"\x00\x00\x00\x00\x00\x00\xf0\x7f"),  # Infinity
    ("ReferencedSOPInstanceUID", "UI", b"1.2.3\x00"),
    ("AcquisitionDateTime", "DT", b"20240101120000.123456+0100"),
    ("StudyTime", "TM", b"235959.9 "),
    ("PatientAge", "AS", b"045Y"),
    ("TextValue", "UT", b"free text \\ with backslash  "),
    ("EncapsulatedDocument", "OB", b"\x00\x01\x02\xff"),
    ("SoftwareVersions", "LO", b"a\\b\\\\"),
]


def _edge_dataset(charset: str | None, text_suffix: bytes, private: bool = True) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword, vr, raw in EDGE_VALUES:
        # pydicom's writer normalises some of these (PN); test_raw_edge_values writes them verbatim.
        raw += text_suffix if vr in ("LO", "LT") else b""
        raw += b"\x00" if len(raw) % 2 and vr == "UI" else b" " if len(raw) % 2 else b""
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    item = Dataset()
    item.CodeValue = "T-D1100"
    item.CodeMeaning = "caf\xe9"
    nested = Dataset()
    nested.CodeValue = "nested"
    if private:
        nested.add_new(0x00090010, "LO", "PRIVATE CREATOR")
        nested.add_new(0x00091001, "US", 7)
    item.add_new("ConceptCodeSequence", "SQ", Sequence([nested, Dataset()]))
    ds.add_new("AnatomicRegionSequence", "SQ", Sequence([item]))
    ds.add_new("ReferencedImageSequence", "SQ", Sequence([]))
    if private:
        ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
        ds.add_new(0x0019100A, "US", 3)
        ds.add_new(0x00191020, "SQ", Sequence([Dataset()]))
    return ds


def _save(ds: Dataset, path: Path, syntax: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.preamble = b"\x00" * 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "charset, suffix", [(None, b""), ("ISO_IR 100", b" \xe9"), ("ISO_IR 192", b" \xc3\xa9")]
)
def test_edge_values_explicit_vr_read_the_same(tmp_path, charset, suffix):
    path = _save(_edge_dataset(charset, suffix), tmp_path / "edge.dcm", ExplicitVRLittleEndian)
    assert takes_fast_path(path)
    assert_same_outcome(path)
    by_keyword = {
        r.keyword: r for r in read_instance(path).elements if r.parent_sequence_index is None
    }
    assert by_keyword["PatientName"].value_json == (
        '[{"Alphabetic": "Doe^John", "Ideographic": "Ideo^Graphic", "Phonetic": "Pho^Netic"}]'
    )
    assert (by_keyword["ImageType"].vm, by_keyword["ImageType"].value_json) == (
        "4",
        '["ORIGINAL", "PRIMARY", "", "AXIAL"]',
    )
    assert by_keyword["PixelSpacing"].value_json == "[0.5, -0.001]"


def test_edge_values_implicit_vr_read_the_same(tmp_path):
    # Private tags in implicit VR take their VR from pydicom's private dictionary: declined.
    path = _save(
        _edge_dataset(None, b"", private=False), tmp_path / "edge.dcm", ImplicitVRLittleEndian
    )
    assert takes_fast_path(path)
    assert_same_outcome(path)


_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _raw_element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    value += (b"\x00" if vr == "UI" else b" ") if len(value) % 2 else b""
    if not explicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _raw_file(path: Path, elements: list[tuple[int, str, bytes]], explicit: bool) -> Path:
    """A Part 10 file written byte by byte: values reach the readers exactly as given."""
    sop = generate_uid().encode()
    syntax = (ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian).encode()
    meta = b"".join(
        _raw_element(t, vr, v, True)
        for t, vr, v in [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", b"1.2.840.10008.5.1.4.1.1.7"),
            (0x00020003, "UI", sop),
            (0x00020010, "UI", syntax),
        ]
    )
    meta = _raw_element(0x00020000, "UL", struct.pack("<L", len(meta)), True) + meta
    required = [
        (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.7"),
        (0x00080018, "UI", sop),
        (0x00080020, "DA", b"20240102"),
        (0x0020000D, "UI", generate_uid().encode()),
        (0x0020000E, "UI", generate_uid().encode()),
    ]
    dataset = b"".join(_raw_element(t, vr, v, explicit) for t, vr, v in sorted(required + elements))
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + dataset)
    return path


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize(
    "charset, suffix",
    [
        (b"", b""),
        (b"ISO_IR 100", b" \xe9"),
        (b"ISO_IR 192", b" \xc3\xa9"),
        (b"ISO_IR 144", b" \xd0"),
    ],
)
def test_raw_edge_values_read_the_same(tmp_path, explicit, charset, suffix):
    elements = [
        (
            int(Tag(keyword)),
            vr,
            raw + (suffix if vr in ("LO", "LT") or keyword == "PatientName" else b""),
        )
        for keyword, vr, raw in EDGE_VALUES
    ]
    if charset:
        elements.append((0x00080005, "CS", charset))
    path = _raw_file(tmp_path / "raw.dcm", elements, explicit)
    data = path.read_bytes()
    assert all(raw in data for _, _, raw in elements)  # verbatim, unlike a pydicom-written file
    assert takes_fast_path(path)
    assert_same_outcome(path)
    by_keyword = {r.keyword: r for r in read_instance(path).elements}
    assert by_keyword["NameOfPhysiciansReadingStudy"].vm == "0"  # "==": no name at all
    assert by_keyword["PerformingPhysicianName"].value_json.count("Ideographic") == 1


def test_a_repeated_value_reads_by_each_files_character_set(tmp_path):
    """The walker keeps converted values for the next file of a series (``_CONVERTED``): the
    same bytes must still decode by each file's own character set."""
    same_bytes = b"Caf\xc3\xa9"  # UTF-8 "Café"; in ISO_IR 100 "CafÃ©"
    values = {}
    for charset in (b"ISO_IR 192", b"ISO_IR 100", b"ISO_IR 192"):
        elements = [(0x00080005, "CS", charset), (0x00080080, "LO", same_bytes)]
        path = _raw_file(tmp_path / f"{charset.decode()}.dcm", elements, explicit=True)
        assert takes_fast_path(path)
        assert_same_outcome(path)
        (row,) = [r for r in read_instance(path).elements if r.keyword == "InstitutionName"]
        values.setdefault(charset, set()).add(row.value_json)
    assert values == {b"ISO_IR 192": {'["Café"]'}, b"ISO_IR 100": {'["CafÃ©"]'}}


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_other_transfer_syntaxes_are_declined_and_read_by_pydicom(tmp_path, syntax):
    ds = _edge_dataset(None, b"")
    path = _save(ds, tmp_path / "other.dcm", syntax)
    assert not takes_fast_path(path)
    assert_same_outcome(path)
    assert read_instance(path).sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize(
    "charset", ["ISO 2022 IR 87", "GB18030", ["ISO 2022 IR 6", "ISO 2022 IR 100"]]
)
def test_other_character_sets_are_declined_and_read_by_pydicom(tmp_path, charset):
    ds = _edge_dataset(None, b"", private=False)
    for keyword, _, _ in EDGE_VALUES:  # raw bytes that are not valid in these character sets
        delattr(ds, keyword)
    ds.SpecificCharacterSet = charset
    ds.PatientName = "Doe^John"
    path = _save(ds, tmp_path / "charset.dcm", ExplicitVRLittleEndian)
    assert not takes_fast_path(path)
    assert_same_outcome(path)


# --------------------------------------------------------------------------
# Any value of any handled VR: both paths agree (or the fast path declines)
# --------------------------------------------------------------------------
VR_EXAMPLE_KEYWORDS = {
    "AE": "RetrieveAETitle",
    "AS": "PatientAge",
    "CS": "ImageType",
    "DA": "ContentDate",
    "DS": "SliceThickness",
    "DT": "AcquisitionDateTime",
    "IS": "SeriesNumber",
    "LO": "SeriesDescription",
    "LT": "ImageComments",
    "PN": "ReferringPhysicianName",
    "SH": "StationName",
    "ST": "InstitutionAddress",
    "TM": "StudyTime",
    "UI": "FrameOfReferenceUID",
    "UT": "TextValue",
    "US": "Rows",
    "SS": "TagAngleSecondAxis",
    "UL": "NumberOfWaveformSamples",
    "SL": "ReferencePixelX0",
    "FL": "RecommendedDisplayFrameRateInFloat",
    "FD": "PhysicalDeltaX",
    "AT": "FrameIncrementPointer",
    "OB": "EncapsulatedDocument",
}
# Bytes that matter to DICOM value parsing, mixed with arbitrary bytes.
VALUES = st.one_of(
    st.binary(max_size=48),
    st.text(alphabet='0123456789.+-eE \\=^\x00aZ{}"\t\xe9\u00c3', max_size=24).map(
        lambda text: text.encode("utf-8")
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    vr=st.sampled_from(sorted(VR_EXAMPLE_KEYWORDS)),
    value=VALUES,
    explicit=st.booleans(),
    charset=st.sampled_from([b"", b"ISO_IR 100", b"ISO_IR 192"]),
)
def test_any_value_reads_the_same_on_both_paths(vr, value, explicit, charset):
    elements = [(int(Tag(VR_EXAMPLE_KEYWORDS[vr])), vr, value)]
    if charset:
        elements.append((0x00080005, "CS", charset))
    with tempfile.TemporaryDirectory() as folder:
        assert_same_outcome(_raw_file(Path(folder) / "value.dcm", elements, explicit))


# --------------------------------------------------------------------------
# Corrupted real headers: both paths agree (or the fast path declines)
# --------------------------------------------------------------------------
MUTATION_SOURCES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "liver_1frame.dcm",
    "JPEG-lossy.dcm",
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(MUTATION_SOURCES),
    where=st.floats(0, 1),
    patch=st.binary(min_size=1, max_size=6),
)
# NULs inside a DS list ("1.00\0\0\\0.0000"): pydicom strips each item's padding.
@example(name="MR_small.dcm", where=0.185546875, patch=b"\x00\x00")
def test_overwritten_header_bytes_read_the_same_on_both_paths(name, where, patch):
    data = bytearray((PYDICOM_TEST_FILES / name).read_bytes())
    header_end = min(len(data), 6000)  # lengths, VRs, tags and values; not the pixel data
    at = 132 + int(where * (header_end - 132 - len(patch)))
    data[at : at + len(patch)] = patch
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(bytes(data))
        assert_same_outcome(path)
