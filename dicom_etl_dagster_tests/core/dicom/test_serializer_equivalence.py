"""read_instance stores every element exactly as pydicom's DICOM JSON model (PS3.18 F.2) has it.

The property: for every element of every bundled pydicom file whose elements
``read_instance`` reads (also where it then refuses the instance for lack of UIDs or a
date), through whichever path it takes (the raw-bytes fast path or pydicom), ``value_json`` is ``json.dumps`` of the element's ``"Value"`` (or
``"InlineBinary"``; None when it has neither) in pydicom's own JSON model with all bulk
data inlined, and ``vr`` is that model's ``"vr"``, both after the documented corrections
of pydicom_corrections.py (where pydicom disagrees with the standard and DCMTK).

test_reader.py checks the same values element by element, in walk order, next to
many structural checks. Here the oracle is the whole document, ``Dataset.to_json_dict``,
and each row is found in it by following the row's own parent links (sequence row, item
number), so a nested value that is right but attached to the wrong item fails too, and
every element of the document except pixel data must have its row.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from dicom_etl_dagster.core.dicom.reader import ElementRow, read_instance
from dicom_etl_dagster_tests.dicom_samples import (
    PYDICOM_DATA,
    PYDICOM_TEST_FILES,
    accepted_sample_files,
    read_rows,
    sample_files_read_by,
)
from dicom_etl_dagster_tests.pydicom_corrections import corrected_document

SAMPLES = PYDICOM_TEST_FILES
PIXEL_DATA_KEYS = {"7FE00010", "7FE00008", "7FE00009"}  # never stored
HUGE = sys.maxsize  # bulk data threshold: inline every binary value


ACCEPTED = accepted_sample_files()


def pydicom_json(path: Path) -> tuple[dict, dict]:
    """(file meta, dataset) as pydicom's DICOM JSON model, bulk data inlined, corrected; a
    top-level value pydicom cannot convert (badVR.dcm's NumberOfFrames ``1A``) is in the model
    as its text (``verbatim``), not left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        meta = ds.file_meta.to_json_dict(HUGE) if ds.file_meta is not None else {}
        implicit, little = ds.original_encoding
        encoding = {"big_endian": little is False, "implicit": bool(implicit)}
        document = {}
        for tag in ds.keys():
            try:
                document[f"{tag:08X}"] = ds[tag].to_json_dict(None, HUGE)
            except ValueError:  # what pydicom raises for badVR.dcm
                document[f"{tag:08X}"] = verbatim(ds[tag])
        return corrected_document(meta, big_endian=False, implicit=False), corrected_document(
            document, **encoding
        )


def verbatim(elem) -> dict:
    """An odd text value as the readers keep it: its text, split at backslashes (pydicom keeps
    such a value as text in the element; it is its JSON model that fails)."""
    assert elem.VR in ("IS", "DS"), elem  # the only kind among the sample files
    items = [elem.value] if isinstance(elem.value, str) else list(elem.value)
    return {"vr": elem.VR, "Value": [str(item).strip(" \x00") for item in items]}


def expected_value_json(attribute: dict) -> str | None:
    if "Value" in attribute:
        return json.dumps(attribute["Value"], ensure_ascii=False)
    if "InlineBinary" in attribute:
        return json.dumps(attribute["InlineBinary"], ensure_ascii=False)
    return None


def _key(row: ElementRow) -> str:
    return row.tag[1:5] + row.tag[6:10]  # "(0008,0018)" -> "00080018", the JSON model's key


@dataclass
class StoredSequence:
    row: ElementRow
    items: dict[int, dict] = field(default_factory=dict)  # item number -> dataset


def rows_as_document(rows: list[ElementRow]) -> tuple[dict, dict]:
    """Rebuild (file meta, dataset) from the rows' parent links: JSON key -> row, or a
    StoredSequence holding its items."""
    meta: dict = {}
    dataset: dict = {}
    sequences: dict[int, StoredSequence] = {}  # by row index
    for row in rows:
        if row.parent_sequence_index is None:
            container = meta if row.group == "0002" else dataset
        else:
            container = sequences[row.parent_sequence_index].items.setdefault(
                row.parent_item_index, {}
            )
        assert _key(row) not in container, f"{row.tag} twice in one dataset"
        if row.is_sequence:
            container[_key(row)] = sequences[row.index] = StoredSequence(row)
        else:
            container[_key(row)] = row
    return meta, dataset


def assert_same(expected: dict, actual: dict, where: str) -> None:
    stored_keys = {key for key in expected if key not in PIXEL_DATA_KEYS}
    assert set(actual) == stored_keys, f"{where}: elements differ"
    for key in sorted(stored_keys):
        attribute, mine = expected[key], actual[key]
        here = f"{where}/{key}"
        if attribute["vr"] == "SQ":
            assert isinstance(mine, StoredSequence), f"{here}: not stored as a sequence"
            row, items = mine.row, mine.items
            assert row.vr == "SQ" and row.value_json is None, here
            document_items = attribute.get("Value", [])
            assert row.sequence_length == len(document_items), here
            # Items with nothing stored (empty, or pixel data only) have no rows to find.
            non_empty = [item for item in document_items if set(item) - PIXEL_DATA_KEYS]
            assert len(items) == len(non_empty), f"{here}: items differ"
            for position, (item, number) in enumerate(zip(non_empty, sorted(items))):
                assert_same(item, items[number], f"{here}[{position}]")
        else:
            assert not isinstance(mine, StoredSequence), f"{here}: stored as a sequence"
            assert mine.vr == attribute["vr"], here
            assert mine.value_json == expected_value_json(attribute), here


def test_the_bundled_files_cover_the_interesting_cases() -> None:
    names = {p.name for p in ACCEPTED}
    # CT with private tags, big-endian and implicit VR, RT with nested sequences, SR, waveform.
    assert {
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "test-SR.dcm",
        "waveform_ecg.dcm",
    } <= names
    assert len(ACCEPTED) > 100


FILES_WITH_ROWS = sample_files_read_by(read_rows)


def test_rows_are_checked_for_more_than_the_accepted_files() -> None:
    assert set(ACCEPTED) < set(FILES_WITH_ROWS)
    assert any(p.parent.name == "charset_files" for p in set(FILES_WITH_ROWS) - set(ACCEPTED))


@pytest.mark.parametrize("path", FILES_WITH_ROWS, ids=lambda p: str(p.relative_to(PYDICOM_DATA)))
def test_value_json_is_pydicoms_json_model(path: Path) -> None:
    rows = read_rows(path)
    meta, dataset = rows_as_document(rows)
    expected_meta, expected_dataset = pydicom_json(path)
    assert_same(expected_meta, meta, "meta")
    assert_same(expected_dataset, dataset, "dataset")


def test_a_nested_value_on_the_wrong_item_is_caught() -> None:
    """The oracle is strict about structure, not only about values."""
    rows = read_instance(SAMPLES / "rtplan.dcm").elements
    nested = [r for r in rows if r.parent_item_index is not None]
    numbers = sorted({r.parent_item_index for r in nested})
    moved = nested[0]._replace(
        parent_item_index=next(n for n in numbers if n != nested[0].parent_item_index)
    )
    broken = [moved if r is nested[0] else r for r in rows]
    expected_meta, expected_dataset = pydicom_json(SAMPLES / "rtplan.dcm")
    with pytest.raises(AssertionError):
        meta, dataset = rows_as_document(broken)
        assert_same(expected_dataset, dataset, "dataset")
