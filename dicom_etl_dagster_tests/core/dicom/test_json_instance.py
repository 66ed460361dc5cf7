"""DICOM JSON (WADO-RS metadata) -> the rows a file gives, element by element.

Against a real Orthanc: the server's own metadata of pydicom's sample files is read by
``instance_from_json`` and compared with ``read_instance`` of the same file. The only
differences allowed are the two DICOM JSON itself implies: no file meta group (0002), and a
value the server sent as a ``BulkDataURI`` is stored as that URI (the file has its bytes)."""

from __future__ import annotations

import base64
import dataclasses
import json

import pydicom
import pytest

from dicom_etl_dagster.core.dicom.json_instance import instance_from_json
from dicom_etl_dagster.core.dicom.reader import DicomReadError, read_instance
from dicom_etl_dagster.core.sources.dicomweb import DicomWebSource
from dicom_etl_dagster_tests.orthanc import pydicom_test_file

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "waveform_ecg.dcm")
PIXEL_DATA = {"7FE00010", "7FE00008", "7FE00009"}


def json_elements(dataset: dict) -> list[tuple[str, dict]]:
    """(tag, element) in the walk's order: tag order, each sequence's items right after it."""
    found = []
    for tag in sorted(dataset):
        if tag in PIXEL_DATA:
            continue
        element = dataset[tag]
        found.append((tag, element))
        if element.get("vr") == "SQ":
            for item in element.get("Value") or []:
                found.extend(json_elements(item))
    return found


def without_file_meta(rows):
    """The file's rows without group 0002, renumbered as if it never had it (it comes first)."""
    meta = sum(1 for r in rows if r.group == "0002")
    assert all(r.group == "0002" for r in rows[:meta])

    def shift(i):
        return None if i is None else i - meta

    return [
        r._replace(index=r.index - meta, parent_sequence_index=shift(r.parent_sequence_index))
        for r in rows[meta:]
    ]


@pytest.mark.parametrize("name", SAMPLES)
def test_server_metadata_gives_the_files_rows_but_file_meta_and_bulk_data(orthanc, name):
    path = pydicom_test_file(name)
    ds = pydicom.dcmread(path)
    orthanc.post_instance(path.read_bytes())
    with DicomWebSource(orthanc.dicomweb_url) as source:
        (dataset,) = source.series_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID)

    from_server = instance_from_json(dataset)
    from_file = read_instance(path)
    expected = without_file_meta(from_file.elements)
    elements = json_elements(dataset)
    assert len(from_server.elements) == len(elements) == len(expected)

    bulk = 0
    for got, want, (tag, element) in zip(from_server.elements, expected, elements, strict=True):
        assert got.tag == f"({tag[:4]},{tag[4:]})"
        if "BulkDataURI" in element:
            bulk += 1
            # The link instead of the bytes; everything else about the element as the file's.
            assert got.value_json == json.dumps(element["BulkDataURI"]), got.tag
            assert got._replace(value_json=None, vm="1") == want._replace(value_json=None, vm="1")
            continue
        if "InlineBinary" in element:
            assert base64.b64decode(json.loads(got.value_json)) == base64.b64decode(
                element["InlineBinary"]
            )
        assert got == want, f"{name} {got.tag}"

    # The instance record (UIDs, dates, modality, ...) is the file's.
    for field in dataclasses.fields(from_file):
        if field.name not in ("elements", "number_texts"):
            assert getattr(from_server, field.name) == getattr(from_file, field.name), field.name
    if name == "CT_small.dcm":
        assert bulk == 4  # 3 GE private OB values and the trailing padding: links, not bytes


def test_bulk_data_inline_binary_sequences_and_private_tags_without_a_server():
    dataset = {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
        "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00080020": {"vr": "DA", "Value": ["20240102"]},
        "00081110": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2"]}}, {}]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.5"]},
        "00290010": {"vr": "LO", "Value": ["ACME 1"]},
        "00291001": {"vr": "OB", "InlineBinary": base64.b64encode(b"\x01\x02").decode()},
        "00291002": {"vr": "OB", "BulkDataURI": "http://pacs/bulk/00291002"},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://pacs/bulk/7fe00010"},
    }
    instance = instance_from_json(dataset)
    rows = {r.tag: r for r in instance.elements}
    assert "(7FE0,0010)" not in rows, "never pixel data"
    assert len(instance.elements) == 10  # 9 elements (pixel data left out), 1 nested
    assert rows["(0029,1001)"].value_json == json.dumps(base64.b64encode(b"\x01\x02").decode())
    assert rows["(0029,1002)"].value_json == json.dumps("http://pacs/bulk/00291002")
    assert rows["(0029,1002)"].private_creator == "ACME 1" and rows["(0029,1002)"].is_private
    assert rows["(0008,1110)"].sequence_length == 2
    assert rows["(0008,1150)"].parent_sequence_index == rows["(0008,1110)"].index
    assert instance.procedure_date.isoformat() == "2024-01-02"


def test_a_dataset_that_cannot_be_ingested_fails_with_a_reason():
    with pytest.raises(DicomReadError, match="missing required attribute"):
        instance_from_json({"00080018": {"vr": "UI", "Value": ["1.2.3.4"]}})
    with pytest.raises(DicomReadError, match="cannot read DICOM JSON"):
        instance_from_json({"00080018": {"Value": ["1.2.3.4"]}})  # no vr
    with pytest.raises(DicomReadError, match="not a DICOM JSON dataset"):
        instance_from_json([])  # type: ignore[arg-type]
