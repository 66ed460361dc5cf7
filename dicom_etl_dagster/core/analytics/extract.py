"""Everything of one instance that analytics need, extracted in the parse worker.

All of it comes from the metadata rows the reader already produced: the acquisition profile
and the procedure codes from the top-level rows; for structured reports and segmentations
(recognised by a top-level Content Sequence or Segment Sequence, whatever their Modality
says) the content tree, rebuilt from the rows (``row_tree``), not read from the file again.
An unreadable tree never fails the file: it gives no findings, and the metadata rows are
ingested as always.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dicom_etl_dagster.core.analytics.acquisition import acquisition_values
from dicom_etl_dagster.core.analytics.findings import Code, InstanceFindings
from dicom_etl_dagster.core.analytics.row_tree import row_tree
from dicom_etl_dagster.core.dicom.elements import ElementRow
from dicom_etl_dagster.core.dicom.reader import DicomInstance

#: Top-level sequences of procedure codes, the performed one first.
PROCEDURE_CODE_SEQUENCES = ("(0008,1032)", "(0032,1064)")  # Procedure / Requested Procedure
CONTENT_SEQUENCE = "(0040,A730)"
SEGMENT_SEQUENCE = "(0062,0002)"
_TOP_TAGS = frozenset({*PROCEDURE_CODE_SEQUENCES, CONTENT_SEQUENCE, SEGMENT_SEQUENCE})
_CODE_KEYWORDS = (
    "CodingSchemeDesignator",
    "CodeValue",
    "LongCodeValue",
    "URNCodeValue",
    "CodeMeaning",
)


def instance_findings(
    instance: DicomInstance, measurements: bool = True, acquisition: bool = True
) -> InstanceFindings:
    """The findings of ``instance`` (with its element rows): its procedure codes, and with
    ``measurements`` the SR / SEG content tree and (with ``acquisition``) its profile."""
    rows = instance.elements
    top = {
        row.tag: row for row in rows if row.parent_sequence_index is None and row.tag in _TOP_TAGS
    }
    codes = _procedure_codes(rows, top)
    if not measurements:
        return InstanceFindings(procedure_codes=codes)
    numeric, segments = (), ()
    if CONTENT_SEQUENCE in top or SEGMENT_SEQUENCE in top:
        numeric, segments = _tree_findings(rows, CONTENT_SEQUENCE in top)
    profile = acquisition_values(rows, instance.number_texts) if acquisition else ()
    return InstanceFindings(profile, numeric, segments, codes)


def _tree_findings(rows: Sequence[ElementRow], is_report: bool) -> tuple[tuple, tuple]:
    from dicom_etl_dagster.core.analytics import segmentation, structured_report

    try:
        tree = row_tree(rows)
        if is_report:
            return structured_report.numeric_findings(tree), ()  # type: ignore[arg-type]
        return (), segmentation.segment_findings(tree)  # type: ignore[arg-type]
    except Exception:  # the tree is extra: the file keeps its rows
        return (), ()


def _item_text(row: ElementRow) -> str | None:
    if row.value_json is None:
        return None
    try:
        value = json.loads(row.value_json)
    except ValueError:
        return None
    if isinstance(value, list):
        value = value[0] if value else None
    text = str(value).strip() if value is not None else ""
    return text or None


def _procedure_codes(rows: Sequence[ElementRow], top: dict[str, ElementRow]) -> tuple[Code, ...]:
    """The codes of the Procedure Code Sequence's items, then the Requested Procedure's."""
    codes: list[Code] = []
    for sequence_tag in PROCEDURE_CODE_SEQUENCES:
        sequence = top.get(sequence_tag)
        if sequence is None or not sequence.sequence_length:
            continue
        items: dict[int, dict[str, str | None]] = {}
        for row in rows:
            if row.parent_sequence_index == sequence.index and row.keyword in _CODE_KEYWORDS:
                items.setdefault(row.parent_item_index or 0, {})[row.keyword] = _item_text(row)
        for item in items.values():
            scheme = item.get("CodingSchemeDesignator")
            value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
            if (
                scheme
                and value
                and (code := Code(scheme, value, item.get("CodeMeaning"))) not in codes
            ):
                codes.append(code)
    return tuple(codes)
