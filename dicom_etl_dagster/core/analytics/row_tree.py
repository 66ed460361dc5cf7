"""A dataset tree read from the metadata rows the reader already produced.

The structured-report walker and the segmentation reader need a content tree. Reading the
file a second time with pydicom cost 2-8 ms per SR / SEG file (``scripts/benchmark.py``:
measurements then cost a quarter of the ETL's speed on a corpus with 12% SR / SEG files);
the rows hold the same tree in the DICOM JSON model, so this module rebuilds it from them:
a ``RowDataset`` is a mapping keyword -> value whose ``get`` answers as pydicom's
``Dataset.get`` does for the walkers (a sequence is a list of ``RowDataset`` items, a
single value is the value, several values a list, DS / IS their text). Values are decoded
only when asked for: a segmentation's per-frame sequences are never decoded.
It also works for instances that never were a file (a DICOMweb source's JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from dicom_etl_dagster.core.dicom.elements import ElementRow, json_number_text

_NUMBER_TEXT_VRS = frozenset({"DS", "IS"})
#: Binary VRs whose DICOM JSON is a Value array: InlineBinary there is an odd value kept as
#: bytes (core/dicom/odd_values.py), never a number for the walkers.
_BINARY_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})


class RowDataset(dict):
    """keyword -> a list of items (a sequence), a (VR, DICOM JSON text) pair not decoded yet,
    or the decoded value; ``get`` decodes a value once, when it is first asked for."""

    def get(self, keyword: str, default: Any = None) -> Any:
        entry = dict.get(self, keyword)
        if type(entry) is tuple:  # decoded values are never tuples (JSON has none)
            entry = _decoded(*entry)
            self[keyword] = entry
        return default if entry is None else entry


def _decoded(vr: str, value_json: str | None) -> Any:
    if value_json is None:
        return None
    if (
        value_json.startswith('["')
        and value_json.endswith('"]')
        and "\\" not in value_json
        and '"' not in value_json[2:-2]
    ):
        return value_json[2:-2]  # one string, the common case: no JSON decode
    try:
        value = json.loads(value_json)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None if vr in _BINARY_NUMBER_VRS else value  # InlineBinary text
    if vr in _NUMBER_TEXT_VRS:
        value = [json_number_text(v) for v in value]
    if not value:
        return None
    return value[0] if len(value) == 1 else value


def row_tree(rows: Iterable[ElementRow]) -> RowDataset:
    """The instance's top-level dataset, its sequences' items nested as in the file."""
    root = RowDataset()
    items: dict[int, RowDataset] = {}  # the reader's item index -> its dataset
    sequences: dict[int, list[RowDataset]] = {}  # sequence row index -> its items
    for row in rows:
        if row.parent_sequence_index is None or row.parent_item_index is None:
            target = root
        else:
            target = items.get(row.parent_item_index)  # type: ignore[assignment]
            if target is None:
                target = items[row.parent_item_index] = RowDataset()
                sequences.setdefault(row.parent_sequence_index, []).append(target)
        if row.is_sequence:
            target[row.keyword or row.tag] = sequences.setdefault(row.index, [])
        elif row.keyword:  # private and unknown elements have no keyword: the walkers skip them
            target[row.keyword] = (row.vr, row.value_json)
    return root
